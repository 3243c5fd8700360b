"""Many gateways sharing one controller's pools: aggregate decode tokens/s with 1 and 2 gateways
(each its own process: a Ray actor attached through `cluster.gateway_host`, as a Serve replica is),
and how long a gateway takes to serve again after its process is killed with the pools kept,
against starting the whole application (controller, pools, gateway) from nothing.

Everything runs in one process tree, side by side in one run, blocks alternated (1, 2, 1, 2, ...).
Usage: python -m bench.gateways [--preset small] [--pools 4] [--streams 32 64] [--blocks 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import time

import ray
import torch

from bench import wait_for_quiet
from cluster.controller import start_controller, stop_controller
from cluster.pools import PoolConfig
from cluster.ray_cluster import connect
from gateway.engine import EngineLimits
from gateway.sampling import SamplingParams
from model.checkpoint import write_random_checkpoint
from model.config import preset


@ray.remote(num_cpus=1)
class BenchGateway:
    """A gateway process attached to the application's controller (no gRPC: the engine directly)."""

    def __init__(self, app: str, pools: PoolConfig) -> None:
        from cluster.gateway_host import attach_backend

        torch.set_num_threads(1)
        t0 = time.perf_counter()
        self.backend = attach_backend(app, pools, create=False)
        self.attach_s = time.perf_counter() - t0

    def ready(self) -> dict:
        return {"pid": os.getpid(), "attach_s": self.attach_s}

    def run(self, streams: int, prompt_len: int, max_tokens: int, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(0, 256, (prompt_len,), generator=g).tolist() for _ in range(streams)]
        engine = self.backend.engine
        engine.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eod=True))  # warm
        t0 = time.perf_counter()
        seqs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eod=True))
        return {"tokens": sum(len(s.output_ids) for s in seqs), "t0": t0, "t1": time.perf_counter()}


def aggregate(gateways: list, streams: int, prompt_len: int, max_tokens: int) -> float:
    """`streams` split over the gateways, all at once; tokens/s from the first start to the last end."""
    share = [streams // len(gateways) + (i < streams % len(gateways)) for i in range(len(gateways))]
    runs = ray.get(
        [g.run.remote(n, prompt_len, max_tokens, i) for i, (g, n) in enumerate(zip(gateways, share))]
    )
    return sum(r["tokens"] for r in runs) / (max(r["t1"] for r in runs) - min(r["t0"] for r in runs))


def run(
    preset_name: str, pools: int, streams: list[int], blocks: int, prompt_len: int, max_tokens: int
) -> dict:
    connect(num_cpus=16)
    out: dict = {
        "config": {
            "preset": preset_name,
            "pools": pools,
            "streams": streams,
            "blocks": blocks,
            "prompt_len": prompt_len,
            "max_tokens": max_tokens,
            "cores": os.cpu_count(),
        }
    }
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_random_checkpoint(preset(preset_name), f"{tmp}/{preset_name}", seed=0)
        cfg = PoolConfig(
            str(ckpt), pools=pools, limits=EngineLimits(max_running=max(streams), max_tokens=max_tokens)
        )
        t0 = time.perf_counter()
        start_controller("bench-gateways", cfg)
        gateways = [BenchGateway.remote("bench-gateways", cfg) for _ in range(2)]
        ray.get([g.ready.remote() for g in gateways])
        out["cold_start_s"] = time.perf_counter() - t0  # controller + pools + 2 gateways from nothing
        wait_for_quiet()
        tps: dict = {n: {1: [], 2: []} for n in streams}
        for _ in range(blocks):
            for n in streams:
                for k in (1, 2):
                    tps[n][k].append(aggregate(gateways[:k], n, prompt_len, max_tokens))
        out["tokens_per_s"] = {n: {k: statistics.median(v) for k, v in by.items()} for n, by in tps.items()}
        out["two_over_one"] = {n: out["tokens_per_s"][n][2] / out["tokens_per_s"][n][1] for n in streams}
        # A gateway killed by pid: its replacement attaches to the live controller and pools.
        pid = ray.get(gateways[1].ready.remote())["pid"]
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        again = BenchGateway.remote("bench-gateways", cfg)
        ready = ray.get(again.ready.remote())
        out["gateway_restart_s"] = time.perf_counter() - t0
        out["gateway_attach_s"] = ready["attach_s"]
        for g in [gateways[0], again]:
            ray.kill(g)
        stop_controller("bench-gateways")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--pools", type=int, default=4)
    p.add_argument("--streams", type=int, nargs="+", default=[32, 64])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    out = run(a.preset, a.pools, a.streams, a.blocks, a.prompt_len, a.max_tokens)
    if a.json:
        print(json.dumps(out))
        return
    print(
        f"{a.preset}, {a.pools} pools, {out['config']['cores']} cores, median of {a.blocks} alternated blocks"
    )
    print("| streams | 1 gateway tok/s | 2 gateways tok/s | 2 / 1 |")
    print("| --- | --- | --- | --- |")
    for n in a.streams:
        t = out["tokens_per_s"][n]
        print(f"| {n} | {t[1]:.0f} | {t[2]:.0f} | {out['two_over_one'][n]:.2f} |")
    print(
        f"cold start (controller, {a.pools} pools, 2 gateways): {out['cold_start_s']:.1f} s; "
        f"a killed gateway serving again with the pools kept: {out['gateway_restart_s']:.1f} s "
        f"(attach and model load {out['gateway_attach_s']:.1f} s)"
    )


if __name__ == "__main__":
    main()
