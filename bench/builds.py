"""Two builds of the C kernels (`model/_skinny.c`) side by side in one process: in-process decode.

For a change to the C file alone, the fairest comparison on a noisy machine: one engine, one model,
one cache; each round runs the same prompts once with the installed build and once with the other
(`model.skinny` calls whichever module it is pointed at), alternated (`bench.kernels.alternate`),
best of `--rounds`.

Build the other side from any commit, e.g. the previous one:
    git show HEAD~1:model/_skinny.c > /tmp/old.c
    INC=$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    gcc -O3 -fwrapv -fPIC -fopenmp -shared -I"$INC" /tmp/old.c -o /tmp/old.so
    python -m bench.builds /tmp/old.so --streams 1 8 32 --rounds 7
Prints ms a step and tokens/s per side, installed / other speed, and whether both gave the same
tokens. Numbers are printed, never asserted. A change that also touches Python (a cache layout, a
loader) needs two checkouts run alternately instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from contextlib import contextmanager
from functools import partial
from types import ModuleType

import torch

from bench import print_sides
from bench.kernels import alternate
from gateway.engine import EngineLimits, local_engine
from model import skinny
from model.checkpoint import write_random_checkpoint
from model.config import preset


def load_build(path: str) -> ModuleType:
    """A build of `model._skinny` from `path`, loaded beside the installed one."""
    spec = importlib.util.spec_from_file_location("model._skinny", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path}: not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def _using(module: ModuleType):
    """`model.skinny` calls `module` inside, the installed build again after."""
    installed, skinny._skinny = skinny._skinny, module
    try:
        yield
    finally:
        skinny._skinny = installed


def compare(
    other: str,
    streams: list[int],
    rounds: int,
    threads: int,
    max_tokens: int = 32,
    preset_name: str = "small",
) -> dict:
    """Per stream count: ms a step and tokens/s of each side, installed / other speed, same tokens."""
    if skinny._skinny is None:
        raise RuntimeError("model._skinny is not built here: nothing to compare")
    sides = {"installed": partial(_using, skinny._skinny), "other": partial(_using, load_build(other))}
    torch.set_num_threads(threads)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_random_checkpoint(preset(preset_name), f"{tmp}/m", seed=0)
        eng = local_engine(str(ckpt), limits=EngineLimits(max_running=max(streams), max_tokens=max_tokens))
        for b in streams:
            best, tokens = alternate(eng, b, rounds, sides, max_tokens)
            out[b] = {
                **{f"{s}_ms": v * 1e3 for s, v in best.items()},
                **{f"{s}_tok_s": b / v for s, v in best.items()},
                "installed_over_other": best["other"] / best["installed"],
                "same_tokens": tokens["installed"] == tokens["other"],
            }
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.builds", description=__doc__.split("\n")[0])
    p.add_argument("other", help="path of the other build's .so")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32, help="tokens decoded after 16-token prompts")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    res = compare(a.other, a.streams, a.rounds, a.threads, a.max_tokens)
    if a.json:
        print(json.dumps(res))
        return
    print(
        f"in-process decode on small, {a.threads} thread(s), {a.max_tokens} tokens: best of {a.rounds}"
        " alternated rounds"
    )
    print_sides(res, "installed")


if __name__ == "__main__":
    main()
