"""The Gateway over an in-process engine (no Ray, no server): its engine thread steps on its own,
applies joins and leaves between steps and hands each step's tokens to the event loop."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gateway.engine import local_engine
from gateway.sampling import SamplingParams
from gateway.server import load_backend
from gateway.service import Gateway
from model import skinny

GREEDY16 = SamplingParams(max_tokens=16, ignore_eod=True)


def _os_thread_ids() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def _engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "engine-step"]


def test_streams_give_the_golden_tokens_in_order_and_close_ends_the_engine_thread(fixture_dir, golden):
    gateway = Gateway(local_engine(str(fixture_dir)))
    cases = golden["cases"]

    async def run():
        streams = [gateway.generate(f"r{c['index']}", c["prompt_ids"], GREEDY16) for c in cases]
        return await asyncio.gather(*streams)

    before = len(_engine_threads())
    results = asyncio.run(run())
    assert len(_engine_threads()) == before + 1, "one engine thread for the gateway"
    for case, events in zip(cases, results):
        assert [e.token_id for e in events] == case["generated_ids"]
        assert [e.index for e in events] == list(range(len(events)))
        assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])
    assert gateway.stats()["streams"] == 0
    gateway.close(wait_s=10.0)
    assert len(_engine_threads()) == before
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(gateway.generate("late", [1, 2, 3], GREEDY16))

    async def leave() -> None:  # a stream left after close (a server shutting down) raises nothing
        gateway.cancel("r0")

    asyncio.run(leave())


def test_a_stream_left_early_is_cancelled_and_the_next_event_loop_is_served(fixture_dir):
    """A client that stops reading cancels its request (its blocks are freed, the engine has no
    work left); then a second event loop (a later `asyncio.run`) gets its tokens from the same
    gateway."""
    engine = local_engine(str(fixture_dir))
    gateway = Gateway(engine)

    async def leave_after(n: int) -> int:
        got = 0
        stream = gateway.stream("left", [5, 6, 7, 8], SamplingParams(max_tokens=200, ignore_eod=True))
        async for _ in stream:
            got += 1
            if got == n:
                break
        await stream.aclose()
        for _ in range(500):  # the abort is applied between steps, the "cancelled" event handed out
            if gateway.stats()["streams"] == 0:
                break
            await asyncio.sleep(0.01)
        return got

    assert asyncio.run(leave_after(3)) == 3
    assert gateway.stats()["streams"] == 0 and not engine.has_work
    assert engine.blocks.used == 0, "its cache blocks are freed"
    events = asyncio.run(gateway.generate("again", [5, 6, 7, 8], GREEDY16))
    assert len(events) == 16 and events[-1].finish_reason == "length"
    gateway.close(wait_s=10.0)


@pytest.mark.skipif(not skinny.threaded(), reason="model._skinny was built without OpenMP")
def test_the_server_frees_the_loading_threads_openmp_team():
    """A server loads its backend on an executor thread; that thread's OpenMP team (from loading's
    parallel regions) is freed after, so the engine thread's team is the process's only one."""
    x, w = torch.randn(4, 512), torch.randn(1024, 512)

    def factory(release_after: bool):
        def load():
            torch.set_num_threads(3)  # a team of 3 on the loading thread: 2 workers
            try:
                skinny.matmul(x, w)
            finally:
                torch.set_num_threads(before)
            return "backend"

        return (lambda: load_backend(load)) if release_after else load

    before = torch.get_num_threads()
    base, counts = _os_thread_ids(), {}

    def settle(most: int, seconds: float) -> int:
        """Threads started since `base` and alive, once at most `most` are (or at the deadline); a
        thread of an earlier test that ends meanwhile does not count (a count of all would)."""
        deadline = time.monotonic() + seconds
        while len(_os_thread_ids() - base) > most and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(_os_thread_ids() - base)

    for release_after in (False, True):
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(factory(release_after)).result() == "backend"
            counts[release_after] = settle(1, 2.0)  # 1: the pool's own thread
        settle(0, 5.0)  # that thread and any team of its are gone before the next
    assert counts == {False: 3, True: 1}, "the pool's thread, and its two OpenMP workers unless freed"
