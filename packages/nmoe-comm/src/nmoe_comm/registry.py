"""The backend registry: pick a `Dispatcher` backend by name, once, at construction.

Backends register themselves when `nmoe_comm` imports their modules (``local``, ``nccl``,
``ipc``, ``nvshmem``; each imports without a GPU). Asking for a backend that cannot run is an
error naming what is missing (no compiled transport, no GPU, nvshmem4py, an uninitialised
torch.distributed); nothing falls back to another backend.

Example::

    import nmoe_comm
    dispatcher = nmoe_comm.create_dispatcher("local", num_experts=64, capacity=4096 * 8)
    print("moe dispatcher:", dispatcher.describe())
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nmoe_comm.dispatcher import Dispatcher


class BackendUnavailableError(RuntimeError):
    """A known dispatcher backend cannot run here (not built, or missing hardware/libraries)."""


@dataclass(frozen=True)
class Backend:
    """One registered backend.

    Attributes:
        name: the name `create_dispatcher` takes.
        cls: the `Dispatcher` subclass.
        summary: one line for listings.
        missing: returns what this machine lacks to run the backend, or None when it can run.
    """

    name: str
    cls: type[Dispatcher]
    summary: str
    missing: Callable[[], str | None]


_REGISTERED: dict[str, Backend] = {}

#: Backends designed but not yet built: name -> what it is and what it will need.
PLANNED: dict[str, str] = {}


def register_backend(
    name: str,
    cls: type[Dispatcher],
    *,
    summary: str,
    missing: Callable[[], str | None] | None = None,
) -> None:
    """Make ``cls`` available to `create_dispatcher` as ``name``.

    Args:
        name: backend name (also ``cls.name``).
        cls: a concrete `Dispatcher` subclass whose constructor takes
            ``(num_experts, capacity, world_size, rank, **options)``.
        summary: one line describing the backend.
        missing: called by `create_dispatcher`; returns a sentence naming what this machine
            lacks (library, GPU, build), or None when the backend can run. Default: always runs.
    """
    if name in _REGISTERED and _REGISTERED[name].cls is not cls:
        raise ValueError(f"dispatcher backend {name!r} is already registered by another class")
    _REGISTERED[name] = Backend(name, cls, summary, missing or (lambda: None))


def available_backends() -> list[str]:
    """Names of the registered (built) backends, sorted."""
    return sorted(_REGISTERED)


def _backend(name: str) -> Backend:
    if name in _REGISTERED:
        return _REGISTERED[name]
    available = ", ".join(available_backends()) or "none"
    if name in PLANNED:
        raise BackendUnavailableError(
            f"dispatcher backend {name!r} is not yet built in this nmoe-comm ({PLANNED[name]}); "
            f"available now: {available}"
        )
    planned = f"; planned, not yet built: {', '.join(PLANNED)}" if PLANNED else ""
    raise ValueError(f"unknown dispatcher backend {name!r}; available: {available}{planned}")


def _check_options(backend: Backend, options: dict[str, object]) -> None:
    params = inspect.signature(backend.cls.__init__).parameters
    accepted = [p.name for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"dispatcher backend {backend.name!r} has no option(s) {', '.join(unknown)}; its "
            f"options are: {', '.join(accepted) or 'none'}"
        )


def create_dispatcher(
    name: str,
    *,
    num_experts: int,
    capacity: int,
    world_size: int = 1,
    rank: int = 0,
    **backend_options: object,
) -> Dispatcher:
    """Build the dispatcher backend ``name``.

    Args:
        name: one of `available_backends`: ``local``, ``nccl``, ``ipc``, ``nvshmem``.
        num_experts: ``E``, experts in the whole expert-parallel group, divisible by
            ``world_size``.
        capacity: the most rows one rank may receive per dispatch (the worst case is
            ``tokens_per_rank * top_k * world_size``).
        world_size: ``W``, ranks in the group (1 for ``local``).
        rank: this rank, ``0 <= rank < world_size``.
        **backend_options: keyword options of that backend (``local``: ``validate``;
            ``nccl``: ``group``; ``ipc`` / ``nvshmem``: ``hidden`` (required), ``dtype``,
            ``max_send_rows``, ``group``, ``device``, ``timeout_s``, ``dedup_rows``,
            ``reduce_on_owner``, ``pipelined``, ``zero_copy``;
            ``nvshmem`` also ``peer_access``).

    Raises:
        ValueError: unknown backend (the message lists the available ones), unknown option or
            bad argument.
        BackendUnavailableError: the backend is known but not built, or this machine lacks
            what it needs (the message says what).
    """
    backend = _backend(name)
    missing = backend.missing()
    if missing is not None:
        raise BackendUnavailableError(f"dispatcher backend {name!r} cannot run here: {missing}")
    _check_options(backend, backend_options)
    return backend.cls(num_experts, capacity, world_size, rank, **backend_options)


def buffer_size_hint(
    name: str,
    *,
    capacity: int,
    hidden: int,
    dtype: torch.dtype,
    world_size: int = 1,
    max_send_rows: int | None = None,
) -> int:
    """Bytes backend ``name`` needs on one rank; see `Dispatcher.buffer_size_hint`.

    Args:
        name: a registered backend.
        capacity: rows one rank may receive.
        hidden: ``D``, elements per row (the widest of the dispatched and combined rows).
        dtype: dtype of the rows (the widest).
        world_size: ``W``.
        max_send_rows: the most slots ``T * K`` one rank sends (``ipc``, ``nvshmem``); None
            means ``capacity``.
    """
    return _backend(name).cls.buffer_size_hint(
        capacity=capacity, hidden=hidden, dtype=dtype, world_size=world_size,
        max_send_rows=max_send_rows,
    )
