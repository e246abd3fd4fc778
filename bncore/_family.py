"""Layer, RMS, group and instance norm: forward and backward.

Layer and RMS norm run the fused row kernels of bncore._rownorm. Group and instance norm
are batch norm on other views, so they reuse the batch-norm kernels:

- instance norm, NCHW: batch norm of the (1, N*C, HW) view (one fused pass);
- group norm, NCHW: moments of the (1, N*G, C/G*HW) view, then the per-(n, c) affine;
- channels-last (N, HW, C): per-sample rows views, all samples in one parallel region
  (one sample per thread); group statistics are per-channel moments merged into groups
  with the one Chan merge (bncore._stats.merge_moments).
Backward: per-(n, c) sums from the batch-norm backward kernel, group sums in NumPy
(O(N*C)), then dx = k*dy + q*(x - mean) + r from per-(n, c) coefficients.
"""
import math
import operator

import numpy as np

from bncore import _api, _batchnorm, _rownorm, _stats
from bncore._validation import (
    check_eps, check_out, check_real, check_writeable, finish_output, float_input,
    normalize_axis, param_vector, resolve_threads, running_stat, same_float_input,
)

__all__ = [
    "layer_norm", "layer_norm_forward", "layer_norm_backward",
    "rms_norm", "rms_norm_forward", "rms_norm_backward",
    "group_norm", "group_norm_forward", "group_norm_backward",
    "instance_norm", "instance_norm_forward", "instance_norm_backward",
]

_F64 = np.dtype(np.float64)


def _stat_dtype(dtype):
    return np.dtype(np.float32) if dtype.itemsize <= 4 else _F64


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
                         f"{arr.shape}")
    return shape


def _rows(a, nrows, d):
    """(array of nrows rows of d contiguous values, row stride in elements)."""
    r = a.reshape(nrows, d)
    if d > 1 and r.strides[1] != r.itemsize or r.strides[0] % r.itemsize:
        r = np.ascontiguousarray(r)
    return r, (r.strides[0] // r.itemsize if nrows > 1 else d)


def _row_forward(x, normalized_shape, weight, bias, eps, out, n_threads, rms):
    arr, dtype = float_input(x)
    shape = _normalized_shape(arr, normalized_shape)
    if rms and eps is None:
        eps = float(np.finfo(np.asarray(x).dtype).eps)
    eps = check_eps(eps)
    w = param_vector(weight, "weight", shape)
    b = None if rms else param_vector(bias, "bias", shape)
    out = check_out(out, arr.shape, dtype)
    nt = resolve_threads(n_threads)
    lead = arr.shape[:arr.ndim - len(shape)]
    nrows, d = math.prod(lead), math.prod(shape)
    mean = np.empty(nrows, _F64)
    invstd = np.empty(nrows, _F64)
    if nrows == 0 or d == 0:
        mean.fill(np.nan)
        invstd.fill(np.nan)
        return (out if out is not None else np.empty(arr.shape, dtype)), mean.reshape(lead), \
            invstd.reshape(lead)
    xr, ldx = _rows(arr, nrows, d)
    direct = out is not None and out.dtype == arr.dtype and out.flags.c_contiguous and (
        not np.may_share_memory(out, arr) or out.ctypes.data == arr.ctypes.data)
    y = out if direct else np.empty(arr.shape, arr.dtype)
    # weight/bias in x's dtype: the row kernel computes in it (float: hi+lo split mean)
    _rownorm.forward(xr, y, nrows, d, ldx, d, eps,
                     None if w is None else w.ravel().astype(arr.dtype),
                     None if b is None else b.ravel().astype(arr.dtype), mean, invstd, rms, nt)
    return finish_output(y, out, dtype), mean.reshape(lead), invstd.reshape(lead)


def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None,
                       n_threads=None):
    """Layer norm that also returns (mean, invstd) per row for the backward pass.

    Returns
    -------
    y : ndarray, x's shape and dtype
    mean, invstd : ndarray of shape ``x.shape[:-len(normalized_shape)]``
        float32 for float16/float32 input, else float64.

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    >>> y, mean, invstd = bncore.layer_norm_forward(x, 8)
    >>> mean.shape
    (4,)
    """
    y, mean, invstd = _row_forward(x, normalized_shape, weight, bias, eps, out, n_threads,
                                   rms=False)
    sdt = _stat_dtype(y.dtype)
    return y, mean.astype(sdt), invstd.astype(sdt)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None,
               n_threads=None):
    """Layer normalization over the trailing ``normalized_shape`` dims, as F.layer_norm.

    Parameters
    ----------
    x : array_like, float16/float32/float64
    normalized_shape : int or tuple of ints
        The trailing dimensions to normalise over.
    weight, bias : array_like of shape ``normalized_shape``, optional
    eps : float
    out : ndarray, optional
        Where to write y (x's shape and dtype).
    n_threads : int, optional
        Results are bitwise identical for any value.

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.arange(6.0).reshape(2, 3)
    >>> bncore.layer_norm(x, 3, eps=0.0).round(4)
    array([[-1.2247,  0.    ,  1.2247],
           [-1.2247,  0.    ,  1.2247]])
    """
    return _row_forward(x, normalized_shape, weight, bias, eps, out, n_threads, rms=False)[0]


def _row_backward(dy, x, mean, invstd, normalized_shape, weight, out, n_threads, rms):
    arr, dtype = float_input(x)
    shape = _normalized_shape(arr, normalized_shape)
    g = same_float_input(dy, "dy", dtype, arr.shape)
    lead = arr.shape[:arr.ndim - len(shape)]
    nrows, d = math.prod(lead), math.prod(shape)
    name = "invrms" if rms else "invstd"
    m = None if rms else param_vector(mean, "mean", lead)
    s = param_vector(invstd, name, lead)
    if s is None or (m is None and not rms):
        raise TypeError(f"the saved statistics (mean, {name}) are required")
    w = param_vector(weight, "weight", shape)
    out = check_out(out, arr.shape, dtype)
    nt = resolve_threads(n_threads)
    dweight = np.zeros(d, _F64)
    dbias = np.zeros(d, _F64)
    if nrows == 0 or d == 0:
        dx = out if out is not None else np.empty(arr.shape, dtype)
    else:
        xr, ldx = _rows(arr, nrows, d)
        gr, ldg = _rows(g, nrows, d)
        dx = np.empty(arr.shape, arr.dtype)
        _rownorm.backward(gr, xr, dx, nrows, d, ldg, ldx, d,
                          None if m is None else m.ravel(), s.ravel(),
                          np.ones(d) if w is None else w.ravel(), dweight, dbias, rms, nt)
        dx = finish_output(dx, out, dtype)
    sdt = _stat_dtype(np.dtype(dtype))
    return dx, dweight.reshape(shape).astype(sdt), dbias.reshape(shape).astype(sdt)


def layer_norm_backward(dy, x, mean, invstd, normalized_shape, weight=None, *, out=None,
                        n_threads=None):
    """Gradients of layer norm: (dx, dweight, dbias); dweight/dbias of normalized_shape.

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.random.default_rng(0).normal(size=(4, 8))
    >>> y, m, s = bncore.layer_norm_forward(x, 8)
    >>> dx, dw, db = bncore.layer_norm_backward(np.ones_like(x), x, m, s, 8)
    >>> bool(np.allclose(dx, 0))
    True
    """
    return _row_backward(dy, x, mean, invstd, normalized_shape, weight, out, n_threads,
                         rms=False)


def rms_norm_forward(x, normalized_shape, weight=None, eps=None, *, out=None, n_threads=None):
    """RMS norm that also returns invrms = 1/sqrt(mean(x**2) + eps) per row.

    Examples
    --------
    >>> import numpy as np, bncore
    >>> y, invrms = bncore.rms_norm_forward(np.full((2, 4), 2.0), 4, eps=0.0)
    >>> invrms
    array([0.5, 0.5])
    """
    y, _, invrms = _row_forward(x, normalized_shape, weight, None, eps, out, n_threads,
                                rms=True)
    return y, invrms.astype(_stat_dtype(y.dtype))


def rms_norm(x, normalized_shape, weight=None, eps=None, *, out=None, n_threads=None):
    """RMS normalization, as ``torch.nn.functional.rms_norm``.

    ``eps=None`` uses the machine epsilon of x's dtype, as PyTorch does.

    Examples
    --------
    >>> import numpy as np, bncore
    >>> bncore.rms_norm(np.array([[3.0, 4.0]]), 2, eps=0.0).round(4)
    array([[0.8485, 1.1314]])
    """
    return _row_forward(x, normalized_shape, weight, None, eps, out, n_threads, rms=True)[0]


def rms_norm_backward(dy, x, invrms, normalized_shape, weight=None, *, out=None,
                      n_threads=None):
    """Gradients of RMS norm: (dx, dweight).

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
    """x as a C-contiguous (N, C, S) (NCHW-like) or (N, S, C) (channels-last) array."""

    def __init__(self, x, axis, name="x"):
        arr, self.dtype = float_input(x, name)
        if arr.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (N, C, ...), "
                             f"got shape {arr.shape}")
        ax = normalize_axis(axis, arr.ndim)
        if ax not in (1, arr.ndim - 1):
            raise ValueError(f"axis must be 1 (N, C, ...) or -1 (channels-last), got {axis}")
        self.cl = ax == arr.ndim - 1 and arr.ndim > 2
        self.shape = arr.shape
        self.n, self.c = arr.shape[0], arr.shape[ax]
        self.s = math.prod(arr.shape[2:]) if not self.cl else math.prod(arr.shape[1:-1])
        self.arr = np.ascontiguousarray(arr)

    def like(self, a, name):
        return np.ascontiguousarray(same_float_input(a, name, self.dtype, self.shape))


def _check_groups(num_groups, c):
    try:
        g = operator.index(num_groups)
    except TypeError:
        raise TypeError(f"num_groups must be an int, got {num_groups!r}") from None
    if g < 1 or c % g:
        raise ValueError(f"num_groups ({num_groups}) must be a positive divisor of the "
                         f"number of channels ({c})")
    return g


def _channel_moments(sp, nt):
    """Per-(n, c) mean and M2, float64 (N, C)."""
    mean = np.empty((sp.n, sp.c), _F64)
    m2 = np.empty((sp.n, sp.c), _F64)
    if sp.cl:   # per-sample rows statistics, all samples in one parallel region
        _stats.sample_moments(sp.arr, sp.n, sp.s, sp.c, mean, m2, nt)
    else:
        _stats.channel_moments(sp.arr, 1, sp.n * sp.c, sp.s, 0, sp.s, mean, m2, nt)
    return mean, m2


def _group_moments(sp, g, nt):
    """Per-(n, group) mean and biased variance, float64 (N, G)."""
    cg = sp.c // g
    if not sp.cl:   # each group is one contiguous run of cg * s values
        mean = np.empty((sp.n, g), _F64)
        m2 = np.empty((sp.n, g), _F64)
        _stats.channel_moments(sp.arr, 1, sp.n * g, cg * sp.s, 0, cg * sp.s, mean, m2, nt)
        return mean, m2 / (cg * sp.s)
    cm, cm2 = _channel_moments(sp, nt)
    cm, cm2 = cm.reshape(sp.n * g, cg), cm2.reshape(sp.n * g, cg)
    mean, m2 = cm[:, 0].copy(), cm2[:, 0].copy()
    for j in range(1, cg):   # merge the group's channels one by one (Chan, exact)
        _stats.merge_moments(float(j * sp.s), mean, m2, float(sp.s),
                             np.ascontiguousarray(cm[:, j]), np.ascontiguousarray(cm2[:, j]))
    return mean.reshape(sp.n, g), m2.reshape(sp.n, g) / (cg * sp.s)


def _per_channel_affine(sp, y, mean_nc, var_nc, w, b, eps, nt):
    """y = (x - mean[n, c]) / sqrt(var[n, c] + eps) * w[c] + b[c] with per-(n, c) stats."""
    invstd = np.empty((sp.n, sp.c), _F64)
    if sp.cl:
        _batchnorm.batched_rows("forward", sp.arr, y, None, sp.n, sp.s, sp.c,
                                np.ascontiguousarray(mean_nc), np.ascontiguousarray(var_nc),
                                invstd, w, b, False, eps, nt)
    else:
        wt = None if w is None else np.tile(w, sp.n)
        bt = None if b is None else np.tile(b, sp.n)
        _batchnorm.forward(sp.arr, y, 1, sp.n * sp.c, sp.s, 0, sp.s, 0, sp.s,
                           mean_nc.reshape(-1), var_nc.reshape(-1), invstd.reshape(-1), wt, bt,
                           False, eps, nt)
    return invstd


def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, out=None,
                       n_threads=None):
    """Group norm that also returns (mean, invstd) of shape (N, num_groups).

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.random.default_rng(0).normal(size=(2, 6, 4, 4)).astype(np.float32)
    >>> y, mean, invstd = bncore.group_norm_forward(x, 3)
    >>> mean.shape
    (2, 3)
    """
    sp = _Spatial(x, axis)
    g = _check_groups(num_groups, sp.c)
    w = param_vector(weight, "weight", (sp.c,))
    b = param_vector(bias, "bias", (sp.c,))
    eps = check_eps(eps)
    out = check_out(out, sp.shape, sp.dtype)
    nt = resolve_threads(n_threads)
    if sp.n and (sp.c // g) * sp.s == 1:
        raise ValueError(f"expected more than 1 value per group, got x of shape {sp.shape} "
                         f"with {g} groups")
    sdt = _stat_dtype(np.dtype(sp.dtype))
    if sp.arr.size == 0:
        empty = np.full((sp.n, g), np.nan, sdt)
        return (out if out is not None else np.empty(sp.shape, sp.dtype)), empty, empty.copy()
    cg = sp.c // g
    y = np.empty(sp.arr.shape, sp.arr.dtype)
    if not sp.cl:   # one fused pass: each group is contiguous
        mean = np.empty((sp.n, g), _F64)
        var = np.empty((sp.n, g), _F64)
        _rownorm.group_forward(sp.arr, y, sp.n, g, cg, sp.s, eps, w, b, mean, var, nt)
    else:           # channel moments merged into groups, then the per-channel affine
        mean, var = _group_moments(sp, g, nt)
        _per_channel_affine(sp, y, np.repeat(mean, cg, axis=1), np.repeat(var, cg, axis=1),
                            w, b, eps, nt)
    invstd = 1.0 / np.sqrt(var + eps)
    return finish_output(y, out, sp.dtype), mean.astype(sdt), invstd.astype(sdt)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, out=None,
               n_threads=None):
    """Group normalization, as ``torch.nn.functional.group_norm``.

    Parameters
    ----------
    x : array_like (N, C, ...) for axis=1, or (N, ..., C) for axis=-1 (channels-last)
    num_groups : int
        Must divide C; statistics per (sample, group).
    weight, bias : array_like (C,), optional
        Per-channel affine.

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.random.default_rng(0).normal(size=(2, 4, 3, 3))
    >>> y = bncore.group_norm(x, 2)
    >>> bool(abs(y[0, :2].mean()) < 1e-12)
    True
    """
    return group_norm_forward(x, num_groups, weight, bias, eps, axis=axis, out=out,
                              n_threads=n_threads)[0]


def _backward_sums(sp, g, mean_nc, invstd_nc, nt):
    """Per-(n, c) sum(dy) and sum(dy * xhat) of the canonical arrays (float64 (N, C))."""
    sdy = np.empty((sp.n, sp.c), _F64)
    sdyx = np.empty((sp.n, sp.c), _F64)
    if sp.cl:
        _batchnorm.batched_rows("sums", g, sp.arr, None, sp.n, sp.s, sp.c,
                                np.ascontiguousarray(mean_nc), sdyx, sdy, None, None, True,
                                0.0, nt, k=np.ascontiguousarray(invstd_nc))
    else:
        _batchnorm.backward(g, sp.arr, None, 1, sp.n * sp.c, sp.s, 0, sp.s, 0, sp.s, 0, 0,
                            mean_nc.reshape(-1), invstd_nc.reshape(-1), None, True,
                            sdyx.reshape(-1), sdy.reshape(-1), nt)
    return sdy, sdyx


def _apply_dx(sp, g, dx, mean_nc, k, q, r, nt):
    if sp.cl:
        m, kk, qq, rr = (np.ascontiguousarray(a, _F64) for a in (mean_nc, k, q, r))
        _batchnorm.batched_rows("dx", g, sp.arr, dx, sp.n, sp.s, sp.c, m, m, m, None, None,
                                True, 0.0, nt, k=kk, q=qq, r=rr)
    else:
        _batchnorm.apply_dx(g, sp.arr, dx, 1, sp.n * sp.c, sp.s, 0, sp.s, 0, sp.s, 0, sp.s,
                            *(np.ascontiguousarray(a).reshape(-1) for a in (mean_nc, k, q, r)),
                            nt)


def group_norm_backward(dy, x, mean, invstd, num_groups, weight=None, *, axis=1, out=None,
                        n_threads=None):
    """Gradients of group norm: (dx, dweight, dbias); mean/invstd (N, num_groups).

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.random.default_rng(0).normal(size=(2, 4, 3, 3))
    >>> y, m, s = bncore.group_norm_forward(x, 2)
    >>> dx, dw, db = bncore.group_norm_backward(np.ones_like(x), x, m, s, 2)
    >>> bool(np.allclose(dx, 0))
    True
    """
    sp = _Spatial(x, axis)
    g = _check_groups(num_groups, sp.c)
    gy = sp.like(dy, "dy")
    mean = param_vector(mean, "mean", (sp.n, g))
    invstd = param_vector(invstd, "invstd", (sp.n, g))
    if mean is None or invstd is None:
        raise TypeError("mean and invstd (from group_norm_forward) are required")
    w = param_vector(weight, "weight", (sp.c,))
    out = check_out(out, sp.shape, sp.dtype)
    nt = resolve_threads(n_threads)
    sdt = _stat_dtype(np.dtype(sp.dtype))
    if sp.arr.size == 0:
        z = np.zeros(sp.c, sdt)
        return (out if out is not None else np.empty(sp.shape, sp.dtype)), z, z.copy()
    cg = sp.c // g
    mean_nc = np.repeat(mean, cg, axis=1)
    inv_nc = np.repeat(invstd, cg, axis=1)
    sdy, sdyx = _backward_sums(sp, gy, mean_nc, inv_nc, nt)   # sdyx = sum(dy * xhat)
    wv = np.ones(sp.c) if w is None else w
    m = cg * sp.s
    a = (sdy * wv).reshape(sp.n, g, cg).sum(axis=2)          # sum over the group of w*dy
    bsum = (sdyx * wv).reshape(sp.n, g, cg).sum(axis=2)      # ... of w*dy*xhat
    k = inv_nc * wv
    q = np.repeat(-invstd * invstd * bsum / m, cg, axis=1)
    r = np.repeat(-invstd * a / m, cg, axis=1)
    dx = np.empty(sp.arr.shape, sp.arr.dtype)
    _apply_dx(sp, gy, dx, mean_nc, k, q, r, nt)
    return (finish_output(dx, out, sp.dtype), sdyx.sum(axis=0).astype(sdt),
            sdy.sum(axis=0).astype(sdt))


def instance_norm_forward(x, weight=None, bias=None, *, eps=1e-5, axis=1, out=None,
                          n_threads=None):
    """Instance norm with input statistics; also returns (mean, invstd) of shape (N, C).

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype(np.float32)
    >>> y, mean, invstd = bncore.instance_norm_forward(x)
    >>> mean.shape
    (2, 3)
    """
    y, mean, var, sp = _instance(x, weight, bias, eps, axis, out, n_threads)
    sdt = _stat_dtype(np.dtype(sp.dtype))
    return y, mean.astype(sdt), (1.0 / np.sqrt(var + check_eps(eps))).astype(sdt)


def _instance(x, weight, bias, eps, axis, out, n_threads, extra_check=None):
    sp = _Spatial(x, axis)
    w = param_vector(weight, "weight", (sp.c,))
    b = param_vector(bias, "bias", (sp.c,))
    eps = check_eps(eps)
    out = check_out(out, sp.shape, sp.dtype)
    nt = resolve_threads(n_threads)
    if sp.n and sp.c and sp.s == 1:
        raise ValueError(f"expected more than 1 spatial element per instance when using "
                         f"input statistics, got x of shape {sp.shape}")
    if extra_check is not None:
        extra_check(sp)
    if sp.arr.size == 0:
        nan = np.full((sp.n, sp.c), np.nan)
        return (out if out is not None else np.empty(sp.shape, sp.dtype)), nan, nan.copy(), sp
    y = np.empty(sp.arr.shape, sp.arr.dtype)
    mean = np.empty((sp.n, sp.c), _F64)
    var = np.empty((sp.n, sp.c), _F64)
    inv = np.empty((sp.n, sp.c), _F64)
    if sp.cl:   # batch norm of each sample's (S, C) rows, one sample per thread, in cache
        _batchnorm.batched_rows("forward", sp.arr, y, None, sp.n, sp.s, sp.c, mean, var, inv,
                                w, b, True, eps, nt)
    else:   # batch norm of the (1, N*C, S) view: statistics and normalisation fused
        _batchnorm.forward(sp.arr, y, 1, sp.n * sp.c, sp.s, 0, sp.s, 0, sp.s,
                           mean.reshape(-1), var.reshape(-1), inv.reshape(-1),
                           None if w is None else np.tile(w, sp.n),
                           None if b is None else np.tile(b, sp.n), True, eps, nt)
    return finish_output(y, out, sp.dtype), mean, var, sp


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, axis=1, out=None,
                  n_threads=None):
    """Instance normalization, as ``torch.nn.functional.instance_norm``.

    With ``use_input_stats`` each (sample, channel) is normalised by its own statistics
    and the running stats, when given, are updated in place with their batch average
    (unbiased variance); without it the running stats normalise (like eval batch norm).

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.random.default_rng(0).normal(size=(2, 3, 4, 4))
    >>> y = bncore.instance_norm(x)
    >>> bool(np.allclose(y.mean(axis=(2, 3)), 0))
    True
    """
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when "
                             "use_input_stats=False")
        return _api.batch_norm(x, running_mean, running_var, weight, bias, training=False,
                               eps=eps, axis=axis, out=out, n_threads=n_threads)
    rm, rv = running_mean, running_var
    momentum = check_real(momentum, "momentum")

    def check_running(sp):
        for r, name in ((rm, "running_mean"), (rv, "running_var")):
            running_stat(r, name, (sp.c,))
            check_writeable(r, name)

    y, mean, var, sp = _instance(x, weight, bias, eps, axis, out, n_threads, check_running)
    if sp.arr.size:
        _api._update_running(rm, np.ascontiguousarray(mean.mean(axis=0)), momentum, 1.0)
        _api._update_running(rv, np.ascontiguousarray(var.mean(axis=0)), momentum,
                             sp.s / (sp.s - 1))
    return y


def instance_norm_backward(dy, x, mean, invstd, weight=None, *, axis=1, out=None,
                           n_threads=None):
    """Gradients of instance norm: (dx, dweight, dbias); mean/invstd of shape (N, C).

    Examples
    --------
    >>> import numpy as np, bncore
    >>> x = np.random.default_rng(0).normal(size=(2, 3, 4, 4))
    >>> y, m, s = bncore.instance_norm_forward(x)
    >>> dx, dw, db = bncore.instance_norm_backward(np.ones_like(x), x, m, s)
    >>> bool(np.allclose(dx, 0))
    True
    """
    sp = _Spatial(x, axis)
    if sp.c == 0:   # no channels: nothing to normalise (group norm needs a group)
        sp.like(dy, "dy")
        param_vector(weight, "weight", (0,))
        out = check_out(out, sp.shape, sp.dtype)
        z = np.zeros(0, _stat_dtype(np.dtype(sp.dtype)))
        return (out if out is not None else np.empty(sp.shape, sp.dtype)), z, z.copy()
    return group_norm_backward(dy, x, mean, invstd, sp.c, weight, axis=axis, out=out,
                               n_threads=n_threads)
