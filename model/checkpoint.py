"""Checkpoints in the real HF layout: read (three formats, any subset of tensors), map, write.

One declarative table (`model.layout.hf_tensor_shapes`) lists every tensor of the HF layout with its
shape; the loader, the random-weight writer and the parameter count of `inspect` all read it. Names of our
modules map to HF names through `_RULES`, and `load_weights` returns the set of HF names it loaded so
completeness is testable. Reading is lazy: safetensors and `.bin` shards are memory-mapped and only
the files holding requested tensors are opened, so a pool reads its own experts and nothing else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from model.config import DTYPES, YuanConfig, preset
from model.layout import expert_tensor_name, hf_tensor_shapes  # noqa: F401 (read here too)
from model.experts import ExpertBank
from model.pages import to_huge_pages
from model.transformer import YuanModel


class CheckpointError(RuntimeError):
    """A checkpoint file or tensor is missing, unreadable or of the wrong shape (named in the message)."""


# ---- the HF layout -------------------------------------------------------------------------------
def expert_tensor_names(cfg: YuanConfig, expert_ids: list[int]) -> list[str]:
    """Every tensor of these experts, in every layer: what a pool holding them reads."""
    return [
        expert_tensor_name(i, e, w) for i in range(cfg.num_layers) for e in expert_ids for w in ("w1", "w2")
    ]


# Our parameter name (regex over `YuanModel.state_dict()`) -> HF name template.
_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(a), b)
    for a, b in [
        (r"embed\.weight", "model.embed_tokens.weight"),
        (r"norm\.weight", "model.norm.weight"),
        (r"lm_head\.weight", "lm_head.weight"),
        (r"layers\.(\d+)\.input_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
        (r"layers\.(\d+)\.post_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
        (r"layers\.(\d+)\.attn\.([qkvo])_proj\.weight", "model.layers.{0}.self_attn.{1}_proj.weight"),
        (
            r"layers\.(\d+)\.attn\.lf\.conv([12])_(weight|bias)",
            "model.layers.{0}.self_attn.lf_gate.conv{1}.{2}",
        ),
        (
            r"layers\.(\d+)\.attn\.lf\.norm\.weight",
            "model.layers.{0}.self_attn.lf_gate.output_layernorm.weight",
        ),
        (r"layers\.(\d+)\.router\.(query|key|value)\.weight", "model.layers.{0}.mlp.gate.{1}.weight"),
        (r"layers\.(\d+)\.router\.gate\.weight", "model.layers.{0}.mlp.gate.weight"),
    ]
]


def hf_name(ours: str) -> str:
    for pattern, template in _RULES:
        m = pattern.fullmatch(ours)
        if m:
            return template.format(*m.groups())
    raise KeyError(f"no checkpoint name for parameter {ours!r}")


# ---- reading -------------------------------------------------------------------------------------
class CheckpointReader:
    """Lazy access to the tensors of one checkpoint directory, whatever its format.

    `files_opened` and `tensors_read` record what was touched (a pool must touch only its experts).
    """

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: checkpoint directory not found")
        self.files_opened: set[str] = set()
        self.tensors_read: set[str] = set()
        self._handles: dict[str, object] = {}
        self._where = self._index()

    def _index(self) -> dict[str, str]:
        """HF name -> file name."""
        d = self.dir
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (d / index_name).exists():
                try:
                    weight_map = json.loads((d / index_name).read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{d / index_name}: not a valid index ({e!r})") from None
                for file in sorted(set(weight_map.values())):
                    if not (d / file).exists():
                        raise CheckpointError(f"{d / file}: shard listed in {index_name} is missing")
                return dict(weight_map)
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (d / single).exists():
                return {name: single for name in self._file_names(single)}
        raise CheckpointError(
            f"{d}: no model.safetensors, model.safetensors.index.json, "
            "pytorch_model.bin or pytorch_model.bin.index.json"
        )

    def _file_names(self, file: str) -> list[str]:
        return list(self._open(file).keys())

    def _open(self, file: str):
        if file in self._handles:
            return self._handles[file]
        path = self.dir / file
        self.files_opened.add(file)
        try:
            if file.endswith(".safetensors"):
                handle = safe_open(str(path), framework="pt")
            else:
                handle = _BinFile(torch.load(str(path), map_location="cpu", mmap=True, weights_only=True))
        except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as e:
            raise CheckpointError(f"{path}: cannot read checkpoint file ({e})") from None
        self._handles[file] = handle
        return handle

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Read exactly these tensors, opening only the files that hold them."""
        missing = [n for n in names if n not in self._where]
        if missing:
            raise CheckpointError(
                f"{self.dir}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)"
            )
        by_file: dict[str, list[str]] = defaultdict(list)
        for n in names:
            by_file[self._where[n]].append(n)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            handle = self._open(file)
            for n in file_names:
                try:
                    out[n] = handle.get_tensor(n)
                except (SafetensorError, KeyError, RuntimeError) as e:
                    raise CheckpointError(f"{self.dir / file}: cannot read tensor {n!r} ({e})") from None
                self.tensors_read.add(n)
        return out


class _BinFile:
    """A loaded (memory-mapped) `.bin` state dict behind the safetensors handle interface."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def keys(self):
        return self.state.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.state[name]


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], where: Path) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise CheckpointError(
            f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected)}"
        )


def load_weights(model: nn.Module, reader: CheckpointReader) -> set[str]:
    """Fill a `YuanModel` (no experts) from the checkpoint; returns the HF names loaded."""
    params = dict(model.named_parameters())  # tied lm_head appears once, as embed.weight
    names = {ours: hf_name(ours) for ours in params}
    tensors = reader.read(list(names.values()))
    for ours, hf in names.items():
        _check_shape(hf, tensors[hf], tuple(params[ours].shape), reader.dir)
        with torch.no_grad():
            params[ours].copy_(tensors[hf])
    return set(names.values())


def load_expert_banks(banks: list[nn.Module], reader: CheckpointReader) -> set[str]:
    """Fill per-layer `ExpertBank`s (each with its `expert_ids`); returns the HF names loaded."""
    names = [
        expert_tensor_name(i, e, w)
        for i, bank in enumerate(banks)
        for e in bank.expert_ids
        for w in ("w1", "w2")
    ]
    tensors = reader.read(names)
    for i, bank in enumerate(banks):
        for j, e in enumerate(bank.expert_ids):
            for w in ("w1", "w2"):
                name = expert_tensor_name(i, e, w)
                target = getattr(bank, w)
                _check_shape(name, tensors[name], tuple(target.shape[1:]), reader.dir)
                with torch.no_grad():
                    target[j].copy_(tensors[name])
    return set(names)


# ---- writing -------------------------------------------------------------------------------------
def save_state_dict(
    state: dict[str, torch.Tensor],
    out: str | Path,
    cfg: YuanConfig,
    fmt: str = "safetensors",
    max_shard_bytes: int | None = None,
) -> None:
    """Write `config.json` plus one file or shards with an index, as HF `save_pretrained` does."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    ext, stem = (".safetensors", "model") if fmt == "safetensors" else (".bin", "pytorch_model")
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"format must be 'safetensors' or 'bin', got {fmt!r}")
    n = len(shards)
    files = [f"{stem}{ext}"] if n == 1 else [f"{stem}-{k + 1:05d}-of-{n:05d}{ext}" for k in range(n)]
    for file, shard in zip(files, shards):
        if fmt == "safetensors":
            save_file(shard, str(out / file), metadata={"format": "pt"})
        else:
            torch.save(shard, out / file)
    if n > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {name: file for file, shard in zip(files, shards) for name in shard},
        }
        (out / f"{stem}{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")


def random_state_dict(
    cfg: YuanConfig, seed: int, router_skew: float = 0.0, printable_head: bool = False
) -> dict[str, torch.Tensor]:
    """Random weights in the HF layout, scaled so routing decisions are clear (not round-off ties).

    Residual dimension 0 carries a constant that attention and experts never write (as in the
    golden fixture's design). Routers ignore it by default; with `router_skew` > 0 they read it so
    that the first quarter of the experts (Zipf-like, in every layer) win more often: a skewed load.
    With `printable_head`, LM-head rows of ids other than printable ASCII bytes read only the
    constant dimension, negatively, so a byte-tokenizer demo model prints readable (random) text.
    """
    g = torch.Generator().manual_seed(seed)
    d, N = cfg.hidden_size, cfg.num_experts
    state: dict[str, torch.Tensor] = {}
    for name, shape in hf_tensor_shapes(cfg).items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            t = torch.ones(shape)
        elif name.endswith(".bias"):
            t = torch.zeros(shape)
        elif ".mlp.gate." in name:
            # Soft expert-attention (q, k) and strong values: the widest routing gaps measured
            # for random weights (a random Attention Router still has ~1% near-ties).
            gain = 10.0 if name.endswith(("value.weight", "gate.weight")) else 2.0
            t = torch.randn(shape, generator=g) * (gain / d**0.5)
        else:
            fan_in = shape[1] * (shape[2] if len(shape) == 4 else 1)
            t = torch.randn(shape, generator=g) / fan_in**0.5
        state[name] = t
    state["model.embed_tokens.weight"][:, 0] = 1.0
    for name, t in state.items():  # attention and experts never write the constant dimension
        if name.endswith(("self_attn.o_proj.weight", ".w2.weight")):
            t[0] = 0.0
    if printable_head:
        head = state["lm_head.weight" if "lm_head.weight" in state else "model.embed_tokens.weight"]
        keep = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        keep[32:127] = True
        head[~keep] = 0.0
        head[~keep, 0] = -50.0
    for name, t in state.items():  # routers ignore the constant, unless skewed below
        if ".mlp.gate." in name:
            t[:, 0] = 0.0
    if router_skew > 0:
        # Hot experts' queries, and one "magnet" expert's key and value, read the constant: a hot
        # expert's row of M then leans on the magnet's large value, lifting its score by about its
        # hotness: Zipf-like over the first quarter of the expert ids, the same in every layer
        # (popular experts stay popular), so contiguous pools see the skew too.
        h = 1.0 / torch.arange(1, N + 1, dtype=torch.float32) * router_skew
        h[max(1, N // 4) :] = 0.0
        magnet = 0
        for i in range(cfg.num_layers):
            if f"model.layers.{i}.mlp.gate.query.weight" in state:
                state[f"model.layers.{i}.mlp.gate.query.weight"][:, 0] = h
                state[f"model.layers.{i}.mlp.gate.key.weight"][magnet, 0] = router_skew
                state[f"model.layers.{i}.mlp.gate.value.weight"][magnet, 0] = router_skew
            else:
                state[f"model.layers.{i}.mlp.gate.weight"][:, 0] = h
    return {k: v.to(DTYPES[cfg.torch_dtype]) for k, v in state.items()}


# ---- whole models ----------------------------------------------------------------------------------
def load_model(
    directory: str | Path, dtype: str | None = None, huge_pages: bool = True
) -> tuple[YuanModel, CheckpointReader]:
    """The gateway's part of the model (everything but the experts), loaded and in eval mode.
    `huge_pages`: its weights in huge pages (`model/pages.py`); False when they go to a GPU next."""
    cfg = YuanConfig.from_file(Path(directory) / "config.json")
    if dtype:
        cfg = cfg.with_(torch_dtype=dtype)
    reader = CheckpointReader(directory)
    model = YuanModel(cfg).to(DTYPES[cfg.torch_dtype])
    load_weights(model, reader)
    if huge_pages:  # decode steps stream them: model/pages.py
        to_huge_pages(model)
    return model.eval(), reader


def load_experts(
    reader: CheckpointReader, cfg: YuanConfig, expert_ids: list[int], huge_pages: bool = True
) -> list[ExpertBank]:
    """One `ExpertBank` per layer holding `expert_ids`, read from the checkpoint and nothing else;
    `huge_pages` as for `load_model`."""
    banks = [
        ExpertBank(expert_ids, cfg.hidden_size, cfg.ffn_hidden_size).to(DTYPES[cfg.torch_dtype])
        for _ in range(cfg.num_layers)
    ]
    load_expert_banks(banks, reader)
    if huge_pages:
        for b in banks:
            to_huge_pages(b)
    return [b.eval().requires_grad_(False) for b in banks]


def write_random_checkpoint(
    cfg: YuanConfig,
    out: str | Path,
    seed: int,
    router_skew: float = 0.0,
    fmt: str = "safetensors",
    max_shard_bytes: int | None = None,
    printable_head: bool = False,
) -> Path:
    """A random-weight checkpoint in the real HF layout, written atomically (tmp dir + rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_state_dict(
            random_state_dict(cfg, seed, router_skew, printable_head), tmp, cfg, fmt, max_shard_bytes
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


DEMO_PRESET, DEMO_SEED = "tiny", 0


def demo_checkpoint() -> Path:
    """The main job's default model, created once in the cache directory (`YUAN_SERVE_CACHE`,
    default `~/.cache/yuan-serve`), since real weights cannot be downloaded here."""
    cache = Path(os.environ.get("YUAN_SERVE_CACHE", Path.home() / ".cache" / "yuan-serve"))
    out = cache / f"demo-{DEMO_PRESET}-seed{DEMO_SEED}-v2"
    if not (out / "config.json").exists():
        write_random_checkpoint(preset(DEMO_PRESET), out, DEMO_SEED, printable_head=True)
    return out
