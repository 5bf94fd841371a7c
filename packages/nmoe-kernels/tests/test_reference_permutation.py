"""permute / unpermute references against plain Python loops, bitwise."""

from __future__ import annotations

import pytest
import torch

from nmoe_kernels import reference as ref


def loop_permute(x, expert_ids, num_experts):
    num_tokens, top_k = expert_ids.shape
    rows, sources, counts = [], [], [0] * num_experts
    for expert in range(num_experts):
        for t in range(num_tokens):
            for k in range(top_k):
                if int(expert_ids[t, k]) == expert:
                    rows.append(x[t])
                    sources.append(t * top_k + k)
                    counts[expert] += 1
    x_rows = torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])
    return x_rows, torch.tensor(counts), torch.tensor(sources, dtype=torch.int64)


def loop_unpermute(y, src_index, gates, num_tokens, out_dtype):
    top_k = gates.shape[1]
    row_of_slot = {int(s): r for r, s in enumerate(src_index)}
    out = torch.zeros(num_tokens, y.shape[1], dtype=out_dtype)
    for t in range(num_tokens):
        acc = None
        for k in range(top_k):
            r = row_of_slot.get(t * top_k + k)
            if r is None:
                continue
            product = gates[t, k].float() * y[r].float()
            acc = product if acc is None else acc + product
        if acc is not None:
            out[t] = acc.to(out_dtype)
    return out


def routing_cases():
    num_tokens, top_k, num_experts = 37, 4, 6
    random_ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)])
    one_expert = torch.full((num_tokens, 1), 2)
    repeated = torch.randint(0, 3, (num_tokens, 2))  # a token may pick one expert twice
    return [
        ("random", random_ids, num_experts),
        ("all_on_one", one_expert, 5),
        ("repeated", repeated, 4),
    ]


@pytest.mark.parametrize("name,expert_ids,num_experts", routing_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_and_unpermute_match_loops(name, expert_ids, num_experts, dtype):
    num_tokens, top_k = expert_ids.shape
    x = torch.randn(num_tokens, 24).to(dtype)
    x_rows, counts, src_index = ref.permute(x, expert_ids.int(), num_experts)
    want_rows, want_counts, want_src = loop_permute(x, expert_ids, num_experts)
    assert torch.equal(x_rows, want_rows), name
    assert torch.equal(counts, want_counts) and torch.equal(src_index, want_src)
    assert counts.shape == (num_experts,)
    if name != "random":  # these layouts leave at least one expert without rows
        assert (counts == 0).any()

    y = torch.randn(x_rows.shape[0], 24).to(dtype)
    gates = torch.rand(num_tokens, top_k)
    got = ref.unpermute(y, src_index, gates, num_tokens)
    assert torch.equal(got, loop_unpermute(y, src_index, gates, num_tokens, dtype))
    got32 = ref.unpermute(y, src_index, gates, num_tokens, out_dtype=torch.float32)
    assert torch.equal(got32, loop_unpermute(y, src_index, gates, num_tokens, torch.float32))


def test_unpermute_with_missing_slots_and_empty_tokens():
    num_tokens, top_k = 9, 3
    kept = torch.randperm(num_tokens * top_k)[:11]
    y = torch.randn(11, 8)
    gates = torch.randn(num_tokens, top_k)
    got = ref.unpermute(y, kept, gates, num_tokens)
    assert torch.equal(got, loop_unpermute(y, kept, gates, num_tokens, torch.float32))


def test_permute_unpermute_round_trip_with_unit_gates_is_exact():
    x = torch.randn(20, 16, dtype=torch.bfloat16)
    ids = torch.randint(0, 5, (20, 1))
    rows, _, src = ref.permute(x, ids, 5)
    assert torch.equal(ref.unpermute(rows, src, torch.ones(20, 1), 20), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_gather_rows_matches_loop(dtype):
    x = torch.randn(13, 10).to(dtype)
    index = torch.randint(0, 13, (40,))  # repeats allowed
    for idx in (index, index.int(), index[:0]):
        got = ref.gather_rows(x, idx)
        want = torch.stack([x[int(i)] for i in idx]) if idx.numel() else x[:0]
        assert got.dtype == dtype and torch.equal(got, want)


def test_bad_routing_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        ref.permute(x, torch.tensor([[0], [1], [2], [3]]), 3)
    with pytest.raises(ValueError, match="int32 or int64"):
        ref.permute(x, torch.zeros(4, 1), 3)
    with pytest.raises(ValueError, match="must not repeat"):
        ref.unpermute(torch.randn(2, 8), torch.tensor([1, 1]), torch.ones(4, 1), 4)
    with pytest.raises(ValueError, match=r"T\*K=4"):
        ref.unpermute(torch.randn(1, 8), torch.tensor([4]), torch.ones(4, 1), 4)
    with pytest.raises(ValueError, match=r"\[0, T=4\)"):
        ref.gather_rows(x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="1-D int32 or int64"):
        ref.gather_rows(x, torch.zeros(3))
