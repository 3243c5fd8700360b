"""Checkpoint formats, subset reads, name mapping completeness and clear errors on bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import (
    CheckpointError,
    CheckpointReader,
    expert_tensor_names,
    hf_tensor_shapes,
    load_experts,
    load_model,
    load_weights,
    save_state_dict,
)
from model.config import ConfigError, YuanConfig, preset
from model.dispatcher import LocalDispatcher
from model.transformer import YuanModel


def _logits(model_dir) -> torch.Tensor:
    model, reader = load_model(model_dir)
    disp = LocalDispatcher(load_experts(reader, model.cfg, list(range(model.cfg.num_experts))))
    prompts = [torch.tensor([5, 17, 900, 33, 2]), torch.tensor([316])]
    return model.prefill(prompts, disp)


@pytest.fixture(scope="module")
def fixture_state(fixture_dir):
    return load_file(str(fixture_dir / "model.safetensors")), YuanConfig.from_file(
        fixture_dir / "config.json"
    )


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_formats_give_identical_logits(fixture_dir, fixture_state, tmp_path, fmt):
    state, cfg = fixture_state
    save_state_dict(state, tmp_path, cfg, fmt=fmt, max_shard_bytes=200_000)
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    index = json.loads((tmp_path / f"{stem}.{fmt}.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3, "expected several shards"
    assert torch.equal(_logits(tmp_path), _logits(fixture_dir))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_one_expert_reads_only_its_tensors(fixture_state, tmp_path, fmt):
    state, cfg = fixture_state
    save_state_dict(state, tmp_path, cfg, fmt=fmt, max_shard_bytes=200_000)
    reader = CheckpointReader(tmp_path)
    banks = load_experts(reader, cfg, [5])
    wanted = set(expert_tensor_names(cfg, [5]))
    assert reader.tensors_read == wanted
    index = json.loads(next(tmp_path.glob("*.index.json")).read_text())["weight_map"]
    assert reader.files_opened == {index[n] for n in wanted}, "opened shards that hold none of them"
    assert torch.equal(banks[1].w1[0], state["model.layers.1.mlp.experts.5.w1.weight"])


def test_load_weights_reports_every_non_expert_tensor(fixture_dir):
    cfg = YuanConfig.from_file(fixture_dir / "config.json")
    loaded = load_weights(YuanModel(cfg), CheckpointReader(fixture_dir))
    non_expert = {n for n in hf_tensor_shapes(cfg) if ".mlp.experts." not in n}
    assert loaded == non_expert


def test_tied_embeddings_load_without_lm_head(tmp_path):
    cfg = preset("tiny").with_(tie_word_embeddings=True)
    from model.checkpoint import random_state_dict

    state = random_state_dict(cfg, seed=1)
    assert "lm_head.weight" not in state
    save_state_dict(state, tmp_path, cfg)
    model, _ = load_model(tmp_path)
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    assert torch.equal(model.embed.weight, state["model.embed_tokens.weight"])


def test_missing_tensor_is_named(fixture_state, tmp_path):
    state, cfg = fixture_state
    name = "model.layers.2.self_attn.lf_gate.conv2.bias"
    save_state_dict({k: v for k, v in state.items() if k != name}, tmp_path, cfg)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_model(tmp_path)


def test_wrong_shape_names_tensor_and_both_shapes(fixture_state, tmp_path):
    state, cfg = fixture_state
    bad = dict(state)
    bad["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 32)
    save_state_dict(bad, tmp_path, cfg)
    with pytest.raises(CheckpointError, match=r"q_proj\.weight.*\(64, 32\).*\(64, 64\)"):
        load_model(tmp_path)


def test_truncated_file_is_named(fixture_dir, tmp_path):
    shutil.copy(fixture_dir / "config.json", tmp_path)
    data = (fixture_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path)


def test_missing_shard_is_named(fixture_state, tmp_path):
    state, cfg = fixture_state
    save_state_dict(state, tmp_path, cfg, max_shard_bytes=200_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(tmp_path)


def test_empty_directory_and_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(preset("tiny").to_hf_dict()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"num_attention_heads": 5}, "hidden_size"),
        ({"rope_scaling": {"type": "linear"}}, "rope_scaling"),
        ({"moe_config": {"moe_num_experts": 32, "moe_top_k": 40, "ffn_hidden_size": 48}}, "moe_top_k"),
        (
            {"moe_config": {"moe_num_experts": 32, "moe_top_k": 2, "ffn_hidden_size": 48, "shared": 1}},
            "moe_config.shared",
        ),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"eod_token": 5000}, "eod_token_id"),
    ],
)
def test_bad_config_names_the_field(fixture_dir, change, field):
    raw = json.loads((fixture_dir / "config.json").read_text()) | change
    with pytest.raises(ConfigError, match=field):
        YuanConfig.from_hf_dict(raw)


def test_config_round_trips_through_hf_layout():
    for name in ("tiny", "small", "m32"):
        assert YuanConfig.from_hf_dict(preset(name).to_hf_dict()) == preset(name)
