"""Decode at the real model's layer sizes on this CPU: the skinny kernel against torch, side by side.

An m32-shaped random checkpoint (hidden 2048, 16 heads, 32 experts of 2048 -> 2x8192 -> 2048,
vocab 135040) cut to `--layers` layers, loaded in each `--dtypes` in turn; in-process decode at each
`--streams`, the skinny kernel on and off (`model.skinny.mode`: off is torch's matmuls) alternated
in rounds. Reported: ms a step, tokens/s, the bytes a step must read (`bench.roofline.step_bytes`,
with the experts the steps touched) and the fraction of the bandwidth bound reached; beside it the
fraction of memory and compute in series (`step_flops` over the measured float32 matmul rate: the
kernel multiplies bfloat16 weights in float32 too), the bound where several rows make a step
compute-heavy; and whether both sides gave the same tokens. Numbers are printed (and `--json`),
never asserted. docs/PERFORMANCE.md has a run. Writing the checkpoint takes ~45 s a layer;
`--checkpoint DIR` keeps it there and reuses it.
With `--pools N`, also served: N expert pools (Ray actors, one torch thread each, as served) and the
gateway's engine in this process over the data plane, its torch threads 1 (a served gateway's
default) and `--threads` alternated in rounds; ms a step and the ratio to the in-process kernel.
Usage: python -m bench.real_shape [--layers 1] [--dtypes bfloat16 float32] [--streams 1 4] [--rounds 3]
       [--pools 4]
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from functools import partial
from pathlib import Path

import torch

from bench import torch_threads
from bench.kernels import alternate
from bench.roofline import experts_touched, matmul_gflops, read_bandwidth_gbs, step_seconds
from bench.serving import TimedDispatcher
from gateway.engine import Engine, EngineLimits
from model import skinny
from model.checkpoint import load_experts, load_model, write_random_checkpoint
from model.config import preset
from model.dispatcher import LocalDispatcher

PROMPT = 16  # timed_decode's prompt length


def measure(
    ckpt: str, dtype: str, streams: list[int], rounds: int, max_tokens: int, gbs: float, gflops: float
) -> dict:
    model, reader = load_model(ckpt, dtype)
    disp = TimedDispatcher(  # it keeps each expert step's routing: the experts a step touched
        LocalDispatcher(load_experts(reader, model.cfg, list(range(model.cfg.num_experts))))
    )
    eng = Engine(model, disp, EngineLimits(max_running=max(streams), max_tokens=max_tokens))
    sides = {"C": partial(skinny.mode, True), "torch": partial(skinny.mode, False)}
    out = {}
    for b in streams:
        disp.routed.clear()
        best, tokens = alternate(eng, b, rounds, sides, max_tokens)
        touched = experts_touched(disp.routed, b)
        step = step_seconds(model, b, touched, PROMPT + max_tokens / 2, gbs, gflops)
        nbytes, bound_s = step["bytes"], step["memory_s"]
        serial_s = bound_s + step["compute_s"]
        out[b] = {
            "C_ms": best["C"] * 1e3,
            "torch_ms": best["torch"] * 1e3,
            "C_tok_s": b / best["C"],
            "C_over_torch": best["torch"] / best["C"],
            "bytes_per_step": nbytes,
            "experts_touched_per_layer": touched,
            "bound_ms": bound_s * 1e3,
            "C_fraction": bound_s / best["C"],
            "torch_fraction": bound_s / best["torch"],
            "serial_bound_ms": serial_s * 1e3,
            "C_fraction_of_serial": serial_s / best["C"],
            "same_tokens": tokens["C"] == tokens["torch"],
        }
    del eng, disp, model, reader
    gc.collect()
    return out


def served(ckpt: str, dtype: str, pools: int, streams: list[int], rounds: int, max_tokens: int) -> dict:
    """ms a decode step with `pools` pools, the gateway's engine on 1 thread and on this run's."""
    from bench import wait_for_quiet
    from cluster.pools import PoolConfig, PoolSet
    from cluster.ray_cluster import connect
    from gateway.pool_dispatcher import PoolDispatcher

    threads = torch.get_num_threads()
    connect(num_cpus=16)
    model, _ = load_model(ckpt, dtype)
    ps = PoolSet(PoolConfig(ckpt, pools=pools, dtype=dtype))
    ps.start()
    try:
        disp = PoolDispatcher(ps.table, ps.handles, num_layers=model.cfg.num_layers)
        wait_for_quiet()  # Ray starts replacement idle workers after the pools take theirs
        eng = Engine(model, disp, EngineLimits(max_running=max(streams), max_tokens=max_tokens))
        sides = {n: partial(torch_threads, n) for n in sorted({1, threads})}
        out = {}
        for b in streams:
            best, _ = alternate(eng, b, rounds, sides, max_tokens)
            out[b] = {f"gateway_{n}_threads_ms": best[n] * 1e3 for n in sides}
        disp.close()
        return out
    finally:
        ps.shutdown()


def run(
    layers: int,
    dtypes: list[str],
    streams: list[int],
    rounds: int,
    max_tokens: int,
    ckpt: str | None,
    pools: int = 0,
    preset_name: str = "m32",
) -> dict:
    tmp = None
    if ckpt is None:
        tmp = tempfile.TemporaryDirectory()
        ckpt = f"{tmp.name}/{preset_name}"
    if not (Path(ckpt) / "config.json").exists():
        write_random_checkpoint(preset(preset_name).with_(num_layers=layers), ckpt, seed=0)
    try:
        gbs, gflops = read_bandwidth_gbs(), matmul_gflops()
        res = {"preset": preset_name, "layers": layers, "threads": torch.get_num_threads()}
        res["bandwidth_gbs"], res["matmul_gflops"] = gbs, gflops
        res["results"] = {d: measure(ckpt, d, streams, rounds, max_tokens, gbs, gflops) for d in dtypes}
        for d in dtypes if pools else []:
            res.setdefault("served", {})[d] = got = served(ckpt, d, pools, streams, rounds, max_tokens)
            for b, r in got.items():
                for key, ms in list(r.items()):
                    r[key.replace("_ms", "_over_in_process")] = res["results"][d][b]["C_ms"] / ms
        return res
    finally:
        if tmp is not None:
            tmp.cleanup()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.real_shape", description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=1, help="layers of the m32-shaped checkpoint")
    p.add_argument("--preset", default="m32", help="another preset's shapes instead (a quick run)")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds per side")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--checkpoint", default=None, help="write (or reuse) the checkpoint here")
    p.add_argument("--pools", type=int, default=0, help="also served through this many pools (0: not)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if not skinny.available():
        raise SystemExit("model._skinny is not built or this CPU lacks AVX2/FMA: nothing to compare")
    torch.set_num_threads(a.threads)
    res = run(a.layers, a.dtypes, a.streams, a.rounds, a.max_tokens, a.checkpoint, a.pools, a.preset)
    if a.json:
        print(json.dumps(res, indent=1))
        return
    print(
        f"{a.preset}-shaped, {a.layers} layer(s), {res['threads']} thread(s), read bandwidth "
        f"{res['bandwidth_gbs']:.1f} GB/s, float32 matmul {res['matmul_gflops']:.0f} GFLOP/s; ms a decode "
        f"step, best of {a.rounds} alternated rounds"
    )
    print(
        "| dtype | streams | C ms | torch ms | C / torch | MB a step | bound ms | C of bound "
        "| torch of bound | memory + compute ms | C of that | same tokens |"
    )
    print("|" + " --- |" * 12)
    for dtype, by_streams in res["results"].items():
        for b, r in by_streams.items():
            print(
                f"| {dtype} | {b} | {r['C_ms']:.1f} | {r['torch_ms']:.1f} | {r['C_over_torch']:.2f} "
                f"| {r['bytes_per_step'] / 1e6:.0f} | {r['bound_ms']:.1f} | {100 * r['C_fraction']:.0f} % "
                f"| {100 * r['torch_fraction']:.0f} % | {r['serial_bound_ms']:.1f} "
                f"| {100 * r['C_fraction_of_serial']:.0f} % | {r['same_tokens']} |"
            )
    for dtype, by_streams in res.get("served", {}).items():
        print(f"\nserved through {a.pools} pools, {dtype}: ms a decode step (in-process C / it)")
        for b, r in by_streams.items():
            cells = [f"{k.split('_')[1]} thread(s) {v:.1f}" for k, v in r.items() if k.endswith("_ms")]
            ratios = [f"{v:.2f}" for k, v in r.items() if k.endswith("_over_in_process")]
            print(f"  {b} stream(s): " + ", ".join(f"{c} ({x})" for c, x in zip(cells, ratios)))


if __name__ == "__main__":
    main()
