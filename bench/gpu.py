"""GPU check: a few-layer m32-shaped random checkpoint served by a gateway engine on the GPU and
expert pools (on the GPU too, sharing it, when Ray sees one): decode tokens/s per batch size and the
per-layer expert step round trip as the gateway sees it (submit to result, over the data plane),
and beside them the in-process engine on the same checkpoint and device (all experts local).

It runs on a CPU as well, with small shapes (`--preset tiny`), which is how its code is checked on
machines without a GPU. `scripts/gpu_check.sh` runs it after the CUDA golden test.
Usage: python -m bench.gpu [--preset m32] [--layers 2] [--dtype bfloat16] [--pools 4] [--batches 1 64]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import ray
import torch

from bench import percentiles
from bench.serving import TimedDispatcher, progress
from cluster.pools import PoolConfig, PoolSet
from cluster.ray_cluster import connect
from gateway.engine import Engine, EngineLimits, local_engine
from gateway.pool_dispatcher import PoolDispatcher
from gateway.sampling import SamplingParams
from model.checkpoint import load_model, write_random_checkpoint
from model.config import preset


def decode(
    model,
    disp: TimedDispatcher,
    batch: int,
    prompt_len: int,
    tokens: int,
    limits: EngineLimits,
    profile_steps: int = 0,
) -> dict:
    g = torch.Generator().manual_seed(batch)
    vocab = min(model.cfg.vocab_size, 256)
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    eng = Engine(model, disp, limits)
    params = SamplingParams(max_tokens=tokens + 1 + profile_steps, ignore_eod=True)
    seqs = [eng.add(f"b{i}", p, params) for i, p in enumerate(prompts)]
    while any(not s.output_ids for s in seqs):  # prefill (and the first token) is not timed
        eng.step()
    disp.times.clear()
    disp.routed.clear()
    cuda = model.embed.weight.is_cuda
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(tokens):  # one token a sequence each step
        eng.step()
    wall = time.perf_counter() - t0
    out = {
        "batch": batch,
        "tokens_per_s": batch * tokens / wall,
        "step_ms": wall / tokens * 1e3,
        "expert_round_trip_ms": percentiles(disp.times),
    }
    if profile_steps:
        out["profile"] = profile(eng, profile_steps, cuda)
    while eng.has_work:
        eng.step()
    return out


def profile(eng: Engine, steps: int, cuda: bool) -> dict:
    """torch.profiler over `steps` decode steps: the device's busy time and the kernel launches a
    step (what a launch-bound step is made of), and the ops that cost the host most."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            eng.step()
        if cuda:
            torch.cuda.synchronize()
    ka = prof.key_averages()
    launches = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
    top = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    out = {"host_top_ms": {e.key: e.self_cpu_time_total / steps / 1e3 for e in top}}
    if cuda:
        out["device_busy_ms"] = sum(getattr(e, "self_device_time_total", 0) for e in ka) / steps / 1e3
        out["launches_per_step"] = sum(e.count for e in ka if e.key in launches) / steps
    return out


def staging(hidden: int, dtype: torch.dtype, batches: list[int], reps: int = 200) -> dict:
    """What one layer's expert rows cost to move GPU -> host -> GPU (the pools' data plane), by host
    buffer kind: pageable, or pinned with non-blocking copies. Median microseconds per round trip."""
    out = {}
    for b in batches:
        dev = torch.randn(b * 2, hidden, device="cuda").to(dtype)  # [B*A, D]: two routed rows a token
        for kind in ("pageable", "pinned"):
            host = torch.empty(dev.shape, dtype=dtype, pin_memory=kind == "pinned")
            back = torch.empty_like(dev)
            times = []
            for _ in range(reps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                host.copy_(dev, non_blocking=kind == "pinned")
                torch.cuda.current_stream().synchronize()
                back.copy_(host, non_blocking=kind == "pinned")
                torch.cuda.current_stream().synchronize()
                times.append(time.perf_counter() - t0)
            out[f"{kind}_b{b}"] = sorted(times)[len(times) // 2] * 1e6
    return out


def sweep(name: str, model, timed: TimedDispatcher, a, limits: EngineLimits, t0: float, profile_steps=0):
    """`decode` at each of the batch sizes asked for, a progress line after each."""
    runs = []
    for b in a.batches:
        runs.append(decode(model, timed, b, a.prompt_len, a.tokens, limits, profile_steps))
        stage(f"{name}, batch {b}: {runs[-1]['tokens_per_s']:.1f} tokens/s", t0)
    return runs


def stage(what: str, t0: float) -> None:
    """A progress line as each stage ends, so a run stopped at its time limit still says how far it got."""
    progress(f"gpu: {what} ({time.perf_counter() - t0:.1f} s)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="m32")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--pools", type=int, default=4)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--device", default=None, help="the gateway's device; default: cuda when there is one")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="also profile this many in-process decode steps a batch (device busy time, launches)",
    )
    p.add_argument(
        "--no-in-process",
        dest="in_process",
        action="store_false",
        help="skip the side-by-side run of the in-process engine (all experts on the gateway's device)",
    )
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = preset(a.preset).with_(num_layers=a.layers, torch_dtype=a.dtype)
    limits = EngineLimits(
        max_running=max(a.batches),
        max_tokens=a.tokens + 1 + a.profile,
        max_num_batched_tokens=max(256, max(a.batches) * a.prompt_len),
    )
    out = {"preset": a.preset, "layers": a.layers, "dtype": a.dtype, "pools": a.pools, "device": str(device)}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ckpt = write_random_checkpoint(cfg, f"{tmp}/ckpt", seed=0)
        out["checkpoint_s"] = time.perf_counter() - t0
        stage("checkpoint written", t0)
        if device.type == "cuda":
            out["staging_us"] = staging(cfg.hidden_size, getattr(torch, a.dtype), a.batches)
            stage(f"staging round trips (us): {out['staging_us']}", t0)
        started = connect(num_cpus=max(8, a.pools + 4))
        ps = PoolSet(PoolConfig(str(ckpt), pools=a.pools, dtype=a.dtype, limits=limits))
        try:
            ps.start()
            stage("pools started", t0)
            out["pool_devices"] = sorted(
                {i["device"] for i in ray.get([h.info.remote() for h in ps.handles])}
            )
            model, _ = load_model(str(ckpt), a.dtype)
            model.to(device)
            disp = PoolDispatcher(ps.table, ps.handles, num_layers=cfg.num_layers)
            timed = TimedDispatcher(disp)
            out["runs"] = sweep("pools", model, timed, a, limits, t0)
            disp.close()
            del model
        finally:
            ps.shutdown()
            if started:
                ray.shutdown()
        if a.in_process:  # the same checkpoint, all experts beside the gateway's model
            ref = local_engine(str(ckpt), a.dtype, limits, device=str(device))
            timed = TimedDispatcher(ref.dispatcher)
            out["in_process_runs"] = sweep("in-process", ref.model, timed, a, limits, t0, a.profile)
    for name, key in (("pools", "runs"), ("in-process", "in_process_runs")):
        for r in out.get(key, []):
            rt = r["expert_round_trip_ms"]
            print(
                f"{name:10s} batch {r['batch']:3d}: {r['tokens_per_s']:9.1f} tokens/s, "
                f"step {r['step_ms']:.2f} ms, expert step per layer "
                f"p50 {rt['p50']:.3f} ms p99 {rt['p99']:.3f} ms"
            )
            if "device_busy_ms" in r.get("profile", {}):
                pr = r["profile"]
                print(
                    f"{'':10s} profiled: device busy {pr['device_busy_ms']:.2f} ms a step, "
                    f"{pr['launches_per_step']:.0f} kernel launches a step"
                )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
