"""The gateway service: an asyncio front over the `Engine`, one token stream per request.

The engine is single-threaded: its steps run one after another on a thread of its own (the engine
thread), which also applies the requests' joins and leaves (add, cancel, a new routing table)
between steps, so no lock guards the engine and a step never sees a half-added request. The event
loop posts those operations and hands out the tokens each step made (one `call_soon_threadsafe` a
step, events built on the engine thread so they never see a later step); the engine thread does not
wait for the loop, so the next step starts at once. Validation happens at submission, so a bad
request fails alone, at once, with the field named; nothing already accepted is affected.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
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
        self._streams: dict[str, asyncio.Queue[TokenEvent]] = {}  # the event loop's
        self._ops: deque[tuple[str, tuple]] = deque()  # (op, args), applied by the engine thread
        self._wake = threading.Condition()  # guards _ops, _closed, _idle, _loop
        self._loop: asyncio.AbstractEventLoop | None = None  # where events go (the last poster's)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._idle = True
        self._faulted: set[str] = set()  # requests a pool fault delayed (the engine thread's)

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
        first token, as an HTTP stream does, asks first); raises `InvalidRequest`/`QueueFull`.
        A request is in flight from its `stream` until its last event is handed out."""
        if request_id in self._streams:
            raise InvalidRequest("request_id", f"{request_id!r} is already in flight")
        with self._wake:
            pending = sum(1 for op in self._ops if op[0] == "add")
        return self.engine.validate(request_id, prompt_ids, params, pending, in_flight=False)

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

    def close(self, wait_s: float = 0.0) -> None:
        """Stop the engine thread after the step it is in (if any); wait up to `wait_s` for it.
        Requests still in flight get no more events."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        thread = self._thread
        if wait_s > 0 and thread is not None and thread is not threading.current_thread():
            thread.join(wait_s)

    # ---- the event loop's side ----

    def _post(self, op: tuple) -> None:
        loop = asyncio.get_running_loop()
        with self._wake:
            if self._closed:
                if op[0] == "abort":  # a stream left after close: nothing runs any more
                    return
                raise RuntimeError("the gateway is closed")
            self._ops.append(op)
            self._loop = loop
            waking = self._idle
            self._wake.notify()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._engine_loop, name="engine-step", daemon=True)
                self._thread.start()
        if waking:
            # The engine thread steps; this (event-loop) thread's OpenMP team, left over from loading
            # the model or an idle-time torch call, would make libgomp stop spin-waiting and cost
            # every parallel region of a step a wake-up (`skinny.release_team`).
            skinny.release_team()

    def _hand_out(self, items: list[tuple]) -> None:
        """On the event loop: each step's events into their streams, and the answers of ops."""
        for item in items:
            if item[0] == "done":  # a table switch: applied (error None) or refused
                _, done, error = item
                if not done.done():
                    done.set_result(None) if error is None else done.set_exception(error)
                continue
            _, request_id, event = item
            if event.finish_reason is not None:
                queue = self._streams.pop(request_id, None)
            else:
                queue = self._streams.get(request_id)
            if queue is not None:
                queue.put_nowait(event)

    # ---- the engine thread's side ----

    def _engine_loop(self) -> None:
        engine = self.engine
        while True:
            with self._wake:
                while not self._ops and not engine.has_work and not self._closed:
                    self._idle = True
                    self._wake.wait()
                self._idle = False
                if self._closed:
                    return
                ops, loop = list(self._ops), self._loop
                self._ops.clear()
            out: list[tuple] = []
            try:
                self._apply(ops, out)
                if engine.has_work:
                    faults = getattr(engine.dispatcher, "faults", 0)
                    batch = engine.step()
                    if getattr(engine.dispatcher, "faults", 0) != faults:
                        self._faulted.update(s.request_id for s in list(engine.running) + batch)
                    out.extend(self._event(seq) for seq in batch)
            except Exception as e:  # the engine fails a broken forward's requests itself; this is a
                self._fail_running(f"{type(e).__name__}: {e}", out)  # bug around it: end what ran
            if out:
                try:
                    loop.call_soon_threadsafe(self._hand_out, out)
                except RuntimeError:  # that loop is closed: nobody is left to read these streams
                    pass

    def _apply(self, ops: list[tuple], out: list[tuple]) -> None:
        for op, args in ops:
            if op == "table":  # between steps: nothing is in flight
                table, workers, keys, done = args
                try:
                    self.engine.dispatcher.set_table(table, workers, keys)
                    out.append(("done", done, None))
                except Exception as e:
                    out.append(("done", done, e))
            elif op == "add":
                request_id, prompt, params = args
                try:
                    self.engine.add(request_id, prompt, params)
                except Exception as e:  # InvalidRequest, QueueFull, or a bug: this request alone
                    message = (
                        str(e) if isinstance(e, (InvalidRequest, QueueFull)) else f"{type(e).__name__}: {e}"
                    )
                    event = TokenEvent(request_id, -1, 0, "error", message, time.perf_counter())
                    out.append(self._last(request_id, event))
            else:
                (request_id,) = args
                seq = self.engine.abort(request_id)
                if seq is not None:
                    event = TokenEvent(
                        request_id,
                        -1,
                        len(seq.output_ids),
                        "cancelled",
                        at=time.perf_counter(),
                        admitted_at=seq.admitted_at,
                    )
                    out.append(self._last(request_id, event))

    def _event(self, seq: Sequence) -> tuple:
        """The event of a sequence a step advanced, built now (the next step changes `seq`)."""
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
        if event.finish_reason is not None:
            return self._last(seq.request_id, event)
        return ("event", seq.request_id, event)

    def _last(self, request_id: str, event: TokenEvent) -> tuple:
        self._faulted.discard(request_id)
        return ("event", request_id, event)

    def _fail_running(self, message: str, out: list[tuple]) -> None:
        for seq in list(self.engine.running):
            self.engine.abort(seq.request_id)
            event = TokenEvent(
                seq.request_id,
                -1,
                len(seq.output_ids),
                "error",
                message,
                time.perf_counter(),
                seq.admitted_at,
            )
            out.append(self._last(seq.request_id, event))
