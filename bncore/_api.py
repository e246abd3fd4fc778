"""Public statistics and batch-norm functions: validate, pick a canonical view, call a kernel.

Numerics live in the kernels (bncore/src, bncore/_kernels.pxd); this layer only checks
arguments (all of them, before anything is written), decides dtypes and layouts, and
allocates outputs. Keep it thin: for small inputs its overhead is the cost of a call.
"""
import math
import warnings

import numpy as np

from bncore import _batchnorm, _stats
from bncore._outputs import half_to_float
from bncore._validation import (
    canonical_view, check_eps, check_out, check_real, check_writeable, finish_output,
    float_input, in_half_input, matching_view, normalize_axis, output_like, param_vector,
    resolve_threads, running_stat, same_float_input,
)
from bncore._validation import _convert_threads

__all__ = ["moments", "Moments", "batch_norm", "batch_norm_forward", "batch_norm_backward"]

_F64 = np.dtype(np.float64)
_F16 = np.dtype(np.float16)


# ------------------------------------------------------------------ moments

def invstd_of(var, eps):
    """1 / sqrt(var + eps), silently inf where that is 1/0 (a constant channel or group
    with eps=0): as the kernels compute it, and as PyTorch returns it."""
    with np.errstate(divide="ignore"):
        return 1.0 / np.sqrt(var + eps)


def _reduce_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if np.ndim(axis) == 0 else tuple(axis)
    out = tuple(normalize_axis(a, ndim) for a in axes)
    if len(set(out)) != len(out):
        raise ValueError(f"axis {axis!r} repeats an axis")
    return out


def _stats_input(x, n_threads=None):
    arr = x if type(x) is np.ndarray else np.asarray(x)
    kind = arr.dtype.kind
    if kind in "biu":
        return arr.astype(_F64), _F64
    if kind != "f" or arr.dtype.itemsize not in (2, 4, 8):
        raise TypeError(f"x must be a real (bool, integer or float) array, got dtype {arr.dtype}")
    if arr.dtype.itemsize == 2:
        return half_to_float(arr, _convert_threads(n_threads)), arr.dtype.newbyteorder("=")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr, arr.dtype


def _raw_moments(arr, axes, n_threads=None):
    """(count, mean, m2) in float64 over ``axes``; mean/m2 have the kept dims' shape.

    Broadcast (stride-0) reduced axes are dropped and only multiply the count: a value
    repeated k times has the same mean and k times the M2, so views of more than 2**31
    elements cost no more than the data behind them.
    """
    repeat = 1
    if any(arr.strides[a] == 0 and arr.shape[a] > 1 for a in axes):
        index = []
        for a, n in enumerate(arr.shape):
            if a in axes and arr.strides[a] == 0 and n > 1:
                repeat *= n
                index.append(slice(0, 1))
            else:
                index.append(slice(None))
        arr = arr[tuple(index)]
    kept = [a for a in range(arr.ndim) if a not in axes]
    perm = _memory_order(arr) if len(kept) > 1 else None
    if perm is not None:   # e.g. a channels-last view (N, C, H, W): as (N, H, W, C)
        count, mean, m2 = _raw_moments(arr.transpose(perm),
                                       tuple(i for i, a in enumerate(perm) if a in axes),
                                       n_threads)
        back = np.argsort([a for a in perm if a not in axes])
        mean = np.ascontiguousarray(mean.transpose(back))
        m2 = np.ascontiguousarray(m2.transpose(back))
        return _repeated(count * repeat, mean, m2, repeat, mean.shape)
    kshape = tuple(arr.shape[a] for a in kept)
    nch = math.prod(kshape)
    count = math.prod([arr.shape[a] for a in axes]) * repeat
    mean = np.empty(nch, _F64)
    m2 = np.empty(nch, _F64)
    if count == 0 or nch == 0:
        mean.fill(np.nan)
        m2.fill(np.nan)
        return count, mean.reshape(kshape), m2.reshape(kshape)
    if not kept:                        # everything reduced: one channel of all values
        arr, ax = arr.ravel(order="K").reshape(1, 1, -1), 1
    elif len(kept) == 1:                # the batch-norm case: any strides, no copy
        ax = kept[0]
    elif kept == list(range(kept[0], kept[-1] + 1)):
        arr = arr.reshape(arr.shape[:kept[0]] + (nch,) + arr.shape[kept[-1] + 1:])
        ax = kept[0]
    elif lead := _leading_blocks(arr.shape, kept):
        # (blocks, rows, channels, inner) without gathering the kept axes into a copy
        c0, c1 = kept[lead], kept[-1] + 1
        arr = np.ascontiguousarray(arr)
        _stats.batch_moments(arr, math.prod(arr.shape[:lead]), math.prod(arr.shape[lead:c0]),
                             math.prod(arr.shape[c0:c1]), math.prod(arr.shape[c1:]), mean, m2,
                             resolve_threads(n_threads))
        return _repeated(count, mean, m2, repeat, kshape)
    else:                               # kept axes apart: gather them last (a copy)
        order = [a for a in range(arr.ndim) if a in axes] + kept
        arr, ax = np.ascontiguousarray(arr.transpose(order)).reshape(-1, nch), 1
    v = canonical_view(arr, ax)
    _stats.channel_moments(v.arr, v.outer, v.nch, v.inner, v.so, v.sc, mean, m2,
                           resolve_threads(n_threads))
    return _repeated(count, mean, m2, repeat, kshape)


def _repeated(count, mean, m2, repeat, kshape):
    if repeat > 1:
        m2 *= repeat
    return count, mean.reshape(kshape), m2.reshape(kshape)


def _memory_order(arr):
    """The axis order that makes a non-contiguous ``arr`` C-contiguous (largest stride
    first), when there is one: a permuted contiguous array, such as a channels-last view.
    Its kept axes then sit together in memory, or in a pattern without a copy; reshaping
    the view would copy it. None when ``arr`` is contiguous or not a permutation of one."""
    if arr.flags.c_contiguous or arr.ndim < 2:
        return None
    perm = sorted(range(arr.ndim), key=lambda a: -arr.strides[a])
    return perm if arr.transpose(perm).flags.c_contiguous else None


def _leading_blocks(shape, kept):
    """a when the kept axes (sorted, not adjacent) are the leading axes 0..a-1 and one
    more run of adjacent axes, with at least _stats.BLOCK_MIN values under each leading
    index (a per-sample statistic, such as channels-last (N, H, W, C) over (1, 2)); else
    0. _stats.moments_common takes the same plain calls the same way."""
    lead = next(i for i, a in enumerate(kept) if a != i)
    rest = kept[lead:]
    if lead == 0 or rest != list(range(rest[0], rest[-1] + 1)):
        return 0
    return lead if math.prod(shape[lead:]) >= _stats.BLOCK_MIN else 0


def moments(x, axis=None, *, ddof=0, keepdims=False, n_threads=None):
    """Mean and variance of ``x`` over ``axis`` in one pass (Welford/Chan, float64 sums).

    Parameters
    ----------
    x : array_like
        Real input (bool, integer or float; any strides or byte order).
    axis : None, int or tuple of ints
        Axes to reduce; None reduces everything.
    ddof : int, optional
        Delta degrees of freedom of the variance, as in ``numpy.var``.
    keepdims : bool, optional
        Keep reduced axes with size one, as in NumPy.
    n_threads : int, optional
        Threads to use (default: OpenMP's default). Results do not depend on it.

    Returns
    -------
    mean, var : ndarray
        float64 for integer/bool input, else x's dtype.

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    >>> mean, var = bncore.moments(x, axis=(0, 2))
    >>> mean
    array([ 7.5, 11.5, 15.5], dtype=float32)
    """
    r = _stats.moments_common(x, axis, ddof, keepdims, n_threads)
    return r if r is not None else _moments_general(x, axis, ddof, keepdims, n_threads)


def _moments_general(x, axis, ddof, keepdims, n_threads):
    """moments() for every call (the common one also runs in _stats.moments_common)."""
    arr, dtype = _stats_input(x, n_threads)
    axes = _reduce_axes(axis, arr.ndim)
    ddof = check_real(ddof, "ddof")
    count, mean, m2 = _raw_moments(arr, axes, n_threads)
    dof = max(count - ddof, 0)
    if count == 0:
        warnings.warn("Mean of empty slice", RuntimeWarning, stacklevel=2)
    elif dof == 0:
        warnings.warn("Degrees of freedom <= 0 for slice", RuntimeWarning, stacklevel=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = m2 / dof             # dof == 0: inf, or nan for a zero M2, as NumPy
    if keepdims:
        shape = tuple(1 if a in axes else n for a, n in enumerate(arr.shape))
        mean, var = np.reshape(mean, shape), np.reshape(var, shape)
    return _as_result(mean, dtype), _as_result(var, dtype)


def _as_result(a, dtype):
    a = np.asarray(a, dtype=dtype)
    return a[()] if a.ndim == 0 else a


class Moments:
    """Streaming, mergeable per-feature mean and variance (Welford/Chan in float64).

    ``update(x, axis)`` reduces a batch over ``axis``; the remaining dims are the
    feature shape, fixed by the first update. ``merge`` combines two accumulators exactly
    as if all their data had been seen by one (Chan's formula), so partial results from
    threads, processes or machines can be reduced in any tree. Picklable.

    Examples
    --------
    >>> import numpy as np, bncore
    >>> acc = bncore.Moments()
    >>> for batch in np.split(np.arange(12.0).reshape(6, 2), 3):
    ...     acc = acc.update(batch, axis=0)
    >>> acc.count, acc.mean
    (6, array([5., 6.]))
    """

    def __init__(self):
        self._count = 0
        self._mean = None
        self._m2 = None

    def update(self, x, axis=0):
        """Add the values of ``x`` reduced over ``axis``; returns self."""
        r = _stats.update_common(x, axis)   # the common call in one Cython step
        if r is None:
            arr, _ = _stats_input(x)
            r = _raw_moments(arr, _reduce_axes(axis, arr.ndim))
        count, mean, m2 = r
        self._absorb(count, np.atleast_1d(mean), np.atleast_1d(m2), np.shape(mean), "x")
        return self

    def merge(self, other):
        """Merge another Moments into this one (``other`` is left unchanged); returns self."""
        if not isinstance(other, Moments):
            raise TypeError(f"other must be a Moments, got {type(other).__name__}")
        if other._mean is not None:   # even with no values: its feature shape must match
            self._absorb(other._count, other._mean, other._m2, other._shape, "other")
        return self

    def _absorb(self, count, mean, m2, shape, name):
        if self._mean is not None and shape != self._shape:
            raise ValueError(f"{name} has feature shape {shape}, which does not match this "
                             f"accumulator's {self._shape}")
        if count == 0:
            if self._mean is None:
                self._shape = shape
                self._mean = np.zeros(mean.shape)
                self._m2 = np.zeros(m2.shape)
            return
        mean = np.ascontiguousarray(mean, _F64).ravel()
        m2 = np.ascontiguousarray(m2, _F64).ravel()
        if self._mean is None or self._count == 0:
            self._shape = shape
            self._mean, self._m2 = mean.copy(), m2.copy()
        else:
            _stats.merge_moments(float(self._count), self._mean, self._m2, float(count),
                                 mean, m2)
        self._count += count

    @property
    def count(self):
        """Number of values seen per feature (int)."""
        return self._count

    def _shaped(self, a):
        a = a.reshape(self._shape)
        return a[()] if a.ndim == 0 else a

    @property
    def mean(self):
        """Per-feature mean (float64; NaN before any data)."""
        if self._mean is None:
            return np.float64(np.nan)
        if self._count == 0:
            return self._shaped(np.full(self._mean.shape, np.nan))
        return self._shaped(self._mean.copy())

    def var(self, ddof=0):
        """Per-feature variance with ``ddof`` delta degrees of freedom (float64)."""
        if self._mean is None:
            return np.float64(np.nan)
        dof = max(self._count - check_real(ddof, "ddof"), 0)
        if self._count == 0:   # no values (only empty batches): NaN, as moments() gives
            return self._shaped(np.full(self._m2.shape, np.nan))
        if self._count and dof == 0:   # as moments() and NumPy
            warnings.warn("Degrees of freedom <= 0 for slice", RuntimeWarning, stacklevel=2)
        with np.errstate(divide="ignore", invalid="ignore"):
            v = self._m2 / dof   # dof == 0: inf, or nan for a zero M2, as NumPy (and moments)
        return self._shaped(v)

    def std(self, ddof=0):
        """Per-feature standard deviation (float64)."""
        return np.sqrt(self.var(ddof))

    def __repr__(self):
        shape = getattr(self, "_shape", None)
        return f"Moments(count={self._count}, feature_shape={shape})"

    def __getstate__(self):
        return {"count": self._count, "mean": self._mean, "m2": self._m2,
                "shape": getattr(self, "_shape", None)}

    def __setstate__(self, state):
        self._count, self._mean, self._m2 = state["count"], state["mean"], state["m2"]
        if state["shape"] is not None:
            self._shape = tuple(state["shape"])


# ------------------------------------------------------------------ batch norm

def _check_bn(x, weight, bias, running_mean, running_var, training, eps, axis, n_threads):
    # float16 stays float16 here: _forward widens it a piece at a time where it can
    arr, dtype = float_input(x, "x", n_threads, widen=False)
    if arr.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (N, C, ...), got shape {arr.shape}")
    ax = normalize_axis(axis, arr.ndim)
    nch = arr.shape[ax]
    shape = (nch,)
    w = param_vector(weight, "weight", shape)
    b = param_vector(bias, "bias", shape)
    rm = running_stat(running_mean, "running_mean", shape)
    rv = running_stat(running_var, "running_var", shape)
    eps = check_eps(eps)
    if training:
        per_channel = arr.size // nch if nch else 0
        if per_channel == 1:
            raise ValueError(f"expected more than 1 value per channel when training, "
                             f"got x of shape {arr.shape} (channel axis {ax})")
    elif rm is None or rv is None:
        raise ValueError("running_mean and running_var are required when training=False")
    return arr, dtype, ax, w, b, rm, rv, eps


def _forward(x, weight, bias, training, running_mean, running_var, momentum, eps, axis,
             out, n_threads):
    arr, dtype, ax, w, b, rm, rv, eps = _check_bn(x, weight, bias, running_mean, running_var,
                                                 training, eps, axis, n_threads)
    update = training and (rm is not None or rv is not None)
    if update:
        momentum = check_real(momentum, "momentum")
        check_writeable(rm, "running_mean")
        check_writeable(rv, "running_var")
    out = check_out(out, arr.shape, dtype)
    nt = resolve_threads(n_threads)
    nch = arr.shape[ax]
    mean = np.empty(nch, _F64)
    invstd = np.empty(nch, _F64)
    if training:
        var = np.empty(nch, _F64)
    else:
        mean[...] = rm
        var = np.array(rv, dtype=_F64)
    if arr.size == 0:
        y = out if out is not None else np.empty(arr.shape, dtype)
        if training:
            mean.fill(np.nan)
            invstd.fill(np.nan)
        else:
            invstd[...] = invstd_of(var, eps)
        return y, mean, invstd
    v = canonical_view(arr, ax)
    if arr.dtype == _F16 and (not training or _batchnorm.trains_half(v.outer, v.nch, v.inner)):
        # float16 a piece (eval) or a channel (training) at a time, through float32
        y, yv = output_like(v, dtype, out, ax)
        _batchnorm.forward_half(v.arr, y, v.outer, v.nch, v.inner, v.so, v.sc, yv.so, yv.sc,
                                mean, var, invstd, w, b, training, eps, nt)
    elif arr.dtype == _F16 and v.inner == 1 and v.sc == 1:
        # float16 rows (channels-last): statistics a block of rows widened at a time,
        # the affine from x itself in one pass
        y, yv = output_like(v, dtype, out, ax)
        _batchnorm.rows_train_half(v.arr, y, v.outer, v.nch, v.so, yv.so, mean, var, invstd,
                                   w, b, eps, nt)
    else:
        if arr.dtype == _F16:   # widened whole: the float32 result written over the copy
            arr = half_to_float(arr, nt)
            v = canonical_view(arr, ax)
        y, yv = (v.arr, v) if in_half_input(dtype, out) else output_like(v, dtype, out, ax)
        _batchnorm.forward(v.arr, y, v.outer, v.nch, v.inner, v.so, v.sc, yv.so, yv.sc,
                           mean, var, invstd, w, b, training, eps, nt)
    if update:
        m = arr.size // nch
        _update_running(rm, mean, momentum, 1.0)
        _update_running(rv, var, momentum, m / (m - 1))
    return finish_output(y, out, dtype, n_threads), mean, invstd


def _update_running(r, batch, momentum, factor):
    """r = (1 - momentum) * r + momentum * factor * batch in place (PyTorch's convention)."""
    if r is None:
        return
    if r.dtype in (np.float32, np.float64) and r.dtype.isnative:
        _batchnorm.update_running(r, batch, momentum, factor)
    else:
        r[...] = (1 - momentum) * r.astype(_F64) + momentum * factor * batch


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, out=None, n_threads=None):
    """Batch normalization, as ``torch.nn.functional.batch_norm``.

    Parameters
    ----------
    x : array_like, float16/float32/float64, at least 2-D
        Input; ``axis`` is the channel axis (1 for NCHW, -1 for channels-last).
    running_mean, running_var : ndarray (C,) or None
        Running statistics. Used when ``training`` is False; updated in place when
        training as ``r = (1 - momentum) * r + momentum * batch`` (unbiased variance).
        In training either may be None, and only the other is updated (PyTorch asks for
        both or neither).
    weight, bias : array_like (C,), optional
        Per-channel affine transform.
    training : bool
        Normalise with the batch statistics (biased variance) instead of running ones.
    momentum, eps : float
    out : ndarray, optional
        Where to write y (same shape and dtype as x; may be x itself).
    n_threads : int, optional
        Threads (default: OpenMP's default). Results are bitwise identical for any value.

    Returns
    -------
    y : ndarray, x's shape and dtype

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.random.default_rng(0).normal(3, 2, (8, 4, 5, 5)).astype(np.float32)
    >>> rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    >>> y = bncore.batch_norm(x, rm, rv, training=True)
    >>> bool(abs(y.mean()) < 1e-5)
    True
    """
    # the common call in one Cython step (None: anything else)
    res = _batchnorm.forward_common(x, running_mean, running_var, weight, bias, training,
                                    momentum, eps, axis, n_threads, out, False)
    if res is not None:
        return res[0]
    return _forward(x, weight, bias, training, running_mean, running_var, momentum, eps,
                    axis, out, n_threads)[0]


def batch_norm_forward(x, weight=None, bias=None, *, training=True, running_mean=None,
                       running_var=None, momentum=0.1, eps=1e-5, axis=1, out=None,
                       n_threads=None):
    """Batch-norm forward that also returns what the backward pass needs.

    Returns
    -------
    y : ndarray, x's shape and dtype
    save_mean, save_invstd : ndarray (C,)
        Batch mean and 1/sqrt(var + eps) in training; in eval the running mean and
        1/sqrt(running_var + eps). float32 for float16/float32 input, else float64.

    See :func:`batch_norm` for the parameters, but for ``training``, which is True by
    default here (the forward of a training step): running statistics passed to it are
    updated unless ``training=False``.

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    >>> y, mean, invstd = bncore.batch_norm_forward(x)
    >>> mean.shape, invstd.dtype
    ((3,), dtype('float32'))
    """
    # the common call in one Cython step (None: anything else)
    res = _batchnorm.forward_common(x, running_mean, running_var, weight, bias, training,
                                    momentum, eps, axis, n_threads, out)
    if res is not None:
        return res   # mean and invstd already in the statistics' dtype
    y, mean, invstd = _forward(x, weight, bias, training, running_mean, running_var, momentum,
                               eps, axis, out, n_threads)
    sdt = np.float32 if y.dtype.itemsize <= 4 else np.float64
    return y, mean.astype(sdt), invstd.astype(sdt)


def batch_norm_backward(dy, x, save_mean, save_invstd, weight=None, *, training=True,
                        axis=1, out=None, n_threads=None):
    """Gradients of batch norm: (dx, dweight, dbias).

    Parameters
    ----------
    dy : array_like
        Gradient of the loss with respect to y; x's shape and dtype.
    x : array_like
        The forward input.
    save_mean, save_invstd : array_like (C,)
        From :func:`batch_norm_forward` (training or eval, matching ``training``).
    weight : array_like (C,), optional
    training : bool
        True: the statistics depended on x (full gradient). False: eval mode,
        dx = dy * weight * invstd.
    axis : int
        The channel axis, as in the forward call.
    out : ndarray, optional
        Where to write dx (may be dy itself).
    n_threads : int, optional
        Threads (default: OpenMP's default). Results are bitwise identical for any value.

    Returns
    -------
    dx : ndarray, x's shape and dtype
    dweight, dbias : ndarray (C,), x's dtype (float32 for float16)

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.random.default_rng(0).normal(size=(16, 3))
    >>> y, m, s = bncore.batch_norm_forward(x)
    >>> dx, dw, db = bncore.batch_norm_backward(np.ones_like(x), x, m, s)
    >>> bool(np.allclose(dx, 0))
    True
    """
    # the common call in one Cython step (None: anything else)
    res = _batchnorm.backward_common(dy, x, save_mean, save_invstd, weight, training, axis,
                                     n_threads, out)
    if res is not None:
        return res   # dweight and dbias already in the statistics' dtype
    arr, dtype = float_input(x, "x", n_threads, widen=False)   # float16: see below
    if arr.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (N, C, ...), got shape {arr.shape}")
    g = same_float_input(dy, "dy", dtype, arr.shape, n_threads, widen=False)
    ax = normalize_axis(axis, arr.ndim)
    nch = arr.shape[ax]
    mean = param_vector(save_mean, "save_mean", (nch,))
    invstd = param_vector(save_invstd, "save_invstd", (nch,))
    if mean is None or invstd is None:
        raise TypeError("save_mean and save_invstd are required (from batch_norm_forward)")
    w = param_vector(weight, "weight", (nch,))
    out = check_out(out, arr.shape, dtype)
    nt = resolve_threads(n_threads)
    sdt = np.float32 if dtype.itemsize <= 4 else np.float64
    dweight = np.zeros(nch, _F64)
    dbias = np.zeros(nch, _F64)
    if arr.size == 0:
        dx = out if out is not None else np.empty(arr.shape, dtype)
        return dx, dweight.astype(sdt), dbias.astype(sdt)
    v = canonical_view(arr, ax)
    gv = matching_view(g, ax, v)
    rows = v.inner == 1 and v.sc == 1 and gv.sc == 1
    if dtype == _F16 and _batchnorm.backward_halves(v.outer, v.nch, v.inner, rows):
        # float16 a channel (planes) or a piece of rows at a time, or read as float16
        dx, dv = output_like(gv, dtype, out, ax, v.arr)
        _batchnorm.backward_half(gv.arr, v.arr, dx, v.outer, v.nch, v.inner, gv.so, gv.sc,
                                 v.so, v.sc, dv.so, dv.sc, mean, invstd, w, training, dweight,
                                 dbias, nt)
        return (finish_output(dx, out, dtype, n_threads), dweight.astype(sdt),
                dbias.astype(sdt))
    if dtype == _F16:   # widened whole, dx written over dy's float32 copy
        arr = half_to_float(arr, nt)
        g = half_to_float(g, nt, arr)
        v = canonical_view(arr, ax)
        gv = matching_view(g, ax, v)
    dx, dv = ((gv.arr, gv) if in_half_input(dtype, out)
              else output_like(gv, dtype, out, ax, v.arr))
    _batchnorm.backward(gv.arr, v.arr, dx, v.outer, v.nch, v.inner, gv.so, gv.sc, v.so, v.sc,
                        dv.so, dv.sc, mean, invstd, w, training, dweight, dbias, nt)
    return finish_output(dx, out, dtype, n_threads), dweight.astype(sdt), dbias.astype(sdt)
