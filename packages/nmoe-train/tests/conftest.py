"""Shared fixtures: a prepared Shakespeare dataset and a small, fast training config."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """The built-in Shakespeare dataset, prepared once per session."""
    from nmoe_train.data import ensure_builtin_dataset

    root = tmp_path_factory.mktemp("data")
    ensure_builtin_dataset("shakespeare", root, "gpt2", progress=False)
    return root
