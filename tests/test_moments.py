"""bncore.moments and bncore.Moments against the float64 reference, NumPy and exact
rational arithmetic, over dtypes x layouts x shapes x offsets and every kind of axis."""
import pickle
import warnings
from fractions import Fraction

import numpy as np
import pytest

import bncore
from arrays import Case, cases, exact_moments, fraction_moments, layout, rel_err

# Statistics are accumulated in float64, so results are the exact value rounded once to
# the output dtype: allow 1 ulp of that dtype (float64: a few ulp of accumulated error).
VAR_RTOL = {np.dtype(np.float64): 1e-13, np.dtype(np.float32): 2.0 ** -23,
            np.dtype(np.float16): 2.0 ** -10}


def native(dtype):
    return np.dtype(dtype).newbyteorder("=")


def axis_specs(ndim, ch):
    """Reductions worth trying on an array whose channel axis is ``ch``."""
    rest = tuple(a for a in range(ndim) if a != ch)
    specs = [None, ch, rest, 0, -1, tuple(range(ndim)), ()]
    if ndim >= 3:
        specs += [(ndim - 1, 0), (-1, -2)]          # unsorted and negative tuples
    return specs


def check_like_reference(got, want, dtype, scale, what):
    mean, var = got
    rmean, rvar = want
    dt = native(dtype)
    assert np.shape(mean) == np.shape(rmean) and np.shape(var) == np.shape(rvar), what
    assert np.asarray(mean).dtype == dt and np.asarray(var).dtype == dt, what
    rtol = VAR_RTOL[dt]
    np.testing.assert_allclose(np.asarray(mean, np.float64), rmean, rtol=rtol,
                               atol=rtol * scale, err_msg=what + " mean")
    np.testing.assert_allclose(np.asarray(var, np.float64), rvar, rtol=rtol, atol=0,
                               err_msg=what + " var")


@pytest.mark.parametrize("case", cases())
def test_against_reference(case, ref, unchanged):
    x = case.make()
    snap = unchanged(x)
    ch = case.axis % x.ndim
    for axis in axis_specs(x.ndim, ch):
        got = bncore.moments(x, axis=axis)
        want = ref.moments(x, axis=axis)
        check_like_reference(got, want, case.dtype, case.offset + case.scale, f"axis={axis}")
        assert np.shape(got[0]) == np.shape(np.mean(x, axis=axis))
    snap.check()


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("ddof", [0, 1, 2])
@pytest.mark.parametrize("kind", ["C", "F", "strided_c", "flipped", "swapped", "chmem"])
def test_ddof_keepdims_like_numpy(kind, ddof, keepdims):
    x = Case((5, 4, 3, 6), 1, np.float64, kind, offset=10.0).make()
    for axis in (None, 1, -1, (0, 2), (3, 0, 1), ()):
        if ddof and axis == ():
            continue        # one value per slice: NumPy warns and gives nan/inf (tested below)
        mean, var = bncore.moments(x, axis=axis, ddof=ddof, keepdims=keepdims)
        want_mean = np.mean(x, axis=axis, keepdims=keepdims)
        want_var = np.var(x, axis=axis, ddof=ddof, keepdims=keepdims)
        assert np.shape(mean) == np.shape(want_mean) and np.shape(var) == np.shape(want_var)
        assert type(mean) is type(want_mean) and type(var) is type(want_var), axis
        np.testing.assert_allclose(mean, want_mean, rtol=1e-14)
        np.testing.assert_allclose(var, want_var, rtol=1e-12)


def test_scalar_results_for_full_reductions():
    x = np.arange(12.0).reshape(3, 4)
    mean, var = bncore.moments(x)
    assert np.ndim(mean) == 0 and np.ndim(var) == 0
    assert mean == 5.5 and var == np.var(x)
    mean, var = bncore.moments(x, keepdims=True)
    assert mean.shape == var.shape == (1, 1)


@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.uint8, np.int16, np.int32,
                                   np.int64, np.uint32, np.uint64])
def test_integer_and_bool_input_gives_float64(dtype):
    rng = np.random.default_rng(3)
    if dtype == np.bool_:
        x = rng.integers(0, 2, (9, 5, 4)).astype(bool)
    else:
        info = np.iinfo(dtype)
        x = rng.integers(max(info.min, -1000), min(info.max, 1000), (9, 5, 4), dtype=dtype)
    for axis in (None, 0, (0, 2), -1):
        for ddof in (0, 1):
            mean, var = bncore.moments(x, axis=axis, ddof=ddof)
            assert np.asarray(mean).dtype == np.asarray(var).dtype == np.float64
            scale = float(np.max(np.abs(x.astype(np.float64))))
            np.testing.assert_allclose(mean, np.mean(x, axis=axis), rtol=1e-15,
                                       atol=1e-15 * scale)
            np.testing.assert_allclose(var, np.var(x, axis=axis, ddof=ddof), rtol=1e-13,
                                       atol=1e-15 * scale ** 2)


def test_large_int64_like_numpy():
    x = np.array([[2 ** 53 + 1, 2 ** 53 + 3], [2 ** 60, -2 ** 60], [7, 9]], np.int64)
    mean, var = bncore.moments(x, axis=1)
    np.testing.assert_allclose(mean, np.mean(x, axis=1), rtol=1e-15)
    np.testing.assert_allclose(var, np.var(x, axis=1), rtol=1e-13)


def test_array_likes():
    mean, var = bncore.moments([[1, 2, 3], [4, 5, 7]], axis=0)
    np.testing.assert_allclose(mean, [2.5, 3.5, 5.0])
    np.testing.assert_allclose(var, [2.25, 2.25, 4.0])
    mean, var = bncore.moments(3.0)
    assert mean == 3.0 and var == 0.0


# ------------------------------------------------------------------ exact arithmetic

def test_exact_helper_agrees_with_fraction_sums():
    rng = np.random.default_rng(0)
    for values in (1e7 + rng.normal(0, 1e-2, 300), rng.normal(0, 3, 300),
                   (1e6 + rng.normal(0, 0.1, 300)).astype(np.float32)):
        assert exact_moments(values) == fraction_moments(values)


@pytest.mark.parametrize("offset,spread", [(1e7, 1e-2), (1e7, 1.0), (-3e8, 0.5),
                                           (1e9, 1e-1), (0.0, 1e-3)])
@pytest.mark.parametrize("shape,axis", [((2001,), None), ((5003,), None), ((1001, 3), 0),
                                        ((5000, 3), 0), ((9, 3, 17, 13), (0, 2, 3)),
                                        ((20, 3, 30, 30), (0, 2, 3)),
                                        ((9, 17, 13, 3), (0, 1, 2)), ((3, 5003), -1)], ids=str)
def test_float64_exact_to_1e12(offset, spread, shape, axis):
    x = offset + np.random.default_rng(11).normal(0, spread, shape)
    mean, var = bncore.moments(x, axis=axis)
    if axis is None:
        groups = [x]
    else:
        kept = [a for a in range(x.ndim) if a not in np.atleast_1d(np.asarray(axis) % x.ndim)]
        groups = list(np.moveaxis(x, kept[0], 0))
    for c, values in enumerate(groups):
        emean, evar = exact_moments(values)
        m = mean if axis is None else mean[c]
        v = var if axis is None else var[c]
        assert abs(Fraction(float(m)) - emean) <= abs(emean) * 1e-15 + spread * 1e-15, (c, m)
        assert rel_err(v, evar) <= 1e-12, (c, float(v), float(evar))


def _rows_f64_cases():
    """float64 channels-last data (700 rows of 37 channels: two tiles of 16 and 5 more;
    blocks of 221, 221 and 258 rows) that the one-pass statistics must get right, or hand to the
    two-pass: offsets, drifting rows (each block's mean far from the running shift), a
    step, constant channels (one whose first rows differ), and a channel of huge values."""
    rng = np.random.default_rng(23)
    base = rng.normal(0, 1.0, (700, 37))
    ramp = np.linspace(0, 1, 700)[:, None]
    out = {"offset 1e9": 1e9 + 0.1 * base, "offset -3e8": -3e8 + base,
           "drift": 1e6 * ramp + 1e-3 * base, "step": np.where(ramp < 0.5, 0.0, 1e6) + base,
           "sorted": np.sort(base, axis=0)}
    x = 5.0 + base
    x[:, 3] = 7.25                              # constant
    x[:, 20] = -1e-300                          # constant, tiny
    x[:, 21] = 2.5
    x[:10, 21] = 1e5                            # constant after ten other rows
    x[:, 30] = 1e150 * base[:, 30]              # squares near the double range
    out["constants"] = x
    return out


@pytest.mark.parametrize("kind", list(_rows_f64_cases()))
def test_float64_channels_last_exact_with_one_pass_blocks(kind):
    """float64 rows (channels-last) statistics go in one pass per block around a shift
    near each channel's mean, a tile with a shift too far from its mean again by the
    two-pass: exact to 1e-15 (mean) and 1e-12 (variance) whichever way, the same bits
    for any thread count, a constant channel's variance exactly 0."""
    x = _rows_f64_cases()[kind]
    mean, var = bncore.moments(x, axis=0, n_threads=1)
    for c in range(x.shape[1]):
        emean, evar = exact_moments(x[:, c])
        spread = float(np.max(x[:, c]) - np.min(x[:, c]))
        assert abs(Fraction(float(mean[c])) - emean) <= abs(emean) * 1e-15 + spread * 1e-15, c
        if evar == 0:
            assert var[c] == 0 and mean[c] == x[0, c], c
        else:
            assert rel_err(var[c], evar) <= 1e-12, (c, float(var[c]), float(evar))
    for nt in (2, 3, 8):
        got = bncore.moments(x, axis=0, n_threads=nt)
        assert np.array_equal(got[0], mean) and np.array_equal(got[1], var)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [127, 128, 129, 255, 256, 257, 383, 1151])
def test_channels_last_blocks_and_their_remainders_exact(rows, dtype):
    """Row counts about the statistics blocks of 64 channels (128 rows; a chunk's last
    block takes a remainder of up to 255 rows: block_rows), at an offset of 1e6 with a
    drift along the rows: exact to 1e-15 (mean) and 1e-12 (variance) of the values given
    (float32 results: within one float32 ulp of the exact values), the same bits for any
    thread count."""
    rng = np.random.default_rng(rows)
    x = (1e6 + np.linspace(0, 3, rows)[:, None] + rng.normal(0, 0.5, (rows, 64))).astype(dtype)
    mean, var = bncore.moments(x, axis=0, n_threads=1)
    assert mean.dtype == dtype and var.dtype == dtype
    for c in range(0, 64, 7):
        emean, evar = exact_moments(x[:, c].astype(np.float64))
        if dtype == np.float64:
            assert abs(Fraction(float(mean[c])) - emean) <= abs(emean) * 1e-15, c
            assert rel_err(var[c], evar) <= 1e-12, c
        else:
            ulp_m = Fraction(float(np.spacing(np.float32(float(emean)))))
            ulp_v = Fraction(float(np.spacing(np.float32(float(evar)))))
            assert abs(Fraction(float(mean[c])) - emean) <= ulp_m, c
            assert abs(Fraction(float(var[c])) - evar) <= ulp_v, c
    got = bncore.moments(x, axis=0, n_threads=3)
    assert np.array_equal(got[0], mean) and np.array_equal(got[1], var)


def test_float64_channels_last_nan_inf_stay_in_their_channel():
    """A nan or inf sends its tile of 16 channels to the two-pass: that channel is
    nan (inf - inf) or inf like NumPy's, the tile's other channels exact."""
    x = 3.0 + np.random.default_rng(29).normal(0, 1.0, (500, 32))
    x[100, 5] = np.nan
    x[200, 17] = np.inf
    mean, var = bncore.moments(x, axis=0)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(np.isnan(mean), np.isnan(x.mean(axis=0)))
        np.testing.assert_array_equal(np.isnan(var), np.isnan(x.var(axis=0)))
    assert mean[17] == np.inf
    for c in (0, 4, 6, 16, 18, 31):
        emean, evar = exact_moments(x[:, c])
        assert abs(Fraction(float(mean[c])) - emean) <= abs(emean) * 1e-15
        assert rel_err(var[c], evar) <= 1e-12


@pytest.mark.parametrize("shape,axis", [((64, 3, 24, 24), (0, 2, 3)), ((64, 24, 24, 3), (0, 1, 2)),
                                        ((30000, 3), 0), ((3, 40000), 1)], ids=str)
def test_float32_mean_1e6_std_0p1(shape, axis):
    x = (1e6 + 0.1 * np.random.default_rng(5).normal(size=shape)).astype(np.float32)
    mean, var = bncore.moments(x, axis=axis)
    assert mean.dtype == var.dtype == np.float32
    kept = [a for a in range(x.ndim) if a not in np.atleast_1d(axis)][0]
    for c, values in enumerate(np.moveaxis(x, kept, 0)):
        emean, evar = exact_moments(values)         # of the float32 values actually stored
        assert rel_err(var[c], evar) <= 1e-4, (c, float(var[c]), float(evar))
        # float64 accumulation: the float32 result is the exact value rounded once
        assert rel_err(var[c], evar) <= 2.0 ** -23, (c, float(var[c]), float(evar))
        assert rel_err(mean[c], emean) <= 2.0 ** -23, (c, float(mean[c]), float(emean))


def test_float16_input_float16_result():
    x = np.random.default_rng(2).normal(50.0, 2.0, (200, 3)).astype(np.float16)
    mean, var = bncore.moments(x, axis=0)
    assert mean.dtype == var.dtype == np.float16
    for c in range(3):
        emean, evar = exact_moments(x[:, c])
        assert rel_err(mean[c], emean) <= 2.0 ** -10
        assert rel_err(var[c], evar) <= 2.0 ** -10


def test_empty_and_too_few_values_like_numpy():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for x, axis, ddof in [(np.zeros((0, 3)), 0, 0), (np.zeros((0, 3)), None, 0),
                              (np.ones((2, 3)), 0, 2), (np.ones((2, 3)), 0, 5),
                              (np.array([1.0, 2.0]), None, 2), (np.ones((4, 3)), (), 1)]:
            mean, var = bncore.moments(x, axis=axis, ddof=ddof)
            np.testing.assert_array_equal(mean, np.mean(x, axis=axis))
            np.testing.assert_array_equal(var, np.var(x, axis=axis, ddof=ddof))
    with pytest.warns(RuntimeWarning):
        bncore.moments(np.zeros((0, 3)), axis=0)


def test_nan_and_inf_stay_in_their_slice():
    x = np.random.default_rng(1).normal(size=(6, 4))
    x[2, 1] = np.nan
    x[3, 2] = np.inf
    with np.errstate(invalid="ignore"):
        mean, var = bncore.moments(x, axis=0)
        np.testing.assert_array_equal(np.isnan(mean), np.isnan(np.mean(x, axis=0)))
        np.testing.assert_array_equal(np.isnan(var), np.isnan(np.var(x, axis=0)))
        assert mean[2] == np.inf
    np.testing.assert_allclose(mean[[0, 3]], np.mean(x, axis=0)[[0, 3]], rtol=1e-15)


def test_bitwise_identical_for_any_thread_count():
    x = Case((32, 8, 32, 32), 1, np.float32, "C", offset=3.0).make()
    for axis in ((0, 2, 3), None, 1, (0, 1)):
        base = bncore.moments(x, axis=axis, n_threads=1)
        for nt in (2, 3):
            got = bncore.moments(x, axis=axis, n_threads=nt)
            assert all(np.array_equal(a, b) for a, b in zip(base, got)), (axis, nt)


@pytest.mark.parametrize("x,axis,exc", [
    (np.ones(3, complex), None, TypeError),
    (np.array(["a", "b"]), None, TypeError),
    (np.array([1.0, None], dtype=object), None, TypeError),
    (np.ones((2, 2)), (0, 0), ValueError),
    (np.ones((2, 2)), (1, -1), ValueError),
    (np.ones((2, 2)), 2, np.exceptions.AxisError),
    (np.ones((2, 2)), -3, np.exceptions.AxisError),
    (np.ones((2, 2)), 1.0, TypeError),
], ids=["complex", "str", "object", "repeat", "repeat-negative", "axis2", "axis-3",
        "float-axis"])
def test_bad_input(x, axis, exc):
    with pytest.raises(exc):
        bncore.moments(x, axis=axis)


# ------------------------------------------------------------------ streaming Moments

def one_shot(x, axis):
    return bncore.moments(x, axis=axis)


@pytest.mark.parametrize("shape,axis,split_axis", [
    ((1000, 3, 5), 0, 0),
    ((40, 6, 7, 5), (0, 2, 3), 0),
    ((40, 7, 5, 6), (0, 1, 2), 0),
    ((7, 300), -1, 1),
    ((500,), 0, 0),
    ((60, 5, 4), (2, 0), 0),
], ids=str)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_streaming_updates_then_merge_equal_one_shot(shape, axis, split_axis, dtype):
    x = (1e3 + np.random.default_rng(4).normal(0, 2.0, shape)).astype(dtype)
    parts = np.array_split(x, 7, axis=split_axis)
    left, right = bncore.Moments(), bncore.Moments()
    for i, p in enumerate(parts):
        out = (left if i < 3 else right).update(p, axis=axis)
        assert out is (left if i < 3 else right)
    assert left.merge(right) is left
    mean, var = one_shot(x.astype(np.float64), axis)
    n = x.size // np.size(mean)
    assert left.count == n and isinstance(left.count, int)
    assert np.shape(left.mean) == np.shape(mean)
    assert np.asarray(left.mean).dtype == np.float64
    np.testing.assert_allclose(left.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(left.var(), var, rtol=1e-12)
    np.testing.assert_allclose(left.var(ddof=1), var * n / (n - 1), rtol=1e-12)
    np.testing.assert_allclose(left.std(), np.sqrt(var), rtol=1e-12)
    np.testing.assert_allclose(left.std(ddof=1), np.sqrt(var * n / (n - 1)), rtol=1e-12)
    # the accumulator that was merged in is left as it was
    rmean, rvar = one_shot(np.concatenate(parts[3:], axis=split_axis).astype(np.float64), axis)
    np.testing.assert_allclose(right.mean, rmean, rtol=1e-12)
    np.testing.assert_allclose(right.var(), rvar, rtol=1e-12)


def test_merge_trees_are_exact():
    x = 1e8 + np.random.default_rng(8).normal(size=(3001, 4))
    accs = [bncore.Moments().update(p, axis=0) for p in np.array_split(x, 8)]
    pairs = [bncore.Moments().merge(a).merge(b) for a, b in zip(accs[::2], accs[1::2])]
    tree = pairs[0].merge(pairs[1]).merge(pairs[2].merge(pairs[3]))
    chain = bncore.Moments()
    for a in reversed(accs):
        chain.merge(a)
    for total in (tree, chain):
        assert total.count == 3001
        for c in range(4):
            emean, evar = exact_moments(x[:, c])
            assert rel_err(total.mean[c], emean) <= 1e-15
            # partial means near 1e8 carry ~1e-8 rounding that enters through delta
            assert rel_err(total.var()[c], evar) <= 1e-9


def test_merge_with_itself_counts_the_data_twice():
    x = np.random.default_rng(9).normal(5.0, 2.0, (50, 3))
    acc = bncore.Moments().update(x, axis=0)
    twin = pickle.loads(pickle.dumps(acc))
    acc.merge(acc)
    twin.merge(pickle.loads(pickle.dumps(twin)))
    assert acc.count == twin.count == 100
    np.testing.assert_allclose(acc.mean, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(acc.var(), x.var(0), rtol=1e-12)
    np.testing.assert_array_equal(acc.var(), twin.var())


def test_empty_accumulator_and_empty_batches():
    empty = bncore.Moments()
    assert empty.count == 0
    assert np.isnan(empty.mean) and np.isnan(empty.var())
    acc = bncore.Moments().update(np.ones((4, 3)), axis=0)
    acc.merge(bncore.Moments())
    assert acc.count == 4
    acc.update(np.ones((0, 3)), axis=0)
    assert acc.count == 4
    np.testing.assert_array_equal(acc.mean, np.ones(3))
    np.testing.assert_array_equal(acc.var(), np.zeros(3))
    fresh = bncore.Moments().merge(acc)
    assert fresh.count == 4
    np.testing.assert_array_equal(fresh.mean, acc.mean)


def test_scalar_feature_shape_and_integer_batches():
    acc = bncore.Moments()
    acc.update(np.arange(10), axis=0).update(np.arange(10, 20, dtype=np.int8), axis=0)
    assert acc.count == 20 and np.ndim(acc.mean) == 0
    assert acc.mean == 9.5
    np.testing.assert_allclose(acc.var(), np.var(np.arange(20)), rtol=1e-15)
    acc.update(np.array([True, False]), axis=0)
    assert acc.count == 22


@pytest.mark.parametrize("kind", ["F", "strided_c", "flipped", "swapped", "chmem"])
def test_update_accepts_any_layout(kind):
    case = Case((12, 5, 4, 3), 1, np.float64, kind, offset=100.0)
    x, base = case.make(), Case((12, 5, 4, 3), 1, np.float64, offset=100.0).make()
    a = bncore.Moments().update(x, axis=(0, 2, 3))
    b = bncore.Moments().update(base, axis=(0, 2, 3))
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-15)
    np.testing.assert_allclose(a.var(), b.var(), rtol=1e-13)


@pytest.mark.parametrize("shape,axis", [
    ((256, 64), 0),                 # a mini-batch of features
    ((8, 16, 5, 5), (0, 2, 3)),     # batch-norm channels
    ((3, 20, 20, 8), (1, 2)),       # per sample and channel (leading blocks)
    ((7, 9), None),                 # everything: a scalar feature shape
    ((5, 6, 7), -1),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_update_takes_the_fast_path(shape, axis, dtype, monkeypatch):
    """Moments.update of a plain array over an int, tuple or None axis reduces through
    _stats.update_common (16.6 -> 7.6 us an update of a (256, 64) float32 batch): the same
    count, mean and M2 bits as the general path on the same arrays (update_common
    declining), over two updates and a merge; and the general path is not entered."""
    from bncore import _api, _stats
    rng = np.random.default_rng(12)
    xs = [(rng.normal(size=shape) * 2 + 1e3).astype(dtype) for _ in range(2)]

    def refuse(*args, **kwargs):
        raise AssertionError("the general path was taken")

    with monkeypatch.context() as m:
        m.setattr(_stats, "update_common", lambda x, axis: None)
        general = bncore.Moments()
        for x in xs:
            general.update(x, axis=axis)
    with monkeypatch.context() as m:
        m.setattr(_api, "_raw_moments", refuse)
        with pytest.raises(AssertionError, match="general path"):   # the check can fail
            bncore.Moments().update(xs[0].tolist(), axis=axis)
        fast = bncore.Moments()
        for x in xs:
            fast.update(x, axis=axis)
    assert fast.count == general.count == 2 * (xs[0].size // np.size(fast.mean))
    assert np.shape(fast.mean) == np.shape(general.mean)
    np.testing.assert_array_equal(fast.mean, general.mean)
    np.testing.assert_array_equal(fast.var(ddof=1), general.var(ddof=1))
    if axis in (0, (0, 2, 3), None):   # both batches stacked on a reduced axis: one pass
        mean, var = bncore.moments(np.concatenate(xs, axis=0), axis=axis)
        f32 = dtype == np.float32          # (moments rounds its results to x's dtype)
        np.testing.assert_allclose(fast.mean, mean, rtol=1e-7 if f32 else 1e-12)
        np.testing.assert_allclose(fast.var(), var, rtol=1e-6 if f32 else 1e-10)


def test_pickle_round_trip():
    x = np.random.default_rng(6).normal(size=(6, 3, 4, 4)).astype(np.float32)
    acc = bncore.Moments().update(x, axis=(0, 2, 3))
    for proto in range(2, pickle.HIGHEST_PROTOCOL + 1):
        clone = pickle.loads(pickle.dumps(acc, protocol=proto))
        assert clone.count == acc.count == 96
        np.testing.assert_array_equal(clone.mean, acc.mean)
        np.testing.assert_array_equal(clone.var(ddof=1), acc.var(ddof=1))
    # a clone goes on exactly like the original, and they are independent
    clone = pickle.loads(pickle.dumps(acc))
    clone.update(x[:2], axis=(0, 2, 3))
    acc2 = pickle.loads(pickle.dumps(acc)).update(x[:2], axis=(0, 2, 3))
    np.testing.assert_array_equal(clone.var(), acc2.var())
    assert acc.count == 96 and clone.count == 128
    empty = pickle.loads(pickle.dumps(bncore.Moments()))
    assert empty.count == 0
    empty.update(x, axis=(0, 2, 3))
    np.testing.assert_array_equal(empty.mean, acc.mean)


def test_errors_leave_the_accumulator_unchanged():
    acc = bncore.Moments().update(np.arange(12.0).reshape(4, 3), axis=0)
    mean, var = acc.mean, acc.var()
    with pytest.raises(ValueError):
        acc.update(np.ones((4, 5)), axis=0)
    with pytest.raises(ValueError):
        acc.merge(bncore.Moments().update(np.ones((2, 2)), axis=0))
    with pytest.raises(TypeError):
        acc.merge(np.ones(3))
    with pytest.raises(TypeError):
        acc.update(np.ones((4, 3), complex), axis=0)
    with pytest.raises(np.exceptions.AxisError):
        acc.update(np.ones((4, 3)), axis=2)
    assert acc.count == 4
    np.testing.assert_array_equal(acc.mean, mean)
    np.testing.assert_array_equal(acc.var(), var)


def test_layouts_helper_keeps_values():
    a = np.random.default_rng(0).normal(size=(3, 4, 5))
    for kind in ("C", "F", "strided_c", "strided_n", "transposed", "flipped", "swapped",
                 "chmem"):
        np.testing.assert_array_equal(layout(a, kind), a)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7,), (5, 3), (4, 6, 3, 5), (300, 9), (2, 3, 4, 5, 6)])
@pytest.mark.parametrize("keepdims", [False, True])
def test_common_call_fast_path_matches_general_path(dtype, shape, keepdims):
    """moments() takes the common call (a plain array, kept axes adjacent, int ddof) in one
    Cython step (_stats.moments_common): the same bits, shapes and dtypes as the general
    path, for every reduction it accepts; the rest it declines."""
    from bncore import _api, _stats
    rng = np.random.default_rng(len(shape) * 7 + keepdims)
    x = (rng.normal(size=shape) * 3 + 1e4).astype(dtype)
    nd = len(shape)
    specs = {None, tuple(range(nd)), -1, 0}
    for a in range(nd if nd > 1 else 0):
        specs.add(tuple(b for b in range(nd) if b != a))   # all but one: batch norm
    if nd >= 3:
        specs.add((0, nd - 1))                             # keeps the middle axes
    taken = 0
    for axis in sorted(specs, key=repr):
        for ddof in (0, 1):
            got = _stats.moments_common(x, axis, ddof, keepdims, None)
            want = _api._moments_general(x, axis, ddof, keepdims, None)
            if got is None:   # declined: only a ddof that leaves no degrees of freedom
                n = x.size if axis is None else np.prod(
                    [shape[a] for a in ((axis,) if np.ndim(axis) == 0 else axis)])
                assert ddof >= n, (axis, ddof)
                continue
            taken += 1
            for g, w in zip(got, want):
                assert type(g) is type(w) and np.shape(g) == np.shape(w), axis
                assert np.asarray(g).dtype == np.asarray(w).dtype == np.dtype(dtype)
                assert np.array_equal(g, w), (axis, ddof)
            assert np.array_equal(bncore.moments(x, axis, ddof=ddof, keepdims=keepdims)[1],
                                  want[1])
    assert taken >= len(specs)


@pytest.mark.parametrize("kind", [
    "list", "strided", "float16", "int", "swapped", "empty", "axis_np_int", "axis_list",
    "axis_repeat", "axis_range", "axis_apart", "axis_empty", "ddof_float", "ddof_all",
    "keepdims_int", "threads_bool", "threads_zero", "matrix"])
def test_moments_fast_path_declines_all_but_the_common_call(kind):
    """Anything but the common call returns None from moments_common (the general path
    then handles it, warns or raises); the public function still answers as before."""
    from bncore import _stats
    x = np.random.default_rng(5).normal(size=(4, 3, 5)).astype(np.float32)
    args = dict(x=x, axis=(0, 2), ddof=0, keepdims=False, n_threads=None)
    if kind == "list":
        args["x"] = x.tolist()
    elif kind == "strided":
        args["x"] = x[:, :, ::2]
    elif kind == "float16":
        args["x"] = x.astype(np.float16)
    elif kind == "int":
        args["x"] = (x * 10).astype(np.int32)
    elif kind == "swapped":
        args["x"] = x.astype(x.dtype.newbyteorder())
    elif kind == "empty":
        args["x"] = x[:0]
    elif kind == "axis_np_int":
        args["axis"] = np.int64(1)
    elif kind == "axis_list":
        args["axis"] = [0, 2]
    elif kind == "axis_repeat":
        args["axis"] = (0, 0)
    elif kind == "axis_range":
        args["axis"] = (0, 3)
    elif kind == "axis_apart":
        args["axis"] = 1          # keeps axes 0 and 2: blocks of 15 values (a copy)
    elif kind == "axis_empty":
        args["axis"] = ()
    elif kind == "ddof_float":
        args["ddof"] = 1.0
    elif kind == "ddof_all":
        args["ddof"] = 20
    elif kind == "keepdims_int":
        args["keepdims"] = 1
    elif kind == "threads_bool":
        args["n_threads"] = True
    elif kind == "threads_zero":
        args["n_threads"] = 0
    elif kind == "matrix":
        args["x"] = x[0].view(np.matrix)
        args["axis"] = 0
    before = np.array(args["x"], copy=True) if kind != "list" else None
    assert _stats.moments_common(**args) is None
    if before is not None:
        assert np.array_equal(np.asarray(args["x"]), before)


@pytest.mark.parametrize("shape,axis", [
    ((32, 14, 14, 24), (1, 2)),     # channels-last, per sample and channel: 32 blocks
    ((3, 40, 40, 24), (1, 2)),      # 3 blocks on 2 threads: every thread on each block
    ((6, 64, 20), 1),               # (batch, time, feature) over time
    ((4, 5, 30, 7, 64), (2, 3)),    # two leading kept axes, channels then planes of 64
    ((8, 33, 9, 17), (1, 3)),       # a leading axis, then (channel, plane) kept apart
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_leading_and_later_kept_axes_need_no_gather(shape, axis, dtype):
    """Kept axes apart, a leading block and one later block (a sample's channels over its
    rows): each leading index is a view of its own, a block per thread or every thread on
    each block. Exact to the output's rounding at a large offset (float64 sums of the
    float values, against exact rational moments), the same bits for 1, 2 and 3 threads,
    and the same as a gathered copy of the kept axes would give."""
    rng = np.random.default_rng(7)
    x = (1e4 + rng.standard_normal(shape)).astype(dtype)
    base = bncore.moments(x, axis=axis, n_threads=1)
    for nt in (2, 3):
        got = bncore.moments(x, axis=axis, n_threads=nt)
        assert all(np.array_equal(a, b) for a, b in zip(base, got)), nt
    mean, var = base
    kept = [a for a in range(x.ndim) if a not in np.atleast_1d(axis) % x.ndim]
    gathered = np.moveaxis(x, kept, range(x.ndim - len(kept), x.ndim))
    flat = gathered.reshape(-1, int(np.prod([shape[a] for a in kept])))
    rtol = VAR_RTOL[np.dtype(dtype)]
    for j in range(0, flat.shape[1], max(1, flat.shape[1] // 7)):
        em, ev = exact_moments(flat[:, j])
        assert rel_err(mean.ravel()[j], em) <= rtol, j
        assert rel_err(var.ravel()[j], ev) <= 2 * rtol, j
    assert mean.shape == var.shape == np.mean(x, axis=axis).shape
    # a non-contiguous input of the same values: its contiguous copy, the same view
    y = np.empty(shape[:-1] + (2 * shape[-1],), dtype)[..., ::2]
    y[...] = x
    assert all(np.array_equal(a, b)
               for a, b in zip(bncore.moments(y, axis=axis, n_threads=2), base))
    # a broadcast (stride-0) reduced axis only multiplies the count
    z = np.broadcast_to(x[:, :1], x.shape) if 1 in np.atleast_1d(axis) else None
    if z is not None:
        zm, zv = bncore.moments(z, axis=axis)
        wm, wv = ref_moments64(z, axis)
        np.testing.assert_allclose(zm, wm, rtol=rtol)
        np.testing.assert_allclose(zv, wv, rtol=4 * rtol, atol=1e-9)   # var ~1


@pytest.mark.parametrize("shape,axis", [
    ((1, 16, 16, 64), (1, 2)),      # per-request inference: one sample, 16 KiB
    ((3, 40, 40, 24), (1, 2)),
    ((6, 64, 20), 1),
    ((4, 5, 30, 7, 64), (2, 3)),
    ((8, 33, 9, 17), (1, 3)),
    ((2, 3, 40, 50), (1, 2)),       # a leading axis, then the last one kept
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_leading_blocks_take_the_fast_path(shape, axis, dtype):
    """A plain array with leading kept axes and one later run (the per-sample statistics
    of the test above) goes through _stats.moments_common, without the Python layer's
    ~20 us: the same bits, shapes and dtypes as the general path, keepdims and ddof
    included. Blocks under _stats.BLOCK_MIN values are left to the general path, which
    gathers them into a copy."""
    from bncore import _api, _stats
    x = (1e4 + np.random.default_rng(11).standard_normal(shape)).astype(dtype)
    for keepdims in (False, True):
        for ddof in (0, 1):
            got = _stats.moments_common(x, axis, ddof, keepdims, 2)
            want = _api._moments_general(x, axis, ddof, keepdims, 2)
            assert got is not None, (keepdims, ddof)
            for g, w in zip(got, want):
                assert g.shape == w.shape and g.dtype == w.dtype == np.dtype(dtype)
                assert np.array_equal(g, w), (keepdims, ddof)
    small = x.reshape(-1)[:2 * 3 * 5].reshape(2, 3, 5)    # blocks of 15 values
    assert _stats.moments_common(small, 1, 0, False, None) is None
    assert _stats.moments_common(x, axis, x.size, False, None) is None   # ddof: no dof


def ref_moments64(x, axis):
    x64 = np.asarray(x, np.float64)
    return x64.mean(axis=axis), x64.var(axis=axis)


@pytest.mark.parametrize("axis,memory_axis,back", [
    ((2, 3), (1, 2), None),          # per sample and channel
    (1, 3, None),                    # over the channels
    (0, 0, (2, 0, 1)),               # kept (C, H, W), in memory (H, W, C)
    ((0, 2), (0, 1), (1, 0)),        # kept (C, W), in memory (W, C)
    ((1, 2), (1, 3), None),
])
def test_permuted_contiguous_input_is_reduced_in_memory_order(axis, memory_axis, back):
    """A channels-last view (N, C, H, W) of (N, H, W, C) memory is reduced as the
    contiguous (N, H, W, C) it is (reshaping the view would copy it): the same bits as
    that call, its kept axes put back in the view's order, C-contiguous results; and a
    Fortran-ordered array alike."""
    rng = np.random.default_rng(3)
    mem = (500 + rng.standard_normal((6, 9, 10, 16))).astype(np.float32)
    view = mem.transpose(0, 3, 1, 2)
    got = bncore.moments(view, axis=axis, n_threads=2)
    want = bncore.moments(mem, axis=memory_axis, n_threads=1)
    for g, w in zip(got, want):
        w = w if back is None else w.transpose(back)
        assert g.flags.c_contiguous and g.shape == w.shape
        assert np.array_equal(g, w)
    ref_mean, ref_var = ref_moments64(view, axis)
    np.testing.assert_allclose(got[0], ref_mean, rtol=2.0 ** -23)
    np.testing.assert_allclose(got[1], ref_var, rtol=2.0 ** -21)
    keep = bncore.moments(view, axis=axis, keepdims=True)
    assert keep[0].shape == np.mean(view, axis=axis, keepdims=True).shape
    f = np.asfortranarray(mem)
    got = bncore.moments(f, axis=(1, 2), n_threads=2)
    want = bncore.moments(np.ascontiguousarray(f.T), axis=(1, 2), n_threads=1)
    assert all(np.array_equal(g, w.T) for g, w in zip(got, want))


@pytest.mark.parametrize("ddof", [3, 4, 10.5])
def test_var_with_no_degrees_of_freedom_left_as_numpy(ddof):
    """ddof >= count: M2 / 0, inf (nan for a constant feature), as np.var and moments
    give; Moments.var once gave nan whatever the data."""
    x = np.array([[1.0, 2.0, 5.0], [3.0, 2.0, 6.0], [4.0, 2.0, 7.0]])
    acc = bncore.Moments().update(x, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = np.var(x, axis=0, ddof=ddof)
    np.testing.assert_array_equal(want, [np.inf, np.nan, np.inf])
    for got in (lambda: acc.var(ddof), lambda: bncore.moments(x, axis=0, ddof=ddof)[1],
                lambda: acc.std(ddof) ** 2):
        with pytest.warns(RuntimeWarning, match="Degrees of freedom <= 0"):
            np.testing.assert_array_equal(got(), want)


def test_merge_checks_the_feature_shape_of_an_empty_accumulator():
    """An accumulator fed only empty batches still has a feature shape: merging it into
    one of another shape is the ValueError that update() with the same batch raises,
    either way round, and nothing changes; of the same shape it merges as nothing."""
    full = bncore.Moments().update(np.ones((2, 3)), axis=0)
    empty4 = bncore.Moments().update(np.empty((0, 4)), axis=0)
    with pytest.raises(ValueError, match="feature shape"):
        bncore.Moments().update(np.ones((2, 3)), axis=0).update(np.empty((0, 4)), axis=0)
    for a, b in ((full, empty4), (empty4, full)):
        before = pickle.dumps(a)
        with pytest.raises(ValueError, match=r"other has feature shape \(\d,\), which does "
                                             r"not match this accumulator's"):
            a.merge(b)
        assert pickle.dumps(a) == before
    empty3 = bncore.Moments().update(np.empty((5, 0, 3)), axis=(0, 1))
    full.merge(empty3)
    assert full.count == 2
    np.testing.assert_array_equal(full.mean, np.ones(3))
    fresh = bncore.Moments().merge(empty4)   # a new accumulator takes the shape on
    assert fresh.count == 0 and repr(fresh) == "Moments(count=0, feature_shape=(4,))"
    for ddof in (0, 1, -1):   # no values: NaN whatever ddof, as moments() of an empty batch
        assert np.isnan(fresh.var(ddof)).all() and fresh.var(ddof).shape == (4,)
    with pytest.raises(ValueError, match="feature shape"):
        fresh.update(np.ones((2, 3)), axis=0)
