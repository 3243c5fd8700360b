"""Serving benchmark: the in-process engine and the distributed engine side by side, in one run.

For each preset (random checkpoints in the real layout), each engine (in-process; 1, 2, 4 pools
over the data plane) and each concurrency, C streams of the same prompts run through the same
`Gateway` class the server uses. Reported: tokens/s, TTFT and TPOT p50/p99 (and the decode TPOT
of the steps after every stream's first token, which the roofline uses), the expert step's
round trip per layer p50/p99, and a step breakdown. Numbers are printed, never asserted.
The in-process engine and the bandwidth measure run on `--threads` torch threads (1 by default);
the pool runs' gateway half and each pool on one, as served by default.
Usage: yuan-serve bench [--presets tiny small] [--pools 1 2 4] [--concurrency 1 8 32] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field

import ray
import torch

from bench import add_arguments, percentiles, wait_for_quiet
from bench.roofline import (
    bound_tokens_per_s,
    experts_touched,
    matmul_gflops,
    read_bandwidth_gbs,
    step_seconds,
)
from cluster.pools import PoolConfig, PoolSet
from cluster.ray_cluster import connect
from gateway.engine import Engine, EngineLimits
from gateway.pool_dispatcher import PoolDispatcher
from gateway.sampling import SamplingParams
from gateway.service import Gateway
from model.checkpoint import load_experts, load_model, write_random_checkpoint
from model.config import preset
from model.dispatcher import LocalDispatcher


@dataclass
class TimedDispatcher:
    """Times the gateway thread's time inside each layer's expert step (submit + wait): for the
    distributed engine pool compute, transport and waiting; with overlap, only what is not hidden."""

    inner: object
    times: list[float] = field(default_factory=list)
    routed: list[torch.Tensor] = field(default_factory=list)  # per call: the expert ids `[T, A]`

    in_call: int = 0  # layers whose expert step ran inside the model's one-call decode step

    @property
    def banks(self):
        """The inner dispatcher's in-process banks, if any: its decode steps then run in one call."""
        return getattr(self.inner, "banks", None)

    def record_routing(self, layer, expert_ids):
        self.routed.append(expert_ids)
        self.in_call += 1

    def experts(self, layer, x, expert_ids, weights):
        return self.wait(self.submit(layer, x, expert_ids, weights))

    def submit(self, layer, x, expert_ids, weights, lane=0):
        self.routed.append(expert_ids)  # counted after the run (`roofline`), not in the timed step
        t0 = time.perf_counter()
        handle = self.inner.submit(layer, x, expert_ids, weights, lane)
        return time.perf_counter() - t0, handle

    def wait(self, handle):
        spent, inner = handle
        t0 = time.perf_counter()
        out = self.inner.wait(inner)
        self.times.append(spent + time.perf_counter() - t0)
        return out


async def run_load(gateway: Gateway, prompts: list[list[int]], max_tokens: int) -> dict:
    """All prompts at once as concurrent streams; per-request TTFT and TPOT, and the decode TPOT:
    a request's gaps between the tokens it got after every request had its first (the steps that
    prefill nothing, which the roofline's decode tokens/s is about)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eod=True)

    async def one(i: int) -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        return t0, [e.at async for e in gateway.stream(f"b{i}", prompts[i], params)]

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    wall = time.perf_counter() - t0
    ttft = [stamps[0] - start for start, stamps in results]
    tpot = [(s[-1] - s[0]) / (len(s) - 1) if len(s) > 1 else 0.0 for _, s in results]
    all_started = max(s[0] for _, s in results)
    steady = [[t for t in s if t > all_started] for _, s in results]
    decode = [(s[-1] - s[0]) / (len(s) - 1) for s in steady if len(s) > 1]
    return {
        "tokens_per_s": sum(len(s) for _, s in results) / wall,
        "wall_s": wall,
        "tokens": sum(len(s) for _, s in results),
        "ttft_ms": percentiles(ttft),
        "tpot_ms": percentiles(tpot),
        "decode_tpot_ms": percentiles(decode),
    }


def measure(
    engine: Engine, timed: TimedDispatcher, concurrency: int, prompt_len: int, max_tokens: int
) -> dict:
    """Breakdown per step: gateway compute (attention, router, sampling, scheduling), expert calls
    (wall time the gateway spent in them), and of that the pools' own expert math (summed over pools,
    which run in parallel) and the rest (transport and waiting)."""
    g = torch.Generator().manual_seed(concurrency)
    vocab = engine.model.cfg.vocab_size
    prompts = [
        torch.randint(0, min(vocab, 256), (prompt_len,), generator=g).tolist() for _ in range(concurrency)
    ]
    gateway = Gateway(engine)
    asyncio.run(run_load(gateway, prompts[:1], 2))  # warm-up
    timed.times.clear()
    timed.routed.clear()
    timed.in_call = 0
    steps0 = engine.steps
    load = getattr(timed.inner, "load", None)
    compute0 = sum(load.worker_compute_s.values()) if load else 0.0
    result = asyncio.run(run_load(gateway, prompts, max_tokens))
    pool_s = (sum(load.worker_compute_s.values()) - compute0) if load else sum(timed.times)
    gateway.close()
    steps = engine.steps - steps0
    layers = engine.model.cfg.num_layers
    expert_s = sum(timed.times)
    result["steps"] = steps
    result["expert_steps_in_one_call"] = timed.in_call  # decode layers: not timed apart from the step
    result["expert_step_ms"] = percentiles(timed.times)
    result["roofline"] = roofline(engine.model, timed, concurrency, prompt_len + max_tokens / 2, result)
    step_s = result["wall_s"] / max(1, steps)
    per_step = 1e3 / max(1, steps)
    result["breakdown_ms_per_step"] = {
        "total": step_s * 1e3,
        "expert_calls": expert_s * per_step,
        "gateway_compute": (result["wall_s"] - expert_s) * per_step,
        "pool_compute_summed": pool_s * per_step,
        "transport_and_waiting": max(0.0, expert_s - pool_s) * per_step,
        "expert_calls_per_layer": expert_s / max(1, steps * layers) * 1e3,
    }
    return result


def balance(skew: float, pools: int, concurrency: int, prompt_len: int, max_tokens: int, tmp: str) -> dict:
    """A skewed checkpoint on contiguous pools, then rebalanced from the load it measured: tokens per
    pool (max/mean) and throughput, before and after, in one run."""
    from cluster.controller import ControlConfig, start_controller, stop_controller
    from cluster.gateway_host import report_once
    from router.load import window, worker_balance

    ckpt = write_random_checkpoint(preset("tiny"), f"{tmp}/skewed", seed=3, router_skew=skew)
    model, _ = load_model(str(ckpt))
    app = "bench-balance"
    controller = start_controller(
        app, PoolConfig(str(ckpt), pools=pools), ControlConfig(slots_per_pool=32 // pools + 4)
    )
    try:
        table = ray.get(controller.table_now.remote())
        disp = PoolDispatcher(
            table["table"], table["workers"], num_layers=model.cfg.num_layers, keys=table["keys"]
        )
        wait_for_quiet()
        limits = EngineLimits(max_running=concurrency, max_tokens=max_tokens)

        def phase(name: str) -> tuple[dict, dict]:
            """One load run: where it started (a load snapshot) and what it measured."""
            progress(f"skewed tiny, {pools} pools, x{concurrency}, {name} rebalancing")
            start = disp.load.snapshot()
            timed = TimedDispatcher(disp)
            result = measure(Engine(model, timed, limits), timed, concurrency, prompt_len, max_tokens)
            balance_ = worker_balance(window(start, disp.load.snapshot())["worker_pairs"], pools)
            return start, {"max_over_mean": balance_, "tokens_per_s": result["tokens_per_s"]}

        _, before = phase("before")
        progress(f"the controller rebalances {pools} pools from the measured load")
        report_once(controller, "bench", disp)  # the load of the first phase
        moved = controller.rebalance.remote()
        while not ray.wait([moved], timeout=0.05)[0]:  # acknowledge the new table, as a gateway does
            report_once(controller, "bench", disp)
        ray.get(moved)
        report_once(controller, "bench", disp)
        _, after = phase("after")
        out = {"before": before, "after": after}
        disp.close()
    finally:
        stop_controller(app)
    return {
        "skew": skew,
        "pools": pools,
        "concurrency": concurrency,
        "load_balance": {p: out[p]["max_over_mean"] for p in out},
        "throughput": {p: out[p]["tokens_per_s"] for p in out},
    }


def roofline(model, timed: TimedDispatcher, concurrency: int, context: float, result: dict) -> dict:
    """Decode tokens/s (streams over the decode TPOT p50: steps that prefill nothing) against the
    memory-bandwidth bound of a decode step: the bytes it must read (`bench.roofline.step_bytes`,
    with the experts its steps touched, counted per call of `concurrency` rows) over this machine's
    read bandwidth (`run` measures it once). Beside it, the compute bound (the step's operations over
    the measured matmul rate) and the two in series (a step that cannot overlap them)."""
    touched = experts_touched(timed.routed, concurrency)
    s = step_seconds(model, concurrency, touched, context, BANDWIDTH_GBS["value"], MATMUL_GFLOPS["value"])
    nbytes, flops, compute_s = s["bytes"], s["flops"], s["compute_s"]
    bound = bound_tokens_per_s(nbytes, concurrency, BANDWIDTH_GBS["value"])
    tpot = result["decode_tpot_ms"]["p50"] or result["tpot_ms"]["p50"]  # too few tokens: the whole run's
    decode = concurrency / (tpot / 1e3) if tpot else 0.0
    serial = concurrency / (s["memory_s"] + compute_s)
    return {
        "bytes_per_step": nbytes,
        "experts_touched_per_layer": touched,
        "bandwidth_gbs": BANDWIDTH_GBS["value"],
        "bound_tokens_per_s": bound,
        "decode_tokens_per_s": decode,
        "fraction": decode / bound,
        "flops_per_step": flops,
        "matmul_gflops": MATMUL_GFLOPS["value"],
        "compute_bound_tokens_per_s": concurrency / compute_s,
        "serial_bound_tokens_per_s": serial,
        "fraction_of_serial": decode / serial,
    }


BANDWIDTH_GBS = {"value": 0.0}  # measured once per run, before the first preset
MATMUL_GFLOPS = {"value": 0.0}  # the same


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run(
    presets: list[str],
    pools: list[int],
    concurrency: list[int],
    prompt_len: int,
    max_tokens: int,
    dispatch_pools: int = 4,
    dispatch_iters: int = 200,
    overlap: bool = True,
    skew: float = 0.0,
    threads: int = 1,
) -> dict:
    torch.set_num_threads(threads)
    connect(num_cpus=16)
    out: dict = {
        "config": {
            "presets": presets,
            "pools": pools,
            "concurrency": concurrency,
            "prompt_len": prompt_len,
            "max_tokens": max_tokens,
            "threads": threads,
        },
        "results": {},
        "throughput_ratio": {},
    }
    progress("measuring this machine's read bandwidth")
    BANDWIDTH_GBS["value"] = out["bandwidth_gbs"] = read_bandwidth_gbs()
    progress("measuring this machine's matmul rate")
    MATMUL_GFLOPS["value"] = out["matmul_gflops"] = matmul_gflops()
    limits = EngineLimits(max_running=max(concurrency), max_tokens=max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        for name in presets:
            ckpt = write_random_checkpoint(preset(name), f"{tmp}/{name}", seed=0)
            model, reader = load_model(str(ckpt))
            engines = {
                "in-process": LocalDispatcher(
                    load_experts(reader, model.cfg, list(range(model.cfg.num_experts)))
                )
            }
            res = out["results"][name] = {}
            wait_for_quiet()  # Ray's own processes start up after `connect`: not on the in-process clock
            torch.set_num_threads(threads)
            for label, disp in engines.items():
                res[label] = {}
                for c in concurrency:
                    progress(f"{name} {label} x{c}")
                    timed = TimedDispatcher(disp)
                    res[label][c] = measure(Engine(model, timed, limits), timed, c, prompt_len, max_tokens)
            # The pool runs' gateway half runs on one thread, as a served gateway does by default
            # (`gateway_threads`): with more, its OpenMP workers spin-wait after each parallel
            # region on the cores its co-located pools need (docs/PERFORMANCE.md).
            torch.set_num_threads(1)
            for P in pools:
                ps = PoolSet(PoolConfig(str(ckpt), pools=P))
                ps.start()
                try:
                    disp = PoolDispatcher(ps.table, ps.handles, num_layers=model.cfg.num_layers)
                    wait_for_quiet()  # Ray starts replacement idle workers after the pools take theirs
                    variants = [(f"{P} pools", 1)] + (
                        [(f"{P} pools+overlap", 2)] if overlap and P == max(pools) else []
                    )
                    for label, micro in variants:
                        res[label] = {}
                        for c in concurrency:
                            progress(f"{name} {label} x{c}")
                            timed = TimedDispatcher(disp)
                            engine = Engine(model, timed, limits, micro_batches=micro)
                            res[label][c] = measure(engine, timed, c, prompt_len, max_tokens)
                    disp.close()
                finally:
                    ps.shutdown()
            out.setdefault("roofline", {})[name] = {
                c: res["in-process"][c]["roofline"]["fraction"] for c in concurrency
            }
            best = f"{max(pools)} pools" if pools else None
            if best:
                out["throughput_ratio"][name] = {
                    c: res[best][c]["tokens_per_s"] / res["in-process"][c]["tokens_per_s"]
                    for c in concurrency
                }
    if skew > 0:
        with tempfile.TemporaryDirectory() as tmp:
            b = balance(skew, 4, max(concurrency), prompt_len, max_tokens, tmp)
        out["load_balance"], out["balance_run"] = b["load_balance"], b
    if dispatch_pools:
        from bench.dispatch import TRANSPORT_CFG
        from bench.dispatch import measure as dispatch_measure

        progress(f"dispatch round trip, 64 tokens x {TRANSPORT_CFG.hidden_size} to {dispatch_pools} pools")
        with tempfile.TemporaryDirectory() as tmp:
            write_random_checkpoint(TRANSPORT_CFG, tmp + "/ckpt", seed=0)
            rt = dispatch_measure(tmp + "/ckpt", dispatch_pools, 64, dispatch_iters, "echo")
        out["dispatch_round_trip_ms"] = {
            **rt["dataplane"],
            "pools": dispatch_pools,
            "tokens": 64,
            "hidden": TRANSPORT_CFG.hidden_size,
            "ray_calls": rt["ray"],
        }
    return out


def table(out: dict) -> str:
    lines = []
    for name, res in out["results"].items():
        lines.append(
            f"\npreset {name}: tokens/s | TTFT p50/p99 ms | TPOT p50/p99 ms | expert step per layer ms"
        )
        for label, by_c in res.items():
            for c, r in by_c.items():
                b = r["breakdown_ms_per_step"]
                head = (
                    f"  {label:>10} x{c:<3} {r['tokens_per_s']:9.1f} | {r['ttft_ms']['p50']:7.1f} / "
                    f"{r['ttft_ms']['p99']:7.1f} | {r['tpot_ms']['p50']:6.2f} / {r['tpot_ms']['p99']:6.2f} | "
                )
                if r.get("expert_steps_in_one_call"):  # in-process decode: experts inside the step's call
                    lines.append(
                        head + f"   -    (step {b['total']:.2f} ms; decode steps' experts in their one call)"
                    )
                    continue
                lines.append(
                    head + f"{b['expert_calls_per_layer']:6.3f}  (step {b['total']:.2f} ms: gateway "
                    f"{b['gateway_compute']:.2f}, expert calls {b['expert_calls']:.2f} = pools "
                    f"{b['pool_compute_summed']:.2f} summed + transport/waiting "
                    f"{b['transport_and_waiting']:.2f})"
                )
        bw = out.get("bandwidth_gbs", 0)
        th = out["config"].get("threads", 1)
        lines.append(
            f"  roofline (decode tokens/s over the bandwidth bound, {bw:.1f} GB/s read, {th} thread(s);"
            f" then the compute bound at {out.get('matmul_gflops', 0):.0f} GFLOP/s and both in series):"
        )
        for label, by_c in res.items():
            for c, r in by_c.items():
                f = r["roofline"]
                lines.append(
                    f"  {label:>10} x{c:<3} step reads {f['bytes_per_step'] / 1e6:7.1f} MB "
                    f"({f['experts_touched_per_layer']:.1f} experts/layer), bound "
                    f"{f['bound_tokens_per_s']:8.1f} tok/s, decode {f['decode_tokens_per_s']:8.1f} tok/s = "
                    f"{f['fraction'] * 100:5.1f} % of it; {f['flops_per_step'] / 1e6:.0f} MFLOP, compute "
                    f"{f['compute_bound_tokens_per_s']:.0f} tok/s, in series "
                    f"{f['serial_bound_tokens_per_s']:.0f} tok/s = {f['fraction_of_serial'] * 100:.1f} %"
                )
        if name in out["throughput_ratio"]:
            ratios = ", ".join(f"x{c}: {v:.2f}" for c, v in out["throughput_ratio"][name].items())
            lines.append(f"  distributed / in-process throughput: {ratios}")
    if "balance_run" in out:
        b = out["balance_run"]
        lines.append(
            f"\nskewed tiny (router skew {b['skew']}), {b['pools']} pools, x{b['concurrency']}: "
            f"tokens per pool max/mean {b['load_balance']['before']:.2f} -> "
            f"{b['load_balance']['after']:.2f} after rebalancing; "
            f"throughput {b['throughput']['before']:.1f} -> {b['throughput']['after']:.1f} tokens/s"
        )
    if "dispatch_round_trip_ms" in out:
        rt = out["dispatch_round_trip_ms"]
        lines.append(
            f"\ndispatch round trip, {rt['tokens']} tokens x {rt['hidden']} to {rt['pools']} pools (echo): "
            f"p50 {rt['p50']:.3f} ms, p99 {rt['p99']:.3f} ms (Ray calls: p50 {rt['ray_calls']['p50']:.3f} ms)"
        )
    return "\n".join(lines)


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(out["results"])
    fig, axes = plt.subplots(1, len(presets), figsize=(5 * len(presets), 4), squeeze=False)
    for ax, name in zip(axes[0], presets):
        for label, by_c in out["results"][name].items():
            cs = sorted(by_c)
            ax.plot(cs, [by_c[c]["tokens_per_s"] for c in cs], marker="o", label=label)
        ax.set(title=f"preset {name}", xlabel="concurrent streams", ylabel="tokens/s", xscale="log")
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.minorticks_off()
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="yuan-serve bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    run_cli(p.parse_args(argv))


def run_cli(args: argparse.Namespace) -> None:
    out = run(
        args.presets,
        args.pools,
        args.concurrency,
        args.prompt_len,
        args.max_tokens,
        args.dispatch_pools,
        overlap=not args.no_overlap,
        skew=args.skew,
        threads=args.threads,
    )
    if args.plot:
        plot(out, args.plot)
        out["plot"] = args.plot
    print(json.dumps(out) if args.json else table(out))


if __name__ == "__main__":
    main()
