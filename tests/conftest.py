"""Shared test setup: ``tests/`` on sys.path (for the ``arrays`` helper module), the
reference twins as a fixture, and a header line with the build being tested."""
import copy
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_report_header(config):
    try:
        import torch
        import bncore
        from bncore import _openmp
        return (f"bncore {bncore.__version__}, numpy {np.__version__}, torch {torch.__version__}, "
                f"OpenMP max threads {_openmp.max_threads()}")
    except Exception as exc:  # the header must never break collection
        return f"bncore not importable: {exc!r}"


# The thresholds the kernels take from this machine's L3 at import (bncore._config
# .thresholds()) decide which paths an op of a given size takes: streamed stores, fetches
# for data beyond the caches. The tests size their arrays for the 32 MiB L3 rule (a
# forward of 16 MiB or more, a backward of 10.7 MiB or more streams; an input of 16 MiB or
# more is far; L2s of 512 KiB; L1s of 48 KiB, where layer-norm backward rows of up to
# 4096 floats stay in L1), so they pin it: every path runs on any machine.
# test_config checks the rule itself in a fresh process.
PINNED_THRESHOLDS = {"stream_forward_bytes": 32 << 20, "stream_backward_bytes": 32 << 20,
                     "far_bytes": 16 << 20, "l2_bytes": 512 << 10, "l1_bytes": 48 << 10}


@pytest.fixture(autouse=True, scope="session")
def pinned_thresholds():
    from bncore import _config
    old = _config.set_thresholds(**PINNED_THRESHOLDS)
    yield
    _config.set_thresholds(**old)


@pytest.fixture
def ref():
    """The pure-NumPy float64 twins (bncore._reference)."""
    from bncore import _reference
    return _reference


class Unchanged:
    """Snapshot arrays (and dicts/lists of them) and check later that none was modified."""

    def __init__(self, *objs, **named):
        self._items = [(f"arg{i}", o) for i, o in enumerate(objs)] + list(named.items())
        self._saved = [(name, o, copy.deepcopy(o)) for name, o in self._items]

    def check(self):
        for name, obj, saved in self._saved:
            _assert_same(obj, saved, name)


def _assert_same(obj, saved, name):
    if isinstance(obj, np.ndarray):
        assert obj.shape == saved.shape and obj.dtype == saved.dtype, name
        np.testing.assert_array_equal(obj, saved, err_msg=f"{name} was modified")
    elif isinstance(obj, dict):
        for k in obj:
            _assert_same(obj[k], saved[k], f"{name}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, (a, b) in enumerate(zip(obj, saved)):
            _assert_same(a, b, f"{name}[{i}]")


@pytest.fixture
def unchanged():
    """``snap = unchanged(x, dy, w=w)``; ... ; ``snap.check()``."""
    return Unchanged
