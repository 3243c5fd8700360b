"""Command-line pieces that `generate` and `client` share: the sampling flags and comma-separated ids."""

from __future__ import annotations

import argparse


def token_ids(text: str, flag: str = "--token-ids") -> list[int]:
    """`1,2,3` -> [1, 2, 3]; anything else exits with one line naming the flag."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"error: {flag} must be comma-separated integers, got {text!r}") from None


def add_sampling_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--max-tokens", type=int, default=16)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop-token-ids", default=None, help="comma-separated ids that end generation")
