"""Weights moved into huge pages keep their values and their Parameter objects, and the OS really
backs them with huge pages where transparent huge pages are on (checked in /proc/self/smaps)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import pages
from model.checkpoint import load_experts, load_model, write_random_checkpoint
from model.config import preset

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_on() -> bool:
    return THP.exists() and "[never]" not in THP.read_text()


def _huge_kb_at(address: int) -> int:
    """AnonHugePages (kB) of the mapping of this process that holds `address`."""
    kb, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            kb = int(line.split()[1])
    return kb


def test_to_huge_pages_keeps_parameters_and_values():
    module = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 3, bias=False))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    objects = {n: p for n, p in module.named_parameters()}
    moved = pages.to_huge_pages(module)
    if pages.huge_empty(1) is None:
        pytest.skip("this OS or Python cannot ask for huge pages (no MADV_HUGEPAGE)")
    assert moved >= sum(p.numel() * 4 for p in before.values())
    for n, p in module.named_parameters():
        assert p is objects[n], "the Parameter object is kept (references to it stay valid)"
        assert torch.equal(p, before[n])
        assert p.data_ptr() % pages.ALIGN == 0
    first = next(module.parameters())
    assert first.data_ptr() % pages.HUGE_PAGE == 0, "the region starts on a huge-page boundary"
    out = module(torch.randn(2, 512))  # still a working module
    assert out.shape == (2, 3)


@pytest.mark.skipif(not _thp_on(), reason="transparent huge pages are off on this machine")
def test_loaded_weights_are_backed_by_huge_pages(tmp_path):
    """A loaded model's and its experts' weights sit in huge pages (the kernel's own count)."""
    if pages.huge_empty(1) is None:
        pytest.skip("this OS or Python cannot ask for huge pages (no MADV_HUGEPAGE)")
    cfg = preset("small").with_(num_layers=1)
    model, reader = load_model(str(write_random_checkpoint(cfg, tmp_path / "m", seed=0)))
    (bank,) = load_experts(reader, cfg, list(range(cfg.num_experts)))
    for name, t in (("embed", model.embed.weight), ("expert w1", bank.w1)):
        assert _huge_kb_at(t.data_ptr()) >= 2048, f"{name}: no huge page behind it"
    attn = model.layers[0].attn
    wqk = attn._wqk.get(attn.q_proj.weight, attn.k_proj.weight)
    assert _huge_kb_at(wqk.data_ptr()) >= 2048, "a derived weight of 2 MB: no huge page behind it"
