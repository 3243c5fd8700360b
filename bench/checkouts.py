"""Two checkouts side by side: in-process decode, each in its own processes, alternated.

For a change that touches Python (where `bench.builds`, one process with two builds of the C file,
cannot tell): this checkout and another one (e.g. `git worktree add /tmp/before HEAD~3`, its C
parts built there with `python setup.py build_ext --inplace`) each run the same decode on the same
checkpoint in a fresh process, in turn, `--alternations` times; each side's best seconds a step
over all its rounds, and whether both gave the same tokens. Numbers are printed, never asserted.

    python -m bench.checkouts /tmp/before --streams 1 8 32 --rounds 7 --alternations 4

The other checkout's code runs through a short script that uses only `bench.kernels.timed_decode`
and `gateway.engine.local_engine`, so any commit that has both can be measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import print_sides
from model.checkpoint import write_random_checkpoint
from model.config import preset

# One side's run: prints {streams: [best seconds, digest of the tokens]} as JSON: a decode step's
# (prefill 0), or a whole prefill's of `streams` fresh prompts of `prefill` tokens (new ones each
# round, the same on both sides, so the prefix cache holds none of them).
SIDE = """
import hashlib, json, sys, time, torch
from bench.kernels import timed_decode
from gateway.engine import EngineLimits, local_engine
from gateway.sampling import SamplingParams
ckpt, rounds, threads, max_tokens, prefill = sys.argv[1], *map(int, sys.argv[2:6])
streams = [int(s) for s in sys.argv[6:]]
torch.set_num_threads(threads)
eng = local_engine(ckpt, limits=EngineLimits(max_running=max(streams), max_tokens=max(max_tokens, 1)))
seed = [0]

def timed_prefill(b):
    g = torch.Generator().manual_seed(seed[0])
    seed[0] += 1
    sp = SamplingParams(max_tokens=1, ignore_eod=True)
    prompts = [torch.randint(0, 256, (prefill,), generator=g).tolist() for _ in range(b)]
    seqs = [eng.add(f"p{seed[0]}-{i}", p, sp) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    while eng.has_work:
        eng.step()
    return time.perf_counter() - t0, [s.output_ids for s in seqs]

run = (lambda b: timed_prefill(b)) if prefill else (lambda b: timed_decode(eng, b, max_tokens))
out = {}
for b in streams:
    run(b)  # warm-up
    best, tokens = float("inf"), []
    for _ in range(rounds):
        dt, got = run(b)
        best, tokens = min(best, dt), tokens + [got]
    out[b] = [best, hashlib.sha256(repr(tokens).encode()).hexdigest()]
import gateway.engine
print(json.dumps({"code": gateway.engine.__file__, "results": out}))
"""


def run_side(
    checkout: str, ckpt: str, streams: list[int], rounds: int, threads: int, max_tokens: int, prefill: int = 0
) -> dict:
    """One fresh process with `checkout` first on the import path; {streams: (seconds, digest)}."""
    env = {**os.environ, "PYTHONPATH": checkout}
    sizes = (rounds, threads, max_tokens, prefill, *streams)
    args = [sys.executable, "-c", SIDE, ckpt, *map(str, sizes)]
    done = subprocess.run(args, env=env, cwd=checkout, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{checkout}: the side's run failed:\n{done.stderr[-2000:]}")
    said = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(said["code"]).resolve().is_relative_to(Path(checkout).resolve()):
        # an installed copy of the package answered instead (an editable install wins over a
        # directory without one): the comparison would be of one checkout with itself
        raise RuntimeError(f"{checkout}: its run imported {said['code']}, not this checkout's code")
    return {int(b): tuple(v) for b, v in said["results"].items()}


def compare(
    other: str,
    streams: list[int],
    rounds: int,
    alternations: int,
    threads: int,
    max_tokens: int = 32,
    preset_name: str = "small",
    prefill: int = 0,
) -> dict:
    """Per stream count: each side's best ms (a decode step; with `prefill`, the prefill of that many
    prompts of `prefill` tokens) and tokens/s, this / other speed, same tokens."""
    this = str(Path(__file__).resolve().parent.parent)
    sides = {"this": this, "other": str(Path(other).resolve())}
    best = {side: {b: float("inf") for b in streams} for side in sides}
    digests: dict = {side: {} for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(write_random_checkpoint(preset(preset_name), f"{tmp}/m", seed=0))
        for _ in range(alternations):
            for side, path in sides.items():
                for b, (seconds, digest) in run_side(
                    path, ckpt, streams, rounds, threads, max_tokens, prefill
                ).items():
                    best[side][b] = min(best[side][b], seconds)
                    digests[side][b] = digest
    return {
        b: {
            "this_ms": best["this"][b] * 1e3,
            "other_ms": best["other"][b] * 1e3,
            "this_tok_s": b * max(prefill, 1) / best["this"][b],
            "other_tok_s": b * max(prefill, 1) / best["other"][b],
            "this_over_other": best["other"][b] / best["this"][b],
            "same_tokens": digests["this"][b] == digests["other"][b],
        }
        for b in streams
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.checkouts", description=__doc__.split("\n")[0])
    p.add_argument("other", help="the other checkout's directory (its C parts built in place)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=7, help="timed runs per side and process")
    p.add_argument("--alternations", type=int, default=3, help="processes per side, in turn")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prefill", type=int, default=0, help="time the prefill of prompts this long instead")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    res = compare(a.other, a.streams, a.rounds, a.alternations, a.threads, a.max_tokens, prefill=a.prefill)
    if a.json:
        print(json.dumps(res))
        return
    what = f"prefill of {a.prefill}-token prompts (ms: all of it)" if a.prefill else "decode (ms a step)"
    print(
        f"in-process {what} on small, {a.threads} thread(s): best of {a.rounds} rounds in each of "
        f"{a.alternations} alternated processes per side"
    )
    print_sides(res, "this")


if __name__ == "__main__":
    main()
