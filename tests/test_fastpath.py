"""The one-step ("common call") entry points take out= (bncore._fastpath.plain_out).

Without it a caller who preallocated out= for per-request inference paid the whole Python
layer, 6-12 us more per call than out=None on small inputs (3-4x the call). Now a plain
out= (an exact, writeable, C-contiguous ndarray of x's dtype and shape) that is disjoint
from the inputs, or exactly one of them, is written straight from the fast path; any other
out= (overlapping an input partly, sharing memory with a weight or a statistic, a subclass,
another dtype) goes on to the general path, which gives the same values or raises. Checked
here directly on the entry points (a result, or None) and through the public API against
out=None, bit for bit.
"""
import numpy as np
import pytest

import bncore
from bncore import _batchnorm, _rownorm

N, C, H, W, G = 4, 6, 5, 7, 3


def _x(rng, shape=(N, C, H, W)):
    return rng.normal(1.5, 2.0, shape).astype(np.float32)


def _vec(rng, n=C, dtype=np.float32):
    return rng.normal(size=n).astype(dtype)


# Each op: a builder of its arrays (a dict: "inputs" names what out may be, "param" a
# weight or statistic vector) and the fast entry point and the public call on them, each
# taking (a, out). The calls read the dict when called, so a test can swap arrays in.
def _bn_forward(rng):
    a = dict(x=_x(rng), w=_vec(rng), b=_vec(rng), rm=_vec(rng, C, np.float64),
             rv=np.abs(_vec(rng, C, np.float64)) + 0.5, inputs=("x",), param="w")
    fast = lambda a, out: _batchnorm.forward_common(a["x"], a["rm"].copy(), a["rv"].copy(),
                                                    a["w"], a["b"], True, 0.1, 1e-5, 1,
                                                    None, out)
    public = lambda a, out: bncore.batch_norm(a["x"], a["rm"].copy(), a["rv"].copy(),
                                              a["w"], a["b"], training=True, out=out)
    return a, fast, public


def _bn_backward(rng):
    a = dict(x=_x(rng), dy=_x(rng), w=_vec(rng), inputs=("dy", "x"), param="w")
    _, a["m"], a["s"] = bncore.batch_norm_forward(a["x"])
    fast = lambda a, out: _batchnorm.backward_common(a["dy"], a["x"], a["m"], a["s"], a["w"],
                                                     True, 1, None, out)
    public = lambda a, out: bncore.batch_norm_backward(a["dy"], a["x"], a["m"], a["s"],
                                                       a["w"], out=out)[0]
    return a, fast, public


def _layer_norm(rng):
    a = dict(x=_x(rng, (N, C, W)), w=_vec(rng, W), b=_vec(rng, W), inputs=("x",), param="w")
    fast = lambda a, out: _rownorm.forward_common(a["x"], (W,), a["w"], a["b"], 1e-5, None,
                                                  False, out)
    public = lambda a, out: bncore.layer_norm(a["x"], (W,), a["w"], a["b"], out=out)
    return a, fast, public


def _layer_norm_backward(rng):
    a = dict(x=_x(rng, (N, C, W)), dy=_x(rng, (N, C, W)), w=_vec(rng, W),
             inputs=("dy", "x"), param="w")
    _, a["m"], a["s"] = bncore.layer_norm_forward(a["x"], (W,), a["w"])
    fast = lambda a, out: _rownorm.backward_common(a["dy"], a["x"], a["m"], a["s"], (W,),
                                                   a["w"], None, False, out)
    public = lambda a, out: bncore.layer_norm_backward(a["dy"], a["x"], a["m"], a["s"], (W,),
                                                       a["w"], out=out)[0]
    return a, fast, public


def _rms_norm(rng):
    a = dict(x=_x(rng, (N, C, W)), w=_vec(rng, W), inputs=("x",), param="w")
    fast = lambda a, out: _rownorm.forward_common(a["x"], W, a["w"], None, None, None, True,
                                                  out)
    public = lambda a, out: bncore.rms_norm(a["x"], W, a["w"], out=out)
    return a, fast, public


def _group_norm(axis):
    def build(rng):
        x = _x(rng)
        if axis == -1:
            x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        a = dict(x=x, w=_vec(rng), b=_vec(rng), inputs=("x",), param="b")
        fast = lambda a, out: _rownorm.group_common(a["x"], G, a["w"], a["b"], 1e-5, axis,
                                                    None, out)
        public = lambda a, out: bncore.group_norm(a["x"], G, a["w"], a["b"], axis=axis,
                                                  out=out)
        return a, fast, public
    return build


def _instance_norm_backward(rng):
    a = dict(x=_x(rng), dy=_x(rng), w=_vec(rng), inputs=("dy", "x"), param="w")
    _, a["m"], a["s"] = bncore.instance_norm_forward(a["x"])
    fast = lambda a, out: _rownorm.group_backward_common(a["dy"], a["x"], a["m"], a["s"],
                                                         None, a["w"], 1, None, out)
    public = lambda a, out: bncore.instance_norm_backward(a["dy"], a["x"], a["m"], a["s"],
                                                          a["w"], out=out)[0]
    return a, fast, public


OPS = {"batch_norm": _bn_forward, "batch_norm_backward": _bn_backward,
       "layer_norm": _layer_norm, "layer_norm_backward": _layer_norm_backward,
       "rms_norm": _rms_norm, "group_norm": _group_norm(1),
       "group_norm-channels-last": _group_norm(-1),
       "instance_norm_backward": _instance_norm_backward}


def build(op):
    """(arrays, fast, public, the out=None result)."""
    a, fast, public = OPS[op](np.random.default_rng(7))
    return a, fast, public, public(a, None)


@pytest.mark.parametrize("op", OPS)
def test_a_plain_out_is_written_by_the_fast_path(op):
    a, fast, public, expected = build(op)
    out = np.full_like(expected, np.nan)
    res = fast(a, out)
    assert res is not None, "the fast path refused a plain out="
    assert res[0] is out
    assert np.array_equal(out, expected)
    out2 = np.full_like(expected, np.nan)
    assert public(a, out2) is out2 and np.array_equal(out2, expected)


@pytest.mark.parametrize("op", OPS)
def test_out_may_be_an_input_itself(op):
    """In place (out is x, or dy or x for a backward): the same bits as out=None."""
    _, _, _, expected = build(op)
    for name in OPS[op](np.random.default_rng(0))[0]["inputs"]:
        a, fast, _, _ = build(op)
        res = fast(a, a[name])
        assert res is not None and res[0] is a[name]
        assert np.array_equal(a[name], expected), f"in place on {name}"


@pytest.mark.parametrize("op", OPS)
def test_an_out_that_overlaps_an_input_partly_takes_the_general_path(op):
    a, fast, public, expected = build(op)
    for name in a["inputs"]:
        x = a[name]
        buf = np.empty(x.size + 8, x.dtype)
        moved = buf[:x.size].reshape(x.shape)   # the input moved into buf
        moved[...] = x
        out = buf[8:].reshape(x.shape)          # out 8 values further on
        b = dict(a, **{name: moved})
        assert fast(b, out) is None
        assert public(b, out) is out
        assert np.array_equal(out, expected), f"out overlapping {name}"


@pytest.mark.parametrize("op", OPS)
def test_an_out_sharing_memory_with_a_weight_takes_the_general_path(op):
    """A weight that is a slice of out: writing y into out must not change it first."""
    a, fast, public, expected = build(op)
    p = a[a["param"]]
    out = np.empty_like(expected)
    home = out.reshape(-1)[out.size - p.size:]   # the weight moved into out's last values
    home[...] = p
    b = dict(a, **{a["param"]: home.reshape(p.shape)})
    assert fast(b, out) is None
    assert public(b, out) is out
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("op", OPS)
def test_an_out_the_fast_path_cannot_take_still_works_or_raises(op):
    a, fast, public, expected = build(op)
    fortran = np.empty(expected.shape, expected.dtype, order="F")
    assert fast(a, fortran) is None
    assert public(a, fortran) is fortran and np.array_equal(fortran, expected)
    other = np.empty(expected.shape, np.float64)
    assert fast(a, other) is None
    ro = np.empty_like(expected)
    ro.flags.writeable = False
    assert fast(a, ro) is None
    with pytest.raises(ValueError, match="read-only"):
        public(a, ro)


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("stats", ["both", "mean", "var"])
def test_instance_norm_with_running_statistics_takes_the_fast_path(axis, stats, monkeypatch):
    """instance_norm with running statistics (InstanceNorm2d(track_running_stats=True) in
    training) goes through group_common once its running statistics and momentum are
    checked: ~50 -> ~19 us a call on (2, 8, 4, 4). The same y and running statistics, bit
    for bit, as the general path (taken by a Fortran-ordered x), for float32 and float64
    running statistics; and the general path is not entered (it would raise here)."""
    from bncore import _family
    rng = np.random.default_rng(3)
    x = _x(rng)
    if axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    w, b = _vec(rng), _vec(rng)
    rm0 = _vec(rng, C, np.float64)
    rv0 = np.abs(_vec(rng, C, np.float32)) + 0.5
    pick = lambda r, name: r.copy() if stats in ("both", name) else None
    rm, rv = pick(rm0, "mean"), pick(rv0, "var")
    rm_g, rv_g = pick(rm0, "mean"), pick(rv0, "var")
    # a Fortran-ordered copy of x is not a plain array: the general path
    want = bncore.instance_norm(np.asfortranarray(x), rm_g, rv_g, w, b, momentum=0.3,
                                axis=axis)

    def general(*args, **kwargs):
        raise AssertionError("the general path was taken")

    monkeypatch.setattr(_family, "_instance_checked", general)
    got = bncore.instance_norm(x, rm, rv, w, b, momentum=0.3, axis=axis)
    assert np.array_equal(got, want) and got.dtype == np.float32
    for r, rg in ((rm, rm_g), (rv, rv_g)):
        if r is not None:
            assert np.array_equal(r, rg) and r.dtype == rg.dtype
            assert not np.array_equal(r, rm0 if r.dtype == rm0.dtype else rv0)   # updated


def test_overhead_tool_runs():
    """tools/fastpath_overhead.py, which measures the fast paths against the general ones
    (the figures in the README), still runs: every case, a positive time each way."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "fastpath_overhead.py"
    spec = importlib.util.spec_from_file_location("fastpath_overhead", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rows = tool.main(["--rounds", "1", "--min-time", "0.0005"])
    assert len(rows) == len(tool.cases()) == 8
    assert all(general > 0 and fast > 0 for _, general, fast in rows)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_forward_statistics_have_the_general_paths_bits(dtype, axis, eps):
    """group_norm_forward and instance_norm_forward make their (mean, invstd) in the
    one-step call (group_common(saved=True)), where the general path computes them in
    NumPy: the same dtypes and bits, constant groups with eps=0 (invstd inf) included."""
    x = np.random.default_rng(5).normal(3.0, 2.0, (3, 6, 5, 4)).astype(dtype)
    x[1, :2] = 7.0   # a constant group (and constant instances)
    x = np.ascontiguousarray(np.moveaxis(x, 1, axis))
    general = np.asfortranarray(x)   # not C-contiguous: the general path
    for f in (lambda a: bncore.group_norm_forward(a, 3, eps=eps, axis=axis),
              lambda a: bncore.instance_norm_forward(a, eps=eps, axis=axis)):
        fast, slow = f(x), f(general)
        for a, b in zip(fast, slow):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
        assert (np.isinf(fast[2]).any()) == (eps == 0.0)


@pytest.mark.parametrize("xdt, wdt", [(np.float32, np.float64), (np.float64, np.float32)])
def test_row_norm_weights_of_the_other_float_type_take_the_fast_path(xdt, wdt):
    """np.ones(d) is float64: a float32 layer norm given it had left the one-step call
    (5x a tiny call). The one-step call now converts weight and bias to x's dtype itself,
    as the general path does: it takes the call, with the general path's bits."""
    x = np.random.default_rng(6).normal(3.0, 2.0, (64, 48)).astype(xdt)
    w = np.random.default_rng(7).normal(1.0, 0.3, 48).astype(wdt)
    b = np.random.default_rng(8).normal(0.0, 1.0, 48).astype(wdt)
    general = np.asfortranarray(x)   # not C-contiguous: the general path
    for rms, wb in ((False, (w, b)), (False, (w, None)), (False, (None, b)), (True, (w, None))):
        assert _rownorm.forward_common(x, 48, *wb, None if rms else 1e-5, None, rms) is not None
        f = ((lambda a: bncore.rms_norm_forward(a, 48, wb[0])) if rms else
             (lambda a: bncore.layer_norm_forward(a, 48, *wb)))
        for p, q in zip(f(x), f(general)):
            assert p.dtype == q.dtype
            assert np.ascontiguousarray(p).tobytes() == np.ascontiguousarray(q).tobytes()


@pytest.mark.parametrize("shape,axis", [((16, 64), 1), ((2, 64, 3, 3), 1), ((1, 300, 2, 2), 1),
                                        ((1, 3, 3, 300), -1), ((5, 9), 1)], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parameters_rewritten_when_only_their_bits_differ(shape, axis, dtype):
    """The common calls leave work-array pieces that already hold a parameter's values
    unwritten (bn_widen_f32, bn_copy_f64: the heap hands the array back with last call's
    values). The comparison is of the bits: a running mean of -0.0 after one of 0.0, or a
    NaN of another payload, must reach the results. In eval, the saved mean is the
    running mean."""
    c = shape[axis]
    x = np.ones(shape, dtype)
    rv = np.ones(c, dtype)
    nan2 = np.frombuffer(np.array([0x7FF8000000000123], np.uint64).tobytes(), np.float64)[0]
    for rm in (np.zeros(c, dtype), -np.zeros(c, dtype), np.zeros(c, dtype),
               np.full(c, np.nan, dtype), np.full(c, nan2, np.float64).astype(dtype)):
        for _ in range(3):
            _, m, _ = bncore.batch_norm_forward(x, training=False, running_mean=rm,
                                                running_var=rv, axis=axis)
            assert m.dtype == dtype
            assert m.tobytes() == rm.astype(dtype).tobytes()


@pytest.mark.parametrize("case", ["x_rows", "x_planes", "weight", "each_other"])
def test_running_statistics_sharing_memory_take_the_general_path(case):
    """The common call updates each channel's running statistics on the thread that
    finishes it, while other threads may still read x and the weights: running statistics
    that share memory with x, a weight or each other go to the general path, which
    updates them after the kernel, as on copies."""
    rng = np.random.default_rng(9)
    x, w = rng.normal(2.0, 1.5, (64, 12)), None
    rv = np.ones(12)
    if case == "x_rows":
        rm = x[5]                                    # sample 5's row
    elif case == "x_planes":
        x = rng.normal(2.0, 1.5, (3, 8, 4, 8))
        rm, rv = x[0, 0, 0, :], np.ones(8)           # channel 0's first row
    elif case == "weight":
        w = rng.normal(size=12)
        rm = w
    else:
        both = np.ones(18)
        rm, rv = both[:12], both[6:]
    assert _batchnorm.forward_common(x, rm.copy(), rv.copy(), w, None, True, 0.1, 1e-5, 1,
                                     None) is not None   # unshared: the common call
    assert _batchnorm.forward_common(x, rm, rv, w, None, True, 0.1, 1e-5, 1, None) is None
    want = [x.copy(), rm.copy(), rv.copy(), None if w is None else w.copy()]
    y_want = bncore.batch_norm(want[0], want[1], want[2], want[3], training=True,
                               momentum=0.1)
    y = bncore.batch_norm(x, rm, rv, w, training=True, momentum=0.1)
    np.testing.assert_array_equal(y, y_want)
    if case != "each_other":   # (there the general path's second update overwrites half)
        np.testing.assert_array_equal(rm, want[1])
        np.testing.assert_array_equal(rv, want[2])
