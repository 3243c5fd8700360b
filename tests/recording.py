"""A real engine that keeps every logits row it samples from, per request (tests compare them with
the golden fixture's)."""

from __future__ import annotations

import torch

from gateway.engine import Engine


class RecordingEngine(Engine):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.logits: dict[str, list[torch.Tensor]] = {}

    def _sample(self, batch, logits):
        for i, seq in enumerate(batch):
            self.logits.setdefault(seq.request_id, []).append(logits[i].float().cpu())
        return super()._sample(batch, logits)
