"""Layer, RMS, group and instance norm: forward and backward.

Every function validates all of its arguments (bncore._validation) before anything is
written, then runs one kernel of bncore._rownorm on a canonical layout:

- layer / RMS norm: (rows, D) with the D normalised values contiguous (copied if not);
- group / instance norm: (N, C, S) C-contiguous ("NCHW"), or (N, S, C) C-contiguous
  ("channels-last"), whichever the memory of x already is (a copy in the layout of
  ``axis`` otherwise). y and dx come back in x's memory layout. Instance norm is group
  norm with one group per channel.

Saved statistics (mean, invstd, invrms) and dweight/dbias are float32 for float16/float32
input and float64 for float64 input, as in batch_norm_forward/backward.
"""
import math
import operator

import numpy as np

from bncore import _api, _rownorm
from bncore._outputs import empty_like_apart, half_to_float
from bncore._validation import (
    check_eps, check_out, check_real, check_writeable, finish_output, float_input,
    in_half_input, normalize_axis, param_vector, resolve_threads, running_stat,
    same_float_input,
)
from bncore._validation import _convert_threads

__all__ = [
    "layer_norm", "layer_norm_forward", "layer_norm_backward",
    "rms_norm", "rms_norm_forward", "rms_norm_backward",
    "group_norm", "group_norm_forward", "group_norm_backward",
    "instance_norm", "instance_norm_forward", "instance_norm_backward",
]

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_F16 = np.dtype(np.float16)


def _stat_dtype(dtype):
    return _F32 if dtype.itemsize <= 4 else _F64


def _direct_out(out, dtype, *arrays):
    """Whether the kernel can write straight into ``out``: C-contiguous, the compute
    dtype, and either disjoint from the inputs or exactly one of them (same buffer and
    strides: the kernels read an element before they write it)."""
    if out is None or out.dtype != dtype or not out.flags.c_contiguous:
        return False
    for a in arrays:
        if np.may_share_memory(out, a) and not (
                a.flags.c_contiguous and a.ctypes.data == out.ctypes.data):
            return False
    return True


# ------------------------------------------------------------------ layer / RMS norm

def _normalized_shape(arr, normalized_shape):
    try:   # operator.index: integers only ("5" or 5.0 are not a shape)
        shape = ((operator.index(normalized_shape),) if np.ndim(normalized_shape) == 0
                 else tuple(operator.index(s) for s in normalized_shape))
    except TypeError:
        raise TypeError(f"normalized_shape must be an int or a tuple of ints, "
                        f"got {normalized_shape!r}") from None
    if not shape or arr.ndim < len(shape) or arr.shape[arr.ndim - len(shape):] != shape:
        raise ValueError(f"normalized_shape {shape} must match the trailing dimensions of x "
                         f"(shape {arr.shape})")
    return shape


def _rows(a, nrows, d):
    """(array of nrows rows of d contiguous values, row stride in elements)."""
    r = a.reshape(nrows, d)
    if d > 1 and r.strides[1] != r.itemsize or r.strides[0] % r.itemsize:
        r = np.ascontiguousarray(r)
    return r, (r.strides[0] // r.itemsize if nrows > 1 else d)


def _row_forward(x, normalized_shape, weight, bias, eps, out, n_threads, rms, stats=True):
    """(y, mean or None, invstd) of a layer/RMS norm, the statistics of x's leading dims in
    the statistics' dtype; not stats: (y, ...) with whatever statistics come cheapest."""
    # the common call in one Cython step (None: anything else)
    res = _rownorm.forward_common(x, normalized_shape, weight, bias, eps, n_threads, rms, out,
                                  stats)
    if res is not None:
        return res
    arr, dtype = float_input(x, "x", n_threads, widen=False)   # float16 rows stay float16
    shape = _normalized_shape(arr, normalized_shape)
    if rms and eps is None:   # PyTorch: the machine epsilon of the type it computes in
        eps = float(np.finfo(np.float32 if dtype == np.float16 else dtype).eps)
    eps = check_eps(eps)
    w = param_vector(weight, "weight", shape)
    b = None if rms else param_vector(bias, "bias", shape)
    out = check_out(out, arr.shape, dtype)
    nt = resolve_threads(n_threads)
    lead = arr.shape[:arr.ndim - len(shape)]
    nrows, d = math.prod(lead), math.prod(shape)
    invstd = np.empty(nrows, _F64)
    mean = None if rms else np.empty(nrows, _F64)
    if nrows == 0 or d == 0:   # PyTorch: empty y; statistics of empty rows are NaN
        invstd.fill(np.nan)
        if mean is not None:
            mean.fill(np.nan)
        y = out if out is not None else np.empty(arr.shape, dtype)
        return _row_stats(y, mean, invstd, lead)
    xr, ldx = _rows(arr, nrows, d)
    y = out if _direct_out(out, arr.dtype, arr) else empty_like_apart(arr.shape, arr.dtype, xr)
    # weight/bias in the compute dtype: for float32 the elementwise pass is float arithmetic
    cdt = _F32 if dtype == _F16 else arr.dtype
    wk = None if w is None else w.reshape(d).astype(cdt)
    bk = None if b is None else b.reshape(d).astype(cdt)
    if dtype == _F16:   # staged through float32 rows in L1 (forward_half)
        _rownorm.forward_half(xr, y, nrows, d, ldx, d, eps, wk, bk, mean, invstd, rms, nt)
    else:
        _rownorm.forward(xr, y, nrows, d, ldx, d, eps, wk, bk, mean, invstd, rms, nt)
    return _row_stats(finish_output(y, out, dtype, n_threads), mean, invstd, lead)


def _row_stats(y, mean, invstd, lead):
    """(y, mean, invstd), the float64 (rows,) statistics shaped and typed."""
    sdt = _stat_dtype(y.dtype)
    return (y, None if mean is None else mean.astype(sdt).reshape(lead),
            invstd.astype(sdt).reshape(lead))


def _row_backward(dy, x, mean, invstd, normalized_shape, weight, out, n_threads, rms):
    # the common call in one Cython step (None: anything else)
    res = _rownorm.backward_common(dy, x, mean, invstd, normalized_shape, weight, n_threads,
                                   rms, out)
    if res is not None:
        return res   # dweight and dbias already shaped and typed
    arr, dtype = float_input(x, "x", n_threads, widen=False)   # float16: see below
    shape = _normalized_shape(arr, normalized_shape)
    g = same_float_input(dy, "dy", dtype, arr.shape, n_threads, widen=False)
    lead = arr.shape[:arr.ndim - len(shape)]
    nrows, d = math.prod(lead), math.prod(shape)
    name = "invrms" if rms else "invstd"
    m = None if rms else param_vector(mean, "mean", lead)
    s = param_vector(invstd, name, lead)
    if s is None or (m is None and not rms):
        raise TypeError(f"the saved statistics ({name if rms else 'mean, invstd'}) from the "
                        f"forward pass are required")
    w = param_vector(weight, "weight", shape)
    out = check_out(out, arr.shape, dtype)
    nt = resolve_threads(n_threads)
    dweight = np.zeros(d, _F64)
    dbias = None if rms else np.zeros(d, _F64)
    if nrows == 0 or d == 0:
        dx = out if out is not None else np.empty(arr.shape, dtype)
    elif dtype == _F16 and _rownorm.backward_halves(nrows, d):
        # float16 a few rows at a time, through float32
        xr, ldx = _rows(arr, nrows, d)
        gr, ldg = _rows(g, nrows, d)
        dx = (out if _direct_out(out, arr.dtype, arr, g)
              else empty_like_apart(arr.shape, arr.dtype, xr, gr))
        _rownorm.backward_half(gr, xr, dx, nrows, d, ldg, ldx, d,
                               None if m is None else m.reshape(nrows), s.reshape(nrows),
                               np.ones(d) if w is None else w.reshape(d), dweight, dbias, rms,
                               nt)
        dx = finish_output(dx, out, dtype, n_threads)
    else:
        if dtype == _F16:   # widened whole, dx written over dy's float32 copy
            arr = half_to_float(arr, nt)
            g = half_to_float(g, nt, arr)
        xr, ldx = _rows(arr, nrows, d)
        gr, ldg = _rows(g, nrows, d)
        if in_half_input(dtype, out) and g.flags.c_contiguous:
            dx = g   # over float16 dy's own float32 copy
        elif _direct_out(out, arr.dtype, arr, g):
            dx = out
        else:
            dx = empty_like_apart(arr.shape, arr.dtype, xr, gr)
        _rownorm.backward(gr, xr, dx, nrows, d, ldg, ldx, d,
                          None if m is None else m.reshape(nrows), s.reshape(nrows),
                          np.ones(d) if w is None else w.reshape(d), dweight, dbias, rms, nt)
        dx = finish_output(dx, out, dtype, n_threads)
    return _row_grads(dx, dweight, dbias, shape)


def _row_grads(dx, dweight, dbias, shape):
    """(dx, dweight, dbias) of a row norm, the float64 (d,) sums shaped and typed."""
    sdt = _stat_dtype(dx.dtype)
    return (dx, dweight.reshape(shape).astype(sdt),
            None if dbias is None else dbias.reshape(shape).astype(sdt))


def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None,
                       n_threads=None):
    """Layer norm that also returns the per-row mean and invstd for the backward pass.

    Parameters are those of :func:`layer_norm`.

    Returns
    -------
    y : ndarray, x's shape and dtype
    mean, invstd : ndarray of shape ``x.shape[:-len(normalized_shape)]``
        Row mean and ``1 / sqrt(var + eps)`` (biased variance); float32 for
        float16/float32 input, else float64.

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    >>> y, mean, invstd = bncore.layer_norm_forward(x, 8)
    >>> mean.shape, invstd.dtype
    ((4,), dtype('float32'))
    """
    return _row_forward(x, normalized_shape, weight, bias, eps, out, n_threads, rms=False)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None,
               n_threads=None):
    """Layer normalization over the trailing dimensions, as ``torch.nn.functional.layer_norm``.

    Each row (the trailing ``normalized_shape`` values) is normalised by its own mean and
    biased variance: ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    Parameters
    ----------
    x : array_like, float16, float32 or float64
        Input of any shape whose trailing dimensions are ``normalized_shape``; any strides
        and byte order.
    normalized_shape : int or tuple of ints
        The trailing dimensions to normalise over.
    weight, bias : array_like of shape ``normalized_shape``, optional
        Elementwise affine transform.
    eps : float, default 1e-5
        Added to the variance; must be finite and >= 0.
    out : ndarray, optional
        Where to write y (x's shape and result dtype); may be x itself.
    n_threads : int, optional
        Threads to use (default: OpenMP's default). Results are bitwise identical for any
        value.

    Returns
    -------
    y : ndarray, x's shape and dtype (float16 input is computed in float32)

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.arange(6.0).reshape(2, 3)
    >>> bncore.layer_norm(x, 3, eps=0.0).round(4)
    array([[-1.2247,  0.    ,  1.2247],
           [-1.2247,  0.    ,  1.2247]])
    """
    return _row_forward(x, normalized_shape, weight, bias, eps, out, n_threads, rms=False,
                        stats=False)[0]


def layer_norm_backward(dy, x, mean, invstd, normalized_shape, weight=None, *, out=None,
                        n_threads=None):
    """Gradients of layer norm with respect to x, weight and bias.

    Parameters
    ----------
    dy : array_like
        Gradient of the loss with respect to y: x's shape and dtype.
    x : array_like
        The forward input.
    mean, invstd : array_like of shape ``x.shape[:-len(normalized_shape)]``
        From :func:`layer_norm_forward`.
    normalized_shape : int or tuple of ints
    weight : array_like of shape ``normalized_shape``, optional
    out : ndarray, optional
        Where to write dx; may be dy or x itself.
    n_threads : int, optional

    Returns
    -------
    dx : ndarray, x's shape and dtype
    dweight, dbias : ndarray of shape ``normalized_shape``
        ``sum(dy * xhat)`` and ``sum(dy)`` over the rows (returned even without weight);
        float32 for float16/float32 input, else float64.

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.random.default_rng(0).normal(size=(4, 8))
    >>> y, m, s = bncore.layer_norm_forward(x, 8)
    >>> dx, dw, db = bncore.layer_norm_backward(np.ones_like(x), x, m, s, 8)
    >>> bool(np.allclose(dx, 0)), db.tolist() == [4.0] * 8
    (True, True)
    """
    return _row_backward(dy, x, mean, invstd, normalized_shape, weight, out, n_threads,
                         rms=False)


def rms_norm_forward(x, normalized_shape, weight=None, eps=None, *, out=None, n_threads=None):
    """RMS norm that also returns ``invrms = 1 / sqrt(mean(x**2) + eps)`` per row.

    Parameters are those of :func:`rms_norm`.

    Returns
    -------
    y : ndarray, x's shape and dtype
    invrms : ndarray of shape ``x.shape[:-len(normalized_shape)]``
        float32 for float16/float32 input, else float64.

    Examples
    --------
    >>> import numpy as np, bncore
    >>> y, invrms = bncore.rms_norm_forward(np.full((2, 4), 2.0), 4, eps=0.0)
    >>> invrms
    array([0.5, 0.5])
    """
    y, _, invrms = _row_forward(x, normalized_shape, weight, None, eps, out, n_threads,
                                rms=True)
    return y, invrms


def rms_norm(x, normalized_shape, weight=None, eps=None, *, out=None, n_threads=None):
    """RMS normalization, as ``torch.nn.functional.rms_norm``.

    ``y = x / sqrt(mean(x**2) + eps) * weight`` over the trailing ``normalized_shape``
    values of each row.

    Parameters
    ----------
    x : array_like, float16, float32 or float64
    normalized_shape : int or tuple of ints
        The trailing dimensions to normalise over.
    weight : array_like of shape ``normalized_shape``, optional
    eps : float or None, default None
        None uses the machine epsilon of the dtype the op computes in, as PyTorch
        does: ``np.finfo(x.dtype).eps`` for float32 and float64, float32's for float16
        (which is computed in float32).
    out : ndarray, optional
        Where to write y; may be x itself.
    n_threads : int, optional

    Returns
    -------
    y : ndarray, x's shape and dtype

    Examples
    --------
    >>> import numpy as np, bncore
    >>> bncore.rms_norm(np.array([[3.0, 4.0]]), 2, eps=0.0).round(4)
    array([[0.8485, 1.1314]])
    """
    return _row_forward(x, normalized_shape, weight, None, eps, out, n_threads, rms=True,
                        stats=False)[0]


def rms_norm_backward(dy, x, invrms, normalized_shape, weight=None, *, out=None,
                      n_threads=None):
    """Gradients of RMS norm with respect to x and weight.

    Parameters
    ----------
    dy, x : array_like
        Gradient of the loss with respect to y, and the forward input (same shape/dtype).
    invrms : array_like of shape ``x.shape[:-len(normalized_shape)]``
        From :func:`rms_norm_forward`.
    normalized_shape : int or tuple of ints
    weight : array_like of shape ``normalized_shape``, optional
    out : ndarray, optional
        Where to write dx; may be dy or x itself.
    n_threads : int, optional

    Returns
    -------
    dx : ndarray, x's shape and dtype
    dweight : ndarray of shape ``normalized_shape``
        ``sum(dy * x * invrms)`` over the rows (returned even without weight).

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.random.default_rng(0).normal(size=(3, 5))
    >>> y, r = bncore.rms_norm_forward(x, 5)
    >>> dx, dw = bncore.rms_norm_backward(np.ones_like(x), x, r, 5)
    >>> dx.shape, dw.shape
    ((3, 5), (5,))
    """
    dx, dweight, _ = _row_backward(dy, x, None, invrms, normalized_shape, weight, out,
                                   n_threads, rms=True)
    return dx, dweight


# ------------------------------------------------------------------ group / instance norm

class _Spatial:
    """x (or dy) as the kernels' canonical array: C-contiguous (N, C, S) when ``cl`` is
    False, (N, S, C) when True; ``user(a)`` gives a kernel-layout array back in the
    caller's shape and axis order."""
    __slots__ = ("arr", "dtype", "shape", "ax", "n", "c", "s", "cl", "data", "nt")

    def __init__(self, x, axis, n_threads, name="x"):
        self.nt = n_threads   # the call's (unchecked): for float16 conversions
        # float16 data stays float16 until widen(): group_forward_half widens it a block
        # at a time where it can
        arr, self.dtype = float_input(x, name, n_threads, widen=False)
        if arr.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (N, C, ...), "
                             f"got shape {arr.shape}")
        nd = arr.ndim
        ax = normalize_axis(axis, nd)
        if ax != 1 and ax != nd - 1:
            raise ValueError(f"axis must be 1 (N, C, ...) or -1 (channels-last), got {axis}")
        shape = arr.shape
        self.arr, self.shape, self.ax = arr, shape, ax
        self.n, self.c = shape[0], shape[ax]
        self.s = s = math.prod(shape[2:]) if ax == 1 else math.prod(shape[1:-1])
        if nd == 2 or s == 1:     # (N, C): both layouts are the same memory
            self.cl = False
            self.data = np.ascontiguousarray(arr).reshape(self.n, self.c, s)
        elif arr.flags.c_contiguous:
            self.cl = ax == nd - 1
            self.data = arr.reshape((self.n, s, self.c) if self.cl else (self.n, self.c, s))
        else:
            nc = np.moveaxis(arr, ax, 1)
            cl = np.moveaxis(arr, ax, -1)
            if nc.flags.c_contiguous or not cl.flags.c_contiguous and ax == 1:
                self.cl = False
                self.data = np.ascontiguousarray(nc).reshape(self.n, self.c, s)
            else:
                self.cl = True
                self.data = np.ascontiguousarray(cl).reshape(self.n, s, self.c)

    def widen(self):
        """float16 data as a float32 copy of the call's own (kernels take float32)."""
        if self.data.dtype == _F16:
            self.data = half_to_float(self.data, _convert_threads(self.nt))

    def like(self, a, name):
        """Another array of x's shape and dtype (dy) in the kernel layout of x, float16 or
        float32 as self.data is (widen())."""
        arr = same_float_input(a, name, self.dtype, self.shape, self.nt, self.data,
                               widen=self.data.dtype != _F16)
        return np.ascontiguousarray(self._moved(arr)).reshape(self.data.shape)

    def _moved(self, a):
        """``a`` (x's shape) with its axes in the kernel layout's order (a view)."""
        dst = -1 if self.cl else 1
        if a.ndim == 2 or self.ax == dst % a.ndim:
            return a
        return np.moveaxis(a, self.ax, dst)

    def user(self, a):
        """A kernel-layout array as a view in the caller's shape and axis order."""
        if self.arr.ndim == 2 or self.s == 1 or self.ax == (
                self.arr.ndim - 1 if self.cl else 1):
            return a.reshape(self.shape)
        if self.cl:
            moved = self.shape[:self.ax] + self.shape[self.ax + 1:] + (self.c,)
            return np.moveaxis(a.reshape(moved), -1, self.ax)
        moved = (self.n, self.c) + self.shape[1:self.ax] + self.shape[self.ax + 1:]
        return np.moveaxis(a.reshape(moved), 1, self.ax)

    def output(self, out, *inputs, dy=None):
        """(kernel-layout array to compute into, whether it is ``out`` itself). A new one is
        placed apart from the kernel's inputs, self.data and dy (bncore._outputs)."""
        if out is not None and out.dtype == self.data.dtype:
            view = self._moved(out)
            if view.flags.c_contiguous and _direct_out(view, self.data.dtype, *inputs):
                return view.reshape(self.data.shape), True
        return empty_like_apart(self.data.shape, self.data.dtype, self.data, dy), False


def _check_groups(num_groups, c):
    if isinstance(num_groups, (bool, np.bool_)):
        raise TypeError(f"num_groups must be an int, got {num_groups!r}")
    try:
        g = operator.index(num_groups)
    except TypeError:
        raise TypeError(f"num_groups must be an int, got {num_groups!r}") from None
    if g < 1 or c % g:
        raise ValueError(f"num_groups ({num_groups}) must be a positive divisor of the "
                         f"number of channels ({c})")
    return g


def _spatial_forward(sp, g, w, b, eps, out, nt):
    """Run the group kernel: (y in the caller's layout and dtype, mean, biased var)."""
    mean = np.empty(sp.n * g, _F64)
    var = np.empty(sp.n * g, _F64)
    if sp.data.size == 0:
        mean.fill(np.nan)
        var.fill(np.nan)
        y = out if out is not None else np.empty(sp.shape, sp.dtype)
        return y, mean.reshape(sp.n, g), var.reshape(sp.n, g)
    if sp.data.dtype == _F16 and (_rownorm.samples_halves(sp.s, sp.c) if sp.cl
                                  else _rownorm.groups_half(sp.c // g, sp.s)):
        # float16 a (sample, group) block, or a channels-last sample, at a time
        yk, direct = sp.output(out, sp.arr)
        half = _rownorm.samples_forward_half if sp.cl else _rownorm.group_forward_half
        half(sp.data, yk, sp.n, sp.c, sp.s, g, eps, w, b, mean, var, nt)
        y = out if direct else finish_output(sp.user(yk), out, sp.dtype, nt)
        return y, mean.reshape(sp.n, g), var.reshape(sp.n, g)
    sp.widen()
    # (over float16 input's own float32 copy, or where sp.output says)
    yk, direct = (sp.data, False) if in_half_input(sp.dtype, out) else sp.output(out, sp.arr)
    _rownorm.group_forward(sp.data, yk, sp.n, sp.c, sp.s, g, sp.cl, eps, w, b, mean, var, nt)
    y = out if direct else finish_output(sp.user(yk), out, sp.dtype, nt)
    return y, mean.reshape(sp.n, g), var.reshape(sp.n, g)


_INSTANCE = object()   # num_groups of instance norm: one group per channel


def _spatial_backward(dy, x, mean, invstd, num_groups, weight, axis, out, n_threads):
    """Group norm backward; ``num_groups`` _INSTANCE: instance norm (a group per channel)."""
    # the common call in one Cython step (None: anything else)
    # (num_groups None would be instance norm there: group norm's None goes on, and raises)
    res = None if num_groups is None else _rownorm.group_backward_common(
        dy, x, mean, invstd, None if num_groups is _INSTANCE else num_groups, weight, axis,
        n_threads, out)
    if res is not None:
        return res   # dweight and dbias already in the statistics' dtype
    sp = _Spatial(x, axis, n_threads)
    g = sp.c if num_groups is _INSTANCE else _check_groups(num_groups, sp.c)
    # float16 a (sample, group) block, or a channels-last sample, at a time where it can,
    # else widened whole
    half = (sp.data.dtype == _F16 and sp.data.size > 0
            and (_rownorm.samples_halves(sp.s, sp.c) if sp.cl
                 else _rownorm.groups_bwd_half(sp.c // g, sp.s)))
    if not half:
        sp.widen()
    gk = sp.like(dy, "dy")
    mean = param_vector(mean, "mean", (sp.n, g))
    invstd = param_vector(invstd, "invstd", (sp.n, g))
    if mean is None or invstd is None:
        raise TypeError("the saved statistics (mean, invstd) from the forward pass are required")
    w = param_vector(weight, "weight", (sp.c,))
    out = check_out(out, sp.shape, sp.dtype)
    nt = resolve_threads(n_threads)
    sdt = _stat_dtype(sp.dtype)
    if sp.data.size == 0:
        z = np.zeros(sp.c, sdt)
        return (out if out is not None else np.empty(sp.shape, sp.dtype)), z, z.copy()
    dweight = np.empty(sp.c, _F64)
    dbias = np.empty(sp.c, _F64)
    if half:
        dxk, direct = sp.output(out, sp.arr, gk, dy=gk)
        half = _rownorm.samples_backward_half if sp.cl else _rownorm.group_backward_half
        half(gk, sp.data, dxk, sp.n, sp.c, sp.s, g, mean, invstd, w, dweight, dbias, nt)
    else:
        dxk, direct = ((gk, False) if in_half_input(sp.dtype, out)
                       else sp.output(out, sp.arr, gk, dy=gk))
        _rownorm.group_backward(gk, sp.data, dxk, sp.n, sp.c, sp.s, g, sp.cl, mean, invstd,
                                w, dweight, dbias, nt)
    dx = out if direct else finish_output(sp.user(dxk), out, sp.dtype, nt)
    return _group_grads(dx, dweight, dbias)


def _group_grads(dx, dweight, dbias):
    """(dx, dweight, dbias) with the float64 (C,) sums in the statistics dtype."""
    sdt = _stat_dtype(dx.dtype)
    return dx, dweight.astype(sdt), dbias.astype(sdt)


def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, out=None,
                       n_threads=None):
    """Group norm that also returns the per-(sample, group) mean and invstd.

    Parameters are those of :func:`group_norm`.

    Returns
    -------
    y : ndarray, x's shape and dtype
    mean, invstd : ndarray of shape (N, num_groups)
        float32 for float16/float32 input, else float64.

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.random.default_rng(0).normal(size=(2, 6, 4, 4)).astype(np.float32)
    >>> y, mean, invstd = bncore.group_norm_forward(x, 3)
    >>> mean.shape, invstd.dtype
    ((2, 3), dtype('float32'))
    """
    # the common call in one Cython step, statistics included (None: anything else)
    res = None if num_groups is None else _rownorm.group_common(
        x, num_groups, weight, bias, eps, axis, n_threads, out, True)
    if res is not None:
        return res
    y, mean, var = _group_general(x, num_groups, weight, bias, eps, axis, out, n_threads)
    sdt = _stat_dtype(y.dtype)
    # eps as the kernel took it (a float): it passed check_eps there, so this cannot raise
    return y, mean.astype(sdt), _api.invstd_of(var, check_eps(eps)).astype(sdt)


def _group_forward(x, num_groups, weight, bias, eps, axis, out, n_threads):
    """(y, mean, biased var) of group norm: the common call in one Cython step, else the
    general path (which raises every error)."""
    # (num_groups None would be instance norm there: it goes on, and raises)
    res = None if num_groups is None else _rownorm.group_common(x, num_groups, weight, bias,
                                                                eps, axis, n_threads, out)
    if res is not None:
        return res
    return _group_general(x, num_groups, weight, bias, eps, axis, out, n_threads)


def _group_general(x, num_groups, weight, bias, eps, axis, out, n_threads):
    """_group_forward's general path: every check, then the kernel."""
    sp = _Spatial(x, axis, n_threads)
    g = _check_groups(num_groups, sp.c)
    w = param_vector(weight, "weight", (sp.c,))
    b = param_vector(bias, "bias", (sp.c,))
    eps = check_eps(eps)
    out = check_out(out, sp.shape, sp.dtype)
    nt = resolve_threads(n_threads)
    if sp.n and (sp.c // g) * sp.s == 1:
        raise ValueError(f"expected more than 1 value per group, got x of shape {sp.shape} "
                         f"with num_groups={g}")
    return _spatial_forward(sp, g, w, b, eps, out, nt)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, out=None,
               n_threads=None):
    """Group normalization, as ``torch.nn.functional.group_norm``.

    The channels are split into ``num_groups`` groups; each (sample, group) is normalised
    by its own mean and biased variance, then a per-channel affine is applied.

    Parameters
    ----------
    x : array_like, float16, float32 or float64
        (N, C, ...) for ``axis=1`` or (N, ..., C) for ``axis=-1`` (channels-last); any
        strides and byte order (channels-last memory is used in place).
    num_groups : int
        Must divide C, with more than one value in each (sample, group): one value per
        group is a ValueError (PyTorch only rejects a single value in all; such groups
        normalise to the bias there).
    weight, bias : array_like (C,), optional
        Per-channel affine.
    eps : float, default 1e-5
    axis : int, 1 or -1
        The channel axis.
    out : ndarray, optional
        Where to write y (x's shape and result dtype); may be x itself.
    n_threads : int, optional
        Results are bitwise identical for any value.

    Returns
    -------
    y : ndarray, x's shape and dtype

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.random.default_rng(0).normal(size=(2, 4, 3, 3))
    >>> y = bncore.group_norm(x, 2)
    >>> bool(abs(y[0, :2].mean()) < 1e-12)
    True
    """
    return _group_forward(x, num_groups, weight, bias, eps, axis, out, n_threads)[0]


def group_norm_backward(dy, x, mean, invstd, num_groups, weight=None, *, axis=1, out=None,
                        n_threads=None):
    """Gradients of group norm with respect to x, weight and bias.

    Parameters
    ----------
    dy, x : array_like
        Gradient of the loss with respect to y, and the forward input (same shape/dtype).
    mean, invstd : array_like (N, num_groups)
        From :func:`group_norm_forward`.
    num_groups : int
    weight : array_like (C,), optional
    axis : int, 1 or -1
    out : ndarray, optional
        Where to write dx; may be dy or x itself.
    n_threads : int, optional

    Returns
    -------
    dx : ndarray, x's shape and dtype
    dweight, dbias : ndarray (C,)
        Returned even without weight; float32 for float16/float32 input, else float64.

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.random.default_rng(0).normal(size=(2, 4, 3, 3))
    >>> y, m, s = bncore.group_norm_forward(x, 2)
    >>> dx, dw, db = bncore.group_norm_backward(np.ones_like(x), x, m, s, 2)
    >>> bool(np.allclose(dx, 0)), db.tolist()
    (True, [18.0, 18.0, 18.0, 18.0])
    """
    return _spatial_backward(dy, x, mean, invstd, num_groups, weight, axis, out, n_threads)


def _instance_checked(x, weight, bias, eps, axis, out, n_threads):
    sp = _Spatial(x, axis, n_threads)
    w = param_vector(weight, "weight", (sp.c,))
    b = param_vector(bias, "bias", (sp.c,))
    eps = check_eps(eps)
    out = check_out(out, sp.shape, sp.dtype)
    nt = resolve_threads(n_threads)
    if sp.n and sp.c and sp.s == 1:   # PyTorch's _verify_spatial_size (empty batches pass)
        raise ValueError(f"expected more than 1 spatial element per instance when using "
                         f"input statistics, got x of shape {sp.shape}")
    return sp, w, b, eps, out, nt


def instance_norm_forward(x, weight=None, bias=None, *, eps=1e-5, axis=1, out=None,
                          n_threads=None):
    """Instance norm with input statistics; also returns the per-(sample, channel) mean
    and invstd.

    Parameters are x, weight, bias, eps, axis, out and n_threads of
    :func:`instance_norm` (``eps`` keyword-only here); no running statistics: the
    statistics are always the input's.

    Returns
    -------
    y : ndarray, x's shape and dtype
    mean, invstd : ndarray (N, C)
        float32 for float16/float32 input, else float64.

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype(np.float32)
    >>> y, mean, invstd = bncore.instance_norm_forward(x)
    >>> mean.shape
    (2, 3)
    """
    # the common call in one Cython step, statistics included (None: anything else)
    res = _rownorm.group_common(x, None, weight, bias, eps, axis, n_threads, out, True)
    if res is not None:
        return res
    sp, w, b, eps, out, nt = _instance_checked(x, weight, bias, eps, axis, out, n_threads)
    y, mean, var = _spatial_forward(sp, sp.c, w, b, eps, out, nt)
    sdt = _stat_dtype(y.dtype)
    return y, mean.astype(sdt), _api.invstd_of(var, eps).astype(sdt)


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, axis=1, out=None,
                  n_threads=None):
    """Instance normalization, as ``torch.nn.functional.instance_norm``.

    With ``use_input_stats`` each (sample, channel) is normalised by its own mean and
    biased variance, and the running statistics, when given, are updated in place with
    the batch average of the instance statistics (unbiased variance):
    ``r = (1 - momentum) * r + momentum * batch``. Without it the running statistics
    normalise every instance (like eval-mode batch norm).

    Parameters
    ----------
    x : array_like, float16, float32 or float64
        (N, C, ...) for ``axis=1`` or (N, ..., C) for ``axis=-1``.
    running_mean, running_var : ndarray (C,), optional
        Float arrays updated in place (required when ``use_input_stats`` is False).
    weight, bias : array_like (C,), optional
    use_input_stats : bool, default True
    momentum, eps : float
    axis : int, 1 or -1
    out : ndarray, optional
        Where to write y; may be x itself.
    n_threads : int, optional

    Returns
    -------
    y : ndarray, x's shape and dtype

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.random.default_rng(0).normal(size=(2, 3, 4, 4))
    >>> rm, rv = np.zeros(3), np.ones(3)
    >>> y = bncore.instance_norm(x, rm, rv)
    >>> bool(np.allclose(y.mean(axis=(2, 3)), 0)), bool(np.all(rm != 0))
    (True, True)
    """
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when "
                             "use_input_stats=False")
        arr = x if isinstance(x, np.ndarray) else np.asarray(x)
        if arr.ndim >= 2 and normalize_axis(axis, arr.ndim) not in (1, arr.ndim - 1):
            raise ValueError(f"axis must be 1 (N, C, ...) or -1 (channels-last), got {axis}")
        return _api.batch_norm(x, running_mean, running_var, weight, bias, training=False,
                               eps=eps, axis=axis, out=out, n_threads=n_threads)
    rm, rv = running_mean, running_var
    if rm is None and rv is None:   # the common call in one Cython step
        res = _rownorm.group_common(x, None, weight, bias, eps, axis, n_threads, out)
        if res is not None:
            return res[0]
    elif _plain_running(x, axis, rm, rv, momentum):
        # with running statistics: checked first (nothing may be written before an error),
        # then the same kernels, and the same update as below
        res = _rownorm.group_common(x, None, weight, bias, eps, axis, n_threads, out)
        if res is not None:
            y, mean, var = res
            s = x.size // (x.shape[0] * x.shape[axis])
            _update_instance_running(rm, rv, mean, var, momentum, s)
            return y
    sp, w, b, eps, out, nt = _instance_checked(x, weight, bias, eps, axis, out, n_threads)
    if rm is not None or rv is not None:
        momentum = check_real(momentum, "momentum")
        for r, name in ((rm, "running_mean"), (rv, "running_var")):
            running_stat(r, name, (sp.c,))
            check_writeable(r, name)
    y, mean, var = _spatial_forward(sp, sp.c, w, b, eps, out, nt)
    if sp.n and sp.c and sp.s and (rm is not None or rv is not None):
        _update_instance_running(rm, rv, mean, var, momentum, sp.s)
    return y


def _plain_running(x, axis, rm, rv, momentum):
    """Whether instance_norm's running statistics (one of them may be None) and momentum
    are valid for a plain ndarray x with channel axis 1 or -1 (an int): writeable float
    ndarrays of shape (C,) and a real momentum (not bool, not NaN). Anything else takes
    the general path, which raises its errors in its own order."""
    if (type(x) is not np.ndarray or type(axis) is not int or x.ndim < 2
            or axis not in (1, -1, x.ndim - 1)
            or type(momentum) not in (float, int) or momentum != momentum):
        return False
    c = x.shape[axis]
    return all(r is None or (type(r) is np.ndarray and r.dtype.kind == "f"
                             and r.shape == (c,) and r.flags.writeable) for r in (rm, rv))


def _update_instance_running(rm, rv, mean, var, momentum, s):
    """running = (1 - momentum) * running + momentum * the batch average of the instance
    statistics, the variance unbiased over the s values of an instance (PyTorch's)."""
    n = mean.shape[0]   # np.mean's bits (a sum, then a division), without its overhead
    _api._update_running(rm, np.add.reduce(mean, axis=0) / n, momentum, 1.0)
    _api._update_running(rv, np.add.reduce(var, axis=0) / n, momentum, s / (s - 1))


def instance_norm_backward(dy, x, mean, invstd, weight=None, *, axis=1, out=None,
                           n_threads=None):
    """Gradients of instance norm (input statistics) with respect to x, weight and bias.

    Parameters
    ----------
    dy, x : array_like
        Gradient of the loss with respect to y, and the forward input (same shape/dtype).
    mean, invstd : array_like (N, C)
        From :func:`instance_norm_forward`.
    weight : array_like (C,), optional
    axis : int, 1 or -1
    out : ndarray, optional
        Where to write dx; may be dy or x itself.
    n_threads : int, optional

    Returns
    -------
    dx : ndarray, x's shape and dtype
    dweight, dbias : ndarray (C,)
        Returned even without weight.

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.random.default_rng(0).normal(size=(2, 3, 4, 4))
    >>> y, m, s = bncore.instance_norm_forward(x)
    >>> dx, dw, db = bncore.instance_norm_backward(np.ones_like(x), x, m, s)
    >>> bool(np.allclose(dx, 0)), db.tolist()
    (True, [32.0, 32.0, 32.0])
    """
    return _spatial_backward(dy, x, mean, invstd, _INSTANCE, weight, axis, out, n_threads)
