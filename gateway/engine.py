"""The engine: continuous-batching scheduler over `YuanModel` and a `Dispatcher`.

Plain Python (no Ray): the in-process reference engine is `Engine(model, LocalDispatcher)`, and the
gateway actor runs the very same class with a dispatcher that reaches expert pools. Requests join
and leave at step boundaries; one forward per step over the paged KV + LF cache (`model/cache.py`)
carries decode tokens and prompt chunks together (`Engine` says how they are chosen), and
`gateway/blocks.py` keeps the block accounting and the prefix cache.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace

import torch

from gateway.blocks import BlockManager
from gateway.errors import InvalidRequest, QueueFull
from gateway.limits import EngineLimits
from gateway.sampling import SampleError, SamplingParams, sample
from model import invariant
from model.batch import Chunk, ForwardBatch, segment_start
from model.cache import PagedCache
from model.dispatcher import Dispatcher
from model.transformer import YuanModel


@dataclass
class Sequence:
    """One request's state: its tokens, sampling, cache blocks and outcome."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)  # its KV blocks, position p in [p // block_size]
    block_keys: list[bytes] = field(default_factory=list)  # prefix keys of its first full blocks
    num_computed: int = 0  # tokens whose K/V and LF state are in the cache
    num_registered: int = 0  # its first blocks offered to the prefix cache (full ones)
    seg_start: int = 0  # first position of the segment the next fed token belongs to
    finish_reason: str | None = None  # "length" | "stop" | "eod" | "cancelled" | "error"
    error: str | None = None  # why an accepted request failed (finish_reason "error")
    logprobs: list = field(default_factory=list)  # per output token, with params.logprobs: (logprob, top)
    generator: torch.Generator | None = None
    admitted_at: float | None = None  # perf_counter() when it first ran (for queue time)
    arrived_at: float = field(default_factory=time.perf_counter)
    preempted: int = 0  # times it gave its blocks back to be recomputed later
    suspect: bool = False  # it was in a forward that failed: its next forward runs alone
    tokens: list[int] = field(init=False)  # prompt_ids + output_ids, kept as one list (read every step)

    def __post_init__(self) -> None:
        self.tokens = self.prompt_ids + self.output_ids

    def append(self, token: int) -> None:
        self.output_ids.append(token)
        self.tokens.append(token)

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """The scheduler (vLLM's unified one, in small): every step carries each running sequence's
    next tokens (a decode token, or the next chunk of a prompt being prefilled) and then chunks of
    waiting prompts, up to `max_num_batched_tokens`. Prompts start from their longest cached
    prefix. When blocks run out, the most recently admitted sequence gives its blocks back and
    waits at the queue's front to be recomputed from its tokens: no accepted request is lost."""

    def __init__(
        self,
        model: YuanModel,
        dispatcher: Dispatcher,
        limits: EngineLimits = EngineLimits(),
        use_cache: bool = True,
        micro_batches: int = 1,
    ) -> None:
        if micro_batches not in (1, 2):
            raise ValueError(f"micro_batches must be 1 or 2, got {micro_batches}")
        self.model, self.dispatcher, self.use_cache = model, dispatcher, use_cache
        self.micro_batches = micro_batches
        cfg = model.cfg
        self.max_len = cfg.max_position_embeddings
        max_prompt = limits.max_prompt_len or self.max_len - 1
        if not 0 < max_prompt < self.max_len:
            raise ValueError(f"max_prompt_len must be in [1, {self.max_len - 1}], got {max_prompt}")
        if limits.max_num_batched_tokens < 1 or limits.block_size < 1:
            raise ValueError("max_num_batched_tokens and block_size must be at least 1")
        self.limits = EngineLimits(**{**limits.__dict__, "max_prompt_len": max_prompt})
        self.num_blocks = kv_blocks(model, self.limits) if use_cache else 0
        self.cache = model.new_cache(self.num_blocks, limits.block_size) if use_cache else None
        self.blocks = BlockManager(max(self.num_blocks, 2), limits.block_size, limits.prefix_caching)
        self.eod = model.eod_for_segments
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.steps = 0
        self.admitted = 0
        self.preemptions = 0
        self.queue_delay_s = 0.0  # summed over admitted requests: arrival to first step

    # ---- requests ---------------------------------------------------------------------------
    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Validate and queue a request. Raises `InvalidRequest` (naming the field) or `QueueFull`."""
        params = self.validate(request_id, prompt_ids, params)
        seq = Sequence(request_id, list(prompt_ids), params, generator=params.generator())
        seq.seg_start = segment_start(seq.prompt_ids, len(prompt_ids), self.eod)
        self.waiting.append(seq)
        return seq

    def validate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        pending: int = 0,
        in_flight: bool = True,
    ) -> SamplingParams:
        """The checks of `add`, without queueing; `pending` counts requests about to be added.
        `in_flight=False` leaves out the scan of the queues for the same id: a caller on another
        thread than the engine's (the `Gateway`, which keeps its own set of ids in flight) must not
        walk them while a step changes them. Returns the params with `max_tokens` resolved."""
        params = check_request(self.model.cfg, self.limits, request_id, prompt_ids, params)
        if self.cache is not None:
            need = self.blocks.blocks_for(len(prompt_ids) + params.max_tokens)
            if need > self.blocks.usable:
                raise InvalidRequest(
                    "max_tokens",
                    f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) need "
                    f"{need} KV blocks of {self.limits.block_size}; the cache has {self.blocks.usable}",
                )
        if in_flight and (
            any(s.request_id == request_id for s in self.waiting)
            or any(s.request_id == request_id for s in self.running)
        ):
            raise InvalidRequest("request_id", f"{request_id!r} is already in flight")
        if len(self.waiting) + pending >= self.limits.max_queue:
            raise QueueFull(f"queue is full ({self.limits.max_queue} waiting requests)")
        return params

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a request wherever it is and free its cache blocks at once."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.finish_reason = "cancelled"
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                seq.finish_reason = "cancelled"
                self._release(seq)
                return seq
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict[str, int]:
        b = self.blocks
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "steps": self.steps,
            "admitted": self.admitted,
            "queue_delay_s": self.queue_delay_s,
            "kv_blocks_used": b.used if self.cache is not None else 0,
            "kv_blocks_total": b.usable if self.cache is not None else 0,
            "cache_tokens": sum(s.num_computed for s in self.running),
            "prefix_cache_queries": b.queries,
            "prefix_cache_hits": b.hits,
            "preemptions": self.preemptions,
        }

    # ---- one step ---------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Advance by one forward; returns the sequences that got a new token (finished ones too)
        or failed. A sequence whose prompt chunk did not reach its end gets none yet.

        A forward that raises fails its sequence when it ran alone (finish_reason "error", cache
        freed); with several in it, each is recomputed in a forward of its own, so the failure ends
        only the request it belongs to, and a passing fault (a pool that went away) ends none. A
        row that cannot be sampled fails its own sequence. Nothing else is touched."""
        if not self.use_cache:
            return self._step_uncached()
        scheduled = self._schedule()
        if not scheduled:
            return []
        try:
            logits = self._forward(scheduled)
        except Exception as e:
            if len(scheduled) == 1:  # alone, so the failure is its own
                seq = scheduled[0][0]
                self._fail(seq, f"forward failed: {type(e).__name__}: {e}")
                return [seq]
            # Which request broke it is not known: each goes back to the queue's front, to be
            # recomputed in a forward of its own (prefix-cached blocks make that cheap).
            for seq, _ in reversed(scheduled):
                seq.suspect = True
                self._preempt(seq, counted=False)
            return []
        self.steps += 1
        sampled = []
        for seq, n in scheduled:
            seq.suspect = False
            seq.num_computed += n
            full = seq.num_computed // self.limits.block_size
            if self.limits.prefix_caching and full > seq.num_registered:
                keys = self.blocks.keys(seq.tokens, seq.block_keys, full)
                for j in range(seq.num_registered, full):
                    self.blocks.register(seq.block_table[j], keys[j])
                seq.num_registered = full
            if seq.num_computed == seq.length:
                sampled.append(seq)
        return self._sample(sampled, logits)

    def _sample(self, batch: list[Sequence], logits: torch.Tensor) -> list[Sequence]:
        for i, (seq, token) in enumerate(
            zip(batch, sample(logits, [s.params for s in batch], [s.generator for s in batch]))
        ):
            if isinstance(token, SampleError):
                self._fail(seq, str(token))
            else:
                if seq.params.logprobs is not None:
                    seq.logprobs.append(token_logprobs(logits[i], token, seq.params.logprobs))
                self._append(seq, token)
                if seq.finished:
                    self._release(seq)
        return batch

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """This step's (sequence, new tokens): running ones first, then newly admitted ones."""
        budget = self.limits.max_num_batched_tokens
        if self.waiting and self.waiting[0].suspect:  # it was in a failed forward: run it alone
            seq = self.waiting[0]
            n = self._admit(seq, budget)
            if n:
                self.waiting.popleft()
                self.running.append(seq)
                return [(seq, n)]
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.length - seq.num_computed, budget)
            while not self._grow(seq, seq.num_computed + n):
                preempted = True
                victim = self.running[-1]  # the most recently admitted gives its blocks back
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                scheduled.append((seq, n))
                budget -= n
                i += 1
                continue
            break  # seq itself was preempted: nothing after it is left running
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.limits.max_running:
            seq = self.waiting[0]
            n = self._admit(seq, budget)
            if n == 0:
                break
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        """Give `seq` blocks for its first `tokens` positions; False when none are free."""
        need = self.blocks.blocks_for(tokens) - len(seq.block_table)
        if need > 0 and not self.blocks.can_take([], need):
            return False
        for _ in range(need):
            seq.block_table.append(self.blocks.allocate())
        return True

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Start a waiting sequence from its longest cached prefix; its first chunk's size, or 0
        when its blocks do not fit now. Preempted sequences come back through here too."""
        bs, tokens = self.limits.block_size, seq.tokens
        # The last token is always computed (its logits are sampled), so at most (len-1) are hits.
        if self.limits.prefix_caching:
            hits = self.blocks.match(self.blocks.keys(tokens, seq.block_keys, (len(tokens) - 1) // bs))
        else:
            hits = []
        cached = len(hits) * bs
        n = min(len(tokens) - cached, budget)
        if not self.blocks.can_take(hits, self.blocks.blocks_for(cached + n) - len(hits)):
            return 0
        for b in hits:
            self.blocks.take(b)
        seq.block_table = list(hits)
        seq.num_computed, seq.num_registered = cached, len(hits)
        self.blocks.queries += len(tokens) - 1 if self.limits.prefix_caching else 0
        self.blocks.hits += cached
        self._grow(seq, cached + n)
        if seq.admitted_at is None:
            seq.admitted_at = time.perf_counter()
            self.admitted += 1
            self.queue_delay_s += seq.admitted_at - seq.arrived_at
        return n

    def _preempt(self, seq: Sequence, counted: bool = True) -> None:
        """Take `seq` out of the running batch; it is recomputed from its tokens when readmitted."""
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.block_table, seq.num_computed, seq.num_registered = [], 0, 0
        if counted:
            seq.preempted += 1
            self.preemptions += 1
        self.waiting.appendleft(seq)

    def _forward(self, scheduled: list[tuple[Sequence, int]]) -> torch.Tensor:
        chunks = []
        for seq, n in scheduled:
            tokens, start = seq.tokens, seq.num_computed
            # A decode token's segment is tracked; a chunk's is found from the ids.
            decoding = seq.output_ids and start == seq.length - 1
            seg = seq.seg_start if decoding else segment_start(tokens, start, self.eod)
            chunks.append(Chunk(tokens, start, n, seq.block_table, seg, logits=start + n == seq.length))
        parts = [chunks]
        if self.micro_batches == 2 and len(chunks) >= 2:
            half = len(chunks) // 2
            parts = [chunks[:half], chunks[half:]]
        device = self.model.embed.weight.device
        batches = [ForwardBatch.build(p, self.limits.block_size, self.eod).to(device) for p in parts]
        with invariant.mode(self.limits.batch_invariant):
            return self.model.forward(batches, self.dispatcher, self.cache)

    def _step_uncached(self) -> list[Sequence]:
        """The reference path: no cache, every sequence recomputed from scratch at every step."""
        while self.waiting and len(self.running) < self.limits.max_running:
            seq = self.waiting.popleft()
            seq.admitted_at = time.perf_counter()
            self.admitted += 1
            self.running.append(seq)
        batch = list(self.running)
        if not batch:
            return []
        try:
            with invariant.mode(self.limits.batch_invariant):
                logits = self.model.prefill([torch.tensor(s.tokens) for s in batch], self.dispatcher)
        except Exception as e:
            for seq in batch:
                self._fail(seq, f"forward failed: {type(e).__name__}: {e}")
            return batch
        self.steps += 1
        return self._sample(batch, logits)

    def _fail(self, seq: Sequence, message: str) -> None:
        seq.finish_reason, seq.error = "error", message
        self._release(seq)

    def _append(self, seq: Sequence, token: int) -> None:
        cfg, p = self.model.cfg, seq.params
        if self.eod is not None and seq.tokens[-1] == self.eod:
            seq.seg_start = seq.length  # the new token starts a segment after an <eod>
        seq.append(token)
        if token == cfg.eod_token_id and not p.ignore_eod:
            seq.finish_reason = "eod"
        elif token in p.stop_token_ids:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or seq.length >= self.max_len:
            seq.finish_reason = "length"

    def _release(self, seq: Sequence) -> None:
        """Drop a finished, failed or cancelled sequence from the running batch; free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        if seq.block_table:
            self.blocks.release(seq.block_table)
            seq.block_table = []

    # ---- convenience ------------------------------------------------------------------------
    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Sequence]:
        """Run prompts to completion together (continuous batching inside); results in order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add(f"gen-{self.steps}-{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, plist))]
        while any(not s.finished for s in seqs):
            self.step()
        return seqs


def kv_blocks(model: YuanModel, limits: EngineLimits) -> int:
    """The cache's block count: `num_kv_blocks`, or as many as `kv_cache_gb` holds."""
    if limits.num_kv_blocks is not None:
        return limits.num_kv_blocks  # PagedCache refuses fewer than 2
    cfg = model.cfg
    per_block = PagedCache.block_bytes(
        cfg.num_layers,
        cfg.num_heads,
        cfg.head_dim,
        cfg.hidden_size,
        model.embed.weight.dtype,
        limits.block_size,
    )
    blocks = int(limits.kv_cache_gb * 1e9) // per_block
    if blocks < 2:
        raise ValueError(
            f"kv_cache_gb {limits.kv_cache_gb} holds {blocks} blocks of {per_block} bytes; at least 2"
        )
    return blocks


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, dict[int, float]]:
    """The model's log-probability of `token` (before temperature, as vLLM reports it) and the k
    most likely tokens' `{id: logprob}`."""
    lp = torch.log_softmax(logits.float(), -1)
    top = lp.topk(k) if k else None
    return float(lp[token]), ({} if top is None else dict(zip(top.indices.tolist(), top.values.tolist())))


def check_request(
    cfg, limits: EngineLimits, request_id: str, prompt_ids: list[int], params: SamplingParams
) -> SamplingParams:
    """A request's own checks against a model config and the limits (no engine state needed, so a
    client can run them before starting anything). Returns the params with `max_tokens` resolved: an
    unset one is the default, clamped to the room the context leaves; a given one that does not fit
    is refused (as vLLM does)."""
    lim, max_len = limits, cfg.max_position_embeddings
    max_prompt = lim.max_prompt_len or max_len - 1
    if not isinstance(request_id, str) or len(request_id) > lim.max_request_id_len:
        raise InvalidRequest(
            "request_id",
            f"must be a string of at most {lim.max_request_id_len} characters, got {len(request_id)}",
        )
    if not prompt_ids:
        raise InvalidRequest("prompt", "is empty")
    if len(prompt_ids) > max_prompt:
        raise InvalidRequest("prompt", f"has {len(prompt_ids)} tokens, more than the limit {max_prompt}")
    bad = next((t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < cfg.vocab_size)), None)
    if bad is not None:
        raise InvalidRequest("token_ids", f"id {bad!r} is outside the vocabulary [0, {cfg.vocab_size})")
    room = max_len - len(prompt_ids)
    if params.max_tokens is None:
        params = replace(params, max_tokens=min(lim.default_max_tokens, lim.max_tokens, room))
    params.validate(cfg.vocab_size, lim.max_tokens, lim.max_stop_token_ids)
    if params.max_tokens > room:
        raise InvalidRequest(
            "max_tokens",
            f"{params.max_tokens} does not fit: the prompt has "
            f"{len(prompt_ids)} tokens and the context {max_len}, "
            f"which leaves room for {room}",
        )
    return params


def local_engine(
    model_dir: str,
    dtype: str | None = None,
    limits: EngineLimits = EngineLimits(),
    use_cache: bool = True,
    device: str = "cpu",
) -> Engine:
    """The in-process reference engine: the whole model, all experts, in this process (on `device`)."""
    from model.checkpoint import load_experts, load_model
    from model.dispatcher import LocalDispatcher

    on_cpu = torch.device(device).type == "cpu"  # else the weights go to the device: no huge pages
    model, reader = load_model(model_dir, dtype, huge_pages=on_cpu)
    experts = list(range(model.cfg.num_experts))
    banks = [b.to(device) for b in load_experts(reader, model.cfg, experts, huge_pages=on_cpu)]
    return Engine(model.to(device), LocalDispatcher(banks), limits, use_cache)
