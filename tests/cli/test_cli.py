"""The `yuan-serve` command line, run as a user would (subprocess, real files)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "cli.main"]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


def test_generate_json_matches_golden(fixture_dir, golden):
    case = golden["cases"][3]
    out = run(
        "generate",
        "--engine",
        "local",
        "--model",
        str(fixture_dir),
        "--token-ids",
        ",".join(map(str, case["prompt_ids"])),
        "--max-tokens",
        "16",
        "--temperature",
        "0",
        "--no-prefix-caching",
        "--batch-invariant",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["token_ids"] == case["generated_ids"]
    assert result["finish_reason"] == "length"
    assert isinstance(result["text"], str)
    out = run(
        "generate", "--engine", "local", "--model", str(fixture_dir), "--token-ids", "1", "--block-size", "0"
    )
    assert out.returncode == 2 and "block_size" in out.stderr and "Traceback" not in out.stderr


def test_init_checkpoint_then_generate_text(tmp_path):
    ckpt = tmp_path / "demo"
    out = run("init-checkpoint", "--preset", "tiny", "--out", str(ckpt), "--seed", "3")
    assert out.returncode == 0, out.stderr
    assert (ckpt / "config.json").exists() and (ckpt / "model.safetensors").exists()
    args = [
        "generate",
        "--engine",
        "local",
        "--model",
        str(ckpt),
        "--prompt",
        "Hello",
        "--max-tokens",
        "8",
        "--temperature",
        "0.8",
        "--seed",
        "11",
        "--json",
    ]
    first, second = run(*args), run(*args)
    assert first.returncode == 0, first.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["token_ids"] == b["token_ids"], "a seeded request must be reproducible"
    assert 1 <= len(a["token_ids"]) <= 8


def test_default_model_is_created_once(tmp_path):
    env = {"YUAN_SERVE_CACHE": str(tmp_path)}
    out = run("generate", "--engine", "local", "--prompt", "hi", "--max-tokens", "2", "--json", env=env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "demo-tiny-seed0-v2" / "config.json").exists()


def test_bad_input_is_a_clear_error_not_a_traceback(fixture_dir, tmp_path):
    out = run(
        "generate", "--engine", "local", "--model", str(fixture_dir), "--token-ids", "1,99999", "--json"
    )
    assert out.returncode == 2 and "token_ids" in out.stderr and "Traceback" not in out.stderr
    out = run("generate", "--engine", "local", "--model", str(tmp_path), "--prompt", "x")
    assert out.returncode == 2 and "config.json" in out.stderr and "Traceback" not in out.stderr


def test_inspect_m32_lands_near_the_paper():
    out = run("inspect", "--preset", "m32", "--json")
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout)
    assert 39e9 <= counts["total_params"] <= 41e9  # paper: 40B
    assert 3.4e9 <= counts["active_params"] <= 3.9e9  # paper: 3.7B
    assert 6.8 <= counts["gflops_per_token"] <= 7.8  # paper: 7.4


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_init_checkpoint_sharded_formats_load(tmp_path, fmt):
    ckpt = tmp_path / fmt
    out = run("init-checkpoint", "--preset", "tiny", "--out", str(ckpt), "--format", fmt, "--shard-mb", "0.5")
    assert out.returncode == 0, out.stderr
    assert len(list(ckpt.glob("*.index.json"))) == 1
    out = run("generate", "--engine", "local", "--model", str(ckpt), "--token-ids", "1,2,3", "--json")
    assert out.returncode == 0, out.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_generate_ray_engine_json_contract(fixture_dir, golden):
    case = golden["cases"][3]
    ids = ",".join(map(str, case["prompt_ids"]))
    out = run(
        "generate",
        "--model",
        str(fixture_dir),
        "--token-ids",
        ids,
        "--max-tokens",
        "16",
        "--pools",
        "2",
        "--max-num-batched-tokens",
        "3",
        "--block-size",
        "4",
        "--json",
    )  # --engine ray is the default; the prompt is prefilled in chunks of 3 tokens
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["token_ids"] == case["generated_ids"] and result["finish_reason"] == "length"
    assert result["timing"]["pools"] == 2 and result["timing"]["generate_s"] > 0
    out = run("generate", "--model", str(fixture_dir), "--token-ids", "1,99999", "--pools", "1", "--json")
    assert out.returncode == 2 and "token_ids" in out.stderr and "Traceback" not in out.stderr


def test_plan_m32_on_eight_gpus():
    out = run("plan", "--preset", "m32", "--gpus", "8", "--gpu-mem", "141", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["experts_per_pool"] == 4 and plan["fits"]
    assert plan["bytes_per_pool"] == 4 * 24 * 3 * 8192 * 2048 * 2  # bf16 experts, every layer
    assert plan["bytes_moved_per_layer_per_token"] == 2 * 2 * 2048 * 2  # top-2 out and back, bf16
    assert 0 < plan["tokens_per_s_bound_memory"] < plan["tokens_per_s_bound_link"]
    small = json.loads(run("plan", "--preset", "m32", "--gpus", "2", "--gpu-mem", "24", "--json").stdout)
    assert not small["fits"]


def test_the_parser_the_client_inspect_and_plan_load_neither_torch_nor_ray():
    """Every command builds the whole parser first; `client` and `stats` are gRPC clients; `inspect`
    and `plan` read configs. None should pay for torch or Ray (~2 s a call): the config models,
    the config and the checkpoint layout live in light modules."""
    probe = (
        "import sys, contextlib, io; from cli.main import build_parser, main; build_parser(); "
        "import cli.client\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['inspect', '--preset', 'm32', '--json'])\n"
        "    main(['plan', '--preset', 'm32', '--gpus', '8', '--gpu-mem', '80', '--json'])\n"
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"loaded: {out.stdout.strip()}"
