"""layer, RMS, group and instance norm against the float64 reference, PyTorch 2.13 and
finite differences; both layouts, odd sizes, large offsets, errors, determinism."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bncore
from bncore import _reference as ref
from bncore import _rownorm

from arrays import KINDS, check_float32_statistics, exact_moments, float32_rows, rel_err

TOL = {np.float64: 1e-10, np.float32: 2e-5, np.float16: 2e-2}


def data(shape, dtype, layout="C", offset=2.0, seed=0):
    a = np.random.default_rng(seed).normal(offset, 1.5, shape).astype(dtype)
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "strided":
        big = np.empty(tuple(2 * s for s in shape), dtype)
        v = big[tuple(slice(None, None, 2) for _ in shape)]
        v[...] = a
        return v
    if layout == "byteswapped":
        return a.astype(a.dtype.newbyteorder())
    return a


def close(got, want, dtype, scale=None):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    scale = max(np.max(np.abs(want), initial=0.0), 1.0) if scale is None else scale
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL[dtype] * scale)


DTYPES = [np.float64, np.float32, np.float16]
LAYOUTS = ["C", "F", "strided", "byteswapped"]


# ------------------------------------------------------------------ vs reference

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,ns", [((7, 13), 13), ((3, 4, 5, 6), (5, 6)), ((2, 3, 9), 9),
                                      ((5, 3000), 3000), ((4, 1), 1)], ids=str)
def test_layer_and_rms_norm(dtype, layout, shape, ns):
    x = data(shape, dtype, layout)
    before = x.copy()
    nsh = (ns,) if np.ndim(ns) == 0 else ns
    rng = np.random.default_rng(1)
    w, b = rng.normal(size=nsh), rng.normal(size=nsh)
    dy = data(shape, dtype, layout, offset=0.0, seed=3)
    y, m, s = bncore.layer_norm_forward(x, ns, w, b)
    yr, mr, sr = ref.layer_norm_forward(x, ns, w, b)
    assert y.dtype == np.dtype(dtype) and y.shape == x.shape and m.shape == x.shape[:-len(nsh)]
    close(y, yr, dtype)
    close(m, mr, dtype)
    got = bncore.layer_norm_backward(dy, x, m, s, ns, w)
    want = ref.layer_norm_backward(dy, x, m, s, ns, w)
    assert got[1].shape == got[2].shape == nsh
    big = np.sum(np.abs(dy.astype(float))) + 1
    for g, r in zip(got, want):
        close(g, r, dtype, scale=big if g.shape == nsh else np.max(np.abs(r)) * 10 + 1)
    yq, rq = bncore.rms_norm_forward(x, ns, w)
    yqr, rqr = ref.rms_norm_forward(x, ns, w)
    close(yq, yqr, dtype)
    got = bncore.rms_norm_backward(dy, x, rq, ns, w)
    want = ref.rms_norm_backward(dy, x, rq, ns, w)
    for g, r in zip(got, want):
        close(g, r, dtype, scale=big)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("shape,groups", [((3, 6, 5, 7), 3), ((2, 8, 9), 4), ((4, 6), 2),
                                          ((2, 4, 3, 3, 3), 4), ((2, 10, 17, 1), 1)], ids=str)
def test_group_and_instance_norm(dtype, axis, shape, groups):
    if len(shape) == 2 and axis == -1:
        axis = 1
    x = np.moveaxis(data(shape, dtype), 1, axis)
    before = x.copy()
    c = shape[1]
    rng = np.random.default_rng(2)
    w, b = rng.normal(size=c), rng.normal(size=c)
    dy = np.moveaxis(data(shape, dtype, offset=0.0, seed=4), 1, axis)
    got = bncore.group_norm_forward(x, groups, w, b, axis=axis)
    want = ref.group_norm_forward(x, groups, w, b, axis=axis)
    assert got[0].dtype == np.dtype(dtype) and got[1].shape == (shape[0], groups)
    for g, r in zip(got, want):
        close(g, r, dtype, scale=np.max(np.abs(r)) + 1)
    got = bncore.group_norm_backward(dy, x, got[1], got[2], groups, w, axis=axis)
    want = ref.group_norm_backward(dy, x, want[1], want[2], groups, w, axis=axis)
    big = np.sum(np.abs(dy.astype(float))) + 1
    for g, r in zip(got, want):
        close(g, r, dtype, scale=big)
    if np.prod(shape[2:]) > 1:
        got = bncore.instance_norm_forward(x, w, b, axis=axis)
        want = ref.instance_norm_forward(x, w, b, axis=axis)
        for g, r in zip(got, want):
            close(g, r, dtype, scale=np.max(np.abs(r)) + 1)
        got = bncore.instance_norm_backward(dy, x, got[1], got[2], w, axis=axis)
        want = ref.instance_norm_backward(dy, x, want[1], want[2], w, axis=axis)
        for g, r in zip(got, want):
            close(g, r, dtype, scale=big)
    np.testing.assert_array_equal(x, before)


def test_instance_norm_running_stats_and_eval():
    x = data((4, 3, 6, 5), np.float64)
    rm, rv = np.zeros(3), np.ones(3)
    rm2, rv2 = rm.copy(), rv.copy()
    y = bncore.instance_norm(x, rm, rv, momentum=0.2)
    close(y, ref.instance_norm(x, rm2, rv2, momentum=0.2), np.float64)
    close(rm, rm2, np.float64)
    close(rv, rv2, np.float64)
    ye = bncore.instance_norm(x, rm, rv, use_input_stats=False)
    close(ye, ref.instance_norm(x, rm, rv, use_input_stats=False), np.float64)


# ------------------------------------------------------------------ vs PyTorch

def t(a):
    return torch.from_numpy(np.ascontiguousarray(a)).requires_grad_(True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_and_rms_norm_against_pytorch(dtype):
    x, dy = data((6, 4, 24), dtype), data((6, 4, 24), dtype, seed=9)
    w, b = data((24,), dtype, seed=5), data((24,), dtype, seed=6)
    xt, wt, bt = t(x), t(w), t(b)
    F.layer_norm(xt, (24,), wt, bt).backward(torch.from_numpy(dy))
    y, m, s = bncore.layer_norm_forward(x, 24, w, b)
    dx, dw, db = bncore.layer_norm_backward(dy, x, m, s, 24, w)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(y, F.layer_norm(t(x), (24,), t(w), t(b)).detach(), atol=tol)
    np.testing.assert_allclose(dx, xt.grad, atol=tol * 10)
    np.testing.assert_allclose(dw, wt.grad, atol=tol * 100)
    np.testing.assert_allclose(db, bt.grad, atol=tol * 100)
    xt, wt = t(x), t(w)
    yt = F.rms_norm(xt, (24,), wt)   # eps=None: dtype epsilon on both sides
    yt.backward(torch.from_numpy(dy))
    y, r = bncore.rms_norm_forward(x, 24, w)
    dx, dw = bncore.rms_norm_backward(dy, x, r, 24, w)
    np.testing.assert_allclose(y, yt.detach(), atol=tol)
    np.testing.assert_allclose(dx, xt.grad, atol=tol * 10)
    np.testing.assert_allclose(dw, wt.grad, atol=tol * 100)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
def test_group_and_instance_norm_against_pytorch(dtype, axis):
    x, dy = data((4, 6, 5, 7), dtype), data((4, 6, 5, 7), dtype, seed=8)
    w, b = data((6,), dtype, seed=5), data((6,), dtype, seed=6)
    xa, dya = np.moveaxis(x, 1, axis), np.moveaxis(dy, 1, axis)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for name in ("group", "instance"):
        xt, wt, bt = t(x), t(w), t(b)
        if name == "group":
            yt = F.group_norm(xt, 3, wt, bt)
            y, m, s = bncore.group_norm_forward(xa, 3, w, b, axis=axis)
            grads = bncore.group_norm_backward(dya, xa, m, s, 3, w, axis=axis)
        else:
            yt = F.instance_norm(xt, weight=wt, bias=bt)
            y, m, s = bncore.instance_norm_forward(xa, w, b, axis=axis)
            grads = bncore.instance_norm_backward(dya, xa, m, s, w, axis=axis)
        yt.backward(torch.from_numpy(dy))
        np.testing.assert_allclose(np.moveaxis(y, axis, 1), yt.detach(), atol=tol)
        np.testing.assert_allclose(np.moveaxis(grads[0], axis, 1), xt.grad, atol=tol * 10)
        np.testing.assert_allclose(grads[1], wt.grad, atol=tol * 100)
        np.testing.assert_allclose(grads[2], bt.grad, atol=tol * 100)


# ------------------------------------------------------------------ finite differences

@pytest.mark.parametrize("op", ["layer", "rms", "group", "instance"])
def test_gradients_match_finite_differences(op):
    rng = np.random.default_rng(11)
    x = rng.normal(1.0, 1.5, (2, 4, 3))
    g = rng.normal(size=x.shape)
    if op in ("layer", "rms"):
        w = rng.normal(size=3)
        b = rng.normal(size=3)
    else:
        w, b = rng.normal(size=4), rng.normal(size=4)

    def fwd(x_, w_, b_):
        if op == "layer":
            return bncore.layer_norm_forward(x_, 3, w_, b_)
        if op == "rms":
            y, r = bncore.rms_norm_forward(x_, 3, w_, 1e-5)
            return y + b_, r
        if op == "group":
            return bncore.group_norm_forward(x_, 2, w_, b_)
        return bncore.instance_norm_forward(x_, w_, b_)

    out = fwd(x, w, b)
    if op == "layer":
        dx, dw, db = bncore.layer_norm_backward(g, x, out[1], out[2], 3, w)
    elif op == "rms":
        dx, dw = bncore.rms_norm_backward(g, x, out[1], 3, w)
        db = g.sum(axis=(0, 1))
    elif op == "group":
        dx, dw, db = bncore.group_norm_backward(g, x, out[1], out[2], 2, w)
    else:
        dx, dw, db = bncore.instance_norm_backward(g, x, out[1], out[2], w)
    h = 1e-6
    for k, (arr, grad) in enumerate(((x, dx), (w, dw), (b, db))):
        num = np.empty_like(arr)
        for i in np.ndindex(arr.shape):
            args = [x.copy(), w.copy(), b.copy()]
            args[k][i] += h
            up = np.sum(fwd(*args)[0] * g)
            args[k][i] -= 2 * h
            num[i] = (up - np.sum(fwd(*args)[0] * g)) / (2 * h)
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ numerics

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_constant_rows_normalise_to_exactly_bias(dtype):
    x = np.full((3, 4, 6, 6), 1e7, dtype)
    b4 = np.array([0.5, -1.0, 2.0, 0.25], dtype)
    assert np.all(bncore.instance_norm(x, bias=b4) == b4[None, :, None, None])
    assert np.all(bncore.group_norm(x, 2, bias=b4) == b4[None, :, None, None])
    xl = np.full((5, 9), 0.1, dtype)
    b9 = np.arange(9, dtype=dtype)
    assert np.all(bncore.layer_norm(xl, 9, bias=b9) == b9)


@pytest.mark.parametrize("d", [1, 7, 64, 100, 768, 2048, 3001, 32768, 32769])
@pytest.mark.parametrize("kind", KINDS)
def test_layer_norm_float32_statistics_round_the_exact_ones(kind, d):
    """layer_norm_forward's float32 mean and invstd (eps=0) are the exact statistics of
    each float32 row rounded. Rows up to BN_RUN_MAX (32768) values take one pass in double
    around their first value, whose error grows with that value's distance from the mean
    (outlier: the worst case, up to 1e7 against N(0, 1)); longer ones L1 blocks merged with
    Chan's formula; inf and nan propagate as in NumPy's mean; constant rows give exactly
    their value, and y exactly the bias."""
    rng = np.random.default_rng(d)
    x = float32_rows(kind, 33 if d < 10000 else 9, d, rng)
    _, mean, invstd = bncore.layer_norm_forward(x, d, eps=0.0)
    bias = rng.normal(size=d).astype(np.float32)
    y = bncore.layer_norm(x, d, bias=bias)
    check_float32_statistics(x, mean, invstd, y, bias, kind)


@pytest.mark.parametrize("cg,s", [(2, 1568), (1, 3136), (2, 3136), (1, 32768), (3, 10923)],
                         ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("op", ["group", "instance"])
def test_group_runs_float32_statistics_round_the_exact_ones(op, kind, cg, s):
    """The (sample, group) runs of NCHW group norm (cg channels of s values) and instance
    norm (a plane of cg * s values) have the statistics of layer-norm rows: one double
    pass up to BN_RUN_MAX values (3136, 6272, 32768), blocks beyond (32769)."""
    rng = np.random.default_rng(cg * s)
    rows = float32_rows(kind, 6, cg * s, rng)      # 3 samples x 2 groups, a row each
    if op == "group":
        x = rows.reshape(3, 2 * cg, s)
        bias = rng.normal(size=2 * cg).astype(np.float32)
        _, mean, invstd = bncore.group_norm_forward(x, 2, eps=0.0)
        y = bncore.group_norm(x, 2, bias=bias)
        row_bias = np.repeat(bias, s).reshape(2, -1)
    else:
        x = rows.reshape(3, 2, cg * s)
        bias = rng.normal(size=2).astype(np.float32)
        _, mean, invstd = bncore.instance_norm_forward(x, eps=0.0)
        y = bncore.instance_norm(x, bias=bias)
        row_bias = np.repeat(bias, cg * s).reshape(2, -1)
    check_float32_statistics(rows, mean.ravel(), invstd.ravel(), y.reshape(6, -1),
                              np.tile(row_bias, (3, 1)), kind)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_constant_input_with_zero_eps_gives_inf_invstd_without_warnings(dtype):
    """A constant channel, group, instance or row with eps=0 has variance 0: every
    *_forward returns invstd = inf (as PyTorch does) and none warns, whichever path (the
    kernels, or NumPy for empty batch-norm input) computes it."""
    x4 = np.full((2, 4, 3, 3), 5.0, dtype)
    calls = {
        "batch": lambda: bncore.batch_norm_forward(x4, eps=0.0)[2],
        "batch eval empty": lambda: bncore.batch_norm_forward(
            x4[:0], running_mean=np.zeros(4), running_var=np.zeros(4), training=False,
            eps=0.0)[2],
        "group": lambda: bncore.group_norm_forward(x4, 2, eps=0.0)[2],
        "instance": lambda: bncore.instance_norm_forward(x4, eps=0.0)[2],
        "instance NHWC": lambda: bncore.instance_norm_forward(x4, axis=-1, eps=0.0)[2],
        "layer": lambda: bncore.layer_norm_forward(x4, (3, 3), eps=0.0)[2],
        "rms": lambda: bncore.rms_norm_forward(np.zeros_like(x4), (3, 3), eps=0.0)[1],
    }
    for name, call in calls.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            invstd = call()
        assert invstd.size and np.all(np.isposinf(invstd)), name


@pytest.mark.parametrize("axis", [1, -1])
def test_large_offset_float32(axis):
    x = (1e6 + 0.1 * np.random.default_rng(5).normal(size=(4, 8, 32, 32))).astype(np.float32)
    xa = np.ascontiguousarray(np.moveaxis(x, 1, axis))
    for got, red in ((bncore.instance_norm_forward(xa, axis=axis, eps=0.0), (2, 3)),
                     (bncore.group_norm_forward(xa, 4, axis=axis, eps=0.0), None)):
        var = 1.0 / got[2].astype(np.float64) ** 2
        x64 = x.astype(np.float64)
        exact = x64.var(axis=red) if red else x64.reshape(4, 4, -1).var(axis=2)
        np.testing.assert_allclose(var, exact, rtol=1e-4)
    xl = (1e6 + 0.1 * np.random.default_rng(6).normal(size=(16, 512))).astype(np.float32)
    _, _, s = bncore.layer_norm_forward(xl, 512, eps=0.0)
    np.testing.assert_allclose(1 / s.astype(np.float64) ** 2, xl.astype(np.float64).var(1),
                               rtol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,ns", [((8, 768), 768), ((3, 4, 5, 6), (5, 6)), ((2, 9), (9,)),
                                      ((300, 64), 64)], ids=str)
def test_row_norms_common_call_matches_general_path(dtype, shape, ns):
    """layer_norm/rms_norm (and their _forward) take the common call (plain arrays, out=None)
    in one Cython step; with out= the general path. The same bits either way."""
    x = data(shape, dtype)
    nsh = (ns,) if np.ndim(ns) == 0 else ns
    rng = np.random.default_rng(2)
    w, b = rng.normal(size=nsh).astype(dtype), rng.normal(size=nsh).astype(dtype)
    assert _rownorm.forward_common(x, ns, w, b, 1e-5, None, False) is not None
    for nt in (None, 1, 2):
        for rms in (False, True):
            if rms:
                fast = bncore.rms_norm_forward(x, ns, w, n_threads=nt)
                slow = bncore.rms_norm_forward(x, ns, w, n_threads=nt, out=np.empty_like(x))
                plain = bncore.rms_norm(x, ns, w, n_threads=nt)
            else:
                fast = bncore.layer_norm_forward(x, ns, w, b, n_threads=nt)
                slow = bncore.layer_norm_forward(x, ns, w, b, n_threads=nt,
                                                 out=np.empty_like(x))
                plain = bncore.layer_norm(x, ns, w, b, n_threads=nt)
            for a, b_ in zip(fast, slow):
                assert a.dtype == b_.dtype and a.shape == b_.shape and np.array_equal(a, b_)
            assert np.array_equal(plain, fast[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis,groups", [((2, 8, 9, 7), 1, 4), ((3, 5, 6, 8), -1, 2),
                                               ((4, 6), 1, 3), ((2, 1, 1, 6), -1, 3),
                                               ((2, 7, 300), 1, 7)], ids=str)
def test_group_norms_common_call_matches_general_path(dtype, shape, axis, groups):
    """group_norm, instance_norm and their _forward take the common call in one Cython
    step (_rownorm.group_common); with out= the general path. The same bits either way."""
    x = data(shape, dtype)
    c = shape[axis]
    rng = np.random.default_rng(3)
    w, b = rng.normal(size=c).astype(np.float32), rng.normal(size=c)
    assert _rownorm.group_common(x, groups, w, b, 1e-5, axis, None) is not None
    for nt in (None, 1, 2):
        fast = bncore.group_norm_forward(x, groups, w, b, axis=axis, n_threads=nt)
        slow = bncore.group_norm_forward(x, groups, w, b, axis=axis, n_threads=nt,
                                         out=np.empty_like(x))
        for a, b_ in zip(fast, slow):
            assert a.dtype == b_.dtype and a.shape == b_.shape and np.array_equal(a, b_)
        assert np.array_equal(bncore.group_norm(x, groups, w, b, axis=axis, n_threads=nt),
                              fast[0])
        if int(np.prod(shape)) // (shape[0] * c) > 1:
            fast = bncore.instance_norm_forward(x, w, b, axis=axis, n_threads=nt)
            slow = bncore.instance_norm_forward(x, w, b, axis=axis, n_threads=nt,
                                                out=np.empty_like(x))
            for a, b_ in zip(fast, slow):
                assert a.dtype == b_.dtype and np.array_equal(a, b_)
            assert np.array_equal(bncore.instance_norm(x, weight=w, bias=b, axis=axis,
                                                       n_threads=nt), fast[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_common_calls_match_general_path(dtype):
    """Every backward op takes the common call in one Cython step, the general path with
    out=: the same bits (row norms with one and two normalised dims; group and instance norm
    in both layouts)."""
    rng = np.random.default_rng(4)
    for shape, ns in (((8, 768), 768), ((3, 4, 5, 6), (5, 6))):
        x, dy = data(shape, dtype), data(shape, dtype, seed=6)
        nsh = (ns,) if np.ndim(ns) == 0 else ns
        w = rng.normal(size=nsh).astype(np.float32)
        _, m, s = bncore.layer_norm_forward(x, ns, w)
        _, r = bncore.rms_norm_forward(x, ns, w)
        assert _rownorm.backward_common(dy, x, m, s, ns, w, None, False) is not None
        assert _rownorm.backward_common(dy, x, m[:1], s, ns, w, None, False) is None
        pairs = [(bncore.layer_norm_backward(dy, x, m, s, ns, w),
                  bncore.layer_norm_backward(dy, x, m, s, ns, w, out=np.empty_like(x))),
                 (bncore.rms_norm_backward(dy, x, r, ns, w),
                  bncore.rms_norm_backward(dy, x, r, ns, w, out=np.empty_like(x)))]
        for fast, slow in pairs:
            for a, b_ in zip(fast, slow):
                assert a.dtype == b_.dtype and np.array_equal(a, b_)
    for shape, axis, groups in (((2, 8, 9, 7), 1, 4), ((3, 5, 6, 8), -1, 2)):
        x, dy = data(shape, dtype), data(shape, dtype, seed=6)
        w = rng.normal(size=shape[axis])
        _, m, s = bncore.group_norm_forward(x, groups, w, axis=axis)
        _, mi, si = bncore.instance_norm_forward(x, w, axis=axis)
        assert _rownorm.group_backward_common(dy, x, m, s, groups, w, axis, None) is not None
        assert _rownorm.group_backward_common(dy, x, m, s, groups, w, 2, None) is None
        pairs = [(bncore.group_norm_backward(dy, x, m, s, groups, w, axis=axis),
                  bncore.group_norm_backward(dy, x, m, s, groups, w, axis=axis,
                                             out=np.empty_like(x))),
                 (bncore.instance_norm_backward(dy, x, mi, si, w, axis=axis),
                  bncore.instance_norm_backward(dy, x, mi, si, w, axis=axis,
                                                out=np.empty_like(x)))]
        for fast, slow in pairs:
            for a, b_ in zip(fast, slow):
                assert a.dtype == b_.dtype and np.array_equal(a, b_)


@pytest.mark.parametrize("kind", ["strided", "float16", "int_weight", "list_shape",
                                  "shape_mismatch", "int_eps", "rms_none_eps_layer",
                                  "bool_threads", "empty", "subclass"])
def test_row_fast_path_declines_all_but_the_common_call(kind):
    x, w, b = data((4, 6), np.float32), np.ones(6, np.float32), np.zeros(6, np.float32)
    args = dict(x=x, normalized_shape=6, weight=w, bias=b, eps=1e-5, n_threads=None, rms=False)
    if kind == "strided":
        args["x"] = data((4, 12), np.float32)[:, ::2]
    elif kind == "float16":
        args["x"] = x.astype(np.float16)
    elif kind == "int_weight":   # (float64 weights for float32 x are converted there)
        args["weight"] = w.astype(np.int64)
    elif kind == "list_shape":
        args["normalized_shape"] = [6]
    elif kind == "shape_mismatch":
        args["normalized_shape"] = 5
    elif kind == "int_eps":
        args["eps"] = 0
    elif kind == "rms_none_eps_layer":
        args["eps"] = None
    elif kind == "bool_threads":
        args["n_threads"] = True
    elif kind == "empty":
        args["x"] = x[:0]
    else:
        args["x"] = x.view(np.matrix)
    assert _rownorm.forward_common(**args) is None


@pytest.mark.parametrize("kind", ["axis2", "groups_not_divisor", "bool_groups", "one_per_group",
                                  "instance_one_spatial", "swapped_bias", "numpy_axis",
                                  "fortran", "neg_eps"])
def test_group_fast_path_declines_all_but_the_common_call(kind):
    x, w = data((2, 6, 4, 4), np.float32), np.ones(6, np.float32)
    args = dict(x=x, num_groups=3, weight=w, bias=None, eps=1e-5, axis=1, n_threads=None)
    if kind == "axis2":
        args["axis"] = 2
    elif kind == "groups_not_divisor":
        args["num_groups"] = 4
    elif kind == "bool_groups":
        args["num_groups"] = True
    elif kind == "one_per_group":
        args["x"], args["num_groups"] = data((2, 6), np.float32), 6
    elif kind == "instance_one_spatial":
        args["x"], args["num_groups"] = data((2, 6, 1), np.float32), None
    elif kind == "swapped_bias":
        args["bias"] = w.astype(">f4")
    elif kind == "numpy_axis":
        args["axis"] = np.int64(1)
    elif kind == "fortran":
        args["x"] = np.asfortranarray(x)
    else:
        args["eps"] = -1.0
    assert _rownorm.group_common(**args) is None


def test_bitwise_identical_for_any_thread_count():
    x = data((16, 64, 24, 24), np.float32)
    dy = data((16, 64, 24, 24), np.float32, seed=1)
    xl = data((4096, 96), np.float32)
    runs = []
    for nt in (1, 2, 3):
        y1, m1, s1 = bncore.group_norm_forward(x, 8, n_threads=nt)
        y2, m2, s2 = bncore.instance_norm_forward(x, n_threads=nt)
        y3, m3, s3 = bncore.layer_norm_forward(xl, 96, n_threads=nt)
        d1 = bncore.group_norm_backward(dy, x, m1, s1, 8, n_threads=nt)
        d3 = bncore.layer_norm_backward(xl, xl, m3, s3, 96, n_threads=nt)
        runs.append((y1, y2, y3, *d1, *d3))
    for other in runs[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(runs[0], other))


def test_out_parameter():
    x = data((4, 6, 5, 5), np.float32)
    for fn in (lambda o: bncore.layer_norm(x, (5, 5), out=o),
               lambda o: bncore.rms_norm(x, (5, 5), out=o),
               lambda o: bncore.group_norm(x, 3, out=o),
               lambda o: bncore.instance_norm(x, out=o)):
        o = np.empty_like(x)
        assert fn(o) is o
        np.testing.assert_array_equal(o, fn(None))


# ------------------------------------------------------------------ errors

ERRORS = [
    ("groups not dividing C", lambda x: bncore.group_norm(x, 4), ValueError, "num_groups"),
    ("one value per group", lambda x: bncore.group_norm(x[:, :, :1, :1], 6), ValueError,
     "more than 1 value per group"),
    ("one value per instance", lambda x: bncore.instance_norm(x[:, :, :1, :1]), ValueError,
     "more than 1 spatial element"),
    ("normalized_shape mismatch", lambda x: bncore.layer_norm(x, (5, 4)), ValueError,
     "normalized_shape"),
    ("layer weight shape", lambda x: bncore.layer_norm(x, 5, weight=np.ones(4)), ValueError,
     r"weight must have shape \(5,\)"),
    ("group weight shape", lambda x: bncore.group_norm(x, 3, weight=np.ones(5)), ValueError,
     r"weight must have shape \(6,\)"),
    ("int input", lambda x: bncore.rms_norm(x.astype(int), 5), TypeError, "x must be a float"),
    ("negative eps", lambda x: bncore.layer_norm(x, 5, eps=-1), ValueError, "eps"),
    ("axis 2", lambda x: bncore.instance_norm(x, axis=2), ValueError, "axis must be 1"),
    ("read-only running_mean",
     lambda x: bncore.instance_norm(x, np.zeros(6)[::1].copy().view(), _ro(np.ones(6))),
     ValueError, "running_var is read-only"),
]


def _ro(a):
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("name,call,exc,match", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_leave_arguments_unchanged(name, call, exc, match):
    x = data((2, 6, 4, 5), np.float64)
    before = x.copy()
    with pytest.raises(exc, match=match):
        call(x)
    np.testing.assert_array_equal(x, before)


def test_instance_norm_failure_keeps_running_stats():
    rm, rv = np.zeros(6), np.ones(6)
    with pytest.raises(ValueError):
        bncore.instance_norm(data((2, 6, 1, 1), np.float64), rm, rv)
    np.testing.assert_array_equal(rm, np.zeros(6))
    np.testing.assert_array_equal(rv, np.ones(6))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,groups", [
    ((64, 1024, 1, 1), 8),      # (N, C) features, 1x1 maps: 128 one-value channels a group
    ((5, 4096, 1, 1), 1),       # one group of 4096 one-value channels
    ((6, 2048, 1, 2), 1),       # 1x2 maps, 4096 values a group
    ((300, 32, 3, 3), None),    # instance norm over 3x3 planes: 9600 blocks of 9 values
    ((7, 30, 2, 2), 5),         # odd counts: 24-value groups, blocks not a chunk multiple
    ((9, 48, 5, 5), 4),         # backward only: 300-value groups of 25-value planes
    ((6, 64, 7, 7), 8),         # backward only: 7x7 planes
    ((5, 16, 10, 10), 4),       # backward only: 10x10 planes (up to 256 values)
], ids=str)
def test_small_nchw_groups_many_per_call(dtype, shape, groups):
    """NCHW (sample, group) blocks of at most 128 values, or of 1- and 2-value planes up to
    4096, go many per kernel call (bn_group_blocks: statistics of a run of blocks, then
    their divisions, then their affines, each channel's scale spread over its values);
    backward blocks of planes of up to 256 values (bn_group_blocks_bwd).
    Against the float64 reference at a large offset, with and without weight and bias, the
    same bits for 1, 2 and 3 threads, and a constant group gives exactly its bias."""
    rng = np.random.default_rng(11)
    x = (1e3 + rng.standard_normal(shape)).astype(dtype)
    c = shape[1]
    w, b = rng.normal(size=c).astype(dtype), rng.normal(size=c).astype(dtype)
    if groups is None:
        op = lambda *a, **k: bncore.instance_norm_forward(x, *a, **k)
        rop = lambda *a: ref.instance_norm_forward(x, *a)
    else:
        op = lambda *a, **k: bncore.group_norm_forward(x, groups, *a, **k)
        rop = lambda *a: ref.group_norm_forward(x, groups, *a)
    for params in ((w, b), (None, None), (w, None)):
        base = op(*params, n_threads=1)
        for nt in (2, 3):
            assert all(np.array_equal(p, q) for p, q in zip(base, op(*params, n_threads=nt)))
        want = rop(*params)
        close(base[0], want[0], dtype, scale=np.max(np.abs(want[0])) + 1)
        close(base[1], want[1], dtype)   # the means (around 1e3)
        np.testing.assert_allclose(base[2], want[2], rtol=4 * TOL[dtype])
    y = bncore.group_norm(np.full(shape, 3.25, dtype), shape[1] if groups is None else groups,
                          w, b)
    np.testing.assert_array_equal(y, np.broadcast_to(b.reshape(1, c, 1, 1), shape))
    # the backward (bn_group_blocks_bwd: planes of up to 256 values)
    g = shape[1] if groups is None else groups
    dy = rng.standard_normal(shape).astype(dtype)
    _, m, inv = bncore.group_norm_forward(x, g, w, b)
    for wt in (w, None):
        base = bncore.group_norm_backward(dy, x, m, inv, g, wt, n_threads=1)
        for nt in (2, 3):
            got = bncore.group_norm_backward(dy, x, m, inv, g, wt, n_threads=nt)
            assert all(np.array_equal(p, q) for p, q in zip(base, got))
        want = ref.group_norm_backward(dy, x, m, inv, g, wt)
        big = np.sum(np.abs(dy.astype(float))) + 1
        for p, q in zip(base, want):
            close(p, q, dtype, scale=max(np.max(np.abs(q)), 1.0) if p is base[0] else big)


def test_small_nchw_groups_streamed():
    """Small groups over more than 16 MiB (outputs streamed), forward and backward: as the
    reference, and the same bits as the same groups in a smaller call."""
    x = data((8192, 64, 3, 3), np.float32, offset=5.0)
    w = np.linspace(0.5, 2, 64).astype(np.float32)
    y, m, inv = bncore.instance_norm_forward(x, w, None, n_threads=2)
    ys, ms, invs = bncore.instance_norm_forward(x[:64], w, None, n_threads=2)
    assert np.array_equal(y[:64], ys) and np.array_equal(m[:64], ms)
    want = ref.instance_norm_forward(x[-64:], w, None)
    close(y[-64:], want[0], np.float32, scale=np.max(np.abs(want[0])) + 1)
    dy = data(x.shape, np.float32, offset=0.0, seed=5)
    dx = bncore.instance_norm_backward(dy, x, m, inv, w, n_threads=2)[0]
    dxs = bncore.instance_norm_backward(dy[:64], x[:64], ms, invs, w, n_threads=2)[0]
    assert np.array_equal(dx[:64], dxs)
    want = ref.instance_norm_backward(dy[-64:], x[-64:], m[-64:], inv[-64:], w)[0]
    close(dx[-64:], want, np.float32)


def _wide_group_f64_cases():
    """float64 channels-last groups of 64 channels over 49 rows (a (sample, group) block
    each, its statistics in one pass around the mean of its first 16 values, or by the
    two-pass where that is more than a standard deviation off)."""
    rng = np.random.default_rng(31)
    base = rng.normal(0, 1.0, (2, 7, 7, 128))
    x = 1e9 + 0.1 * base
    y = 5.0 + base
    y[0, ..., :64] = 7.25                       # a constant group
    y[1, 0, 0, 64:80] = 1e5                     # the first 16 values far off the rest
    z = 2.5 + 1e-3 * base
    z[0, 0, 0, :16] = -3e4                      # the same, with little spread
    return {"offset 1e9": x, "constant and far first values": y, "far first, tight": z}


@pytest.mark.parametrize("kind", list(_wide_group_f64_cases()))
def test_float64_channels_last_wide_groups_exact(kind):
    from fractions import Fraction
    from arrays import exact_moments
    x = _wide_group_f64_cases()[kind]
    y, mean, invstd = bncore.group_norm_forward(x, 2, axis=-1)
    for n in range(2):
        for g in range(2):
            block = x[n, ..., 64 * g:64 * (g + 1)]
            emean, evar = exact_moments(block)
            spread = float(block.max() - block.min())
            assert abs(Fraction(float(mean[n, g])) - emean) <= abs(emean) * 1e-15 + spread * 1e-15
            einv = 1.0 / np.sqrt(np.longdouble(float(evar)) + np.longdouble(1e-5))
            assert abs(float(invstd[n, g]) - float(einv)) <= 1e-13 * float(einv), (n, g)
            if evar == 0:
                assert np.all(y[n, ..., 64 * g:64 * (g + 1)] == 0)
    for nt in (2, 3):
        got = bncore.group_norm_forward(x, 2, axis=-1, n_threads=nt)
        assert all(np.array_equal(a, b) for a, b in zip(got, (y, mean, invstd)))


def test_rms_norm_default_eps_of_float16_is_float32s_as_pytorch():
    """eps=None is the machine epsilon of the type the op computes in: float32's for
    float16 input, as PyTorch 2.13 (F.rms_norm, its opmath type). float16's own (~1e-3)
    would swamp the mean square of small activations (values ~1e-2 here: mean square
    ~1e-4), which was off by up to 1.0 on outputs of size ~3."""
    x = np.random.default_rng(3).normal(0.0, 0.01, (8, 64)).astype(np.float16)
    w = np.random.default_rng(4).normal(1.0, 0.1, 64).astype(np.float16)
    yt = F.rms_norm(torch.from_numpy(x), (64,), torch.from_numpy(w)).numpy()
    y, invrms = bncore.rms_norm_forward(x, 64, w)
    assert y.dtype == np.float16
    np.testing.assert_allclose(y.astype(np.float64), yt.astype(np.float64), rtol=0,
                               atol=4e-3 * np.abs(yt).max())
    eps32 = float(np.finfo(np.float32).eps)
    np.testing.assert_array_equal(y, bncore.rms_norm(x, 64, w, eps=eps32))
    yr, rr = ref.rms_norm_forward(x, 64, w)   # the reference twin takes the same eps
    np.testing.assert_allclose(invrms.ravel(), rr.ravel(), rtol=1e-6)
    # float16's own epsilon would be visibly different: the test can tell them apart
    y16 = bncore.rms_norm(x, 64, w, eps=float(np.finfo(np.float16).eps))
    assert np.abs(y16.astype(np.float64) - yt).max() > 0.1



@pytest.mark.parametrize("cg", [2, 4, 8])
@pytest.mark.parametrize("offset", [1e8, 1e12, 1e14])
@pytest.mark.parametrize("n, nt", [(2, 1), (2, 2), (1, 2)], ids=["sample-each", "threads",
                                                             "team"])
def test_channels_last_float64_group_statistics_exact_at_large_offsets(cg, offset, n, nt):
    """Channels-last group norm merges per-channel moments into groups: with absolute
    channel means (0.016 of rounding each at 1e14) a group's variance near 1 was off by
    up to 0.3% in float64, where NCHW was exact. The means now stay relative to the
    channels' pivots: within 1e-12 of exact (Fraction) arithmetic, and as NCHW, on the one-sample-a-thread path and the one splitting a sample over threads."""
    rng = np.random.default_rng(int(np.log10(offset)) * 10 + cg)
    g = 2
    # (N, H, W, C): 16384 rows, four row chunks a sample; one sample on two threads is
    # shared by both (samples_team), two go one a thread
    x = offset + rng.normal(0.0, 1.0, (n, 128, 128, g * cg))
    _, mean, invstd = bncore.group_norm_forward(x, g, eps=0.0, axis=-1, n_threads=nt)
    _, mean1, invstd1 = bncore.group_norm_forward(np.moveaxis(x, -1, 1), g, eps=0.0,
                                                  n_threads=nt)
    for i in range(n):
        for gi in range(g):
            em, ev = exact_moments(x[i, ..., gi * cg:(gi + 1) * cg])
            assert rel_err(mean[i, gi], em) <= 4e-16
            # (the rounding of 65536 squares summed, and of invstd: ~1e-14 at most)
            assert rel_err(1.0 / invstd[i, gi] ** 2, ev) <= 1e-12
    np.testing.assert_allclose(invstd, invstd1, rtol=1e-13)
    np.testing.assert_allclose(mean, mean1, rtol=1e-16)


def test_channels_last_group_of_channels_near_the_float64_limits():
    """Channel pivots 3e308 apart (their difference overflows): the group falls back to
    absolute channel means, which stay finite here, so the group mean is the exact 0 and
    the overflowing variance gives invstd 0, as NumPy's inf variance would."""
    x = np.zeros((1, 4, 4, 4))
    x[..., 0], x[..., 1], x[..., 2], x[..., 3] = 1.5e308, -1.5e308, 1.0, 2.0
    x[0, 0, 0, :] = [1.4e308, -1.4e308, 1.5, 2.5]
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no warning either
        _, mean, invstd = bncore.group_norm_forward(x, 2, axis=-1)
    assert mean[0, 0] == 0.0 and invstd[0, 0] == 0.0
    want = ref.group_norm_forward(x[..., 2:], 1, axis=-1)
    np.testing.assert_allclose([mean[0, 1], invstd[0, 1]],
                               [want[1][0, 0], want[2][0, 0]], rtol=1e-14)
