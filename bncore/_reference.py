"""Pure-NumPy float64 twins of every public function: the test oracle.

Written straight from the definitions, for clarity rather than speed: statistics with
``np.mean``/``np.var`` on float64 copies, backward passes from the calculus. Results are
float64 arrays. Running statistics passed in are updated in place like the real ones.
Twins take the same arguments as the public functions (``out`` and ``n_threads`` are
accepted and ignored).
"""
import numpy as np

__all__ = [
    "moments", "batch_norm", "batch_norm_forward", "batch_norm_backward",
    "layer_norm", "layer_norm_forward", "layer_norm_backward",
    "group_norm", "group_norm_forward", "group_norm_backward",
    "instance_norm", "instance_norm_forward", "instance_norm_backward",
    "rms_norm", "rms_norm_forward", "rms_norm_backward",
]


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def moments(x, axis=None, *, ddof=0, keepdims=False, n_threads=None):
    x = _f64(x)
    axis = tuple(axis) if isinstance(axis, (tuple, list)) else axis
    with np.errstate(all="ignore"):
        return (np.mean(x, axis=axis, keepdims=keepdims),
                np.var(x, axis=axis, ddof=ddof, keepdims=keepdims))


# ------------------------------------------------------------------ batch norm

def _channels_first(a, axis):
    """Move the channel axis to 1 ((N, C, ...) layout) and remember how to move it back."""
    axis = axis % a.ndim
    return np.moveaxis(a, axis, 1), axis


def _bshape(ndim):
    return (1, -1) + (1,) * (ndim - 2)


def batch_norm_forward(x, weight=None, bias=None, *, training=True, running_mean=None,
                       running_var=None, momentum=0.1, eps=1e-5, axis=1, out=None,
                       n_threads=None):
    x, ax = _channels_first(_f64(x), axis)
    red = (0,) + tuple(range(2, x.ndim))
    nch = x.shape[1]
    if training:
        m = x.size // nch if nch else 0
        if m == 1:
            raise ValueError("expected more than 1 value per channel when training")
        mean = x.mean(axis=red) if m else np.full(nch, np.nan)
        var = x.var(axis=red) if m else np.full(nch, np.nan)
        if m:
            if running_mean is not None:
                running_mean[...] = (1 - momentum) * _f64(running_mean) + momentum * mean
            if running_var is not None:
                running_var[...] = ((1 - momentum) * _f64(running_var)
                                    + momentum * var * m / (m - 1))
    else:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when training=False")
        # copies: save_mean must not alias (and later follow) the caller's running_mean
        mean = np.array(running_mean, dtype=np.float64)
        var = np.array(running_var, dtype=np.float64)
    invstd = 1.0 / np.sqrt(var + eps)
    y = (x - mean.reshape(_bshape(x.ndim))) * invstd.reshape(_bshape(x.ndim))
    if weight is not None:
        y = y * _f64(weight).reshape(_bshape(x.ndim))
    if bias is not None:
        y = y + _f64(bias).reshape(_bshape(x.ndim))
    return np.moveaxis(y, 1, ax), mean, invstd


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, out=None, n_threads=None):
    return batch_norm_forward(x, weight, bias, training=training, running_mean=running_mean,
                              running_var=running_var, momentum=momentum, eps=eps,
                              axis=axis)[0]


def batch_norm_backward(dy, x, save_mean, save_invstd, weight=None, *, training=True,
                        axis=1, out=None, n_threads=None):
    x, ax = _channels_first(_f64(x), axis)
    dy = np.moveaxis(_f64(dy), ax, 1)
    red = (0,) + tuple(range(2, x.ndim))
    b = _bshape(x.ndim)
    mean, invstd = _f64(save_mean), _f64(save_invstd)
    w = np.ones(x.shape[1]) if weight is None else _f64(weight)
    xhat = (x - mean.reshape(b)) * invstd.reshape(b)
    dbias = dy.sum(axis=red)
    dweight = (dy * xhat).sum(axis=red)
    k = (w * invstd).reshape(b)
    if training:
        m = x.size // x.shape[1]
        dx = k * (dy - dbias.reshape(b) / m - xhat * dweight.reshape(b) / m)
    else:
        dx = k * dy
    return np.moveaxis(dx, 1, ax), dweight, dbias


# ------------------------------------------------------------------ layer / RMS norm

def _norm_axes(x, normalized_shape):
    shape = (normalized_shape,) if np.ndim(normalized_shape) == 0 else tuple(normalized_shape)
    return shape, tuple(range(x.ndim - len(shape), x.ndim))


def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None,
                       n_threads=None):
    x = _f64(x)
    shape, red = _norm_axes(x, normalized_shape)
    mean = x.mean(axis=red, keepdims=True)
    invstd = 1.0 / np.sqrt(x.var(axis=red, keepdims=True) + eps)
    y = (x - mean) * invstd
    if weight is not None:
        y = y * _f64(weight)
    if bias is not None:
        y = y + _f64(bias)
    keep = x.shape[:x.ndim - len(shape)]
    return y, mean.reshape(keep), invstd.reshape(keep)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None,
               n_threads=None):
    return layer_norm_forward(x, normalized_shape, weight, bias, eps)[0]


def _row_backward(dy, xhat, invstd, w, red):
    """dx of y = xhat * w with xhat standardised over ``red`` (shared by layer/group/instance)."""
    g = dy * w
    m = np.prod([xhat.shape[a] for a in red])
    return invstd * (g - g.sum(axis=red, keepdims=True) / m
                     - xhat * (g * xhat).sum(axis=red, keepdims=True) / m)


def layer_norm_backward(dy, x, mean, invstd, normalized_shape, weight=None, *, out=None,
                        n_threads=None):
    x, dy = _f64(x), _f64(dy)
    shape, red = _norm_axes(x, normalized_shape)
    lead = tuple(range(x.ndim - len(shape)))
    mean = _f64(mean).reshape(mean.shape + (1,) * len(shape))
    invstd = _f64(invstd).reshape(np.shape(invstd) + (1,) * len(shape))
    w = np.ones(shape) if weight is None else _f64(weight)
    xhat = (x - mean) * invstd
    dx = _row_backward(dy, xhat, invstd, w, red)
    return dx, (dy * xhat).sum(axis=lead), dy.sum(axis=lead)


def rms_norm_forward(x, normalized_shape, weight=None, eps=None, *, out=None, n_threads=None):
    xa = np.asarray(x)
    if eps is None:   # the machine epsilon of the compute type: float32 for float16
        eps = float(np.finfo(np.float32 if xa.dtype.itemsize == 2 else xa.dtype).eps)
    x = _f64(xa)
    shape, red = _norm_axes(x, normalized_shape)
    invrms = 1.0 / np.sqrt((x * x).mean(axis=red, keepdims=True) + eps)
    y = x * invrms
    if weight is not None:
        y = y * _f64(weight)
    return y, invrms.reshape(x.shape[:x.ndim - len(shape)])


def rms_norm(x, normalized_shape, weight=None, eps=None, *, out=None, n_threads=None):
    return rms_norm_forward(x, normalized_shape, weight, eps)[0]


def rms_norm_backward(dy, x, invrms, normalized_shape, weight=None, *, out=None,
                      n_threads=None):
    x, dy = _f64(x), _f64(dy)
    shape, red = _norm_axes(x, normalized_shape)
    lead = tuple(range(x.ndim - len(shape)))
    r = _f64(invrms).reshape(np.shape(invrms) + (1,) * len(shape))
    w = np.ones(shape) if weight is None else _f64(weight)
    g = dy * w
    d = np.prod(shape)
    dx = r * g - x * r ** 3 * (g * x).sum(axis=red, keepdims=True) / d
    return dx, (dy * x * r).sum(axis=lead)


# ------------------------------------------------------------------ group / instance norm

def _grouped(x, axis, num_groups):
    """(N, G, C/G, *spatial) view of a channels-first copy of x."""
    xc, ax = _channels_first(x, axis)
    n, c = xc.shape[:2]
    return xc.reshape((n, num_groups, c // num_groups) + xc.shape[2:]), ax


def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, out=None,
                       n_threads=None):
    x = _f64(x)
    xg, ax = _grouped(x, axis, num_groups)
    red = tuple(range(2, xg.ndim))
    mean = xg.mean(axis=red, keepdims=True)
    invstd = 1.0 / np.sqrt(xg.var(axis=red, keepdims=True) + eps)
    y = ((xg - mean) * invstd).reshape(np.moveaxis(x, ax, 1).shape)
    b = _bshape(y.ndim)
    if weight is not None:
        y = y * _f64(weight).reshape(b)
    if bias is not None:
        y = y + _f64(bias).reshape(b)
    n = x.shape[0]
    return np.moveaxis(y, 1, ax), mean.reshape(n, num_groups), invstd.reshape(n, num_groups)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, out=None,
               n_threads=None):
    return group_norm_forward(x, num_groups, weight, bias, eps, axis=axis)[0]


def group_norm_backward(dy, x, mean, invstd, num_groups, weight=None, *, axis=1, out=None,
                        n_threads=None):
    x, dy = _f64(x), _f64(dy)
    xg, ax = _grouped(x, axis, num_groups)
    dyg, _ = _grouped(dy, axis, num_groups)
    red = tuple(range(2, xg.ndim))
    tail = (1,) * (xg.ndim - 2)
    mean = _f64(mean).reshape(mean.shape + tail)
    invstd = _f64(invstd).reshape(np.shape(invstd) + tail)
    cg = xg.shape[2]
    c = num_groups * cg
    w = np.ones(c) if weight is None else _f64(weight)
    wg = w.reshape((1, num_groups, cg) + (1,) * (xg.ndim - 3))
    xhat = (xg - mean) * invstd
    dx = _row_backward(dyg, xhat, invstd, wg, red).reshape(np.moveaxis(x, ax, 1).shape)
    per_channel = tuple(a for a in range(xg.ndim) if a not in (1, 2))
    dweight = (dyg * xhat).sum(axis=per_channel).reshape(c)
    dbias = dyg.sum(axis=per_channel).reshape(c)
    return np.moveaxis(dx, 1, ax), dweight, dbias


def _check_spatial(x, axis):
    """PyTorch: instance statistics need more than one spatial value per (n, c)."""
    if x.size // (x.shape[0] * x.shape[axis % x.ndim] or 1) == 1:
        raise ValueError("expected more than 1 spatial element per instance when using "
                         "input statistics")


def instance_norm_forward(x, weight=None, bias=None, *, eps=1e-5, axis=1, out=None,
                          n_threads=None):
    xa = _f64(x)
    _check_spatial(xa, axis)
    nch = xa.shape[axis % xa.ndim]
    y, mean, invstd = group_norm_forward(xa, nch, weight, bias, eps, axis=axis)
    return y, mean, invstd


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, axis=1, out=None,
                  n_threads=None):
    xa = _f64(x)
    xc, ax = _channels_first(xa, axis)
    if not use_input_stats:
        mean, var = _f64(running_mean), _f64(running_var)
        b = _bshape(xc.ndim)
        y = (xc - mean.reshape(b)) / np.sqrt(var.reshape(b) + eps)
        if weight is not None:
            y = y * _f64(weight).reshape(b)
        if bias is not None:
            y = y + _f64(bias).reshape(b)
        return np.moveaxis(y, 1, ax)
    y = instance_norm_forward(xa, weight, bias, eps=eps, axis=axis)[0]
    red = tuple(range(2, xc.ndim))
    m = int(np.prod(xc.shape[2:]))
    if running_mean is not None:
        running_mean[...] = ((1 - momentum) * _f64(running_mean)
                             + momentum * xc.mean(axis=red).mean(axis=0))
    if running_var is not None:
        running_var[...] = ((1 - momentum) * _f64(running_var)
                            + momentum * (xc.var(axis=red) * m / (m - 1)).mean(axis=0))
    return y


def instance_norm_backward(dy, x, mean, invstd, weight=None, *, axis=1, out=None,
                           n_threads=None):
    xa = _f64(x)
    nch = xa.shape[axis % xa.ndim]
    return group_norm_backward(dy, xa, mean, invstd, nch, weight, axis=axis)
