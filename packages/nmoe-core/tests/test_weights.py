"""safetensors I/O: bitwise round trips per dtype, aliasing, atomic replace, errors that name the
path, and an exact round trip of nested optimizer state through tensors + JSON."""

from __future__ import annotations

import math
import os

import pytest
import torch

from nmoe_core.weights import (
    METADATA_KEY,
    flatten_optimizer_state,
    load_state,
    save_state,
    unflatten_optimizer_state,
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.float8_e4m3fn,
          torch.float8_e5m2, torch.int64, torch.int32, torch.uint8, torch.bool]


def _random(shape, dtype):
    if dtype == torch.bool:
        return torch.rand(shape) < 0.5
    if not dtype.is_floating_point:
        return torch.randint(0, 100, shape, dtype=dtype)
    return (torch.randn(shape) * 10).to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (float8 compared through its bytes; NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point and a.numel():
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))
    return torch.equal(a, b)


def test_roundtrip_every_dtype_bitwise(tmp_path):
    seed = torch.seed()
    tensors = {f"t.{i}.{str(d)[6:]}": _random((3, 5), d) for i, d in enumerate(DTYPES)}
    tensors["scalar"] = torch.tensor(math.pi)
    tensors["empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    tensors["e8m0"] = torch.rand(7).add(0.5).to(torch.float8_e8m0fnu)
    meta = {"step": 12, "cfg": {"lr": 1 / 3, "names": ["a", "b"]}, "ok": True, "none": None}
    save_state(tmp_path / "x.safetensors", tensors, meta)
    loaded, got_meta = load_state(tmp_path / "x.safetensors")
    assert got_meta == meta
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert _same(loaded[k], v), f"seed={seed} {k}"


def test_aliased_and_strided_tensors_are_stored_separately(tmp_path):
    seed = torch.seed()
    base = torch.randn(6, 8)
    before = base.clone()
    tensors = {"base": base, "same": base, "t": base.t(), "row": base[2], "cols": base[:, 1:5],
               "tied_head": base.view(8, 6)}
    save_state(tmp_path / "a.safetensors", tensors)
    loaded, meta = load_state(tmp_path / "a.safetensors")
    assert meta is None
    assert torch.equal(base, before)
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v), f"seed={seed} {k}"
    loaded["base"].add_(1)  # loaded tensors are independent
    assert torch.equal(loaded["same"], base)


def test_replace_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "w.safetensors"
    save_state(path, {"a": torch.ones(3)}, {"v": 1})
    save_state(path, {"a": torch.full((3,), 2.0)}, {"v": 2})
    assert load_state(path)[1] == {"v": 2}
    with pytest.raises(TypeError, match="not JSON-serializable"):
        save_state(path, {"a": torch.zeros(3)}, {"v": object()})
    with pytest.raises(TypeError, match="'b'"):
        save_state(path, {"a": torch.zeros(3), "b": [1, 2]})
    tensors, meta = load_state(path)
    assert torch.equal(tensors["a"], torch.full((3,), 2.0)) and meta == {"v": 2}
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_state(missing)
    path = tmp_path / "cut.safetensors"
    save_state(path, {"a": torch.randn(1000)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors.*corrupt"):
        load_state(path)
    with pytest.raises(FileNotFoundError, match="no_dir"):
        save_state(tmp_path / "no_dir" / "x.safetensors", {"a": torch.zeros(1)})


def _deep_equal(a, b, path="root"):
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert _same(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            _deep_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _deep_equal(x, y, f"{path}.{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_optimizer_state_flatten_roundtrip_exact(tmp_path):
    seed = torch.seed()
    state = {
        "adamw": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 2).bfloat16()},
                      7: {"step": torch.tensor(3.0), "exp_avg_sq": torch.rand(5)}},
            "param_groups": [{"lr": 1 / 3, "betas": (0.9, 0.95), "eps": 1e-8, "fused": None,
                              "maximize": False, "params": [0, 7], "name": "dense",
                              "param_names": ["a.weight", "b.bias"]}],
        },
        "muon": {"state": {}, "param_groups": [{"ns_dtype": "float32", "nan": float("nan"),
                                                "inf": float("inf"), "params": []}]},
        "dtype": torch.bfloat16,
        "weird": {"__tensor__": "not a tensor", (1, 2): "tuple-free", 2.5: None},
        "a.b": torch.ones(2),
        "a": {"b": torch.zeros(2)},  # same dotted path as "a.b": keys must not collide
        "fp8": torch.randn(3).to(torch.float8_e4m3fn),
    }
    del state["weird"][(1, 2)]  # tuple keys are not supported; keep the other odd keys
    tensors, meta = flatten_optimizer_state(state)
    assert isinstance(meta, str) and all(isinstance(v, torch.Tensor) for v in tensors.values())
    assert "adamw.state.0.exp_avg" in tensors
    save_state(tmp_path / "o.safetensors", tensors, {"optimizer": meta})
    loaded, got = load_state(tmp_path / "o.safetensors")
    try:
        _deep_equal(unflatten_optimizer_state(loaded, got["optimizer"]), state)
    except AssertionError as e:
        raise AssertionError(f"seed={seed}: {e}") from e


def test_flatten_rejects_unstorable_values():
    with pytest.raises(TypeError, match="adamw.state.0.foo"):
        flatten_optimizer_state({"adamw": {"state": {0: {"foo": object()}}}})
    with pytest.raises(KeyError, match="missing"):
        unflatten_optimizer_state({}, flatten_optimizer_state({"x": torch.ones(1)})[1])


def test_metadata_key_is_single_json_string(tmp_path):
    from safetensors import safe_open

    save_state(tmp_path / "m.safetensors", {"a": torch.zeros(1)}, {"k": [1, 2]})
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert f.metadata() == {METADATA_KEY: '{"k": [1, 2]}'}
