"""Model configuration: one dataclass, named presets, and the reader of a real HF `config.json`.

The HF file nests the MoE settings under `moe_config`; `YuanConfig.from_hf_dict` flattens them and
rejects unknown or inconsistent fields with an error that names the field, so a checkpoint that
needs math we do not implement fails at load time instead of producing wrong tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")  # `torch_dtype` values; DTYPES maps them


def __getattr__(name: str):
    """`DTYPES` (name -> torch dtype) on first use: the config itself needs no torch, so commands
    that only read configs (`inspect`, `plan`) do not load it."""
    if name == "DTYPES":
        import torch

        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        globals()["DTYPES"] = dtypes  # made once
        return dtypes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ConfigError(ValueError):
    """A config field is unknown, missing or inconsistent; the message names the field."""


@dataclass(frozen=True)
class YuanConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_experts: int
    top_k: int
    ffn_hidden_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    norm_topk_prob: bool = True
    tie_word_embeddings: bool = False
    reset_attention_mask: bool = True
    eod_token_id: int = 77185
    sep_token_id: int = 77187
    pad_token_id: int = 77185
    router_type: str = "attention"  # "attention" (the paper's) or "classical" (softmax(W g))
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_experts",
            "top_k",
            "ffn_hidden_size",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"config field 'hidden_size' ({self.hidden_size}) must be divisible by "
                f"'num_attention_heads' ({self.num_heads})"
            )
        if self.hidden_size % 2:
            raise ConfigError(
                f"config field 'hidden_size' ({self.hidden_size}) must be even "
                "(the localized filter halves it)"
            )
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"config field 'moe_top_k' ({self.top_k}) exceeds 'moe_num_experts' ({self.num_experts})"
            )
        for name in ("eod_token_id", "sep_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ConfigError(
                    f"config field {name!r} ({value}) is outside the vocabulary [0, {self.vocab_size})"
                )
        if self.router_type not in ("attention", "classical"):
            raise ConfigError(
                f"config field 'router_type' must be 'attention' or 'classical', got {self.router_type!r}"
            )
        if self.torch_dtype not in SUPPORTED_DTYPES:
            raise ConfigError(
                f"config field 'torch_dtype' must be one of {', '.join(SUPPORTED_DTYPES)}, "
                f"got {self.torch_dtype!r}"
            )
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"config field 'rms_norm_eps' must be > 0, got {self.rms_norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    # ---- HF config.json ---------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> YuanConfig:
        """Flatten an HF Yuan config (with `moe_config`) into a `YuanConfig`."""
        unknown = sorted(set(raw) - _HF_TOP_LEVEL - _HF_IGNORED)
        if unknown:
            raise ConfigError(
                f"unknown config field {unknown[0]!r} (all unknown: {unknown}); "
                "it may change the math, so it is refused rather than ignored"
            )
        for name in (
            "hidden_size",
            "num_attention_heads",
            "num_hidden_layers",
            "vocab_size",
            "max_position_embeddings",
            "moe_config",
        ):
            if name not in raw:
                raise ConfigError(f"config field {name!r} is missing")
        moe = raw["moe_config"]
        if not isinstance(moe, dict):
            raise ConfigError(f"config field 'moe_config' must be an object, got {type(moe).__name__}")
        unknown = sorted(set(moe) - _HF_MOE_FIELDS)
        if unknown:
            raise ConfigError(f"unknown config field 'moe_config.{unknown[0]}'")
        for name in ("moe_num_experts", "moe_top_k", "ffn_hidden_size"):
            if name not in moe:
                raise ConfigError(f"config field 'moe_config.{name}' is missing")
        if moe.get("gated_linear_unit", True) is not True:
            raise ConfigError(
                "config field 'moe_config.gated_linear_unit' must be true (Yuan2-M32 experts are SwiGLU)"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config field 'hidden_act' must be 'silu', got {raw['hidden_act']!r}")
        if raw.get("use_shareqk", False):
            raise ConfigError("config field 'use_shareqk' = true is not supported (Yuan2-M32 uses false)")
        proj = raw.get("attention_projection_size")
        if proj is not None and proj != raw["hidden_size"]:
            raise ConfigError(
                f"config field 'attention_projection_size' ({proj}) must equal "
                f"'hidden_size' ({raw['hidden_size']})"
            )
        eod = raw.get("eod_token", raw.get("eod_token_id", 77185))
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=raw["num_attention_heads"],
            num_experts=moe["moe_num_experts"],
            top_k=moe["moe_top_k"],
            ffn_hidden_size=moe["ffn_hidden_size"],
            max_position_embeddings=raw["max_position_embeddings"],
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            norm_topk_prob=bool(moe.get("norm_topk_prob", True)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            reset_attention_mask=bool(raw.get("reset_attention_mask", True)),
            eod_token_id=eod,
            sep_token_id=raw.get("sep_token", raw.get("sep_token_id", 77187)),
            pad_token_id=raw.get("pad_token_id", eod),
            router_type=moe.get("router_type", "attention"),
            torch_dtype=raw.get("torch_dtype", "float32"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `config.json` layout that the official code (and `from_hf_dict`) reads."""
        moe: dict[str, Any] = {
            "moe_num_experts": self.num_experts,
            "moe_top_k": self.top_k,
            "ffn_hidden_size": self.ffn_hidden_size,
            "norm_topk_prob": self.norm_topk_prob,
            "gated_linear_unit": True,
        }
        if self.router_type != "attention":
            moe["router_type"] = self.router_type
        return {
            "architectures": ["YuanForCausalLM"],
            "model_type": "yuan",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "model_max_length": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "use_cache": True,
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.eod_token_id,
            "eos_token_id": self.eod_token_id,
            "eod_token": self.eod_token_id,
            "sep_token": self.sep_token_id,
            "causal_mask": True,
            "use_flash_attention": False,
            "reset_attention_mask": self.reset_attention_mask,
            "reset_position_ids": True,
            "use_loss_mask": False,
            "output_router_logits": False,
            "moe_config": moe,
            "torch_dtype": self.torch_dtype,
        }

    @classmethod
    def from_file(cls, path: str | Path) -> YuanConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_hf_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def with_(self, **changes: Any) -> YuanConfig:
        return replace(self, **changes)


# Fields of the HF file that we map, and fields that never change inference math (SPEC: "do not
# change inference math", kernel choices, training-only switches, HF bookkeeping).
_HF_TOP_LEVEL = {
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "reset_attention_mask",
    "eod_token",
    "eod_token_id",
    "sep_token",
    "sep_token_id",
    "pad_token_id",
    "moe_config",
    "torch_dtype",
    "hidden_act",
    "attention_projection_size",
    "use_shareqk",
}
_HF_IGNORED = {
    "architectures",
    "model_type",
    "auto_map",
    "transformers_version",
    "_name_or_path",
    "intermediate_size",
    "initializer_range",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "mask_token_id",
    "model_max_length",
    "causal_mask",
    "use_flash_attention",
    "reset_position_ids",
    "use_loss_mask",
    "output_router_logits",
    "dropout",
    "attention_dropout",
    "hidden_dropout",
    "tokenizer_class",
    "use_lf_gate",
}
_HF_MOE_FIELDS = {
    "moe_num_experts",
    "moe_top_k",
    "ffn_hidden_size",
    "norm_topk_prob",
    "gated_linear_unit",
    "router_type",
}

PRESETS: dict[str, YuanConfig] = {
    # The released Yuan2-M32-hf sizes (SPEC table).
    "m32": YuanConfig(
        vocab_size=135040,
        hidden_size=2048,
        num_layers=24,
        num_heads=16,
        num_experts=32,
        top_k=2,
        ffn_hidden_size=8192,
        max_position_embeddings=16384,
        torch_dtype="bfloat16",
    ),
    # Fixture-sized; byte tokenizer ids 0..255, specials right after them.
    "tiny": YuanConfig(
        vocab_size=320,
        hidden_size=64,
        num_layers=3,
        num_heads=4,
        num_experts=32,
        top_k=2,
        ffn_hidden_size=48,
        max_position_embeddings=1024,
        eod_token_id=256,
        sep_token_id=258,
        pad_token_id=256,
    ),
    # Compute-bound on a CPU: expert math dominates a step, as on the real model.
    "small": YuanConfig(
        vocab_size=1024,
        hidden_size=512,
        num_layers=4,
        num_heads=8,
        num_experts=32,
        top_k=2,
        ffn_hidden_size=512,
        max_position_embeddings=2048,
        eod_token_id=256,
        sep_token_id=258,
        pad_token_id=256,
    ),
}


def lf_width(hidden: int) -> int:
    """Values of one LF state in the cache: c1[t] (d/2), then h[t] (d) (`model/localized_filter.py`)."""
    return hidden // 2 + hidden


def preset(name: str) -> YuanConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
