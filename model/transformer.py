"""Yuan 2.0-M32 without its experts: embeddings, decoder layers (LF attention + Attention Router),
final norm and LM head. This is what a gateway holds; the expert step goes through a `Dispatcher`.

One entry point, `forward`, runs any mix of chunks (prompts, prompt chunks, decode tokens) over the
paged cache; `prefill` is whole prompts over a cache of their own.
Legend: T packed tokens, B chunks, d hidden, V vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from model.attention import LFAttention
from model.attention_router import AttentionRouter, ClassicalRouter
from model.batch import Chunk, ForwardBatch
from model.cache import PagedCache
from model.config import YuanConfig
from model.dispatcher import Dispatcher
from model import invariant, skinny
from model.invariant import linear
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

    def decode_step(
        self,
        layer: int,
        x: torch.Tensor,
        part: ForwardBatch,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: PagedCache,
        dispatcher: Dispatcher,
        lane: int,
    ) -> tuple[torch.Tensor, object]:
        """The layer for a step of one-token chunks on the CPU in float32, in C calls (`model.skinny`),
        for a part that `skinny.decode_fits` (`YuanModel.forward` asks once a step): input norm,
        attention half, then o_proj, residual, post norm and the Attention Router (the classical
        router's step stays torch's); then the expert step is submitted. (new x, handle)."""
        attn = self.attn
        h = skinny.rms_norm(x, self.input_norm)
        k, v, lf = cache.k[layer], cache.v[layer], cache.lf[layer]
        out = skinny.decode_attention(attn, h, part, cos, sin, k, v, lf)
        if not isinstance(self.router, AttentionRouter):
            x = x + linear(out, attn.o_proj.weight)
            return x, self.submit_moe(layer, x, dispatcher, lane)
        x, g, expert_ids, weights = skinny.decode_post(self, out, x)
        return x, dispatcher.submit(layer, g, expert_ids, weights, lane)

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
        self.decode_table = skinny.DecodeTable()  # what a decode step's one C call reads of the layers
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def new_cache(self, num_blocks: int, block_size: int) -> PagedCache:
        cfg = self.cfg
        return PagedCache(
            cfg.num_layers,
            cfg.num_heads,
            cfg.head_dim,
            cfg.hidden_size,
            self.embed.weight.dtype,
            num_blocks,
            block_size,
            self.embed.weight.device,
        )

    @property
    def eod_for_segments(self) -> int | None:
        """The `<eod>` id that ends attention segments, or None without `reset_attention_mask`."""
        return self.cfg.eod_token_id if self.cfg.reset_attention_mask else None

    @torch.inference_mode()
    def forward(self, parts: list[ForwardBatch], dispatcher: Dispatcher, cache: PagedCache) -> torch.Tensor:
        """Run a step's chunks; logits of each part's `logits_rows`, parts in order `[R, V]`.

        One part is the whole batch. Two parts (micro-batches) run ping-pong: while one part's
        experts are out, the other part's attention runs (two-batch overlap). Every token still
        sees exactly the same layer code.
        """
        n = len(parts)
        banks = getattr(dispatcher, "banks", None)  # experts held in this process: the in-process engine
        one = None
        if n == 1 and banks and not invariant.enabled():
            one = skinny.one_call_table(self, parts[0], banks, cache)
        if one is not None:
            # A decode step in-process: embedding, every layer (experts included), final norm and
            # LM head in one C call (the same operations as the calls below, without Python between).
            record, routing = getattr(dispatcher, "record_routing", None), None
            if record is not None:  # the dispatcher wants to know the routing it did not see
                B = parts[0].token_ids.shape[0]
                routing = torch.empty(len(self.layers), B, self.cfg.top_k, dtype=torch.long)
            logits = skinny.decode_layers(self, one, parts[0], cache, routing)
            for i, ids in enumerate(routing if record is not None else []):
                record(i, ids)
            return logits
        cs = [(self.rope_cos[p.positions], self.rope_sin[p.positions]) for p in parts]
        xs = [self.embed(p.token_ids) for p in parts]
        pending: list[object | None] = [None] * n
        # Decode parts on the CPU in float32 run their layers in C calls; what decides it (the
        # part, x's dtype and layout, the cache's dtype) is the same in every layer.
        in_c = [
            not invariant.enabled() and skinny.decode_fits(x, p, cache.k[0], self.cfg.num_heads)
            for x, p in zip(xs, parts)
        ]
        for i, layer in enumerate(self.layers):
            for m, part in enumerate(parts):
                if pending[m] is not None:  # this part's experts of the previous layer
                    xs[m] = xs[m] + dispatcher.wait(pending[m])
                if in_c[m]:
                    xs[m], pending[m] = layer.decode_step(i, xs[m], part, *cs[m], cache, dispatcher, m)
                    continue
                h = layer.input_norm(xs[m])
                xs[m] = xs[m] + layer.attn.forward(h, part, *cs[m], cache.k[i], cache.v[i], cache.lf[i])
                pending[m] = layer.submit_moe(i, xs[m], dispatcher, lane=m)
        xs = [(x + dispatcher.wait(pm))[p.logits_rows] for x, pm, p in zip(xs, pending, parts)]
        x = xs[0] if n == 1 else torch.cat(xs)
        # The final norm in C too when every part's layers ran there (torch's costs ~0.1 ms a call).
        return linear(skinny.rms_norm(x, self.norm) if all(in_c) else self.norm(x), self.lm_head.weight)

    @torch.inference_mode()
    def prefill(
        self, prompts: list[torch.Tensor], dispatcher: Dispatcher, block_size: int = 16
    ) -> torch.Tensor:
        """Whole prompts (1-D id tensors) packed in one forward over a cache made for them alone;
        logits at each last position `[B, V]`. The uncached reference path (and tests) use it."""
        chunks, next_block = [], 1
        for p in prompts:
            ids = p.tolist()
            blocks = (len(ids) + block_size - 1) // block_size
            chunks.append(Chunk(ids, 0, len(ids), list(range(next_block, next_block + blocks))))
            next_block += blocks
        batch = ForwardBatch.build(chunks, block_size, self.eod_for_segments).to(self.embed.weight.device)
        return self.forward([batch], dispatcher, self.new_cache(next_block, block_size))
