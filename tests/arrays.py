"""Test arrays in every dtype x layout x shape x offset (bottleneck's array generator, for
channel-axis ops).

A :class:`Case` describes one array: its shape as the user sees it, its channel axis
(1 for NCHW-style, -1 for channels-last), dtype, memory layout and value offset. It builds
the array with a fixed seed, so ``case.make(seed=1)`` is a second array (dy) of the same
shape, dtype and layout. ``arrays()`` yields ``(id, array, axis)`` like bottleneck's
generator; ``cases()`` gives the same as ``pytest.param`` objects with readable ids such as
``float32-(4,6,5,7)-ax1-strided_c-off1e+04``.

Layouts (all hold the same values for the same seed):

- ``C``, ``F``: C- and Fortran-ordered copies;
- ``strided_c``: ``base[:, ::2]`` of an array with twice the axis-1 length;
- ``strided_n``: ``base[::2]`` of an array with twice the batch;
- ``transposed``: ``a.T`` of a C-ordered ``a.T`` (memory order reversed);
- ``flipped``: negative strides, ``b[::-1, ..., ::-1]`` of a flipped copy ``b``;
- ``swapped``: non-native byte order, ``x.astype(x.dtype.newbyteorder())``;
- ``chmem``: the channel axis moved in memory: an NCHW-shaped view of channels-last memory
  for ``axis=1``, a channels-last view of NCHW memory for ``axis=-1``.
"""
import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest

DTYPES = (np.float64, np.float32, np.float16)
LAYOUTS = ("C", "F", "strided_c", "strided_n", "transposed", "flipped", "swapped", "chmem")
OFFSETS = (0.0, 1e4, 1e6)

# (shape as seen by the user, channel axis): 2-5 dims, odd sizes, N=2, size-1 spatial dims
SHAPES = (
    ((2, 3), 1),
    ((7, 5), 1),
    ((9, 4), -1),
    ((2, 3, 5), 1),
    ((3, 4, 1), 1),
    ((2, 7, 3), -1),
    ((4, 6, 5, 7), 1),
    ((2, 3, 1, 1), 1),
    ((2, 5, 1, 3), 1),
    ((3, 5, 4, 6), -1),
    ((2, 1, 1, 3), -1),
    ((2, 4, 3, 3, 5), 1),
    ((2, 3, 3, 2, 5), -1),
)

# relative accuracy expected of results in each dtype (float16 is computed in float32
# but rounded to 11 bits on the way out)
TOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5, np.dtype(np.float16): 1e-2}


def tol(dtype):
    return TOL[np.dtype(dtype).newbyteorder("=")]


def _fmt_shape(shape):
    return "(" + ",".join(map(str, shape)) + ")"


@dataclasses.dataclass(frozen=True)
class Case:
    shape: tuple
    axis: int
    dtype: type
    layout: str = "C"
    offset: float = 0.0
    scale: float = 2.0

    @property
    def id(self):
        off = "" if self.offset == 0 else f"-off{self.offset:.0e}"
        return (f"{np.dtype(self.dtype).name}-{_fmt_shape(self.shape)}-ax{self.axis}-"
                f"{self.layout}{off}")

    @property
    def nch(self):
        return self.shape[self.axis]

    def values(self, seed=0):
        """float64 values (shape ``self.shape``) the array holds, before rounding to dtype."""
        rng = np.random.default_rng([seed, len(self.shape)] + list(self.shape))
        return rng.normal(self.offset, self.scale, self.shape)

    def make(self, seed=0, offset=None):
        """The array of this case; ``offset`` overrides the case's (e.g. 0 for dy)."""
        v = self.values(seed)
        if offset is not None:
            v = v - self.offset + offset
        return layout(v.astype(self.dtype), self.layout, self.axis)


def layout(a, kind, axis=1):
    """An array with the values of ``a`` in memory layout ``kind`` (see module docstring)."""
    if kind == "C":
        return np.ascontiguousarray(a)
    if kind == "F":
        return np.asfortranarray(a)
    if kind == "strided_c":
        big = np.zeros(a.shape[:1] + (2 * a.shape[1],) + a.shape[2:], a.dtype)
        big[:, ::2] = a
        return big[:, ::2]
    if kind == "strided_n":
        big = np.zeros((2 * a.shape[0],) + a.shape[1:], a.dtype)
        big[::2] = a
        return big[::2]
    if kind == "transposed":
        return np.ascontiguousarray(a.T).T
    if kind == "flipped":
        flip = (slice(None, None, -1),) + (Ellipsis,) + (slice(None, None, -1),)
        return np.ascontiguousarray(a[flip])[flip]
    if kind == "swapped":
        return a.astype(a.dtype.newbyteorder())
    if kind == "chmem":
        src, dst = (1, -1) if axis % a.ndim == 1 else (-1, 1)
        if a.ndim == 2:
            src, dst = 0, 1
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, src, dst)), dst, src)
    raise ValueError(f"unknown layout {kind!r}")


def _offsets_for(dtype):
    # float16 overflows at 65504; 1e4 there already leaves ~2 bits for the spread
    return [o for o in OFFSETS if not (np.dtype(dtype).itemsize == 2 and o > 6e4)]


def iter_cases(dtypes=DTYPES, layouts=LAYOUTS, shapes=SHAPES, offsets=OFFSETS):
    for dtype in dtypes:
        for shape, axis in shapes:
            for kind in layouts:
                for off in offsets:
                    if off in _offsets_for(dtype):
                        yield Case(tuple(shape), axis, dtype, kind, off)


def cases(**kwargs):
    """``pytest.param(case, id=case.id)`` for every case of :func:`iter_cases`."""
    return [pytest.param(c, id=c.id) for c in iter_cases(**kwargs)]


def arrays(seed=0, **kwargs):
    """Yield ``(id, array, axis)`` over dtypes x layouts x shapes x offsets."""
    for c in iter_cases(**kwargs):
        yield c.id, c.make(seed), c.axis


# ------------------------------------------------------------------ comparison helpers

def assert_close(got, want, dtype, scale=None, what=""):
    """|got - want| <= tol(dtype) * scale elementwise (scale: max |want|, at least 1).

    Shapes must match exactly; NaNs must be in the same places.
    """
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaNs")
    ok = ~np.isnan(want)
    if scale is None:
        scale = max(float(np.max(np.abs(want[ok]), initial=0.0)), 1.0)
    np.testing.assert_allclose(got[ok], want[ok], rtol=0, atol=tol(dtype) * scale,
                               err_msg=what)


def exact_moments(values):
    """Exact (Fraction) mean and biased variance of the given floats.

    Every float is an integer times a power of two, so scaling all of them by one power
    of two gives Python integers, whose sums are exact (much faster than summing
    Fractions, and just as exact).
    """
    v = np.asarray(values, np.float64).ravel()
    assert v.size and np.all(np.isfinite(v))
    nonzero = v[v != 0]
    k = int(53 - np.frexp(nonzero)[1].min()) if nonzero.size else 0
    scaled = np.ldexp(v, k)
    assert np.all(np.isfinite(scaled)), "values span too many binades for exact_moments"
    ints = [int(t) for t in scaled]
    n = len(ints)
    s1 = sum(ints)
    s2 = sum(i * i for i in ints)
    scale = Fraction(2) ** k   # k < 0 for values beyond 2**53
    return Fraction(s1, n) / scale, Fraction(n * s2 - s1 * s1, n * n) / (scale * scale)


def fraction_moments(values):
    """The same by summing Fractions directly (slow; the check of exact_moments)."""
    fr = [Fraction(float(t)) for t in np.ravel(values)]
    mean = sum(fr) / len(fr)
    return mean, sum((t - mean) ** 2 for t in fr) / len(fr)


def rel_err(got, exact):
    """|got - exact| / |exact| in exact arithmetic (got a float, exact a Fraction)."""
    return abs(Fraction(float(got)) - exact) / abs(exact)


# ------------------------------------------------------------ float32 statistics

KINDS = ("normal", "offset", "outlier", "huge", "constant", "nonfinite")


def float32_rows(kind, nrows, d, rng):
    """nrows rows of d float32 values of one of KINDS (worst cases of one-pass statistics)."""
    if kind == "normal":
        return rng.normal(0.5, 2.0, (nrows, d)).astype(np.float32)
    if kind == "offset":
        return (1e6 + rng.normal(0, 0.1, (nrows, d))).astype(np.float32)
    if kind == "outlier":   # the first value, inside a one-pass shift, is far from the mean
        x = rng.normal(0, 1, (nrows, d))
        x[:, 0] = rng.choice([-1, 1], nrows) * 10.0 ** rng.uniform(1, 7, nrows)
        return x.astype(np.float32)
    if kind == "huge":   # squares far past FLT_MAX; the float64 statistics are finite
        return (rng.uniform(1e38, 3.4e38, (nrows, d)) * rng.choice([-1, 1], (nrows, d))
                ).astype(np.float32)
    if kind == "constant":
        return np.repeat(rng.uniform(-1e30, 1e30, (nrows, 1)), d, axis=1).astype(np.float32)
    x = rng.normal(0, 1, (nrows, d)).astype(np.float32)   # one of inf, -inf, nan per row
    x[np.arange(nrows), rng.integers(0, d, nrows)] = rng.choice([np.inf, -np.inf, np.nan],
                                                               nrows)
    return x


def check_float32_statistics(x, mean, invstd, y, bias, kind):
    """Per row of x: mean and invstd (eps=0) within one float32 ulp of the exact
    statistics (math.fsum); non-finite rows as NumPy's mean; constant rows exactly (y is
    the bias, a vector for every row or one row per row)."""
    d = x.shape[1]
    bias = np.broadcast_to(bias, x.shape)
    assert mean.dtype == invstd.dtype == np.float32
    for r in range(x.shape[0]):
        v = x[r].astype(np.float64)
        if not np.all(np.isfinite(v)):
            with np.errstate(invalid="ignore"):
                assert mean[r] == np.mean(v) or np.isnan(mean[r]) and np.isnan(np.mean(v))
            assert np.isnan(invstd[r])
            continue
        em = math.fsum(v) / d
        ev = math.fsum((v - em) ** 2) / d
        assert abs(mean[r] - em) <= np.spacing(np.float32(abs(em))), (r, mean[r], em)
        if kind == "constant" or d == 1:
            assert mean[r] == x[r, 0] and np.isinf(invstd[r])
            assert np.all(y[r] == bias[r])
        else:
            es = 1.0 / math.sqrt(ev)
            assert abs(invstd[r] - es) <= np.spacing(np.float32(es)), (r, invstd[r], es)
