"""Argument checks, dtype policy and canonical views shared by every public function.

Every public function validates all of its arguments with these helpers before it writes
anything, then hands a canonical view to a kernel. Canonical views (element strides):

- planes: (outer, C, inner) with the inner values contiguous;
- rows:   (R, C, 1) with the C channels contiguous, rows ``ld`` elements apart; rows are
  the non-channel positions in C order, so two arrays of one shape always agree.
"""
import math
import operator

import numpy as np

from bncore import _openmp
from bncore._outputs import empty_like_apart, float_to_half, half_to_float

__all__ = [
    "float_input", "resolve_threads", "check_eps", "normalize_axis", "param_vector",
    "running_stat", "check_out", "View", "canonical_view", "matching_view", "in_half_input",
]

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
# numpy.exceptions is NumPy 1.25+; bncore runs on 1.24, where AxisError is numpy's own
AxisError = getattr(np, "exceptions", np).AxisError


_F16 = np.dtype(np.float16)


def _convert_threads(n_threads):
    """Threads for a float16 conversion: the call's n_threads (its own check raises later,
    in its usual place; a bad value converts on one thread here)."""
    try:
        return resolve_threads(n_threads)
    except (TypeError, ValueError):
        return 1


def float_input(x, name="x", n_threads=None, other=None, widen=True):
    """Return (array in float32/float64 native order, result dtype) or raise TypeError.

    float16 is computed in float32 and cast back (bncore._outputs.half_to_float, on the
    call's n_threads; not ``widen``: float16 stays float16, for kernels that widen it
    themselves); byte-swapped input is made native.
    """
    arr = x if type(x) is np.ndarray else np.asarray(x)
    dt = arr.dtype
    if dt.kind != "f" or dt.itemsize not in (2, 4, 8):
        raise TypeError(f"{name} must be a float16, float32 or float64 array, got dtype {dt}")
    if dt.itemsize == 2:
        if not widen:
            return (arr if dt.isnative else arr.astype(_F16)), _F16
        return half_to_float(arr, _convert_threads(n_threads), other), _F16
    if not dt.isnative:
        arr = arr.astype(dt.newbyteorder("="))
    return arr, arr.dtype


def same_float_input(a, name, ref_dtype, shape, n_threads=None, x=None, widen=True):
    """Like float_input for a second array that must match x's dtype and shape (x: the
    float32 array it is read beside, for a float16 copy's placement)."""
    arr, dt = float_input(a, name, n_threads, x, widen)
    if dt != ref_dtype:
        raise TypeError(f"{name} must have the dtype of x ({ref_dtype}), got {dt}")
    if arr.shape != shape:
        raise ValueError(f"{name} must have the shape of x {shape}, got {arr.shape}")
    return arr


MAX_THREADS = 65536   # counts above are taken as this (a C int; thread_cap caps it further)


def resolve_threads(n_threads):
    """None means OpenMP's default (OMP_NUM_THREADS, else all cores); else an int >= 1
    (a bigger count than _openmp.thread_max(), as 2**31, means as many as that)."""
    if n_threads is None:
        return _openmp.cap_threads(_openmp.max_threads())
    if isinstance(n_threads, (bool, np.bool_)):
        raise TypeError(f"n_threads must be None or a positive int, got {n_threads!r}")
    try:
        n = operator.index(n_threads)
    except TypeError:
        raise TypeError(f"n_threads must be None or a positive int, got {n_threads!r}") from None
    if n < 1:
        raise ValueError(f"n_threads must be None or a positive int, got {n}")
    return _openmp.cap_threads(min(n, MAX_THREADS))


def check_eps(eps, name="eps"):
    if type(eps) is float and 0.0 <= eps < math.inf:   # the common case, without the rest
        return eps
    if isinstance(eps, (str, bytes)):   # float("1e-5") would parse; a string is a mistake
        raise TypeError(f"{name} must be a real number >= 0, got {eps!r}")
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number >= 0, got {eps!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {eps!r}")
    return value


def check_real(value, name):
    if type(value) is float and value == value:
        return value
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if v != v:
        raise ValueError(f"{name} must not be NaN")
    return v


def normalize_axis(axis, ndim, name="axis"):
    try:
        a = operator.index(axis)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {axis!r}") from None
    if not -ndim <= a < ndim:
        raise AxisError(
            f"{name} {axis} is out of bounds for an array of dimension {ndim}")
    return a % ndim


def param_vector(p, name, shape):
    """weight/bias/saved statistics: None, or a real array of ``shape`` as float64 C-order."""
    if p is None:
        return None
    arr = p if type(p) is np.ndarray else np.asarray(p)
    dt = arr.dtype
    if dt.kind not in "fiu" or dt.itemsize > 8:
        raise TypeError(f"{name} must be a real float array, got dtype {dt}")
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if dt == _F64 and arr.flags.c_contiguous:
        return arr
    return arr.astype(_F64, order="C")


def running_stat(r, name, shape):
    """A running statistic updated in place: a writeable float ndarray of ``shape``."""
    if r is None:
        return None
    if not isinstance(r, np.ndarray):
        raise TypeError(f"{name} must be a NumPy float array (it is updated in place), "
                        f"got {type(r).__name__}")
    if r.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got dtype {r.dtype}")
    if r.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {r.shape}")
    return r


def check_writeable(r, name):
    if r is not None and not r.flags.writeable:
        raise ValueError(f"{name} is read-only, but it is updated in place")


def check_out(out, shape, dtype, name="out"):
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(out).__name__}")
    if out.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {out.shape}")
    if out.dtype != dtype and out.dtype.newbyteorder("=") != dtype:   # either byte order
        raise TypeError(f"{name} must have dtype {dtype}, got {out.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    return out


# ------------------------------------------------------------------ canonical views

def _group_stride(shape, strides):
    """Byte stride of ``shape`` dims merged into one (C order), 0 if all size 1, else None."""
    s = None
    run = 0
    for n, st in zip(reversed(shape), reversed(strides)):
        if n == 1:
            continue
        if s is None:
            s = st
        elif st != run:
            return None
        run = st * n
    return 0 if s is None else s


class View:
    """A canonical view: kind 'planes' or 'rows', sizes and element strides."""
    __slots__ = ("arr", "kind", "outer", "nch", "inner", "so", "sc")

    def __init__(self, arr, kind, outer, nch, inner, so, sc):
        self.arr, self.kind = arr, kind
        self.outer, self.nch, self.inner, self.so, self.sc = outer, nch, inner, so, sc


def _try_view(arr, axis):
    shape, strides, item = arr.shape, arr.strides, arr.itemsize
    if any(s % item for s in strides) or not arr.flags.aligned:
        return None
    nch = shape[axis]
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1:])
    sc = strides[axis] // item if nch > 1 else 1
    so = _group_stride(shape[:axis], strides[:axis])
    if inner > 1:
        si = _group_stride(shape[axis + 1:], strides[axis + 1:])
        if si == item and so is not None:
            return View(arr, "planes", outer, nch, inner, so // item, sc)
    elif so is not None and sc == 1:
        return View(arr, "rows", outer, nch, 1, so // item, 1)
    if sc == 1:   # channel axis innermost in memory: rows over the other dims
        others = shape[:axis] + shape[axis + 1:]
        ld = _group_stride(others, strides[:axis] + strides[axis + 1:])
        if ld is not None:
            return View(arr, "rows", outer * inner, nch, 1, ld // item, 1)
    return None


def _contiguous_view(arr, axis):
    """The View of a C-contiguous array, without looking at strides (the common case)."""
    shape = arr.shape
    inner = math.prod(shape[axis + 1:])
    if inner == 1:
        return View(arr, "rows", math.prod(shape[:axis]), shape[axis], 1, shape[axis], 1)
    return View(arr, "planes", math.prod(shape[:axis]), shape[axis], inner,
                shape[axis] * inner, inner)


def canonical_view(arr, axis):
    """A View of ``arr`` over channel axis ``axis``, copying only when no view exists."""
    if arr.flags.c_contiguous:
        return _contiguous_view(arr, axis)
    v = _try_view(arr, axis)
    if v is not None:
        return v
    if math.prod(arr.shape[axis + 1:]) > 1:
        return _try_view(np.ascontiguousarray(arr), axis)
    moved = np.ascontiguousarray(np.moveaxis(arr, axis, -1))
    return _try_view(np.moveaxis(moved, -1, axis), axis)


def matching_view(arr, axis, like):
    """A View of ``arr`` of the same kind as ``like`` (copying into that layout if needed)."""
    v = _try_view(arr, axis)
    if v is not None and v.kind == like.kind:
        return v
    if like.kind == "planes":
        return _try_view(np.ascontiguousarray(arr), axis)
    return _rows_copy(arr, axis, like)


def _rows_copy(arr, axis, like):
    """A copy of ``arr`` with the channel axis innermost, as a rows View shaped like
    ``like``. Built directly: with one channel, _try_view would call such a copy planes."""
    moved = np.ascontiguousarray(np.moveaxis(arr, axis, -1))
    y = np.moveaxis(moved, -1, axis)
    return View(y, "rows", like.outer, like.nch, 1, like.nch, 1)


def output_like(view, dtype, out, axis, other=None):
    """(array to compute into, its View): ``out`` itself when it fits ``view``'s layout and
    is disjoint from view.arr and ``other`` or exactly one of them (in place), else a new
    array, C-contiguous ones placed apart from view.arr and ``other`` (bncore._outputs)."""
    if out is None:
        if view.arr.flags.c_contiguous:
            y = empty_like_apart(view.arr.shape, view.arr.dtype, view.arr, other)
            return y, View(y, view.kind, view.outer, view.nch, view.inner, view.so, view.sc)
        y = np.empty_like(view.arr)
        v = _try_view(y, axis)
        if v is not None and v.kind == view.kind:
            return y, v
    elif out.dtype == view.arr.dtype:
        v = _try_view(out, axis)
        if v is not None and v.kind == view.kind and all(
                a is None or not np.may_share_memory(out, a)
                or (out.ctypes.data == a.ctypes.data and out.strides == a.strides)
                for a in (view.arr, other)):
            return out, v
    y = np.empty_like(view.arr)
    v = _try_view(y, axis)
    if v is not None and v.kind == view.kind:
        return y, v
    if view.kind == "planes":
        y = np.empty(view.arr.shape, view.arr.dtype)
        return y, _contiguous_view(y, axis)
    y = np.moveaxis(np.empty(np.moveaxis(view.arr, axis, -1).shape, view.arr.dtype), -1, axis)
    return y, View(y, "rows", view.outer, view.nch, 1, view.nch, 1)


def in_half_input(dtype, out):
    """Whether the kernel may write its result over the input's float32 copy: float16
    input widened whole (float_input's copy is the call's own; the paths that cannot widen
    it a piece at a time) with no float32 ``out`` to write. Half as many big arrays as a
    separate float32 result: with three of them (the copy, the result, the float16 one)
    glibc gave the memory back after each call, and a (32, 64, 56, 56) training forward
    faulted 1,862 pages back in on every call (10.4 ms a call, 11 ms of system time over
    the two threads)."""
    return dtype == _F16 and (out is None or out.dtype == _F16)


def finish_output(y, out, dtype, n_threads=None):
    """Copy/cast the computed array into the caller's out (or to the result dtype); a
    float32 result of float16 input is rounded by bncore._outputs.float_to_half."""
    if out is not None:
        if y is not out:
            if out.dtype == _F16 and y.dtype == _F32:
                float_to_half(y, out, _convert_threads(n_threads))
            else:
                np.copyto(out, y, casting="unsafe")
        return out
    if y.dtype == dtype:
        return y
    if dtype == _F16 and y.dtype == _F32:
        return float_to_half(y, None, _convert_threads(n_threads))
    return y.astype(dtype)
