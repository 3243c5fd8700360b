"""How fast a decode step's expert weights are read, and what the cache gives back.

The measures behind docs/PERFORMANCE.md's account of why, on two cores, a 32-stream step cannot
reach 80 % of the bandwidth bound, nor the distributed engine 0.9x the in-process one:
- `reread`: a block read again right after it was read, GB/s, beside the read bandwidth from
  memory: what reading a layer's experts early (into the last-level cache) could give back;
- `banks`: a layer's expert step (`ExpertBank`, T rows routed at random, each to top_k distinct
  experts) on each thread count in one process, GB/s over the experts it touched, after a 256 MB sweep;
- `pools`: the same steps through P pools on the data plane (`PoolDispatcher`), GB/s and the
  round trip per layer.
Each side's outputs are compared with the first in-process thread count's (max abs difference):
the kernels give the same bits on any thread count. Numbers are printed, never asserted.
Usage: python -m bench.reads [--preset small] [--rows 32] [--threads 1 2] [--pools 1 2 4] [--reps 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from bench import torch_threads
from bench.roofline import huge_buffer, read_bandwidth_gbs
from model.checkpoint import CheckpointReader, load_experts, write_random_checkpoint
from model.config import YuanConfig, preset

SWEEP_MB = 256  # larger than any cache here: a sweep over it leaves nothing of a layer's weights


def reread(sizes_mb: list[int], reps: int = 5) -> dict:
    """GB/s of `sum` over a block read again right after it was read (best of `reps`), per block
    size, beside this machine's read bandwidth from memory (`bench.roofline`, a 256 MB sum). The
    again-read is what reading a layer's experts early could give back at most. (A block read after
    a sweep over a larger buffer is not cold here: measured, 8-32 MB blocks read at 50-70 GB/s
    after a 256 MB sum, where the 256 MB sum reads 36-43: the last-level cache keeps lines the
    sweep streamed past.)"""
    out: dict = {"memory_gbs": read_bandwidth_gbs(), "again_gbs": {}}
    for mb in sizes_mb:
        block, best = huge_buffer(mb), float("inf")
        for _ in range(reps):
            block.sum()
            t0 = time.perf_counter()
            block.sum()
            best = min(best, time.perf_counter() - t0)
        out["again_gbs"][mb] = block.numel() * 4 / best / 1e9
    return out


def routed_steps(cfg: YuanConfig, rows: int, reps: int, seed: int = 0) -> list[tuple]:
    """`reps` expert steps: (layer, x [rows, d], expert ids [rows, top_k] distinct per row, weights)."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for i in range(reps):
        ids = torch.stack([torch.randperm(cfg.num_experts, generator=g)[: cfg.top_k] for _ in range(rows)])
        x = torch.randn(rows, cfg.hidden_size, generator=g)
        steps.append((i % cfg.num_layers, x, ids, torch.rand(rows, cfg.top_k, generator=g)))
    return steps


def _expert_bytes(cfg: YuanConfig) -> int:
    return 3 * cfg.hidden_size * cfg.ffn_hidden_size * 4


def _timed(run, steps: list[tuple], cfg: YuanConfig) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Each step after a sweep over 256 MB (other layers' experts are as far): GB/s over the bytes
    of the experts it touched (best and median), ms a step (median), and the outputs."""
    sweep, rates, times, outs = huge_buffer(SWEEP_MB), [], [], []
    for layer, x, ids, w in steps:
        sweep.sum()
        t0 = time.perf_counter()
        outs.append(run(layer, x, ids, w))
        dt = time.perf_counter() - t0
        touched = int(torch.unique(ids).numel())
        rates.append(touched * _expert_bytes(cfg) / dt / 1e9)
        times.append(dt * 1e3)
    rate = {"best_gbs": max(rates), "median_gbs": statistics.median(rates)}
    return rate | {"ms": statistics.median(times)}, outs


def _diff(outs: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(outs, ref, strict=True))


def banks(ckpt: str, cfg: YuanConfig, steps: list[tuple], threads: list[int]) -> tuple[dict, list]:
    """The in-process expert step on each thread count; returns the results and the first's outputs."""
    all_banks = load_experts(CheckpointReader(ckpt), cfg, list(range(cfg.num_experts)))
    out, ref = {}, None
    for t in threads:
        with torch_threads(t), torch.inference_mode():
            res, outs = _timed(lambda layer, x, ids, w: all_banks[layer](x, ids, w), steps, cfg)
        ref = outs if ref is None else ref
        out[t] = res | {"max_abs_diff": _diff(outs, ref)}
    return out, ref


def pools(
    ckpt: str, cfg: YuanConfig, steps: list[tuple], counts: list[int], ref: list, settle_s: float = 20.0
) -> dict:
    """The expert step through P pools (a started local Ray cluster) for each P in `counts`, each
    set timed once the machine is quiet (at most `settle_s` after its start)."""
    # This process only sweeps and waits here: on one thread, so that no OpenMP worker of its spins
    # on a core the pools need (libgomp's workers spin-wait after each parallel region).
    with torch_threads(1):
        return {p: _through_pools(ckpt, cfg, steps, p, ref, settle_s) for p in counts}


def _through_pools(
    ckpt: str, cfg: YuanConfig, steps: list[tuple], p: int, ref: list, settle_s: float
) -> dict:
    from bench import wait_for_quiet
    from cluster.pools import PoolConfig, PoolSet
    from gateway.pool_dispatcher import PoolDispatcher

    ps = PoolSet(PoolConfig(ckpt, pools=p))
    ps.start()
    wait_for_quiet(settle_s)  # Ray starts idle workers after actors take some: seconds of both cores
    try:
        disp = PoolDispatcher(ps.table, ps.handles, num_layers=cfg.num_layers)
        try:
            disp.experts(*steps[0])  # connect every pool before timing
            res, outs = _timed(disp.experts, steps, cfg)
            return res | {"max_abs_diff": _diff(outs, ref)}
        finally:
            disp.close()
    finally:
        ps.shutdown()


def measure(
    preset_name: str, rows: int, threads: list[int], pool_counts: list[int], reps: int, settle_s: float = 20.0
) -> dict:
    cfg = preset(preset_name)
    steps = routed_steps(cfg, rows, reps)
    res: dict = {"reread": reread([8, 16, 32])}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(write_random_checkpoint(cfg, f"{tmp}/m", seed=0))
        res["banks"], ref = banks(ckpt, cfg, steps, threads)
        if pool_counts:
            import ray

            from cluster.ray_cluster import connect

            started = connect(num_cpus=16)
            try:
                res["pools"] = pools(ckpt, cfg, steps, pool_counts, ref, settle_s)
            finally:
                if started:
                    ray.shutdown()
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.reads", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--rows", type=int, default=32, help="rows of a step (streams), routed at random")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--pools", type=int, nargs="*", default=[1, 2, 4], help="none: skip the pools")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    res = measure(a.preset, a.rows, a.threads, a.pools, a.reps)
    if a.json:
        print(json.dumps(res, indent=1))
        return
    r = res["reread"]
    print(f"from memory (a 256 MB sum): {r['memory_gbs']:.1f} GB/s; a block read again right after:")
    print("| block | GB/s |\n| --- | --- |")
    for mb, gbs in r["again_gbs"].items():
        print(f"| {mb} MB | {gbs:.1f} |")
    print(f"\nexpert step of {a.rows} rows on {a.preset} after a 256 MB sweep: GB/s over the experts touched")
    print("| where | best GB/s | median GB/s | ms a step | max abs diff |\n| --- | --- | --- | --- | --- |")
    rows = [(f"in-process, {t} thread(s)", r) for t, r in res["banks"].items()]
    rows += [(f"{n} pool(s)", r) for n, r in res.get("pools", {}).items()]
    for name, r in rows:
        gbs = f"{r['best_gbs']:.1f} | {r['median_gbs']:.1f}"
        print(f"| {name} | {gbs} | {r['ms']:.3f} | {r['max_abs_diff']:.2e} |")


if __name__ == "__main__":
    main()
