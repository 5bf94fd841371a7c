"""`require_abi` / `check_abi`: the compiled-ABI contract between nmoe-kernels and its consumers."""

from __future__ import annotations

import pytest

import nmoe_kernels
from nmoe_kernels._abi import ABIMismatchError, check_abi


def test_abi_in_range_passes():
    check_abi("nmoe-comm", 1, 3, 1)
    check_abi("nmoe-comm", 1, 3, 3)
    check_abi("nmoe-comm", 1, 3, None)  # no _C built: nothing to check


def test_too_old_kernels_message():
    with pytest.raises(ABIMismatchError) as err:
        check_abi("nmoe-comm", 4, 6, 2)
    message = str(err.value)
    assert "nmoe-comm needs nmoe-kernels with compiled ABI >= 4" in message
    assert "ABI 2: nmoe-kernels is too old" in message
    assert "pip install --no-build-isolation -e packages/nmoe-kernels" in message


def test_too_new_kernels_message():
    with pytest.raises(ABIMismatchError) as err:
        check_abi("nmoe-core", 1, 2, 5)
    message = str(err.value)
    assert "nmoe-core supports nmoe-kernels compiled ABI <= 2" in message
    assert "nmoe-core is too old for this nmoe-kernels" in message
    assert "too old" in message and "nmoe-kernels is too old" not in message


def test_require_abi_against_the_installed_module():
    found = nmoe_kernels.compiled_abi_version()
    assert isinstance(found, int)
    nmoe_kernels.require_abi("test", found, found)
    with pytest.raises(ABIMismatchError, match="nmoe-kernels is too old"):
        nmoe_kernels.require_abi("test", found + 1, found + 1)
    with pytest.raises(ABIMismatchError, match="test is too old"):
        nmoe_kernels.require_abi("test", found - 1, found - 1)
    assert issubclass(ABIMismatchError, ImportError)
