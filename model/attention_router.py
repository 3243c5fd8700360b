"""The Attention Router (the paper's gate) and the classical router it is compared against.

Legend: T tokens, d hidden, N experts, A active experts per token.
Attention Router, per token in float32: Q, K, V = Wq g, Wk g, Wv g (each length N);
M = softmax_rows(Q K^T) (N x N, no scale); P = M V; p = softmax(P); top-A of p, most probable
first; with `norm_topk_prob` the A weights are divided by their sum. Weights leave in model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.derived import Derived
from model.invariant import bmm, linear


class AttentionRouter(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, num_experts, bias=False)
        self.key = nn.Linear(hidden, num_experts, bias=False)
        self.value = nn.Linear(hidden, num_experts, bias=False)
        self._wqkv = Derived(lambda wq, wk, wv: torch.cat([wq, wk, wv]).float())
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob

    def probabilities(self, g: torch.Tensor) -> torch.Tensor:
        w = self._wqkv.get(self.query.weight, self.key.weight, self.value.weight)  # [3N, d] float32
        q, k, v = linear(g.float(), w).split(self.query.weight.shape[0], dim=-1)  # [T, N] each
        m = F.softmax(q[:, :, None] * k[:, None, :], dim=-1)  # [T, N, N]
        p = bmm(m, v[:, :, None]).squeeze(-1)  # [T, N]
        return F.softmax(p, dim=-1)

    def forward(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """g `[T, d]` -> (expert ids `[T, A]` int64, weights `[T, A]` in g's dtype)."""
        return _top_k(self.probabilities(g), self.top_k, self.norm_topk_prob, g.dtype)


class ClassicalRouter(nn.Module):
    """The paper's baseline gate: p = softmax(W g) with one N x d matrix."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob

    def forward(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = F.softmax(linear(g.float(), self.gate.weight.float()), dim=-1)
        return _top_k(p, self.top_k, self.norm_topk_prob, g.dtype)


def _top_k(p: torch.Tensor, k: int, normalise: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    weights, ids = torch.topk(p, k, dim=-1)
    if normalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights.to(dtype)
