# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""What the one-step ("common call") entry points of the kernel modules accept.

``_batchnorm.forward_common`` / ``backward_common``, ``_rownorm.forward_common`` /
``backward_common`` / ``group_common`` / ``group_backward_common`` and
``_stats.moments_common`` run the everyday call (plain arrays, float eps, out= None or
plain, see plain_out) without the Python layer's overhead, which is most of a small call's
cost. They accept only arguments that these helpers call plain, and return None for
anything else before touching anything: the
general Python path (bncore._api, bncore._family) then handles it and raises every error.
So there is one place that rejects input, and the fast path can never accept what it would
reject.
"""
cimport numpy as cnp
from libc.math cimport isfinite
from libc.string cimport memcpy

from bncore._openmp cimport omp_get_max_threads, thread_cap


cdef extern from "bn_kernels.h":
    void bn_widen_f32(const float *src, double *dst, Py_ssize_t n) noexcept nogil
    void bn_copy_f64(const double *src, double *dst, Py_ssize_t n) noexcept nogil
    void bn_narrow_f64(const double *src, float *dst, Py_ssize_t n) noexcept nogil


cdef inline int plain_type(object a) noexcept:
    """The type number of ``a`` if it is an exact ndarray of float32/float64, C-contiguous,
    aligned and in native byte order; else -1."""
    cdef cnp.ndarray arr
    cdef int t
    if type(a) is not cnp.ndarray:
        return -1
    arr = <cnp.ndarray>a
    if (not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISALIGNED(arr)
            or not cnp.PyArray_ISNOTSWAPPED(arr)):
        return -1
    t = cnp.PyArray_TYPE(arr)
    return t if t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT64 else -1


cdef inline int plain_vector(object a, Py_ssize_t n) noexcept:
    """plain_type of ``a`` if it is also one-dimensional of length n; else -1."""
    cdef int t = plain_type(a)
    if t < 0 or cnp.PyArray_NDIM(<cnp.ndarray>a) != 1 or cnp.PyArray_DIM(<cnp.ndarray>a, 0) != n:
        return -1
    return t


cdef inline void as_doubles(object a, int t, double *dst, Py_ssize_t n) noexcept:
    """dst[i] = a[i] for a plain vector of type t (exact: float32 widens), leaving the
    pieces of dst that hold the values already unwritten (see bn_widen_f32)."""
    cdef void *p = cnp.PyArray_DATA(<cnp.ndarray>a)
    if t == cnp.NPY_FLOAT32:
        bn_widen_f32(<float *>p, dst, n)
    else:
        bn_copy_f64(<double *>p, dst, n)


cdef inline object stat_array(const double *v, int nd, cnp.npy_intp *dims, int t):
    """A new C-ordered array of shape dims[:nd] and type t (float32 or float64) holding the
    doubles v, rounded to float32 as NumPy's astype rounds them. The common calls return
    their statistics and weight gradients so, typed and shaped: NumPy's astype and reshape
    after had cost 0.75 us of a 12 us batch-norm backward."""
    cdef cnp.ndarray a = cnp.PyArray_EMPTY(nd, dims, t, 0)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(a)
    if t == cnp.NPY_FLOAT32:
        bn_narrow_f64(v, <float *>cnp.PyArray_DATA(a), n)
    else:
        memcpy(cnp.PyArray_DATA(a), v, n * sizeof(double))
    return a


cdef inline int plain_threads(object n_threads) noexcept:
    """n_threads None (OpenMP's default) or an int >= 1 as a thread count; else -1."""
    if n_threads is None:
        return thread_cap(omp_get_max_threads())
    if type(n_threads) is int and 1 <= n_threads <= 65536:
        return thread_cap(<int>n_threads)
    return -1


cdef inline bint plain_eps(object eps) noexcept:
    """Whether eps is a float, finite and >= 0."""
    return type(eps) is float and <double>eps >= 0.0 and isfinite(<double>eps)


cdef inline int plain_channel_axis(object x, object axis, object n_threads, int *nt) noexcept:
    """For the channel-axis ops: the axis (normalised, >= 0) if x is a plain array of at
    least 2 dims and not empty, axis an int in range and n_threads plain (its count stored
    in nt); else -1."""
    cdef int nd
    nt[0] = plain_threads(n_threads)
    if plain_type(x) < 0 or nt[0] < 0 or type(axis) is not int:
        return -1
    nd = cnp.PyArray_NDIM(<cnp.ndarray>x)
    if nd < 2 or cnp.PyArray_SIZE(<cnp.ndarray>x) == 0 or not -nd <= axis < nd:
        return -1
    return <int>(axis % nd)


cdef inline bint plain_like(object a, object x) noexcept:
    """Whether ``a`` (dy) is a plain array of x's type and shape (x plain)."""
    cdef int i, nd = cnp.PyArray_NDIM(<cnp.ndarray>x)
    if plain_type(a) != cnp.PyArray_TYPE(<cnp.ndarray>x) or cnp.PyArray_NDIM(<cnp.ndarray>a) != nd:
        return False
    for i in range(nd):
        if cnp.PyArray_DIM(<cnp.ndarray>a, i) != cnp.PyArray_DIM(<cnp.ndarray>x, i):
            return False
    return True


cdef inline int plain_dims(object a, object x, int lo, int hi) noexcept:
    """plain_type of ``a`` if its shape is x.shape[lo:hi] (saved statistics, weights);
    else -1."""
    cdef int i, t = plain_type(a)
    if t < 0 or cnp.PyArray_NDIM(<cnp.ndarray>a) != hi - lo:
        return -1
    for i in range(lo, hi):
        if cnp.PyArray_DIM(<cnp.ndarray>a, i - lo) != cnp.PyArray_DIM(<cnp.ndarray>x, i):
            return -1
    return t


cdef inline int trailing_dims(object x, object normalized_shape) noexcept:
    """For the row ops: how many trailing dims of x (plain) normalized_shape names, if it
    is an int or a tuple of ints equal to them; else -1."""
    cdef int i, k, nd = cnp.PyArray_NDIM(<cnp.ndarray>x)
    # the sizes compare as Python ints: a C cast of one past Py_ssize_t would raise, and
    # this function cannot (it returned 0, "no trailing dims", and normalised elementwise)
    if type(normalized_shape) is int:
        if nd < 1 or normalized_shape != cnp.PyArray_DIM(<cnp.ndarray>x, nd - 1):
            return -1
        return 1
    if type(normalized_shape) is not tuple:
        return -1
    k = len(<tuple>normalized_shape)
    if k < 1 or k > nd:
        return -1
    for i in range(k):
        v = (<tuple>normalized_shape)[i]
        if type(v) is not int or v != cnp.PyArray_DIM(<cnp.ndarray>x, nd - k + i):
            return -1
    return k


cdef inline bint _overlap(char *p, Py_ssize_t n, object a) noexcept:
    """Whether [p, p + n) meets the memory of the plain (C-contiguous) array ``a``."""
    cdef char *q = <char *>cnp.PyArray_DATA(<cnp.ndarray>a)
    return q < p + n and p < q + cnp.PyArray_NBYTES(<cnp.ndarray>a)


cdef inline int plain_out(object out, object x, object dy, tuple params) noexcept:
    """For an op's out=: 0 when out is None (a fresh output), 1 when the kernel can write
    straight into it, else -1 (the general path takes the call). Straight in: a writeable
    plain array of x's type and shape (x plain, hence C-contiguous: so is out) that is
    either disjoint from x and dy (dy None or plain) or exactly one of them (the same
    first element: in place; every kernel reads an element before it writes it), and
    disjoint from every plain vector in ``params`` (weights, statistics: None skipped)."""
    cdef char *p
    cdef Py_ssize_t n
    if out is None:
        return 0
    if not plain_like(out, x) or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out):
        return -1
    p = <char *>cnp.PyArray_DATA(<cnp.ndarray>out)
    n = cnp.PyArray_NBYTES(<cnp.ndarray>out)
    for a in (x, dy):
        if a is not None and <char *>cnp.PyArray_DATA(<cnp.ndarray>a) != p and _overlap(p, n, a):
            return -1
    for a in params:
        if a is not None and _overlap(p, n, a):
            return -1
    return 1
