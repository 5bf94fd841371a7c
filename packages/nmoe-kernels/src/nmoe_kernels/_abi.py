"""The ABI contract between the compiled module `nmoe_kernels._C` and the packages above it.

`_C.ABI_VERSION` is an integer bumped whenever a binding's signature or behaviour changes. Each
consumer (nmoe-comm, nmoe-core) declares the inclusive range of ABI versions it was written
against and calls `require_abi` at import, which fails with a message that says which side is
too old.
"""

from __future__ import annotations

import importlib


class ABIMismatchError(ImportError):
    """The compiled nmoe_kernels._C does not speak the ABI a consumer package needs."""


def compiled_abi_version() -> int | None:
    """The ABI version of the installed `nmoe_kernels._C`, or None when it is not built."""
    try:
        c_module = importlib.import_module("nmoe_kernels._C")
    except ImportError:
        return None
    return int(c_module.ABI_VERSION)


def check_abi(consumer: str, minimum: int, maximum: int, found: int | None) -> None:
    """Raise `ABIMismatchError` unless ``minimum <= found <= maximum`` (None passes: no _C)."""
    if found is None:
        return
    if found < minimum:
        raise ABIMismatchError(
            f"{consumer} needs nmoe-kernels with compiled ABI >= {minimum}, but the installed "
            f"nmoe_kernels._C has ABI {found}: nmoe-kernels is too old. Upgrade and rebuild it "
            f"(pip install --no-build-isolation -e packages/nmoe-kernels)."
        )
    if found > maximum:
        raise ABIMismatchError(
            f"{consumer} supports nmoe-kernels compiled ABI <= {maximum}, but the installed "
            f"nmoe_kernels._C has ABI {found}: {consumer} is too old for this nmoe-kernels. "
            f"Upgrade {consumer} (or install an nmoe-kernels release with ABI {maximum})."
        )


def require_abi(consumer: str, minimum: int, maximum: int) -> None:
    """Check the installed `_C` against ``[minimum, maximum]`` on behalf of ``consumer``."""
    check_abi(consumer, minimum, maximum, compiled_abi_version())
