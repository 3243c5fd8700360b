"""Benchmarks: numbers measured side by side in one run, never asserted in tests."""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50 and p99 of durations in seconds, in milliseconds (0 for no samples)."""
    s = sorted(samples)
    if not s:
        return {"p50": 0.0, "p99": 0.0}
    return {"p50": s[len(s) // 2] * 1e3, "p99": s[min(len(s) - 1, int(len(s) * 0.99))] * 1e3}


def print_sides(res: dict, this: str, other: str = "other") -> None:
    """A two-sided comparison's markdown table, a row per stream count: each side's ms a step, this
    side's speed over the other's and whether both gave the same tokens (`bench.builds`,
    `bench.checkouts`: keys f"{side}_ms", f"{this}_over_{other}", "same_tokens")."""
    print(f"| streams | {this} ms | {other} ms | {this} / {other} speed | same tokens |")
    print("| --- | --- | --- | --- | --- |")
    for b, r in res.items():
        print(
            f"| {b} | {r[f'{this}_ms']:.3f} | {r[f'{other}_ms']:.3f} | {r[f'{this}_over_{other}']:.3f} |"
            f" {r['same_tokens']} |"
        )


@contextmanager
def torch_threads(n: int):
    """torch's thread count set to `n` for the block, then put back."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def wait_for_quiet(max_s: float = 20.0, busy_below: float = 0.25, window_s: float = 0.5) -> float:
    """Wait until this machine's CPUs are mostly idle (Linux /proc/stat), at most `max_s`; returns the
    seconds waited. Ray refills its pool of idle workers right after actors take some, and those
    starting processes eat the cores of a 2-core box for seconds: measured, the 4-pool round trip
    read 0.75 ms inside a full `yuan-serve bench` run and 0.45 ms alone."""

    def busy() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(n) for n in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4], sum(v)  # minus idle and iowait

    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < max_s:
            b0, a0 = busy()
            time.sleep(window_s)
            b1, a1 = busy()
            if (b1 - b0) < busy_below * max(1, a1 - a0):
                break
    except OSError:  # no /proc/stat: nothing to wait on
        pass
    return time.monotonic() - t0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--pools", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--dispatch-pools", type=int, default=4, help="0 skips the dispatch round-trip measurement"
    )
    p.add_argument("--no-overlap", action="store_true", help="skip the micro-batch overlap variant")
    p.add_argument(
        "--skew",
        type=float,
        default=4.0,
        help="router skew of the rebalancing run (4 pools, before/after); 0 skips it",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the in-process engine and of the bandwidth measure (the pool runs' "
        "gateway half and each pool run 1, as served); this machine's cores for the in-process "
        "engine at full speed",
    )
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--plot", default=None, help="write a PNG of throughput vs concurrency here")
