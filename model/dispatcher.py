"""The expert step behind one interface, so the model code is the same in every deployment.

The in-process engine uses `LocalDispatcher`; the gateway swaps in one that sends the same inputs to
expert pools. Contract: given the post-attention normed states of T tokens, their top-A expert ids
and weights, return `sum_a weight[t, a] * expert_a(x[t])` `[T, d]`. `submit`/`wait` split that call
so the model can run one micro-batch's attention while another's experts are out (`lane` names the
micro-batch); `experts` is `wait(submit(...))`.

A dispatcher whose experts are all in this process has `banks` (one `ExpertBank` a layer): the model
may then run a decode step's expert steps inside its own one C call (`model.skinny.decode_layers`)
instead of calling `submit`; one that wants to see the routing anyway has `record_routing(layer,
expert_ids)`, called after such a step for each layer (benchmarks count the experts touched).
"""

from __future__ import annotations

from typing import Protocol

import torch

from model.experts import ExpertBank


class Dispatcher(Protocol):
    def experts(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """x `[T, d]`, expert_ids `[T, A]`, weights `[T, A]` -> weighted expert sum `[T, d]`."""
        ...

    def submit(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, lane: int = 0
    ) -> object:
        """Start the expert step; returns a handle for `wait`."""
        ...

    def wait(self, handle: object) -> torch.Tensor:
        """The result of a `submit`."""
        ...


class LocalDispatcher:
    """All experts of every layer in this process: the reference for every distributed path."""

    def __init__(self, banks: list[ExpertBank]) -> None:
        self.banks = banks

    def experts(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        return self.banks[layer](x, expert_ids, weights)

    def submit(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, lane: int = 0
    ) -> torch.Tensor:
        return self.experts(layer, x, expert_ids, weights)  # nothing to overlap with in-process

    def wait(self, handle: torch.Tensor) -> torch.Tensor:
        return handle
