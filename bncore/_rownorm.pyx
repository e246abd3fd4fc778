# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Row-wise kernels: layer norm and RMS norm over contiguous rows of D values.

Design notes
------------
- A row is normalised right after its statistics, while it is in L1/L2: x is read from
  memory once. Row statistics reuse the plane tiling of bncore._kernels (blocks of BLOCK
  values merged with the one Chan merge), so long rows keep two-pass accuracy.
- Rows are the parallel unit: each row's result comes from one thread.
- Backward reduces dweight/dbias over rows in row chunks fixed by the shape (at most
  MAX_CHUNKS), each with its own float64 partial vectors, summed in chunk order: bitwise
  identical for any thread count, O(MAX_CHUNKS * D) extra memory.
- Group norm NCHW: each (sample, group) is one contiguous run; its statistics and the
  per-channel affine run back to back while it is in cache (group_forward). Instance norm
  and channels-last group norm use the batch-norm kernels on views (bncore._family).

# IN: x, dy (rows of D, row stride ld elements), weight/bias as float64 (D,) or NULL;
# OUT: y/dx rows, per-row mean/invstd (or invrms), dweight/dbias.
"""
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.stdlib cimport free, malloc

from bncore._kernels cimport (
    MAX_CHUNKS, SERIAL_ELEMS, bn_moments, plane_block_stats, plane_nblocks, row_affine,
    row_bwd, seg_affine, seg_sumsq,
)
from bncore._openmp cimport work_threads

cnp.import_array()


cdef inline double *f64_or_null(object a):
    return NULL if a is None else <double *>cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline void *ptr_or_null(object a):
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline Py_ssize_t row_chunks(Py_ssize_t nrows, Py_ssize_t d) noexcept nogil:
    cdef Py_ssize_t s = (nrows * d) // 65536
    return max(1, min(s, min(nrows, <Py_ssize_t>MAX_CHUNKS)))


# ------------------------------------------------------------------ forward

cdef inline void layer_row(const floating *x, floating *y, Py_ssize_t d, double eps,
                           const floating *w, const floating *b, double *mean,
                           double *invstd) noexcept nogil:
    cdef bn_moments st
    st.n = 0
    st.mean = 0
    st.m2 = 0
    plane_block_stats(x, 1, d, 0, 0, plane_nblocks(1, d), &st)
    mean[0] = st.mean + st.shift
    invstd[0] = 1.0 / sqrt(st.m2 / <double>d + eps)
    row_affine(x, y, d, mean[0], invstd[0], w, b)


cdef inline void rms_row(const floating *x, floating *y, Py_ssize_t d, double eps,
                         const floating *w, double *invrms) noexcept nogil:
    invrms[0] = 1.0 / sqrt(seg_sumsq(x, 1, d, 0) / <double>d + eps)
    row_affine(x, y, d, 0.0, invrms[0], w, NULL)


cdef void forward_rows(const floating *x, floating *y, Py_ssize_t nrows, Py_ssize_t d,
                       Py_ssize_t ldx, Py_ssize_t ldy, double eps, const floating *w,
                       const floating *b, double *mean, double *invstd, bint rms,
                       int n_threads) noexcept nogil:
    cdef Py_ssize_t r
    cdef int nt = work_threads(n_threads, nrows, nrows * d, SERIAL_ELEMS)
    for r in prange(nrows, schedule='static', num_threads=nt):
        if rms:
            rms_row(x + r * ldx, y + r * ldy, d, eps, w, &invstd[r])
        else:
            layer_row(x + r * ldx, y + r * ldy, d, eps, w, b, &mean[r], &invstd[r])


def forward(cnp.ndarray x, cnp.ndarray y, Py_ssize_t nrows, Py_ssize_t d, Py_ssize_t ldx,
            Py_ssize_t ldy, double eps, weight, bias, cnp.ndarray mean, cnp.ndarray invstd,
            bint rms, int n_threads):
    """Layer norm (rms=False) or RMS norm (rms=True) of nrows contiguous rows of d values.

    weight/bias: None or contiguous (d,) arrays of x's dtype; mean (unused for RMS) and
    invstd/invrms: float64 (nrows,) outputs.
    """
    cdef void *px = cnp.PyArray_DATA(x)
    cdef void *py = cnp.PyArray_DATA(y)
    cdef double *pm = <double *>cnp.PyArray_DATA(mean)
    cdef double *pi = <double *>cnp.PyArray_DATA(invstd)
    cdef void *pw = ptr_or_null(weight)
    cdef void *pb = ptr_or_null(bias)
    with nogil:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
            forward_rows(<const float *>px, <float *>py, nrows, d, ldx, ldy, eps,
                         <const float *>pw, <const float *>pb, pm, pi, rms, n_threads)
        else:
            forward_rows(<const double *>px, <double *>py, nrows, d, ldx, ldy, eps,
                         <const double *>pw, <const double *>pb, pm, pi, rms, n_threads)


# ------------------------------------------------------------------ backward

cdef int backward_rows(const floating *dy, const floating *x, floating *dx, Py_ssize_t nrows,
                       Py_ssize_t d, Py_ssize_t ldg, Py_ssize_t ldx, Py_ssize_t ldd,
                       const double *mean, const double *invstd, const double *w,
                       double *dweight, double *dbias, bint rms,
                       int n_threads) noexcept nogil:
    cdef Py_ssize_t nchunks = row_chunks(nrows, d), s, r, j
    cdef double *part = <double *>malloc(2 * nchunks * d * sizeof(double))
    cdef double *p
    cdef int nt = work_threads(n_threads, nchunks, nrows * d, SERIAL_ELEMS)
    if part == NULL:
        return -1
    for s in prange(nchunks, schedule='static', num_threads=nt):
        p = part + 2 * d * s
        for j in range(2 * d):
            p[j] = 0
        for r in range(s * nrows // nchunks, (s + 1) * nrows // nchunks):
            row_bwd(dy + r * ldg, x + r * ldx, dx + r * ldd, d, 0.0 if rms else mean[r],
                    invstd[r], w, p, p + d, rms)
    for j in range(d):
        dweight[j] = 0
        dbias[j] = 0
    for s in range(nchunks):
        for j in range(d):
            dweight[j] += part[2 * d * s + j]
            dbias[j] += part[2 * d * s + d + j]
    free(part)
    return 0


def backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t nrows, Py_ssize_t d,
             Py_ssize_t ldg, Py_ssize_t ldx, Py_ssize_t ldd, mean, cnp.ndarray invstd,
             weight, cnp.ndarray dweight, cnp.ndarray dbias, bint rms, int n_threads):
    """Layer/RMS norm backward over rows; weight: float64 (d,) (ones when the op has
    none); dweight, dbias: float64 (d,) outputs."""
    cdef void *pg = cnp.PyArray_DATA(dy)
    cdef void *px = cnp.PyArray_DATA(x)
    cdef void *pd = cnp.PyArray_DATA(dx)
    cdef const double *pm = f64_or_null(mean)
    cdef const double *pi = <double *>cnp.PyArray_DATA(invstd)
    cdef const double *pw = f64_or_null(weight)
    cdef double *pdw = <double *>cnp.PyArray_DATA(dweight)
    cdef double *pdb = <double *>cnp.PyArray_DATA(dbias)
    cdef int rc
    with nogil:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
            rc = backward_rows(<const float *>pg, <const float *>px, <float *>pd, nrows, d, ldg,
                               ldx, ldd, pm, pi, pw, pdw, pdb, rms, n_threads)
        else:
            rc = backward_rows(<const double *>pg, <const double *>px, <double *>pd, nrows, d,
                               ldg, ldx, ldd, pm, pi, pw, pdw, pdb, rms, n_threads)
    if rc != 0:
        raise MemoryError("bncore: out of memory for per-chunk partial sums")


# ------------------------------------------------------------------ group norm, NCHW

cdef inline void group_block(const floating *x, floating *y, Py_ssize_t cg, Py_ssize_t s,
                             Py_ssize_t c0, double eps, const double *w, const double *b,
                             double *mean, double *var) noexcept nogil:
    """One (sample, group): statistics of its contiguous cg*s values, then normalise each
    of its channels with that channel's affine while the group is in cache."""
    cdef bn_moments st
    cdef Py_ssize_t j
    cdef double invstd
    st.n = 0
    st.mean = 0
    st.m2 = 0
    plane_block_stats(x, 1, cg * s, 0, 0, plane_nblocks(1, cg * s), &st)
    mean[0] = st.mean + st.shift
    var[0] = st.m2 / <double>(cg * s)
    invstd = 1.0 / sqrt(var[0] + eps)
    for j in range(cg):
        seg_affine(x + j * s, y + j * s, 1, s, 0, 0, mean[0],
                   (w[c0 + j] if w != NULL else 1.0) * invstd,
                   b[c0 + j] if b != NULL else 0.0)


cdef void group_rows(const floating *x, floating *y, Py_ssize_t n, Py_ssize_t g,
                     Py_ssize_t cg, Py_ssize_t s, double eps, const double *w, const double *b,
                     double *mean, double *var, int n_threads) noexcept nogil:
    cdef Py_ssize_t t
    cdef int nt = work_threads(n_threads, n * g, n * g * cg * s, SERIAL_ELEMS)
    for t in prange(n * g, schedule='static', num_threads=nt):
        group_block(x + t * cg * s, y + t * cg * s, cg, s, (t % g) * cg, eps, w, b, &mean[t],
                    &var[t])


def group_forward(cnp.ndarray x, cnp.ndarray y, Py_ssize_t n, Py_ssize_t g, Py_ssize_t cg,
                  Py_ssize_t s, double eps, weight, bias, cnp.ndarray mean, cnp.ndarray var,
                  int n_threads):
    """Group norm of a C-contiguous (N, C, S) array in one pass: mean, var (biased) (N*G,)."""
    cdef void *px = cnp.PyArray_DATA(x)
    cdef void *py = cnp.PyArray_DATA(y)
    cdef double *pm = <double *>cnp.PyArray_DATA(mean)
    cdef double *pv = <double *>cnp.PyArray_DATA(var)
    cdef const double *pw = f64_or_null(weight)
    cdef const double *pb = f64_or_null(bias)
    with nogil:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
            group_rows(<const float *>px, <float *>py, n, g, cg, s, eps, pw, pb, pm, pv,
                       n_threads)
        else:
            group_rows(<const double *>px, <double *>py, n, g, cg, s, eps, pw, pb, pm, pv,
                       n_threads)
