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
- Group and instance norm are expressed with the batch-norm kernels on views
  (bncore._family), so they need nothing here.

# IN: x, dy (rows of D, row stride ld elements), weight/bias as float64 (D,) or NULL;
# OUT: y/dx rows, per-row mean/invstd (or invrms), dweight/dbias.
"""
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.stdlib cimport free, malloc

from bncore._kernels cimport (
    MAX_CHUNKS, SERIAL_ELEMS, affine_vec, bn_moments, plane_block_stats, plane_nblocks,
    seg_sumsq,
)
from bncore._openmp cimport work_threads

cnp.import_array()


cdef inline double *f64_or_null(object a):
    return NULL if a is None else <double *>cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline Py_ssize_t row_chunks(Py_ssize_t nrows, Py_ssize_t d) noexcept nogil:
    cdef Py_ssize_t s = (nrows * d) // 65536
    return max(1, min(s, min(nrows, <Py_ssize_t>MAX_CHUNKS)))


# ------------------------------------------------------------------ forward

cdef inline void layer_row(const floating *x, floating *y, Py_ssize_t d, double eps,
                           const double *w, const double *b, double *mean,
                           double *invstd) noexcept nogil:
    cdef bn_moments st
    st.n = 0
    st.mean = 0
    st.m2 = 0
    plane_block_stats(x, 1, d, 0, 0, plane_nblocks(1, d), &st)
    mean[0] = st.mean
    invstd[0] = 1.0 / sqrt(st.m2 / <double>d + eps)
    affine_vec(x, y, d, st.mean, invstd[0], w, b)


cdef inline void rms_row(const floating *x, floating *y, Py_ssize_t d, double eps,
                         const double *w, double *invrms) noexcept nogil:
    invrms[0] = 1.0 / sqrt(seg_sumsq(x, 1, d, 0) / <double>d + eps)
    affine_vec(x, y, d, 0.0, invrms[0], w, NULL)


cdef void forward_rows(const floating *x, floating *y, Py_ssize_t nrows, Py_ssize_t d,
                       Py_ssize_t ldx, Py_ssize_t ldy, double eps, const double *w,
                       const double *b, double *mean, double *invstd, bint rms,
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

    mean (unused for RMS) and invstd/invrms: float64 (nrows,) outputs.
    """
    cdef void *px = cnp.PyArray_DATA(x)
    cdef void *py = cnp.PyArray_DATA(y)
    cdef double *pm = <double *>cnp.PyArray_DATA(mean)
    cdef double *pi = <double *>cnp.PyArray_DATA(invstd)
    cdef const double *pw = f64_or_null(weight)
    cdef const double *pb = f64_or_null(bias)
    with nogil:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
            forward_rows(<const float *>px, <float *>py, nrows, d, ldx, ldy, eps, pw, pb, pm,
                         pi, rms, n_threads)
        else:
            forward_rows(<const double *>px, <double *>py, nrows, d, ldx, ldy, eps, pw, pb, pm,
                         pi, rms, n_threads)


# ------------------------------------------------------------------ backward

cdef inline void layer_row_backward(const floating *dy, const floating *x, floating *dx,
                                    Py_ssize_t d, double mean, double invstd,
                                    const double *w, double *dw, double *db,
                                    bint rms) noexcept nogil:
    """One row: dx, and its dy*xhat and dy added into the chunk's dw/db partials.

    layer: xhat = (x-mean)*invstd, g = dy*w, dx = invstd*(g - mean(g) - xhat*mean(g*xhat))
    rms:   xhat = x*invrms,        g = dy*w, dx = invrms*(g - xhat*mean(g*xhat))
    """
    cdef Py_ssize_t j
    cdef double sg = 0, sgx = 0, g, xh, a, c
    for j in range(d):
        g = <double>dy[j] * (w[j] if w != NULL else 1.0)
        xh = (<double>x[j] - mean) * invstd
        sg += g
        sgx += g * xh
        dw[j] += <double>dy[j] * xh
        db[j] += <double>dy[j]
    a = 0.0 if rms else sg / <double>d
    c = sgx / <double>d
    for j in range(d):
        g = <double>dy[j] * (w[j] if w != NULL else 1.0)
        xh = (<double>x[j] - mean) * invstd
        dx[j] = <floating>(invstd * (g - a - xh * c))


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
            layer_row_backward(dy + r * ldg, x + r * ldx, dx + r * ldd, d,
                               0.0 if rms else mean[r], invstd[r], w, p, p + d, rms)
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
    """Layer/RMS norm backward over rows; dweight, dbias: float64 (d,) outputs."""
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
