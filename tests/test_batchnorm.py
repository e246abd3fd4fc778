"""batch_norm, batch_norm_forward and batch_norm_backward against the float64 reference,
PyTorch 2.13 (forward, running statistics, autograd) and central finite differences,
over dtypes x layouts x shapes x offsets (tests/arrays.py)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bncore
from arrays import Case, assert_close, cases, exact_moments, layout, rel_err, tol

# dtype of save_mean/save_invstd/dweight/dbias (and of the running stats used here)
STAT_DTYPE = {np.dtype(np.float16): np.dtype(np.float32),
              np.dtype(np.float32): np.dtype(np.float32),
              np.dtype(np.float64): np.dtype(np.float64)}


def native(dtype):
    return np.dtype(dtype).newbyteorder("=")


def params(case, seed=1, dtype=np.float64):
    rng = np.random.default_rng(seed)
    c = case.nch
    return rng.normal(1.0, 0.5, c).astype(dtype), rng.normal(0.0, 1.0, c).astype(dtype)


def running(case, seed=2, dtype=None):
    """Running statistics near the data's own (so eval output stays O(1))."""
    rng = np.random.default_rng(seed)
    dtype = STAT_DTYPE[native(case.dtype)] if dtype is None else dtype
    rm = case.offset + rng.normal(0.0, case.scale, case.nch)
    rv = rng.uniform(0.5, 2.0, case.nch) * case.scale ** 2
    return rm.astype(dtype), rv.astype(dtype)


def reduced_axes(x, axis):
    ch = axis % x.ndim
    return tuple(a for a in range(x.ndim) if a != ch)


def bshape(x, axis):
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    return tuple(shape)


def y_scale(y_ref, x, w, invstd, dtype):
    """Error scale of y: its size, plus the conditioning of normalising data far from zero.

    A mean off by k ulps of float64 (any summation order gives a few) moves y by
    k * eps * |x| * |w| * invstd: at offset 1e6 and std 2 that is ~1e-10 of y.
    """
    k = np.abs((1.0 if w is None else np.asarray(w, np.float64))
               * np.asarray(invstd, np.float64))
    cond = np.max(np.abs(x.astype(np.float64)), initial=0.0) * np.max(k, initial=0.0)
    return (max(np.max(np.abs(y_ref), initial=0.0), 1.0)
            + 64 * np.finfo(np.float64).eps * cond / tol(dtype))


def sum_scale(dy, x, mean, invstd, axis):
    """Error scale of per-channel sums of dy and dy * xhat: max_c sum |dy| (1 + |xhat|)."""
    b = bshape(x, axis)
    xhat = np.abs((x.astype(np.float64) - np.asarray(mean, np.float64).reshape(b))
                  * np.asarray(invstd, np.float64).reshape(b))
    g = np.abs(dy.astype(np.float64))
    return max(np.max(np.sum(g * (1 + xhat), axis=reduced_axes(x, axis)), initial=0.0), 1.0)


def check_backward(got, want, dy, x, mean, invstd, w, case, axis):
    """dx, dweight, dbias against the reference with error scales from the data."""
    dx, dw, db = got
    dxr, dwr, dbr = want
    dt = native(case.dtype)
    assert dx.dtype == dt and dx.shape == x.shape
    assert dw.shape == db.shape == (case.nch,)
    assert dw.dtype == db.dtype == STAT_DTYPE[dt]
    b = bshape(x, axis)
    k = np.abs((np.ones(case.nch) if w is None else np.asarray(w, np.float64))
               * np.asarray(invstd, np.float64))
    xhat = np.abs((x.astype(np.float64) - np.asarray(mean, np.float64).reshape(b))
                  * np.asarray(invstd, np.float64).reshape(b))
    g = np.abs(dy.astype(np.float64))
    scale_dx = max(np.max(k) * np.max(g, initial=0.0) * (1 + np.max(xhat, initial=0.0)), 1.0)
    scale_dw = sum_scale(dy, x, mean, invstd, axis)
    assert_close(dx, dxr, dt, scale_dx, "dx")
    assert_close(dw, dwr, dt, scale_dw, "dweight")
    assert_close(db, dbr, dt, scale_dw, "dbias")


# ------------------------------------------------------------------ against the reference

@pytest.mark.parametrize("case", cases())
def test_training_matches_reference(case, ref, unchanged):
    x = case.make()
    dy = case.make(seed=1, offset=0.0)
    axis, c = case.axis, case.nch
    w, b = params(case)
    rm, rv = running(case)
    rm_ref, rv_ref = rm.astype(np.float64), rv.astype(np.float64)
    snap = unchanged(x=x, dy=dy, w=w, b=b)
    if x.size // c == 1:
        with pytest.raises(ValueError):
            bncore.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv, axis=axis)
        with pytest.raises(ValueError):
            ref.batch_norm_forward(x, w, b, running_mean=rm_ref, running_var=rv_ref, axis=axis)
        np.testing.assert_array_equal(rm, rm_ref)
        np.testing.assert_array_equal(rv, rv_ref)
        snap.check()
        return

    y, m, s = bncore.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv, axis=axis)
    yr, mr, sr = ref.batch_norm_forward(x, w, b, running_mean=rm_ref, running_var=rv_ref,
                                        axis=axis)
    dt = native(case.dtype)
    assert y.dtype == dt and y.shape == x.shape
    assert m.shape == s.shape == (c,) and m.dtype == s.dtype == STAT_DTYPE[dt]
    assert_close(y, yr, dt, scale=y_scale(yr, x, w, sr, dt), what="y")
    assert_close(m, mr, dt, scale=case.offset + case.scale, what="save_mean")
    assert_close(s, sr, dt, scale=np.max(sr), what="save_invstd")
    assert_close(rm, rm_ref, rm.dtype, scale=case.offset + case.scale, what="running_mean")
    assert_close(rv, rv_ref, rv.dtype, scale=np.max(rv_ref), what="running_var")
    # batch_norm (the y-only entry point) gives the same y and the same update
    rm2, rv2 = running(case)
    y2 = bncore.batch_norm(x, rm2, rv2, w, b, training=True, axis=axis)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(rm2, rm)
    np.testing.assert_array_equal(rv2, rv)

    snap_stats = unchanged(m=m, s=s)
    got = bncore.batch_norm_backward(dy, x, m, s, w, axis=axis)
    want = ref.batch_norm_backward(dy, x, m, s, w, axis=axis)
    check_backward(got, want, dy, x, m, s, w, case, axis)
    snap.check()
    snap_stats.check()


@pytest.mark.parametrize("case", cases(offsets=(0.0, 1e4)))
def test_eval_matches_reference(case, ref, unchanged):
    x = case.make()
    dy = case.make(seed=1, offset=0.0)
    axis = case.axis
    w, b = params(case)
    rm, rv = running(case)
    snap = unchanged(x=x, dy=dy, w=w, b=b, rm=rm, rv=rv)       # eval writes nothing
    y = bncore.batch_norm(x, rm, rv, w, b, training=False, axis=axis)
    yr = ref.batch_norm(x, rm, rv, w, b, training=False, axis=axis)
    dt = native(case.dtype)
    assert y.dtype == dt and y.shape == x.shape
    assert_close(y, yr, dt, scale=y_scale(yr, x, w, 1 / np.sqrt(rv + 1e-5), dt), what="y")
    y2, m, s = bncore.batch_norm_forward(x, w, b, training=False, running_mean=rm,
                                         running_var=rv, axis=axis)
    np.testing.assert_array_equal(y2, y)
    assert m.dtype == s.dtype == STAT_DTYPE[dt]
    assert_close(m, rm, m.dtype, scale=case.offset + case.scale, what="save_mean")
    assert_close(s, 1 / np.sqrt(rv.astype(np.float64) + 1e-5), s.dtype,
                 scale=np.max(s), what="save_invstd")
    # eval backward from the eval forward's outputs
    got = bncore.batch_norm_backward(dy, x, m, s, w, training=False, axis=axis)
    want = ref.batch_norm_backward(dy, x, m, s, w, training=False, axis=axis)
    check_backward(got, want, dy, x, m, s, w, case, axis)
    snap.check()


@pytest.mark.parametrize("has_weight,has_bias", [(False, False), (True, False), (False, True)],
                         ids=["plain", "weight-only", "bias-only"])
@pytest.mark.parametrize("case", cases(dtypes=(np.float32, np.float64), offsets=(0.0,),
                                       layouts=("C", "chmem")))
def test_weight_and_bias_optional(case, has_weight, has_bias, ref):
    x = case.make()
    dy = case.make(seed=1)
    if x.size // case.nch == 1:
        return
    w, b = params(case)
    w, b = (w if has_weight else None), (b if has_bias else None)
    y, m, s = bncore.batch_norm_forward(x, w, b, axis=case.axis)
    assert_close(y, ref.batch_norm_forward(x, w, b, axis=case.axis)[0], case.dtype)
    got = bncore.batch_norm_backward(dy, x, m, s, w, axis=case.axis)
    want = ref.batch_norm_backward(dy, x, m, s, w, axis=case.axis)
    check_backward(got, want, dy, x, m, s, w, case, case.axis)
    rm, rv = running(case)
    ye = bncore.batch_norm(x, rm, rv, w, b, axis=case.axis)
    assert_close(ye, ref.batch_norm(x, rm, rv, w, b, axis=case.axis), case.dtype)


def test_array_likes_and_mixed_parameter_dtypes(ref):
    x = np.random.default_rng(0).normal(2.0, 1.0, (6, 3, 4)).astype(np.float32)
    w, b = [1.0, 2.0, 0.5], (0.0, -1.0, 3)
    y, m, s = bncore.batch_norm_forward(x.tolist(), w, b)
    assert y.dtype == np.float64 and m.dtype == np.float64
    assert_close(y, ref.batch_norm_forward(x, w, b)[0], np.float64)
    y32 = bncore.batch_norm_forward(x, np.array(w, np.float16), np.array(b, np.float64))[0]
    assert y32.dtype == np.float32
    assert_close(y32, ref.batch_norm_forward(x, w, b)[0], np.float32)


@pytest.mark.parametrize("stat_kind", ["float64-for-float32", "strided", "swapped", "float16"])
def test_running_stats_of_any_float_kind_updated_in_place(stat_kind, ref):
    x = np.random.default_rng(3).normal(5.0, 2.0, (8, 4, 3, 3)).astype(np.float32)
    rm0 = np.array([0.5, -1.0, 2.0, 0.0])
    rv0 = np.array([1.0, 2.0, 0.5, 3.0])
    if stat_kind == "float64-for-float32":
        rm, rv = rm0.copy(), rv0.copy()
    elif stat_kind == "strided":
        rm, rv = np.zeros(8, np.float32)[::2], np.zeros(12, np.float32)[::-3]
        rm[...], rv[...] = rm0, rv0
    elif stat_kind == "swapped":
        rm, rv = rm0.astype(">f4"), rv0.astype(">f8")
    else:
        rm, rv = rm0.astype(np.float16), rv0.astype(np.float16)
    dtypes = (rm.dtype, rv.dtype)
    rm_ref, rv_ref = rm.astype(np.float64), rv.astype(np.float64)
    bncore.batch_norm(x, rm, rv, training=True, momentum=0.25)
    ref.batch_norm(x, rm_ref, rv_ref, training=True, momentum=0.25)
    assert (rm.dtype, rv.dtype) == dtypes
    for got, want in ((rm, rm_ref), (rv, rv_ref)):
        np.testing.assert_allclose(got.astype(np.float64), want.astype(got.dtype),
                                   rtol=2 * np.finfo(got.dtype).eps)


def test_only_one_running_stat_is_updated():
    x = np.random.default_rng(4).normal(3.0, 1.0, (10, 3))
    rm = np.zeros(3)
    bncore.batch_norm_forward(x, running_mean=rm, momentum=1.0)
    np.testing.assert_allclose(rm, x.mean(0), rtol=1e-14)
    rv = np.ones(3)
    bncore.batch_norm_forward(x, running_var=rv, momentum=1.0)
    np.testing.assert_allclose(rv, x.var(0, ddof=1), rtol=1e-13)


# ------------------------------------------------------------------ against PyTorch 2.13

def to_torch(a, axis, grad=False):
    """(N, C, *) torch view of ``a`` whose channel axis is ``axis`` (no copy: a channels-last
    array becomes a channels_last-strided NCHW tensor)."""
    a = np.moveaxis(a, axis, 1)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    t = torch.from_numpy(a)
    return t.requires_grad_(True) if grad else t


TORCH_SHAPES = [((16, 12), 1), ((6, 5, 7), 1), ((8, 6, 5, 7), 1), ((8, 5, 7, 6), -1),
                ((4, 3, 2, 5, 3), 1), ((4, 2, 5, 3, 3), -1), ((2, 3, 1, 1), 1), ((2, 1, 1, 3), -1)]


@pytest.mark.parametrize("momentum", [0.1, 0.5])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", TORCH_SHAPES, ids=str)
def test_training_against_pytorch(shape, axis, dtype, affine, momentum):
    case = Case(shape, axis, dtype, offset=2.0)
    x, dy = case.make(seed=11), case.make(seed=12, offset=0.0)
    w, b = params(case, dtype=dtype) if affine else (None, None)
    rm, rv = running(case, dtype=dtype)
    rmt, rvt = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    y, m, s = bncore.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv,
                                        momentum=momentum, axis=axis)
    dx, dw, db = bncore.batch_norm_backward(dy, x, m, s, w, axis=axis)

    xt = to_torch(x, axis, grad=True)
    wt = torch.from_numpy(w).requires_grad_(True) if affine else None
    bt = torch.from_numpy(b).requires_grad_(True) if affine else None
    yt = F.batch_norm(xt, rmt, rvt, wt, bt, training=True, momentum=momentum)
    yt.backward(to_torch(dy, axis))
    assert_close(np.moveaxis(y, axis, 1), yt.detach().numpy(), dtype, what="y")
    assert_close(rm, rmt.numpy(), dtype, scale=3.0, what="running_mean")
    assert_close(rv, rvt.numpy(), dtype, scale=np.max(rv), what="running_var")
    scale = 10 * np.max(np.abs(dy)) * np.max(s) * (1 if w is None else np.max(np.abs(w)))
    assert_close(np.moveaxis(dx, axis, 1), xt.grad.numpy(), dtype, scale=scale, what="dx")
    if affine:
        scale = sum_scale(dy, x, m, s, axis)
        assert_close(dw, wt.grad.numpy(), dtype, scale=scale, what="dweight")
        assert_close(db, bt.grad.numpy(), dtype, scale=scale, what="dbias")

    # save_mean / save_invstd as torch's native op returns them
    _, tm, ts = torch.native_batch_norm(to_torch(x, axis), None, None, None, None, True,
                                        momentum, 1e-5)
    assert_close(m, tm.numpy(), dtype, scale=3.0, what="save_mean")
    assert_close(s, ts.numpy(), dtype, scale=np.max(s), what="save_invstd")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", TORCH_SHAPES, ids=str)
def test_eval_against_pytorch(shape, axis, dtype):
    case = Case(shape, axis, dtype, offset=2.0)
    x, dy = case.make(seed=21), case.make(seed=22, offset=0.0)
    w, b = params(case, dtype=dtype)
    rm, rv = running(case, dtype=dtype)
    y, m, s = bncore.batch_norm_forward(x, w, b, training=False, running_mean=rm,
                                        running_var=rv, axis=axis)
    dx, dw, db = bncore.batch_norm_backward(dy, x, m, s, w, training=False, axis=axis)
    xt = to_torch(x, axis, grad=True)
    wt, bt = torch.from_numpy(w).requires_grad_(True), torch.from_numpy(b).requires_grad_(True)
    yt = F.batch_norm(xt, torch.from_numpy(rm), torch.from_numpy(rv), wt, bt, training=False)
    yt.backward(to_torch(dy, axis))
    assert_close(np.moveaxis(y, axis, 1), yt.detach().numpy(), dtype, what="y")
    assert_close(np.moveaxis(dx, axis, 1), xt.grad.numpy(), dtype,
                 scale=np.max(np.abs(xt.grad.numpy())), what="dx")
    scale = sum_scale(dy, x, m, s, axis)
    assert_close(dw, wt.grad.numpy(), dtype, scale=scale, what="dweight")
    assert_close(db, bt.grad.numpy(), dtype, scale=scale, what="dbias")
    assert bncore.batch_norm(x, rm, rv, w, b, axis=axis).tobytes() == y.tobytes()


def test_float16_against_pytorch_in_float32():
    case = Case((6, 4, 5, 5), 1, np.float16, offset=1.0)
    x = case.make()
    rm, rv = running(case)
    y = bncore.batch_norm(x, rm, rv, training=True)
    yt = F.batch_norm(torch.from_numpy(x.astype(np.float32)), None, None, training=True)
    assert y.dtype == np.float16
    assert_close(y, yt.numpy(), np.float16)


# ------------------------------------------------------------------ finite differences

def numeric_grad(f, arr, h=1e-6):
    g = np.empty_like(arr)
    for i in np.ndindex(arr.shape):
        old = arr[i]
        arr[i] = old + h
        up = f()
        arr[i] = old - h
        down = f()
        arr[i] = old
        g[i] = (up - down) / (2 * h)
    return g


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis", [((3, 4, 2, 3), 1), ((3, 2, 3, 4), -1), ((5, 3), 1),
                                        ((2, 3, 4), 1), ((2, 2, 2, 2, 3), -1)], ids=str)
def test_gradients_match_finite_differences(shape, axis, training, affine):
    case = Case(shape, axis, np.float64, offset=1.0, scale=1.5)
    x = case.make(seed=31)
    g = case.make(seed=32, offset=0.0)
    w, b = params(case) if affine else (None, None)
    rm, rv = running(case)

    def loss():
        if training:
            y = bncore.batch_norm_forward(x, w, b, axis=axis)[0]
        else:
            y = bncore.batch_norm(x, rm, rv, w, b, axis=axis)
        return float(np.sum(y * g))

    _, m, s = bncore.batch_norm_forward(x, w, b, training=training, running_mean=rm,
                                        running_var=rv, axis=axis)
    dx, dw, db = bncore.batch_norm_backward(g, x, m, s, w, training=training, axis=axis)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-6, atol=1e-7)
    if affine:
        np.testing.assert_allclose(dw, numeric_grad(loss, w), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(db, numeric_grad(loss, b), rtol=1e-6, atol=1e-7)
    else:       # dweight/dbias are what they would be for weight=1, bias=0
        ones, zeros = np.ones(case.nch), np.zeros(case.nch)
        _, dw1, db1 = bncore.batch_norm_backward(g, x, m, s, ones, training=training,
                                                 axis=axis)
        np.testing.assert_array_equal(dw, dw1)
        np.testing.assert_array_equal(db, db1)
        w, b = ones, zeros
        np.testing.assert_allclose(dw, numeric_grad(loss, w), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(db, numeric_grad(loss, b), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ numerics

@pytest.mark.parametrize("value", [1e7, 0.1, -3.0, 123456.789, 1e-3])
@pytest.mark.parametrize("shape,axis", [((4, 3, 9, 11), 1), ((4, 9, 11, 3), -1), ((40, 3), 1),
                                        ((2, 3, 1, 5), 1)], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_constant_channel_normalises_to_exactly_bias(value, shape, axis, dtype):
    if dtype == np.float16 and abs(value) > 6e4:
        return
    x = Case(shape, axis, dtype).make()
    idx = [slice(None)] * x.ndim
    idx[axis] = 1
    x[tuple(idx)] = dtype(value)
    bias = np.array([0.5, -2.0, 0.25], dtype)
    weight = np.array([3.0, 7.0, 3.0], dtype)
    for w in (weight, None):
        y, m, s = bncore.batch_norm_forward(x, w, bias, axis=axis)
        assert np.all(y[tuple(idx)] == bias[1]), (w, y[tuple(idx)].ravel()[:5])
    everything = np.full(shape, dtype(value))
    y = bncore.batch_norm_forward(everything, weight, bias, axis=axis)[0]
    np.testing.assert_array_equal(y, np.broadcast_to(bias.reshape(bshape(y, axis)), shape))


@pytest.mark.parametrize("shape,axis", [((16, 4, 32, 32), 1), ((16, 32, 32, 4), -1),
                                        ((16384, 4), 1), ((4, 3, 64, 64), 1)], ids=str)
def test_float32_mean_1e6_std_0p1_variance(shape, axis, ref):
    case = Case(shape, axis, np.float32, offset=1e6, scale=0.1)
    x = case.make(seed=41)
    y, m, s = bncore.batch_norm_forward(x, axis=axis, eps=0.0)
    var = 1.0 / s.astype(np.float64) ** 2
    exact = [exact_moments(values) for values in np.moveaxis(x, axis, 0)]
    for c, (emean, evar) in enumerate(exact):         # of the float32 values stored
        assert rel_err(var[c], evar) <= 1e-4, (c, var[c], float(evar))
        assert rel_err(m[c], emean) <= 2.0 ** -23, (c, m[c], float(emean))
    assert_close(y, ref.batch_norm_forward(x, axis=axis, eps=0.0)[0], np.float32)
    # the unbiased running variance too
    rv = np.zeros(case.nch, np.float32)
    bncore.batch_norm(x, np.zeros(case.nch, np.float32), rv, training=True, momentum=1.0,
                      axis=axis)
    n = x.size // case.nch
    for c, (_, evar) in enumerate(exact):
        assert rel_err(rv[c], evar * n / (n - 1)) <= 1e-4, (c, rv[c], float(evar))


def test_nan_stays_in_its_channel(ref):
    for axis, shape in ((1, (4, 3, 5, 5)), (-1, (4, 5, 5, 3))):
        x = Case(shape, axis, np.float64).make()
        idx = [1, 2, 2, 2]
        idx[axis] = 1
        x[tuple(idx)] = np.nan
        y = np.moveaxis(bncore.batch_norm_forward(x, axis=axis)[0], axis, 0)
        assert np.all(np.isnan(y[1]))
        want = np.moveaxis(ref.batch_norm_forward(x, axis=axis)[0], axis, 0)
        assert_close(y[[0, 2]], want[[0, 2]], np.float64)


# ------------------------------------------------------------------ out=, threads

OUT_LAYOUTS = ["C", "F", "strided_c", "flipped", "chmem"]


@pytest.mark.parametrize("out_kind", OUT_LAYOUTS)
@pytest.mark.parametrize("case", cases(dtypes=(np.float32, np.float16), offsets=(0.0,),
                                       layouts=("C", "chmem", "strided_n"),
                                       shapes=[((4, 3, 5, 5), 1), ((4, 5, 5, 3), -1),
                                               ((9, 4), 1)]))
def test_out_is_filled_and_returned(case, out_kind):
    x = case.make(offset=1.0)
    dy = case.make(seed=1)
    dt = native(case.dtype)
    rm, rv = running(case)
    y0, m, s = bncore.batch_norm_forward(x, axis=case.axis)
    dx0 = bncore.batch_norm_backward(dy, x, m, s, axis=case.axis)[0]
    ye0 = bncore.batch_norm(x, rm, rv, axis=case.axis)

    def new_out():
        return layout(np.full(x.shape, np.nan, dt), out_kind, case.axis)

    out = new_out()
    assert bncore.batch_norm_forward(x, axis=case.axis, out=out)[0] is out
    np.testing.assert_array_equal(out, y0)
    out = new_out()
    assert bncore.batch_norm(x, rm, rv, axis=case.axis, out=out) is out
    np.testing.assert_array_equal(out, ye0)
    out = new_out()
    assert bncore.batch_norm_backward(dy, x, m, s, axis=case.axis, out=out)[0] is out
    np.testing.assert_array_equal(out, dx0)


@pytest.mark.parametrize("case", cases(dtypes=(np.float32, np.float64), offsets=(1e4,),
                                       layouts=("C", "F", "strided_c", "flipped", "chmem"),
                                       shapes=[((4, 3, 5, 5), 1), ((4, 5, 5, 3), -1),
                                               ((9, 4), 1)]))
def test_in_place(case):
    x = case.make()
    dy = case.make(seed=1, offset=0.0)
    y0, m, s = bncore.batch_norm_forward(x, axis=case.axis)
    dx0 = bncore.batch_norm_backward(dy, x, m, s, axis=case.axis)[0]
    x2 = layout(np.array(x), case.layout, case.axis)
    assert bncore.batch_norm_forward(x2, axis=case.axis, out=x2)[0] is x2
    np.testing.assert_array_equal(x2, y0)
    dy2 = layout(np.array(dy), case.layout, case.axis)
    assert bncore.batch_norm_backward(dy2, x, m, s, axis=case.axis, out=dy2)[0] is dy2
    np.testing.assert_array_equal(dy2, dx0)


@pytest.mark.parametrize("shape,axis,kind", [
    ((32, 16, 16, 16), 1, "C"), ((32, 16, 16, 16), -1, "C"), ((8192, 16), 1, "C"),
    ((4, 3, 96, 96), 1, "C"), ((32, 16, 16, 16), 1, "chmem"), ((16, 16, 16, 32), 1, "flipped"),
    ((16, 32, 16, 16), 1, "strided_c"),
], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bitwise_identical_for_1_and_2_threads(shape, axis, kind, dtype):
    case = Case(shape, axis, dtype, kind, offset=5.0)
    x, dy = case.make(), case.make(seed=1, offset=0.0)
    w, b = params(case)
    results = []
    for nt in (1, 2):
        rm, rv = running(case)
        y, m, s = bncore.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv,
                                            axis=axis, n_threads=nt)
        dx, dw, db = bncore.batch_norm_backward(dy, x, m, s, w, axis=axis, n_threads=nt)
        ye = bncore.batch_norm(x, rm, rv, w, b, axis=axis, n_threads=nt)
        dxe = bncore.batch_norm_backward(dy, x, rm, 1 / np.sqrt(rv + 1e-5), w, training=False,
                                         axis=axis, n_threads=nt)
        results.append((y, m, s, rm, rv, dx, dw, db, ye) + dxe)
    for a, b_ in zip(*results):
        assert a.dtype == b_.dtype and a.tobytes() == b_.tobytes()


# ------------------------------------------------------------------ zero-size batches

@pytest.mark.parametrize("shape,axis", [((0, 3, 4, 4), 1), ((0, 4, 4, 3), -1), ((0, 3), 1),
                                        ((2, 3, 0), 1), ((4, 0, 0, 3), -1)], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_size_batch_like_pytorch(shape, axis, dtype):
    x = np.zeros(shape, dtype)
    c = shape[axis]
    rm, rv = np.full(c, 0.5, dtype), np.full(c, 2.0, dtype)
    w, b = np.full(c, 2.0, dtype), np.full(c, 1.0, dtype)
    for training in (True, False):
        y = bncore.batch_norm(x, rm, rv, w, b, training=training, axis=axis)
        rmt, rvt = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
        yt = F.batch_norm(to_torch(x, axis), rmt, rvt, torch.from_numpy(w),
                          torch.from_numpy(b), training=training)
        assert y.shape == x.shape and y.dtype == dtype
        assert tuple(yt.shape) == np.moveaxis(y, axis, 1).shape
        np.testing.assert_array_equal(rm, np.full(c, 0.5, dtype))      # untouched
        np.testing.assert_array_equal(rv, np.full(c, 2.0, dtype))
        np.testing.assert_array_equal(rmt.numpy(), rm)
        np.testing.assert_array_equal(rvt.numpy(), rv)
        y2, m, s = bncore.batch_norm_forward(x, w, b, training=training, running_mean=rm,
                                             running_var=rv, axis=axis)
        assert y2.shape == x.shape and m.shape == s.shape == (c,)
        dx, dw, db = bncore.batch_norm_backward(x, x, m, s, w, training=training, axis=axis)
        assert dx.shape == x.shape and dx.dtype == dtype
        np.testing.assert_array_equal(dw, np.zeros(c))
        np.testing.assert_array_equal(db, np.zeros(c))
        out = np.empty_like(x)
        assert bncore.batch_norm(x, rm, rv, training=training, axis=axis, out=out) is out


# ------------------------------------------------------------------ errors

def _bn_args(**kw):
    rng = np.random.default_rng(51)
    args = dict(x=rng.normal(size=(4, 3, 2)).astype(np.float32),
                running_mean=np.zeros(3, np.float32), running_var=np.ones(3, np.float32),
                weight=np.ones(3, np.float32), bias=np.zeros(3, np.float32), training=True,
                out=np.full((4, 3, 2), 7.0, np.float32))
    args.update(kw)
    return args


def _ro(a):
    a = a.copy()
    a.flags.writeable = False
    return a


BN_ERRORS = [
    ("one value per channel", dict(x=np.ones((1, 3), np.float32), out=None), ValueError),
    ("one value per channel 4d", dict(x=np.ones((1, 3, 1, 1), np.float32), out=None),
     ValueError),
    ("one value per channel last", dict(x=np.ones((1, 1, 1, 3), np.float32), axis=-1,
                                        out=None), ValueError),
    ("int input", dict(x=np.ones((4, 3, 2), np.int32), out=None), TypeError),
    ("int64 input", dict(x=np.ones((4, 3, 2), np.int64), out=None), TypeError),
    ("bool input", dict(x=np.ones((4, 3, 2), bool), out=None), TypeError),
    ("complex input", dict(x=np.ones((4, 3, 2), complex), out=None), TypeError),
    ("object input", dict(x=np.ones((4, 3, 2), object), out=None), TypeError),
    ("str input", dict(x=np.full((4, 3, 2), "a"), out=None), TypeError),
    ("1-d input", dict(x=np.ones(4, np.float32), out=None), ValueError),
    ("weight shape", dict(weight=np.ones(4, np.float32)), ValueError),
    ("weight 2-d", dict(weight=np.ones((3, 1), np.float32)), ValueError),
    ("weight channels-last", dict(weight=np.ones(3, np.float32), axis=-1), ValueError),
    ("bias shape", dict(bias=np.ones(2, np.float32)), ValueError),
    ("running_mean shape", dict(running_mean=np.zeros(4, np.float32)), ValueError),
    ("running_var shape", dict(running_var=np.ones(2, np.float32)), ValueError),
    ("running_var read-only", dict(running_var=_ro(np.ones(3, np.float32))), ValueError),
    ("running_mean read-only", dict(running_mean=_ro(np.zeros(3, np.float32))), ValueError),
    ("running_var int", dict(running_var=np.ones(3, np.int64)), TypeError),
    ("running_mean list", dict(running_mean=[0.0, 0.0, 0.0]), TypeError),
    ("axis", dict(axis=3), np.exceptions.AxisError),
    ("eps negative", dict(eps=-1.0), ValueError),
    ("eps nan", dict(eps=float("nan")), ValueError),
    ("momentum nan", dict(momentum=float("nan")), ValueError),
    ("out dtype", dict(out=np.empty((4, 3, 2), np.float64)), TypeError),
    ("out shape", dict(out=np.full((4, 3), 7.0, np.float32)), ValueError),
    ("out read-only", dict(out=_ro(np.full((4, 3, 2), 7.0, np.float32))), ValueError),
    ("n_threads 0", dict(n_threads=0), ValueError),
    ("n_threads float", dict(n_threads=1.5), TypeError),
    ("eval without stats", dict(training=False, running_mean=None), ValueError),
]


@pytest.mark.parametrize("name,kwargs,exc", BN_ERRORS, ids=[e[0] for e in BN_ERRORS])
def test_bad_input_raises_and_modifies_nothing(name, kwargs, exc, unchanged):
    args = _bn_args(**kwargs)
    snap = unchanged(args)
    with pytest.raises(exc):
        bncore.batch_norm(**args)
    snap.check()
    fwd = dict(args)
    x = fwd.pop("x")
    w, b = fwd.pop("weight"), fwd.pop("bias")
    with pytest.raises(exc):
        bncore.batch_norm_forward(x, w, b, **fwd)
    snap.check()


def test_eval_accepts_one_value_per_channel(ref):
    x = np.array([[1.0, 2.0, 3.0]])
    rm, rv = np.zeros(3), np.ones(3)
    assert_close(bncore.batch_norm(x, rm, rv), ref.batch_norm(x, rm, rv), np.float64)


def _bwd_args(**kw):
    rng = np.random.default_rng(52)
    args = dict(dy=rng.normal(size=(4, 3, 2)), x=rng.normal(size=(4, 3, 2)),
                save_mean=np.zeros(3), save_invstd=np.ones(3), weight=np.ones(3),
                out=np.full((4, 3, 2), 7.0))
    args.update(kw)
    return args


BWD_ERRORS = [
    ("dy shape", dict(dy=np.ones((4, 3))), ValueError),
    ("dy dtype", dict(dy=np.ones((4, 3, 2), np.float32)), TypeError),
    ("dy int", dict(dy=np.ones((4, 3, 2), np.int64)), TypeError),
    ("x int", dict(x=np.ones((4, 3, 2), np.int64), dy=np.ones((4, 3, 2), np.int64),
                   out=None), TypeError),
    ("save_mean shape", dict(save_mean=np.zeros(4)), ValueError),
    ("save_invstd shape", dict(save_invstd=np.ones((3, 1))), ValueError),
    ("weight shape", dict(weight=np.ones(2)), ValueError),
    ("out shape", dict(out=np.full((4, 3), 7.0)), ValueError),
    ("out dtype", dict(out=np.full((4, 3, 2), 7.0, np.float32)), TypeError),
    ("axis", dict(axis=-4), np.exceptions.AxisError),
]


@pytest.mark.parametrize("name,kwargs,exc", BWD_ERRORS, ids=[e[0] for e in BWD_ERRORS])
def test_backward_bad_input_raises_and_modifies_nothing(name, kwargs, exc, unchanged):
    args = _bwd_args(**kwargs)
    snap = unchanged(args)
    with pytest.raises(exc):
        bncore.batch_norm_backward(args.pop("dy"), args.pop("x"), args.pop("save_mean"),
                                   args.pop("save_invstd"), **args)
    snap.check()
