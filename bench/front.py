"""The asyncio front's cost: decode through `Gateway.stream` against a plain `engine.step()` loop.

One in-process engine on a random checkpoint; for each stream count, blocks alternate between the
plain loop (prefill untimed, then the decode steps timed) and the `Gateway` (every stream's gap
between its 6th and last token, averaged over the streams). Best block of each side, ms a step.
Numbers are printed (and `--json`), never asserted. docs/PERFORMANCE.md has a run.
Usage: python -m bench.front [--preset small] [--streams 1 8 32] [--rounds 7] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time

import torch

from bench.kernels import prefill_untimed, steps_to_end
from gateway.engine import EngineLimits, local_engine
from gateway.sampling import SamplingParams
from gateway.service import Gateway
from model.checkpoint import write_random_checkpoint
from model.config import preset

SKIP = 5  # a stream's first tokens share steps with the other streams' prefill


def _prompts(streams: int, tag: int) -> list[list[int]]:
    return [[3 + (7 * i + j + tag) % 250 for j in range(16)] for i in range(streams)]


def plain_ms(engine, streams: int, tokens: int) -> float:
    """ms a decode step of a `while engine.has_work: engine.step()` loop (prefill not timed)."""
    prefill_untimed(engine, _prompts(streams, 1), tokens, "plain")
    t0 = time.perf_counter()
    steps = steps_to_end(engine)
    return (time.perf_counter() - t0) / max(1, steps) * 1e3


def gateway_ms(engine, streams: int, tokens: int) -> float:
    """ms between a stream's tokens through `Gateway.stream` (after its first SKIP), over streams."""
    params = SamplingParams(max_tokens=tokens, ignore_eod=True)

    async def run() -> list[list[float]]:
        gateway = Gateway(engine)

        async def one(i: int, prompt: list[int]) -> list[float]:
            return [e.at async for e in gateway.stream(f"gw-{i}-{time.perf_counter()}", prompt, params)]

        try:
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(_prompts(streams, 2))))
        finally:
            gateway.close(wait_s=10.0)

    stamps = asyncio.run(run())
    gaps = [(s[-1] - s[SKIP]) / (len(s) - 1 - SKIP) for s in stamps]
    return sum(gaps) / len(gaps) * 1e3


def measure(preset_name: str, streams: list[int], rounds: int, tokens: int = 48) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_random_checkpoint(preset(preset_name), f"{tmp}/m", seed=0)
        engine = local_engine(str(ckpt), limits=EngineLimits(max_running=max(streams), max_tokens=tokens))
        out: dict = {}
        for b in streams:
            best = {"plain_ms": float("inf"), "gateway_ms": float("inf")}
            for _ in range(rounds):
                best["plain_ms"] = min(best["plain_ms"], plain_ms(engine, b, tokens))
                best["gateway_ms"] = min(best["gateway_ms"], gateway_ms(engine, b, tokens))
            out[b] = best | {"front_ms": best["gateway_ms"] - best["plain_ms"]}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.front", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = measure(a.preset, a.streams, a.rounds)
    if a.json:
        print(json.dumps(res, indent=1))
        return
    print(f"decode on {a.preset}, {a.threads} thread(s): ms a step, best of {a.rounds} alternated blocks")
    print("| streams | plain loop | Gateway | Gateway - plain |")
    print("| --- | --- | --- | --- |")
    for b, r in res.items():
        print(f"| {b} | {r['plain_ms']:.3f} | {r['gateway_ms']:.3f} | {r['front_ms']:+.3f} |")


if __name__ == "__main__":
    main()
