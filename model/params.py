"""Parameter and FLOP counts from a config alone (no weights), for `yuan-serve inspect`.

Counted: every tensor of the HF layout (`hf_tensor_shapes`). Active per token: all but the
(N - top_k) unchosen experts of each layer. FLOPs follow the paper's convention, 2 per active
parameter (multiply + add), embedding and LM head included; attention over a context of T tokens
adds 2 * 2 * T * d per layer (scores and weighted sum), zero by default.
"""

from __future__ import annotations

from math import prod

from model.layout import hf_tensor_shapes
from model.config import YuanConfig


def parameter_counts(cfg: YuanConfig, context: int = 0) -> dict[str, float]:
    shapes = hf_tensor_shapes(cfg)
    total = sum(prod(s) for s in shapes.values())
    expert = sum(prod(s) for n, s in shapes.items() if ".mlp.experts." in n)
    per_expert = expert // (cfg.num_layers * cfg.num_experts)
    embedding = prod(shapes["model.embed_tokens.weight"])
    lm_head = embedding if cfg.tie_word_embeddings else prod(shapes["lm_head.weight"])
    active = total - cfg.num_layers * (cfg.num_experts - cfg.top_k) * per_expert
    attention_flops = 4 * context * cfg.hidden_size * cfg.num_layers
    return {
        "total_params": total,
        "active_params": active,
        "expert_params": expert,
        "params_per_expert": per_expert,
        "embedding_params": embedding,
        "lm_head_params": lm_head,
        "gflops_per_token": (2 * active + attention_flops) / 1e9,
        "context": context,
    }
