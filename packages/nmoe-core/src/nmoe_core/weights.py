"""Tensor files in safetensors, with JSON metadata: the only on-disk tensor format (no pickle).

- `save_state` / `load_state`: a flat ``{name: tensor}`` dict plus a JSON-able metadata object,
  stored as a JSON string under the single safetensors metadata key `METADATA_KEY`. Writes are
  atomic: a temporary file in the same directory, fsync, ``os.replace``, fsync of the directory;
  a crash leaves either the old file or the new one, never a torn one.
- `flatten_optimizer_state` / `unflatten_optimizer_state`: turn a nested optimizer state dict
  (torch optimizers, `nmoe_core.optim.Optimizers.state_dict()`) into tensors keyed by dotted path
  plus a JSON string for everything else, and back, exactly (int dict keys, tuples and dtypes
  survive).

Every dtype safetensors knows is supported, bf16 and the float8 formats included. Tensors are
written from CPU copies; aliased tensors (views of one storage) and non-contiguous ones are cloned
first, since safetensors stores each tensor on its own.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = [
    "METADATA_KEY",
    "flatten_optimizer_state",
    "load_state",
    "save_state",
    "unflatten_optimizer_state",
]

METADATA_KEY = "nmoe.metadata"
"""The safetensors metadata key holding the JSON-encoded metadata of `save_state`."""

_TENSOR, _TUPLE, _DICT, _DTYPE = "__tensor__", "__tuple__", "__dict__", "__dtype__"
_TAGS = frozenset({_TENSOR, _TUPLE, _DICT, _DTYPE})


def _writable_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no storage (cloning only where needed)."""
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for key, t in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"tensor names must be str, got {key!r} ({type(key).__name__})")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{key!r}] is a {type(t).__name__}, not a torch.Tensor")
        if t.layout != torch.strided:
            raise ValueError(f"tensors[{key!r}] has layout {t.layout}; convert it to dense first")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()  # a fresh storage per tensor
        else:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_storages or not t.is_contiguous() or t.numel() == 0:
                t = t.clone(memory_format=torch.contiguous_format)
            seen_storages.add(ptr)
        out[key] = t
    return out


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Any = None,
) -> None:
    """Write ``tensors`` and ``metadata`` to a safetensors file at ``path``, atomically.

    Args:
        path: destination file; its directory must exist. An existing file is replaced.
        tensors: ``{name: tensor}``, any device, dtype and layout-strided shape; not modified.
        metadata: any JSON-serializable object (dicts, lists, str, numbers, bool, None), stored
            as one JSON string under `METADATA_KEY`. None stores no metadata.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save {path}: directory {directory} does not exist")
    header: dict[str, str] | None = None
    if metadata is not None:
        try:
            header = {METADATA_KEY: json.dumps(metadata)}
        except (TypeError, ValueError) as e:
            raise TypeError(f"metadata for {path} is not JSON-serializable: {e}") from e
    writable = _writable_tensors(tensors)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(writable, tmp, metadata=header)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def load_state(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], Any]:
    """Read a file written by `save_state` (or any safetensors file).

    Args:
        path: the safetensors file.
        device: where to place the tensors (``"cpu"``, ``"cuda:0"``, ...).

    Returns:
        ``(tensors, metadata)``: ``{name: tensor}`` in file order and the decoded metadata
        (None when the file holds no `METADATA_KEY`).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file at {path}")
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}); it is truncated or corrupt"
        ) from e
    if METADATA_KEY not in header:
        return tensors, None
    try:
        metadata = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata {METADATA_KEY!r} is not valid JSON ({e})") from e
    return tensors, metadata


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key, n = path, 1
        while key in tensors:  # dotted paths of different structures can coincide
            key, n = f"{path}#{n}", n + 1
        tensors[key] = value
        return {_TENSOR: key}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.dtype):
        return {_DTYPE: str(value).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, _join(path, i), tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, _join(path, i), tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        items = [(k, _encode(v, _join(path, k), tensors)) for k, v in value.items()]
        if all(isinstance(k, str) and k not in _TAGS for k in value):
            return dict(items)
        for k, _ in items:
            if not (k is None or isinstance(k, bool | int | float | str)):
                raise TypeError(f"optimizer state key {k!r} at {path or '<root>'} is not a "
                                "str/int/float/bool/None")
        return {_DICT: [[k, v] for k, v in items]}
    raise TypeError(
        f"optimizer state value at {path or '<root>'} has type {type(value).__name__}, which "
        "cannot be stored (allowed: tensors, dicts, lists, tuples, str, numbers, bool, None, "
        "torch.dtype)"
    )


def _decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, payload),) = value.items()
        if tag == _TENSOR:
            if payload not in tensors:
                raise KeyError(f"optimizer state references tensor {payload!r}, which is missing")
            return tensors[payload]
        if tag == _TUPLE:
            return tuple(_decode(v, tensors) for v in payload)
        if tag == _DICT:
            return {k: _decode(v, tensors) for k, v in payload}
        if tag == _DTYPE:
            return getattr(torch, payload)
    return {k: _decode(v, tensors) for k, v in value.items()}


def flatten_optimizer_state(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """Split a nested state dict into ``(tensors, json_meta)`` for `save_state`.

    Args:
        state_dict: nested dicts / lists / tuples whose leaves are tensors, str, int, float,
            bool, None or torch.dtype (e.g. ``torch.optim.Optimizer.state_dict()``, whose
            ``state`` is keyed by int). Tensors are not copied.

    Returns:
        ``tensors``: ``{dotted_path: tensor}`` (e.g. ``"adamw.state.3.exp_avg"``), and
        ``json_meta``: a JSON string of the structure with each tensor replaced by a reference to
        its key. `unflatten_optimizer_state` inverts it exactly.
    """
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state_dict, "", tensors)
    return tensors, json.dumps(encoded)


def unflatten_optimizer_state(tensors: Mapping[str, torch.Tensor], json_meta: str) -> Any:
    """Rebuild the state dict that `flatten_optimizer_state` split into ``(tensors, json_meta)``.

    Args:
        tensors: ``{dotted_path: tensor}`` as returned by `flatten_optimizer_state` (or loaded by
            `load_state`); extra keys are ignored.
        json_meta: the JSON string returned alongside.
    """
    try:
        encoded = json.loads(json_meta)
    except json.JSONDecodeError as e:
        raise ValueError(f"json_meta is not valid JSON ({e})") from e
    return _decode(encoded, tensors)
