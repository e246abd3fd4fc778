"""float16 input and output: widened to float32, computed, rounded back.

- bncore's conversions (bncore._outputs.half_to_float / float_to_half: F16C eight values
  an instruction, or portable bit arithmetic) give NumPy's astype bits: every float16
  value widened, and float32 values rounded (ties to even, the overflow and underflow
  edges, subnormals, random bit patterns); NaN stays NaN (F16C quiets signalling NaNs,
  whose payload bits NumPy keeps). Both paths are checked wherever the CPU has F16C,
  and with AVX2 and FMA too, the kernels that read and write float16 themselves.
- Every op on float16 input gives exactly the float32 op on the widened input, rounded
  (outputs, saved statistics, gradients), in both layouts, strided and Fortran-ordered,
  into a float16 ``out`` and in place; the conversions follow the call's n_threads.
- The kernel writes a float16 call's result over the call's own float32 copy of x (or
  dy), and those copies are kept for reuse as scratch blocks (bncore._outputs).
- In place beyond the streaming threshold (out is x or dy), the kernels store as usual:
  the same bits as into a new array.
"""
import numpy as np
import pytest

import bncore
from bncore import _config, _outputs

def _cpu_level():
    old = _config.half_level(2)
    return _config.half_level(old)   # the level 2 became: the CPU's


def _cpu_avx512():
    old = _config.use_avx512(True)
    return _config.use_avx512(old)   # whether True took


# (level, AVX-512): 2, kernels that read and write float16 themselves (AVX2, FMA, F16C),
# with their AVX-512 twins where the CPU has them and without; 1, F16C conversions of
# float32 copies; 0, portable conversions
LEVELS = ([(2, True)] if _cpu_level() == 2 and _cpu_avx512() else []) + [
    (v, False) for v in range(_cpu_level(), -1, -1)]


@pytest.fixture(params=LEVELS, ids=lambda p: ("portable", "f16c", "fused")[p[0]]
                + ("-avx512" if p[1] else ""))
def f16c(request):
    level, avx512 = request.param
    old, old512 = _config.half_level(level), _config.use_avx512(avx512)
    yield level
    _config.half_level(old)
    _config.use_avx512(old512)


def same_bits(a, b):
    """Equal bit patterns, NaN for NaN (payloads may differ)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan = np.isnan(a)
    if not np.array_equal(nan, np.isnan(b)):
        return False
    iview = {2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    return np.array_equal(a.view(iview)[~nan], b.view(iview)[~nan])


def test_every_float16_value_widens_as_numpy(f16c):
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    for n in (h.size, 15, 17, 1000):   # the vector loop and its scalar tail
        got = _outputs.half_to_float(h[:n], 2)
        assert got.dtype == np.float32
        assert same_bits(got, h[:n].astype(np.float32))


def rounding_cases():
    """float32 values at every rounding edge of float16, and random bit patterns."""
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.unique(h[np.isfinite(h)].astype(np.float64))
    mids = ((finite[:-1] + finite[1:]) / 2).astype(np.float32).view(np.uint32)   # ties
    edges = np.array([0x477fefff, 0x477ff000, 0x477ff001, 0x7f7fffff,   # 65504..65520..
                      0x33000000, 0x33000001, 0x32ffffff, 0x00000001,   # 2^-25, subnormal
                      0x387fe000, 0x387ff000, 0x38800000,               # to the normals
                      0x7f800000, 0x7fc00000, 0x7f800001, 0x7fffffff], np.uint32)
    rand = np.random.default_rng(0).integers(0, 1 << 32, 2_000_000, dtype=np.uint64)
    bits = np.concatenate([mids, mids + 1, mids - 1, edges, rand.astype(np.uint32),
                           h.astype(np.float32).view(np.uint32)])
    return np.concatenate([bits, bits | np.uint32(0x80000000)]).view(np.float32)


def test_float32_values_round_to_float16_as_numpy(f16c):
    x = rounding_cases()
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    got = _outputs.float_to_half(x, None, 2)
    assert same_bits(got, want)
    out = np.empty_like(want)
    assert _outputs.float_to_half(x, out, 1) is out
    assert same_bits(out, want)


@pytest.mark.parametrize("layout", ["C", "F", "transposed", "strided", "swapped", "empty",
                                    "scalar"])
def test_any_layout_converts_as_numpy(layout, f16c):
    base = np.random.default_rng(1).normal(size=(6, 70, 50)).astype(np.float16)
    x = {"C": base, "F": np.asfortranarray(base), "transposed": base.transpose(2, 0, 1),
         "strided": base[:, ::3], "swapped": base.astype(">f2"), "empty": base[:0],
         "scalar": base[0, 0, 0]}[layout]
    x = np.asarray(x)
    y = _outputs.half_to_float(x, 2)
    assert same_bits(y, x.astype(np.float32))
    if x.flags.c_contiguous or x.flags.f_contiguous:
        assert y.strides == tuple(s * 2 for s in x.strides) or x.size <= 1
    back = _outputs.float_to_half(y, None, 2)
    assert same_bits(back, x.astype(np.float16))
    out = np.zeros(x.shape, np.float16, order="F" if layout == "F" else "C")
    _outputs.float_to_half(y, out, 2)
    assert same_bits(out, x.astype(np.float16))


def _ops():
    """name -> (call(x, dy, out, n_threads) -> tuple of arrays, shape); both layouts."""
    def bn_train(x, dy, out, nt, ax):
        return bncore.batch_norm_forward(x, W[x.shape[ax]], B[x.shape[ax]], axis=ax,
                                         out=out, n_threads=nt)

    def bn_eval(x, dy, out, nt, ax):
        c = x.shape[ax]
        return (bncore.batch_norm(x, RM[c], RV[c], W[c], B[c], axis=ax, out=out,
                                  n_threads=nt),)

    def bn_bwd(x, dy, out, nt, ax):
        c = x.shape[ax]
        _, m, s = bncore.batch_norm_forward(x, W[c], axis=ax)
        return bncore.batch_norm_backward(dy, x, m, s, W[c], axis=ax, out=out, n_threads=nt)

    def gn(x, dy, out, nt, ax):
        return bncore.group_norm_forward(x, 4, W[x.shape[ax]], B[x.shape[ax]], axis=ax,
                                         out=out, n_threads=nt)

    def gn_bwd(x, dy, out, nt, ax):
        c = x.shape[ax]
        _, m, s = bncore.group_norm_forward(x, 4, W[c], axis=ax)
        return bncore.group_norm_backward(dy, x, m, s, 4, W[c], axis=ax, out=out,
                                          n_threads=nt)

    def inst(x, dy, out, nt, ax):
        return bncore.instance_norm_forward(x, axis=ax, out=out, n_threads=nt)

    def ln(x, dy, out, nt, ax):
        return bncore.layer_norm_forward(x, x.shape[-1], W[x.shape[-1]], B[x.shape[-1]],
                                         out=out, n_threads=nt)

    def ln_bwd(x, dy, out, nt, ax):
        d = x.shape[-1]
        _, m, s = bncore.layer_norm_forward(x, d, W[d])
        return bncore.layer_norm_backward(dy, x, m, s, d, W[d], out=out, n_threads=nt)

    def rms(x, dy, out, nt, ax):
        return bncore.rms_norm_forward(x, x.shape[-1], W[x.shape[-1]], out=out,
                                       n_threads=nt)

    def rms_bwd(x, dy, out, nt, ax):
        d = x.shape[-1]
        _, r = bncore.rms_norm_forward(x, d, W[d])
        return bncore.rms_norm_backward(dy, x, r, d, W[d], out=out, n_threads=nt)

    ops = {}
    for name, f in (("bn train", bn_train), ("bn eval", bn_eval), ("bn backward", bn_bwd),
                    ("group norm", gn), ("group norm backward", gn_bwd),
                    ("instance norm", inst)):
        ops[name] = (lambda x, dy, out, nt, f=f: f(x, dy, out, nt, 1), (4, 16, 30, 40))
        ops[name + " channels-last"] = (lambda x, dy, out, nt, f=f: f(x, dy, out, nt, -1),
                                        (4, 30, 40, 16))
    for name, f in (("layer norm", ln), ("layer norm backward", ln_bwd), ("rms norm", rms),
                    ("rms norm backward", rms_bwd)):
        ops[name] = (lambda x, dy, out, nt, f=f: f(x, dy, out, nt, -1), (300, 160))
    return ops


_rng = np.random.default_rng(2)
W = {c: _rng.normal(1.0, 0.2, c).astype(np.float32) for c in (16, 40, 160)}
B = {c: _rng.normal(0.0, 0.2, c).astype(np.float32) for c in (16, 40, 160)}
RM = {c: _rng.normal(3.0, 0.5, c) for c in (16, 40, 160)}
RV = {c: _rng.uniform(1.0, 5.0, c) for c in (16, 40, 160)}
OPS = _ops()


def _inputs(shape, layout):
    rng = np.random.default_rng(3)
    x = rng.normal(3.0, 2.0, shape).astype(np.float16)
    dy = rng.normal(0.0, 1.0, shape).astype(np.float16)
    if layout == "fortran":
        return np.asfortranarray(x), np.asfortranarray(dy)
    if layout == "strided":
        pad = tuple(slice(None, None, 2) if i == 1 else slice(None) for i in range(len(shape)))
        big = tuple(2 * n if i == 1 else n for i, n in enumerate(shape))
        xs, ds = np.zeros(big, np.float16), np.zeros(big, np.float16)
        xs[pad], ds[pad] = x, dy
        return xs[pad], ds[pad]
    return x, dy


def _rounded(results, shape):
    """The float32 op's results as the float16 call gives them: x-shaped outputs rounded
    to float16, the rest (statistics, weight gradients) as they are."""
    return tuple(None if a is None else (a.astype(np.float16) if a.shape == shape else a)
                 for a in results)


@pytest.mark.parametrize("layout", ["C", "fortran", "strided"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_float16_ops_are_the_float32_ops_rounded(name, layout):
    f, shape = OPS[name]
    x, dy = _inputs(shape, layout)
    want = _rounded(f(x.astype(np.float32), dy.astype(np.float32), None, 2), shape)
    got = f(x, dy, None, 2)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None)
        if g is not None:
            assert same_bits(g, w), f"{name} output {i}"
    assert got[0].dtype == np.float16
    # into a float16 out (C-ordered, or a strided view), and in place over x or dy
    for out in (np.empty(shape, np.float16), np.empty(shape[:-1] + (2 * shape[-1],),
                                                      np.float16)[..., ::2]):
        res = f(x, dy, out, 1)
        assert res[0] is out and same_bits(out, want[0])
    xi, di = x.copy(), dy.copy()
    inplace = di if "backward" in name else xi
    res = f(xi, di, inplace, 3)
    assert res[0] is inplace and same_bits(inplace, want[0])


def test_float16_moments_are_float32_moments_rounded():
    x = np.random.default_rng(4).normal(50.0, 2.0, (64, 3, 40)).astype(np.float16)
    for axis in ((0, 2), 0, None):
        got = bncore.moments(x, axis=axis, n_threads=2)
        want = bncore.moments(x.astype(np.float32), axis=axis)
        for g, w in zip(got, want):
            assert same_bits(g, np.asarray(w).astype(np.float16))


def test_float16_copies_are_scratch_kept_for_reuse():
    """A float16 call that widens its inputs whole (a batch-norm backward of small
    channels) gives its float32 copies of x and dy (1 MiB or more) back to the output
    cache when it ends, and the next call of that shape takes them again."""
    old = _outputs.cache_limit()
    _outputs.release_memory()
    try:
        x = np.random.default_rng(5).normal(size=(64, 256, 4, 4)).astype(np.float16)
        _, m, s = bncore.batch_norm_forward(x)
        _outputs.release_memory()
        bncore.batch_norm_backward(x, x, m, s)
        kept = _outputs.cached_bytes()
        assert kept >= 2 * x.size * 4
        bncore.batch_norm_backward(x, x, m, s)
        assert _outputs.cached_bytes() == kept
        # plain float32 outputs of that size are not kept (glibc's heap reuses them)
        _outputs.release_memory()
        bncore.batch_norm_forward(x.astype(np.float32))
        assert _outputs.cached_bytes() == 0
        _outputs.cache_limit(0)
        bncore.batch_norm_backward(x, x, m, s)
        assert _outputs.cached_bytes() == 0
    finally:
        _outputs.cache_limit(old)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_in_place_beyond_the_stream_threshold_gives_new_output_bits(dtype):
    """With every output over the threshold (thresholds of 0), an op writing over x or dy
    stores as usual, not streamed: the same bits as into a new array."""
    old = _config.set_thresholds(0, 0, 0, 0)
    try:
        for name, (f, shape) in sorted(OPS.items()):
            x, dy = _inputs(shape, "C")
            x, dy = x.astype(dtype), dy.astype(dtype)
            want = f(x, dy, None, 2)
            xi, di = x.copy(), dy.copy()
            inplace = di if "backward" in name else xi
            got = f(xi, di, inplace, 2)
            for i, (g, w) in enumerate(zip(got, want)):
                assert (g is None and w is None) or same_bits(g, w), f"{name} output {i}"
    finally:
        from conftest import PINNED_THRESHOLDS
        _config.set_thresholds(**PINNED_THRESHOLDS)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("shape,axis", [((2, 3, 90, 100), 1), ((3, 5), 1), ((1, 2048, 7, 7), 1),
                                        ((7, 9, 11, 3), -1), ((2, 5, 4000), -1),
                                        ((2, 1, 1, 1), 1), ((1, 64, 3, 3), 1),
                                        ((40, 40, 20, 20), 1), ((2, 4, 800, 900), 1),
                                        ((3, 4, 37, 41), 1)])
def test_float16_batch_norm_in_pieces_of_any_size(shape, axis, training, f16c):
    """The float16 batch-norm forward widens x a piece at a time where it can (eval: runs
    of planes or rows, in one pass; training: a channel at a time where channels are the
    parallel unit and up to 1M values; else the whole array), and so does its backward (a
    channel at a time where backward_planes takes them one by one; where the CPU allows,
    reading and writing float16 itself): planes longer than a piece, (N, C) rows, wide
    channels-last rows, single values, small channels, channels over the limit, planes of
    odd length (the kernels' scalar tails); every float16 level."""
    rng = np.random.default_rng(6)
    x = rng.normal(2.0, 3.0, shape).astype(np.float16)
    c = shape[axis]
    rm, rv = rng.normal(size=c), rng.uniform(0.5, 2.0, c)
    w, b = rng.normal(size=c).astype(np.float16), rng.normal(size=c).astype(np.float16)
    for nt in (1, 2, 3):
        r16, r32 = (rm.copy(), rv.copy()), (rm.copy(), rv.copy())
        got = bncore.batch_norm(x, *r16, w, b, training=training, axis=axis, n_threads=nt)
        want = bncore.batch_norm(x.astype(np.float32), *r32, w.astype(np.float32),
                                 b.astype(np.float32), training=training, axis=axis,
                                 n_threads=nt)
        assert same_bits(got, want.astype(np.float16)), nt
        assert same_bits(r16[0], r32[0]) and same_bits(r16[1], r32[1])
        # the backward (a channel at a time where channels are big enough, else widened)
        _, m, s = bncore.batch_norm_forward(x, w, training=training, running_mean=rm,
                                            running_var=rv, axis=axis)
        dy = rng.normal(size=shape).astype(np.float16)
        got = bncore.batch_norm_backward(dy, x, m, s, w, training=training, axis=axis,
                                         n_threads=nt)
        want = bncore.batch_norm_backward(dy.astype(np.float32), x.astype(np.float32), m, s,
                                          w.astype(np.float32), training=training, axis=axis,
                                          n_threads=nt)
        assert same_bits(got[0], want[0].astype(np.float16)), nt
        assert same_bits(got[1], want[1]) and same_bits(got[2], want[2])


@pytest.mark.parametrize("shape", [(3, 4, 37, 41), (2, 6, 64, 64), (90, 3, 7, 9)])
def test_float16_backward_streamed_and_fetched(shape, f16c):
    """With every array past the thresholds (0), the float16 backward of planes streams
    dx's whole lines of each plane (ordinary stores at a plane's ends) and fetches the
    thread's next channel during each dx pass: planes of odd length, whole lines and
    short ones (channels of more than SMALL_CHANNEL values), dx into a new array and into
    one offset by a value (no line whole at the start of a plane), on one to three
    threads; the bits of the float32 op, rounded."""
    rng = np.random.default_rng(12)
    x = rng.normal(2.0, 3.0, shape).astype(np.float16)
    dy = rng.normal(size=shape).astype(np.float16)
    w = rng.normal(size=shape[1]).astype(np.float16)
    _, m, s = bncore.batch_norm_forward(x, w)
    want = bncore.batch_norm_backward(dy.astype(np.float32), x.astype(np.float32), m, s,
                                      w.astype(np.float32))
    old = _config.set_thresholds(0, 0, 0, 0)
    try:
        for nt in (1, 2, 3):
            got = bncore.batch_norm_backward(dy, x, m, s, w, n_threads=nt)
            out = np.empty(x.size + 1, np.float16)[1:].reshape(shape)
            shifted = bncore.batch_norm_backward(dy, x, m, s, w, out=out, n_threads=nt)
            for g in (got, shifted):
                assert same_bits(g[0], want[0].astype(np.float16)), nt
                assert same_bits(g[1], want[1]) and same_bits(g[2], want[2]), nt
    finally:
        from conftest import PINNED_THRESHOLDS
        _config.set_thresholds(**PINNED_THRESHOLDS)


@pytest.mark.parametrize("shape", [(40, 30, 30, 24), (300, 520), (7, 9, 11, 3), (2, 64, 5)])
@pytest.mark.parametrize("training", [True, False])
def test_float16_channels_last_backward_in_pieces(shape, training, f16c):
    """The channels-last float16 backward split by row chunks widens a piece of rows at a
    time (whole row blocks of the float32 sums, so their bits): many chunks of several
    pieces with a short last one, wide rows, odd channel counts, rows further apart than
    their channels (x and dy sliced from wider arrays, each its own way), dx over dy."""
    rng = np.random.default_rng(11)
    c = shape[-1]
    wide = rng.normal(3.0, 2.0, shape[:-1] + (c + 5,)).astype(np.float16)
    x = wide[..., 2:c + 2]
    dy = rng.normal(size=shape[:-1] + (c + 3,)).astype(np.float16)[..., :c]
    w = rng.normal(size=c).astype(np.float16)
    _, m, s = bncore.batch_norm_forward(x, w, axis=-1, training=training,
                                        running_mean=rng.normal(size=c),
                                        running_var=rng.uniform(0.5, 2, c))
    for xs, ds in ((x, dy), (np.ascontiguousarray(x), np.ascontiguousarray(dy))):
        want = bncore.batch_norm_backward(ds.astype(np.float32), xs.astype(np.float32), m, s,
                                          w.astype(np.float32), training=training, axis=-1)
        for nt in (1, 2, 3):
            got = bncore.batch_norm_backward(ds, xs, m, s, w, training=training, axis=-1,
                                             n_threads=nt)
            assert same_bits(got[0], want[0].astype(np.float16)), nt
            assert same_bits(got[1], want[1]) and same_bits(got[2], want[2])
        di = ds.copy()
        got = bncore.batch_norm_backward(di, xs, m, s, w, training=training, axis=-1, out=di)
        assert got[0] is di and same_bits(di, want[0].astype(np.float16))


@pytest.mark.parametrize("shape", [(3, 3000), (2, 2, 5000), (5000, 7), (1, 1), (40, 2048),
                                   (9, 2049), (130, 2100), (257, 33), (3001, 160)])
@pytest.mark.parametrize("rms", [False, True])
def test_float16_rows_in_pieces_of_any_length(shape, rms, f16c):
    """The float16 layer/RMS norm forward and backward widen a few rows at a time: rows
    longer than a statistics block (one row a piece, the long-row kernels), short ones many
    a piece, odd row counts (the backward's row pairs), and the backward's few long rows
    (widened whole: float32 takes them by column tiles)."""
    rng = np.random.default_rng(7)
    x = rng.normal(5.0, 2.0, shape).astype(np.float16)
    d = shape[-1]
    w = rng.normal(1.0, 0.3, d).astype(np.float16)
    for nt in (1, 2):
        if rms:
            got, want = (bncore.rms_norm_forward(x, d, w, n_threads=nt),
                         bncore.rms_norm_forward(x.astype(np.float32), d, w.astype(np.float32),
                                                 eps=float(np.finfo(np.float32).eps),
                                                 n_threads=nt))
        else:
            got, want = (bncore.layer_norm_forward(x, d, w, w, n_threads=nt),
                         bncore.layer_norm_forward(x.astype(np.float32), d,
                                                   w.astype(np.float32), w.astype(np.float32),
                                                   n_threads=nt))
        assert same_bits(got[0], want[0].astype(np.float16))
        for g, v in zip(got[1:], want[1:]):
            assert same_bits(g, v)
        # the backward: a few rows at a time where float32 goes by rows (row_bwd2's pairs
        # kept), widened whole where it goes by column tiles (few long rows)
        dy = rng.normal(size=shape).astype(np.float16)
        if rms:
            got = bncore.rms_norm_backward(dy, x, got[1], d, w, n_threads=nt)
            want = bncore.rms_norm_backward(dy.astype(np.float32), x.astype(np.float32),
                                            want[1], d, w.astype(np.float32), n_threads=nt)
        else:
            got = bncore.layer_norm_backward(dy, x, got[1], got[2], d, w, n_threads=nt)
            want = bncore.layer_norm_backward(dy.astype(np.float32), x.astype(np.float32),
                                              want[1], want[2], d, w.astype(np.float32),
                                              n_threads=nt)
        assert same_bits(got[0], want[0].astype(np.float16))
        for g, v in zip(got[1:], want[1:]):
            assert same_bits(g, v)


@pytest.mark.parametrize("shape,groups", [((1, 64, 56, 56), 1), ((2, 64, 56, 56), 2),
                                          ((2, 32, 3, 3), 8), ((3, 6, 1, 70), 3),
                                          ((4, 512, 2, 2), 4), ((2, 3, 300, 400), 3),
                                          ((1, 4, 600, 500), 1), ((32, 512, 7, 7), 8),
                                          ((1, 512, 14, 14), 32)])
@pytest.mark.parametrize("axis", [1, -1])
def test_float16_group_norm_in_blocks_of_any_size(shape, groups, axis, f16c):
    """The float16 group/instance norm forward and backward widen a (sample, group) block
    (NCHW, where group_rows(_bwd) takes blocks one by one) or a channels-last sample at a
    time, else the whole input: one block or sample whole (float32 then shares its chunks
    among the threads, or takes the group straight from the block: the same bits), small
    blocks many to a call, blocks and samples over the 1M-value limit; F16C and
    portable."""
    rng = np.random.default_rng(8)
    if axis == -1:
        shape = (shape[0],) + shape[2:] + (shape[1],)
    x = rng.normal(-4.0, 2.0, shape).astype(np.float16)
    c = shape[axis]
    w, b = rng.normal(size=c).astype(np.float16), rng.normal(size=c).astype(np.float16)
    for nt in (1, 2, 3):
        got = bncore.group_norm_forward(x, groups, w, b, axis=axis, n_threads=nt)
        want = bncore.group_norm_forward(x.astype(np.float32), groups, w.astype(np.float32),
                                         b.astype(np.float32), axis=axis, n_threads=nt)
        assert same_bits(got[0], want[0].astype(np.float16)), nt
        assert same_bits(got[1], want[1]) and same_bits(got[2], want[2])
        got = bncore.instance_norm(x, axis=axis, n_threads=nt)
        want = bncore.instance_norm(x.astype(np.float32), axis=axis, n_threads=nt)
        assert same_bits(got, want.astype(np.float16)), nt
        # the backward: a block at a time where group_rows_bwd takes blocks one by one
        _, m, s = bncore.group_norm_forward(x, groups, w, axis=axis)
        dy = rng.normal(size=shape).astype(np.float16)
        got = bncore.group_norm_backward(dy, x, m, s, groups, w, axis=axis, n_threads=nt)
        want = bncore.group_norm_backward(dy.astype(np.float32), x.astype(np.float32), m, s,
                                          groups, w.astype(np.float32), axis=axis,
                                          n_threads=nt)
        assert same_bits(got[0], want[0].astype(np.float16)), nt
        assert same_bits(got[1], want[1]) and same_bits(got[2], want[2])


@pytest.mark.parametrize("shape", [(2, 3, 5), (4, 16, 30, 40), (2, 8, 5, 7), (64, 24)])
@pytest.mark.parametrize("training", [True, False])
def test_float16_batch_norm_of_channels_contiguous_memory(shape, training):
    """float16 with axis=1 whose channels are contiguous in memory (a channels-last array
    seen as NCHW): a rows view, whose training statistics come from a float32 copy with
    the rows in the view's order (the non-channel positions in C order)."""
    rng = np.random.default_rng(9)
    last = rng.normal(1.0, 2.0, (shape[0],) + shape[2:] + (shape[1],)).astype(np.float16)
    x = np.moveaxis(last, -1, 1)   # axis 1, channels contiguous
    c = shape[1]
    rm, rv = rng.normal(size=c), rng.uniform(0.5, 2.0, c)
    for nt in (1, 2):
        r16, r32 = (rm.copy(), rv.copy()), (rm.copy(), rv.copy())
        got = bncore.batch_norm(x, *r16, training=training, n_threads=nt)
        want = bncore.batch_norm(x.astype(np.float32), *r32, training=training, n_threads=nt)
        assert same_bits(got, want.astype(np.float16))
        assert same_bits(r16[0], r32[0]) and same_bits(r16[1], r32[1])
