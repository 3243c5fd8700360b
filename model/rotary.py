"""Rotary position tables with Yuan's bfloat16 quirk (SPEC step 5).

The released code builds the angle in bfloat16, so positions above 256 round to the nearest
representable bf16 value (257 -> 256). Float32 tables shift logits by up to 0.3 on long prompts,
so the quirk is reproduced exactly rather than "fixed".
"""

from __future__ import annotations

import torch


def rotary_tables(
    head_dim: int, num_positions: int, base: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, float32 `[num_positions, head_dim]` (row = position)."""
    inv_freq = (1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)).bfloat16()
    pos = torch.arange(num_positions, dtype=torch.float32).bfloat16()
    angle = torch.outer(pos.float(), inv_freq.float()).bfloat16()
    emb = torch.cat([angle, angle], dim=-1)
    return emb.cos().float(), emb.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (NeoX) rotary; `cos`/`sin` broadcast against `x` `[..., head_dim]`."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
