"""On a GPU: cached generation equals re-forward decoding (float32), and bf16 scoring agrees
with float32 CPU scoring.

Tolerance for bf16: the forward rounds activations to bf16 (2^-8 relative) at every layer of a
2-layer model; per-token log-probabilities then move by ~1e-2 nats, so summed NLLs are compared
with 5e-2 nats per token, and accuracies are not compared (a near-tie may flip).
"""

from __future__ import annotations

import random

import pytest
import torch

from nmoe_core.generate import generate
from nmoe_eval.scoring import ScoreRequest, score_requests

pytestmark = pytest.mark.gpu


def test_generation_on_gpu_matches_reforward(seed, tiny_model):
    model = tiny_model.cuda()
    rng = random.Random(seed)
    prompts = [[rng.randrange(50000) for _ in range(n)] for n in (3, 17, 9)]
    got = generate(model, prompts, 20)
    for prompt, row in zip(prompts, got, strict=True):
        seq, want = list(prompt), []
        for _ in range(20):
            with torch.no_grad():
                hidden = model(torch.tensor([seq], device="cuda")).hidden[:, -1]
            token = int((hidden.float() @ model.head.weight.float().T).argmax())
            want.append(token)
            seq.append(token)
        assert row == want, f"seed {seed}"


def test_bf16_scoring_close_to_fp32_cpu(seed, tiny_model):
    rng = random.Random(seed)
    requests = []
    for _ in range(16):
        n = rng.randrange(4, 200)
        tokens = tuple(rng.randrange(50000) for _ in range(n))
        requests.append(ScoreRequest(tokens, rng.randrange(1, n), n))
    cpu = score_requests(tiny_model, requests, pad_id=50256, device="cpu")
    gpu = score_requests(tiny_model.cuda(), requests, pad_id=50256, device="cuda",
                         autocast_dtype=torch.bfloat16)
    for a, b in zip(cpu, gpu, strict=True):
        assert abs(a.nll - b.nll) <= 5e-2 * a.num_tokens, f"{a.nll} vs {b.nll}, seed {seed}"
