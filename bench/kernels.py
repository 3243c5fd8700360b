"""The skinny float32 matmul (model/_skinny.c) against torch's, side by side in one run.

- matmul: time of `x @ w.T` for the `small` preset's weight shapes and 1..32 rows, the kernel and
  torch alternated in blocks, each call on another weight of a set far larger than the caches (as
  a decode step reads them: from memory); GB/s of weights streamed.
- decode: in-process decode tokens/s on a random `small` checkpoint at 1 / 8 / 32 streams, four
  sides alternated: everything in C (the kernel, the three-call expert step, the one-call decode
  layer), without the decode layer, the per-expert step, the kernel off (`model.skinny.mode`);
  with `--threads` above 1 a fifth, everything in C on one thread; and whether all gave the same
  tokens.
- breakdown (`--breakdown`): where an in-process decode step's time goes at 1 and 32 streams, by
  timing the model's pieces (their methods wrapped with a clock for this run only).
- compile (`--compile`): what `torch.compile` (inductor, dynamic shapes) does to two of the decode
  step's small pieces, RMSNorm and the Attention Router, against eager, per call, and its compile
  time: the probe behind the choice not to compile (docs/PERFORMANCE.md).
Numbers are printed (and `--json`), never asserted. docs/PERFORMANCE.md has a run.
Usage: python -m bench.kernels [--threads 1] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import contextmanager
from functools import partial

import torch

from bench import torch_threads
from gateway.engine import EngineLimits, local_engine
from gateway.sampling import SamplingParams
from model import skinny
from model.checkpoint import write_random_checkpoint
from model.config import preset

SHAPES = {  # `small` (hidden 512, expert width 512): [out, in] of its matmuls
    "expert w1 / q+k": (1024, 512),
    "expert w2 / v / o": (512, 512),
    "LF conv1": (256, 1024),
}


def matmul(rows: list[int], rounds: int, calls: int = 100, mbytes: int = 256) -> dict:
    out: dict = {}
    for name, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k) for _ in range(max(2, mbytes * 2**20 // (n * k * 4)))]  # past the caches
        out[name] = {}
        for m in rows:
            x = torch.randn(m, k)
            y = torch.empty(m, n)
            sides = {
                "skinny": lambda w: skinny.matmul(x, w, out=y),
                "torch": lambda w: torch.mm(x, w.t(), out=y),
            }
            best = {s: float("inf") for s in sides}
            for _ in range(rounds):
                for s, f in sides.items():
                    f(ws[0])
                    t0 = time.perf_counter()
                    for i in range(calls):
                        f(ws[i % len(ws)])
                    best[s] = min(best[s], (time.perf_counter() - t0) / calls)
            mb = n * k * 4 / 1e6
            out[name][m] = {
                "skinny_us": best["skinny"] * 1e6,
                "torch_us": best["torch"] * 1e6,
                "skinny_gbs": mb / 1e3 / best["skinny"],
                "torch_gbs": mb / 1e3 / best["torch"],
                "speedup": best["torch"] / best["skinny"],
            }
    return out


def prefill_untimed(eng, prompts: list[list[int]], max_tokens: int, tag: str) -> list:
    """Add the prompts and run their prefill (not timed); their sequences."""
    sp = SamplingParams(max_tokens=max_tokens, ignore_eod=True)
    seqs = [eng.add(f"{tag}-{i}-{time.perf_counter()}", p, sp) for i, p in enumerate(prompts)]
    while eng.waiting or any(s.num_computed < len(s.prompt_ids) for s in eng.running):
        eng.step()
    return seqs


def steps_to_end(eng) -> int:
    """Steps until every sequence has finished; how many."""
    steps = 0
    while eng.has_work:
        eng.step()
        steps += 1
    return steps


def timed_decode(eng, streams: int, max_tokens: int) -> tuple[float, list[list[int]]]:
    """`streams` 16-token prompts (seeded by their number) prefilled untimed, then decoded to the end:
    seconds a step and each stream's tokens."""
    g = torch.Generator().manual_seed(streams)
    prompts = [torch.randint(0, 256, (16,), generator=g).tolist() for _ in range(streams)]
    seqs = prefill_untimed(eng, prompts, max_tokens, f"b{streams}")
    t0 = time.perf_counter()
    steps = steps_to_end(eng)
    return (time.perf_counter() - t0) / steps, [s.output_ids for s in seqs]


def alternate(eng, streams: int, rounds: int, sides: dict, max_tokens: int) -> tuple[dict, dict]:
    """After a warm-up run, each side once a round, in turn (`sides`: name -> a context manager
    factory that sets the side up and puts everything back); each side's best seconds a step and
    its tokens."""
    best = {side: float("inf") for side in sides}
    tokens: dict = {}
    timed_decode(eng, streams, max_tokens)  # warm-up
    for _ in range(rounds):
        for side, setup in sides.items():
            with setup():
                dt, tokens[side] = timed_decode(eng, streams, max_tokens)
            best[side] = min(best[side], dt)
    return best, tokens


@contextmanager
def _paths(on: bool, group_rows: int, attention: bool, whole: bool, threads: int):
    """The C paths of `decode`'s sides (`model.skinny`'s switches and torch's threads), put back after."""
    limit, skinny.EXPERT_MAX_ROWS = skinny.EXPERT_MAX_ROWS, group_rows
    skinny.DECODE_LAYER, skinny.DECODE_STEP = attention, whole
    try:
        with torch_threads(threads), skinny.mode(on):
            yield
    finally:
        skinny.EXPERT_MAX_ROWS, skinny.DECODE_LAYER, skinny.DECODE_STEP = limit, True, True


def decode(streams: list[int], rounds: int, threads: int, max_tokens: int = 32) -> dict:
    tmp = tempfile.TemporaryDirectory()
    ckpt = write_random_checkpoint(preset("small"), f"{tmp.name}/small", seed=0)
    eng = local_engine(str(ckpt), limits=EngineLimits(max_running=max(streams), max_tokens=max_tokens))

    # "C": a step's layers, experts included, in one call; "C per layer": the C decode layer and
    # the two-call expert step, a few calls a layer; "grouped": without the decode layer; "per
    # expert": the kernel for each matmul only; "torch": all off; "C, 1 thread": the first on one
    # thread (when the run has more).
    rows = skinny.EXPERT_MAX_ROWS
    paths = {
        "C": (True, rows, True, True, threads),
        "C per layer": (True, rows, True, False, threads),
        "grouped": (True, rows, False, False, threads),
        "per expert": (True, 0, False, False, threads),
        "torch": (False, 0, False, False, threads),
    }
    if threads > 1:
        paths["C, 1 thread"] = (True, rows, True, True, 1)
    sides = {side: partial(_paths, *args) for side, args in paths.items()}
    out: dict = {}
    for b in streams:
        best, tokens = alternate(eng, b, rounds, sides, max_tokens)
        out[b] = {f"{side}_tok_s": b / best[side] for side in sides}
        out[b]["speedup"] = best["torch"] / best["C"]
        out[b]["one_call_over_per_layer"] = best["C per layer"] / best["C"]
        out[b]["C_over_grouped"] = best["grouped"] / best["C per layer"]
        out[b]["grouped_over_per_expert"] = best["per expert"] / best["grouped"]
        if threads > 1:
            out[b]["threads_over_one"] = best["C, 1 thread"] / best["C"]
        out[b]["same_tokens"] = all(t == tokens["C"] for t in tokens.values())
    tmp.cleanup()
    return out


def breakdown(
    streams: list[int], max_tokens: int = 32, preset_name: str = "small", whole: bool = True
) -> dict:
    """ms per decode step in each piece (pieces nest: LF and qkv are inside attention). `whole`:
    decode steps' layers in one C call (as served in-process), else a few calls a layer."""
    import collections

    import model.attention as attention
    from gateway.engine import Engine
    from model.attention_router import AttentionRouter
    from model.batch import ForwardBatch
    from model.dispatcher import LocalDispatcher
    from model.norm import RMSNorm
    from model.transformer import DecoderLayer

    spent: collections.Counter = collections.Counter()
    pieces = [
        (Engine, "step", "step"),
        (ForwardBatch, "build", "batch index tensors"),
        (skinny, "decode_layers", "a step in one C call (embedding to logits, experts inside)"),
        (DecoderLayer, "decode_step", "decode layers in C calls (expert step inside)"),
        (attention.LFAttention, "forward", "attention half, torch layers"),
        (AttentionRouter, "forward", "router, torch"),
        (RMSNorm, "forward", "norms, torch"),
        (LocalDispatcher, "submit", "expert step"),
        (Engine, "_sample", "sampling"),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in pieces]

    def clocked(f, label):
        def g(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[label] += time.perf_counter() - t0

        return g

    out: dict = {}
    one_call, skinny.DECODE_STEP = skinny.DECODE_STEP, whole
    try:
        for (owner, name, label), (_, _, f) in zip(pieces, saved):
            setattr(owner, name, clocked(f, label))
        tmp = tempfile.TemporaryDirectory()
        ckpt = write_random_checkpoint(preset(preset_name), f"{tmp.name}/m", seed=0)
        eng = local_engine(str(ckpt), limits=EngineLimits(max_running=max(streams), max_tokens=max_tokens))
        for b in streams:
            for _ in range(2):  # the first round warms up
                prompts = [[3 + (7 * i + j) % 250 for j in range(16)] for i in range(b)]
                prefill_untimed(eng, prompts, max_tokens, f"p{b}")
                spent.clear()
                steps = steps_to_end(eng)
            out[b] = {label: spent[label] / steps * 1e3 for _, _, label in pieces}
            out[b].update(torch_ops(eng, b, max_tokens))
        tmp.cleanup()
    finally:
        skinny.DECODE_STEP = one_call
        for owner, name, f in saved:
            setattr(owner, name, f)
    return out


def torch_ops(eng, streams: int, max_tokens: int) -> dict:
    """A third decode round under torch's profiler: torch calls per step and their summed own time
    (the C kernels are not torch calls; what is neither is Python)."""
    from torch.profiler import profile

    prompts = [[3 + (5 * i + j) % 250 for j in range(16)] for i in range(streams)]
    prefill_untimed(eng, prompts, max_tokens, f"q{streams}")
    with profile() as prof:
        steps = steps_to_end(eng)
    events = prof.key_averages()
    return {
        "torch calls, every level": sum(e.count for e in events) / steps,
        "torch calls' own time": sum(e.self_cpu_time_total for e in events) / 1e3 / steps,
    }


def compile_probe(rows: list[int], calls: int = 2000) -> dict:
    from model.attention_router import AttentionRouter
    from model.norm import RMSNorm

    pieces = {"RMSNorm": RMSNorm(512, 1e-6), "Attention Router": AttentionRouter(512, 32, 2, True)}
    for m in pieces.values():
        for p in m.parameters():
            p.data.normal_()
    out: dict = {}
    with torch.inference_mode():
        for name, module in pieces.items():
            out[name] = {}
            for m in rows:
                x = torch.randn(m, 512)
                t0 = time.perf_counter()
                compiled = torch.compile(module.forward, dynamic=True)
                compiled(x)
                compile_s = time.perf_counter() - t0
                best = {}
                for side, f in (("eager", module.forward), ("compiled", compiled)):
                    f(x)
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        f(x)
                    best[side] = (time.perf_counter() - t0) / calls
                out[name][m] = {
                    "eager_us": best["eager"] * 1e6,
                    "compiled_us": best["compiled"] * 1e6,
                    "compile_s": compile_s,
                }
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (the gateway and pools run 1)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16, 32])
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--breakdown", action="store_true", help="also where a decode step's time goes")
    p.add_argument("--compile", action="store_true", help="also the torch.compile probe (~30 s more)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if not skinny.available():
        raise SystemExit("model._skinny is not built or this CPU lacks AVX2/FMA: nothing to compare")
    torch.set_num_threads(a.threads)
    res = {"threads": a.threads, "matmul": matmul(a.rows, a.rounds)}  # past MAX_ROWS too
    res["openmp"] = skinny.threaded()
    res["decode"] = decode(a.streams, a.rounds, a.threads)
    if a.breakdown:
        res["breakdown_ms_per_step"] = breakdown([1, 32])
        res["breakdown_per_layer_calls_ms_per_step"] = breakdown([1, 32], whole=False)
    if a.compile:
        res["compile"] = compile_probe([1, 32])
    if a.json:
        print(json.dumps(res, indent=1))
        return
    print(f"matmul, {a.threads} thread(s): us per call (GB/s of weights), best of {a.rounds} blocks")
    print("| shape [out, in] | rows | skinny | torch | speedup |")
    print("| --- | --- | --- | --- | --- |")
    for name, by_rows in res["matmul"].items():
        n, k = SHAPES[name]
        for m, r in by_rows.items():
            print(
                f"| {name} [{n}, {k}] | {m} | {r['skinny_us']:.0f} ({r['skinny_gbs']:.1f}) "
                f"| {r['torch_us']:.0f} ({r['torch_gbs']:.1f}) | {r['speedup']:.2f} |"
            )
    more = a.threads > 1
    print(f"\nin-process decode on small: tokens/s, {a.threads} thread(s), OpenMP kernel: {res['openmp']}")
    print(
        "| streams | C | C per layer | grouped | per expert | torch | C / torch | C / C per layer "
        + "| C per layer / grouped | grouped / per expert "
        + ("| C, 1 thread | C / C, 1 thread " if more else "")
        + "| same tokens |"
    )
    print("|" + " --- |" * 10 + (" --- | --- |" if more else "") + " --- |")
    for b, r in res["decode"].items():
        sides = " | ".join(
            f"{r[k + '_tok_s']:.0f}" for k in ("C", "C per layer", "grouped", "per expert", "torch")
        )
        ratios = (
            f"{r['speedup']:.2f} | {r['one_call_over_per_layer']:.2f} | {r['C_over_grouped']:.2f} "
            f"| {r['grouped_over_per_expert']:.2f}"
        )
        if more:
            ratios += f" | {r['C, 1 thread_tok_s']:.0f} | {r['threads_over_one']:.2f}"
        print(f"| {b} | {sides} | {ratios} | {r['same_tokens']} |")
    if a.breakdown:
        one, per = res["breakdown_ms_per_step"], res["breakdown_per_layer_calls_ms_per_step"]
        print("\nin-process decode step on small, ms per step by piece: layers in one call | a few a layer")
        print("| piece | " + " | ".join(f"x{b}" for b in one) + " |")
        print("| --- |" + " --- |" * len(one))
        for label in next(iter(one.values())):
            print(
                f"| {label} | " + " | ".join(f"{one[b][label]:.2f} / {per[b][label]:.2f}" for b in one) + " |"
            )
        print("(torch calls: per step, with the profiler on; their own time in ms, inflated by it)")
    if a.compile:
        print("\ntorch.compile (inductor, dynamic) against eager: us per call")
        print("| piece | rows | eager | compiled | compile s |")
        print("| --- | --- | --- | --- | --- |")
        for name, by_rows in res["compile"].items():
            for m, r in by_rows.items():
                us = f"{r['eager_us']:.1f} | {r['compiled_us']:.1f}"
                print(f"| {name} | {m} | {us} | {r['compile_s']:.1f} |")


if __name__ == "__main__":
    main()
