"""Yuan 2.0-M32 without its experts: embeddings, decoder layers (LF attention + Attention Router),
final norm and LM head. This is what a gateway holds; the expert step goes through a `Dispatcher`.

Two entry points share every layer: `prefill` (whole prompts, packed, each from position 0) and
`decode` (one new token for each active cache slot, in slot order).
Legend: T packed tokens, B sequences, d hidden, V vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from model.attention import LFAttention
from model.attention_router import AttentionRouter, ClassicalRouter
from model.cache import KVCache
from model.config import YuanConfig
from model.dispatcher import Dispatcher
from model.norm import RMSNorm
from model.rotary import rotary_tables


class DecoderLayer(nn.Module):
    def __init__(self, cfg: YuanConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = LFAttention(cfg.hidden_size, cfg.num_heads)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        router = AttentionRouter if cfg.router_type == "attention" else ClassicalRouter
        self.router = router(cfg.hidden_size, cfg.num_experts, cfg.top_k, cfg.norm_topk_prob)

    def moe(self, layer: int, x: torch.Tensor, dispatcher: Dispatcher) -> torch.Tensor:
        return x + dispatcher.wait(self.submit_moe(layer, x, dispatcher))

    def submit_moe(self, layer: int, x: torch.Tensor, dispatcher: Dispatcher, lane: int = 0) -> object:
        """Route the post-attention states and start their expert step."""
        g = self.post_norm(x)
        expert_ids, weights = self.router(g)
        return dispatcher.submit(layer, g, expert_ids, weights, lane)


class YuanModel(nn.Module):
    def __init__(self, cfg: YuanConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def new_cache(self, max_slots: int, max_len: int) -> KVCache:
        cfg = self.cfg
        return KVCache(
            cfg.num_layers,
            cfg.num_heads,
            cfg.head_dim,
            cfg.hidden_size,
            self.embed.weight.dtype,
            max_slots,
            max_len,
        )

    def segments(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Segment id per position: the number of `<eod>` strictly before it (SPEC step 6)."""
        if not self.cfg.reset_attention_mask:
            return torch.zeros_like(token_ids)
        eod = (token_ids == self.cfg.eod_token_id).long()
        return torch.cumsum(eod, 0) - eod

    @torch.inference_mode()
    def prefill(
        self,
        prompts: list[torch.Tensor],
        dispatcher: Dispatcher,
        cache: KVCache | None = None,
        slots: list[int] | None = None,
    ) -> torch.Tensor:
        """Run whole prompts (1-D id tensors) packed together; logits at each last position `[B, V]`.

        With a cache, each prompt's K/V and LF state are written into its slot.
        """
        seq_lens = [int(p.numel()) for p in prompts]
        token_ids = torch.cat(prompts)
        positions = torch.cat([torch.arange(n) for n in seq_lens])
        segments = torch.cat([self.segments(p) for p in prompts])
        ends = torch.tensor(seq_lens).cumsum(0)
        seq_starts = ends - torch.tensor(seq_lens)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = self.embed(token_ids)
        for i, layer in enumerate(self.layers):
            h = layer.input_norm(x)
            x = x + layer.attn.forward_prefill(
                h, seq_lens, seq_starts, segments, cos, sin, None if cache is None else cache.layers[i], slots
            )
            x = layer.moe(i, x, dispatcher)
        return self.lm_head(self.norm(x[ends - 1]))

    @torch.inference_mode()
    def decode(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        seg_starts: torch.Tensor,
        dispatcher: Dispatcher,
        cache: KVCache,
        micro_batches: int = 1,
    ) -> torch.Tensor:
        """One new token per active slot (slot order): ids, positions and segment starts `[B]`.

        With `micro_batches=2` the batch is cut into two halves (two slot ranges) run ping-pong:
        while one half's experts are out, the other half's attention runs (two-batch overlap).
        Every token still sees exactly the same layer code.
        """
        B = token_ids.shape[0]
        n = micro_batches if B >= micro_batches else 1
        bounds = [round(m * B / n) for m in range(n + 1)]
        parts = [slice(bounds[m], bounds[m + 1]) for m in range(n)]
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        xs = [self.embed(token_ids[p]) for p in parts]
        pending: list[object | None] = [None] * n
        for i, layer in enumerate(self.layers):
            for m, p in enumerate(parts):
                if pending[m] is not None:  # this half's experts of the previous layer
                    xs[m] = xs[m] + dispatcher.wait(pending[m])
                h = layer.input_norm(xs[m])
                xs[m] = xs[m] + layer.attn.forward_decode(
                    h, positions[p], seg_starts[p], cos[p], sin[p], cache.layers[i], p
                )
                pending[m] = layer.submit_moe(i, xs[m], dispatcher, lane=m)
        xs = [x + dispatcher.wait(pm) for x, pm in zip(xs, pending)]
        return self.lm_head(self.norm(torch.cat(xs)))
