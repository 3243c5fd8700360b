"""The HF layout of a Yuan checkpoint: every tensor's name and shape, from a config alone.

Plain Python (no torch), so that `inspect` and `plan` can count parameters without loading it;
`model.checkpoint` reads, maps and writes checkpoints by this table.
"""

from __future__ import annotations

from model.config import YuanConfig


def hf_tensor_shapes(cfg: YuanConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Yuan checkpoint in the HF layout, with its shape."""
    d, half, N, F = cfg.hidden_size, cfg.hidden_size // 2, cfg.num_experts, cfg.ffn_hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            **{p + f"self_attn.{x}_proj.weight": (d, d) for x in "qkvo"},
            p + "self_attn.lf_gate.conv1.weight": (half, d, 2, 1),
            p + "self_attn.lf_gate.conv1.bias": (half,),
            p + "self_attn.lf_gate.conv2.weight": (d, half, 2, 1),
            p + "self_attn.lf_gate.conv2.bias": (d,),
            p + "self_attn.lf_gate.output_layernorm.weight": (d,),
        }
        if cfg.router_type == "attention":
            shapes |= {p + f"mlp.gate.{x}.weight": (N, d) for x in ("query", "key", "value")}
        else:
            shapes[p + "mlp.gate.weight"] = (N, d)
        for e in range(N):
            shapes[expert_tensor_name(i, e, "w1")] = (2 * F, d)
            shapes[expert_tensor_name(i, e, "w2")] = (d, F)
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def expert_tensor_name(layer: int, expert: int, which: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{which}.weight"
