"""RMSNorm's one-call float32 path gives the bits of Yuan's formula (statistics in float32)."""

from __future__ import annotations

import torch

from model.norm import RMSNorm


def test_float32_path_equals_the_formula():
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(512, 1e-6)
    norm.weight.data = torch.randn(512, generator=g)
    for rows in (1, 3, 17, 64):
        x = torch.randn(rows, 512, generator=g) * 5
        ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        assert torch.equal(norm(x), ref), f"{rows} rows"


def test_bfloat16_computes_in_float32_and_casts_back():
    norm = RMSNorm(64, 1e-6).to(torch.bfloat16)
    x = torch.randn(4, 64).to(torch.bfloat16)
    xf = x.float()
    ref = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype is torch.bfloat16 and torch.equal(out, ref)
