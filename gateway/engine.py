"""The engine: continuous-batching scheduler over `YuanModel` and a `Dispatcher`.

Plain Python (no Ray): the in-process reference engine is `Engine(model, LocalDispatcher)`, and the
gateway actor runs the very same class with a dispatcher that reaches expert pools. Requests join
and leave at step boundaries. A step either prefills newly admitted prompts (packed, one forward)
or decodes one token for every running sequence (one forward over the dense cache slots); prefill
goes first so new requests start quickly (as nano-vllm's scheduler does).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace

import torch

from gateway.errors import InvalidRequest, QueueFull
from gateway.sampling import SampleError, SamplingParams, sample
from model.dispatcher import Dispatcher
from model.transformer import YuanModel


@dataclass(frozen=True)
class EngineLimits:
    """Explicit serving limits; every one is enforced with a clear error."""

    max_running: int = 64  # sequences decoding together (cache slots)
    max_queue: int = 256  # requests waiting for a slot
    max_prompt_len: int | None = None  # default: the model's context minus one
    max_tokens: int = 1024  # largest max_tokens a request may ask for
    max_prefill_tokens: int = 4096  # prompt tokens admitted in one prefill step
    default_max_tokens: int = 16  # a request's max_tokens when it gives none (clamped to the context)
    max_request_id_len: int = 128  # characters of a client-chosen request id
    max_stop_strings: int = 16  # stop strings per request
    max_stop_len: int = 256  # characters of one stop string
    max_stop_token_ids: int = 64  # stop token ids per request

    def check_stop_strings(self, stop: list[str]) -> None:
        """Raise `InvalidRequest` ("stop") for too many, empty or too long stop strings."""
        if len(stop) > self.max_stop_strings:
            raise InvalidRequest("stop", f"at most {self.max_stop_strings} stop strings, got {len(stop)}")
        for s in stop:
            if not s:
                raise InvalidRequest("stop", "stop strings must not be empty")
            if len(s) > self.max_stop_len:
                raise InvalidRequest(
                    "stop", f"a stop string has {len(s)} characters, more than the limit {self.max_stop_len}"
                )


@dataclass
class Sequence:
    """One request's state: its tokens, sampling, cache slot and outcome."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    seg_start: int = 0  # first position of the segment the next fed token belongs to
    finish_reason: str | None = None  # "length" | "stop" | "eod" | "cancelled" | "error"
    error: str | None = None  # why an accepted request failed (finish_reason "error")
    logprobs: list = field(default_factory=list)  # per output token, with params.logprobs: (logprob, top)
    generator: torch.Generator | None = None
    admitted_at: float | None = None  # perf_counter() when it got a slot (for queue time)
    arrived_at: float = field(default_factory=time.perf_counter)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine:
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
        self.limits = EngineLimits(**{**limits.__dict__, "max_prompt_len": max_prompt})
        self.cache = model.new_cache(limits.max_running, self.max_len) if use_cache else None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index = cache slot when caching
        self.steps = 0
        self.admitted = 0
        self.queue_delay_s = 0.0  # summed over admitted requests: arrival to batch slot

    # ---- requests ---------------------------------------------------------------------------
    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        """Validate and queue a request. Raises `InvalidRequest` (naming the field) or `QueueFull`."""
        params = self.validate(request_id, prompt_ids, params)
        seq = Sequence(request_id, list(prompt_ids), params, generator=params.generator())
        cfg = self.model.cfg
        if cfg.reset_attention_mask:
            eods = [i for i, t in enumerate(prompt_ids) if t == cfg.eod_token_id]
            seq.seg_start = eods[-1] + 1 if eods else 0
        self.waiting.append(seq)
        return seq

    def validate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, pending: int = 0
    ) -> SamplingParams:
        """The checks of `add`, without queueing; `pending` counts requests about to be added.
        Returns the params with `max_tokens` resolved (`check_request`)."""
        params = check_request(self.model.cfg, self.limits, request_id, prompt_ids, params)
        if any(s.request_id == request_id for s in self.waiting) or any(
            s.request_id == request_id for s in self.running
        ):
            raise InvalidRequest("request_id", f"{request_id!r} is already in flight")
        if len(self.waiting) + pending >= self.limits.max_queue:
            raise QueueFull(f"queue is full ({self.limits.max_queue} waiting requests)")
        return params

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a request wherever it is and free its cache slot at once."""
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
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "steps": self.steps,
            "admitted": self.admitted,
            "queue_delay_s": self.queue_delay_s,
            "cache_slots_used": self.cache.active if self.cache else 0,
            "cache_tokens": sum(s.length for s in self.running),
        }

    # ---- one step ---------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Advance by one forward; returns the sequences that got a new token (finished ones too).

        A forward that raises fails the sequences in it (finish_reason "error", cache freed) and
        only those; a row that cannot be sampled fails its own sequence. Nothing else is touched,
        and the next step goes on with the rest."""
        admitted = self._admit()
        batch = admitted or list(self.running)
        if not batch:
            return []
        try:
            logits = self._prefill(admitted) if admitted else self._decode(batch)
        except Exception as e:
            for seq in batch:
                self._fail(seq, f"forward failed: {type(e).__name__}: {e}")
            return batch
        self.steps += 1
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

    def _fail(self, seq: Sequence, message: str) -> None:
        seq.finish_reason, seq.error = "error", message
        self._release(seq)

    def _prefill(self, admitted: list[Sequence]) -> torch.Tensor:
        prompts = [torch.tensor(s.prompt_ids) for s in admitted]
        slots = [s.slot for s in admitted] if self.cache else None
        if self.cache:
            self.cache.ensure_length(max(len(s.prompt_ids) for s in admitted))
        return self.model.prefill(prompts, self.dispatcher, self.cache, slots)

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        budget = self.limits.max_prefill_tokens
        while self.waiting and len(self.running) < self.limits.max_running:
            n = len(self.waiting[0].prompt_ids)
            if admitted and n > budget:
                break
            seq = self.waiting.popleft()
            seq.admitted_at = time.perf_counter()
            self.admitted += 1
            self.queue_delay_s += seq.admitted_at - seq.arrived_at
            budget -= n
            if self.cache:
                seq.slot = self.cache.allocate()
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def _decode(self, batch: list[Sequence]) -> torch.Tensor:
        if not self.cache:  # reference path: recompute every sequence from scratch
            return self.model.prefill([torch.tensor(s.tokens) for s in batch], self.dispatcher)
        self.cache.ensure_length(max(s.length for s in batch))
        token_ids = torch.tensor([s.tokens[-1] for s in batch])
        positions = torch.tensor([s.length - 1 for s in batch])
        seg_starts = torch.tensor([s.seg_start for s in batch])
        return self.model.decode(
            token_ids, positions, seg_starts, self.dispatcher, self.cache, self.micro_batches
        )

    def _append(self, seq: Sequence, token: int) -> None:
        cfg, p = self.model.cfg, seq.params
        if cfg.reset_attention_mask and seq.tokens[-1] == cfg.eod_token_id:
            seq.seg_start = seq.length  # the new token starts a segment after an <eod>
        seq.output_ids.append(token)
        if token == cfg.eod_token_id and not p.ignore_eod:
            seq.finish_reason = "eod"
        elif token in p.stop_token_ids:
            seq.finish_reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or seq.length >= self.max_len:
            seq.finish_reason = "length"

    def _release(self, seq: Sequence) -> None:
        """Drop a finished or cancelled sequence from the running batch and free its slot."""
        if self.cache and seq.slot is not None:
            moved = self.cache.free(seq.slot)
            if moved is not None:  # the last slot's sequence now lives in the freed slot
                self.running[moved].slot = seq.slot
                self.running[seq.slot] = self.running[moved]
                self.running.pop()
            else:
                self.running.pop(seq.slot)
            seq.slot = None
        else:
            self.running.remove(seq)

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
    model_dir: str, dtype: str | None = None, limits: EngineLimits = EngineLimits(), use_cache: bool = True
) -> Engine:
    """The in-process reference engine: the whole model, all experts, in this process."""
    from model.checkpoint import load_experts, load_model
    from model.dispatcher import LocalDispatcher

    model, reader = load_model(model_dir, dtype)
    banks = load_experts(reader, model.cfg, list(range(model.cfg.num_experts)))
    return Engine(model, LocalDispatcher(banks), limits, use_cache)
