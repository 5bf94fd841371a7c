"""`nmoe_comm.reference` against naive per-token Python loops, over 1 to 4 simulated ranks.

Data movement and the rule-2 / rule-3 sums are compared bitwise; the float32 dot products of
``grad_gates`` against float64 with a bound derived from the summation length.
Run: ``pytest packages/nmoe-comm/tests/test_reference.py``.
"""

from __future__ import annotations

import pytest
import torch

from nmoe_comm import CapacityError, reference
from nmoe_comm.testing import assert_bitwise_equal, random_routing


def _random_ranks(gen, world_size, num_experts, top_k, hidden, dtype, *, tokens=None,
                  distinct=True, allowed_experts=None):
    """Per-rank inputs; ``tokens`` lists T_r (default: random in [0, 24], one rank at 0)."""
    if tokens is None:
        tokens = torch.randint(0, 25, (world_size,), generator=gen).tolist()
        tokens[int(torch.randint(world_size, (1,), generator=gen))] = 0 if world_size > 1 else 7
    xs, ids, gates = [], [], []
    for num_tokens in tokens:
        xs.append(torch.randn(num_tokens, hidden, generator=gen).to(dtype))
        expert_ids, gate = random_routing(
            num_tokens, top_k, num_experts, generator=gen, distinct=distinct,
            allowed_experts=allowed_experts,
        )
        ids.append(expert_ids)
        gates.append(gate)
    return xs, ids, gates


def _naive_dispatch(xs, ids, gates, num_experts):
    """Per owner: (x_RD, gates_R, counts, [(src, token, slot) per row]) by walking every slot."""
    world_size = len(xs)
    num_local = num_experts // world_size
    result = []
    for owner in range(world_size):
        rows, row_gates, counts, origins = [], [], [], []
        for local_expert in range(num_local):
            count = 0
            for src in range(world_size):
                ids_list = ids[src].tolist()
                for token in range(len(ids_list)):
                    for slot in range(len(ids_list[token])):
                        if ids_list[token][slot] == owner * num_local + local_expert:
                            rows.append(xs[src][token])
                            row_gates.append(gates[src][token, slot].float())
                            origins.append((src, token, slot))
                            count += 1
            counts.append(count)
        hidden = xs[0].shape[1]
        x_RD = torch.stack(rows) if rows else xs[0].new_empty((0, hidden))
        gates_R = torch.stack(row_gates) if row_gates else torch.empty(0)
        result.append((x_RD, gates_R, torch.tensor(counts, dtype=torch.int64), origins))
    return result


def _where_each_slot_went(naive):
    """{(src, token, slot): (owner, row)} from `_naive_dispatch`'s origins."""
    return {
        origin: (owner, row)
        for owner, (_, _, _, origins) in enumerate(naive)
        for row, origin in enumerate(origins)
    }


def _naive_combine(ys, xs, ids, gates, naive):
    """out[t] = g0*y0 + g1*y1 + ... one token at a time, float32, one rounding per op."""
    where = _where_each_slot_went(naive)
    outs = []
    for src in range(len(xs)):
        out = ys[0].new_empty((xs[src].shape[0], ys[0].shape[1]))
        for token in range(xs[src].shape[0]):
            acc = None
            for slot in range(ids[src].shape[1]):
                owner, row = where[(src, token, slot)]
                term = gates[src][token, slot].float() * ys[owner][row].float()
                acc = term if acc is None else acc + term
            out[token] = acc.to(ys[0].dtype)
        outs.append(out)
    return outs


def _expert_fn(expert, x_ND):
    """An elementwise per-expert function with one extra output column (so D' = D + 1).

    Elementwise, so its value for a row does not depend on which other rows share the call:
    the round trip can then be compared bitwise with a per-token evaluation.
    """
    scale = 0.5 + 0.25 * expert
    y = torch.cat([torch.tanh(x_ND.float() * scale), x_ND[:, :1].float() - expert], dim=1)
    return y.to(x_ND.dtype)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("distinct", [True, False])
def test_dispatch_and_combine_match_naive_loops(gen, world_size, dtype, distinct):
    num_experts, top_k, hidden = 2 * world_size + (world_size % 2) * world_size, 3, 20
    xs, ids, gates = _random_ranks(gen, world_size, num_experts, top_k, hidden, dtype,
                                   distinct=distinct)
    received = reference.dispatch(xs, ids, gates, num_experts)
    naive = _naive_dispatch(xs, ids, gates, num_experts)
    for owner, (got, (x_RD, gates_R, counts, origins)) in enumerate(zip(received, naive)):
        assert_bitwise_equal(got.x_RD, x_RD, f"x_RD of rank {owner}")
        assert_bitwise_equal(got.gates_R, gates_R, f"gates_R of rank {owner}")
        assert_bitwise_equal(got.counts_E, counts, f"counts_E of rank {owner}")
        state = got.handle.state
        assert list(zip(state.src_rank_R.tolist(), state.src_token_R.tolist(),
                        state.src_slot_R.tolist())) == origins

    handles = [d.handle for d in received]
    ys = [torch.randn(d.x_RD.shape[0], 9, generator=gen).to(dtype) for d in received]
    for r, (got, want) in enumerate(zip(reference.combine(ys, handles),
                                        _naive_combine(ys, xs, ids, gates, naive))):
        assert_bitwise_equal(got, want, f"combine on rank {r}")

    # Explicit gates (other values, other dtype) replace the handles' gates.
    other_gates = [torch.rand(g.shape, generator=gen).to(torch.bfloat16) for g in gates]
    for r, (got, want) in enumerate(zip(reference.combine(ys, handles, other_gates),
                                        _naive_combine(ys, xs, ids, other_gates, naive))):
        assert_bitwise_equal(got, want, f"combine with explicit gates on rank {r}")


def _naive_owner_sums(rows, xs, ids, gates, naive, num_local):
    """``reduce_on_owner``, one token at a time: per owner (in the order of the token's first
    slot there) the float32 sum of its slots there in slot order (``gate * row``, or the row
    when ``gates`` is None), rounded to the rows' dtype; then those partial sums added."""
    where = _where_each_slot_went(naive)
    outs = []
    for src in range(len(xs)):
        out = rows[0].new_empty((xs[src].shape[0], rows[0].shape[1]))
        for token in range(xs[src].shape[0]):
            owners = [int(e) // num_local for e in ids[src][token].tolist()]
            acc = None
            for owner in dict.fromkeys(owners):  # first-appearance order
                partial = None
                for slot in (k for k, o in enumerate(owners) if o == owner):
                    _, row = where[(src, token, slot)]
                    term = rows[owner][row].float()
                    if gates is not None:
                        term = gates[src][token, slot].float() * term
                    partial = term if partial is None else partial + term
                partial = partial.to(rows[0].dtype).float()
                acc = partial if acc is None else acc + partial
            out[token] = acc.to(rows[0].dtype)
        outs.append(out)
    return outs


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_owner_sums_match_naive_loops(gen, world_size, dtype):
    """``reduce_on_owner=True`` (the sums of an ipc / nvshmem dispatcher built with it): combine
    and dispatch backward bitwise against the per-token definition, tokens with several slots on
    one owner included (K 5 over few ranks); on one rank (every slot on one owner) bitwise the
    per-slot sum, since the one partial sum is rounded once either way."""
    num_local, top_k, hidden = 3, 5, 17
    num_experts = num_local * world_size
    xs, ids, gates = _random_ranks(gen, world_size, num_experts, top_k, hidden, dtype,
                                   distinct=world_size > 1)
    received = reference.dispatch(xs, ids, gates, num_experts)
    naive = _naive_dispatch(xs, ids, gates, num_experts)
    handles = [d.handle for d in received]
    ys = [torch.randn(d.x_RD.shape[0], 9, generator=gen).to(dtype) for d in received]
    grads = [torch.randn(d.x_RD.shape, generator=gen).to(dtype) for d in received]
    combined = reference.combine(ys, handles, reduce_on_owner=True)
    backward = reference.dispatch_backward(grads, handles, reduce_on_owner=True)
    for r, (got, want) in enumerate(zip(combined,
                                        _naive_owner_sums(ys, xs, ids, gates, naive, num_local))):
        assert_bitwise_equal(got, want, f"owner-summed combine on rank {r}")
    for r, (got, want) in enumerate(zip(backward,
                                        _naive_owner_sums(grads, xs, ids, None, naive, num_local))):
        assert_bitwise_equal(got, want, f"owner-summed dispatch_backward on rank {r}")
    if world_size == 1:
        assert_bitwise_equal(combined[0], reference.combine(ys, handles)[0], "one owner")
        assert_bitwise_equal(backward[0], reference.dispatch_backward(grads, handles)[0],
                             "one owner, backward")


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_backward_matches_naive_loops(gen, world_size):
    num_experts, top_k, hidden = 2 * world_size, 2, 24
    dtype = torch.bfloat16
    xs, ids, gates = _random_ranks(gen, world_size, num_experts, top_k, hidden, dtype,
                                   distinct=False)
    received = reference.dispatch(xs, ids, gates, num_experts)
    handles = [d.handle for d in received]
    naive = _naive_dispatch(xs, ids, gates, num_experts)
    where = _where_each_slot_went(naive)

    # dispatch backward = combine with unit gates (multiplying by 1.0 is exact).
    grads = [torch.randn(d.x_RD.shape, generator=gen).to(dtype) for d in received]
    ones = [torch.ones_like(g) for g in gates]
    for r, (got, want) in enumerate(zip(reference.dispatch_backward(grads, handles),
                                        _naive_combine(grads, xs, ids, ones, naive))):
        assert_bitwise_equal(got, want, f"dispatch_backward on rank {r}")

    ys = [torch.randn(d.x_RD.shape[0], 7, generator=gen).to(dtype) for d in received]
    grad_outs = [torch.randn(x.shape[0], 7, generator=gen).to(dtype) for x in xs]
    grad_ys, grad_gates = reference.combine_backward(grad_outs, ys, handles)
    for owner, (_, _, _, origins) in enumerate(naive):
        want = torch.stack([
            gates[src][token, slot].float() * grad_outs[src][token].float()
            for src, token, slot in origins
        ]).to(dtype) if origins else ys[owner].new_empty((0, 7))
        assert_bitwise_equal(grad_ys[owner], want, f"grad_y of rank {owner}")
    for src in range(world_size):
        want = torch.zeros(ids[src].shape, dtype=torch.float64)
        bound = torch.zeros_like(want)
        for token in range(ids[src].shape[0]):
            for slot in range(top_k):
                owner, row = where[(src, token, slot)]
                prods = grad_outs[src][token].double() * ys[owner][row].double()
                want[token, slot] = prods.sum()
                # float32 sum of 7 exact-ish products: |error| <= 7 * 2^-24 * sum |products|
                # (plus one rounding per product), doubled for margin.
                bound[token, slot] = 2 * 8 * 2.0**-24 * prods.abs().sum()
        assert grad_gates[src].dtype == torch.float32
        err = (grad_gates[src].double() - want).abs()
        assert bool((err <= bound).all()), f"grad_gates of rank {src}: max err {err.max()}"


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_round_trip_equals_per_token_moe(gen, world_size):
    """dispatch -> each expert on its contiguous segment -> combine == sum_k g * f_e(x_t)."""
    num_experts, top_k, hidden, dtype = 3 * world_size, 2, 16, torch.bfloat16
    xs, ids, gates = _random_ranks(gen, world_size, num_experts, top_k, hidden, dtype)
    received = reference.dispatch(xs, ids, gates, num_experts)
    ys = []
    for owner, d in enumerate(received):
        offsets = d.offsets_E1.tolist()
        num_local = d.counts_E.numel()
        ys.append(torch.cat([
            _expert_fn(owner * num_local + e, d.x_RD[offsets[e]:offsets[e + 1]])
            for e in range(num_local)
        ]))
    outs = reference.combine(ys, [d.handle for d in received])
    for src in range(world_size):
        want = xs[src].new_empty((xs[src].shape[0], hidden + 1))
        for token in range(xs[src].shape[0]):
            acc = None
            for slot in range(top_k):
                y = _expert_fn(int(ids[src][token, slot]), xs[src][token:token + 1])[0]
                term = gates[src][token, slot] * y.float()
                acc = term if acc is None else acc + term
            want[token] = acc.to(dtype)
        assert_bitwise_equal(outs[src], want, f"MoE output of rank {src}")


def test_rank_receiving_no_rows(gen):
    """W = 4, routing avoids rank 2's experts: rank 2 receives R = 0 and still takes part."""
    world_size, num_experts, top_k, hidden = 4, 8, 2, 12
    allowed = torch.tensor([0, 1, 2, 3, 6, 7])
    xs, ids, gates = _random_ranks(gen, world_size, num_experts, top_k, hidden, torch.float32,
                                   tokens=[9, 5, 7, 11], allowed_experts=allowed)
    received = reference.dispatch(xs, ids, gates, num_experts)
    assert received[2].x_RD.shape == (0, hidden)
    assert received[2].counts_E.tolist() == [0, 0]
    naive = _naive_dispatch(xs, ids, gates, num_experts)
    for owner in range(world_size):
        assert_bitwise_equal(received[owner].x_RD, naive[owner][0], f"x_RD of rank {owner}")
    ys = [d.x_RD * 2 for d in received]
    handles = [d.handle for d in received]
    for r, (got, want) in enumerate(zip(reference.combine(ys, handles),
                                        _naive_combine(ys, xs, ids, gates, naive))):
        assert_bitwise_equal(got, want, f"combine on rank {r}")
    grad_ys, _ = reference.combine_backward(xs, ys, handles)
    assert grad_ys[2].shape == (0, hidden)


def test_capacity_boundary(gen):
    world_size, num_experts = 3, 6
    xs, ids, gates = _random_ranks(gen, world_size, num_experts, 2, 8, torch.float32,
                                   tokens=[10, 4, 7])
    counts = [int(d.counts_E.sum()) for d in reference.dispatch(xs, ids, gates, num_experts)]
    most = max(counts)
    exact = reference.dispatch(xs, ids, gates, num_experts, capacity=most)
    assert [int(d.counts_E.sum()) for d in exact] == counts
    with pytest.raises(CapacityError, match=f"routes {most} rows") as info:
        reference.dispatch(xs, ids, gates, num_experts, capacity=most - 1)
    assert info.value.rank == counts.index(most)
    assert info.value.rows_needed == most


def test_deterministic(gen):
    xs, ids, gates = _random_ranks(gen, 3, 9, 4, 33, torch.bfloat16, distinct=False)
    first = reference.dispatch(xs, ids, gates, 9)
    second = reference.dispatch(xs, ids, gates, 9)
    ys = [torch.randn(d.x_RD.shape, generator=gen).to(torch.bfloat16) for d in first]
    for r in range(3):
        assert_bitwise_equal(first[r].x_RD, second[r].x_RD, f"x_RD of rank {r}")
    out_a = reference.combine(ys, [d.handle for d in first])
    out_b = reference.combine(ys, [d.handle for d in second])
    for r in range(3):
        assert_bitwise_equal(out_a[r], out_b[r], f"combine on rank {r}")


def test_bad_arguments_are_named(gen):
    xs, ids, gates = _random_ranks(gen, 2, 4, 2, 8, torch.float32, tokens=[3, 5])
    with pytest.raises(ValueError, match="expert_ids has 1 entries"):
        reference.dispatch(xs, ids[:1], gates, 4)
    with pytest.raises(ValueError, match="num_experts=5"):
        reference.dispatch(xs, ids, gates, 5)
    with pytest.raises(ValueError, match="expert_ids_TK holds expert id 4"):
        reference.dispatch(xs, [ids[0], ids[1] * 0 + 4], gates, 4)
    with pytest.raises(ValueError, match="rank 1 has K=2, D=9"):
        reference.dispatch([xs[0], torch.zeros(5, 9)], ids, gates, 4)
    received = reference.dispatch(xs, ids, gates, 4)
    with pytest.raises(ValueError, match=r"ys\[1\] has"):
        reference.combine([received[0].x_RD, received[1].x_RD[1:]], [d.handle for d in received])
    with pytest.raises(ValueError, match=r"handles\[0\]"):
        reference.combine([d.x_RD for d in received], [received[1].handle, received[0].handle])
    handles = [d.handle for d in received]
    with pytest.raises(ValueError, match=r"grads\[0\] has 7 columns, expected 8"):
        reference.dispatch_backward([d.x_RD[:, :7] for d in received], handles)
    with pytest.raises(ValueError, match="gates_TK has shape"):
        reference.combine([d.x_RD for d in received], handles, [gates[0], gates[1][:, :1]])
    with pytest.raises(ValueError, match=r"grad_outs\[1\] has 4 rows, expected 5"):
        reference.combine_backward([xs[0], xs[1][1:]], [d.x_RD for d in received], handles)
