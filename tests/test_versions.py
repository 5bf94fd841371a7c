"""Each package's ``__version__`` equals its installed distribution version."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())


@pytest.mark.parametrize("dist", PACKAGES)
def test_version_matches_distribution(dist):
    module = importlib.import_module(dist.replace("-", "_"))
    assert module.__version__ == importlib.metadata.version(dist), (
        f"{dist}: __version__ {module.__version__} != installed {importlib.metadata.version(dist)}"
        f"; reinstall with `bash ci/install.sh`"
    )
