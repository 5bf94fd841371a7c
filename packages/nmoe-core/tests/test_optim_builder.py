"""build_optimizer: the parameter partition, equality with hand-built torch optimizers, the WSD
schedule, config validation, and an exact save/load round trip through safetensors."""

from __future__ import annotations

import itertools

import pytest
import torch
from pydantic import ValidationError

from nmoe_core.optim import (
    Muon,
    OptimizerConfig,
    build_optimizer,
    wsd_lr,
    wsd_scale,
)
from nmoe_core.weights import (
    flatten_optimizer_state,
    load_state,
    save_state,
    unflatten_optimizer_state,
)

D, F, E, V = 16, 8, 4, 40


def _fake_param_kinds(seed: int) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """A small model's ``param_kinds()``: every kind, a fused W13 stack with 2 column blocks."""
    g = torch.Generator().manual_seed(seed)

    def p(*shape):
        return torch.nn.Parameter(torch.randn(*shape, generator=g))

    w13 = p(E, D, 2 * F)
    w13.muon_col_blocks = 2
    return {
        "matrix": [("layers.0.attn.wq", p(D, D)), ("layers.0.attn.wo", p(D, D)),
                   ("layers.0.mlp.w1", p(2 * F, D)), ("layers.1.shared.w2", p(D, F))],
        "expert": [("layers.1.experts.w13", w13), ("layers.1.experts.w2", p(E, F, D))],
        "router": [("layers.1.router.weight", p(E, D))],
        "embedding": [("embed.weight", p(V, D))],
        "head": [("head.weight", p(V, D))],
        "vector": [("layers.0.attn_norm.weight", p(D)), ("norm.weight", p(D)),
                   ("layers.0.attn.bias", p(D))],
    }


def _clone_kinds(kinds):
    out = {}
    for kind, named in kinds.items():
        out[kind] = []
        for name, p in named:
            q = torch.nn.Parameter(p.detach().clone())
            if hasattr(p, "muon_col_blocks"):
                q.muon_col_blocks = p.muon_col_blocks
            out[kind].append((name, q))
    return out


def _params(kinds):
    return [p for named in kinds.values() for _, p in named]


def _set_grads(kinds, seed):
    g = torch.Generator().manual_seed(seed)
    for p in _params(kinds):
        p.grad = torch.randn(p.shape, generator=g).to(p.device)


CFG = dict(lr_dense=1e-3, lr_expert=2e-3, lr_router=3e-3, lr_muon=4e-3, weight_decay=0.05,
           muon_weight_decay=0.07, adam_beta1=0.8, adam_beta2=0.9, adam_beta2_expert=0.97,
           adam_eps=1e-7, warmup_steps=3, hold_tokens=1000, decay_tokens=2000, decay_floor=1e-4)


def _expected(cfg: OptimizerConfig):
    """kind -> (optimizer class, group name, lr, wd, betas or None): the documented table."""
    b, be = (cfg.adam_beta1, cfg.adam_beta2), (cfg.adam_beta1, cfg.adam_beta2_expert)
    table = {
        "router": (torch.optim.AdamW, "router", cfg.lr_router, 0.0, b),
        "embedding": (torch.optim.AdamW, "dense_no_decay", cfg.lr_dense, 0.0, b),
        "head": (torch.optim.AdamW, "dense_no_decay", cfg.lr_dense, 0.0, b),
        "vector": (torch.optim.AdamW, "vector", cfg.lr_dense, 0.0, b),
    }
    table["matrix"] = ((Muon, "matrix", cfg.lr_muon, cfg.muon_weight_decay, None) if cfg.use_muon
                       else (torch.optim.AdamW, "dense", cfg.lr_dense, cfg.weight_decay, b))
    table["expert"] = ((Muon, "expert", cfg.lr_expert, cfg.weight_decay, None)
                       if cfg.expert_optimizer == "muon"
                       else (torch.optim.AdamW, "expert", cfg.lr_expert, cfg.weight_decay, be))
    return table


@pytest.mark.parametrize("use_muon,expert_optimizer",
                         list(itertools.product([True, False], ["adamw", "muon"])))
def test_every_param_in_exactly_one_right_group(use_muon, expert_optimizer):
    seed = torch.seed()
    cfg = OptimizerConfig(**CFG, use_muon=use_muon, expert_optimizer=expert_optimizer)
    kinds = _fake_param_kinds(seed)
    opts = build_optimizer(kinds, cfg)
    where: dict[int, list] = {}
    for key, group in opts.groups:
        opt = opts.optimizers[key]
        for p in group["params"]:
            where.setdefault(id(p), []).append((type(opt), group))
    table = _expected(cfg)
    for kind, named in kinds.items():
        cls, name, lr, wd, betas = table[kind]
        for pname, p in named:
            hits = where.get(id(p), [])
            assert len(hits) == 1, f"{pname} is in {len(hits)} groups"
            got_cls, group = hits[0]
            assert got_cls is cls and group["name"] == name, (pname, got_cls, group["name"])
            assert group["lr"] == lr and group["peak_lr"] == lr, (pname, group["lr"])
            assert group["weight_decay"] == wd, (pname, group["weight_decay"])
            if betas is None:
                assert group["momentum"] == cfg.muon_momentum
                assert group["update_rms"] == cfg.muon_update_rms
                assert group["ns_steps"] == cfg.muon_ns_steps
            else:
                assert tuple(group["betas"]) == betas and group["eps"] == cfg.adam_eps
    assert len(where) == sum(len(v) for v in kinds.values())


def test_matches_hand_built_torch_optimizers():
    seed = torch.seed()
    cfg = OptimizerConfig(**CFG)
    kinds = _fake_param_kinds(seed)
    ref = _clone_kinds(kinds)
    opts = build_optimizer(kinds, cfg)

    b = (cfg.adam_beta1, cfg.adam_beta2)
    adamw = torch.optim.AdamW(
        [
            {"params": [p for _, p in ref["expert"]], "lr": cfg.lr_expert,
             "weight_decay": cfg.weight_decay, "betas": (cfg.adam_beta1, cfg.adam_beta2_expert)},
            {"params": [p for _, p in ref["embedding"] + ref["head"]], "lr": cfg.lr_dense,
             "weight_decay": 0.0, "betas": b},
            {"params": [p for _, p in ref["vector"]], "lr": cfg.lr_dense, "weight_decay": 0.0,
             "betas": b},
            {"params": [p for _, p in ref["router"]], "lr": cfg.lr_router, "weight_decay": 0.0,
             "betas": b},
        ],
        eps=cfg.adam_eps,
    )
    muon = Muon([p for _, p in ref["matrix"]], lr=cfg.lr_muon, momentum=cfg.muon_momentum,
                weight_decay=cfg.muon_weight_decay, update_rms=cfg.muon_update_rms)
    for step in range(3):
        _set_grads(kinds, seed + step)
        _set_grads(ref, seed + step)
        opts.step()
        adamw.step()
        muon.step()
    for (kind, named), (_, ref_named) in zip(kinds.items(), ref.items()):
        for (name, p), (_, q) in zip(named, ref_named):
            assert torch.equal(p.detach(), q.detach()), f"seed={seed} {kind} {name}"
    opts.zero_grad()
    assert all(p.grad is None for p in _params(kinds))


def test_set_lr_applies_wsd_to_every_group():
    cfg = OptimizerConfig(**CFG)
    opts = build_optimizer(_fake_param_kinds(0), cfg)
    sched = (cfg.warmup_steps, cfg.hold_tokens, cfg.decay_tokens)
    peaks = {"matrix": cfg.lr_muon, "expert": cfg.lr_expert, "router": cfg.lr_router,
             "dense_no_decay": cfg.lr_dense, "vector": cfg.lr_dense}
    # (step, tokens): warmup start, warmup end, hold, mid-decay, end of decay.
    for step, tokens in [(0, 0), (2, 300), (3, 400), (10, 1000), (20, 2000), (40, 3000)]:
        lrs = opts.set_lr(step, tokens)
        assert lrs["router_lr_scale"] == wsd_scale(step, tokens, *sched)
        for _, group in opts.groups:
            peak = peaks[group["name"]]
            want = wsd_lr(peak, min(cfg.decay_floor, peak), step, tokens, *sched)
            assert group["lr"] == want == lrs[group["name"]], (step, tokens, group["name"])
    assert all(lrs[name] == cfg.decay_floor for name in peaks)  # past the decay: the floor
    mid = opts.set_lr(10, cfg.hold_tokens + cfg.decay_tokens / 3)  # cos(pi/3) = 1/2
    want_mid = cfg.decay_floor + 0.75 * (cfg.lr_expert - cfg.decay_floor)
    assert mid["expert"] == pytest.approx(want_mid, rel=1e-15)


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_save_load_through_safetensors_resumes_bitwise(tmp_path, state_dtype):
    seed = torch.seed()
    cfg = OptimizerConfig(**CFG, expert_optimizer="muon", adamw_state_dtype=state_dtype)
    kinds_a = _fake_param_kinds(seed)
    kinds_b = _clone_kinds(kinds_a)
    straight = build_optimizer(kinds_a, cfg)
    first = build_optimizer(kinds_b, cfg)
    for step in range(2):
        for kinds, opts in ((kinds_a, straight), (kinds_b, first)):
            _set_grads(kinds, seed + step)
            opts.set_lr(step, step * 100)
            opts.step()

    tensors, meta = flatten_optimizer_state(first.state_dict())
    model = {name: p.detach() for named in kinds_b.values() for name, p in named}
    save_state(tmp_path / "opt.safetensors", tensors, {"optimizer": meta})
    save_state(tmp_path / "model.safetensors", model)
    loaded, metadata = load_state(tmp_path / "opt.safetensors")
    model_loaded, _ = load_state(tmp_path / "model.safetensors")

    kinds_c = _clone_kinds(kinds_b)
    for named in kinds_c.values():
        for name, p in named:
            p.data.copy_(model_loaded[name])
    resumed = build_optimizer(kinds_c, cfg)
    resumed.load_state_dict(unflatten_optimizer_state(loaded, metadata["optimizer"]))
    assert "momentum_buffer" in next(iter(resumed.muon.state.values()))
    moments = [s[k] for s in resumed.adamw.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert moments and {m.dtype for m in moments} == {getattr(torch, state_dtype)}
    for step in range(2, 4):
        for kinds, opts in ((kinds_a, straight), (kinds_c, resumed)):
            _set_grads(kinds, seed + step)
            opts.set_lr(step, step * 100)
            opts.step()
    for (name, p), (_, q) in zip(
        (x for v in kinds_a.values() for x in v), (x for v in kinds_c.values() for x in v)
    ):
        assert torch.equal(p.detach(), q.detach()), f"seed={seed} {name}"


@pytest.mark.parametrize("use_muon,state_dtype", [(True, "float32"), (False, "float32"),
                                                   (True, "bfloat16")])
def test_state_bytes_are_known_before_the_first_step(use_muon, state_dtype):
    kinds = _fake_param_kinds(torch.seed())
    opts = build_optimizer(kinds, OptimizerConfig(**CFG, use_muon=use_muon,
                                                  adamw_state_dtype=state_dtype))
    planned = opts.state_bytes()
    assert set(planned) == set(opts.optimizers)
    _set_grads(kinds, 0)
    opts.set_lr(0, 0)
    opts.step()
    for key, opt in opts.optimizers.items():
        actual = sum(v.numel() * v.element_size() for st in opt.state.values()
                     for k, v in st.items() if k != "step")
        assert planned[key] == actual, key
    adamw_numel = sum(p.numel() for g in opts.adamw.param_groups for p in g["params"])
    assert planned["adamw"] == adamw_numel * (8 if state_dtype == "float32" else 4)


def test_load_state_dict_rejects_other_partition():
    kinds = _fake_param_kinds(0)
    saved = build_optimizer(kinds, OptimizerConfig(**CFG, use_muon=False)).state_dict()
    with pytest.raises(ValueError, match="use_muon"):
        build_optimizer(kinds, OptimizerConfig(**CFG)).load_state_dict(saved)
    renamed = _clone_kinds(kinds)
    renamed["vector"][0] = ("layers.0.ffn_norm.weight", renamed["vector"][0][1])
    saved = build_optimizer(kinds, OptimizerConfig(**CFG)).state_dict()
    with pytest.raises(ValueError, match="ffn_norm"):
        build_optimizer(renamed, OptimizerConfig(**CFG)).load_state_dict(saved)


def test_summary_lines_count_params():
    kinds = _fake_param_kinds(0)
    opts = build_optimizer(kinds, OptimizerConfig(**CFG))
    lines = opts.param_groups_summary()
    assert len(lines) == len(opts.groups)
    for line, (_, group) in zip(lines, opts.groups):
        numel = sum(p.numel() for p in group["params"])
        assert group["name"] in line and f"params={numel:,}" in line
        assert f"tensors={len(group['params'])}" in line
    assert sum(len(g["params"]) for _, g in opts.groups) == len(_params(kinds))


def test_bad_param_kinds_are_named():
    kinds = _fake_param_kinds(0)
    with pytest.raises(ValueError, match="unknown kind"):
        build_optimizer({**kinds, "bias": []}, OptimizerConfig())
    dup = {**kinds, "vector": kinds["vector"] + [("again", kinds["matrix"][0][1])]}
    with pytest.raises(ValueError, match="again"):
        build_optimizer(dup, OptimizerConfig())
    flat = {**kinds, "expert": [("experts.w2", torch.nn.Parameter(torch.randn(4, 4)))]}
    with pytest.raises(ValueError, match="experts.w2"):
        build_optimizer(flat, OptimizerConfig())


def test_config_errors_name_the_field():
    with pytest.raises(ValidationError, match="lr_expert"):
        OptimizerConfig(lr_expert=0)
    with pytest.raises(ValidationError, match="lr_denes"):
        OptimizerConfig(lr_denes=1e-3)
    with pytest.raises(ValidationError, match="decay_floor.*lr_router"):
        OptimizerConfig(lr_router=1e-5, decay_floor=3e-5)
    with pytest.raises(ValidationError, match="grad_clip=None"):
        OptimizerConfig(grad_clip=0.0)
    with pytest.raises(ValidationError, match="expert_optimizer"):
        OptimizerConfig(expert_optimizer="sgd")
    # lr_muon only bounds the floor when Muon is in use.
    assert OptimizerConfig(use_muon=False, lr_muon=1e-6).lr_muon == 1e-6


@pytest.mark.gpu
def test_cuda_uses_the_adamw_kernel_and_resumes_bitwise(tmp_path):
    from nmoe_core.optim.adamw import AdamW

    seed = torch.seed()
    cfg = OptimizerConfig(**CFG)
    kinds_a = _fake_param_kinds(seed)
    for named in kinds_a.values():
        for _, p in named:
            p.data = p.data.cuda()
    kinds_b = _clone_kinds(kinds_a)
    straight, first = build_optimizer(kinds_a, cfg), build_optimizer(kinds_b, cfg)
    assert isinstance(straight.adamw, AdamW), type(straight.adamw)  # nmoe_kernels.adamw_step_
    assert straight.adamw.defaults["state_dtype"] == torch.float32
    for step in range(4):
        for kinds, opts in ((kinds_a, straight), (kinds_b, first)):
            if opts is first and step >= 2:
                continue
            _set_grads(kinds, seed + step)
            opts.set_lr(step, step * 100)
            opts.step()
    tensors, meta = flatten_optimizer_state(first.state_dict())
    save_state(tmp_path / "opt.safetensors", tensors, {"optimizer": meta})
    loaded, metadata = load_state(tmp_path / "opt.safetensors", device="cuda")
    first.load_state_dict(unflatten_optimizer_state(loaded, metadata["optimizer"]))
    for step in range(2, 4):
        _set_grads(kinds_b, seed + step)
        first.set_lr(step, step * 100)
        first.step()
    for p, q in zip(_params(kinds_a), _params(kinds_b)):
        assert torch.equal(p.detach(), q.detach()), f"seed={seed}"


def _states(opts) -> list[torch.Tensor]:
    out = []
    for opt in opts.optimizers.values():
        for group in opt.param_groups:
            for p in group["params"]:
                out += [v for k, v in sorted(opt.state[p].items()) if k != "step"]
    return out


def _twin_optimizers(monkeypatch, fused: bool):
    """``(seed, kinds, ref_kinds, opts, ref_opts)``: two optimizers over equal fresh parameters
    (torch's fused AdamW on the CPU when ``fused``)."""
    seed = torch.seed()
    if fused:
        monkeypatch.setattr("nmoe_core.optim.builder._adamw_kwargs", lambda _: {"fused": True})
    cfg = OptimizerConfig(**CFG)
    kinds = _fake_param_kinds(seed)
    ref = _clone_kinds(kinds)
    return seed, kinds, ref, build_optimizer(kinds, cfg), build_optimizer(ref, cfg)


@pytest.mark.parametrize("fused", [False, True])
def test_grad_coef_equals_multiplying_the_gradients(monkeypatch, fused):
    # Optimizers.step(grad_coef=c) against stepping on c * g (the old clipping: mul_ then step).
    # fused=True runs torch's fused AdamW on the CPU, the kernel CUDA runs use: c reaches it as
    # grad_scale = 1 / c (no foreach pass), so each gradient is g / fl32(1 / c) instead of
    # g * fl32(c): 2 float32 roundings, <= 3e-7 relative; Muon folds c into its momentum
    # increment, a few roundings as well. Moments: measured <= 3e-7 of their size, bound 1e-5.
    # Parameters (randn, |p| up to ~5 in float32): measured <= 1 ulp; bound 4 ulp of the
    # tensor's largest entry plus 1e-5 of 3 steps of size lr.
    seed, kinds, ref, opts, ref_opts = _twin_optimizers(monkeypatch, fused)
    assert bool(opts.adamw.defaults["fused"]) is fused
    foreach_calls = []
    real_foreach_mul = torch._foreach_mul_

    def counting_foreach_mul(*args):
        foreach_calls.append(len(args[0]))
        return real_foreach_mul(*args)

    for step in range(3):
        coef = torch.rand((), dtype=torch.float64) * 0.9 + 0.05
        _set_grads(kinds, seed + step)
        _set_grads(ref, seed + step)
        for p in _params(ref):
            p.grad.mul_(float(coef))
        monkeypatch.setattr(torch, "_foreach_mul_", counting_foreach_mul)
        opts.step(grad_coef=coef)
        monkeypatch.setattr(torch, "_foreach_mul_", real_foreach_mul)
        ref_opts.step()
        assert getattr(opts.adamw, "grad_scale", None) is None
    assert not foreach_calls if fused else foreach_calls, foreach_calls
    for i, (a, b) in enumerate(zip(_states(opts), _states(ref_opts), strict=True)):
        err = (a - b).abs().max().item()
        assert err <= 1e-5 * b.abs().max().item(), f"seed={seed} state {i} err {err:.3g}"
    cfg = OptimizerConfig(**CFG)
    lr = max(cfg.lr_muon, cfg.lr_dense, cfg.lr_expert, cfg.lr_router)
    for p, q in zip(_params(kinds), _params(ref)):
        err = (p - q).detach().abs().max().item()
        bound = 4 * 2**-23 * max(1.0, q.detach().abs().max().item()) + 1e-5 * 3 * lr
        assert err <= bound, f"seed={seed} param err {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("fused", [False, True])
def test_grad_coef_of_one_is_bitwise_the_plain_step(monkeypatch, fused):
    seed, kinds, ref, opts, ref_opts = _twin_optimizers(monkeypatch, fused)
    for step in range(3):
        _set_grads(kinds, seed + step)
        _set_grads(ref, seed + step)
        opts.step(grad_coef=torch.ones((), dtype=torch.float64))
        ref_opts.step()
    for p, q in zip(_params(kinds), _params(ref)):
        assert torch.equal(p.detach(), q.detach()), f"seed={seed}"
    for a, b in zip(_states(opts), _states(ref_opts), strict=True):
        assert torch.equal(a, b), f"seed={seed}"


def test_grad_coef_must_be_a_device_scalar():
    opts = build_optimizer({"vector": [("norm.weight", torch.nn.Parameter(torch.randn(4)))]},
                           OptimizerConfig(**CFG))
    for _, group in opts.groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="grad_coef must be a 0-dim tensor"):
        opts.step(grad_coef=0.5)
    with pytest.raises(ValueError, match="grad_coef must be a floating tensor"):
        opts.step(grad_coef=torch.tensor(1))
