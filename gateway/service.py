"""The gateway service: an asyncio front over the `Engine`, one token stream per request.

The engine is single-threaded: its steps run one at a time in a dedicated thread, and requests
join or leave (add, cancel) on the event loop only between steps, so no lock is needed and a
step never sees a half-added request. Validation happens at submission, so a bad request fails
alone, at once, with the field named; nothing already accepted is affected.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from gateway.engine import Engine, Sequence
from gateway.errors import InvalidRequest, QueueFull
from gateway.sampling import SamplingParams
from model import skinny


@dataclass
class TokenEvent:
    """One new token of a request; the last event carries `finish_reason`."""

    request_id: str
    token_id: int
    index: int
    finish_reason: str | None = None
    error: str | None = None  # set when an accepted request failed inside the engine
    at: float = 0.0  # perf_counter() when the token was ready
    admitted_at: float | None = None  # perf_counter() when the request first ran (left the queue)
    fault: bool = False  # a pool fault delayed this request (so far)
    logprob: float | None = None  # with params.logprobs: this token's log-probability
    top_logprobs: dict[int, float] | None = None  # and the most likely tokens'


class Gateway:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._streams: dict[str, asyncio.Queue[TokenEvent]] = {}
        self._inbox: list[tuple[str, tuple]] = []  # (op, args), applied between steps
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self._faulted: set[str] = set()  # requests a pool fault delayed

    async def stream(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenEvent]:
        """Submit a request and yield its tokens. Raises `InvalidRequest`/`QueueFull` before any token.

        Closing the iterator early (client gone) cancels the request and frees its cache.
        """
        params = self.check(request_id, prompt_ids, params)
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._streams[request_id] = queue
        self._post(("add", (request_id, list(prompt_ids), params)))
        finished = False
        try:
            while not finished:
                event = await queue.get()
                finished = event.finish_reason is not None
                yield event
        finally:
            if not finished:
                self.cancel(request_id)

    def check(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> SamplingParams:
        """What `stream` checks before it accepts a request (a front end that must answer before the
        first token, as an HTTP stream does, asks first); raises `InvalidRequest`/`QueueFull`."""
        if request_id in self._streams:
            raise InvalidRequest("request_id", f"{request_id!r} is already in flight")
        pending = sum(1 for op in self._inbox if op[0] == "add")
        return self.engine.validate(request_id, prompt_ids, params, pending)

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> list[TokenEvent]:
        return [event async for event in self.stream(request_id, prompt_ids, params)]

    async def switch_table(self, table, workers: list, keys: list[str] | None = None) -> None:
        """Make the dispatcher use a new routing table from the next step on; returns once applied."""
        done = asyncio.get_running_loop().create_future()
        self._post(("table", (table, workers, keys, done)))
        await done

    def cancel(self, request_id: str) -> None:
        """Remove a request at the next step boundary; its stream ends with 'cancelled'."""
        self._post(("abort", (request_id,)))

    def cancel_all(self) -> None:
        """Cancel every request in flight (a drain's grace period is over); each stream ends with
        'cancelled'."""
        for request_id in list(self._streams):
            self.cancel(request_id)

    def stats(self) -> dict:
        stats = {
            **self.engine.stats(),
            "streams": len(self._streams),
            "cache_bytes": self.engine.cache.nbytes() if self.engine.cache else 0,
        }
        load = getattr(self.engine.dispatcher, "load", None)
        if load is not None:  # expert pools: where the work went
            # Each pair travels as one row, so the rows sent to a worker are its pairs.
            stats |= {
                "tokens_sent": dict(load.worker_pairs),
                "worker_pairs": dict(load.worker_pairs),
                "worker_compute_s": dict(load.worker_compute_s),
                "expert_tokens": load.expert_tokens.tolist(),
                "routing_table_version": self.engine.dispatcher.table.version,
            }
        return stats

    def _post(self, op: tuple) -> None:
        self._inbox.append(op)
        if self._runner is None or self._runner.done():
            self._wake = asyncio.Event()
            self._runner = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        # Steps run on the engine thread; this (event-loop) thread's OpenMP team, left over from
        # loading the model or an idle-time torch call, would make libgomp stop spin-waiting and
        # cost every parallel region of a step a wake-up (`skinny.release_team`).
        skinny.release_team()
        while True:
            self._apply_inbox()
            if not self.engine.has_work:
                self._wake.clear()
                if self._inbox:
                    continue
                await self._wake.wait()
                skinny.release_team()
                continue
            faults = getattr(self.engine.dispatcher, "faults", 0)
            try:
                batch = await loop.run_in_executor(self._executor, self.engine.step)
            except Exception as e:  # the engine fails a broken forward's requests itself; this is
                self._fail_running(f"{type(e).__name__}: {e}")  # a bug around it: end what ran
                continue
            if getattr(self.engine.dispatcher, "faults", 0) != faults:
                self._faulted.update(s.request_id for s in list(self.engine.running) + batch)
            for seq in batch:
                self._deliver(seq)

    def _apply_inbox(self) -> None:
        ops, self._inbox = self._inbox, []
        for op, args in ops:
            if op == "table":  # between steps: nothing is in flight
                table, workers, keys, done = args
                try:
                    self.engine.dispatcher.set_table(table, workers, keys)
                    done.set_result(None)
                except Exception as e:
                    done.set_exception(e)
            elif op == "add":
                request_id, prompt, params = args
                try:
                    self.engine.add(request_id, prompt, params)
                except (InvalidRequest, QueueFull) as e:
                    self._finish(
                        request_id, TokenEvent(request_id, -1, 0, "error", str(e), time.perf_counter())
                    )
            else:
                (request_id,) = args
                seq = self.engine.abort(request_id)
                if seq is not None:
                    self._finish(
                        request_id,
                        TokenEvent(
                            request_id,
                            -1,
                            len(seq.output_ids),
                            "cancelled",
                            at=time.perf_counter(),
                            admitted_at=seq.admitted_at,
                        ),
                    )

    def _deliver(self, seq: Sequence) -> None:
        queue = self._streams.get(seq.request_id)
        if queue is None:
            return
        if seq.error is not None:  # this request failed alone; the others go on
            event = TokenEvent(
                seq.request_id,
                -1,
                len(seq.output_ids),
                "error",
                seq.error,
                time.perf_counter(),
                seq.admitted_at,
            )
        else:
            event = TokenEvent(
                seq.request_id,
                seq.output_ids[-1],
                len(seq.output_ids) - 1,
                seq.finish_reason,
                at=time.perf_counter(),
                admitted_at=seq.admitted_at,
                fault=seq.request_id in self._faulted,
            )
            if seq.logprobs:
                event.logprob, event.top_logprobs = seq.logprobs[-1]
        if seq.finished:
            self._finish(seq.request_id, event)
        else:
            queue.put_nowait(event)

    def _finish(self, request_id: str, event: TokenEvent) -> None:
        self._faulted.discard(request_id)
        queue = self._streams.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(event)

    def _fail_running(self, message: str) -> None:
        for seq in list(self.engine.running):
            self.engine.abort(seq.request_id)
            self._finish(
                seq.request_id,
                TokenEvent(
                    seq.request_id,
                    -1,
                    len(seq.output_ids),
                    "error",
                    message,
                    time.perf_counter(),
                    seq.admitted_at,
                ),
            )

    def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
