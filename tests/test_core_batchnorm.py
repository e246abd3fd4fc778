"""batch_norm, batch_norm_forward, batch_norm_backward against the NumPy float64 reference,
PyTorch 2.13 and finite differences, over dtypes x layouts x axes x shapes."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bncore
from bncore import _batchnorm
from bncore import _reference as ref

from arrays import KINDS, check_float32_statistics, exact_moments, float32_rows

RNG = np.random.default_rng(20261125)

# (shape as seen by the user, channel axis)
SHAPES = [((2, 3), 1), ((7, 5), 1), ((2, 3, 5), 1), ((4, 6, 5, 7), 1), ((2, 4, 3, 3, 5), 1),
          ((3, 5, 4, 6), -1), ((2, 7, 3), -1), ((5, 2, 1, 1), 1), ((6, 4, 7, 7), 2)]
LAYOUTS = ["C", "F", "strided", "transposed", "byteswapped"]
DTYPES = [np.float32, np.float64, np.float16]
TOL = {np.float64: 1e-10, np.float32: 2e-5, np.float16: 2e-2}


def make(shape, dtype, layout, offset=0.0, seed=0):
    a = np.random.default_rng(seed).normal(offset, 2.0, shape).astype(dtype)
    if layout == "strided":
        return _strided(a)
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "transposed":
        return np.ascontiguousarray(a.transpose()).transpose()
    if layout == "byteswapped":
        return a.astype(a.dtype.newbyteorder())
    return a


def _strided(a):
    """A non-contiguous view holding the values of ``a``."""
    big = np.empty(tuple(2 * s for s in a.shape), a.dtype)
    view = big[tuple(slice(None, None, 2) for _ in a.shape)]
    view[...] = a
    return view


def close(got, want, dtype, scale=None):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape
    scale = max(np.max(np.abs(want), initial=0.0), 1.0) if scale is None else scale
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL[dtype] * scale)


def cases():
    for shape, axis in SHAPES:
        for dtype in DTYPES:
            for layout in LAYOUTS:
                yield pytest.param(shape, axis, dtype, layout,
                                   id=f"{'x'.join(map(str, shape))}-ax{axis}-"
                                      f"{np.dtype(dtype).name}-{layout}")


def affine(c, dtype=np.float64, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=c).astype(dtype), rng.normal(size=c).astype(dtype)


@pytest.mark.parametrize("shape,axis,dtype,layout", list(cases()))
def test_training_forward_backward_match_reference(shape, axis, dtype, layout):
    x = make(shape, dtype, layout, offset=3.0)
    x_before = x.copy()
    c = x.shape[axis]
    w, b = affine(c)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    rm_ref, rv_ref = rm.astype(np.float64), rv.astype(np.float64)
    y, m, s = bncore.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv, axis=axis)
    yr, mr, sr = ref.batch_norm_forward(x, w, b, running_mean=rm_ref, running_var=rv_ref,
                                        axis=axis)
    assert y.dtype == x.dtype.newbyteorder("=") and y.shape == x.shape
    assert m.shape == s.shape == (c,)
    assert m.dtype == s.dtype == (np.float64 if dtype == np.float64 else np.float32)
    close(y, yr, dtype)
    close(m, mr, dtype)
    close(s, sr, dtype, scale=np.max(sr))
    close(rm, rm_ref, np.float32)
    close(rv, rv_ref, np.float32)
    np.testing.assert_array_equal(x, x_before)

    dy = make(shape, dtype, layout, seed=7)
    dx, dw, db = bncore.batch_norm_backward(dy, x, m, s, w, axis=axis)
    dxr, dwr, dbr = ref.batch_norm_backward(dy, x, m, s, w, axis=axis)
    assert dx.dtype == y.dtype and dx.shape == x.shape and dw.shape == db.shape == (c,)
    close(dx, dxr, dtype, scale=np.max(np.abs(dxr)) + np.max(np.abs(dy.astype(float))))
    close(dw, dwr, dtype, scale=np.sum(np.abs(dy.astype(float))))
    close(db, dbr, dtype, scale=np.sum(np.abs(dy.astype(float))))


@pytest.mark.parametrize("nch", [3, 37, 64, 200, 1001])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_last_large_forward_backward(nch, dtype):
    """Channels-last rows over many row blocks and parallel chunks, every channel tile width
    (32, 4, 1) and the prefetch of the next block, and rows wider than a dx tile (1001
    channels: four tiles and a scalar tail, rows walked whole one at a time, streamed; and
    in pairs from the caches, 41 rows): against the float64 reference, and the same bits
    for any thread count."""
    x = make((7, 429, nch), dtype, "C", offset=1e3)
    dy = make((7, 429, nch), dtype, "C", seed=3)
    w, b = affine(nch, dtype)
    y, m, s = bncore.batch_norm_forward(x, w, b, axis=-1)
    yr, mr, sr = ref.batch_norm_forward(x, w, b, axis=-1)
    close(y, yr, dtype)
    close(m, mr, dtype, scale=1e3)
    close(s, sr, dtype, scale=np.max(sr))
    dx, dw, db = bncore.batch_norm_backward(dy, x, m, s, w, axis=-1)
    dxr, dwr, dbr = ref.batch_norm_backward(dy, x, m, s, w, axis=-1)
    total = np.sum(np.abs(dy.astype(float)))
    close(dx, dxr, dtype, scale=np.max(np.abs(dxr)) + np.max(np.abs(dy.astype(float))))
    close(dw, dwr, dtype, scale=total / nch)
    close(db, dbr, dtype, scale=total / nch)
    for nt in (1, 3):
        got = bncore.batch_norm_backward(dy, x, m, s, w, axis=-1, n_threads=nt)
        assert all(np.array_equal(a, g) for a, g in zip((dx, dw, db), got))
    x, dy = x[0, :41], dy[0, :41]                # in cache: rows in pairs and an odd one
    dx = bncore.batch_norm_backward(dy, x, m, s, w, axis=-1)[0]
    dxr = ref.batch_norm_backward(dy, x, m, s, w, axis=-1)[0]
    close(dx, dxr, dtype, scale=np.max(np.abs(dxr)) + np.max(np.abs(dy.astype(float))))


@pytest.mark.parametrize("shape,axis", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eval_forward_backward_match_reference(shape, axis, dtype):
    x = make(shape, dtype, "C", offset=1.0)
    c = x.shape[axis]
    w, b = affine(c)
    rm = RNG.normal(size=c)
    rv = RNG.uniform(0.5, 2.0, c)
    rm0, rv0 = rm.copy(), rv.copy()
    y = bncore.batch_norm(x, rm, rv, w, b, training=False, axis=axis)
    close(y, ref.batch_norm(x, rm, rv, w, b, axis=axis), dtype)
    np.testing.assert_array_equal(rm, rm0)   # eval never touches running stats
    np.testing.assert_array_equal(rv, rv0)
    y2, m, s = bncore.batch_norm_forward(x, w, b, training=False, running_mean=rm,
                                         running_var=rv, axis=axis)
    np.testing.assert_array_equal(y, y2)
    close(m, rm, dtype)
    close(s, 1 / np.sqrt(rv + 1e-5), dtype)
    dy = make(shape, dtype, "C", seed=3)
    got = bncore.batch_norm_backward(dy, x, m, s, w, training=False, axis=axis)
    want = ref.batch_norm_backward(dy, x, m, s, w, training=False, axis=axis)
    for g, r in zip(got, want):
        close(g, r, dtype, scale=np.max(np.abs(r)) + 1)


def _to_torch_nchw(a, axis):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, axis, 1)))


@pytest.mark.parametrize("shape,axis", [((8, 6, 5, 7), 1), ((8, 5, 7, 6), -1), ((16, 12), 1),
                                        ((4, 3, 2, 5, 3), 1)], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine_on", [True, False], ids=["affine", "plain"])
def test_against_pytorch(shape, axis, dtype, affine_on):
    x = make(shape, dtype, "C", offset=2.0, seed=11)
    dy = make(shape, dtype, "C", seed=12)
    c = x.shape[axis]
    w, b = affine(c, dtype) if affine_on else (None, None)
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    y, m, s = bncore.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv,
                                        momentum=0.3, axis=axis)
    dx, dw, db = bncore.batch_norm_backward(dy, x, m, s, w, axis=axis)

    xt = _to_torch_nchw(x, axis).requires_grad_(True)
    wt = torch.from_numpy(w).requires_grad_(True) if affine_on else None
    bt = torch.from_numpy(b).requires_grad_(True) if affine_on else None
    rmt, rvt = torch.zeros(c, dtype=xt.dtype), torch.ones(c, dtype=xt.dtype)
    yt = F.batch_norm(xt, rmt, rvt, wt, bt, training=True, momentum=0.3)
    yt.backward(_to_torch_nchw(dy, axis))
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(np.moveaxis(y, axis, 1), yt.detach().numpy(), atol=tol)
    np.testing.assert_allclose(rm, rmt.numpy(), atol=tol)
    np.testing.assert_allclose(rv, rvt.numpy(), rtol=tol)
    np.testing.assert_allclose(np.moveaxis(dx, axis, 1), xt.grad.numpy(), atol=tol * 10)
    if affine_on:
        np.testing.assert_allclose(dw, wt.grad.numpy(), atol=tol * 100)
        np.testing.assert_allclose(db, bt.grad.numpy(), atol=tol * 100)

    # eval against PyTorch with the running stats just produced
    ye = bncore.batch_norm(x, rm, rv, w, b, axis=axis)
    yte = F.batch_norm(_to_torch_nchw(x, axis), torch.from_numpy(rm), torch.from_numpy(rv),
                       None if w is None else torch.from_numpy(w),
                       None if b is None else torch.from_numpy(b), training=False)
    np.testing.assert_allclose(np.moveaxis(ye, axis, 1), yte.numpy(), atol=tol)


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("training", [True, False])
def test_gradients_match_finite_differences(axis, training):
    shape = (3, 4, 2, 3) if axis == 1 else (3, 2, 3, 4)
    x = RNG.normal(1.0, 1.5, shape)
    c = x.shape[axis]
    w, b = affine(c)
    g = RNG.normal(size=shape)
    rm, rv = RNG.normal(size=c), RNG.uniform(0.5, 2, c)

    def loss(x_, w_, b_):
        if training:
            y = bncore.batch_norm_forward(x_, w_, b_, axis=axis)[0]
        else:
            y = bncore.batch_norm(x_, rm, rv, w_, b_, axis=axis)
        return float(np.sum(y * g))

    y, m, s = bncore.batch_norm_forward(x, w, b, training=training, running_mean=rm.copy(),
                                        running_var=rv.copy(), axis=axis)
    if not training:
        m, s = rm, 1 / np.sqrt(rv + 1e-5)
    dx, dw, db = bncore.batch_norm_backward(g, x, m, s, w, training=training, axis=axis)
    h = 1e-6
    for arr, grad, which in ((x, dx, 0), (w, dw, 1), (b, db, 2)):
        num = np.empty_like(arr)
        for i in np.ndindex(arr.shape):
            args = [x.copy(), w.copy(), b.copy()]
            args[which][i] += h
            up = loss(*args)
            args[which][i] -= 2 * h
            num[i] = (up - loss(*args)) / (2 * h)
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("value", [1e7, 0.1, -3.0, 123456.789])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_constant_channel_normalises_to_exactly_bias(value, axis, dtype):
    shape = (4, 3, 9, 11) if axis == 1 else (4, 9, 11, 3)
    x = np.asarray(RNG.normal(size=shape), dtype)
    idx = [slice(None)] * 4
    idx[axis] = 1
    x[tuple(idx)] = dtype(value)
    bias = np.array([0.5, -2.0, 0.25], dtype)
    y = bncore.batch_norm_forward(x, np.array([3.0, 3.0, 3.0], dtype), bias, axis=axis)[0]
    assert np.all(y[tuple(idx)] == bias[1])


@pytest.mark.parametrize("axis", [1, -1])
def test_large_mean_small_std_float32_variance(axis):
    shape = (16, 4, 32, 32) if axis == 1 else (16, 32, 32, 4)
    x = (1e6 + 0.1 * RNG.normal(size=shape)).astype(np.float32)
    y, m, s = bncore.batch_norm_forward(x, axis=axis, eps=0.0)
    red = tuple(a for a in range(4) if a != axis % 4)
    exact = x.astype(np.float64).var(axis=red)   # two-pass in float64: exact to ~1e-13
    var = 1.0 / s.astype(np.float64) ** 2
    np.testing.assert_allclose(var, exact, rtol=1e-4)
    close(y, ref.batch_norm_forward(x, axis=axis, eps=0.0)[0], np.float32)


@pytest.mark.parametrize("shape,axis", [((64, 64, 16, 16), 1), ((64, 16, 16, 64), -1),
                                        ((8192, 64), 1), ((4, 3, 128, 128), 1),
                                        ((2, 517, 7, 7), 1), ((4, 37, 15, 17), 1)], ids=str)
def test_bitwise_identical_for_any_thread_count(shape, axis):
    """(2, 517, 7, 7) and (4, 37, 15, 17): small channels go in groups whose number depends
    on the thread count (channel_groups); a channel's bits must not."""
    x = make(shape, np.float32, "C", offset=5.0)
    dy = make(shape, np.float32, "C", seed=5)
    outs = []
    for nt in (1, 2, 3, 8):
        y, m, s = bncore.batch_norm_forward(x, axis=axis, n_threads=nt)
        dx, dw, db = bncore.batch_norm_backward(dy, x, m, s, axis=axis, n_threads=nt)
        outs.append((y, m, s, dx, dw, db))
    for other in outs[1:]:
        for a, b_ in zip(outs[0], other):
            assert np.array_equal(a, b_)


@pytest.mark.parametrize("shape,axis", [((260, 64, 15, 17), 1), ((1500, 61, 7, 7), 1),
                                        ((256, 15, 17, 65), -1)], ids=str)
def test_streamed_outputs_match_unstreamed(shape, axis):
    """Outputs of 16 MiB and more are written with streaming stores on the whole 64-byte
    lines of each plane or row and ordinary stores on the rest (planes of 255 floats, rows
    of 65 start at every alignment). The eval affine walks each sample's planes as one run
    (vectors straddling two planes; 49-value planes too, which are not streamed one by
    one). The bits must be those of a small call, which stores everything the ordinary
    way: eval and backward are elementwise given the statistics."""
    x = make(shape, np.float32, "C", offset=3.0)
    dy = make(shape, np.float32, "C", seed=3)
    assert x.nbytes >= 16 << 20
    c = shape[axis]
    rm, rv = RNG.normal(3, 1, c), RNG.uniform(1, 4, c)
    w, b = RNG.normal(size=c), RNG.normal(size=c)
    y = bncore.batch_norm(x, rm, rv, w, b, training=False, axis=axis)
    y_small = bncore.batch_norm(x[:5], rm, rv, w, b, training=False, axis=axis)
    assert np.array_equal(y[:5], y_small)
    yt, m, s = bncore.batch_norm_forward(x, w, b, axis=axis)
    close(yt, ref.batch_norm_forward(x, w, b, axis=axis)[0], np.float32)
    dx, _, _ = bncore.batch_norm_backward(dy, x, m, s, w, axis=axis)
    # dx = k*dy + q*(x - mean) + r per channel: the same kernel on a 5-sample slice with
    # training=False gives k*dy only, so compare the full result with the reference instead
    close(dx, ref.batch_norm_backward(dy, x, m, s, w, axis=axis)[0], np.float32)
    dxe, _, _ = bncore.batch_norm_backward(dy, x, rm, 1 / np.sqrt(rv + 1e-5), w, axis=axis,
                                           training=False)
    dxe_small, _, _ = bncore.batch_norm_backward(dy[:5], x[:5], rm, 1 / np.sqrt(rv + 1e-5), w,
                                                 axis=axis, training=False)
    assert np.array_equal(dxe[:5], dxe_small)


@pytest.mark.parametrize("shape,axis", [((8, 32, 8, 8), 1), ((5, 7), 1), ((6, 5, 4), -1),
                                        ((4, 3, 5, 7), 2), ((3, 9, 4, 5), -3),
                                        ((16, 48, 40, 40), 1)], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_common_call_fast_path_matches_general_path(shape, axis, dtype, training):
    """batch_norm and batch_norm_forward take the common call (plain arrays, out=None) in
    one Cython step (_batchnorm.forward_common); with out= they take the general path.
    Both must give the same bits: y, saved statistics and running statistics."""
    c = shape[axis]
    x = make(shape, dtype, "C", offset=3.0)
    x0 = x.copy()
    rng = np.random.default_rng(7)
    w = rng.normal(size=c).astype(np.float32)          # float32 params for float64 x too
    b = rng.normal(size=c)
    rm, rv = rng.normal(size=c).astype(dtype), rng.uniform(1, 2, c)
    assert _batchnorm.forward_common(x, rm.copy(), rv.copy(), w, b, training, 0.1, 1e-5,
                                     axis, None) is not None
    for nt in (None, 1, 2):
        rm1, rv1, rm2, rv2 = rm.copy(), rv.copy(), rm.copy(), rv.copy()
        fast = bncore.batch_norm_forward(x, w, b, training=training, running_mean=rm1,
                                         running_var=rv1, axis=axis, n_threads=nt)
        slow = bncore.batch_norm_forward(x, w, b, training=training, running_mean=rm2,
                                         running_var=rv2, axis=axis, n_threads=nt,
                                         out=np.empty_like(x))
        for a, b_ in zip(fast + (rm1, rv1), slow + (rm2, rv2)):
            assert a.dtype == b_.dtype and np.array_equal(a, b_)
        assert np.array_equal(bncore.batch_norm(x, rm.copy(), rv.copy(), w, b, training,
                                                axis=axis, n_threads=nt), fast[0])
        if not training:
            assert np.array_equal(rm1, rm) and np.array_equal(rv1, rv)
    assert np.array_equal(x, x0)


@pytest.mark.parametrize("shape,axis", [((8, 32, 8, 8), 1), ((5, 7), 1), ((6, 5, 4), -1),
                                        ((4, 3, 5, 7), 2), ((16, 48, 40, 40), 1)], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_backward_common_call_matches_general_path(shape, axis, dtype, training):
    """batch_norm_backward takes the common call in one Cython step (backward_common), the
    general path with out=: the same bits."""
    c = shape[axis]
    x, dy = make(shape, dtype, "C", offset=3.0), make(shape, dtype, "C", seed=5)
    w = np.random.default_rng(8).normal(size=c).astype(np.float32)
    _, m, s = bncore.batch_norm_forward(x, w, axis=axis)
    assert _batchnorm.backward_common(dy, x, m, s, w, training, axis, None) is not None
    assert _batchnorm.backward_common(dy[..., :1], x, m, s, w, training, axis, None) is None
    for nt in (None, 1, 2):
        fast = bncore.batch_norm_backward(dy, x, m, s, w, training=training, axis=axis,
                                          n_threads=nt)
        slow = bncore.batch_norm_backward(dy, x, m, s, w, training=training, axis=axis,
                                          n_threads=nt, out=np.empty_like(x))
        for a, b_ in zip(fast, slow):
            assert a.dtype == b_.dtype and np.array_equal(a, b_)


@pytest.mark.parametrize("kind", ["strided", "float16", "swapped_weight", "int_eps",
                                  "numpy_axis", "bool_threads", "readonly_running",
                                  "one_per_channel", "empty", "2d_weight"])
def test_fast_path_declines_all_but_the_common_call(kind):
    """Anything but the common call returns None from forward_common, untouched, so that
    the general path handles it (and raises the errors)."""
    x, c = make((4, 3, 5, 5), np.float32, "C"), 3
    w, rm, rv = np.ones(c, np.float32), np.zeros(c, np.float32), np.ones(c, np.float32)
    args = dict(x=x, running_mean=rm, running_var=rv, weight=w, bias=None, training=True,
                momentum=0.1, eps=1e-5, axis=1, n_threads=None)
    if kind == "strided":
        args["x"] = x[:, :, ::2]
    elif kind == "float16":
        args["x"] = x.astype(np.float16)
    elif kind == "swapped_weight":
        args["weight"] = w.astype(">f4")
    elif kind == "int_eps":
        args["eps"] = 0
    elif kind == "numpy_axis":
        args["axis"] = np.int64(1)
    elif kind == "bool_threads":
        args["n_threads"] = True
    elif kind == "readonly_running":
        rm.flags.writeable = False
    elif kind == "one_per_channel":
        args["x"] = x[:1, :, :1, :1].copy()
    elif kind == "empty":
        args["x"] = x[:0]
    else:
        args["weight"] = w.reshape(1, c)
    before = [a.copy() for a in (rm, rv)]
    assert _batchnorm.forward_common(**args) is None
    assert np.array_equal(rm, before[0]) and np.array_equal(rv, before[1])


@pytest.mark.parametrize("planes,inner", [(8, 64), (4, 7), (16, 2048), (2, 16385), (160, 300)],
                         ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_training_float32_statistics_round_the_exact_ones(kind, planes, inner):
    """float32 channels of up to BN_RUN_MAX (32768) values take one double pass around a
    float shift, larger ones (32770) that pass per statistics block, each around its own
    shift, merged; (160, 300) is read sample by sample (planes_by_sample), one such pass
    per plane. Either way the saved mean and
    invstd (eps=0) are the exact statistics rounded to float32, inf and nan propagate as in
    NumPy, a constant channel gives exactly the bias, and the float64 running statistics
    of typical data are the exact ones to float64 precision (momentum 1: the batch's)."""
    rng = np.random.default_rng(planes * inner)
    rows = float32_rows(kind, 3, planes * inner, rng)       # 3 channels, a row each
    x = np.ascontiguousarray(rows.reshape(3, planes, inner).transpose(1, 0, 2))
    bias = rng.normal(size=3).astype(np.float32)
    rm, rv = np.zeros(3), np.zeros(3)
    _, mean, invstd = bncore.batch_norm_forward(x, eps=0.0, running_mean=rm, running_var=rv,
                                                momentum=1.0)
    y = bncore.batch_norm(x, None, None, bias=bias, training=True)
    y_rows = np.ascontiguousarray(y.transpose(1, 0, 2)).reshape(3, -1)
    check_float32_statistics(rows, mean, invstd, y_rows, bias[:, None], kind)
    if kind in ("normal", "offset"):
        n = rows.shape[1]
        for c in range(3):
            emean, evar = exact_moments(rows[c])
            assert abs(rm[c] - float(emean)) <= 1e-15 * abs(float(emean))
            assert abs(rv[c] - float(evar) * n / (n - 1)) <= 1e-13 * float(evar)


@pytest.mark.parametrize("shape", [(5, 3, 7, 9), (4, 37, 5, 6), (3, 64, 9, 9), (2, 300, 7, 5),
                                   (64, 300, 15, 17), (2, 9000, 3, 1)], ids=str)
def test_float32_eval_same_bits_in_both_layouts(shape):
    """float32 y = (x - mean) * k + b is one float expression (mean split as hi + lo) in
    both the NCHW plane kernel and the channels-last row kernel, whatever the channel
    count (vector tiles, scalar tails, 9000 channels: tiles of 2048 channels, one row
    each), the alignment of rows and whether stores stream (64x300x15x17 is 19 MiB)."""
    x = make(shape, np.float32, "C", offset=1e6, seed=4)
    c = shape[1]
    rm, rv = 1e6 + RNG.normal(size=c), RNG.uniform(0.5, 4, c)
    w, b = RNG.normal(size=c), RNG.normal(size=c)
    y = bncore.batch_norm(x, rm, rv, w, b)
    y_cl = bncore.batch_norm(np.ascontiguousarray(np.moveaxis(x, 1, -1)), rm, rv, w, b, axis=-1)
    assert np.array_equal(np.moveaxis(y_cl, -1, 1), y)
    close(y, ref.batch_norm(x, rm, rv, w, b), np.float32)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_one_channel_broadcast_input_fills_every_output(axis):
    """A stride-0 x with one channel is a 'rows' view (channel innermost); a fresh output
    of its shape looked like 'planes', and the kernel, given the planes strides for rows,
    wrote every row onto y[0] and left the rest unwritten (found by hypothesis)."""
    x = np.broadcast_to(np.float32(0.7), (1, 4))
    x2 = np.broadcast_to(np.arange(4, dtype=np.float32), (1, 4))
    for xx in (x, x2):
        c = xx.shape[axis]
        rm, rv = np.full(c, 0.1), np.full(c, 2.0)
        for _ in range(3):
            junk = np.full(4, 5.0, np.float32)   # leave recognisable values to reuse
            del junk
            y = bncore.batch_norm(xx, rm, rv, training=False, axis=axis)
            close(y, ref.batch_norm(xx, rm, rv, training=False, axis=axis), np.float32)
            dy = np.broadcast_to(np.float32(1.0), xx.shape)
            inv = 1 / np.sqrt(rv + 1e-5)
            dx = bncore.batch_norm_backward(dy, xx, rm, inv, training=False, axis=axis)[0]
            close(dx, ref.batch_norm_backward(dy, xx, rm, inv, training=False, axis=axis)[0],
                  np.float32)


def test_out_and_in_place():
    x = make((4, 3, 5, 5), np.float32, "C", offset=1.0)
    out = np.empty_like(x)
    y = bncore.batch_norm_forward(x, out=out)[0]
    assert y is out
    x2 = x.copy()
    y2 = bncore.batch_norm_forward(x2, out=x2)[0]
    assert y2 is x2
    np.testing.assert_array_equal(y2, out)
    # a non-contiguous out of another layout is filled too
    out_f = np.asfortranarray(np.empty_like(x))
    assert bncore.batch_norm_forward(x, out=out_f)[0] is out_f
    np.testing.assert_array_equal(out_f, out)
    dy = make((4, 3, 5, 5), np.float32, "C", seed=2)
    _, m, s = bncore.batch_norm_forward(x)
    dx_out = np.empty_like(x)
    assert bncore.batch_norm_backward(dy, x, m, s, out=dx_out)[0] is dx_out
    np.testing.assert_array_equal(dx_out, bncore.batch_norm_backward(dy, x, m, s)[0])


def test_zero_size_batch_like_pytorch():
    x = np.zeros((0, 3, 4, 4), np.float32)
    rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    y = bncore.batch_norm(x, rm, rv, training=True)
    yt = F.batch_norm(torch.from_numpy(x), torch.from_numpy(rm.copy()),
                      torch.from_numpy(rv.copy()), training=True)
    assert y.shape == tuple(yt.shape) == x.shape and y.dtype == np.float32
    np.testing.assert_array_equal(rm, np.full(3, 0.5, np.float32))
    np.testing.assert_array_equal(rv, np.full(3, 2.0, np.float32))
    dx, dw, db = bncore.batch_norm_backward(x, x, np.zeros(3), np.ones(3))
    assert dx.shape == x.shape and np.array_equal(dw, np.zeros(3))


def test_nan_stays_in_its_channel():
    x = RNG.normal(size=(4, 3, 5, 5))
    x[1, 1, 2, 2] = np.nan
    y = bncore.batch_norm_forward(x)[0]
    assert np.all(np.isnan(y[:, 1]))
    assert np.all(np.isfinite(y[:, [0, 2]]))
    close(y[:, [0, 2]], ref.batch_norm_forward(x)[0][:, [0, 2]], np.float64)


ERRORS = [
    ("one value per channel", dict(x=np.ones((1, 3)), training=True), ValueError,
     "more than 1 value per channel"),
    ("int input", dict(x=np.ones((4, 3), int)), TypeError, "x must be a float"),
    ("complex input", dict(x=np.ones((4, 3), complex)), TypeError, "x must be a float"),
    ("1-d input", dict(x=np.ones(4)), ValueError, "at least 2 dimensions"),
    ("weight shape", dict(weight=np.ones(4)), ValueError, r"weight must have shape \(3,\)"),
    ("bias shape", dict(bias=np.ones((3, 1))), ValueError, r"bias must have shape \(3,\)"),
    ("running_var shape", dict(running_var=np.ones(2)), ValueError, "running_var"),
    ("axis", dict(axis=4), np.exceptions.AxisError, "axis 4 is out of bounds"),
    ("eps", dict(eps=-1.0), ValueError, "eps"),
    ("eps nan", dict(eps=float("nan")), ValueError, "eps"),
    ("out dtype", dict(out=np.empty((4, 3, 2), np.float64)), TypeError, "out must have dtype"),
    ("out shape", dict(out=np.empty((4, 3), np.float32)), ValueError, "out must have shape"),
    ("n_threads", dict(n_threads=0), ValueError, "n_threads"),
    ("eval without stats", dict(training=False, running_mean=None), ValueError,
     "running_mean and running_var are required"),
]


@pytest.mark.parametrize("name,kwargs,exc,match", ERRORS, ids=[e[0] for e in ERRORS])
def test_bad_input_raises_and_modifies_nothing(name, kwargs, exc, match):
    args = dict(x=RNG.normal(size=(4, 3, 2)).astype(np.float32),
                running_mean=np.zeros(3, np.float32), running_var=np.ones(3, np.float32),
                weight=np.ones(3, np.float32), bias=np.zeros(3, np.float32), training=True)
    args.update(kwargs)
    snapshot = {k: v.copy() for k, v in args.items() if isinstance(v, np.ndarray)}
    with pytest.raises(exc, match=match):
        bncore.batch_norm(**args)
    for k, v in snapshot.items():
        np.testing.assert_array_equal(args[k], v)


def test_read_only_running_stats_rejected_before_writing():
    x = RNG.normal(size=(4, 3, 2))
    rm, rv = np.zeros(3), np.ones(3)
    rv.flags.writeable = False
    with pytest.raises(ValueError, match="running_var is read-only"):
        bncore.batch_norm(x, rm, rv, training=True)
    np.testing.assert_array_equal(rm, np.zeros(3))


def test_backward_rejects_mismatched_dy():
    x = RNG.normal(size=(4, 3, 2))
    m, s = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match="dy must have the shape of x"):
        bncore.batch_norm_backward(np.ones((4, 3)), x, m, s)
    with pytest.raises(TypeError, match="dy must have the dtype of x"):
        bncore.batch_norm_backward(np.ones((4, 3, 2), np.float32), x, m, s)
    with pytest.raises(ValueError, match="save_invstd must have shape"):
        bncore.batch_norm_backward(np.ones((4, 3, 2)), x, m, np.ones(4))


# Short NCHW planes (under 16 floats or 8 doubles) of adjacent channels: each sample's
# planes go as one run with per-value parameters from tables (bn_planes_affine_rect), in
# eval chunks that start and end inside samples ((300, 37, 1, 3): 111 values a sample,
# chunks of 16384), in training per group of channels; (7, 3000, 2, 2) has too few
# samples a chunk for the tables and goes plane by plane. Longer planes, in eval chunks
# holding every channel's planes at least twice, take their channel's parameters from a
# table made once a chunk: (128, 128, 4, 4), (40, 30, 5, 5), (64, 64, 3, 3) (float64).
SHORT_PLANES = [(256, 64, 2, 2), (300, 37, 1, 3), (64, 100, 3, 5), (9, 40, 1, 7),
                (7, 3000, 2, 2), (600, 5, 1, 1), (128, 128, 4, 4), (40, 30, 5, 5),
                (64, 64, 3, 3)]


def _affine_bits(x, mean, invstd, w, b):
    """The eval affine's documented arithmetic, elementwise in NumPy: float32 input gets
    ((x - hi) - lo) * k + b in float32 (mean = hi + lo, k = float32(w * invstd)); float64
    input (x - mean) * (w * invstd) + b."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    k = (w * invstd).reshape(shape)
    m, bb = mean.reshape(shape), b.reshape(shape)
    if x.dtype == np.float64:
        return (x - m) * k + bb
    hi = m.astype(np.float32)
    lo = (m - hi.astype(np.float64)).astype(np.float32)
    return ((x - hi) - lo) * k.astype(np.float32) + bb.astype(np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHORT_PLANES, ids=str)
def test_short_planes_eval_bits_and_training(shape, dtype):
    rng = np.random.default_rng(17)
    c = shape[1]
    x = rng.normal(1e3, 3.0, shape).astype(dtype)
    rm, rv = rng.normal(1e3, 1.0, c), rng.uniform(0.5, 4.0, c)
    w, b = rng.normal(size=c), rng.normal(size=c)
    invstd = 1.0 / np.sqrt(rv + 1e-5)
    want = _affine_bits(x, rm, invstd, w, b)
    for nt in (1, 2, 3):
        y = bncore.batch_norm(x, rm, rv, w, b, training=False, n_threads=nt)
        assert np.array_equal(y, want), f"eval, {nt} threads"
    base = bncore.batch_norm_forward(x, w, b, n_threads=1)
    for nt in (2, 3):
        got = bncore.batch_norm_forward(x, w, b, n_threads=nt)
        assert all(np.array_equal(u, v) for u, v in zip(base, got)), f"training, {nt} threads"
    if dtype == np.float64:   # the double statistics come back whole: the same expression
        assert np.array_equal(base[0], _affine_bits(x, base[1], base[2], w, b))
    for got, want_ in zip(base, ref.batch_norm_forward(x, w, b)):
        close(got, want_, dtype)
