# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Row-wise kernels: layer and RMS norm over rows, group and instance norm over groups.

Design notes
------------
- Layer / RMS norm: rows of D contiguous values. A row is normalised right after its
  statistics, while it is in L1/L2, so x is read from memory once and y written once.
  Rows of D <= BLOCK go to bn_rows_norm, which stages groups of rows so that their short
  dependency chains overlap; longer rows go one by one through run_moments. Float runs
  of up to BN_RUN_MAX values (layer-norm rows, group-norm groups) take one double pass
  around their first value (bn_run_moments: exact to far below a float ulp, see there);
  longer or double ones BLOCK-sized block moments merged with the one Chan merge. Rows
  are the parallel unit: each row's result comes from one thread.
- Backward: dweight/dbias are column sums over rows. Rows are cut into chunks fixed by
  the shape (at most MAX_CHUNKS), each with its own float64 partial vectors (O(D)),
  summed in chunk order after the parallel loop: bitwise identical for any thread count.
- Group norm, NCHW (N, C, S) C-contiguous: each (sample, group) is one contiguous run of
  C/G*S values. Its statistics, then each channel's affine (forward) or its per-channel
  sums, the group sums and dx (backward), run back to back while the group is in cache.
  Instance norm is group norm with G == C (the group is one (n, c) plane).
- Channels-last (N, S, C): a sample is a rows view of S rows of C channels. Each sample
  runs start to finish on one thread (one parallel region for the whole batch; many
  short regions stall on a busy machine): per-channel moments (rows_stats, serial),
  channels merged into groups with bn_chan_merge, then the per-channel affine over the
  sample's rows; backward likewise with the channels-last sums and dx primitives.
- Outputs are written with non-temporal stores once the arrays an op moves outgrow the
  L3 (streams(); with a 32 MiB L3, 16 MiB of output for a forward, 10.7 MiB for a
  backward): for arrays far larger than the caches they skip the read-for-ownership of
  y (a third of the traffic). Same bits either way.

# IN: x, dy (read only); weight/bias as float64 (C,) or NULL (layer/RMS: x's dtype (D,));
#     saved mean/invstd (float64) in backward.
# OUT: y / dx; per-row or per-(n, group) mean and variance/invstd; dweight/dbias (float64).
"""
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.stdint cimport uint16_t
from libc.float cimport DBL_EPSILON, FLT_EPSILON
from libc.math cimport isfinite, sqrt

from bncore._kernels cimport (
    bn_alloc64, bn_free64, bn_l1_bytes, bn_float_to_half, bn_half_to_float, bn_rows_affine_half,
    bn_cl_float_params,
    BLOCK, BN_RUN_MAX, BN_SMALL_GROUP, CHANNEL_BLOCK, MAX_CHUNKS, SERIAL_ELEMS, bn_chan_merge,
    bn_group_blocks_bwd_f32, bn_group_blocks_bwd_f64, bn_group_blocks_f32, bn_group_blocks_f64,
    bn_group_param_grads, streams,
    bn_moments, bn_pivot, merge_row_chunks, rows_chunk_stats, rows_chunks, beyond_caches,
    rows_pivots, half_stage, rows_scratch, rows_stats_in,
    bn_cl_affine_group_f64, bn_cl_group_pipe_f32, bn_group_affine_f32, bn_group_affine_f64,
    bn_run_moments_f32, bn_shift_moments_f64,
    bn_fence, seg_bwd_sums,
    cl_affine, cl_affine_stream, cl_bwd_dx, cl_bwd_sums, plane_block_stats, plane_nblocks,
    beyond_l2, prefetch_seg,
    row_affine, row_bwd, row_bwd2, row_bwd_sums, rows_bwd_tile, BN_BWD_TILE, rows_norm,
    seg_affine, seg_affine_stream, seg_bwd_dx, seg_moments,
    seg_sumsq,
)
from bncore._fastpath cimport (
    as_doubles, plain_channel_axis, plain_dims, plain_eps, plain_like, plain_out, plain_threads,
    plain_type, plain_vector, stat_array, trailing_dims,
)
from bncore._outputs cimport empty_apart
from bncore._openmp cimport (
    bncore_barrier, omp_get_num_threads, omp_get_thread_num, team_threads, work_threads,
)

cnp.import_array()

cdef enum:
    PREFETCH_BYTES = 4096   # how far ahead the row loops fetch
    ROW_CHUNK_ELEMS = 16384  # forward rows per parallel chunk: about this many values
    HALF_STAGE = 4096        # float16 rows widened this many values at a time (16 KiB, L1)
    HALF_BLOCK = 1048576     # float16 (sample, group) blocks up to this widened whole (4 MiB)
    RUN_CHUNK = 16384        # values per chunk of a long run's statistics
    GROUP_TILE = 64          # NCHW group channels per affine call
    SMALL_CHUNK = 8192       # values per parallel chunk of small NCHW groups
    DIRECT_MIN_CG = 16       # channels-last groups this wide (3x over more than 64 rows)
    DIRECT_MAX_CG = 1024     # take their statistics straight from the block
    DIRECT_BYTES = 2097152   # and groups from 2 * DIRECT_MIN_CG in inputs up to this size
    DIRECT_ONE_ROWS = 256    # and from DIRECT_MIN_CG in a batch of one up to this many rows
    ROW_CHUNK_MIN_ROWS = 64  # backward row chunks: rows each, where there are enough
    PARAM_CHUNKS = 8         # group-norm weight gradients: runs of samples summed apart


cdef inline double *f64_or_null(object a):
    return NULL if a is None else <double *>cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline void *ptr_or_null(object a):
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline Py_ssize_t row_chunks(Py_ssize_t nrows, Py_ssize_t d) noexcept nogil:
    """Row chunks of the backward column sums, from the shape alone (<= MAX_CHUNKS): one
    per 65536 values or per ROW_CHUNK_MIN_ROWS rows, whichever is more values, and where
    that gives fewer, up to 8 of 8192 values and 32 rows or more (two of 16 rows where
    that gives one: two threads then share the rows). 16 rows had been the floor: 32 ran
    (64, 2048) 1.095x, (96, 2048) 1.09x, (128, 512) 1.17x, (64, 4096) 1.07x on two
    threads, 1.0-1.05x on one (in-process A/B, medians of 7). One chunk per 65536
    values left (1024, 64) on one thread, where 8 chunks run 1.57x; (2048, 64) 1.24x,
    (512, 128) 1.35x, (4096, 32) 1.31x, (128, 512) 1.54x. The rows: each chunk zeroes, and
    the merge reads, 16 bytes a column, which at 16 rows of 4096 values was a sixth of the
    rows' own traffic: (1024, 4096) ran 1.16x with 64 rows a chunk, (512,
    4096) 1.15x, (256, 8192) 1.24x, (2048, 2048) 1.04x, (8192, 768) 1.01x, on two threads
    (in-process A/B, medians of 7; one thread (1024, 4096) 1.12x). An odd
    count above one goes up by one: (48, 4096) had 3 chunks, two for one thread and one
    for the other, and 4 ran 1.27x on two threads (0.96x on one); (80, 4096) 1.09x,
    (48, 2048) 1.04x, (112, 4096) 1.035x (in-process A/B, medians of 7)."""
    cdef Py_ssize_t s = (nrows * d) // max(65536, ROW_CHUNK_MIN_ROWS * d)
    if s < 8:
        s = max(s, min(8, min((nrows * d) // 8192, max(nrows // 32, min(2, nrows // 16)))))
    s = max(1, min(s, min(nrows, <Py_ssize_t>MAX_CHUNKS)))
    if s > 1 and s % 2 == 1 and s < nrows and s < MAX_CHUNKS:
        s += 1   # an even count: two (or four) threads take as many chunks each
    return s


cdef inline void run_moments(const floating *x, Py_ssize_t n, double *mean,
                             double *m2) noexcept nogil:
    """Mean and M2 of n contiguous values: floats up to BN_RUN_MAX in one double pass
    (bn_run_moments), longer float runs in that one pass per block merged with the Chan
    merge; double runs in one block moments call when the run fits one block (what
    plane_block_stats gives for it, without the bookkeeping), else blocks merged; runs
    longer than a block as chunks of blocks (run_chunks), merged in chunk order."""
    cdef double pivot
    cdef Py_ssize_t nchunks, k
    cdef bn_moments part[MAX_CHUNKS]
    if floating is float:
        if n <= BN_RUN_MAX:
            bn_run_moments_f32(x, 1, n, 0, &pivot, mean, m2)
            mean[0] += pivot
            return
    if n <= BLOCK:
        pivot = bn_pivot(<double>x[0])
        seg_moments(x, 1, n, 0, pivot, mean, m2)
        mean[0] += pivot
        return
    nchunks = run_chunks(n)
    for k in range(nchunks):
        run_chunk_stats(x, n, k, nchunks, &part[k])
    merged_chunks(part, nchunks, mean, m2)


cdef inline Py_ssize_t run_chunks(Py_ssize_t n) noexcept nogil:
    """Chunks of a run too long for one pass (from its length alone): about RUN_CHUNK
    values of whole blocks each, reduced one by one (run_moments) or by a team of threads
    (group_rows_team), then merged in chunk order: the same bits either way."""
    cdef Py_ssize_t nb = plane_nblocks(1, n)
    return max(1, min(nb // (RUN_CHUNK // BLOCK), <Py_ssize_t>MAX_CHUNKS))


cdef inline void run_chunk_stats(const floating *x, Py_ssize_t n, Py_ssize_t k,
                                 Py_ssize_t nchunks, bn_moments *st) noexcept nogil:
    """The state of chunk k of a long run (mean relative to the run's pivot)."""
    cdef Py_ssize_t nb = plane_nblocks(1, n)
    st.n = 0
    st.mean = 0
    st.m2 = 0
    plane_block_stats(x, 1, n, 0, k * nb // nchunks, (k + 1) * nb // nchunks, st, True)


cdef inline void merged_chunks(const bn_moments *part, Py_ssize_t nchunks, double *mean,
                               double *m2) noexcept nogil:
    """Mean and M2 of a long run from its chunk states (relative to the run's pivot),
    merged in chunk order: the one merge of run_moments and group_rows_team."""
    cdef bn_moments st
    cdef Py_ssize_t k
    st.n = 0
    st.mean = 0
    st.m2 = 0
    st.shift = part[0].shift
    for k in range(nchunks):
        bn_chan_merge(&st, part[k].n, part[k].mean, part[k].m2)
    mean[0] = st.mean + st.shift
    m2[0] = st.m2


# ------------------------------------------------------------------ layer / RMS forward

cdef inline void layer_row(const floating *x, floating *y, Py_ssize_t d, double eps,
                           const floating *w, const floating *b, double *mean,
                           double *invstd, bint stream) noexcept nogil:
    """One row of layer norm: its statistics, then its affine while it is in cache."""
    cdef double m, m2
    run_moments(x, d, &m, &m2)
    mean[0] = m
    invstd[0] = 1.0 / sqrt(m2 / <double>d + eps)
    row_affine(x, y, d, m, invstd[0], w, b, stream)


cdef inline void rms_row(const floating *x, floating *y, Py_ssize_t d, double eps,
                         const floating *w, double *invrms, bint stream) noexcept nogil:
    invrms[0] = 1.0 / sqrt(seg_sumsq(x, 1, d, 0) / <double>d + eps)
    row_affine(x, y, d, 0.0, invrms[0], w, <floating *>NULL, stream)


cdef inline Py_ssize_t rows_ahead(Py_ssize_t d, Py_ssize_t itemsize) noexcept nogil:
    """Prefetch distance in rows: about PREFETCH_BYTES ahead of the row being read."""
    return max(1, PREFETCH_BYTES // max(d * itemsize, 1))


cdef void forward_rows(const floating *x, floating *y, Py_ssize_t nrows, Py_ssize_t d,
                       Py_ssize_t ldx, Py_ssize_t ldy, double eps, const floating *w,
                       const floating *b, double *mean, double *invstd, bint rms,
                       int n_threads) noexcept nogil:
    cdef Py_ssize_t nchunks = max(1, min(nrows, (nrows * d) // ROW_CHUNK_ELEMS)), s, r, r0, r1
    cdef bint stream = streams(nrows * d * <Py_ssize_t>sizeof(floating), 2, y, x)
    cdef int nt = work_threads(n_threads, nchunks, nrows * d, SERIAL_ELEMS)
    for s in prange(nchunks, schedule='static', num_threads=team_threads(nt, n_threads)):
        r0 = s * nrows // nchunks
        r1 = (s + 1) * nrows // nchunks
        if d <= BLOCK:   # rows of one statistics block: staged in groups (bn_rows_norm)
            rows_norm(x + r0 * ldx, y + r0 * ldy, r1 - r0, nrows - r0, d, ldx, ldy, eps, w, b,
                      NULL if rms else mean + r0, invstd + r0, rms, stream)
        else:
            # rows longer than a block: no software prefetch (the hardware's follows these
            # long runs; fetching the next row in a burst at each row's start had run
            # layer norm (1024, 4096) 1/1.22 as fast, (2048, 3072) 1/1.22, (512, 8192)
            # 1/1.15, RMS norm (1024, 4096) 1/1.15, (64, 4096) 1/1.07)
            for r in range(r0, r1):
                if rms:
                    rms_row(x + r * ldx, y + r * ldy, d, eps, w, &invstd[r], stream)
                else:
                    layer_row(x + r * ldx, y + r * ldy, d, eps, w, b, &mean[r], &invstd[r],
                              stream)
        if stream:
            bn_fence()


cdef int forward_rows_half(const uint16_t *x, uint16_t *y, Py_ssize_t nrows, Py_ssize_t d,
                           Py_ssize_t ldx, Py_ssize_t ldy, double eps, const float *w,
                           const float *b, double *mean, double *invstd, bint rms,
                           int n_threads) noexcept nogil:
    """forward_rows of float16 rows: a few rows at a time (HALF_STAGE values) widened to
    float32 in a buffer of the thread's (in L1), normalised there by the float32 row
    kernels, rounded back into y. Each row's results are those of the float32 rows (a row's
    statistics and affine depend on nothing else), rounded, with one read of x and one
    write of y in float16, where widening the whole array first, normalising it in float32
    and rounding it back moved five float32-sized passes. -1 if out of memory."""
    cdef Py_ssize_t nchunks = max(1, min(nrows, (nrows * d) // ROW_CHUNK_ELEMS))
    cdef Py_ssize_t per = max(1, HALF_STAGE // d), s, r, k, nr, r1, fails = 0
    cdef int nt = work_threads(n_threads, nchunks, nrows * d, SERIAL_ELEMS)
    cdef float *buf = NULL   # (private in the parallel block; set for the compiler)
    with parallel(num_threads=team_threads(nt, n_threads)):
        buf = <float *>bn_alloc64(per * d * sizeof(float))
        for s in prange(nchunks, schedule='static'):
            if buf == NULL:
                fails += 1
            else:
                r = s * nrows // nchunks
                r1 = (s + 1) * nrows // nchunks
                while r < r1:
                    nr = min(per, r1 - r)
                    for k in range(nr):
                        bn_half_to_float(x + (r + k) * ldx, buf + k * d, d)
                    if d <= BLOCK:
                        rows_norm(buf, buf, nr, nr, d, d, d, eps, w, b,
                                  NULL if rms else mean + r, invstd + r, rms, False)
                    else:
                        for k in range(nr):
                            if rms:
                                rms_row(buf + k * d, buf + k * d, d, eps, w, &invstd[r + k],
                                        False)
                            else:
                                layer_row(buf + k * d, buf + k * d, d, eps, w, b, &mean[r + k],
                                          &invstd[r + k], False)
                    for k in range(nr):
                        bn_float_to_half(buf + k * d, y + (r + k) * ldy, d)
                    r = r + nr
        bn_free64(buf)
    return -1 if fails else 0


def forward_half(cnp.ndarray x, cnp.ndarray y, Py_ssize_t nrows, Py_ssize_t d, Py_ssize_t ldx,
                 Py_ssize_t ldy, double eps, weight, bias, mean, cnp.ndarray invstd, bint rms,
                 int n_threads):
    """forward() of float16 rows (x, y float16; weight/bias None or float32 (d,))."""
    cdef int rc
    cdef const uint16_t *px = <const uint16_t *>cnp.PyArray_DATA(x)
    cdef uint16_t *py = <uint16_t *>cnp.PyArray_DATA(y)
    cdef double *pm = f64_or_null(mean)
    cdef double *pi = <double *>cnp.PyArray_DATA(invstd)
    cdef const float *pw = <const float *>ptr_or_null(weight)
    cdef const float *pb = <const float *>ptr_or_null(bias)
    with nogil:
        rc = forward_rows_half(px, py, nrows, d, ldx, ldy, eps, pw, pb, pm, pi, rms, n_threads)
    if rc != 0:
        raise MemoryError("bncore: out of memory for float16 row buffers")


def forward(cnp.ndarray x, cnp.ndarray y, Py_ssize_t nrows, Py_ssize_t d, Py_ssize_t ldx,
            Py_ssize_t ldy, double eps, weight, bias, mean, cnp.ndarray invstd, bint rms,
            int n_threads):
    """Layer norm (rms=False) or RMS norm (rms=True) of nrows rows of d contiguous values.

    weight/bias: None or contiguous (d,) arrays of x's dtype; mean (layer norm; None for
    RMS) and invstd/invrms: float64 (nrows,) outputs. y may be x (same rows, in place).
    """
    cdef void *px = cnp.PyArray_DATA(x)
    cdef void *py = cnp.PyArray_DATA(y)
    cdef double *pm = f64_or_null(mean)
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


def forward_common(x, normalized_shape, weight, bias, eps, n_threads, bint rms, out=None,
                   bint stats=True):
    """Layer/RMS norm forward for the common call, without the Python layer's overhead, or
    None.

    The common call: x an exact ndarray, float32/float64, C-contiguous, aligned, native and
    not empty; normalized_shape an int or a tuple of ints equal to x's trailing dims; weight
    and bias None or plain float32/float64 arrays of those dims (see plain_dims: in
    another dtype than x they are converted to x's, as the general path does; NumPy's
    np.ones(d) is float64, and a float32 layer norm given it had cost 5x the call); eps a
    finite float >= 0 (or None for RMS norm: the dtype's machine epsilon); n_threads None
    or an int >= 1. Anything else returns None and the caller takes the general path
    (bncore._family), which also raises every error. Same kernel and bits as that path.
    Returns (y, mean or None, invstd): the statistics of x's leading dims and dtype, or
    (y, None, None) when not stats (layer_norm's and rms_norm's call, which drop them).
    """
    cdef cnp.ndarray arr, y
    cdef object mean = None, invstd = None
    cdef int xt, nd, k, i, nt, ot, wt = -1, bt = -1
    cdef Py_ssize_t nrows = 1, d = 1
    cdef cnp.npy_intp dim
    cdef double ep
    cdef void *pw = NULL
    cdef void *pb = NULL
    cdef double *pm = NULL
    cdef double *pi
    cdef char *conv = NULL
    xt = plain_type(x)
    nt = plain_threads(n_threads)
    if xt < 0 or nt < 0:
        return None
    arr = <cnp.ndarray>x
    nd = cnp.PyArray_NDIM(arr)
    if cnp.PyArray_SIZE(arr) == 0:
        return None
    k = trailing_dims(x, normalized_shape)
    if k < 0:
        return None
    if eps is None and rms:
        ep = FLT_EPSILON if xt == cnp.NPY_FLOAT32 else DBL_EPSILON
    elif plain_eps(eps):
        ep = eps
    else:
        return None
    if weight is not None:
        if (wt := plain_dims(weight, arr, nd - k, nd)) < 0:
            return None
        pw = cnp.PyArray_DATA(<cnp.ndarray>weight)
    if bias is not None and not rms:
        if (bt := plain_dims(bias, arr, nd - k, nd)) < 0:
            return None
        pb = cnp.PyArray_DATA(<cnp.ndarray>bias)
    for i in range(nd - k):
        nrows *= cnp.PyArray_DIM(arr, i)
    for i in range(nd - k, nd):
        d *= cnp.PyArray_DIM(arr, i)
    ot = plain_out(out, x, None, (weight, None if rms else bias))
    if ot < 0:
        return None
    # valid: nothing below can fail but for memory
    if (wt >= 0 and wt != xt) or (bt >= 0 and bt != xt):   # weight/bias in x's dtype
        conv = <char *>bn_alloc64(2 * d * cnp.PyArray_ITEMSIZE(arr))
        if conv == NULL:
            raise MemoryError("bncore: out of memory for the weights in x's dtype")
        if wt >= 0 and wt != xt:
            pw = as_dtype(pw, wt, conv, xt, d)
        if bt >= 0 and bt != xt:
            pb = as_dtype(pb, bt, conv + d * cnp.PyArray_ITEMSIZE(arr), xt, d)
    # the rows' statistics in doubles here, made arrays of x's dtype after when asked for
    pi = <double *>bn_alloc64(2 * nrows * sizeof(double))
    if pi == NULL:
        bn_free64(conv)
        raise MemoryError("bncore: out of memory for per-row statistics")
    y = <cnp.ndarray>out if ot else empty_apart(nd, cnp.PyArray_DIMS(arr), xt, arr, None)
    if not rms:
        pm = pi + nrows
    with nogil:
        if xt == cnp.NPY_FLOAT32:
            forward_rows(<const float *>cnp.PyArray_DATA(arr), <float *>cnp.PyArray_DATA(y),
                         nrows, d, d, d, ep, <const float *>pw, <const float *>pb, pm, pi,
                         rms, nt)
        else:
            forward_rows(<const double *>cnp.PyArray_DATA(arr), <double *>cnp.PyArray_DATA(y),
                         nrows, d, d, d, ep, <const double *>pw, <const double *>pb, pm, pi,
                         rms, nt)
    bn_free64(conv)
    if stats:
        invstd = stat_array(pi, nd - k, cnp.PyArray_DIMS(arr), xt)
        if not rms:
            mean = stat_array(pm, nd - k, cnp.PyArray_DIMS(arr), xt)
    bn_free64(pi)
    return y, mean, invstd


cdef inline void *as_dtype(const void *src, int st, char *dst, int dt, Py_ssize_t n) noexcept:
    """The n values at src (type st) in type dt at dst (float32 <-> float64: C's casts,
    round to nearest, as NumPy's astype): returns dst."""
    cdef Py_ssize_t i
    if dt == cnp.NPY_FLOAT32:
        for i in range(n):
            (<float *>dst)[i] = <float>(<const double *>src)[i]
    else:
        for i in range(n):
            (<double *>dst)[i] = (<const float *>src)[i]
    return dst


# ------------------------------------------------------------------ layer / RMS backward

cdef inline bint by_tiles(Py_ssize_t nrows, Py_ssize_t d, Py_ssize_t itemsize) noexcept nogil:
    """Whether a layer/RMS norm backward goes by column tiles (backward_tiles): float rows
    of 2048 values or more, fewer than 128 of them, dy and x within 4 MiB (in cache).
    There the row path's per-chunk column partials (16 bytes a column) outgrow L1 and are
    few (4 chunks of (64, 4096)). Measured against the row path, in one process: (64, 4096)
    1.12x, (96, 4096) 1.11x, (64, 2048) 1.11x, (16, 2048) 1.45x, (32, 8192) 1.41x,
    (64, 8192) 1.13x, (32, 16384) 1.92x; outside the rule (128, 2048) 0.94x, (128, 4096)
    0.85-0.93x, (256, 2048) 0.74x. Tiles read dy and x twice: double rows, twice the
    bytes, ran (32, 4096) 0.89x, (64, 4096) 0.87x, (64, 2048) 1.13x, so they stay on rows."""
    return (itemsize == 4 and d >= 2048 and nrows < 128
            and 2 * nrows * d * itemsize <= (4 << 20))


cdef inline bint row_fits_l1(Py_ssize_t d, Py_ssize_t itemsize) noexcept nogil:
    """Whether a row's dy and x take at most two thirds of one core's L1 data cache
    (bn_l1_bytes), so that the row path's second pass (dx) reads them from L1. Where they do,
    the row path beat the column tiles (by_tiles) on the Xeon guest (48 KiB L1s), in
    process: layer-norm backward (64, 4096) 1.12-1.13x on two threads, 1.14x on one, (96,
    4096) 1.15x / 1.25x, (64, 2048) 1.02x. On Zen 3 (32 KiB L1s) the tiles had won (64,
    4096) 1.12x, where this gives them the shape; its (64, 2048) (1.11x for the tiles
    then, before the aligned partial sums) now goes by rows there too, unmeasured."""
    return 3 * d * itemsize <= bn_l1_bytes


cdef void merge_chunk_sums(const double *part, Py_ssize_t nchunks, Py_ssize_t per,
                           Py_ssize_t d, double *dweight, double *dbias, Py_ssize_t j0=0,
                           Py_ssize_t j1=-1) noexcept nogil:
    """dweight (and dbias: NULL for RMS norm) from the chunks' column partials (per doubles
    a chunk: d of dweight, then d of dbias), added in chunk order: the same sums for any
    thread count. Columns j0..j1-1 only (j1 -1: to d)."""
    cdef Py_ssize_t s, j
    if j1 < 0:
        j1 = d
    for j in range(j0, j1):
        dweight[j] = 0
    for s in range(nchunks):
        for j in range(j0, j1):
            dweight[j] += part[per * s + j]
    if dbias != NULL:
        for j in range(j0, j1):
            dbias[j] = 0
        for s in range(nchunks):
            for j in range(j0, j1):
                dbias[j] += part[per * s + d + j]


cdef void merge_chunk_sums_par(const double *part, Py_ssize_t nchunks, Py_ssize_t per,
                               Py_ssize_t d, double *dweight, double *dbias,
                               int nt, int n_threads) noexcept nogil:
    """merge_chunk_sums with the columns shared by nt threads where the partials are many
    (the same bits: each column's chunk order). On the calling thread alone it read the
    other core's chunks across: 1.02x of layer-norm backward (8192, 768), 1.034x of
    (2048, 768) were that merge."""
    cdef Py_ssize_t t
    if nt < 2 or nchunks * per < SERIAL_ELEMS:
        merge_chunk_sums(part, nchunks, per, d, dweight, dbias)
        return
    for t in prange(nt, schedule='static', num_threads=team_threads(nt, n_threads)):
        merge_chunk_sums(part, nchunks, per, d, dweight, dbias, t * d // nt, (t + 1) * d // nt)


cdef int backward_tiles(const floating *dy, const floating *x, floating *dx, Py_ssize_t nrows,
                        Py_ssize_t d, Py_ssize_t ldg, Py_ssize_t ldx, Py_ssize_t ldd,
                        const double *mean, const double *invstd, const double *w,
                        double *dweight, double *dbias, bint rms, Py_ssize_t nchunks,
                        int nt) noexcept nogil:
    """Layer/RMS norm backward in two phases: each row's q, r (the threads split the rows,
    bn_row_bwd_sums), then column tiles of BN_BWD_TILE of each of nchunks chunks of rows
    (the threads split the (chunk, tile) pairs, chunk by chunk; bn_rows_bwd_tile): dx
    (bn_row_bwd's bits) and each column's dweight/dbias summed over the chunk's rows in
    order, in L1. One chunk (by_tiles): those are the sums, with nothing to merge; the row
    path's chunks (row_chunks, when its rows fit the L1 and there are more threads than
    chunks): its column partials, merged in chunk order, for the row path's bits. The same
    bits for any thread count either way. mean is NULL for RMS norm."""
    cdef Py_ssize_t ntiles = (d + BN_BWD_TILE - 1) // BN_BWD_TILE, per = 2 * d
    cdef Py_ssize_t r, t, c, j0, r0, r1
    cdef double *qr = <double *>bn_alloc64(2 * nrows * sizeof(double))
    cdef double *part = NULL
    cdef double *pw
    if nchunks > 1:
        part = <double *>bn_alloc64(nchunks * per * sizeof(double))
    if qr == NULL or (nchunks > 1 and part == NULL):
        bn_free64(qr)
        bn_free64(part)
        return -1
    with parallel(num_threads=nt):
        for r in prange(nrows, schedule='static'):
            row_bwd_sums(dy + r * ldg, x + r * ldx, d, 0.0 if rms else mean[r], invstd[r], w,
                         rms, qr + r, qr + nrows + r)
        bncore_barrier()   # every row's q, r before the tiles use them
        for t in prange(nchunks * ntiles, schedule='static'):
            c = t // ntiles
            j0 = (t - c * ntiles) * BN_BWD_TILE
            r0 = c * nrows // nchunks
            r1 = (c + 1) * nrows // nchunks
            pw = dweight + j0 if nchunks == 1 else part + per * c + j0
            rows_bwd_tile(dy + r0 * ldg + j0, x + r0 * ldx + j0, dx + r0 * ldd + j0, r1 - r0,
                          min(BN_BWD_TILE, d - j0), ldg, ldx, ldd,
                          mean + r0 if mean != NULL else mean, invstd + r0, qr + r0,
                          qr + nrows + r0, w + j0, pw,
                          NULL if dbias == NULL else
                          (dbias + j0 if nchunks == 1 else pw + d))
    if nchunks > 1:
        merge_chunk_sums(part, nchunks, per, d, dweight, dbias)
    bn_free64(qr)
    bn_free64(part)
    return 0


cdef int backward_rows(const floating *dy, const floating *x, floating *dx, Py_ssize_t nrows,
                       Py_ssize_t d, Py_ssize_t ldg, Py_ssize_t ldx, Py_ssize_t ldd,
                       const double *mean, const double *invstd, const double *w,
                       double *dweight, double *dbias, bint rms,
                       int n_threads) noexcept nogil:
    cdef Py_ssize_t nchunks = row_chunks(nrows, d), s, r, j, r1, per, ahead
    cdef Py_ssize_t ntiles = (d + BN_BWD_TILE - 1) // BN_BWD_TILE
    cdef double *part
    cdef double *p
    cdef bint stream, far, fetch
    cdef int nt
    if by_tiles(nrows, d, sizeof(floating)):
        if not row_fits_l1(d, sizeof(floating)):
            return backward_tiles(dy, x, dx, nrows, d, ldg, ldx, ldd, mean, invstd, w,
                                  dweight, dbias, rms, 1,
                                  team_threads(work_threads(n_threads, ntiles, nrows * d,
                                                            SERIAL_ELEMS), n_threads))
        # rows in L1: by rows, or with more threads than chunks by the chunks' column
        # tiles (the same bits)
        nt = work_threads(n_threads, nchunks * ntiles, nrows * d, SERIAL_ELEMS)
        if nt > nchunks:
            return backward_tiles(dy, x, dx, nrows, d, ldg, ldx, ldd, mean, invstd, w,
                                  dweight, dbias, rms, nchunks, team_threads(nt, n_threads))
    per = 2 * d if dbias != NULL else d
    ahead = rows_ahead(2 * d, sizeof(floating))
    part = <double *>bn_alloc64(nchunks * per * sizeof(double))
    stream = streams(nrows * d * <Py_ssize_t>sizeof(floating), 3, dx, dy, x)
    nt = work_threads(n_threads, nchunks, nrows * d, SERIAL_ELEMS)
    far = beyond_caches(2 * nrows * d * <Py_ssize_t>sizeof(floating))
    if part == NULL:
        return -1
    for s in prange(nchunks, schedule='static', num_threads=team_threads(nt, n_threads)):
        p = part + per * s
        for j in range(per):
            p[j] = 0
        r1 = (s + 1) * nrows // nchunks
        r = s * nrows // nchunks
        while r + 1 < r1:   # rows in pairs (row_bwd2: two calls' bits), then the odd one
            fetch = far and r + ahead + 1 < r1   # rows r + ahead, r + ahead + 1
            row_bwd2(dy + r * ldg, x + r * ldx, dx + r * ldd, ldg, ldx, ldd, d,
                     mean if rms else mean + r, invstd + r, w, p,   # mean: NULL for RMS
                     p + d if dbias != NULL else NULL, rms, stream,
                     dy + (r + ahead) * ldg if fetch else NULL,
                     x + (r + ahead) * ldx if fetch else NULL)
            r = r + 2
        while r < r1:
            fetch = far and r + ahead < r1   # row r + ahead, spread over row r's first pass
            row_bwd(dy + r * ldg, x + r * ldx, dx + r * ldd, d, 0.0 if rms else mean[r],
                    invstd[r], w, p, p + d if dbias != NULL else NULL, rms, stream,
                    dy + (r + ahead) * ldg if fetch else NULL,
                    x + (r + ahead) * ldx if fetch else NULL)
            r = r + 1
        if stream:
            bn_fence()
    merge_chunk_sums_par(part, nchunks, per, d, dweight, dbias, nt, n_threads)
    bn_free64(part)
    return 0


cdef int backward_rows_half(const uint16_t *dy, const uint16_t *x, uint16_t *dx,
                            Py_ssize_t nrows, Py_ssize_t d, Py_ssize_t ldg, Py_ssize_t ldx,
                            Py_ssize_t ldd, const double *mean, const double *invstd,
                            const double *w, double *dweight, double *dbias, bint rms,
                            int n_threads) noexcept nogil:
    """backward_rows' row path for float16 rows: each chunk's rows a few at a time (an even
    number, so that row_bwd2 pairs them as there) widened into float32 buffers of the
    thread's (in L1), row_bwd2 / row_bwd there into the chunk's column partials, dx (over
    the dy buffer) rounded back, the chunks merged in order: the float32 row path's bits,
    rounded. -1 if out of memory."""
    cdef Py_ssize_t nchunks = row_chunks(nrows, d), s, r, r1, k, nr, j, fails = 0
    cdef Py_ssize_t per = 2 * d if dbias != NULL else d
    cdef Py_ssize_t stage = max(2, HALF_STAGE // d // 2 * 2)
    cdef int nt = work_threads(n_threads, nchunks, nrows * d, SERIAL_ELEMS)
    cdef double *part = <double *>bn_alloc64(nchunks * per * sizeof(double))
    cdef double *p
    cdef float *gb = NULL   # (private in the parallel block; set for the compiler)
    cdef float *xb
    if part == NULL:
        return -1
    with parallel(num_threads=team_threads(nt, n_threads)):
        gb = <float *>bn_alloc64(2 * stage * d * sizeof(float))
        for s in prange(nchunks, schedule='static'):
            if gb == NULL:
                fails += 1
            else:
                xb = gb + stage * d
                p = part + per * s
                for j in range(per):
                    p[j] = 0
                r = s * nrows // nchunks
                r1 = (s + 1) * nrows // nchunks
                while r < r1:
                    nr = min(stage, r1 - r)
                    for k in range(nr):
                        bn_half_to_float(dy + (r + k) * ldg, gb + k * d, d)
                        bn_half_to_float(x + (r + k) * ldx, xb + k * d, d)
                    k = 0
                    while k + 1 < nr:
                        row_bwd2(gb + k * d, xb + k * d, gb + k * d, d, d, d, d,
                                 mean if rms else mean + r + k, invstd + r + k, w, p,
                                 p + d if dbias != NULL else NULL, rms, False, NULL, NULL)
                        k = k + 2
                    if k < nr:
                        row_bwd(gb + k * d, xb + k * d, gb + k * d, d,
                                0.0 if rms else mean[r + k], invstd[r + k], w, p,
                                p + d if dbias != NULL else NULL, rms, False, NULL, NULL)
                    for k in range(nr):
                        bn_float_to_half(gb + k * d, dx + (r + k) * ldd, d)
                    r = r + nr
        bn_free64(gb)
    if fails == 0:
        merge_chunk_sums_par(part, nchunks, per, d, dweight, dbias, nt, n_threads)
    bn_free64(part)
    return -1 if fails else 0


def backward_halves(Py_ssize_t nrows, Py_ssize_t d):
    """Whether backward_half takes (nrows, d) float16 rows: where backward_rows takes
    float32 rows by its row path (not by column tiles, whose sums go in another order)."""
    return not by_tiles(nrows, d, 4)


def backward_half(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t nrows,
                  Py_ssize_t d, Py_ssize_t ldg, Py_ssize_t ldx, Py_ssize_t ldd, mean,
                  cnp.ndarray invstd, cnp.ndarray weight, cnp.ndarray dweight, dbias, bint rms,
                  int n_threads):
    """backward() of float16 rows where backward_halves (backward_rows_half)."""
    cdef int rc
    cdef const double *pm = f64_or_null(mean)
    cdef double *pdb = f64_or_null(dbias)
    with nogil:
        rc = backward_rows_half(<const uint16_t *>cnp.PyArray_DATA(dy),
                                <const uint16_t *>cnp.PyArray_DATA(x),
                                <uint16_t *>cnp.PyArray_DATA(dx), nrows, d, ldg, ldx, ldd, pm,
                                <double *>cnp.PyArray_DATA(invstd),
                                <double *>cnp.PyArray_DATA(weight),
                                <double *>cnp.PyArray_DATA(dweight), pdb, rms, n_threads)
    if rc != 0:
        raise MemoryError("bncore: out of memory for float16 row buffers")


def backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t nrows, Py_ssize_t d,
             Py_ssize_t ldg, Py_ssize_t ldx, Py_ssize_t ldd, mean, cnp.ndarray invstd,
             cnp.ndarray weight, cnp.ndarray dweight, dbias, bint rms, int n_threads):
    """Layer/RMS norm backward over rows. mean (None for RMS), invstd: float64 (nrows,);
    weight: float64 (d,) (ones when the op has none); dweight, dbias (None for RMS):
    float64 (d,) outputs. dx may be dy (same rows, in place)."""
    cdef void *pg = cnp.PyArray_DATA(dy)
    cdef void *px = cnp.PyArray_DATA(x)
    cdef void *pd = cnp.PyArray_DATA(dx)
    cdef const double *pm = f64_or_null(mean)
    cdef const double *pi = <double *>cnp.PyArray_DATA(invstd)
    cdef const double *pw = <double *>cnp.PyArray_DATA(weight)
    cdef double *pdw = <double *>cnp.PyArray_DATA(dweight)
    cdef double *pdb = f64_or_null(dbias)
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
                             double *mean, double *var, bint stream) noexcept nogil:
    """One (sample, group): statistics of its contiguous cg*s values, then each channel's
    affine while the group is in cache, in address order (bn_group_affine)."""
    cdef Py_ssize_t j, j1, j0 = 0
    cdef double m, m2, invstd
    cdef double k[GROUP_TILE]
    cdef double sh[GROUP_TILE]
    run_moments(x, cg * s, &m, &m2)
    mean[0] = m
    var[0] = m2 / <double>(cg * s)
    invstd = 1.0 / sqrt(var[0] + eps)
    while j0 < cg:   # tiles of channels
        j1 = min(j0 + GROUP_TILE, cg)
        for j in range(j0, j1):
            k[j - j0] = (w[c0 + j] if w != NULL else 1.0) * invstd
            sh[j - j0] = b[c0 + j] if b != NULL else 0.0
        if floating is float:
            bn_group_affine_f32(x + j0 * s, y + j0 * s, j1 - j0, s, m, k, sh, stream)
        else:
            bn_group_affine_f64(x + j0 * s, y + j0 * s, j1 - j0, s, m, k, sh, stream)
        j0 += GROUP_TILE
    if stream:
        bn_fence()


cdef inline void channel_affine(const floating *x, floating *y, Py_ssize_t s, double m,
                                double k, double sh, bint stream) noexcept nogil:
    """One channel's s values of a group: y = (x - m) * k + sh (fenced when streamed)."""
    if stream:
        seg_affine_stream(x, y, 1, s, 0, 0, m, k, sh)
        bn_fence()
    else:
        seg_affine(x, y, 1, s, 0, 0, m, k, sh)


cdef inline Py_ssize_t block_chunks(Py_ssize_t nblocks, Py_ssize_t length,
                                    Py_ssize_t *per) noexcept nogil:
    """Parallel chunks of small blocks of length values, about SMALL_CHUNK values each:
    their number, and the blocks in each (per; the last chunk may have fewer)."""
    per[0] = max(1, SMALL_CHUNK // max(length, 1))
    return (nblocks + per[0] - 1) // per[0]


cdef inline bint small_groups(Py_ssize_t cg, Py_ssize_t s) noexcept nogil:
    """Whether NCHW (sample, group) blocks of cg channels of s values go many per call
    (bn_group_blocks): up to 128 values, or planes of 1 or 2 values (group norm of (N, C)
    features, 1x1 and 1x2 maps) up to BN_SMALL_GROUP, where a call per block and one per
    channel of it cost more than the values. Instance norm (256, 32, 3, 3) 349 -> 192 us,
    (16, 512, 7, 7) 1.47x, (2, 64, 7, 7) 1.58x; group norm (64, 1024, 1, 1) G=8 5.7x, G=1
    3.5-6.9x (float64, 4096 channels), (64, 512, 2, 2) G=4 1.39x. From 144 values with
    planes of 3 or more, the spread scale and shift cost more: 0.76-0.98x."""
    return cg * s <= 128 or (s <= 2 and cg * s <= BN_SMALL_GROUP)


cdef inline bint small_groups_bwd(Py_ssize_t s) noexcept nogil:
    """The same for the backward (bn_group_blocks_bwd), whose blocks spread nothing:
    channels of up to 256 values, any number of them (a call for each channel's sums and
    one for its dx cost more than its values). Group norm (64, 1024, 1, 1) G=8 1046 -> 164
    us (6.3x; ~90 with the group sums four blocks at a time), (32, 512, 3, 3) G=8 1.95x,
    (64, 512, 2, 2) G=4 1.87x, (32, 256, 4, 4) G=32 1.6x, (64, 256, 5, 5) G=16 1.36x, (1,
    2048, 7, 7) G=8 1.25x, (16, 512, 7, 7) G=8 1.2x, (64, 128, 10, 10) G=16 1.17x, (16,
    256, 12, 12) G=8 1.15x, (128, 64, 14, 14) G=8 1.07x, (32, 128, 16, 16) G=32 1.03x;
    instance norm (256, 32, 3, 3) 1.54x, (16, 64, 8, 8) 1.16x. Longer planes gain nothing:
    (8, 128, 28, 28) G=8 0.92x, (32, 64, 56, 56) G=32 0.91x."""
    return s <= 256


cdef int group_rows(const floating *x, floating *y, Py_ssize_t n, Py_ssize_t g,
                    Py_ssize_t cg, Py_ssize_t s, double eps, const double *w, const double *b,
                    double *mean, double *var, int n_threads) noexcept nogil:
    cdef Py_ssize_t t, nblk, nchunks, k0
    cdef bint stream = streams(n * g * cg * s * <Py_ssize_t>sizeof(floating), 2, y, x)
    cdef int nt = work_threads(n_threads, n * g, n * g * cg * s, SERIAL_ELEMS)
    cdef int team = work_threads(n_threads, n * g * run_chunks(cg * s), n * g * cg * s,
                                 SERIAL_ELEMS)
    if ((floating is double or cg * s > BN_RUN_MAX)
            and team_pays(n * g, run_chunks(cg * s), nt, team)):
        # fewer (sample, group) runs than threads (batch-1 inference, one or two groups) or
        # a last round only some threads fill: every thread on each run, its chunks then
        # its channels (same bits)
        return group_rows_team(x, y, n * g, g, cg, s, eps, w, b, mean, var,
                               team_threads(team, n_threads), stream)
    if small_groups(cg, s):   # many (sample, group) blocks per call
        nchunks = block_chunks(n * g, cg * s, &nblk)
        nt = work_threads(n_threads, nchunks, n * g * cg * s, SERIAL_ELEMS)
        for t in prange(nchunks, schedule='static', num_threads=team_threads(nt, n_threads)):
            k0 = t * nblk
            if floating is float:
                bn_group_blocks_f32(x, y, k0, min(nblk, n * g - k0), g, cg, s, eps, w, b, mean,
                                    var, stream)
            else:
                bn_group_blocks_f64(x, y, k0, min(nblk, n * g - k0), g, cg, s, eps, w, b, mean,
                                    var, stream)
            if stream:
                bn_fence()
        return 0
    for t in prange(n * g, schedule='static', num_threads=team_threads(nt, n_threads)):
        group_block(x + t * cg * s, y + t * cg * s, cg, s, (t % g) * cg, eps, w, b, &mean[t],
                    &var[t], stream)
    return 0


cdef int group_rows_team(const floating *x, floating *y, Py_ssize_t runs, Py_ssize_t g,
                         Py_ssize_t cg, Py_ssize_t s, double eps, const double *w,
                         const double *b, double *mean, double *var, int nt,
                         bint stream) noexcept nogil:
    """group_block for each run in turn with all nt threads: the run's chunk states in
    parallel (run_chunk_stats), merged in chunk order as run_moments merges them, then the
    channels' affine in parallel. -1 if out of memory."""
    cdef Py_ssize_t t, k, j, len_ = cg * s, nchunks = run_chunks(cg * s), c0
    cdef bn_moments *part = <bn_moments *>bn_alloc64(nchunks * sizeof(bn_moments))
    cdef double invstd, m2
    if part == NULL:
        return -1
    for t in range(runs):
        for k in prange(nchunks, schedule='static', num_threads=nt):
            run_chunk_stats(x + t * len_, len_, k, nchunks, &part[k])
        merged_chunks(part, nchunks, &mean[t], &m2)
        var[t] = m2 / <double>len_
        invstd = 1.0 / sqrt(var[t] + eps)
        c0 = (t % g) * cg
        for j in prange(cg, schedule='static', num_threads=nt):
            channel_affine(x + t * len_ + j * s, y + t * len_ + j * s, s, mean[t],
                           (w[c0 + j] if w != NULL else 1.0) * invstd,
                           b[c0 + j] if b != NULL else 0.0, stream)
    bn_free64(part)
    return 0


cdef inline void group_block_bwd(const floating *dy, const floating *x, floating *dx,
                                 Py_ssize_t cg, Py_ssize_t s, Py_ssize_t c0, double mean,
                                 double invstd, const double *w, double *sdy, double *sdyx,
                                 bint stream) noexcept nogil:
    """One (sample, group): per-channel sum(dy) and sum(dy*(x-mean)) (into sdy/sdyx, cg
    values), the group sums of w*dy and w*dy*xhat, then dx = k*dy + q*(x-mean) + r per
    channel while the group is in cache, in address order (the last channel first was
    slower: by 1.02x at (8, 128, 28, 28) G=8, 1.12x on one thread, and 1.07x at
    (8, 64, 56, 56) G=1)."""
    cdef Py_ssize_t j
    cdef double q, r
    for j in range(cg):
        sdy[j] = 0
        sdyx[j] = 0
        seg_bwd_sums(dy + j * s, x + j * s, 1, s, 0, 0, mean, &sdy[j], &sdyx[j])
    group_qr(sdy, sdyx, cg, s, c0, invstd, w, &q, &r)
    for j in range(cg):
        seg_bwd_dx(dy + j * s, x + j * s, dx + j * s, 1, s, 0, 0, 0, mean,
                   (w[c0 + j] if w != NULL else 1.0) * invstd, q, r, stream)
    if stream:
        bn_fence()


cdef inline void group_qr(const double *sdy, const double *sdyx, Py_ssize_t cg, Py_ssize_t s,
                          Py_ssize_t c0, double invstd, const double *w, double *q,
                          double *r) noexcept nogil:
    """dx = k*dy + q*(x - mean) + r for a group, from its channels' sums (in order)."""
    cdef Py_ssize_t j
    cdef double a = 0, bs = 0, wj, m = <double>(cg * s)
    for j in range(cg):
        wj = w[c0 + j] if w != NULL else 1.0
        a += wj * sdy[j]
        bs += wj * sdyx[j]
    q[0] = -invstd * invstd * invstd * bs / m
    r[0] = -invstd * a / m


cdef void group_rows_bwd(const floating *dy, const floating *x, floating *dx, Py_ssize_t n,
                         Py_ssize_t g, Py_ssize_t cg, Py_ssize_t s, const double *mean,
                         const double *invstd, const double *w, double *sdy, double *sdyx,
                         int n_threads) noexcept nogil:
    cdef Py_ssize_t t, off, j, c0, nblk, nchunks, k0
    cdef bint stream = streams(n * g * cg * s * <Py_ssize_t>sizeof(floating), 3, dx, dy,
                               x)
    cdef int nt = work_threads(n_threads, n * g, n * g * cg * s, SERIAL_ELEMS)
    cdef int team = work_threads(n_threads, n * g * cg, n * g * cg * s, SERIAL_ELEMS)
    cdef double q, r
    cdef bint shared = team_pays(n * g, cg, nt, team)
    if small_groups_bwd(s) and not (shared and s >= 16):
        # many (sample, group) blocks per call (planes of 16 values and more shared by the
        # threads when there are fewer blocks than threads)
        nchunks = block_chunks(n * g, cg * s, &nblk)
        nt = work_threads(n_threads, nchunks, n * g * cg * s, SERIAL_ELEMS)
        for t in prange(nchunks, schedule='static', num_threads=team_threads(nt, n_threads)):
            k0 = t * nblk
            if floating is float:
                bn_group_blocks_bwd_f32(dy, x, dx, k0, min(nblk, n * g - k0), g, cg, s, mean,
                                        invstd, w, sdy, sdyx, stream)
            else:
                bn_group_blocks_bwd_f64(dy, x, dx, k0, min(nblk, n * g - k0), g, cg, s, mean,
                                        invstd, w, sdy, sdyx, stream)
            if stream:
                bn_fence()
        return
    if shared:
        # fewer (sample, group) runs than threads: every thread on each run, a channel at
        # a time (its sums, then after the group's coefficients its dx; same bits)
        for t in range(n * g):
            off = t * cg * s
            c0 = (t % g) * cg
            for j in prange(cg, schedule='static', num_threads=team_threads(team, n_threads)):
                sdy[t * cg + j] = 0
                sdyx[t * cg + j] = 0
                seg_bwd_sums(dy + off + j * s, x + off + j * s, 1, s, 0, 0, mean[t],
                             &sdy[t * cg + j], &sdyx[t * cg + j])
            group_qr(sdy + t * cg, sdyx + t * cg, cg, s, c0, invstd[t], w, &q, &r)
            for j in prange(cg, schedule='static', num_threads=team_threads(team, n_threads)):
                seg_bwd_dx(dy + off + j * s, x + off + j * s, dx + off + j * s, 1, s, 0, 0, 0,
                           mean[t], (w[c0 + j] if w != NULL else 1.0) * invstd[t], q, r,
                           stream)
                if stream:
                    bn_fence()
        return
    for t in prange(n * g, schedule='static', num_threads=team_threads(nt, n_threads)):
        off = t * cg * s
        group_block_bwd(dy + off, x + off, dx + off, cg, s, (t % g) * cg, mean[t], invstd[t],
                        w, sdy + t * cg, sdyx + t * cg, stream)


# ------------------------------------------------------------------ channels-last samples

cdef inline void group_moments(const double *cmean, const double *cm2, const double *pivot,
                               Py_ssize_t g, Py_ssize_t cg, Py_ssize_t s, double *mean,
                               double *var) noexcept nogil:
    """Per-channel moments (each over s values; means relative to the channels' pivots)
    combined into per-group mean and biased variance. The channels have equal counts, so
    the merge of all of them has a closed form, the corrected two-pass over the channel
    means: mu = mean of the means, M2 = sum(m2) + s * (sum(d^2) - sum(d)^2 / cg),
    d = mean_j - mu (the mean corrected by sum(d) / cg). Exact as Chan's merge and without
    its division per channel, which ran as one dependent chain per group: 64 channels a
    group cost 2000 cycles (group norm of (32, 7, 7, 512), G=8, took 1.7x PyTorch's time).
    The means are taken relative to the group's first pivot P, m_j = (pivot_j - P) +
    mean_j (pivot_j - P exact for nearby values, Sterbenz), and P added last: absolute
    means of float64 data at 1e14 carry 0.016 of rounding each, which d = mean_j - mu kept
    (a group variance near 1 was 0.3% off; NCHW and this path now agree)."""
    cdef Py_ssize_t gi, j
    cdef double mu, sd, sdd, sm2, d, p
    for gi in range(g):
        p = pivot[gi * cg]
        for j in range(gi * cg, (gi + 1) * cg):
            if not isfinite(pivot[j] - p):   # pivots 1e308 apart: absolute means, as before
                p = 0
                break
        mu = 0
        for j in range(gi * cg, (gi + 1) * cg):
            mu += (pivot[j] - p) + cmean[j]
        mu = mu / <double>cg
        sd = 0
        sdd = 0
        sm2 = 0
        for j in range(gi * cg, (gi + 1) * cg):
            d = ((pivot[j] - p) + cmean[j]) - mu
            sd += d
            sdd += d * d
            sm2 += cm2[j]
        mean[gi] = p + (mu + sd / <double>cg)
        var[gi] = max(sm2 + <double>s * (sdd - sd * (sd / <double>cg)), 0.0) / <double>(cg * s)


cdef inline void group_affine(const double *gmean, const double *gvar, Py_ssize_t g,
                              Py_ssize_t cg, double eps, const double *w, const double *b,
                              double *cmean, double *scale, double *shift) noexcept nogil:
    """Per-channel mean, scale and shift of the affine, from the group statistics."""
    cdef Py_ssize_t gi, j
    cdef double invstd
    for gi in range(g):
        invstd = 1.0 / sqrt(gvar[gi] + eps)
        for j in range(gi * cg, (gi + 1) * cg):
            cmean[j] = gmean[gi]
            scale[j] = (w[j] if w != NULL else 1.0) * invstd
            shift[j] = b[j] if b != NULL else 0.0


cdef inline void sample_params(const floating *x, Py_ssize_t s, Py_ssize_t c, Py_ssize_t g,
                               double eps, const double *w, const double *b, double *mean,
                               double *var, double *buf, const uint16_t *h=NULL,
                               float *stage=NULL) noexcept nogil:
    """sample_forward's statistics and affine of each channel: buf (see sample_forward)
    then holds each channel's mean, scale and shift at buf, buf + 2 * c, buf + 3 * c. h,
    stage: a float16 sample instead of x (rows_stats_in)."""
    rows_stats_in(x, s, c, c, buf, buf + c, 1, buf + 4 * c, True, h, stage)
    group_moments(buf, buf + c, rows_pivots(buf + 4 * c, s, c), g, c // g, s, mean, var)
    group_affine(mean, var, g, c // g, eps, w, b, buf, buf + 2 * c, buf + 3 * c)


cdef inline void sample_forward(const floating *x, floating *y, Py_ssize_t s, Py_ssize_t c,
                                Py_ssize_t g, double eps, const double *w, const double *b,
                                double *mean, double *var, bint stream,
                                double *buf) noexcept nogil:
    """Group norm of one channels-last sample (s rows of c channels) on this thread, in
    the scratch buf (4 * c + rows_scratch(s, c) doubles)."""
    sample_params(x, s, c, g, eps, w, b, mean, var, buf)
    # in memory order: the sample's rows are one span for the kernel (see bn_cl_affine).
    # Last-read rows first (still in L2) measured 1.02-1.04x over rows walked forward one
    # by one, but no faster than the one span (0.995x group, 1.11x instance, paired runs)
    if stream:
        cl_affine_stream(x, c, y, c, s, c, buf, buf + 2 * c, buf + 3 * c)
        bn_fence()
    else:
        cl_affine(x, c, y, c, s, c, buf, buf + 2 * c, buf + 3 * c)


cdef int samples_team(const floating *x, floating *y, Py_ssize_t n, Py_ssize_t s,
                      Py_ssize_t c, Py_ssize_t g, double eps, const double *w,
                      const double *b, double *mean, double *var, int nt,
                      bint stream, bint cols=False) noexcept nogil:
    """Group norm of channels-last samples one after another, every thread on each:
    by rows (team_forward), or with cols by groups (cols_forward). -1 if out of memory."""
    cdef Py_ssize_t nchunks = rows_chunks(s, c), per = 2 * c + 5 * CHANNEL_BLOCK
    cdef Py_ssize_t size = (nt * nchunks * per + 5 * c if cols
                            else 2 * nchunks * per + nt * (5 * c + 2 * g))
    cdef double *part = <double *>bn_alloc64(size * sizeof(double))
    if part == NULL:
        return -1
    with parallel(num_threads=nt):
        if cols:
            cols_forward(x, y, n, s, c, g, eps, w, b, mean, var, part,
                         omp_get_thread_num(), omp_get_num_threads(), stream)
        else:
            team_forward(x, y, n, s, c, g, eps, w, b, mean, var, part,
                         omp_get_thread_num(), omp_get_num_threads(), stream)
    bn_free64(part)
    return 0


cdef void team_forward(const floating *x, floating *y, Py_ssize_t n, Py_ssize_t s,
                       Py_ssize_t c, Py_ssize_t g, double eps, const double *w,
                       const double *b, double *mean, double *var, double *part, int tid,
                       int team, bint stream) noexcept nogil:
    """Thread tid's part of samples_team by rows: a thread reduces its share of the
    sample's row chunks (rows_chunks), waits for the others (one barrier), merges all the
    chunks in chunk order by itself (the chunks, pivots and merges of rows_stats: the
    same bits as sample_forward), then normalises its own rows. Partials alternate
    between two slots by sample parity, so a thread may start the next sample while
    another still merges this one."""
    cdef Py_ssize_t nchunks = rows_chunks(s, c), per = 2 * c + 5 * CHANNEL_BLOCK
    cdef Py_ssize_t k, t, j, r0, r1
    cdef Py_ssize_t k0 = tid * nchunks // team, k1 = (tid + 1) * nchunks // team
    cdef double *mine = part + 2 * nchunks * per + tid * (5 * c + 2 * g)
    cdef double *gm = mine + 5 * c      # mine: pivot, cm, cm2, scale, shift (c); gm: g, g
    cdef double *slot
    cdef double *p
    cdef const floating *xt
    cdef bint far = beyond_caches(n * s * c * <Py_ssize_t>sizeof(floating))
    for t in range(n):
        xt = x + t * s * c
        slot = part + (t % 2) * nchunks * per
        for j in range(c):
            mine[j] = bn_pivot(<double>xt[j])
        for k in range(k0, k1):
            p = slot + k * per
            rows_chunk_stats(xt, k * s // nchunks, (k + 1) * s // nchunks, c, c,
                             p + 2 * c, mine, p, p + c, far, 0, c)
        bncore_barrier()
        merge_row_chunks(slot, per, nchunks, s, 1, c, mine, mine + c, mine + 2 * c, True)
        group_moments(mine + c, mine + 2 * c, mine, g, c // g, s, gm, gm + g)
        if tid == 0:
            for j in range(g):
                mean[t * g + j] = gm[j]
                var[t * g + j] = gm[g + j]
        group_affine(gm, gm + g, g, c // g, eps, w, b, mine + c, mine + 3 * c,
                     mine + 4 * c)
        r0 = k0 * s // nchunks
        r1 = k1 * s // nchunks
        if r1 > r0 and stream:
            cl_affine_stream(xt + r0 * c, c, y + (t * s + r0) * c, c, r1 - r0, c, mine + c,
                             mine + 3 * c, mine + 4 * c)
        elif r1 > r0:
            cl_affine(xt + r0 * c, c, y + (t * s + r0) * c, c, r1 - r0, c, mine + c,
                      mine + 3 * c, mine + 4 * c)
    if stream:
        bn_fence()


cdef inline Py_ssize_t cols_unit(Py_ssize_t c, Py_ssize_t g, Py_ssize_t itemsize) noexcept nogil:
    """Groups per share of cols_forward: one for float; for double a multiple of 16
    channels, as the double channels-last moments kernel redoes a tile of 16 channels by
    the two-pass where any of them needs it, so a share must start and end on the tiles
    of the whole row."""
    cdef Py_ssize_t cg = c // g, a = 16, m = cg
    if itemsize == 4:
        return 1
    while m:   # 16 / gcd(cg, 16)
        a, m = m, a % m
    return 16 // a


cdef void cols_forward(const floating *x, floating *y, Py_ssize_t n, Py_ssize_t s,
                       Py_ssize_t c, Py_ssize_t g, double eps, const double *w,
                       const double *b, double *mean, double *var, double *part, int tid,
                       int team, bint stream) noexcept nogil:
    """Thread tid's part of samples_team by groups, for samples too few, and of too few
    row chunks, for a thread each (a batch of one of up to a few hundred rows): each
    thread takes whole groups of every sample, its channels' moments (rows_chunk_stats
    over the sample's chunks, merged in chunk order), its groups' statistics and its
    channels' affine. A float channel's arithmetic is its own lane's whichever channels a
    call covers (and a double's, in shares of whole 16-channel tiles: cols_unit), so the
    bits are sample_forward's. Such a sample had run on one thread: group norm
    (1, 14, 14, 256) G=32 18.1 -> 12.9 us (PyTorch 17.5), G=8 19.7 -> 14.9 (14.5),
    (1, 10, 10, 512) G=16 19.4 -> 13.8 (12.3), two threads. part holds each thread's chunk
    states (nchunks of 2 * c + 5 * CHANNEL_BLOCK doubles), then the shared pivot, cm, cm2,
    scale and shift (c each), of which the thread writes its own channels."""
    cdef Py_ssize_t nchunks = rows_chunks(s, c), per = 2 * c + 5 * CHANNEL_BLOCK
    cdef Py_ssize_t cg = c // g, u = cols_unit(c, g, sizeof(floating)), k, t, j
    cdef Py_ssize_t g0 = tid * (g // u) // team * u
    cdef Py_ssize_t g1 = g if tid == team - 1 else (tid + 1) * (g // u) // team * u
    cdef Py_ssize_t c0 = g0 * cg, c1 = g1 * cg
    cdef double *mine = part + tid * nchunks * per
    cdef double *pivot = part + team * nchunks * per
    cdef double *cm = pivot + c
    cdef double *cm2 = cm + c
    cdef double *scale = cm2 + c
    cdef double *shift = scale + c
    cdef const floating *xt
    cdef bint far = beyond_caches(n * s * c * <Py_ssize_t>sizeof(floating))
    if g1 == g0:
        return
    for t in range(n):
        xt = x + t * s * c
        for j in range(c0, c1):
            pivot[j] = bn_pivot(<double>xt[j])
        for k in range(nchunks):
            rows_chunk_stats(xt, k * s // nchunks, (k + 1) * s // nchunks, c, c,
                             mine + k * per + 2 * c, pivot, mine + k * per,
                             mine + k * per + c, far, c0, c1)
        merge_row_chunks(mine + c0, per, nchunks, s, 1, c1 - c0, pivot + c0, cm + c0,
                         cm2 + c0, True, c)
        group_moments(cm + c0, cm2 + c0, pivot + c0, g1 - g0, cg, s, mean + t * g + g0,
                      var + t * g + g0)
        group_affine(mean + t * g + g0, var + t * g + g0, g1 - g0, cg, eps,
                     w + c0 if w != NULL else NULL, b + c0 if b != NULL else NULL,
                     cm + c0, scale + c0, shift + c0)
        if stream:
            cl_affine_stream(xt + c0, c, y + t * s * c + c0, c, s, c1 - c0, cm + c0,
                             scale + c0, shift + c0)
        else:
            cl_affine(xt + c0, c, y + t * s * c + c0, c, s, c1 - c0, cm + c0, scale + c0,
                      shift + c0)
    if stream:
        bn_fence()


cdef inline bint team_pays(Py_ssize_t n, Py_ssize_t nchunks, int nt, int ntt) noexcept nogil:
    """Whether every thread on each sample (ntt threads over its nchunks row chunks)
    finishes sooner than a sample per thread (nt threads): ceil(n / nt) rounds of whole
    samples against n samples of ceil(nchunks / ntt) chunks in nchunks, with a 10% margin
    for the barriers. True with fewer samples than threads (batch-1 inference) or a last
    round that only some threads fill."""
    return ntt > 1 and (10 * n * ((nchunks + ntt - 1) // ntt)
                        < 9 * nchunks * ((n + nt - 1) // nt))


cdef inline bint direct_groups(Py_ssize_t n, Py_ssize_t s, Py_ssize_t c, Py_ssize_t cg,
                               Py_ssize_t itemsize) noexcept nogil:
    """Whether channels-last group statistics come straight from each (sample, group)
    block (s rows of cg adjacent channels) rather than from per-channel moments combined
    per group: for wide groups over few rows, where the per-channel work (a finish per
    channel, 49 rows of 512 channels in G=8) cost more than the values. Groups of 16
    channels over many rows stay per channel (1024 rows: 340 us direct against 180 at
    (8, 32, 32, 128), G=8; 1.09x slower at 32, faster from 48). Float groups of 32 to 47
    channels go direct too while the whole input is at most DIRECT_BYTES: each block's
    rows then come from the caches, and its statistics overlap the previous block's affine
    (bn_cl_group_pipe_f32): (4, 14, 14, 256) G=8 33.5 -> 28.4 us (PyTorch 26.8),
    (2, 14, 14, 512) G=16 34.6 -> 29.6, (1, 28, 28, 256) G=8 37.5 -> 33.2; from memory a
    block's short rows a row apart ran slower ((8, 28, 28, 128) G=4, 3 MiB: 1.11x
    slower). A float batch of one goes direct from DIRECT_MIN_CG channels a group over up
    to DIRECT_ONE_ROWS rows (its per-channel path shares each sample's chunks out with a
    barrier): (1, 14, 14, 512) G=32 26.1 -> 21.6 us, (1, 12, 12, 768) G=48 32.4 -> 24.8,
    (1, 10, 10, 1024) G=64 35.0 -> 26.1, (1, 14, 14, 384) G=24 20.4 -> 16.2, (1, 16, 16,
    256) G=16 23.0 -> 14.0, 1.0-1.07x elsewhere (separate processes, medians of three);
    not with more samples ((2, 14, 14, 256) G=16 0.88x in process) or rows ((1, 28, 28,
    256) G=16 0.95x). From the shape alone, so for any thread count."""
    if not (cg <= DIRECT_MAX_CG and cg * s <= BN_RUN_MAX):
        return False
    if cg >= 3 * DIRECT_MIN_CG or (cg >= DIRECT_MIN_CG and s <= 64):
        return True
    if itemsize == 4 and n == 1 and cg >= DIRECT_MIN_CG and s <= DIRECT_ONE_ROWS:
        return True
    return itemsize == 4 and cg >= 2 * DIRECT_MIN_CG and n * s * c * itemsize <= DIRECT_BYTES


cdef inline void direct_stats_f64(const double *x, Py_ssize_t s, Py_ssize_t c, Py_ssize_t cg,
                                  double *mean, double *var) noexcept nogil:
    """Mean and variance of one double (sample, group) block of a channels-last sample (s
    rows of cg channels, c apart): one pass around the mean of the first row's (up to) 16
    values, the two-pass blocks where that is more than a standard deviation off."""
    cdef bn_moments st
    cdef double k = 0
    cdef Py_ssize_t j
    st.n = 0
    st.mean = 0
    st.m2 = 0
    for j in range(min(16, cg)):
        k += x[j] - x[0]
    k = x[0] + k / <double>min(16, cg)
    if not (isfinite(k) and bn_shift_moments_f64(x, s, cg, c, k, &mean[0], &st.m2)):
        plane_block_stats(x, s, cg, c, 0, plane_nblocks(s, cg), &st)
        mean[0] = st.mean + st.shift
    var[0] = st.m2 / <double>(cg * s)


cdef void direct_run(const floating *x, floating *y, Py_ssize_t s, Py_ssize_t c, Py_ssize_t g,
                     double eps, const double *w, const double *b, double *mean, double *var,
                     Py_ssize_t t0, Py_ssize_t t1, Py_ssize_t nblocks, bint stream,
                     bint fetch) noexcept nogil:
    """Group norm of the channels-last (sample, group) blocks t0..t1-1 (of nblocks) on this
    thread: each block's moments in one pass over its s rows of cg channels (c apart),
    then its affine. Float blocks go pipelined (bn_cl_group_pipe_f32: block t's
    statistics beside block t - 1's affine; group norm (32, 7, 7, 512) G=8 1.17x,
    (16, 14, 14, 1024) G=8 1.36x, (256, 7, 7, 512) G=8 1.15x, 1.05-1.26x elsewhere, in
    one process against one block after the other); double blocks one after the other."""
    cdef Py_ssize_t cg = c // g, t, j, off
    cdef double scale[DIRECT_MAX_CG]
    cdef double shift[DIRECT_MAX_CG]
    cdef double k = 0, mb = 0, m2b = 0, invstd
    cdef const floating *xa
    cdef const floating *xb
    cdef floating *ya
    for t in range(t0, t1 + 1):
        xa = NULL
        ya = NULL
        xb = NULL
        if t > t0:
            off = ((t - 1) // g) * s * c + ((t - 1) % g) * cg
            xa = x + off
            ya = y + off
        if t < t1:
            xb = x + (t // g) * s * c + (t % g) * cg
            # beyond the L2s, the next block's rows (short, a row apart: rows of 4 KiB
            # and more put each in a page of its own, where the prefetchers stop):
            # (32, 7, 7, 1024) G=16 1.25-1.32x, 0.99-1.04x at 512 channels
            if fetch and t + 1 < nblocks:
                prefetch_seg(x + ((t + 1) // g) * s * c + ((t + 1) % g) * cg, s, cg, c)
        if floating is float:
            bn_cl_group_pipe_f32(xa, ya, xb, c, s, cg, mean[t - 1] if t > t0 else 0.0, scale,
                                 shift, stream, &k, &mb, &m2b)
            if t < t1:
                mean[t] = mb + k
                var[t] = m2b / <double>(cg * s)
        else:   # the mean in a register
            if t > t0:
                bn_cl_affine_group_f64(xa, c, ya, c, s, cg, mean[t - 1], scale, shift, stream)
            if t < t1:
                direct_stats_f64(xb, s, c, cg, &mean[t], &var[t])
        if t < t1:
            invstd = 1.0 / sqrt(var[t] + eps)
            off = (t % g) * cg
            for j in range(cg):
                scale[j] = (w[off + j] if w != NULL else 1.0) * invstd
                shift[j] = b[off + j] if b != NULL else 0.0
    if stream:
        bn_fence()


cdef int samples_forward(const floating *x, floating *y, Py_ssize_t n, Py_ssize_t s,
                         Py_ssize_t c, Py_ssize_t g, double eps, const double *w,
                         const double *b, double *mean, double *var,
                         int n_threads) noexcept nogil:
    """Group norm of n channels-last samples: a sample per thread, or every thread on
    each sample when that leaves fewer threads idle (team_pays), or, with fewer samples
    than threads and too few row chunks to share, each thread its own groups of every
    sample (cols_forward), or for wide groups over few rows (direct_groups) a run of
    (sample, group) blocks per thread (direct_run). The same bits."""
    cdef Py_ssize_t t, fails = 0, nchunks = rows_chunks(s, c), cg = c // g
    cdef bint stream = streams(n * s * c * <Py_ssize_t>sizeof(floating), 2, y, x)
    cdef int nt = work_threads(n_threads, n, n * s * c, SERIAL_ELEMS)
    cdef int ntt = work_threads(n_threads, nchunks, n * s * c, SERIAL_ELEMS)
    cdef int ntc
    cdef bint fetch
    cdef int tid = 0, team = 1   # (private in the parallel blocks; set for the compiler)
    cdef double *buf = NULL
    if direct_groups(n, s, c, cg, sizeof(floating)):
        nt = work_threads(n_threads, n * g, n * s * c, SERIAL_ELEMS)
        fetch = beyond_l2(n * s * c * <Py_ssize_t>sizeof(floating), nt)
        with parallel(num_threads=team_threads(nt, n_threads)):
            tid = omp_get_thread_num()
            team = omp_get_num_threads()
            direct_run(x, y, s, c, g, eps, w, b, mean, var, tid * n * g // team,
                       (tid + 1) * n * g // team, n * g, stream, fetch)
        return 0
    if team_pays(n, nchunks, nt, ntt):
        return samples_team(x, y, n, s, c, g, eps, w, b, mean, var,
                            team_threads(ntt, n_threads), stream)
    ntc = work_threads(n_threads, g // cols_unit(c, g, sizeof(floating)), n * s * c,
                       SERIAL_ELEMS)
    if n < ntc and nchunks < ntc:
        return samples_team(x, y, n, s, c, g, eps, w, b, mean, var,
                            team_threads(ntc, n_threads), stream, True)
    with parallel(num_threads=team_threads(nt, n_threads)):   # scratch once a thread
        buf = <double *>bn_alloc64((4 * c + rows_scratch(s, c)) * sizeof(double))
        for t in prange(n, schedule='static'):
            if buf == NULL:
                fails += 1
            else:
                sample_forward(x + t * s * c, y + t * s * c, s, c, g, eps, w, b,
                               mean + t * g, var + t * g, stream, buf)
        bn_free64(buf)
    return -1 if fails else 0


cdef inline void chunk_bwd_sums(const floating *dy, const floating *x, Py_ssize_t s,
                                Py_ssize_t c, Py_ssize_t nchunks, Py_ssize_t k,
                                const double *cmean, double *sums) noexcept nogil:
    """sum(dy) and sum(dy * (x - mean)) per channel over row chunk k of a sample, from
    zero, into sums[0:c] and sums[c:2c]."""
    cdef Py_ssize_t j, r0 = k * s // nchunks, r1 = (k + 1) * s // nchunks
    for j in range(2 * c):
        sums[j] = 0
    # row blocks as for batch norm beyond the caches (at least 4 rows); the in-cache
    # blocks of 16 ran 0.92-1.03x: (32, 7, 7, 512) G=8, (32, 56, 56, 64) and
    # (16, 14, 14, 1024) G=32
    cl_bwd_sums(dy + r0 * c, c, x + r0 * c, c, r1 - r0, c, cmean, sums, sums + c, True)


cdef inline void merge_bwd_sums(const double *sums, Py_ssize_t nchunks, Py_ssize_t c,
                                double *sdy, double *sdyx) noexcept nogil:
    """The chunk sums (2c each) added in chunk order: the same for any thread count."""
    cdef Py_ssize_t j, k
    for j in range(c):
        sdy[j] = sums[j]
        sdyx[j] = sums[c + j]
    for k in range(1, nchunks):
        for j in range(c):
            sdy[j] += sums[2 * c * k + j]
            sdyx[j] += sums[2 * c * k + c + j]


cdef inline void group_dx_coefficients(const double *sdy, const double *sdyx, Py_ssize_t s,
                                       Py_ssize_t c, Py_ssize_t g, const double *invstd,
                                       const double *w, double *kv, double *qv,
                                       double *rv) noexcept nogil:
    """dx = kv * dy + qv * (x - mean) + rv per channel, from a sample's channel sums."""
    cdef Py_ssize_t cg = c // g, j, gi
    cdef double a, bs, wj, m = <double>(cg * s), q, r
    for gi in range(g):
        a = 0
        bs = 0
        for j in range(gi * cg, (gi + 1) * cg):
            wj = w[j] if w != NULL else 1.0
            a += wj * sdy[j]
            bs += wj * sdyx[j]
        q = -invstd[gi] * invstd[gi] * invstd[gi] * bs / m
        r = -invstd[gi] * a / m
        for j in range(gi * cg, (gi + 1) * cg):
            kv[j] = (w[j] if w != NULL else 1.0) * invstd[gi]
            qv[j] = q
            rv[j] = r


cdef inline void channel_means(const double *mean, Py_ssize_t c, Py_ssize_t g,
                               double *cmean) noexcept nogil:
    """Each channel's group mean, group by group: a division per channel (j // cg) took
    a tenth of the backward of a (7, 7, 512) sample."""
    cdef Py_ssize_t j, gi, cg = c // g
    for gi in range(g):
        for j in range(gi * cg, (gi + 1) * cg):
            cmean[j] = mean[gi]


cdef inline void sample_backward(const floating *dy, const floating *x, floating *dx,
                                 Py_ssize_t s, Py_ssize_t c, Py_ssize_t g, const double *mean,
                                 const double *invstd, const double *w, double *sdy,
                                 double *sdyx, bint stream, double *buf) noexcept nogil:
    """Group norm backward of one channels-last sample on this thread: per-channel sums
    by row chunk (sdy, sdyx: c values, the chunks added in order as samples_bwd_team
    does), group sums, then dx over the sample's rows; in the scratch buf
    ((4 + 2 * rows_chunks(s, c)) * c doubles)."""
    cdef Py_ssize_t nchunks = rows_chunks(s, c), k
    channel_means(mean, c, g, buf)
    for k in range(nchunks):
        chunk_bwd_sums(dy, x, s, c, nchunks, k, buf, buf + 4 * c + 2 * c * k)
    merge_bwd_sums(buf + 4 * c, nchunks, c, sdy, sdyx)
    group_dx_coefficients(sdy, sdyx, s, c, g, invstd, w, buf + c, buf + 2 * c, buf + 3 * c)
    cl_bwd_dx(dy, c, x, c, dx, c, s, c, buf, buf + c, buf + 2 * c, buf + 3 * c, stream)
    if stream:
        bn_fence()


cdef int samples_bwd_team(const floating *dy, const floating *x, floating *dx, Py_ssize_t n,
                          Py_ssize_t s, Py_ssize_t c, Py_ssize_t g, const double *mean,
                          const double *invstd, const double *w, double *sdy, double *sdyx,
                          int nt, bint stream) noexcept nogil:
    """Group norm backward of channels-last samples one after another, every thread on
    each (as samples_team): chunk sums of its own row chunks, a barrier, the chunks
    added in order by each thread (the same bits as sample_backward), then dx of its
    own rows. Chunk sums alternate between two slots by sample parity."""
    cdef double *part = <double *>bn_alloc64((4 * rows_chunks(s, c) + 6 * nt) * c
                                         * sizeof(double))
    if part == NULL:
        return -1
    with parallel(num_threads=nt):
        team_backward(dy, x, dx, n, s, c, g, mean, invstd, w, sdy, sdyx, part,
                      omp_get_thread_num(), omp_get_num_threads(), stream)
    bn_free64(part)
    return 0


cdef void team_backward(const floating *dy, const floating *x, floating *dx, Py_ssize_t n,
                        Py_ssize_t s, Py_ssize_t c, Py_ssize_t g, const double *mean,
                        const double *invstd, const double *w, double *sdy, double *sdyx,
                        double *part, int tid, int team, bint stream) noexcept nogil:
    """Thread tid's part of samples_bwd_team."""
    cdef Py_ssize_t nchunks = rows_chunks(s, c), k, t, r0, r1
    cdef Py_ssize_t k0 = tid * nchunks // team, k1 = (tid + 1) * nchunks // team
    cdef double *mine = part + (4 * nchunks + 6 * tid) * c  # means, k, q, r, sdy, sdyx (c)
    cdef double *slot
    cdef const floating *gt
    cdef const floating *xt
    for t in range(n):
        gt = dy + t * s * c
        xt = x + t * s * c
        slot = part + (t % 2) * 2 * nchunks * c
        channel_means(mean + t * g, c, g, mine)
        for k in range(k0, k1):
            chunk_bwd_sums(gt, xt, s, c, nchunks, k, mine, slot + 2 * c * k)
        bncore_barrier()
        merge_bwd_sums(slot, nchunks, c, mine + 4 * c, mine + 5 * c)
        if tid == 0:
            for k in range(c):
                sdy[t * c + k] = mine[4 * c + k]
                sdyx[t * c + k] = mine[5 * c + k]
        group_dx_coefficients(mine + 4 * c, mine + 5 * c, s, c, g, invstd + t * g, w,
                              mine + c, mine + 2 * c, mine + 3 * c)
        r0 = k0 * s // nchunks
        r1 = k1 * s // nchunks
        if r1 > r0:
            cl_bwd_dx(gt + r0 * c, c, xt + r0 * c, c, dx + (t * s + r0) * c, c, r1 - r0, c,
                      mine, mine + c, mine + 2 * c, mine + 3 * c, stream)
    if stream:
        bn_fence()


cdef int samples_backward(const floating *dy, const floating *x, floating *dx, Py_ssize_t n,
                          Py_ssize_t s, Py_ssize_t c, Py_ssize_t g, const double *mean,
                          const double *invstd, const double *w, double *sdy, double *sdyx,
                          int n_threads) noexcept nogil:
    cdef Py_ssize_t t, fails = 0, nchunks = rows_chunks(s, c)
    cdef double *buf = NULL   # (private in the parallel block; set for the compiler)
    cdef bint stream = streams(n * s * c * <Py_ssize_t>sizeof(floating), 3, dx, dy, x)
    cdef int nt = work_threads(n_threads, n, n * s * c, SERIAL_ELEMS)
    cdef int ntt = work_threads(n_threads, nchunks, n * s * c, SERIAL_ELEMS)
    if team_pays(n, nchunks, nt, ntt):
        return samples_bwd_team(dy, x, dx, n, s, c, g, mean, invstd, w, sdy, sdyx,
                                team_threads(ntt, n_threads),
                                stream)
    with parallel(num_threads=team_threads(nt, n_threads)):   # scratch once a thread
        buf = <double *>bn_alloc64((4 + 2 * nchunks) * c * sizeof(double))
        for t in prange(n, schedule='static'):
            if buf == NULL:
                fails += 1
            else:
                sample_backward(dy + t * s * c, x + t * s * c, dx + t * s * c, s, c, g,
                                mean + t * g, invstd + t * g, w, sdy + t * c, sdyx + t * c,
                                stream, buf)
        bn_free64(buf)
    return -1 if fails else 0


# ------------------------------------------------------------------ group norm entry points

cdef int group_rows_half(const uint16_t *x, uint16_t *y, Py_ssize_t n, Py_ssize_t g,
                         Py_ssize_t cg, Py_ssize_t s, double eps, const double *w,
                         const double *b, double *mean, double *var,
                         int n_threads) noexcept nogil:
    """group_rows of float16 (N, C, S) a (sample, group) block at a time: widened into a
    float32 buffer of the thread's (in its L2), group_block there (group_rows' kernel for
    blocks that are not small_groups, whose team path for few blocks gives the same bits),
    rounded back. One float16 read and write a value. -1 if out of memory."""
    cdef Py_ssize_t t, m = cg * s, fails = 0
    cdef int nt = work_threads(n_threads, n * g, n * g * m, SERIAL_ELEMS)
    cdef float *buf = NULL   # (private in the parallel block; set for the compiler)
    with parallel(num_threads=team_threads(nt, n_threads)):
        buf = <float *>bn_alloc64(m * sizeof(float))
        for t in prange(n * g, schedule='static'):
            if buf == NULL:
                fails += 1
            else:
                bn_half_to_float(x + t * m, buf, m)
                group_block(buf, buf, cg, s, (t % g) * cg, eps, w, b, &mean[t], &var[t],
                            False)
                bn_float_to_half(buf, y + t * m, m)
        bn_free64(buf)
    return -1 if fails else 0


cdef int samples_half(const uint16_t *x, uint16_t *y, const uint16_t *dy, Py_ssize_t n,
                      Py_ssize_t s, Py_ssize_t c, Py_ssize_t g, double eps, const double *w,
                      const double *b, double *mean, double *var, double *sdy, double *sdyx,
                      int n_threads) noexcept nogil:
    """Channels-last float16 group norm a sample at a time, samples_forward's and
    samples_backward's kernel for a sample on one thread (their other ways, every thread on
    a sample or a block, give the same bits). Forward: sample_forward's statistics
    (sample_params) each block of rows widened into a float32 stage of the thread's (in
    L1) just before its moments, then its float affine from x itself, still in L2, each
    value rounded: no float32 copy of the sample and no float32 result ((32, 56, 56, 64)
    G=32: 1.58 -> 1.36 ms on two threads, instance norm 1.58 -> 1.33; a float32 copy of
    the sample in L2 and a float32 result, rounded, had taken 1.60-1.72). Backward (y is
    then dx; var the invstd): dy and x widened into float32 buffers of the thread's (in its
    L2), sample_backward there into sdy, sdyx (per (n, c) sums), rounded back. -1 if out
    of memory."""
    cdef Py_ssize_t t, m = s * c, fails = 0
    cdef Py_ssize_t nd = (4 + 2 * rows_chunks(s, c)) * c if dy != NULL else (
        4 * c + rows_scratch(s, c))
    cdef Py_ssize_t nf = ((2 * m if dy != NULL else half_stage(c)) + 15) // 16 * 16  # padded
    cdef int nt = work_threads(n_threads, n, n * m, SERIAL_ELEMS)
    cdef float *buf = NULL   # (private in the parallel block; set for the compiler)
    cdef double *scratch
    cdef float *tab
    with parallel(num_threads=team_threads(nt, n_threads)):
        buf = <float *>bn_alloc64(nf * sizeof(float) + (nd + 2 * c) * sizeof(double))
        for t in prange(n, schedule='static'):
            if buf == NULL:
                fails += 1
            else:
                scratch = <double *>(buf + nf)   # the sample's doubles, 64 bytes aligned
                if dy == NULL:
                    # the statistics a block of rows widened at a time, the affine
                    # (cl_affine's float one, each value rounded) from x itself
                    sample_params(<const float *>NULL, s, c, g, eps, w, b, mean + t * g,
                                  var + t * g, scratch, x + t * m, buf)
                    tab = <float *>(scratch + nd)   # cl_affine's floats (hi, lo, k, b)
                    bn_cl_float_params(scratch, scratch + 2 * c, scratch + 3 * c, c, tab,
                                       tab + c, tab + 2 * c, tab + 3 * c)
                    bn_rows_affine_half(x + t * m, c, y + t * m, c, s, c, tab, tab + c,
                                        tab + 2 * c, tab + 3 * c)
                else:
                    bn_half_to_float(dy + t * m, buf, m)
                    bn_half_to_float(x + t * m, buf + m, m)
                    sample_backward(buf, buf + m, buf, s, c, g, mean + t * g, var + t * g, w,
                                    sdy + t * c, sdyx + t * c, False, scratch)
                    bn_float_to_half(buf, y + t * m, m)
        bn_free64(buf)
    return -1 if fails else 0


def samples_halves(Py_ssize_t s, Py_ssize_t c):
    """Whether the channels-last float16 group norm goes a sample at a time
    (samples_half): samples of up to HALF_BLOCK values."""
    return s * c <= HALF_BLOCK


def samples_forward_half(cnp.ndarray x, cnp.ndarray y, Py_ssize_t n, Py_ssize_t c,
                         Py_ssize_t s, Py_ssize_t g, double eps, weight, bias,
                         cnp.ndarray mean, cnp.ndarray var, int n_threads):
    """group_forward of float16 (N, S, C) x into y where samples_halves (samples_half)."""
    cdef int rc
    cdef const double *pw = f64_or_null(weight)
    cdef const double *pb = f64_or_null(bias)
    with nogil:
        rc = samples_half(<const uint16_t *>cnp.PyArray_DATA(x), <uint16_t *>cnp.PyArray_DATA(y),
                          NULL, n, s, c, g, eps, pw, pb, <double *>cnp.PyArray_DATA(mean),
                          <double *>cnp.PyArray_DATA(var), NULL, NULL, n_threads)
    if rc != 0:
        raise MemoryError("bncore: out of memory for float16 buffers")


def samples_backward_half(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t n,
                          Py_ssize_t c, Py_ssize_t s, Py_ssize_t g, cnp.ndarray mean,
                          cnp.ndarray invstd, weight, cnp.ndarray dweight, cnp.ndarray dbias,
                          int n_threads):
    """group_backward of float16 (N, S, C) dy, x into dx where samples_halves
    (samples_half, then group_param_grads as group_bwd_run)."""
    cdef int rc
    cdef const double *pw = f64_or_null(weight)
    cdef const double *pi = <double *>cnp.PyArray_DATA(invstd)
    cdef double *sdy = <double *>bn_alloc64(2 * n * c * sizeof(double))
    if sdy == NULL:
        raise MemoryError("bncore: out of memory for per-sample work arrays")
    with nogil:
        rc = samples_half(<const uint16_t *>cnp.PyArray_DATA(x), <uint16_t *>cnp.PyArray_DATA(dx),
                          <const uint16_t *>cnp.PyArray_DATA(dy), n, s, c, g, 0.0, pw, NULL,
                          <double *>cnp.PyArray_DATA(mean), <double *>pi, sdy, sdy + n * c,
                          n_threads)
        if rc == 0:
            rc = group_param_grads(<double *>cnp.PyArray_DATA(dweight),
                                   <double *>cnp.PyArray_DATA(dbias), sdy + n * c, sdy, pi, n,
                                   g, c // g, n * c * s, n_threads)
    bn_free64(sdy)
    if rc != 0:
        raise MemoryError("bncore: out of memory for float16 buffers")


def groups_half(Py_ssize_t cg, Py_ssize_t s):
    """Whether group_forward_half takes NCHW blocks of cg channels of s values: blocks
    that group_rows takes one by one (not small_groups) of up to HALF_BLOCK values."""
    return not small_groups(cg, s) and cg * s <= HALF_BLOCK


def group_forward_half(cnp.ndarray x, cnp.ndarray y, Py_ssize_t n, Py_ssize_t c,
                       Py_ssize_t s, Py_ssize_t g, double eps, weight, bias,
                       cnp.ndarray mean, cnp.ndarray var, int n_threads):
    """group_forward of a float16 C-contiguous (N, C, S) x into y where groups_half
    (group_rows_half)."""
    cdef int rc
    cdef const double *pw = f64_or_null(weight)
    cdef const double *pb = f64_or_null(bias)
    with nogil:
        rc = group_rows_half(<const uint16_t *>cnp.PyArray_DATA(x),
                             <uint16_t *>cnp.PyArray_DATA(y), n, g, c // g, s, eps, pw, pb,
                             <double *>cnp.PyArray_DATA(mean), <double *>cnp.PyArray_DATA(var),
                             n_threads)
    if rc != 0:
        raise MemoryError("bncore: out of memory for float16 buffers")


def group_forward(cnp.ndarray x, cnp.ndarray y, Py_ssize_t n, Py_ssize_t c, Py_ssize_t s,
                  Py_ssize_t g, bint channels_last, double eps, weight, bias,
                  cnp.ndarray mean, cnp.ndarray var, int n_threads):
    """Group norm (instance norm: g == c) of a C-contiguous (N, C, S) array, or of an
    (N, S, C) array when channels_last. weight/bias: float64 (C,) or None.
    OUT: y (same layout, may be x), mean and biased var: float64 (N*G,)."""
    cdef void *px = cnp.PyArray_DATA(x)
    cdef void *py = cnp.PyArray_DATA(y)
    cdef double *pm = <double *>cnp.PyArray_DATA(mean)
    cdef double *pv = <double *>cnp.PyArray_DATA(var)
    cdef const double *pw = f64_or_null(weight)
    cdef const double *pb = f64_or_null(bias)
    cdef bint is_f32 = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32
    cdef int rc = 0
    with nogil:
        if channels_last and is_f32:
            rc = samples_forward(<const float *>px, <float *>py, n, s, c, g, eps, pw, pb, pm,
                                 pv, n_threads)
        elif channels_last:
            rc = samples_forward(<const double *>px, <double *>py, n, s, c, g, eps, pw, pb,
                                 pm, pv, n_threads)
        elif is_f32:
            rc = group_rows(<const float *>px, <float *>py, n, g, c // g, s, eps, pw, pb, pm,
                            pv, n_threads)
        else:
            rc = group_rows(<const double *>px, <double *>py, n, g, c // g, s, eps, pw, pb,
                            pm, pv, n_threads)
    if rc != 0:
        raise MemoryError("bncore: out of memory for per-sample work arrays")


cdef int group_bwd_run(const void *pg, const void *px, void *pd, bint is_f32, bint cl,
                       Py_ssize_t n, Py_ssize_t c, Py_ssize_t s, Py_ssize_t g,
                       const double *pm, const double *pi, const double *pw,
                       double *dweight, double *dbias, int n_threads) noexcept nogil:
    """The group backward kernel on either layout, then dweight = sum over samples of
    sum(dy * (x - mean)) * invstd per channel and dbias = sum over samples of sum(dy), the
    per-(n, c) sums added in sample order. -1 if out of memory."""
    cdef Py_ssize_t j, cg = c // g
    cdef int rc = 0
    cdef double *sdy = <double *>bn_alloc64(2 * n * c * sizeof(double))
    cdef double *sdyx
    if sdy == NULL:
        return -1
    sdyx = sdy + n * c
    if cl and is_f32:
        rc = samples_backward(<const float *>pg, <const float *>px, <float *>pd, n, s, c, g,
                              pm, pi, pw, sdy, sdyx, n_threads)
    elif cl:
        rc = samples_backward(<const double *>pg, <const double *>px, <double *>pd, n, s, c,
                              g, pm, pi, pw, sdy, sdyx, n_threads)
    elif is_f32:
        group_rows_bwd(<const float *>pg, <const float *>px, <float *>pd, n, g, cg, s, pm, pi,
                       pw, sdy, sdyx, n_threads)
    else:
        group_rows_bwd(<const double *>pg, <const double *>px, <double *>pd, n, g, cg, s, pm,
                       pi, pw, sdy, sdyx, n_threads)
    if rc == 0:
        rc = group_param_grads(dweight, dbias, sdyx, sdy, pi, n, g, cg, n * c * s, n_threads)
    bn_free64(sdy)
    return rc


cdef int group_param_grads(double *dweight, double *dbias, const double *sdyx,
                           const double *sdy, const double *pi, Py_ssize_t n, Py_ssize_t g,
                           Py_ssize_t cg, Py_ssize_t work, int n_threads) noexcept nogil:
    """dweight = sum over samples of sdyx * invstd, dbias = sum over samples of sdy (per
    (n, c) sums). By PARAM_CHUNKS runs of samples (from n alone: the same bits for any
    thread count; a sample a run up to that many, so the bits of adding sample after
    sample), each run's sums on the threads that wrote its samples' (n, c) sums, the runs
    added in order after. Added serially on the calling thread, the half of those sums
    written on the other core crossed to it, and the lines went back on the next call:
    1.33x the time of a channels-last group-norm backward (128, 4, 4, 64) G=8. -1 if out
    of memory."""
    cdef Py_ssize_t k, j, t0, t1, c = g * cg, nrun = min(n, PARAM_CHUNKS)
    cdef int nt = work_threads(n_threads, nrun, work, SERIAL_ELEMS)
    cdef double *part
    for j in range(c):
        dweight[j] = 0
        dbias[j] = 0
    if nrun == 1:
        bn_group_param_grads(dweight, dbias, sdyx, sdy, pi, n, g, cg)
        return 0
    part = <double *>bn_alloc64(2 * nrun * c * sizeof(double))
    if part == NULL:
        return -1
    for k in prange(nrun, schedule='static', num_threads=team_threads(nt, n_threads)):
        t0 = k * n // nrun
        t1 = (k + 1) * n // nrun
        for j in range(2 * c):
            part[2 * c * k + j] = 0
        bn_group_param_grads(part + 2 * c * k, part + 2 * c * k + c, sdyx + t0 * c,
                             sdy + t0 * c, pi + t0 * g, t1 - t0, g, cg)
    for k in range(nrun):
        for j in range(c):
            dweight[j] += part[2 * c * k + j]
            dbias[j] += part[2 * c * k + c + j]
    bn_free64(part)
    return 0


cdef int group_rows_bwd_half(const uint16_t *dy, const uint16_t *x, uint16_t *dx,
                             Py_ssize_t n, Py_ssize_t g, Py_ssize_t cg, Py_ssize_t s,
                             const double *mean, const double *invstd, const double *w,
                             double *dweight, double *dbias, int n_threads) noexcept nogil:
    """group_bwd_run of float16 (N, C, S) a (sample, group) block at a time: its dy and x
    widened into float32 buffers of the thread's, group_block_bwd there (group_rows_bwd's
    kernel for blocks of channels over 256 values; its team path for few blocks gives the
    same bits), dx (over the dy buffer) rounded back; then group_param_grads as there. -1
    if out of memory."""
    cdef Py_ssize_t t, m = cg * s, c = g * cg, fails = 0
    cdef int nt = work_threads(n_threads, n * g, n * g * m, SERIAL_ELEMS)
    cdef float *buf = NULL   # (private in the parallel block; set for the compiler)
    cdef double *sdy = <double *>bn_alloc64(2 * n * c * sizeof(double))
    cdef double *sdyx
    if sdy == NULL:
        return -1
    sdyx = sdy + n * c
    with parallel(num_threads=team_threads(nt, n_threads)):
        buf = <float *>bn_alloc64(2 * m * sizeof(float))
        for t in prange(n * g, schedule='static'):
            if buf == NULL:
                fails += 1
            else:
                bn_half_to_float(dy + t * m, buf, m)
                bn_half_to_float(x + t * m, buf + m, m)
                group_block_bwd(buf, buf + m, buf, cg, s, (t % g) * cg, mean[t], invstd[t], w,
                                sdy + t * cg, sdyx + t * cg, False)
                bn_float_to_half(buf, dx + t * m, m)
        bn_free64(buf)
    if fails == 0:
        fails = -group_param_grads(dweight, dbias, sdyx, sdy, invstd, n, g, cg, n * c * s,
                                   n_threads)
    bn_free64(sdy)
    return -1 if fails else 0


def groups_bwd_half(Py_ssize_t cg, Py_ssize_t s):
    """Whether group_backward_half takes NCHW blocks of cg channels of s values: channels
    that group_rows_bwd takes a block at a time (not small_groups_bwd), blocks of up to
    HALF_BLOCK values."""
    return not small_groups_bwd(s) and cg * s <= HALF_BLOCK


def group_backward_half(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t n,
                        Py_ssize_t c, Py_ssize_t s, Py_ssize_t g, cnp.ndarray mean,
                        cnp.ndarray invstd, weight, cnp.ndarray dweight, cnp.ndarray dbias,
                        int n_threads):
    """group_backward of float16 C-contiguous (N, C, S) dy, x into dx where
    groups_bwd_half (group_rows_bwd_half)."""
    cdef int rc
    cdef const double *pw = f64_or_null(weight)
    with nogil:
        rc = group_rows_bwd_half(<const uint16_t *>cnp.PyArray_DATA(dy),
                                 <const uint16_t *>cnp.PyArray_DATA(x),
                                 <uint16_t *>cnp.PyArray_DATA(dx), n, g, c // g, s,
                                 <double *>cnp.PyArray_DATA(mean),
                                 <double *>cnp.PyArray_DATA(invstd), pw,
                                 <double *>cnp.PyArray_DATA(dweight),
                                 <double *>cnp.PyArray_DATA(dbias), n_threads)
    if rc != 0:
        raise MemoryError("bncore: out of memory for float16 buffers")


def group_backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t n, Py_ssize_t c,
                   Py_ssize_t s, Py_ssize_t g, bint channels_last, cnp.ndarray mean,
                   cnp.ndarray invstd, weight, cnp.ndarray dweight, cnp.ndarray dbias,
                   int n_threads):
    """Group norm backward on the layout of group_forward (dy, x, dx alike; dx may be dy).
    mean, invstd: float64 (N*G,); weight: float64 (C,) or None.
    OUT: dx; dweight, dbias: float64 (C,) (see group_bwd_run)."""
    cdef int rc
    cdef const double *pw = f64_or_null(weight)
    with nogil:
        rc = group_bwd_run(cnp.PyArray_DATA(dy), cnp.PyArray_DATA(x), cnp.PyArray_DATA(dx),
                           cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32, channels_last, n, c, s, g,
                           <double *>cnp.PyArray_DATA(mean), <double *>cnp.PyArray_DATA(invstd),
                           pw, <double *>cnp.PyArray_DATA(dweight),
                           <double *>cnp.PyArray_DATA(dbias), n_threads)
    if rc != 0:
        raise MemoryError("bncore: out of memory for per-sample work arrays")


cdef inline int group_layout(cnp.ndarray x, int ax, object num_groups, Py_ssize_t *n,
                             Py_ssize_t *c, Py_ssize_t *s, Py_ssize_t *g, bint *cl) noexcept:
    """For the group entry points: N, C, S (the values per channel of a sample), G (C for
    num_groups None: instance norm) and whether memory is (N, S, C) (else (N, C, S)) of a
    plain x with channel axis ax; -1 if ax is not 1 or the last, or num_groups is not an
    int dividing C."""
    cdef int i, nd = cnp.PyArray_NDIM(x)
    if ax != 1 and ax != nd - 1:
        return -1
    n[0] = cnp.PyArray_DIM(x, 0)
    c[0] = cnp.PyArray_DIM(x, ax)
    s[0] = 1
    for i in range(1, nd):
        if i != ax:
            s[0] *= cnp.PyArray_DIM(x, i)
    cl[0] = ax == nd - 1 and nd > 2 and s[0] > 1
    if num_groups is None:
        g[0] = c[0]
    elif type(num_groups) is int and 1 <= num_groups <= c[0] and c[0] % num_groups == 0:
        g[0] = num_groups
    else:
        return -1
    return 0


def group_common(x, num_groups, weight, bias, eps, axis, n_threads, out=None,
                 bint saved=False):
    """Group norm forward (num_groups None: instance norm, a group per channel) for the
    common call, without the Python layer's overhead, or None.

    The common call: x a plain array (bncore._fastpath), at least 2-D, not empty, with the
    channel axis (an int) 1 or last; num_groups an int dividing C; more than one value per
    group (instance norm: more than one spatial value); weight and bias None or plain (C,)
    vectors; eps a finite float >= 0; n_threads None or an int >= 1. Anything else returns
    None and the caller takes the general path (bncore._family), which also raises every
    error. Same kernels and bits as that path. Returns (y, mean, biased var), the latter
    float64 (N, G); with ``saved``, (y, mean, invstd) as the _forward functions return
    them (float32 for float32 x), made here: in NumPy, 1 / sqrt(var + eps) and the two
    casts cost a (2, 4, 3, 3) call 2.8 of its 3.8 us.
    """
    cdef cnp.ndarray arr, y, mean, var, sm, si
    cdef Py_ssize_t i
    cdef double *pm
    cdef double *pv
    cdef int xt, wt = -1, bt = -1, nd, ax, nt, rc = 0, ot
    cdef Py_ssize_t n, c, g, s = 1
    cdef cnp.npy_intp dims[2]
    cdef bint cl, is_f32
    cdef double ep
    cdef double *buf
    cdef double *pw = NULL
    cdef double *pb = NULL
    ax = plain_channel_axis(x, axis, n_threads, &nt)
    if ax < 0 or not plain_eps(eps):
        return None
    arr = <cnp.ndarray>x
    xt = cnp.PyArray_TYPE(arr)
    nd = cnp.PyArray_NDIM(arr)
    if group_layout(arr, ax, num_groups, &n, &c, &s, &g, &cl) < 0 or (c // g) * s == 1:
        return None
    if weight is not None and (wt := plain_vector(weight, c)) < 0:
        return None
    if bias is not None and (bt := plain_vector(bias, c)) < 0:
        return None
    ot = plain_out(out, x, None, (weight, bias))
    if ot < 0:
        return None
    # valid: nothing below can fail but for memory
    ep = eps
    y = <cnp.ndarray>out if ot else empty_apart(nd, cnp.PyArray_DIMS(arr), xt, arr, None)
    dims[0] = n
    dims[1] = g
    mean = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT64, 0)
    var = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT64, 0)
    buf = <double *>bn_alloc64(2 * c * sizeof(double))
    if buf == NULL:
        raise MemoryError("bncore: out of memory for per-channel work arrays")
    if wt >= 0:
        pw = buf
        as_doubles(weight, wt, pw, c)
    if bt >= 0:
        pb = buf + c
        as_doubles(bias, bt, pb, c)
    is_f32 = xt == cnp.NPY_FLOAT32
    with nogil:
        if cl and is_f32:
            rc = samples_forward(<const float *>cnp.PyArray_DATA(arr),
                                 <float *>cnp.PyArray_DATA(y), n, s, c, g, ep, pw, pb,
                                 <double *>cnp.PyArray_DATA(mean),
                                 <double *>cnp.PyArray_DATA(var), nt)
        elif cl:
            rc = samples_forward(<const double *>cnp.PyArray_DATA(arr),
                                 <double *>cnp.PyArray_DATA(y), n, s, c, g, ep, pw, pb,
                                 <double *>cnp.PyArray_DATA(mean),
                                 <double *>cnp.PyArray_DATA(var), nt)
        elif is_f32:
            rc = group_rows(<const float *>cnp.PyArray_DATA(arr), <float *>cnp.PyArray_DATA(y),
                            n, g, c // g, s, ep, pw, pb, <double *>cnp.PyArray_DATA(mean),
                            <double *>cnp.PyArray_DATA(var), nt)
        else:
            rc = group_rows(<const double *>cnp.PyArray_DATA(arr),
                            <double *>cnp.PyArray_DATA(y), n, g, c // g, s, ep, pw, pb,
                            <double *>cnp.PyArray_DATA(mean), <double *>cnp.PyArray_DATA(var),
                            nt)
    bn_free64(buf)
    if rc != 0:
        raise MemoryError("bncore: out of memory for per-sample work arrays")
    if not saved:
        return y, mean, var
    # the _forward functions' statistics: NumPy's 1.0 / np.sqrt(var + eps), then the cast
    # (the same IEEE operations: the same bits as bncore._api.invstd_of and astype)
    sm = cnp.PyArray_EMPTY(2, dims, xt, 0)
    si = cnp.PyArray_EMPTY(2, dims, xt, 0)
    pm = <double *>cnp.PyArray_DATA(mean)
    pv = <double *>cnp.PyArray_DATA(var)
    if is_f32:
        for i in range(n * g):
            (<float *>cnp.PyArray_DATA(sm))[i] = <float>pm[i]
            (<float *>cnp.PyArray_DATA(si))[i] = <float>(1.0 / sqrt(pv[i] + ep))
    else:
        for i in range(n * g):
            (<double *>cnp.PyArray_DATA(sm))[i] = pm[i]
            (<double *>cnp.PyArray_DATA(si))[i] = 1.0 / sqrt(pv[i] + ep)
    return y, sm, si


def backward_common(dy, x, mean, invstd, normalized_shape, weight, n_threads, bint rms,
                    out=None):
    """Layer/RMS norm backward for the common call, without the Python layer's overhead, or
    None: x, normalized_shape and n_threads as forward_common accepts them, dy a plain array
    of x's dtype and shape, mean (layer norm) and invstd plain arrays of x's leading dims,
    weight None or a plain array of the trailing dims. Anything else returns None and the
    general path (bncore._family) takes the call. Returns (dx, dweight, dbias or None),
    the latter of x's trailing dims and dtype."""
    cdef cnp.ndarray arr, dx
    cdef object dbias = None
    cdef int xt, nd, k, nt, mt = -1, st, wt = -1, rc, ot
    cdef Py_ssize_t nrows = 1, d = 1, i
    cdef double *buf
    cdef double *pdw
    cdef double *pm = NULL
    xt = plain_type(x)
    nt = plain_threads(n_threads)
    if xt < 0 or nt < 0 or cnp.PyArray_SIZE(<cnp.ndarray>x) == 0 or not plain_like(dy, x):
        return None
    arr = <cnp.ndarray>x
    nd = cnp.PyArray_NDIM(arr)
    k = trailing_dims(x, normalized_shape)
    if k < 0:
        return None
    st = plain_dims(invstd, x, 0, nd - k)
    if not rms:
        mt = plain_dims(mean, x, 0, nd - k)
    if st < 0 or (not rms and mt < 0):
        return None
    if weight is not None and (wt := plain_dims(weight, x, nd - k, nd)) < 0:
        return None
    for i in range(nd - k):
        nrows *= cnp.PyArray_DIM(arr, i)
    for i in range(nd - k, nd):
        d *= cnp.PyArray_DIM(arr, i)
    ot = plain_out(out, x, dy, (mean, invstd, weight))
    if ot < 0:
        return None
    # valid: nothing below can fail but for memory
    dx = <cnp.ndarray>out if ot else empty_apart(nd, cnp.PyArray_DIMS(arr), xt, arr, dy)
    # the kernels' dweight and dbias in buf (after invstd, mean and w), made arrays of x's
    # trailing dims and dtype after
    buf = <double *>bn_alloc64((2 * nrows + 3 * d) * sizeof(double))
    if buf == NULL:
        raise MemoryError("bncore: out of memory for per-row work arrays")
    pdw = buf + 2 * nrows + d
    as_doubles(invstd, st, buf, nrows)
    if not rms:
        pm = buf + nrows
        as_doubles(mean, mt, pm, nrows)
    if wt >= 0:
        as_doubles(weight, wt, buf + 2 * nrows, d)
    else:
        for i in range(d):
            buf[2 * nrows + i] = 1.0
    with nogil:
        if xt == cnp.NPY_FLOAT32:
            rc = backward_rows(<const float *>cnp.PyArray_DATA(<cnp.ndarray>dy),
                               <const float *>cnp.PyArray_DATA(arr),
                               <float *>cnp.PyArray_DATA(dx), nrows, d, d, d, d, pm, buf,
                               buf + 2 * nrows, pdw, NULL if rms else pdw + d, rms, nt)
        else:
            rc = backward_rows(<const double *>cnp.PyArray_DATA(<cnp.ndarray>dy),
                               <const double *>cnp.PyArray_DATA(arr),
                               <double *>cnp.PyArray_DATA(dx), nrows, d, d, d, d, pm, buf,
                               buf + 2 * nrows, pdw, NULL if rms else pdw + d, rms, nt)
    if rc != 0:
        bn_free64(buf)
        raise MemoryError("bncore: out of memory for per-chunk partial sums")
    dweight = stat_array(pdw, k, cnp.PyArray_DIMS(arr) + nd - k, xt)
    if not rms:
        dbias = stat_array(pdw + d, k, cnp.PyArray_DIMS(arr) + nd - k, xt)
    bn_free64(buf)
    return dx, dweight, dbias


def group_backward_common(dy, x, mean, invstd, num_groups, weight, axis, n_threads,
                          out=None):
    """Group norm backward (num_groups None: instance norm) for the common call, or None:
    x, num_groups, axis and n_threads as group_common accepts them (the value-count rule
    aside), dy a plain array of x's dtype and shape, mean and invstd plain (N, G) arrays,
    weight None or a plain (C,) vector. Anything else returns None and the general path
    (bncore._family) takes the call. Returns (dx, dweight, dbias), the latter (C,) of x's
    dtype."""
    cdef cnp.ndarray arr, dx
    cdef int xt, nd, ax, nt, mt, st, wt = -1, rc = 0, ot
    cdef Py_ssize_t n, c, g, s = 1
    cdef cnp.npy_intp dim
    cdef bint cl
    cdef double *buf
    cdef double *pw = NULL
    ax = plain_channel_axis(x, axis, n_threads, &nt)
    if ax < 0 or not plain_like(dy, x):
        return None
    arr = <cnp.ndarray>x
    xt = cnp.PyArray_TYPE(arr)
    nd = cnp.PyArray_NDIM(arr)
    if group_layout(arr, ax, num_groups, &n, &c, &s, &g, &cl) < 0:
        return None
    if weight is not None and (wt := plain_vector(weight, c)) < 0:
        return None
    mt = plain_type(mean)
    st = plain_type(invstd)
    if mt < 0 or st < 0:
        return None
    for a in (mean, invstd):
        if (cnp.PyArray_NDIM(<cnp.ndarray>a) != 2 or cnp.PyArray_DIM(<cnp.ndarray>a, 0) != n
                or cnp.PyArray_DIM(<cnp.ndarray>a, 1) != g):
            return None
    ot = plain_out(out, x, dy, (mean, invstd, weight))
    if ot < 0:
        return None
    # valid: nothing below can fail but for memory
    dx = <cnp.ndarray>out if ot else empty_apart(nd, cnp.PyArray_DIMS(arr), xt, arr, dy)
    # the kernels' dweight and dbias in buf, made arrays of x's dtype after
    buf = <double *>bn_alloc64((2 * n * g + 3 * c) * sizeof(double))
    if buf == NULL:
        raise MemoryError("bncore: out of memory for per-sample work arrays")
    as_doubles(mean, mt, buf, n * g)
    as_doubles(invstd, st, buf + n * g, n * g)
    if wt >= 0:
        pw = buf + 2 * n * g
        as_doubles(weight, wt, pw, c)
    with nogil:
        rc = group_bwd_run(cnp.PyArray_DATA(<cnp.ndarray>dy), cnp.PyArray_DATA(arr),
                           cnp.PyArray_DATA(dx), xt == cnp.NPY_FLOAT32, cl, n, c, s, g, buf,
                           buf + n * g, pw, buf + 2 * n * g + c, buf + 2 * n * g + 2 * c, nt)
    if rc != 0:
        bn_free64(buf)
        raise MemoryError("bncore: out of memory for per-sample work arrays")
    dim = c
    dweight = stat_array(buf + 2 * n * g + c, 1, &dim, xt)
    dbias = stat_array(buf + 2 * n * g + 2 * c, 1, &dim, xt)
    bn_free64(buf)
    return dx, dweight, dbias


include "_thresholds.pxi"

