# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Per-channel moments (Welford/Chan) over canonical views, and the Moments merge.

The Python layer (bncore._api) turns any array and axis into one of two canonical views
and calls these with element strides; here nothing is validated again.
"""
cimport numpy as cnp
from cython cimport floating

from bncore._fastpath cimport plain_threads, plain_type
from cython.parallel cimport prange

from bncore._kernels cimport (
    bn_llc_bytes,
    SERIAL_ELEMS, bn_chan_merge_vec, bn_simd_level, planes_stats, rows_stats,
)
from bncore._openmp cimport team_threads, work_threads

cnp.import_array()

# values a block for per-block statistics (batch_moments) of kept axes apart: smaller
# blocks cost more a call than gathering the kept axes into a copy ((1000, 3, 4) over axis
# 1: 12x slower as blocks). Shared by both paths of moments(), which must agree.
BLOCK_MIN = 1024


cdef inline double *f64_ptr(cnp.ndarray a):
    return <double *>cnp.PyArray_DATA(a)


cdef int _planes(const floating *x, Py_ssize_t outer, Py_ssize_t nch, Py_ssize_t inner,
                 Py_ssize_t so, Py_ssize_t sc, double *mean, double *m2, int nt) noexcept nogil:
    return planes_stats(x, outer, nch, inner, so, sc, mean, m2, nt)


cdef int _rows(const floating *x, Py_ssize_t nrows, Py_ssize_t nch, Py_ssize_t ld,
               double *mean, double *m2, int nt) noexcept nogil:
    return rows_stats(x, nrows, nch, ld, mean, m2, nt)


cdef int _view(const floating *x, Py_ssize_t outer, Py_ssize_t nch, Py_ssize_t inner,
               Py_ssize_t so, Py_ssize_t sc, double *mean, double *m2, int nt) noexcept nogil:
    """The rows kernel for a rows view (inner == 1, channels contiguous), else planes."""
    if inner == 1 and sc == 1:
        return _rows(x, outer, nch, so, mean, m2, nt)
    return _planes(x, outer, nch, inner, so, sc, mean, m2, nt)


cdef int _batches(const floating *x, Py_ssize_t nb, Py_ssize_t sb, Py_ssize_t outer,
                  Py_ssize_t nch, Py_ssize_t inner, Py_ssize_t so, Py_ssize_t sc,
                  double *mean, double *m2, int n_threads) noexcept nogil:
    """_view of nb views sb elements apart, into nch values each of mean and m2: a view
    per thread when that shares the work evenly (nb a multiple of the threads, or at least
    4 views a thread), else every thread on each view in turn. The kernels give the same
    bits for any thread count, so both ways do."""
    cdef Py_ssize_t b, fails = 0
    cdef int nt = work_threads(n_threads, nb, nb * outer * nch * inner, SERIAL_ELEMS)
    if nt > 1 and (nb % nt == 0 or nb >= 4 * nt):
        for b in prange(nb, schedule='static', num_threads=team_threads(nt, n_threads)):
            fails += _view(x + b * sb, outer, nch, inner, so, sc, mean + b * nch,
                           m2 + b * nch, 1) != 0
        return -1 if fails else 0
    for b in range(nb):
        if _view(x + b * sb, outer, nch, inner, so, sc, mean + b * nch, m2 + b * nch,
                 n_threads) != 0:
            return -1
    return 0


def batch_moments(cnp.ndarray x, Py_ssize_t nb, Py_ssize_t outer, Py_ssize_t nch,
                  Py_ssize_t inner, cnp.ndarray mean, cnp.ndarray m2, int n_threads):
    """channel_moments of each of the nb blocks of a C-contiguous ``x`` (float32 or
    float64, native order) seen as (nb, outer, nch, inner): per-(block, channel) mean and
    M2 into float64 (nb * nch,) outputs. Statistics over axes that keep a leading axis
    and a later one (a sample's channels over its rows), without gathering the kept axes
    into a copy."""
    cdef int rc
    cdef double *pm = f64_ptr(mean)
    cdef double *pm2 = f64_ptr(m2)
    cdef void *px = cnp.PyArray_DATA(x)
    cdef Py_ssize_t so = nch * inner, sb = outer * nch * inner
    with nogil:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
            rc = _batches(<const float *>px, nb, sb, outer, nch, inner, so, inner, pm, pm2,
                          n_threads)
        else:
            rc = _batches(<const double *>px, nb, sb, outer, nch, inner, so, inner, pm, pm2,
                          n_threads)
    if rc != 0:
        raise MemoryError("bncore: out of memory for per-thread partial statistics")


def channel_moments(cnp.ndarray x, Py_ssize_t outer, Py_ssize_t nch, Py_ssize_t inner,
                    Py_ssize_t so, Py_ssize_t sc, cnp.ndarray mean, cnp.ndarray m2,
                    int n_threads):
    """Per-channel mean and M2 (float64 (nch,) outputs) of a canonical view of ``x``.

    planes view: inner values contiguous (element strides so, sc); rows view: inner == 1
    and channels contiguous (row stride so). ``x`` is float32 or float64, native order.
    """
    cdef int rc
    cdef double *pm = f64_ptr(mean)
    cdef double *pm2 = f64_ptr(m2)
    cdef void *px = cnp.PyArray_DATA(x)
    with nogil:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
            rc = _view(<const float *>px, outer, nch, inner, so, sc, pm, pm2, n_threads)
        else:
            rc = _view(<const double *>px, outer, nch, inner, so, sc, pm, pm2, n_threads)
    if rc != 0:
        raise MemoryError("bncore: out of memory for per-thread partial statistics")


cdef tuple plain_moments(object x, object axis, int nt, object ddof, bint *reduced,
                         Py_ssize_t *count):
    """The common call's reduction (see moments_common): (mean, M2), float64 vectors of
    the kept axes' values in C order, with its count and reduced axes (reduced[i] for
    each of x's axes); None, before running anything, for any other call or ddof >= the
    count. Same views and kernels as bncore._api._raw_moments."""
    cdef cnp.ndarray arr, mean, m2
    cdef int nd, i, a, k0, k1, lead = 0
    cdef Py_ssize_t outer = 1, nch = 1, inner = 1, nb = 1
    cdef cnp.npy_intp n1
    if plain_type(x) < 0:
        return None
    arr = <cnp.ndarray>x
    nd = cnp.PyArray_NDIM(arr)
    if nd < 1 or nd > 32 or cnp.PyArray_SIZE(arr) == 0:
        return None
    for i in range(nd):
        reduced[i] = axis is None
    if type(axis) is int:
        axis = (axis,)
    if axis is not None:
        if type(axis) is not tuple or len(<tuple>axis) == 0:
            return None
        for v in <tuple>axis:
            if type(v) is not int or not -nd <= v < nd:
                return None
            a = <int>(v % nd)
            if reduced[a]:
                return None
            reduced[a] = True
    k0 = nd
    k1 = -1
    for i in range(nd):
        if not reduced[i]:
            k0 = min(k0, i)
            k1 = i
    if k0 == 0:                   # leading blocks: axes [0, lead) kept, then reduced ones
        while lead <= k1 and not reduced[lead]:
            lead += 1
        if lead > k1:
            lead = 0              # no reduced axis among them: one adjacent run
        else:
            k0 = lead
            while reduced[k0]:
                k0 += 1
    for i in range(k0, k1 + 1):   # then the kept axes must be adjacent
        if reduced[i]:
            return None
    for i in range(nd):
        if i < lead:
            nb *= cnp.PyArray_DIM(arr, i)
        elif i < k0:
            outer *= cnp.PyArray_DIM(arr, i)
        elif i <= k1:
            nch *= cnp.PyArray_DIM(arr, i)
        else:
            inner *= cnp.PyArray_DIM(arr, i)
    if lead and outer * nch * inner < BLOCK_MIN:
        return None               # the general path gathers small blocks into a copy
    if k1 < 0:                    # everything reduced: one channel of all values
        outer, inner = 1, outer
    count[0] = outer * inner
    if ddof >= count[0]:
        return None
    n1 = nb * nch
    mean = cnp.PyArray_EMPTY(1, &n1, cnp.NPY_FLOAT64, 0)
    m2 = cnp.PyArray_EMPTY(1, &n1, cnp.NPY_FLOAT64, 0)
    if lead:
        batch_moments(arr, nb, outer, nch, inner, mean, m2, nt)
    elif inner == 1:
        channel_moments(arr, outer, nch, 1, nch, 1, mean, m2, nt)
    else:
        channel_moments(arr, outer, nch, inner, nch * inner, inner, mean, m2, nt)
    return mean, m2


def moments_common(x, axis, ddof, keepdims, n_threads):
    """moments() for the common call, without the Python layer's overhead, or None.

    The common call: x a plain array (see bncore._fastpath) and not empty; axis None, an
    int, or a tuple of distinct ints, all in range, leaving the kept axes adjacent (the
    batch-norm (0, 2, 3), or a row's last axis) or leading blocks (the leading axes and
    one run of adjacent axes after them, at least BLOCK_MIN values under each leading
    index: per sample and channel of channels-last (N, H, W, C) over (1, 2)); ddof an int
    below the count; keepdims a bool; n_threads None or an int >= 1. Anything else
    returns None before touching anything, and bncore._api.moments takes the general
    path, which warns and raises. Same view, kernel and bits as that path.
    """
    cdef cnp.ndarray mean, m2, mo, vo
    cdef int xt, nt, i, nd
    cdef Py_ssize_t count, nout, c
    cdef bint reduced[32]
    cdef cnp.npy_intp kshape[32]
    cdef int knd = 0
    cdef double dof
    cdef double *pm
    cdef double *pv
    xt = plain_type(x)
    nt = plain_threads(n_threads)
    if xt < 0 or nt < 0 or type(keepdims) is not bool or type(ddof) is not int:
        return None
    r = plain_moments(x, axis, nt, ddof, reduced, &count)
    if r is None:
        return None
    mean, m2 = r
    dof = <double>(count - <Py_ssize_t>ddof)
    nd = cnp.PyArray_NDIM(<cnp.ndarray>x)
    for i in range(nd):
        if not reduced[i]:
            kshape[knd] = cnp.PyArray_DIM(<cnp.ndarray>x, i)
            knd += 1
        elif keepdims:
            kshape[knd] = 1
            knd += 1
    nout = cnp.PyArray_SIZE(mean)
    mo = cnp.PyArray_EMPTY(knd, kshape, xt, 0)
    vo = cnp.PyArray_EMPTY(knd, kshape, xt, 0)
    pm = f64_ptr(mean)
    pv = f64_ptr(m2)
    if xt == cnp.NPY_FLOAT32:
        for c in range(nout):
            (<float *>cnp.PyArray_DATA(mo))[c] = <float>pm[c]
            (<float *>cnp.PyArray_DATA(vo))[c] = <float>(pv[c] / dof)
    else:
        for c in range(nout):
            (<double *>cnp.PyArray_DATA(mo))[c] = pm[c]
            (<double *>cnp.PyArray_DATA(vo))[c] = pv[c] / dof
    if knd == 0:
        return mo[()], vo[()]
    return mo, vo


def update_common(x, axis):
    """Moments.update's reduction for the common call (moments_common's, on OpenMP's
    default threads, as the general path): (count, mean, M2), float64 arrays of the kept
    axes' shape, as bncore._api._raw_moments gives them, bit for bit; or None."""
    cdef bint reduced[32]
    cdef Py_ssize_t count
    cdef int i
    r = plain_moments(x, axis, plain_threads(None), 0, reduced, &count)
    if r is None:
        return None
    kept = tuple([(<cnp.ndarray>x).shape[i] for i in range(cnp.PyArray_NDIM(<cnp.ndarray>x))
                  if not reduced[i]])
    return count, (<cnp.ndarray>r[0]).reshape(kept), (<cnp.ndarray>r[1]).reshape(kept)


def merge_moments(double na, cnp.ndarray mean_a, cnp.ndarray m2_a, double nb,
                  cnp.ndarray mean_b, cnp.ndarray m2_b):
    """Chan-merge state b into state a in place (contiguous float64 arrays of equal size)."""
    bn_chan_merge_vec(na, f64_ptr(mean_a), f64_ptr(m2_a), nb, f64_ptr(mean_b), f64_ptr(m2_b),
                      mean_a.size)


def simd_level():
    """The SIMD code path the kernels take on this CPU."""
    return bn_simd_level().decode()


include "_thresholds.pxi"


def _llc_bytes():
    """The last-level cache size the C library reports (0: none)."""
    return bn_llc_bytes()
