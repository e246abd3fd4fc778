"""Property tests (hypothesis): random shapes (zero-size and size-1 dims), strides, byte
orders, float16/32/64, huge offsets, NaN and inf: every op agrees with its reference twin,
NaN/inf stay in their channel or row, dtype and shape are right.

CI (CI set in the environment) runs the deterministic "ci" profile; locally "dev".
"""
import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import bncore
from bncore import _reference as ref

settings.register_profile("ci", max_examples=300, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

DTYPES = st.sampled_from([np.float16, np.float32, np.float64])
EPS = {np.dtype(np.float16): 5e-3, np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-11}


@st.composite
def arrays(draw, min_dims=2, max_dims=4, min_side=0, nonfinite=False):
    """A float array with an arbitrary layout: offset values, transposed, strided, swapped."""
    dtype = np.dtype(draw(DTYPES))
    shape = draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side,
                                  max_side=6))
    offset = draw(st.sampled_from([0.0, 1.0, -50.0, 1e4] + ([] if dtype.itemsize == 2
                                                            else [1e6])))
    seed = draw(st.integers(0, 2 ** 16))
    base = np.random.default_rng(seed).normal(offset, 1.0 + abs(offset) * 1e-3, shape)
    x = base.astype(dtype)
    if nonfinite and x.size:
        flat = x.reshape(-1)
        flat[draw(st.integers(0, x.size - 1))] = draw(st.sampled_from([np.nan, np.inf,
                                                                       -np.inf]))
    layout = draw(st.sampled_from(["C", "F", "strided", "swapped"]))
    if layout == "F":
        x = np.asfortranarray(x)
    elif layout == "strided":
        big = np.zeros(tuple(2 * s + 1 for s in shape), dtype)
        view = big[tuple(slice(1, None, 2) for _ in shape)]
        view[...] = x
        x = view
    elif layout == "swapped":
        x = x.astype(dtype.newbyteorder())
    return x


def agree(got, want, x, what):
    """Same shape; equal up to dtype rounding relative to the data's spread."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    same_nan = np.isnan(got) == np.isnan(want)
    assert np.all(same_nan), f"{what}: NaN pattern differs"
    ok = np.isfinite(want)
    if not ok.any():
        return
    scale = max(float(np.max(np.abs(want[ok]))), 1.0)
    tol = EPS[np.dtype(x.dtype).newbyteorder("=")] * scale * 50
    np.testing.assert_allclose(got[ok], want[ok], rtol=0, atol=tol, err_msg=what)


def channel_axis(draw_axis, x):
    return 1 if draw_axis else -1


@given(x=arrays(min_side=0, nonfinite=False), axis=st.booleans())
def test_batch_norm_train_and_backward(x, axis):
    ax = 1 if axis else -1
    c = x.shape[ax]
    m = x.size // c if c else 0
    if m == 1:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            bncore.batch_norm_forward(x, axis=ax)
        return
    y, mean, invstd = bncore.batch_norm_forward(x, axis=ax)
    assert y.dtype == x.dtype.newbyteorder("=") and y.shape == x.shape
    if x.size == 0:
        return
    yr, mr, sr = ref.batch_norm_forward(x, axis=ax)
    agree(y, np.clip(yr, -1e4, 1e4) if x.dtype.itemsize == 2 else yr, x, "y")
    agree(mean, mr, x, "mean")
    dy = np.ones_like(x) * np.asarray(0.5, x.dtype)
    dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, axis=ax)
    dxr, dwr, dbr = ref.batch_norm_backward(dy, x, mean, invstd, axis=ax)
    assert dx.shape == x.shape and dw.shape == db.shape == (c,)
    agree(db, dbr, x, "dbias")


@given(x=arrays(min_side=1, nonfinite=True), axis=st.booleans())
def test_nonfinite_stays_in_its_channel(x, axis):
    ax = 1 if axis else -1
    c = x.shape[ax]
    if x.size // c < 2:
        return
    y = bncore.batch_norm_forward(x, axis=ax)[0]
    moved = np.moveaxis(np.asarray(x, np.float64), ax, 0).reshape(c, -1)
    ym = np.moveaxis(y.astype(np.float64), ax, 0).reshape(c, -1)
    for k in range(c):
        if np.all(np.isfinite(moved[k])):
            spread = np.ptp(moved[k])
            if spread > 0 or x.dtype.itemsize > 2:
                assert np.all(np.isfinite(ym[k])), f"channel {k} got a non-finite value"
        else:
            assert np.all(np.isnan(ym[k]))


@given(x=arrays(min_dims=1, max_dims=4, min_side=0, nonfinite=True),
       data=st.data())
def test_moments(x, data):
    axis = data.draw(st.one_of(st.none(), st.integers(0, x.ndim - 1),
                               st.sets(st.integers(0, x.ndim - 1)).map(tuple)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, var = bncore.moments(x, axis=axis)
        rmean, rvar = ref.moments(x, axis=axis)
    assert np.shape(mean) == np.shape(rmean)
    assert np.asarray(mean).dtype == x.dtype.newbyteorder("=")
    agree(mean, rmean, x, "mean")
    agree(var, rvar, x, "var")


@given(x=arrays(min_dims=2, max_dims=4, min_side=1), k=st.integers(1, 2))
def test_layer_and_rms_norm(x, k):
    k = min(k, x.ndim - 1)
    ns = x.shape[x.ndim - k:]
    y, mean, invstd = bncore.layer_norm_forward(x, ns)
    assert y.shape == x.shape and mean.shape == x.shape[:x.ndim - k]
    yr = ref.layer_norm_forward(x, ns)[0]
    if x.dtype.itemsize > 2:
        agree(y, yr, x, "layer_norm")
    yq = bncore.rms_norm(x, ns)
    agree(yq, ref.rms_norm(x, ns), x, "rms_norm")


@given(x=arrays(min_dims=3, max_dims=4, min_side=2), axis=st.booleans(),
       groups=st.integers(1, 3))
def test_group_and_instance_norm(x, axis, groups):
    ax = 1 if axis else -1
    c = x.shape[ax]
    if c % groups:
        with pytest.raises(ValueError, match="num_groups"):
            bncore.group_norm(x, groups, axis=ax)
        return
    y = bncore.group_norm(x, groups, axis=ax)
    assert y.shape == x.shape and y.dtype == x.dtype.newbyteorder("=")
    if x.dtype.itemsize > 2:
        agree(y, ref.group_norm(x, groups, axis=ax), x, "group_norm")
        agree(bncore.instance_norm(x, axis=ax), ref.instance_norm(x, axis=ax), x,
              "instance_norm")
