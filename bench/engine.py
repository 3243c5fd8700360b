"""Engine benchmarks of the paged KV cache and its scheduler, in-process, each side by side in one run.

- chunking: TPOT p50/p99 of running streams while long prompts arrive at a fixed interval, with a
  step budget (chunked prefill) against a budget that takes a whole prompt in one step.
- prefix: TTFT p50 of requests that share a long system prompt, prefix caching on against off.
- invariant: decode tokens/s with and without the batch-invariant mode, blocks alternated.
- dense: decode tokens/s of this engine against the dense-slab engine of a baseline commit (checked
  out with `git worktree`); the two run in subprocesses, alternated, on the same checkpoint.
Numbers are printed (and `--json`), never asserted. docs/PERFORMANCE.md has a run.
Usage: python -m bench.engine [--preset small] [--only chunking prefix invariant dense] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import percentiles
from gateway.engine import Engine, EngineLimits
from gateway.sampling import SamplingParams
from model.checkpoint import load_experts, load_model, write_random_checkpoint
from model.config import preset
from model.dispatcher import LocalDispatcher

REPO = Path(__file__).resolve().parents[1]


def load(model_dir: str):
    model, reader = load_model(model_dir, None)
    return model, LocalDispatcher(load_experts(reader, model.cfg, list(range(model.cfg.num_experts))))


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 250) for _ in range(n)]


def chunking(
    model, disp, streams: int, prompt_len: int, every_s: float, duration_s: float, budget: int
) -> dict:
    """`streams` decode; a `prompt_len` prompt arrives every `every_s`. Gaps between a stream's tokens."""
    rng = random.Random(1)
    eng = Engine(model, disp, EngineLimits(max_num_batched_tokens=budget, max_running=streams + 8))
    runs = [
        eng.add(f"s{i}", tokens(rng, 16), SamplingParams(max_tokens=1000, ignore_eod=True))
        for i in range(streams)
    ]
    while any(not s.output_ids for s in runs):
        eng.step()
    last = {s.request_id: (len(s.output_ids), time.perf_counter()) for s in runs}
    gaps: list[float] = []
    t0 = next_arrival = time.perf_counter()
    arrived = 0
    while time.perf_counter() - t0 < duration_s:
        now = time.perf_counter()
        if now >= next_arrival:
            eng.add(f"p{arrived}", tokens(rng, prompt_len), SamplingParams(max_tokens=1))
            arrived += 1
            next_arrival += every_s
        eng.step()
        now = time.perf_counter()
        for s in runs:
            n, at = last[s.request_id]
            if len(s.output_ids) > n:
                gaps.append((now - at) / (len(s.output_ids) - n))
                last[s.request_id] = (len(s.output_ids), now)
    return {"tpot_ms": percentiles(gaps), "prompts": arrived, "steps": eng.steps}


def prefix(model, disp, requests: int, system_len: int, suffix_len: int, caching: bool) -> dict:
    rng = random.Random(2)
    system = tokens(rng, system_len)
    eng = Engine(model, disp, EngineLimits(prefix_caching=caching, max_running=requests))
    t0 = time.perf_counter()
    seqs = [
        eng.add(f"r{i}", system + tokens(rng, suffix_len), SamplingParams(max_tokens=1))
        for i in range(requests)
    ]
    first: dict[str, float] = {}
    while eng.has_work:
        eng.step()
        for s in seqs:
            if s.output_ids and s.request_id not in first:
                first[s.request_id] = time.perf_counter() - t0
    st = eng.stats()
    return {"ttft_ms": percentiles(list(first.values())), "hit_tokens": st["prefix_cache_hits"]}


DECODE = r"""
import json, random, sys, time, torch
from gateway.engine import Engine, EngineLimits
from gateway.sampling import SamplingParams
from model.checkpoint import load_experts, load_model
from model.dispatcher import LocalDispatcher
torch.set_num_threads(int(sys.argv[2]))
model, reader = load_model(sys.argv[1], None)
disp = LocalDispatcher(load_experts(reader, model.cfg, list(range(model.cfg.num_experts))))
out = {}
for c in json.loads(sys.argv[3]):
    rng = random.Random(c)
    prompts = [[rng.randrange(3, 250) for _ in range(16)] for _ in range(c)]
    eng = Engine(model, disp, EngineLimits(max_running=64, **json.loads(sys.argv[4])))
    params = SamplingParams(max_tokens=33, ignore_eod=True)
    seqs = [eng.add(f"r{i}", p, params) for i, p in enumerate(prompts)]
    while any(not s.output_ids for s in seqs):
        eng.step()
    t = time.perf_counter()
    while eng.has_work:
        eng.step()
    out[c] = 32 * c / (time.perf_counter() - t)
print(json.dumps(out))
"""


def decode_rates(cwd: Path, model_dir: str, concurrency: list[int], threads: int, limits: dict) -> dict:
    """Decode tokens/s (16-token prompts, 32 tokens after the first) of the engine checked out at `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    args = [
        sys.executable,
        "-c",
        DECODE,
        model_dir,
        str(threads),
        json.dumps(concurrency),
        json.dumps(limits),
    ]
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=True)
    return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def baseline_tree(ref: str) -> Path:
    """A checkout of `ref` in a temporary folder (`drop_tree` removes it)."""
    path = Path(tempfile.gettempdir()) / f"yuan-bench-baseline-{ref}"
    if not path.exists():
        subprocess.run(
            ["git", "worktree", "add", "-f", "--detach", str(path), ref],
            cwd=REPO,
            check=True,
            capture_output=True,
            timeout=120,
        )
    return path


def drop_tree(path: Path) -> None:
    subprocess.run(
        ["git", "worktree", "remove", "--force", str(path)], cwd=REPO, capture_output=True, timeout=120
    )


def run(a: argparse.Namespace, tmp: str) -> dict:
    """Every comparison `a.only` names; the checkpoint goes to `tmp`."""
    ckpt = write_random_checkpoint(preset(a.preset), Path(tmp) / a.preset, seed=0)
    model, disp = load(str(ckpt))
    res: dict = {"preset": a.preset, "threads": a.threads}
    say = (lambda *x: None) if a.json else print
    if "chunking" in a.only:
        rows = {"chunked": [], "whole": []}
        for _ in range(a.rounds):
            for label, budget in (("chunked", a.budget), ("whole", 4096)):
                rows[label].append(chunking(model, disp, 16, 600, 0.5, 8.0, budget))
        res["chunking"] = {
            k: {
                "p50_ms": sorted(r["tpot_ms"]["p50"] for r in v)[len(v) // 2],
                "p99_ms": sorted(r["tpot_ms"]["p99"] for r in v)[len(v) // 2],
                "runs": v,
            }
            for k, v in rows.items()
        }
        for k, v in res["chunking"].items():
            say(
                f"chunking {k:8s} TPOT p50 {v['p50_ms']:.1f} ms  p99 {v['p99_ms']:.1f} ms  (p99/p50 "
                f"{v['p99_ms'] / v['p50_ms']:.2f})"
            )
    if "prefix" in a.only:
        rows = {"on": [], "off": []}
        for _ in range(a.rounds):
            for label in ("on", "off"):
                rows[label].append(prefix(model, disp, 32, 512, 16, label == "on"))
        res["prefix"] = {
            k: {"ttft_p50_ms": sorted(r["ttft_ms"]["p50"] for r in v)[len(v) // 2], "runs": v}
            for k, v in rows.items()
        }
        on, off = res["prefix"]["on"]["ttft_p50_ms"], res["prefix"]["off"]["ttft_p50_ms"]
        say(f"prefix caching: TTFT p50 on {on:.0f} ms, off {off:.0f} ms: {off / on:.1f}x lower with it")
    if "invariant" in a.only:
        rates = {"default": [], "batch_invariant": []}
        for _ in range(a.rounds):
            for label in rates:
                rates[label].append(
                    decode_rates(
                        REPO,
                        str(ckpt),
                        a.concurrency,
                        a.threads,
                        {"batch_invariant": label == "batch_invariant"},
                    )
                )
        res["invariant"] = _ratios(rates, "batch_invariant", "default", a.concurrency)
        for c, r in res["invariant"].items():
            say(
                f"batch-invariant at {c:2d} streams: {r['batch_invariant']:.0f} vs {r['default']:.0f} tok/s "
                f"({r['ratio']:.2f}x)"
            )
    if "dense" in a.only:
        base = baseline_tree(a.baseline)
        rates = {"paged": [], "dense": []}
        try:
            for _ in range(a.rounds):
                rates["paged"].append(decode_rates(REPO, str(ckpt), a.concurrency, a.threads, {}))
                rates["dense"].append(decode_rates(base, str(ckpt), a.concurrency, a.threads, {}))
        finally:
            drop_tree(base)
        res["dense"] = _ratios(rates, "paged", "dense", a.concurrency)
        for c, r in res["dense"].items():
            say(
                f"paged vs dense ({a.baseline}) at {c:2d} streams: {r['paged']:.0f} vs "
                f"{r['dense']:.0f} tok/s "
                f"({r['ratio']:.2f}x; per round {r['per_round']})"
            )
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--only", nargs="+", default=["chunking", "prefix", "invariant", "dense"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=3, help="alternated blocks per comparison")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--budget", type=int, default=64, help="step budget of the chunked run")
    p.add_argument("--baseline", default="c807eb0", help="commit with the dense-slab engine")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tmp = tempfile.mkdtemp(prefix="yuan-bench-engine-")
    try:
        res = run(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        print(json.dumps(res))


def _ratios(rates: dict, new: str, old: str, concurrency: list[int]) -> dict:
    """Median tokens/s of each side, and the median of the per-round ratios (rounds ran adjacent)."""
    out = {}
    for c in concurrency:
        per_round = [round(n[c] / o[c], 3) for n, o in zip(rates[new], rates[old])]
        out[c] = {
            new: sorted(r[c] for r in rates[new])[len(rates[new]) // 2],
            old: sorted(r[c] for r in rates[old])[len(rates[old]) // 2],
            "ratio": sorted(per_round)[len(per_round) // 2],
            "per_round": per_round,
        }
    return out


if __name__ == "__main__":
    main()
