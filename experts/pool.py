"""The expert pool: hosts a subset of the experts of every layer and computes their weighted sums.

A plain class (unit tests drive it without Ray); `experts.actor.ExpertPoolActor` is its Ray shell.
It reads only its own experts' tensors from the checkpoint, never the whole model.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import torch

from experts.dataplane import DataPlaneServer
from model import invariant
from model.checkpoint import CheckpointReader, load_experts
from model.config import DTYPES, YuanConfig
from model.experts import ExpertBank, scatter_rows
from model.pages import to_huge_pages
from router.dataplane import DataPlaneLimits, PairBatch
from router.wire import decode, encode


def node_id() -> str:
    """The Ray node this process runs on ("" outside Ray): gateways on the same node id use shared
    memory, others TCP."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


class ExpertPool:
    def __init__(
        self,
        model_dir: str,
        expert_ids: list[int],
        dtype: str | None = None,
        device: str = "cpu",
        num_threads: int = 1,
        max_tokens_per_request: int = 16384,
        batch_invariant: bool = False,
    ) -> None:
        torch.set_num_threads(num_threads)
        invariant.set_enabled(batch_invariant)  # this process computes for gateways in that mode
        self.model_dir, self.device = model_dir, torch.device(device)
        cfg = YuanConfig.from_file(os.path.join(model_dir, "config.json"))
        self.cfg = cfg.with_(torch_dtype=dtype) if dtype else cfg
        self.banks: list = []
        self.tensors_read: set[str] = set()
        self.data_plane: DataPlaneServer | None = None
        self.max_tokens_per_request = max_tokens_per_request
        self.table_version = 0  # the routing-table version these experts were set for (0: at start)
        self.set_experts(expert_ids)

    def set_experts(self, expert_ids: list[int], table_version: int | None = None) -> dict:
        """Hold exactly `expert_ids`: kept experts are copied, new ones read from the checkpoint (only
        their tensors; `tensors_read` lists them), and the banks are swapped in one assignment, so
        calls in flight on other threads finish on the old banks and the next call sees the new ones."""
        ids = sorted(set(expert_ids))
        if table_version is not None:
            self.table_version = table_version
        held = {e: j for j, e in enumerate(self.banks[0].expert_ids)} if self.banks else {}
        new = [e for e in ids if e not in held]
        reader = CheckpointReader(self.model_dir)
        on_cpu = torch.device(self.device).type == "cpu"  # else they go to the device: no huge pages
        fresh = [b.to(self.device) for b in load_experts(reader, self.cfg, new, huge_pages=on_cpu)]
        self.tensors_read = reader.tensors_read
        if not held:  # nothing to keep: the freshly read banks are the new ones
            self.banks = fresh
            return self.info()
        banks = []
        for layer, old in enumerate(self.banks):
            bank = (
                ExpertBank(ids, self.cfg.hidden_size, self.cfg.ffn_hidden_size)
                .to(old.w1.dtype)
                .to(self.device)
            )
            with torch.no_grad():
                for j, e in enumerate(ids):
                    src, k = (old, held[e]) if e in held else (fresh[layer], new.index(e))
                    bank.w1[j].copy_(src.w1[k])
                    bank.w2[j].copy_(src.w2[k])
            to_huge_pages(bank)  # as loaded banks are (model/pages.py)
            banks.append(bank.eval().requires_grad_(False))
        self.banks = banks
        return self.info()

    def note_table(self, version: int) -> None:
        """The controller published this routing-table version (a restarted controller starts above
        the highest version any pool noted, so above every gateway's)."""
        self.table_version = max(self.table_version, version)

    def info(self) -> dict:
        return {
            "experts": list(self.banks[0].expert_ids) if self.banks else [],
            "bytes": sum(b.nbytes() for b in self.banks),
            "pid": os.getpid(),
            "tensors_read": len(self.tensors_read),
            "device": str(self.device),
            "table_version": self.table_version,
            "node_id": node_id(),
        }

    def open_data_plane(self, tcp_host: str = "127.0.0.1") -> dict:
        """Start (once) the data-plane server; returns where gateways reach it and the key they prove
        themselves with (this travels through Ray, never on the data plane)."""
        if self.data_plane is None:
            cfg = self.cfg
            limits = DataPlaneLimits(cfg.num_layers, cfg.num_experts, self.max_tokens_per_request, cfg.top_k)
            self.data_plane = DataPlaneServer(self.compute_pairs, cfg.hidden_size, limits, tcp_host)
        return {"address": self.data_plane.address(), "host": socket.gethostname(), "node_id": node_id()}

    def compute_pairs(self, layer: int, batch: PairBatch, start: int, end: int) -> None:
        """The data plane's call: the weighted outputs of the batch's pairs [start, end) into their
        slots of `batch.out` (`ExpertBank.pair_outputs`), read from and written to the gateway's
        shared batch when it is on this node."""
        bank, dev = self.banks[layer], self.device
        rows, slots, ids = (torch.from_numpy(a) for a in batch.index[:, start:end])
        weights = batch.weights[start:end]
        with torch.inference_mode():
            if dev.type == "cpu":
                bank.pair_outputs(batch.x, rows, ids, weights, batch.out, slots)
                return
            # Only our rows, through page-locked buffers: non-blocking copies both ways, one wait.
            rows_in, rows_out = self._staging(rows.numel(), batch.x.shape[1], batch.x.dtype)
            torch.index_select(batch.x, 0, rows, out=rows_in)
            xs = rows_in.to(dev, non_blocking=True)
            pairs = torch.arange(rows.numel(), device=dev)
            y = torch.empty_like(xs)
            bank.pair_outputs(xs, pairs, ids.to(dev), weights.to(dev), y, pairs)
            rows_out.copy_(y, non_blocking=True)
            torch.cuda.current_stream(dev).synchronize()
            scatter_rows(batch.out, slots, rows_out)

    def _staging(self, n: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Two page-locked `[n, d]` host buffers (views of ones grown as needed)."""
        have = getattr(self, "_pinned", None)
        if have is None or have.shape[1] < n or have.shape[2] != d or have.dtype != dtype:
            have = self._pinned = torch.empty(2, max(n, 64), d, dtype=dtype, pin_memory=True)
        return have[0, :n], have[1, :n]

    def compute(self, layer: int, x: np.ndarray, expert_ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The Ray-call path: x `[n, d]`, expert_ids `[n, A]` (-1: not here), weights `[n, A]` ->
        weighted sums per row `[n, d]`."""
        dtype, dev = DTYPES[self.cfg.torch_dtype], self.device
        x, ids, w = decode(x, dtype, dev), decode(expert_ids, torch.long, dev), decode(weights, dtype, dev)
        with torch.inference_mode():
            return encode(self.banks[layer](x, ids, w).cpu())
