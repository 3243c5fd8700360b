"""The golden fixture on a CUDA device (run by scripts/gpu_check.sh on a GPU machine). float32 on
the GPU takes other kernels than the CPU, so logits are held to 1e-3 there, tokens exactly."""

from __future__ import annotations

import pytest
import torch
from recording import RecordingEngine

from gateway.engine import EngineLimits, local_engine
from gateway.sampling import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (scripts/gpu_check.sh)"),
]
CUDA_LOGIT_TOL = 1e-3


@pytest.mark.parametrize("budget", [7, 256])
def test_golden_on_cuda(fixture_dir, golden, golden_tensors, budget):
    ref = local_engine(str(fixture_dir), device="cuda")
    assert ref.cache.k.is_cuda
    eng = RecordingEngine(ref.model, ref.dispatcher, EngineLimits(max_num_batched_tokens=budget))
    params = SamplingParams(max_tokens=16, ignore_eod=True)
    seqs = eng.generate([c["prompt_ids"] for c in golden["cases"]], params)
    for seq, case in zip(seqs, golden["cases"]):
        assert seq.output_ids == case["generated_ids"], f"case {case['index']}: tokens on CUDA"
        got = torch.stack(eng.logits[seq.request_id])
        err = (got - golden_tensors[f"case{case['index']}.logits"][:16]).abs().max().item()
        assert err <= CUDA_LOGIT_TOL, f"case {case['index']}: max |logit - golden| = {err} on CUDA"
