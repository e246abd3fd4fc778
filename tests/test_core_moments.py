"""moments and Moments against NumPy, the float64 reference and exact rational arithmetic."""
import math
import pickle
from fractions import Fraction

import numpy as np
import pytest

import bncore
from bncore import _reference as ref

RNG = np.random.default_rng(7)


def exact_moments(values):
    """Mean and (biased) variance of the given floats, computed in exact arithmetic."""
    fr = [Fraction(float(v)) for v in np.ravel(values)]
    n = len(fr)
    mean = sum(fr) / n
    return mean, sum((v - mean) ** 2 for v in fr) / n


AXES = [None, 0, 1, -1, (0, 2), (0, 2, 3), (1, 3), (0, 1, 2, 3), (), (2,)]


@pytest.mark.parametrize("axis", AXES, ids=str)
@pytest.mark.parametrize("layout", ["C", "F", "strided", "transposed"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_against_reference(axis, layout, dtype):
    x = RNG.normal(3.0, 2.0, (5, 4, 6, 7)).astype(dtype)
    if layout == "F":
        x = np.asfortranarray(x)
    elif layout == "strided":
        x = np.repeat(x, 2, axis=1)[:, ::2]
    elif layout == "transposed":
        x = np.ascontiguousarray(x.transpose()).transpose()
    mean, var = bncore.moments(x, axis=axis)
    rmean, rvar = ref.moments(x, axis=axis)
    assert mean.dtype == var.dtype == dtype
    assert np.shape(mean) == np.shape(rmean) == np.shape(np.mean(x, axis=axis))
    tol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(mean, rmean, rtol=tol, atol=tol)
    np.testing.assert_allclose(var, rvar, rtol=tol * 10)


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("ddof", [0, 1, 3])
def test_keepdims_and_ddof_like_numpy(keepdims, ddof):
    x = RNG.normal(size=(6, 5, 4))
    for axis in (None, 1, (0, 2)):
        mean, var = bncore.moments(x, axis=axis, ddof=ddof, keepdims=keepdims)
        np.testing.assert_allclose(mean, np.mean(x, axis=axis, keepdims=keepdims), rtol=0,
                                   atol=1e-14)  # data scale is 1
        np.testing.assert_allclose(var, np.var(x, axis=axis, ddof=ddof, keepdims=keepdims),
                                   rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.int8, np.int64, np.uint16, np.bool_])
def test_integer_and_bool_give_float64(dtype):
    x = (RNG.integers(0, 100, (7, 9)) % (2 if dtype == np.bool_ else 100)).astype(dtype)
    mean, var = bncore.moments(x, axis=0)
    assert mean.dtype == var.dtype == np.float64
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(var, x.var(axis=0), rtol=1e-12)


def test_float16_and_byteswapped():
    x = RNG.normal(size=(40, 3)).astype(np.float16)
    mean, var = bncore.moments(x, axis=0)
    assert mean.dtype == np.float16
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(0), rtol=1e-3, atol=1e-3)
    y = RNG.normal(size=(40, 3)).astype(">f8")
    np.testing.assert_allclose(bncore.moments(y, axis=0)[1], y.var(0), rtol=1e-13)


@pytest.mark.parametrize("offset", [1e7, 1e9, -3e8])
def test_exact_statistics_at_huge_offsets(offset):
    x = offset + RNG.normal(0, 1e-2, 2001)
    mean, var = bncore.moments(x)
    emean, evar = exact_moments(x)
    assert abs(Fraction(float(mean)) - emean) <= abs(emean) * Fraction(1, 10 ** 15)
    assert abs(Fraction(float(var)) - evar) / evar < Fraction(1, 10 ** 12)


@pytest.mark.parametrize("shape,axis", [((64, 3, 40, 40), (0, 2, 3)), ((20000, 3), 0),
                                        ((3, 50000), 1)], ids=str)
def test_float32_mean_1e6_std_0p1(shape, axis):
    x = (1e6 + 0.1 * RNG.normal(size=shape)).astype(np.float32)
    mean, var = bncore.moments(x, axis=axis)
    moved = np.moveaxis(x, [a for a in range(x.ndim) if a not in np.atleast_1d(axis)], 0)
    for c in range(3):
        values = moved[c][::97]   # exact arithmetic on a sample; full channel in float64
        _, evar_sample = exact_moments(values)
        np.testing.assert_allclose(np.var(values.astype(np.float64)), float(evar_sample),
                                   rtol=1e-12)
        exact = moved[c].astype(np.float64).var()
        assert abs(float(var[c]) - exact) <= 1e-4 * exact


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_many_short_planes_sample_by_sample(dtype):
    """N >= 128 short planes are reduced sample by sample (memory order) instead of
    channel by channel: exact at a 1e6 offset, the same bits for any thread count, and
    batch_norm's saved statistics are these moments."""
    x = (1e6 + RNG.normal(0, 0.5, (300, 5, 7, 9))).astype(dtype)
    x[:, 2] = 1e6 + 0.25              # a constant channel
    mean, var = bncore.moments(x, axis=(0, 2, 3), n_threads=1)
    x64 = x.astype(np.float64)
    for c in range(5):
        values = x64[:, c].ravel()
        emean, evar = exact_moments(values)
        digits = 6 if dtype == np.float32 else 15
        assert abs(Fraction(float(mean[c])) - emean) <= abs(emean) * Fraction(1, 10 ** digits)
        if evar == 0:
            assert var[c] == 0
        else:
            rel = 1e-5 if dtype == np.float32 else 1e-11
            assert abs(Fraction(float(var[c])) - evar) <= evar * Fraction(rel)
    for nt in (2, 3, 8):
        got = bncore.moments(x, axis=(0, 2, 3), n_threads=nt)
        assert np.array_equal(got[0], mean) and np.array_equal(got[1], var)
    y, bm, binv = bncore.batch_norm_forward(x, n_threads=2)
    np.testing.assert_array_equal(bm, mean)
    assert np.all(y[:, 2] == 0)          # constant channel: exactly bias (0)
    yr, _, _ = ref.batch_norm_forward(x)   # its float64 mean rounds at ~1e6 * 2**-52 * log n
    np.testing.assert_allclose(y, yr, atol=1e-5 if dtype == np.float32 else 3e-8)


def _oracle_moments(values):
    """Mean and biased variance of float values in float64: fsum is correctly rounded, so
    both are within a few float64 ulps of the exact values (NumPy's for inf and nan)."""
    v = np.asarray(values, np.float64)
    if not np.all(np.isfinite(v)):
        with np.errstate(invalid="ignore"):
            return np.mean(v), np.var(v)
    mean = math.fsum(v) / v.size
    return mean, math.fsum((v - mean) ** 2) / v.size


def _float32_channels(kind, rows, nch):
    """(rows, nch) float32 values of one kind, for the exactness tests below."""
    if kind == "normal":
        x = RNG.normal(0.5, 2.0, (rows, nch))
    elif kind == "offset":
        x = 1e6 + RNG.normal(0, 0.1, (rows, nch))
    elif kind == "huge":   # a float sum of 128 of these overflows; the mean does not
        x = RNG.uniform(2e38, 3.4e38, (rows, nch)) * RNG.choice([-1, 1], nch)
    elif kind == "constant":
        x = np.broadcast_to(RNG.uniform(-3e38, 3e38, nch), (rows, nch))
    elif kind == "step":   # the running mean is a poor shift after the step
        x = RNG.normal(0, 1, (rows, nch))
        x[rows // 3:] = 1e6 + RNG.normal(0, 0.05, (rows - rows // 3, nch))
    else:   # inf in a later chunk, inf and -inf in two chunks, nan
        x = RNG.normal(0, 1, (rows, nch))
        x[2500, 0] = x[2900, 1] = np.inf
        x[5, 1] = -np.inf
        x[1700, 2] = np.nan
    return np.ascontiguousarray(x, np.float32)


def _assert_rounds_oracle(mean, var, flat, kind):
    """mean/var within one float32 ulp of the float64 statistics of each column of flat."""
    for c in range(flat.shape[1]):
        emean, evar = _oracle_moments(flat[:, c])
        for got, want in ((mean[c], emean), (var[c], evar)):
            with np.errstate(over="ignore"):   # a float64 variance past FLT_MAX: inf
                want32 = np.float32(want)
            if not np.isfinite(want32) or kind == "constant":
                assert got == want32 or np.isnan(got) and np.isnan(want), (c, got)
            else:
                assert abs(float(got) - want) <= np.spacing(abs(want32)), (c, got, want)


KINDS = ["normal", "offset", "huge", "constant", "step", "nonfinite"]


@pytest.mark.parametrize("nch", [3, 37, 64, 200])
@pytest.mark.parametrize("kind", KINDS)
def test_channels_last_float32_rounds_the_exact_statistics(nch, kind):
    """Channels-last float32 statistics (one pass in double around a float shift: the pivot,
    then each chunk's running mean) are the float64 statistics rounded once: within one
    float32 ulp of them, at a 1e6 offset, for values whose float sums overflow, for constant
    channels, after a step far from the running mean, with inf and nan; over several row
    blocks and chunks and every channel tile width (32, 4, 1)."""
    rows = 3003
    x = _float32_channels(kind, rows, nch)
    with np.errstate(over="ignore"):
        for axes, view in [(0, x), ((0, 1), x.reshape(7, rows // 7, nch)[:, ::2])]:
            mean, var = bncore.moments(view, axis=axes)
            _assert_rounds_oracle(mean, var, view.reshape(-1, nch), kind)


@pytest.mark.parametrize("inner", [1000, 64, 7])
@pytest.mark.parametrize("kind", KINDS)
def test_planes_float32_rounds_the_exact_statistics(inner, kind):
    """NCHW float32 statistics (blocks of planes: a float pass for a float shift, then sums
    in double around it; the double passes where the float sum overflows or meets inf and
    nan) are the float64 statistics rounded once, for long, short and odd planes."""
    rows = 3003 * 8 // inner * inner if inner != 7 else 3003
    x = _float32_channels(kind, rows, 4)               # (N * inner, C) values per channel
    planes = np.ascontiguousarray(x.reshape(rows // inner, inner, 4).transpose(0, 2, 1))
    with np.errstate(over="ignore"):
        mean, var = bncore.moments(planes, axis=(0, 2))
    _assert_rounds_oracle(mean, var, planes.transpose(0, 2, 1).reshape(-1, 4), kind)


def test_moments_of_a_broadcast_view_larger_than_2_31():
    base = RNG.normal(5.0, 1.0, (1, 64))
    x = np.broadcast_to(base, (2 ** 26, 64))          # 2**32 elements, no memory behind them
    assert x.size > 2 ** 31
    mean, var = bncore.moments(x, axis=0)
    np.testing.assert_allclose(mean, base[0], rtol=1e-15)
    np.testing.assert_array_equal(var, np.zeros(64))
    mean_all, var_all = bncore.moments(x)
    np.testing.assert_allclose(mean_all, base.mean(), rtol=1e-14)
    np.testing.assert_allclose(var_all, base.var(), rtol=1e-12)
    acc = bncore.Moments().update(x, axis=0)
    assert acc.count == 2 ** 26


def test_empty_and_degenerate_like_numpy():
    with pytest.warns(RuntimeWarning):
        mean, var = bncore.moments(np.zeros((0, 3)), axis=0)
    assert np.all(np.isnan(mean)) and np.all(np.isnan(var))
    with pytest.warns(RuntimeWarning):
        _, var = bncore.moments(np.array([1.0, 2.0]), ddof=2)
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        assert np.isinf(var) == np.isinf(np.var(np.array([1.0, 2.0]), ddof=2))


def test_bitwise_identical_for_any_thread_count():
    x = RNG.normal(2.0, 3.0, (32, 8, 64, 64)).astype(np.float32)
    base = bncore.moments(x, axis=(0, 2, 3), n_threads=1)
    for nt in (2, 3, 8):
        for a, b in zip(base, bncore.moments(x, axis=(0, 2, 3), n_threads=nt)):
            assert np.array_equal(a, b)
    flat = bncore.moments(x, n_threads=1)
    assert all(np.array_equal(a, b) for a, b in zip(flat, bncore.moments(x, n_threads=2)))


def test_bad_input():
    with pytest.raises(TypeError, match="x must be a real"):
        bncore.moments(np.ones(3, complex))
    with pytest.raises(TypeError, match="x must be a real"):
        bncore.moments(np.array(["a", "b"]))
    with pytest.raises(ValueError, match="repeats"):
        bncore.moments(np.ones((2, 2)), axis=(0, 0))
    with pytest.raises(np.exceptions.AxisError, match="axis"):
        bncore.moments(np.ones((2, 2)), axis=2)


# ------------------------------------------------------------------ streaming Moments

def test_streaming_updates_equal_one_shot():
    x = RNG.normal(4.0, 2.0, (1000, 3, 5))
    acc = bncore.Moments()
    for chunk in np.array_split(x, 7):
        acc.update(chunk, axis=0)
    mean, var = bncore.moments(x, axis=0)
    assert acc.count == 1000
    np.testing.assert_allclose(acc.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(acc.var(), var, rtol=1e-12)
    np.testing.assert_allclose(acc.var(ddof=1), x.var(axis=0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(acc.std(), np.sqrt(var), rtol=1e-12)


def test_merge_is_exact_and_leaves_other_unchanged():
    x = 1e8 + RNG.normal(size=(3001, 4))
    parts = np.array_split(x, 5)
    accs = [bncore.Moments().update(p, axis=0) for p in parts]
    total = bncore.Moments()
    for a in reversed(accs):
        total.merge(a)
    assert accs[0].count == len(parts[0])
    for c in range(4):
        emean, evar = exact_moments(x[:, c])
        assert abs(Fraction(float(total.mean[c])) - emean) <= abs(emean) * Fraction(1, 10 ** 15)
        # Partial means at 1e8 carry ~1e-8 absolute rounding, which enters each merge
        # through delta: ~2e-10 relative for unit variance (condition number 1e16).
        assert abs(Fraction(float(total.var()[c])) - evar) / evar < Fraction(1, 10 ** 9)


def test_update_with_tuple_axis_and_pickle_round_trip():
    x = RNG.normal(size=(6, 3, 4, 4)).astype(np.float32)
    acc = bncore.Moments().update(x, axis=(0, 2, 3))
    clone = pickle.loads(pickle.dumps(acc))
    assert clone.count == acc.count == 6 * 16
    np.testing.assert_array_equal(clone.mean, acc.mean)
    np.testing.assert_array_equal(clone.var(), acc.var())
    clone.update(x, axis=(0, 2, 3))
    np.testing.assert_allclose(clone.mean, acc.mean, rtol=1e-12)
    assert acc.count == 6 * 16


def test_moments_errors_leave_state_unchanged():
    acc = bncore.Moments().update(np.ones((4, 3)), axis=0)
    with pytest.raises(ValueError, match="feature shape"):
        acc.update(np.ones((4, 5)), axis=0)
    with pytest.raises(TypeError, match="Moments"):
        acc.merge(np.ones(3))
    assert acc.count == 4
    np.testing.assert_array_equal(acc.mean, np.ones(3))
    empty = bncore.Moments()
    assert empty.count == 0 and np.isnan(empty.mean)
    acc.merge(empty)
    assert acc.count == 4


def test_a_variance_past_the_float64_range_is_inf_not_nan():
    """Finite float64 data whose squares overflow (a spread past ~1e154): the one-pass
    M2 = sum(u^2) - sum(u)^2/n was inf - inf = NaN, and the ops normalised to all NaN.
    NumPy's var (and the reference's) is inf there, invstd 0; data holding inf or NaN still
    give NaN."""
    v = np.array([0.0, 1e306, 2e306, 3e306])
    x = np.array([[[1e307, 5e306], [-1e307, -5e306], [2.5e306, 0.0]]])   # one group of 6
    with np.errstate(over="ignore"):   # NumPy's overflow in square
        assert np.var(v) == np.inf and ref.moments(v)[1] == np.inf
        want_y = ref.layer_norm(v[None], 4)
        want_g = ref.group_norm_forward(x, 1)[2][0, 0]
    assert bncore.moments(v)[1] == np.inf
    assert bncore.Moments().update(v.reshape(-1, 1), axis=0).var()[0] == np.inf
    assert bncore.layer_norm_forward(v[None], 4)[2][0] == 0.0
    assert bncore.batch_norm_forward(v.reshape(4, 1))[2][0] == 0.0
    np.testing.assert_array_equal(bncore.layer_norm(v[None], 4), want_y)
    assert bncore.group_norm_forward(x, 1)[2][0, 0] == 0.0 == want_g
    for bad in (np.inf, np.nan):
        w = v.copy()
        w[2] = bad
        assert np.isnan(bncore.moments(w)[1])
