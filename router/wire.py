"""Tensors on the wire between gateway and pools: numpy arrays (Ray moves them without pickling
their bytes); bfloat16, which numpy lacks, travels as its raw int16 bits."""

from __future__ import annotations

import numpy as np
import torch


def encode(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def decode(a: np.ndarray, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    t = torch.tensor(a, device=device)  # a copy: arrays from Ray are read-only
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t
