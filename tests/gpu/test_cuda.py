"""The golden fixture on a CUDA device (run by scripts/gpu_check.sh on a GPU machine). float32 on
the GPU takes other kernels than the CPU, so logits are held to 1e-3 there, tokens exactly."""

from __future__ import annotations

import math

import pytest
import torch
from recording import RecordingEngine

from gateway.engine import EngineLimits, local_engine
from gateway.sampling import SamplingParams, sample

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


def test_sampling_cuda_logits_as_on_the_host():
    """Greedy rows take the GPU's argmax (only the ids come back); sampled rows come to the host for
    their requests' CPU generators: the same tokens as the same logits sampled on the CPU."""
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    params = [
        SamplingParams(temperature=0.0 if i % 2 == 0 else 0.9, top_p=0.95, top_k=50 * i, seed=i)
        for i in range(6)
    ]
    on_host = sample(logits, params, [p.generator() for p in params])
    on_cuda = sample(logits.cuda(), params, [p.generator() for p in params])
    assert on_cuda == on_host


def test_cuda_engine_samples_and_reports_logprobs(fixture_dir, golden):
    """Seeded sampling and logprobs on a CUDA engine: every request ends with its tokens, and the
    logprobs (computed on the GPU) are finite and no higher than 0."""
    eng = local_engine(str(fixture_dir), device="cuda")
    prompts = [c["prompt_ids"] for c in golden["cases"]][:3]
    params = [
        SamplingParams(max_tokens=8, temperature=0.8, seed=7, ignore_eod=True),
        SamplingParams(max_tokens=8, logprobs=3, ignore_eod=True),
        SamplingParams(max_tokens=8, temperature=1.0, top_k=5, seed=9, logprobs=2, ignore_eod=True),
    ]
    seqs = [eng.add(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
    while eng.has_work:
        eng.step()
    vocab = eng.model.cfg.vocab_size
    for seq in seqs:
        assert seq.error is None and len(seq.output_ids) == 8
        assert all(0 <= t < vocab for t in seq.output_ids)
    for seq in seqs[1:]:
        assert len(seq.logprobs) == 8
        assert all(lp <= 0.0 and math.isfinite(lp) for lp, _ in seq.logprobs)
