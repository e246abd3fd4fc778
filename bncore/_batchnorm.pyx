# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Batch-norm forward (training, eval) and backward kernels.

Design notes
------------
Every call arrives as a canonical view (see bncore._kernels):

- planes (outer, C, inner), inner contiguous: one channel is ``outer`` planes. In training
  the channel's statistics are computed and the channel is normalised right away, while
  its values are still in L2 (a channel of (32, 64, 56, 56) float32 is 400 KB), so x is
  read from memory once and y written once: the cost of a copy. PyTorch 2.13 reads x
  three times. Backward does the same per channel: sum(dy), sum(dy*(x-mean)), then dx.
  Channels are the parallel unit, so each result comes from one thread: bitwise
  identical for any thread count. A few huge channels (plane_chunks > 1) are reduced in
  chunks instead and normalised in a second pass. A float channel of at most BN_RUN_MAX
  values (small batches, where the cost is per call) takes one double pass around a float
  shift instead of the block statistics (bn_run_moments: the batch statistics exact to
  far below a float32 ulp, and to a few float64 ulps for typical data); a larger float
  channel takes that one pass per statistics block (each block around its own shift,
  the blocks merged with Chan's formula: the same bound per block), so memory is read
  once and each value converted once. moments() and Moments keep the two-pass blocks,
  whose float64 results are exact for any data.
- rows (R, C), channels contiguous (channels-last): statistics over row chunks with
  per-chunk partial states merged in chunk order, then one normalising pass; loops run
  across channels so they vectorise.

y = (x - mean) * (weight * invstd) + bias subtracts first: full precision at large offsets,
and a constant channel (mean == x, exactly) gives exactly bias. double input is computed
in double; float input in float, 8 lanes, with the mean split as hi + lo, by the same
expression in both layouts (planes and rows give the same bits).

# IN: x/dy (read only), mean/var/invstd when given; OUT: y/dx, statistics, dweight/dbias.
"""
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.math cimport sqrt
from libc.stdint cimport uint16_t
from libc.string cimport memcpy

from bncore._kernels cimport (
    bn_affine_half, bn_alloc64, bn_free64, bn_float_to_half, bn_half_fused, bn_half_to_float,
    bn_rows_affine_half, bn_seg_bwd_dx_h16, bn_seg_bwd_sums_h16, bn_cl_bwd_dx_h16,
    bn_cl_bwd_sums_h16,
    BN_RUN_MAX, SERIAL_ELEMS, beyond_caches, beyond_l2, bn_fence, bn_moments, plane_fetch,
    prefetch_seg,
    bn_run_moments_f32, bn_run_moments_pf_f32, cl_affine,
    cl_affine_stream, cl_bwd_dx, cl_bwd_sums, plane_block_stats, plane_chunks, plane_nblocks,
    BN_SHORT_REUSE, planes_affine, planes_affine_rect, planes_stats, short_planes, rows_chunks,
    rows_stats, sample_chunks, seg_affine,
    CHANNEL_BLOCK, bn_pivot, channel_blocks, merge_row_chunks, rows_chunk_stats, rows_chunk_per,
    half_stage, rows_chunk_state, rows_pivots, rows_scratch,
    BN_FUSED_MAX, bn_seg_bwd_fused_f32,
    seg_affine_pf,
    seg_affine_stream,
    seg_bwd_dx, seg_bwd_dx_many, seg_bwd_dx_pf, seg_bwd_sums, seg_bwd_sums_many, streams,
)
from bncore._fastpath cimport (
    _overlap, bn_copy_f64, bn_narrow_f64, bn_widen_f32, plain_channel_axis, plain_eps,
    plain_like, plain_out, plain_vector,
)
from bncore._openmp cimport team_threads, work_threads
from bncore._outputs cimport empty_apart

cnp.import_array()


cdef enum:
    AFFINE_CHUNK = 16384   # values per parallel chunk of the elementwise (eval) pass
    SMALL_CHANNEL = 4096   # values: channels up to this go through in groups (L2-sized)
    HALF_CHANNEL = 1048576  # float16 training: channels up to this staged whole (4 MiB)
    HALF_ROWS_PIECE = 16384  # float16 rows backward: values a staged piece (64 KiB a stage)
    CHANNEL_GROUP = 8      # small channels per group
    CL_TILE = 128          # channels a thread takes at least, when few rows split by channel
    CHANNEL_COST = 64      # values a small channel's fixed cost is worth
    FETCH_PLANE = 8192     # bytes: planes at least this long get the next channel prefetched
    STREAM_PLANE = 512     # bytes: shorter planes are not streamed in the memory-order affine
    SAMPLE_PLANE = 256     # bytes: a backward beyond the caches over shorter planes goes by sample
    # "beyond the caches" for that choice: a fixed size, not the machine's streaming
    # threshold (bn_stream_bwd), since the two orders of the sums give different float64
    # bits: every machine, and any thresholds set, must give the same
    BY_SAMPLE_BYTES = 33554432


cdef inline double *f64_or_null(object a):
    return NULL if a is None else <double *>cnp.PyArray_DATA(<cnp.ndarray>a)


# ------------------------------------------------------------------ per-channel io

ctypedef struct chan_io:
    # The common call's per-channel arrays, converted channel range by channel range by
    # the thread that works on those channels (io_in, io_out). Converted on the calling
    # thread before the parallel region instead, each call's work lines were written on one
    # core and read on the other, and the results' the other way: that traffic was 1.23x
    # the time of a batch-norm backward (1, 512, 7, 7), 1.27x at (1, 2048, 7, 7).
    const void *src[4]    # inputs as the user gave them (NULL: none), float32 or float64
    int st[4]             # (their types)
    double *dst[4]        # the kernels' double work arrays for them
    const double *res[2]  # the kernels' double results ...
    void *out[2]          # ... into these arrays of type ot (NULL: none)
    int ot
    char *run[2]          # running mean and var (type rt; NULL: none): run = (1 - momentum)
    int rt[2]             # * run + momentum * fac * rsrc
    const double *rsrc[2]
    double fac[2]
    double momentum


cdef inline void io_clear(chan_io *io) noexcept nogil:
    cdef int k
    for k in range(4):
        io.src[k] = NULL
    for k in range(2):
        io.out[k] = NULL
        io.run[k] = NULL


cdef inline bint running_shares(object r, tuple others) noexcept:
    """Whether the plain vector r (or None) shares memory with any of the plain arrays
    ``others`` (None skipped)."""
    if r is None:
        return False
    for a in others:
        if a is not None and _overlap(<char *>cnp.PyArray_DATA(<cnp.ndarray>r),
                                      cnp.PyArray_NBYTES(<cnp.ndarray>r), a):
            return True
    return False


cdef inline void io_src(chan_io *io, int k, object a, int t, double *dst) noexcept:
    """Input k: the plain vector a (type t), converted into dst."""
    io.src[k] = cnp.PyArray_DATA(<cnp.ndarray>a)
    io.st[k] = t
    io.dst[k] = dst


cdef inline void io_result(chan_io *io, int k, const double *res, cnp.ndarray out,
                           int t) noexcept:
    """Result k: res converted into out (type t, as every result)."""
    io.res[k] = res
    io.out[k] = cnp.PyArray_DATA(out)
    io.ot = t


cdef inline void io_running(chan_io *io, int k, object r, int t, const double *src,
                           double fac) noexcept:
    """Running statistic k: the plain vector r (type t), updated from the doubles src with
    factor fac (io.momentum set by the caller)."""
    io.run[k] = <char *>cnp.PyArray_DATA(<cnp.ndarray>r)
    io.rt[k] = t
    io.rsrc[k] = src
    io.fac[k] = fac


cdef inline void io_in(const chan_io *io, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """Channels c0..c1-1 of the inputs into the work arrays (io NULL: nothing to do)."""
    cdef Py_ssize_t c
    cdef int k
    if io == NULL:
        return
    for k in range(4):
        if io.src[k] == NULL:
            pass
        elif io.st[k] != cnp.NPY_FLOAT32:
            bn_copy_f64(<const double *>io.src[k] + c0, io.dst[k] + c0, c1 - c0)
        elif c1 - c0 <= CHANNEL_GROUP:   # a group's few: no call
            for c in range(c0, c1):
                io.dst[k][c] = (<const float *>io.src[k])[c]
        else:
            bn_widen_f32(<const float *>io.src[k] + c0, io.dst[k] + c0, c1 - c0)


cdef inline void io_out(const chan_io *io, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """Channels c0..c1-1 of the results into the result arrays, and of the running
    statistics' update (io NULL: nothing to do)."""
    cdef Py_ssize_t c
    cdef int k
    if io == NULL:
        return
    for k in range(2):
        if io.out[k] == NULL:
            pass
        elif io.ot != cnp.NPY_FLOAT32:
            memcpy(<double *>io.out[k] + c0, io.res[k] + c0, (c1 - c0) * sizeof(double))
        elif c1 - c0 <= CHANNEL_GROUP:
            for c in range(c0, c1):
                (<float *>io.out[k])[c] = <float>io.res[k][c]
        else:
            bn_narrow_f64(io.res[k] + c0, <float *>io.out[k] + c0, c1 - c0)
    for k in range(2):
        if io.run[k] != NULL:
            running_update(io.run[k] + c0 * (4 if io.rt[k] == cnp.NPY_FLOAT32 else 8),
                           4 if io.rt[k] == cnp.NPY_FLOAT32 else 8,
                           io.rt[k] == cnp.NPY_FLOAT32, c1 - c0, io.rsrc[k] + c0,
                           io.momentum, io.fac[k])


# ------------------------------------------------------------------ forward

cdef int forward_planes(const floating *x, floating *y, Py_ssize_t outer, Py_ssize_t nch,
                        Py_ssize_t inner, Py_ssize_t so, Py_ssize_t sc, Py_ssize_t yso,
                        Py_ssize_t ysc, double *mean, double *var, double *invstd,
                        const double *w, const double *b, bint training, double eps,
                        int n_threads, const chan_io *io) noexcept nogil:
    """The batch-norm forward of planes. io: see chan_io (NULL: the per-channel arrays are
    doubles already, and mean/invstd the results)."""
    cdef Py_ssize_t c, t, s, t0, t1, nchunks, nb = plane_nblocks(outer, inner)
    cdef double m = <double>outer * <double>inner
    # a channel's statistics then its affine while it is in L2/L3 whenever the channels
    # are the parallel unit: it also beat walking many short planes sample by sample
    # (planes_by_sample, which read x twice), e.g. (256,256,14,14) 1.26x (1.06x with a
    # fresh output), (1024,256,7,7) 1.28x, (256,512,7,7) 1.37x, (256,64,7,7) 1.8x
    cdef bint fused = training and plane_chunks(outer, nch, inner) == 1
    cdef bint stream = streams(outer * nch * inner * <Py_ssize_t>sizeof(floating), 2, y, x)
    cdef bint fetch = stream and inner * <Py_ssize_t>sizeof(floating) >= FETCH_PLANE
    cdef int nt = work_threads(n_threads, nch, outer * nch * inner, SERIAL_ELEMS)
    # a batch of one in eval: the affine's chunks are runs of channels, each converts its own
    # (and computes their invstd): eval (1, 2048, 7, 7) 20.2 -> 12.4 us on two threads
    cdef bint own = io != NULL and not training and outer == 1
    if not own:
        io_in(io, 0, nch)
    if training and not fused:
        if planes_stats(x, outer, nch, inner, so, sc, mean, var, n_threads, True) != 0:
            return -1
        for c in range(nch):
            var[c] = var[c] / m
    if not fused:
        if not own:
            for c in range(nch):
                invstd[c] = 1.0 / sqrt(var[c] + eps)
        # (n, c) planes in memory order, in chunks of about AFFINE_CHUNK values (one fence
        # per chunk: a fence per small plane would wait on memory every few hundred bytes;
        # and enough chunks to share out evenly: 3 chunks on 2 threads ran 2:1). Planes
        # under STREAM_PLANE bytes are not streamed: most of their lines are partial, and
        # the ordinary store of each partial line first reads it from memory, scattered
        # among the streamed lines where the prefetcher does not follow: eval (64,2048,7,7)
        # 1.6-1.9x faster not streamed, (64,1024,10,10) 1.17x; (64,1024,12,12) 0.85x.
        # Planes of adjacent channels are streamed a sample at a time, as one run whose
        # lines are full but at its ends (bn_planes_affine): (64,2048,7,7) 1.02-1.08x
        # streamed so, (256,256,14,14) 1.12-1.24x
        if (inner * <Py_ssize_t>sizeof(floating) < STREAM_PLANE
                and not (sc == inner and ysc == inner and inner >= 8)):
            stream = False
        nchunks = min(outer * nch, max(1, outer * nch * inner // AFFINE_CHUNK))
        nt = work_threads(n_threads, nchunks, outer * nch * inner, SERIAL_ELEMS)
        for s in prange(nchunks, schedule='static', num_threads=team_threads(nt, n_threads)):
            t = s * (outer * nch) // nchunks
            t1 = (s + 1) * (outer * nch) // nchunks
            if own:
                io_in(io, t, t1)
                for c in range(t, t1):
                    invstd[c] = 1.0 / sqrt(var[c] + eps)
            planes_affine(x, y, t, t1 - t, nch, inner, so, sc, yso, ysc, mean, invstd, w, b,
                          stream)
            if stream:
                bn_fence()
            if own:
                io_out(io, t, t1)
        if not own:
            io_out(io, 0, nch)
        return 0
    cdef Py_ssize_t ng
    if outer * inner > SMALL_CHANNEL:
        # each thread its run of channels; when the data is far larger than the caches, a
        # channel's affine (writing memory) prefetches the thread's next channel (reading
        # memory): one phase after the other, each left half the bus idle. (32,64,56,56):
        # 1.05x, (8,64,112,112) 1.13x; its backward, which does the same, 1.03-1.14x. Not
        # for planes under 8 KiB, whose scraps the prefetch only scattered: (256,256,14,14)
        # backward 0.84-0.92x, (32,128,28,28) 0.97x
        for t in prange(nt, schedule='static', num_threads=team_threads(nt, n_threads)):
            t0 = t * nch // nt
            t1 = (t + 1) * nch // nt
            io_in(io, t0, t1)
            for c in range(t0, t1):
                forward_channel(x + c * sc, y + c * ysc, outer, inner, so, yso, nb, &mean[c],
                                &var[c], &invstd[c], w[c] if w != NULL else 1.0,
                                b[c] if b != NULL else 0.0, eps, stream,
                                x + (c + 1) * sc if fetch and c + 1 < t1 else NULL)
            io_out(io, t0, t1)
        return 0
    nt = work_threads(n_threads, nch, outer * nch * inner + nch * CHANNEL_COST, SERIAL_ELEMS)
    ng = channel_groups(nch, nt)
    fetch = beyond_l2(outer * nch * inner * <Py_ssize_t>sizeof(floating), nt)
    for t in prange(ng, schedule='static', num_threads=team_threads(nt, n_threads)):
        forward_group(x, y, t * nch // ng, (t + 1) * nch // ng, outer, inner, so, sc, yso,
                      ysc, nb, mean, var, invstd, w, b, eps, stream,
                      (t + 2) * nch // ng if fetch and t + 1 < ng else 0, nch, io)
    return 0


cdef inline Py_ssize_t channel_groups(Py_ssize_t nch, int nt) noexcept nogil:
    """Groups of at most CHANNEL_GROUP small channels, a multiple of nt of them (even
    shares of the threads' work; a channel's result does not depend on its group)."""
    cdef Py_ssize_t per = nt * CHANNEL_GROUP
    return min(nch, nt * ((nch + per - 1) // per))


cdef inline void forward_group(const floating *x, floating *y, Py_ssize_t c0, Py_ssize_t c1,
                               Py_ssize_t outer, Py_ssize_t inner, Py_ssize_t so,
                               Py_ssize_t sc, Py_ssize_t yso, Py_ssize_t ysc, Py_ssize_t nb,
                               double *mean, double *var, double *invstd, const double *w,
                               const double *b, double eps, bint stream,
                               Py_ssize_t n1, Py_ssize_t nch, const chan_io *io) noexcept nogil:
    """forward_channel for small channels c0..c1-1 (together in L2), phase by phase: each
    channel's statistics, then every variance and invstd (independent divisions and square
    roots that overlap, where one channel at a time waited ~50 cycles on its own before
    its affine could start: at 49 values a channel that was half the time), then each
    affine. The same bits as forward_channel. With n1 > c1, channels c1..n1-1 (the next
    group) are prefetched meanwhile: x beyond the L2s, short planes scattered one per
    sample wait on the L3 or memory one line at a time, which the hardware prefetchers do
    not follow across pages ((64, 512, 7, 7) 1.10-1.13x, (128, 512, 5, 5) 1.11x, on a
    Xeon with 2 MiB L2s; in the L2s it cost 4-8%: (32, 512, 7, 7) 0.96x). Since the
    streamed runs below, in session 24, the prefetch measured within noise of none
    (0.98-1.02x; T1 and T2 hints alike) on that machine, where these inputs stay in its
    480 MiB L3; it stays for inputs from memory. Float channels of up to BN_RUN_MAX values
    with adjacent planes (a sample's planes of the next group one run) spread that fetch
    over the channel's statistics (bn_run_moments_pf, the same bits), where the burst
    before each channel's statistics waited on the fill buffers (an eighth of the time
    of (64, 512, 7, 7) in the prefetch loop, perf): (64, 512, 7, 7) 1.11-1.12x,
    (64, 1024, 7, 7) 1.13x, (128, 512, 5, 5) 1.05x, (64, 256, 8, 8) 1.04x,
    (128, 512, 4, 4) 0.99-1.01x. Where
    each sample's planes are adjacent channels (any C-contiguous NCHW array), the group's
    affine streams each sample's planes as one run, whose lines are full but at its two
    ends, so the output needs no read-for-ownership (bn_planes_affine, the same bits):
    (64, 512, 7, 7) 1.19x, (64, 256, 8, 8) 1.39x, (128, 512, 5, 5) 1.17x over taking
    ownership of the output lines by prefetch (itself 1.03-1.12x over ordinary stores);
    streamed plane by plane, 7x7 gained nothing (its planes' end lines are partial).
    Each channel's affine right after its statistics instead ran (32, 512, 7, 7) 0.69x.
    n1 is set beyond the L2s only: in them this is the old path."""
    cdef Py_ssize_t c, j, k0, k1
    cdef double m = <double>outer * <double>inner
    cdef bint run = n1 > c1 and sc == inner and ysc == inner and inner >= 8
    cdef bn_moments st
    io_in(io, c0, c1)
    for c in range(c0, c1):
        if n1 > c1:   # the next group's planes, a share of its samples per channel here
            k0 = (c - c0) * outer // (c1 - c0)
            k1 = (c - c0 + 1) * outer // (c1 - c0)
            if floating is float and sc == inner and outer * inner <= BN_RUN_MAX:
                # each sample's planes of the group one run, fetched spread over the
                # channel's statistics (channel_stats' kernel, the same bits)
                bn_run_moments_pf_f32(x + c * sc, outer, inner, so, &st.shift, &st.mean,
                                      &st.m2, x + c1 * sc + k0 * so, k1 - k0,
                                      (n1 - c1) * inner * <Py_ssize_t>sizeof(float),
                                      so * <Py_ssize_t>sizeof(float))
                mean[c] = st.mean + st.shift
                var[c] = st.m2
                continue
            for j in range(c1, n1):
                prefetch_seg(x + j * sc + k0 * so, k1 - k0, inner, so)
        channel_stats(x + c * sc, outer, inner, so, nb, &mean[c], &var[c])
    for c in range(c0, c1):
        var[c] = var[c] / m
        invstd[c] = 1.0 / sqrt(var[c] + eps)
    if run:   # each sample's planes of the group as one streamed run (bn_planes_affine)
        for j in range(outer):
            planes_affine(x, y, j * nch + c0, c1 - c0, nch, inner, so, sc, yso, ysc, mean,
                          invstd, w, b, True)
        bn_fence()
        io_out(io, c0, c1)
        return
    if (not stream and sc == inner and ysc == inner and short_planes(inner, sizeof(floating))
            and outer >= BN_SHORT_REUSE):
        # short planes: the group's planes of a sample as one run (the same bits):
        # (256, 64, 2, 2) training
        planes_affine_rect(x, y, 0, outer, c0, c1, inner, so, yso, mean, invstd, w, b)
        io_out(io, c0, c1)
        return
    for c in range(c1 - 1, c0 - 1, -1):
        channel_affine(x + c * sc, y + c * ysc, outer, inner, so, yso, mean[c],
                       (w[c] if w != NULL else 1.0) * invstd[c], b[c] if b != NULL else 0.0,
                       stream)
    if stream:   # one fence for the group
        bn_fence()
    io_out(io, c0, c1)


cdef inline void forward_channel(const floating *x, floating *y, Py_ssize_t outer,
                                 Py_ssize_t inner, Py_ssize_t so, Py_ssize_t yso,
                                 Py_ssize_t nb, double *mean, double *var, double *invstd,
                                 double w, double b, double eps, bint stream,
                                 const floating *nxt) noexcept nogil:
    """Statistics of one channel, then normalise it while it is still in L2, fetching
    the next channel (nxt, or NULL) meanwhile."""
    cdef Py_ssize_t k
    channel_stats(x, outer, inner, so, nb, mean, var)
    var[0] = var[0] / (<double>outer * <double>inner)
    invstd[0] = 1.0 / sqrt(var[0] + eps)
    if nxt == NULL:
        channel_affine(x, y, outer, inner, so, yso, mean[0], w * invstd[0], b, stream)
    else:
        for k in range(outer):
            seg_affine_pf(x + (outer - 1 - k) * so, y + (outer - 1 - k) * yso, inner, mean[0],
                          w * invstd[0], b, stream, nxt + k * so, inner)
    if stream:
        bn_fence()


cdef inline void channel_stats(const floating *x, Py_ssize_t outer, Py_ssize_t inner,
                               Py_ssize_t so, Py_ssize_t nb, double *mean,
                               double *m2) noexcept nogil:
    """The mean and M2 of one channel."""
    cdef bn_moments st
    st.n = 0
    st.mean = 0
    st.m2 = 0
    if floating is float and outer * inner <= BN_RUN_MAX:   # small: one pass (see notes)
        bn_run_moments_f32(x, outer, inner, so, &st.shift, &st.mean, &st.m2)
    else:
        plane_block_stats(x, outer, inner, so, 0, nb, &st, True)
    mean[0] = st.mean + st.shift
    m2[0] = st.m2


cdef inline void channel_affine(const floating *x, floating *y, Py_ssize_t outer,
                                Py_ssize_t inner, Py_ssize_t so, Py_ssize_t yso, double mean,
                                double k, double b, bint stream) noexcept nogil:
    """y = (x - mean) * k + b over one channel, last planes first: they were read last,
    so they are the ones still in L2. Streamed stores are left to the caller's fence."""
    if stream:
        seg_affine_stream(x + (outer - 1) * so, y + (outer - 1) * yso, outer, inner, -so, -yso,
                          mean, k, b)
    else:
        seg_affine(x + (outer - 1) * so, y + (outer - 1) * yso, outer, inner, -so, -yso, mean,
                   k, b)


cdef int forward_rows(const floating *x, floating *y, Py_ssize_t nrows, Py_ssize_t nch,
                      Py_ssize_t ld, Py_ssize_t ldy, double *mean, double *var,
                      double *invstd, const double *w, const double *b, bint training,
                      double eps, int n_threads, const chan_io *io) noexcept nogil:
    """The batch-norm forward of rows of nch channels; io: see chan_io (every chunk of
    rows reads every channel: converted before and after)."""
    cdef Py_ssize_t c, s, nchunks, r0, r1
    cdef double *scale
    cdef double *shift
    cdef int nt = work_threads(n_threads, channel_blocks(nch), nrows * nch, SERIAL_ELEMS)
    cdef bint stream = streams(nrows * nch * <Py_ssize_t>sizeof(floating), 2, y, x)
    if nt > 1 and few_rows(nrows, nch):
        return forward_cols(x, y, nrows, nch, ld, ldy, mean, var, invstd, w, b, training, eps,
                            nt, n_threads, stream, io)
    io_in(io, 0, nch)
    if training:
        if rows_stats(x, nrows, nch, ld, mean, var, n_threads) != 0:
            return -1
        for c in range(nch):
            var[c] = var[c] / <double>nrows
    scale = <double *>bn_alloc64(2 * nch * sizeof(double))
    if scale == NULL:
        return -1
    shift = scale + nch
    rows_affine_params(0, nch, var, eps, w, b, invstd, scale, shift)
    # pieces of rows for the threads (the affine's bits do not depend on them): the
    # statistics' chunks, or one a thread where more threads than chunks are worth starting
    nchunks = rows_chunks(nrows, nch)
    nt = work_threads(n_threads, nrows, nrows * nch, SERIAL_ELEMS)
    if nt > nchunks:
        nchunks = nt
    else:
        nt = work_threads(n_threads, nchunks, nrows * nch, SERIAL_ELEMS)
    for s in prange(nchunks, schedule='static', num_threads=team_threads(nt, n_threads)):
        r0 = s * nrows // nchunks
        r1 = (s + 1) * nrows // nchunks
        if stream:
            cl_affine_stream(x + r0 * ld, ld, y + r0 * ldy, ldy, r1 - r0, nch, mean, scale,
                             shift)
            bn_fence()
        else:
            cl_affine(x + r0 * ld, ld, y + r0 * ldy, ldy, r1 - r0, nch, mean, scale, shift)
    bn_free64(scale)
    io_out(io, 0, nch)
    return 0


cdef inline void rows_affine_params(Py_ssize_t c0, Py_ssize_t c1, const double *var,
                                    double eps, const double *w, const double *b,
                                    double *invstd, double *scale,
                                    double *shift) noexcept nogil:
    """Channels c0..c1-1 of a rows affine: invstd, scale = w invstd, shift = b."""
    cdef Py_ssize_t c
    for c in range(c0, c1):
        invstd[c] = 1.0 / sqrt(var[c] + eps)
        scale[c] = (w[c] if w != NULL else 1.0) * invstd[c]
        shift[c] = b[c] if b != NULL else 0.0


cdef inline bint few_rows(Py_ssize_t nrows, Py_ssize_t nch) noexcept nogil:
    """Rows few for their width (from the shape alone): the threads split the channels
    (forward_cols; backward_rows' tiles, its sums then those of one row chunk) rather than
    the rows. Split by rows, every thread read every channel's parameters, and the row
    chunks' partial sums crossed between the cores to be merged; at these shapes that
    cost more than the rows' work. A channels-last batch of one (1, 7, 7, 2048) (49 rows)
    on two threads: training 53.1 -> 27.3 us, eval 22.4 -> 13.1, backward 65.1 -> 41.2;
    (8, 4096) training 2.4x, eval 2.9x; (64, 4096) 1.48x / 1.69x / 1.27x; (96, 2048)
    1.63x / 1.65x / 1.34x; (64, 512) 1.71x / 1.37x / 0.99x. Past the bound it stopped
    paying: (196, 2048) 1.0x, eval (128, 512) 0.64x, (128, 1024) 0.75x."""
    return nrows <= max(64, nch // 16)


cdef int forward_cols(const floating *x, floating *y, Py_ssize_t nrows, Py_ssize_t nch,
                      Py_ssize_t ld, Py_ssize_t ldy, double *mean, double *var,
                      double *invstd, const double *w, const double *b, bint training,
                      double eps, int nt, int n_threads, bint stream,
                      const chan_io *io) noexcept nogil:
    """forward_rows with each thread on its own channel blocks (CHANNEL_BLOCK channels
    each) start to finish: its channels' parameters (io), their moments over every row
    chunk of rows_stats merged in chunk order (rows_stats' bits), their invstd and affine
    over every row. -1 if out of memory."""
    cdef Py_ssize_t nchunks = rows_chunks(nrows, nch), per = 2 * nch + 5 * CHANNEL_BLOCK
    cdef Py_ssize_t nblk = channel_blocks(nch), t, k, c, c0, c1
    cdef double *part = <double *>bn_alloc64((nt * nchunks * per + 3 * nch) * sizeof(double))
    cdef double *mine
    cdef double *pivot
    cdef double *scale
    cdef double *shift
    cdef bint far = beyond_caches(nrows * nch * <Py_ssize_t>sizeof(floating))
    if part == NULL:
        return -1
    pivot = part + nt * nchunks * per
    scale = pivot + nch
    shift = scale + nch
    for t in prange(nt, schedule='static', num_threads=team_threads(nt, n_threads)):
        c0 = t * nblk // nt * CHANNEL_BLOCK
        c1 = min(nch, (t + 1) * nblk // nt * CHANNEL_BLOCK)
        mine = part + t * nchunks * per
        io_in(io, c0, c1)
        if training:
            for c in range(c0, c1):   # rows_stats' pivots: the first row's values
                pivot[c] = bn_pivot(<double>x[c])
            for k in range(nchunks):
                rows_chunk_stats(x, k * nrows // nchunks, (k + 1) * nrows // nchunks, nch, ld,
                                 mine + k * per + 2 * nch, pivot, mine + k * per,
                                 mine + k * per + nch, far, c0, c1)
            merge_row_chunks(mine + c0, per, nchunks, nrows, 1, c1 - c0, pivot + c0,
                             mean + c0, var + c0, False, nch)
            for c in range(c0, c1):
                var[c] = var[c] / <double>nrows
        rows_affine_params(c0, c1, var, eps, w, b, invstd, scale, shift)
        if stream:
            cl_affine_stream(x + c0, ld, y + c0, ldy, nrows, c1 - c0, mean + c0, scale + c0,
                             shift + c0)
            bn_fence()
        else:
            cl_affine(x + c0, ld, y + c0, ldy, nrows, c1 - c0, mean + c0, scale + c0,
                      shift + c0)
        io_out(io, c0, c1)
    bn_free64(part)
    return 0


def forward(cnp.ndarray x, cnp.ndarray y, Py_ssize_t outer, Py_ssize_t nch, Py_ssize_t inner,
            Py_ssize_t so, Py_ssize_t sc, Py_ssize_t yso, Py_ssize_t ysc,
            cnp.ndarray mean, cnp.ndarray var, cnp.ndarray invstd, weight, bias,
            bint training, double eps, int n_threads):
    """Batch-norm forward on a canonical view (element strides; see module notes).

    training: writes mean, var (biased) and invstd (float64, (nch,)); eval: reads mean and
    var, writes invstd. weight/bias: float64 (nch,) or None. y may be x (in place).
    """
    cdef void *px = cnp.PyArray_DATA(x)
    cdef void *py = cnp.PyArray_DATA(y)
    cdef double *pm = <double *>cnp.PyArray_DATA(mean)
    cdef double *pv = <double *>cnp.PyArray_DATA(var)
    cdef double *pi = <double *>cnp.PyArray_DATA(invstd)
    cdef const double *pw = f64_or_null(weight)
    cdef const double *pb = f64_or_null(bias)
    cdef bint is_f32 = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32
    cdef bint rows = inner == 1 and sc == 1 and ysc == 1
    cdef int rc
    with nogil:
        if rows and is_f32:
            rc = forward_rows(<const float *>px, <float *>py, outer, nch, so, yso, pm, pv, pi,
                              pw, pb, training, eps, n_threads, NULL)
        elif rows:
            rc = forward_rows(<const double *>px, <double *>py, outer, nch, so, yso, pm, pv,
                              pi, pw, pb, training, eps, n_threads, NULL)
        elif is_f32:
            rc = forward_planes(<const float *>px, <float *>py, outer, nch, inner, so, sc, yso,
                                ysc, pm, pv, pi, pw, pb, training, eps, n_threads, NULL)
        else:
            rc = forward_planes(<const double *>px, <double *>py, outer, nch, inner, so, sc,
                                yso, ysc, pm, pv, pi, pw, pb, training, eps, n_threads,
                                NULL)
    if rc != 0:
        raise MemoryError("bncore: out of memory for per-channel work arrays")


cdef int eval_half(const uint16_t *x, uint16_t *y, Py_ssize_t outer, Py_ssize_t nch,
                   Py_ssize_t inner, Py_ssize_t so, Py_ssize_t sc, Py_ssize_t yso,
                   Py_ssize_t ysc, const double *mean, const double *var, double *invstd,
                   const double *w, const double *b, double eps,
                   int n_threads) noexcept nogil:
    """The eval forward of float16 (inference): each value widened, the float32 eval's
    affine (its float parameters and expression: bn_planes_affine, bn_cl_affine), rounded
    back, in one pass (bn_affine_half, bn_rows_affine_half): one float16 read and write a
    value, where widening the whole array first and rounding the result back moved four
    more float32-sized passes. The threads take pieces of about AFFINE_CHUNK values: runs of
    planes in memory order, or of rows (rows: inner == 1, sc == ysc == 1). -1 if out of
    memory."""
    cdef bint rows = inner == 1 and sc == 1 and ysc == 1
    cdef Py_ssize_t width = nch if rows else inner
    cdef Py_ssize_t per = max(1, AFFINE_CHUNK // width)   # rows, or planes, a piece
    cdef Py_ssize_t total = outer if rows else outer * nch
    cdef Py_ssize_t npieces = (total + per - 1) // per
    cdef Py_ssize_t t, k, n, c, p0, p1
    cdef int nt = work_threads(n_threads, npieces, outer * nch * inner, SERIAL_ELEMS)
    cdef float *tab = <float *>bn_alloc64(4 * nch * sizeof(float))
    cdef float *lo
    cdef float *kk
    cdef float *bb
    if tab == NULL:
        return -1
    lo = tab + nch
    kk = lo + nch
    bb = kk + nch
    for k in range(nch):   # forward_planes' invstd; bn_cl_float_params' floats
        invstd[k] = 1.0 / sqrt(var[k] + eps)
        tab[k] = <float>mean[k]
        lo[k] = <float>(mean[k] - <double>tab[k])
        kk[k] = <float>((w[k] if w != NULL else 1.0) * invstd[k])
        bb[k] = <float>(b[k] if b != NULL else 0.0)
    for t in prange(npieces, schedule='static', num_threads=team_threads(nt, n_threads)):
        p0 = t * per
        p1 = min(p0 + per, total)
        if rows:
            bn_rows_affine_half(x + p0 * so, so, y + p0 * yso, yso, p1 - p0, nch, tab, lo, kk,
                                bb)
        else:
            for k in range(p0, p1):
                n = k // nch
                c = k - n * nch
                bn_affine_half(x + n * so + c * sc, y + n * yso + c * ysc, inner, tab[c], lo[c],
                               kk[c], bb[c])
    bn_free64(tab)
    return 0


cdef int train_half(const uint16_t *x, uint16_t *y, Py_ssize_t outer, Py_ssize_t nch,
                    Py_ssize_t inner, Py_ssize_t so, Py_ssize_t sc, Py_ssize_t yso,
                    Py_ssize_t ysc, double *mean, double *var, double *invstd,
                    const double *w, const double *b, double eps,
                    int n_threads) noexcept nogil:
    """The training forward of float16 planes a channel at a time: the channel widened
    into a float32 buffer of the thread's (in its L2), its statistics there (those of
    forward_channel, forward_planes' kernel for channels that are the parallel unit, whose
    bits do not depend on the planes' strides), then forward_channel's float affine from
    x itself, still in L2, each value rounded (bn_affine_half): one float16 read and write
    a value, and no float32 result to write and round ((32, 64, 56, 56): 1.35 -> 1.16 ms
    on two threads; PyTorch 1.12-1.17).
    -1 if out of memory."""
    cdef Py_ssize_t c, n, nb = plane_nblocks(outer, inner), fails = 0
    cdef int nt = work_threads(n_threads, nch, outer * nch * inner, SERIAL_ELEMS)
    cdef float *buf = NULL   # (private in the parallel block; set for the compiler)
    cdef float hi, lo, kf, bf
    with parallel(num_threads=team_threads(nt, n_threads)):
        buf = <float *>bn_alloc64(outer * inner * sizeof(float))
        for c in prange(nch, schedule='static'):
            if buf == NULL:
                fails += 1
            else:
                for n in range(outer):
                    bn_half_to_float(x + n * so + c * sc, buf + n * inner, inner)
                channel_stats(buf, outer, inner, inner, nb, &mean[c], &var[c])
                var[c] = var[c] / (<double>outer * <double>inner)
                invstd[c] = 1.0 / sqrt(var[c] + eps)
                # the affine from x itself (in L2 since its widening), last planes first:
                # forward_channel's float affine (bn_seg_affine), each value rounded
                hi = <float>mean[c]
                lo = <float>(mean[c] - <double>hi)
                kf = <float>((w[c] if w != NULL else 1.0) * invstd[c])
                bf = <float>(b[c] if b != NULL else 0.0)
                for n in range(outer - 1, -1, -1):
                    bn_affine_half(x + n * so + c * sc, y + n * yso + c * ysc, inner, hi, lo,
                                   kf, bf)
        bn_free64(buf)
    return -1 if fails else 0


cdef int rows_stats_half(const uint16_t *x, Py_ssize_t nrows, Py_ssize_t nch, Py_ssize_t ld,
                         double *mean, double *m2, int n_threads) noexcept nogil:
    """rows_stats of float16 rows (ld apart): its chunks, pivots and merges, each block of
    rows widened into a float32 stage of the thread's (in L1) just before its moments
    (rows_chunk_stats with h): the bits of rows_stats on x widened, without the copy (a
    float32 write and read of the whole array). -1 if out of memory."""
    cdef Py_ssize_t nchunks = rows_chunks(nrows, nch), per = rows_chunk_per(nch), s, c
    cdef Py_ssize_t fails = 0
    cdef int nt = work_threads(n_threads, nchunks, nrows * nch, SERIAL_ELEMS)
    cdef double *buf = <double *>bn_alloc64(rows_scratch(nrows, nch) * sizeof(double)
                                            + nch * sizeof(float))
    cdef double *pivot
    cdef float *first
    cdef float *stage = NULL   # (private in the parallel block; set for the compiler)
    if buf == NULL:
        return -1
    pivot = rows_pivots(buf, nrows, nch)
    first = <float *>(pivot + nch)
    bn_half_to_float(x, first, nch)
    for c in range(nch):   # the first row's values, as rows_stats_in
        pivot[c] = bn_pivot(<double>first[c])
    with parallel(num_threads=team_threads(nt, n_threads)):
        stage = <float *>bn_alloc64(half_stage(nch) * sizeof(float))
        for s in prange(nchunks, schedule='static'):
            if stage == NULL:
                fails += 1
            else:
                rows_chunk_state(<const float *>NULL, s, nchunks, nrows, nch, ld,
                                 buf + s * per, pivot, False, 0, channel_blocks(nch), x, stage)
        bn_free64(stage)
    if fails == 0:
        merge_row_chunks(buf, per, nchunks, nrows, 1, nch, pivot, mean, m2)
    bn_free64(buf)
    return -1 if fails else 0


def rows_train_half(cnp.ndarray x, cnp.ndarray y, Py_ssize_t nrows, Py_ssize_t nch,
                    Py_ssize_t ld, Py_ssize_t ldy, cnp.ndarray mean, cnp.ndarray var,
                    cnp.ndarray invstd, weight, bias, double eps, int n_threads):
    """The training forward of float16 rows (channels-last, ld apart): the statistics of
    rows_stats on x widened, a block of rows widened at a time (rows_stats_half), then the
    affine from x itself in one pass (eval_half, forward_rows' float affine and invstd):
    forward_rows' bits, rounded, with no float32 copy of x and no float32 result."""
    cdef int rc
    cdef Py_ssize_t c
    cdef const double *pw = f64_or_null(weight)
    cdef const double *pb = f64_or_null(bias)
    cdef double *pm = <double *>cnp.PyArray_DATA(mean)
    cdef double *pv = <double *>cnp.PyArray_DATA(var)
    cdef const uint16_t *px = <const uint16_t *>cnp.PyArray_DATA(x)
    with nogil:
        rc = rows_stats_half(px, nrows, nch, ld, pm, pv, n_threads)
        if rc == 0:
            for c in range(nch):
                pv[c] = pv[c] / <double>nrows
            rc = eval_half(px, <uint16_t *>cnp.PyArray_DATA(y), nrows, nch, 1, ld, 1, ldy, 1,
                           pm, pv, <double *>cnp.PyArray_DATA(invstd), pw, pb, eps, n_threads)
    if rc != 0:
        raise MemoryError("bncore: out of memory for float16 buffers")


def trains_half(Py_ssize_t outer, Py_ssize_t nch, Py_ssize_t inner):
    """Whether forward_half takes these planes in training: where forward_planes takes each
    channel start to finish with forward_channel (channels the parallel unit, of more than
    SMALL_CHANNEL values), channels of up to HALF_CHANNEL values (else the caller widens
    x and runs forward())."""
    return (inner > 1 and plane_chunks(outer, nch, inner) == 1
            and SMALL_CHANNEL < outer * inner <= HALF_CHANNEL)


def forward_half(cnp.ndarray x, cnp.ndarray y, Py_ssize_t outer, Py_ssize_t nch,
                 Py_ssize_t inner, Py_ssize_t so, Py_ssize_t sc, Py_ssize_t yso, Py_ssize_t ysc,
                 cnp.ndarray mean, cnp.ndarray var, cnp.ndarray invstd, weight, bias,
                 bint training, double eps, int n_threads):
    """forward() of float16 x and y: in eval (eval_half), or in training where trains_half
    (train_half)."""
    cdef int rc
    cdef const double *pw = f64_or_null(weight)
    cdef const double *pb = f64_or_null(bias)
    cdef const uint16_t *px = <const uint16_t *>cnp.PyArray_DATA(x)
    cdef uint16_t *py = <uint16_t *>cnp.PyArray_DATA(y)
    cdef double *pm = <double *>cnp.PyArray_DATA(mean)
    cdef double *pv = <double *>cnp.PyArray_DATA(var)
    cdef double *pi = <double *>cnp.PyArray_DATA(invstd)
    with nogil:
        if training:
            rc = train_half(px, py, outer, nch, inner, so, sc, yso, ysc, pm, pv, pi, pw, pb,
                            eps, n_threads)
        else:
            rc = eval_half(px, py, outer, nch, inner, so, sc, yso, ysc, pm, pv, pi, pw, pb,
                           eps, n_threads)
    if rc != 0:
        raise MemoryError("bncore: out of memory for float16 buffers")


# ------------------------------------------------------------------ backward

cdef inline void dx_coefficients(double sum_dy, double sum_dy_xmu, double invstd, double w,
                                 double inv_m, bint training, double *k, double *q,
                                 double *r) noexcept nogil:
    """dx = k*dy + q*(x - mean) + r, from the two per-channel sums (see DESIGN.md); inv_m =
    1 / values per channel (a multiply: two divisions per channel were a serial 6 us at
    2048 channels, between the two parallel passes)."""
    k[0] = w * invstd
    if training:
        q[0] = -k[0] * invstd * invstd * sum_dy_xmu * inv_m
        r[0] = -k[0] * sum_dy * inv_m
    else:
        q[0] = 0.0
        r[0] = 0.0


cdef int backward_planes(const floating *dy, const floating *x, floating *dx,
                         Py_ssize_t outer, Py_ssize_t nch, Py_ssize_t inner, Py_ssize_t gso,
                         Py_ssize_t gsc, Py_ssize_t so, Py_ssize_t sc, Py_ssize_t dso,
                         Py_ssize_t dsc, const double *mean, const double *invstd,
                         const double *w, bint training, double *dweight, double *dbias,
                         int n_threads, const chan_io *io) noexcept nogil:
    """The batch-norm backward of planes. io: see chan_io (NULL: the per-channel arrays
    are doubles already, and dweight/dbias the results)."""
    cdef Py_ssize_t c, t, t0, t1, ng
    cdef int rc
    cdef int nt = work_threads(n_threads, nch, outer * nch * inner, SERIAL_ELEMS)
    cdef bint stream = streams(outer * nch * inner * <Py_ssize_t>sizeof(floating), 3, dx, dy,
                               x)
    cdef bint fetch = stream and inner * <Py_ssize_t>sizeof(floating) >= FETCH_PLANE
    cdef Py_ssize_t pd = plane_fetch(inner * <Py_ssize_t>sizeof(floating),
                                     2 * outer * nch * inner * <Py_ssize_t>sizeof(floating), nt)
    if (gsc == inner and sc == inner and (dx == NULL or dsc == inner)
            and inner * <Py_ssize_t>sizeof(floating) < SAMPLE_PLANE
            and 3 * outer * nch * inner * <Py_ssize_t>sizeof(floating) >= BY_SAMPLE_BYTES):
        io_in(io, 0, nch)   # every thread reads every channel there
        rc = backward_by_sample(dy, x, dx, outer, nch, inner, gso, so, dso, mean, invstd, w,
                                training, dweight, dbias, n_threads)
        io_out(io, 0, nch)
        return rc
    if outer * inner > SMALL_CHANNEL:   # as forward_planes (the next channel prefetched)
        for t in prange(nt, schedule='static', num_threads=team_threads(nt, n_threads)):
            t0 = t * nch // nt
            t1 = (t + 1) * nch // nt
            io_in(io, t0, t1)
            for c in range(t0, t1):
                backward_channel(dy + c * gsc, x + c * sc,
                                 dx + c * dsc if dx != NULL else NULL, outer, inner, gso, so,
                                 dso, mean[c], invstd[c], w[c] if w != NULL else 1.0,
                                 training, &dweight[c], &dbias[c], stream,
                                 fetch and c + 1 < t1, gsc, sc, pd)
            io_out(io, t0, t1)
        return 0
    # small channels cost per channel as much as ~CHANNEL_COST values: count it when
    # deciding whether threads pay ((1, 512, 7, 7): 25K values, 23 -> 14 us on two)
    nt = work_threads(n_threads, nch, outer * nch * inner + nch * CHANNEL_COST, SERIAL_ELEMS)
    ng = channel_groups(nch, nt)
    for t in prange(ng, schedule='static', num_threads=team_threads(nt, n_threads)):
        backward_group(dy, x, dx, t * nch // ng, (t + 1) * nch // ng, outer, inner, gso, gsc,
                       so, sc, dso, dsc, mean, invstd, w, training, dweight, dbias, stream,
                       io)
    return 0


cdef inline void chunk_sums_coefficients(const double *buf, Py_ssize_t nchunks,
                                         Py_ssize_t nch, const double *invstd,
                                         const double *w, double inv_m, bint training,
                                         double *dweight, double *dbias, double *k, double *q,
                                         double *r) noexcept nogil:
    """The per-chunk sums (chunk s: sum(dy) then sum(dy * (x - mean)) of nch channels at
    buf + 2 * nch * s) added in chunk order into dbias and dweight (the same sums for any
    thread count), each channel's dx coefficients, then dweight scaled by invstd."""
    cdef Py_ssize_t s, c
    for c in range(nch):
        dbias[c] = 0
        dweight[c] = 0
    for s in range(nchunks):
        for c in range(nch):
            dbias[c] += buf[2 * nch * s + c]
            dweight[c] += buf[2 * nch * s + nch + c]
    for c in range(nch):
        dx_coefficients(dbias[c], dweight[c], invstd[c], w[c] if w != NULL else 1.0, inv_m,
                        training, &k[c], &q[c], &r[c])
        dweight[c] = dweight[c] * invstd[c]


cdef inline void tile_coefficients(const double *buf, Py_ssize_t c0, Py_ssize_t c1,
                                   Py_ssize_t nch, const double *invstd, const double *w,
                                   double inv_m, bint training, double *dweight,
                                   double *dbias, double *k, double *q,
                                   double *r) noexcept nogil:
    """chunk_sums_coefficients of one chunk for channels c0..c1-1 (sum(dy) at buf[c],
    sum(dy * (x - mean)) at buf[nch + c]): the same bits for those channels."""
    cdef Py_ssize_t c
    for c in range(c0, c1):
        dbias[c] = buf[c]
        dweight[c] = buf[nch + c]
        dx_coefficients(dbias[c], dweight[c], invstd[c], w[c] if w != NULL else 1.0, inv_m,
                        training, &k[c], &q[c], &r[c])
        dweight[c] = dweight[c] * invstd[c]


cdef int backward_by_sample(const floating *dy, const floating *x, floating *dx,
                            Py_ssize_t outer, Py_ssize_t nch, Py_ssize_t inner,
                            Py_ssize_t gso, Py_ssize_t so, Py_ssize_t dso, const double *mean,
                            const double *invstd, const double *w, bint training,
                            double *dweight, double *dbias, int n_threads) noexcept nogil:
    """backward_planes over short planes (under SAMPLE_PLANE bytes: 7x7 float32) beyond the
    caches, each sample's planes contiguous: memory read in order, sample by sample, in
    both passes. The sums by chunks of samples (from the shape alone, as
    planes_stats_by_sample), each chunk's per-channel sums added plane by plane in sample
    order, the chunks added in chunk order; then dx sample by sample, not streamed (most
    lines of a short plane are partial: see forward_planes). Channel by channel, a
    channel there is ``outer`` scraps of a few hundred bytes a sample apart, each a DRAM
    page of its own, and when the sample stride is a multiple of 4 KiB they all map to the
    same cache sets, so the dx pass finds few of them still cached. In-process A/B against
    the channel walk, 15 rounds: (64,2048,7,7) 1.29-1.5x, (128,1024,7,7) 1.51x, (256,512,7,7) 1.3x, (512,256,7,7)
    1.41x, (8,8192,7,7) 1.42x, (128,1024,6,6) 1.7x, (256,512,5,5) 1.87x, (128,4096,4,4)
    1.71x; but 0.63-0.66x over 8x8 and 10x10 planes (256 and 400 bytes) and 1.07-1.18x
    over 9x9, so planes from 256 bytes stay channel by channel."""
    cdef Py_ssize_t nchunks = sample_chunks(outer, nch, inner)
    cdef Py_ssize_t s, n, c
    cdef int nt = work_threads(n_threads, nchunks, outer * nch * inner, SERIAL_ELEMS)
    cdef double *buf = <double *>bn_alloc64((2 * nchunks + 3) * nch * sizeof(double))
    cdef double *p
    cdef double *k
    cdef double *q
    cdef double *r
    if buf == NULL:
        return -1
    for s in prange(nchunks, schedule='static', num_threads=team_threads(nt, n_threads)):
        p = buf + 2 * nch * s
        for c in range(2 * nch):
            p[c] = 0
        for n in range(s * outer // nchunks, (s + 1) * outer // nchunks):
            seg_bwd_sums_many(dy + n * gso, x + n * so, nch, 1, inner, 0, 0, inner, inner,
                              mean, p, p + nch)
    k = buf + 2 * nch * nchunks
    q = k + nch
    r = q + nch
    chunk_sums_coefficients(buf, nchunks, nch, invstd, w,
                            1.0 / (<double>outer * <double>inner), training, dweight, dbias,
                            k, q, r)
    if dx != NULL:
        nt = work_threads(n_threads, outer, outer * nch * inner, SERIAL_ELEMS)
        for n in prange(outer, schedule='static', num_threads=team_threads(nt, n_threads)):
            seg_bwd_dx_many(dy + n * gso, x + n * so, dx + n * dso, nch, 1, inner, 0, 0, 0,
                            inner, inner, inner, mean, k, q, r, False)
    bn_free64(buf)
    return 0


cdef inline void backward_group(const floating *dy, const floating *x, floating *dx,
                                Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t outer,
                                Py_ssize_t inner, Py_ssize_t gso, Py_ssize_t gsc,
                                Py_ssize_t so, Py_ssize_t sc, Py_ssize_t dso, Py_ssize_t dsc,
                                const double *mean, const double *invstd, const double *w,
                                bint training, double *dweight, double *dbias,
                                bint stream, const chan_io *io) noexcept nogil:
    """backward_channel for small channels c0..c1-1 (at most CHANNEL_GROUP), phase by
    phase (see forward_group), each phase one kernel call for the group: the sums, every
    channel's coefficients (independent divisions), then each dx. Same bits. io: see
    chan_io."""
    cdef Py_ssize_t c
    cdef double kc[CHANNEL_GROUP]
    cdef double qc[CHANNEL_GROUP]
    cdef double rc[CHANNEL_GROUP]
    # the three steps in one kernel, dy and x - mean kept in L1 (the same bits)
    cdef bint fused = (floating is float and dx != NULL and not stream
                       and outer * inner <= BN_FUSED_MAX)
    io_in(io, c0, c1)
    for c in range(c0, c1):
        dbias[c] = 0
        dweight[c] = 0
    if floating is float and fused:   # (the type test first: Cython prunes on it)
        bn_seg_bwd_fused_f32(dy + c0 * gsc, x + c0 * sc, dx + c0 * dsc, c1 - c0, outer,
                             inner, gso, so, dso, gsc, sc, dsc, mean + c0, invstd + c0,
                             w + c0 if w != NULL else NULL,
                             1.0 / (<double>outer * <double>inner), training, dbias + c0,
                             dweight + c0)
    else:
        seg_bwd_sums_many(dy + c0 * gsc, x + c0 * sc, c1 - c0, outer, inner, gso, so, gsc,
                          sc, mean + c0, dbias + c0, dweight + c0)
    if dx != NULL and not fused:
        for c in range(c0, c1):
            dx_coefficients(dbias[c], dweight[c], invstd[c], w[c] if w != NULL else 1.0,
                            1.0 / (<double>outer * <double>inner), training, &kc[c - c0],
                            &qc[c - c0], &rc[c - c0])
        seg_bwd_dx_many(dy + c0 * gsc, x + c0 * sc, dx + c0 * dsc, c1 - c0, outer, inner,
                        gso, so, dso, gsc, sc, dsc, mean + c0, kc, qc, rc, stream)
        if stream:
            bn_fence()
    for c in range(c0, c1):
        dweight[c] = dweight[c] * invstd[c]
    io_out(io, c0, c1)


cdef inline void backward_channel(const floating *dy, const floating *x, floating *dx,
                                  Py_ssize_t outer, Py_ssize_t inner, Py_ssize_t gso,
                                  Py_ssize_t so, Py_ssize_t dso, double mean, double invstd,
                                  double w, bint training, double *dweight,
                                  double *dbias, bint stream, bint fetch_next, Py_ssize_t gsc,
                                  Py_ssize_t sc, Py_ssize_t pd) noexcept nogil:
    """The two sums of one channel (fetching pd planes ahead: plane_fetch), then its dx
    while dy and x are still in L2, fetching the next channel (gsc and sc elements on)
    meanwhile when fetch_next."""
    cdef double sdy = 0, sdyx = 0, k, q, r
    cdef Py_ssize_t p
    seg_bwd_sums(dy, x, outer, inner, gso, so, mean, &sdy, &sdyx, pd)
    dbias[0] = sdy
    dweight[0] = sdyx * invstd
    if dx == NULL:
        return
    dx_coefficients(sdy, sdyx, invstd, w, 1.0 / (<double>outer * <double>inner), training, &k,
                    &q, &r)
    # last planes first: they are the ones still in L2
    if not training:
        q = 0.0
        r = 0.0
    if fetch_next:
        for p in range(outer):
            seg_bwd_dx_pf(dy + (outer - 1 - p) * gso, x + (outer - 1 - p) * so,
                          dx + (outer - 1 - p) * dso, inner, mean, k, q, r, stream,
                          dy + gsc + p * gso, x + sc + p * so, inner)
    else:
        seg_bwd_dx(dy + (outer - 1) * gso, x + (outer - 1) * so, dx + (outer - 1) * dso, outer,
                   inner, -gso, -so, -dso, mean, k, q, r, stream)
    if stream:
        bn_fence()


cdef int backward_rows(const floating *dy, const floating *x, floating *dx, Py_ssize_t nrows,
                       Py_ssize_t nch, Py_ssize_t lddy, Py_ssize_t ldx, Py_ssize_t lddx,
                       const double *mean, const double *invstd, const double *w,
                       bint training, double *dweight, double *dbias, int n_threads,
                       const chan_io *io) noexcept nogil:
    """The batch-norm backward of rows of nch channels; io: see chan_io."""
    cdef Py_ssize_t nchunks = 1 if few_rows(nrows, nch) else rows_chunks(nrows, nch)
    cdef Py_ssize_t s, c, r0, r1, c0, c1, ntile = 1, npart
    cdef double *buf
    cdef double *k
    cdef double *q
    cdef double *r
    cdef int nt = work_threads(n_threads, nchunks, nrows * nch, SERIAL_ELEMS)
    cdef bint stream = streams(nrows * nch * <Py_ssize_t>sizeof(floating), 3, dx, dy, x)
    cdef bint far = beyond_caches(3 * nrows * nch * <Py_ssize_t>sizeof(floating))  # dy, x, dx
    if nchunks == 1:
        # few rows of many channels ((64, 1024), a 7x7 batch of one): the threads take
        # tiles of at least CL_TILE channels instead, each starting at a multiple of 32, so
        # every channel's sums are the bits of one call over all channels (bn_cl_bwd_sums);
        # (64, 1024) 76 -> 47 us on 2 threads
        nt = work_threads(n_threads, nch // CL_TILE, nrows * nch, SERIAL_ELEMS)
        ntile = nt
    buf = <double *>bn_alloc64((2 * nchunks + 3) * nch * sizeof(double))
    if buf == NULL:
        return -1
    k = buf + 2 * nch * nchunks
    q = k + nch
    r = q + nch
    if ntile > 1:
        # each thread its tile start to finish: sums, the tile's coefficients, then its dx
        # over every row while the tile is in its L2 (a channel's dx needs only its own
        # sums): one parallel region, no serial step between, the same bits. (64, 1024)
        # 40 -> 28 us (1.44x), (32, 2048) 1.40x
        for s in prange(ntile, schedule='static', num_threads=team_threads(nt, n_threads)):
            c0 = (s * nch // ntile) // 32 * 32
            c1 = nch if s == ntile - 1 else ((s + 1) * nch // ntile) // 32 * 32
            io_in(io, c0, c1)
            for c in range(c0, c1):
                buf[c] = 0
                buf[nch + c] = 0
            cl_bwd_sums(dy + c0, lddy, x + c0, ldx, nrows, c1 - c0, mean + c0, buf + c0,
                        buf + nch + c0, far, nch)
            tile_coefficients(buf, c0, c1, nch, invstd, w, 1.0 / <double>nrows, training,
                              dweight, dbias, k, q, r)
            if dx != NULL:
                cl_bwd_dx(dy + c0, lddy, x + c0, ldx, dx + c0, lddx, nrows, c1 - c0,
                          mean + c0, k + c0, q + c0, r + c0, stream, far)
                if stream:
                    bn_fence()
            io_out(io, c0, c1)
        bn_free64(buf)
        return 0
    else:
        io_in(io, 0, nch)   # every chunk reads every channel
        for s in prange(nchunks, schedule='static', num_threads=team_threads(nt, n_threads)):
            r0 = s * nrows // nchunks
            r1 = (s + 1) * nrows // nchunks
            for c in range(2 * nch):
                buf[2 * nch * s + c] = 0
            cl_bwd_sums(dy + r0 * lddy, lddy, x + r0 * ldx, ldx, r1 - r0, nch, mean,
                        buf + 2 * nch * s, buf + 2 * nch * s + nch, far)
    chunk_sums_coefficients(buf, nchunks, nch, invstd, w, 1.0 / <double>nrows, training,
                            dweight, dbias, k, q, r)
    io_out(io, 0, nch)
    if dx != NULL:
        npart = max(nchunks, ntile)   # dx is elementwise: any split of the rows
        for s in prange(npart, schedule='static', num_threads=team_threads(nt, n_threads)):
            r0 = s * nrows // npart
            r1 = (s + 1) * nrows // npart
            cl_bwd_dx(dy + r0 * lddy, lddy, x + r0 * ldx, ldx, dx + r0 * lddx, lddx, r1 - r0,
                      nch, mean, k, q, r, stream, far)
            if stream:
                bn_fence()
    bn_free64(buf)
    return 0


cdef inline void backward_channel_half(const uint16_t *dy, const uint16_t *x, uint16_t *dx,
                                       Py_ssize_t outer, Py_ssize_t inner, Py_ssize_t gso,
                                       Py_ssize_t so, Py_ssize_t dso, double mean,
                                       double invstd, double w, bint training,
                                       double *dweight, double *dbias, bint stream,
                                       const uint16_t *ndy, const uint16_t *nx) noexcept nogil:
    """backward_channel of float16 planes (bn_half_fused): its sums and dx read dy and x
    themselves, with backward_channel's float arithmetic (bn_seg_bwd_sums_h16,
    bn_seg_bwd_dx_h16), each dx rounded; the dx pass last planes first (those in L2),
    streamed when stream (the caller fences), prefetching the next channel's planes (ndy,
    nx: NULL for none) meanwhile."""
    cdef double sdy = 0, sdyx = 0, k, q, r
    bn_seg_bwd_sums_h16(dy, x, outer, inner, gso, so, mean, &sdy, &sdyx)
    dbias[0] = sdy
    dweight[0] = sdyx * invstd
    dx_coefficients(sdy, sdyx, invstd, w, 1.0 / (<double>outer * <double>inner), training, &k,
                    &q, &r)
    if not training:
        q = 0.0
        r = 0.0
    bn_seg_bwd_dx_h16(dy + (outer - 1) * gso, x + (outer - 1) * so, dx + (outer - 1) * dso,
                      outer, inner, -gso, -so, -dso, mean, k, q, r, stream, ndy, nx, gso, so)


cdef int backward_half_planes(const uint16_t *dy, const uint16_t *x, uint16_t *dx,
                              Py_ssize_t outer, Py_ssize_t nch, Py_ssize_t inner,
                              Py_ssize_t gso, Py_ssize_t gsc, Py_ssize_t so, Py_ssize_t sc,
                              Py_ssize_t dso, Py_ssize_t dsc, const double *mean,
                              const double *invstd, const double *w, bint training,
                              double *dweight, double *dbias, int n_threads) noexcept nogil:
    """The backward of float16 planes a channel at a time: where bn_half_fused,
    backward_channel_half (its kernels read dy and x and write dx themselves); else its dy
    and x widened into float32 buffers of the thread's (in its L2), backward_channel there
    (backward_planes' kernel for channels of more than SMALL_CHANNEL values, whose bits do
    not depend on the planes' strides), its dx (over the dy buffer) rounded back. The same
    bits either way. -1 if out of memory."""
    cdef Py_ssize_t c, n, m = outer * inner, fails = 0
    cdef int nt = work_threads(n_threads, nch, outer * nch * inner, SERIAL_ELEMS)
    cdef float *buf = NULL   # (private in the parallel block; set for the compiler)
    cdef Py_ssize_t t, t0, t1
    # beyond the caches: each thread's next channel fetched during a dx pass (whose last
    # planes are still in L2), dx streamed where the arrays outgrow the L3's share
    # ((32, 64, 56, 56) on two threads 1.055-1.08x in one process, about half from each)
    cdef bint fetch = beyond_caches(3 * m * nch * <Py_ssize_t>sizeof(uint16_t))
    cdef bint stream = streams(m * nch * <Py_ssize_t>sizeof(uint16_t), 3, dx, dy, x)
    if bn_half_fused():
        for t in prange(nt, schedule='static', num_threads=team_threads(nt, n_threads)):
            t0 = t * nch // nt
            t1 = (t + 1) * nch // nt
            for c in range(t0, t1):
                backward_channel_half(dy + c * gsc, x + c * sc, dx + c * dsc, outer, inner,
                                      gso, so, dso, mean[c], invstd[c],
                                      w[c] if w != NULL else 1.0, training, &dweight[c],
                                      &dbias[c], stream, dy + (c + 1) * gsc
                                      if fetch and c + 1 < t1 else NULL, x + (c + 1) * sc)
            if stream:
                bn_fence()
        return 0
    with parallel(num_threads=team_threads(nt, n_threads)):
        buf = <float *>bn_alloc64(2 * m * sizeof(float))
        for c in prange(nch, schedule='static'):
            if buf == NULL:
                fails += 1
            else:
                for n in range(outer):
                    bn_half_to_float(dy + n * gso + c * gsc, buf + n * inner, inner)
                    bn_half_to_float(x + n * so + c * sc, buf + m + n * inner, inner)
                backward_channel(buf, buf + m, buf, outer, inner, inner, inner, inner, mean[c],
                                 invstd[c], w[c] if w != NULL else 1.0, training, &dweight[c],
                                 &dbias[c], False, False, 0, 0, 0)
                for n in range(outer):
                    bn_float_to_half(buf + n * inner, dx + n * dso + c * dsc, inner)
        bn_free64(buf)
    return -1 if fails else 0


cdef int backward_rows_half(const uint16_t *dy, const uint16_t *x, uint16_t *dx,
                            Py_ssize_t nrows, Py_ssize_t nch, Py_ssize_t lddy, Py_ssize_t ldx,
                            Py_ssize_t lddx, const double *mean, const double *invstd,
                            const double *w, bint training, double *dweight, double *dbias,
                            int n_threads) noexcept nogil:
    """backward_rows of float16 rows split by row chunks (not few_rows). Where
    bn_half_fused, the float kernels' float16 twins read dy and x and write dx themselves
    (bn_cl_bwd_sums_h16, bn_cl_bwd_dx_h16: bn_cl_bwd_impl.h): (32, 56, 56, 64) 5.3 -> 2.5
    ms on two threads (PyTorch 2.7-2.8; staged, below, 3.6). Else each chunk's dy
    and x widened a piece of rows at a time into float32 stages of the thread's (in L2),
    pieces of whole row blocks of bn_cl_bwd_sums (its blocks, and so its bits, are those
    of one call over the chunk), the sums merged as backward_rows merges them, then each
    piece widened again, its dx computed over the dy stage (bn_cl_bwd_dx, elementwise) and
    rounded into dx: backward_rows' bits, rounded, without float32 copies of the whole
    arrays. dx may be dy (each piece is read before its dx is written). -1 if out of
    memory."""
    cdef Py_ssize_t nchunks = rows_chunks(nrows, nch), s, c, r0, r1, fails
    cdef bint far = beyond_caches(3 * nrows * nch * <Py_ssize_t>sizeof(float))  # as float32
    cdef Py_ssize_t rb = 16384 // (nch * <Py_ssize_t>sizeof(float))   # bn_cl_bwd_sums' blocks
    cdef Py_ssize_t piece
    cdef int nt = work_threads(n_threads, nchunks, nrows * nch, SERIAL_ELEMS)
    cdef double *buf
    cdef double *k
    cdef double *q
    cdef double *r
    if rb < (4 if far else 16):
        rb = 4 if far else 16
    piece = rb * max(1, HALF_ROWS_PIECE // (rb * nch))
    buf = <double *>bn_alloc64((2 * nchunks + 3) * nch * sizeof(double))
    if buf == NULL:
        return -1
    k = buf + 2 * nch * nchunks
    q = k + nch
    r = q + nch
    if bn_half_fused():
        # the float kernels' float16 twins read dy and x (and write dx) themselves
        for s in prange(nchunks, schedule='static', num_threads=team_threads(nt, n_threads)):
            r0 = s * nrows // nchunks
            r1 = (s + 1) * nrows // nchunks
            for c in range(2 * nch):
                buf[2 * nch * s + c] = 0
            bn_cl_bwd_sums_h16(dy + r0 * lddy, lddy, x + r0 * ldx, ldx, r1 - r0, nch, nch,
                               mean, buf + 2 * nch * s, buf + 2 * nch * s + nch, far)
        chunk_sums_coefficients(buf, nchunks, nch, invstd, w, 1.0 / <double>nrows, training,
                                dweight, dbias, k, q, r)
        for s in prange(nchunks, schedule='static', num_threads=team_threads(nt, n_threads)):
            r0 = s * nrows // nchunks
            r1 = (s + 1) * nrows // nchunks
            bn_cl_bwd_dx_h16(dy + r0 * lddy, lddy, x + r0 * ldx, ldx, dx + r0 * lddx, lddx,
                             r1 - r0, nch, mean, k, q, r, False, far)
        bn_free64(buf)
        return 0
    fails = rows_half_pass(True, dy, x, dx, nrows, nch, lddy, ldx, lddx, mean, buf, nchunks,
                           piece, far, nt, n_threads)
    if fails == 0:
        chunk_sums_coefficients(buf, nchunks, nch, invstd, w, 1.0 / <double>nrows, training,
                                dweight, dbias, k, q, r)
        fails = rows_half_pass(False, dy, x, dx, nrows, nch, lddy, ldx, lddx, mean, buf,
                               nchunks, piece, far, nt, n_threads)
    bn_free64(buf)
    return -1 if fails else 0


cdef Py_ssize_t rows_half_pass(bint sums, const uint16_t *dy, const uint16_t *x, uint16_t *dx,
                               Py_ssize_t nrows, Py_ssize_t nch, Py_ssize_t lddy,
                               Py_ssize_t ldx, Py_ssize_t lddx, const double *mean,
                               double *buf, Py_ssize_t nchunks, Py_ssize_t piece, bint far,
                               int nt, int n_threads) noexcept nogil:
    """One staged pass of backward_rows_half over its row chunks, a piece of rows of dy and
    x widened at a time: the sums (chunk s's at buf + 2 * nch * s), or, with the
    coefficients after the sums in buf, dx. Returns the threads that found no memory."""
    cdef Py_ssize_t s, c, r0, r1, nr, rr, fails = 0
    cdef double *k = buf + 2 * nch * nchunks
    cdef float *g = NULL   # (private in the parallel block; set for the compiler)
    cdef float *p
    with parallel(num_threads=team_threads(nt, n_threads)):
        g = <float *>bn_alloc64(2 * piece * nch * sizeof(float))
        for s in prange(nchunks, schedule='static'):
            if g == NULL:
                fails += 1
            else:
                p = g + piece * nch
                if sums:
                    for c in range(2 * nch):
                        buf[2 * nch * s + c] = 0
                r0 = s * nrows // nchunks
                r1 = (s + 1) * nrows // nchunks
                while r0 < r1:
                    nr = min(piece, r1 - r0)
                    half_rows(dy + r0 * lddy, lddy, g, nr, nch)
                    half_rows(x + r0 * ldx, ldx, p, nr, nch)
                    if sums:
                        cl_bwd_sums(<const float *>g, nch, <const float *>p, nch, nr, nch,
                                    mean, buf + 2 * nch * s, buf + 2 * nch * s + nch, far)
                    else:
                        cl_bwd_dx(<const float *>g, nch, <const float *>p, nch, g, nch, nr,
                                  nch, mean, k, k + nch, k + 2 * nch)
                        if lddx == nch:
                            bn_float_to_half(g, dx + r0 * lddx, nr * nch)
                        else:
                            for rr in range(nr):
                                bn_float_to_half(g + rr * nch, dx + (r0 + rr) * lddx, nch)
                    r0 = r0 + nr
        bn_free64(g)
    return fails


cdef inline void half_rows(const uint16_t *h, Py_ssize_t ld, float *f, Py_ssize_t nrows,
                           Py_ssize_t nch) noexcept nogil:
    """nrows float16 rows of nch values, ld apart, widened into f (rows nch apart)."""
    cdef Py_ssize_t i
    if ld == nch:
        bn_half_to_float(h, f, nrows * nch)
    else:
        for i in range(nrows):
            bn_half_to_float(h + i * ld, f + i * nch, nch)


def backward_halves(Py_ssize_t outer, Py_ssize_t nch, Py_ssize_t inner, bint rows):
    """Whether backward_half takes these views (else the caller widens dy and x and runs
    backward()): rows (inner 1, every array's channels contiguous) where backward_rows
    splits them by row chunks (not few_rows: backward_rows_half); planes where
    backward_planes takes float32 channels one by one with backward_channel (more than
    SMALL_CHANNEL values, not the by-sample walk of short planes beyond the caches), of up
    to HALF_CHANNEL values (backward_half_planes)."""
    if rows:
        return not few_rows(outer, nch)
    return (inner > 1 and SMALL_CHANNEL < outer * inner <= HALF_CHANNEL
            and not (inner * 4 < SAMPLE_PLANE and 12 * outer * nch * inner >= BY_SAMPLE_BYTES))


def backward_half(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t outer,
                  Py_ssize_t nch, Py_ssize_t inner, Py_ssize_t gso, Py_ssize_t gsc,
                  Py_ssize_t so, Py_ssize_t sc, Py_ssize_t dso, Py_ssize_t dsc,
                  cnp.ndarray mean, cnp.ndarray invstd, weight, bint training,
                  cnp.ndarray dweight, cnp.ndarray dbias, int n_threads):
    """backward() of float16 dy, x and dx where backward_halves: rows (inner 1, sc, gsc
    and dsc 1: backward_rows_half) or planes (backward_half_planes)."""
    cdef int rc
    cdef const double *pw = f64_or_null(weight)
    with nogil:
        if inner == 1 and sc == 1 and gsc == 1 and dsc == 1:
            rc = backward_rows_half(
                <const uint16_t *>cnp.PyArray_DATA(dy), <const uint16_t *>cnp.PyArray_DATA(x),
                <uint16_t *>cnp.PyArray_DATA(dx), outer, nch, gso, so, dso,
                <double *>cnp.PyArray_DATA(mean), <double *>cnp.PyArray_DATA(invstd), pw,
                training, <double *>cnp.PyArray_DATA(dweight),
                <double *>cnp.PyArray_DATA(dbias), n_threads)
        else:
            rc = backward_half_planes(
                <const uint16_t *>cnp.PyArray_DATA(dy), <const uint16_t *>cnp.PyArray_DATA(x),
                <uint16_t *>cnp.PyArray_DATA(dx), outer, nch, inner, gso, gsc, so, sc, dso,
                dsc, <double *>cnp.PyArray_DATA(mean), <double *>cnp.PyArray_DATA(invstd), pw,
                training, <double *>cnp.PyArray_DATA(dweight),
                <double *>cnp.PyArray_DATA(dbias), n_threads)
    if rc != 0:
        raise MemoryError("bncore: out of memory for float16 buffers")


def backward(cnp.ndarray dy, cnp.ndarray x, dx, Py_ssize_t outer, Py_ssize_t nch,
             Py_ssize_t inner, Py_ssize_t gso, Py_ssize_t gsc, Py_ssize_t so, Py_ssize_t sc,
             Py_ssize_t dso, Py_ssize_t dsc, cnp.ndarray mean, cnp.ndarray invstd, weight,
             bint training, cnp.ndarray dweight, cnp.ndarray dbias, int n_threads):
    """Batch-norm backward on canonical views of dy, x and dx (dx None: sums only).

    mean, invstd, weight (or None), dweight, dbias: float64 (nch,). dx may be dy.
    """
    cdef void *pg = cnp.PyArray_DATA(dy)
    cdef void *px = cnp.PyArray_DATA(x)
    cdef void *pd = NULL if dx is None else cnp.PyArray_DATA(<cnp.ndarray>dx)
    cdef const double *pm = <double *>cnp.PyArray_DATA(mean)
    cdef const double *pi = <double *>cnp.PyArray_DATA(invstd)
    cdef const double *pw = f64_or_null(weight)
    cdef double *pdw = <double *>cnp.PyArray_DATA(dweight)
    cdef double *pdb = <double *>cnp.PyArray_DATA(dbias)
    cdef bint is_f32 = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32
    cdef bint rows = inner == 1 and sc == 1 and gsc == 1 and (dx is None or dsc == 1)
    cdef int rc
    with nogil:
        if rows and is_f32:
            rc = backward_rows(<const float *>pg, <const float *>px, <float *>pd, outer, nch,
                               gso, so, dso, pm, pi, pw, training, pdw, pdb, n_threads,
                               NULL)
        elif rows:
            rc = backward_rows(<const double *>pg, <const double *>px, <double *>pd, outer,
                               nch, gso, so, dso, pm, pi, pw, training, pdw, pdb, n_threads,
                               NULL)
        elif is_f32:
            rc = backward_planes(<const float *>pg, <const float *>px, <float *>pd, outer, nch,
                                 inner, gso, gsc, so, sc, dso, dsc, pm, pi, pw, training, pdw,
                                 pdb, n_threads, NULL)
        else:
            rc = backward_planes(<const double *>pg, <const double *>px, <double *>pd, outer,
                                 nch, inner, gso, gsc, so, sc, dso, dsc, pm, pi, pw, training,
                                 pdw, pdb, n_threads, NULL)
    if rc != 0:
        raise MemoryError("bncore: out of memory for per-channel work arrays")


# ------------------------------------------------------------------ running statistics

def update_running(cnp.ndarray r, cnp.ndarray batch, double momentum, double factor):
    """r = (1 - momentum) * r + momentum * factor * batch, in place.

    r: 1-D float32/float64 in native byte order, any stride; batch: float64 contiguous.
    (NumPy's mixed-dtype expressions cost microseconds each; this is the hot path of small
    training calls.) Other dtypes take the NumPy route in the caller.
    """
    running_update(<char *>cnp.PyArray_DATA(r), r.strides[0],
                   cnp.PyArray_TYPE(r) == cnp.NPY_FLOAT32, r.shape[0],
                   <double *>cnp.PyArray_DATA(batch), momentum, factor)


cdef inline void running_update(char *p, Py_ssize_t st, bint is_f32, Py_ssize_t n,
                                const double *b, double momentum,
                                double factor) noexcept nogil:
    """r = (1 - momentum) * r + momentum * factor * b over n values st bytes apart."""
    cdef Py_ssize_t i
    cdef double keep = 1.0 - momentum, take = momentum * factor
    if is_f32:
        for i in range(n):
            (<float *>(p + i * st))[0] = <float>(keep * (<float *>(p + i * st))[0] + take * b[i])
    else:
        for i in range(n):
            (<double *>(p + i * st))[0] = keep * (<double *>(p + i * st))[0] + take * b[i]


# ------------------------------------------------------------------ the common call, fast

def forward_common(x, running_mean, running_var, weight, bias, training, momentum, eps,
                   axis, n_threads, out=None, bint stats=True):
    """batch_norm_forward for the common call, without the Python layer's overhead, or None.

    The common call: x an exact ndarray, float32/float64, C-contiguous, aligned, native,
    at least 2-D and not empty; an int axis in range; eps a finite float >= 0 (momentum a
    float, not NaN, when running stats are updated); weight, bias, running_mean and
    running_var None or plain (C,) float32/float64 vectors (running stats writeable when
    updated, both present in eval); more than one value per channel in training;
    n_threads None or an int >= 1. Anything else returns None before touching anything,
    and the caller takes the general path (bncore._api), which also raises every error.
    Same kernels and the same bits as that path. Returns (y, mean, invstd), the latter
    (C,) of x's dtype, or (y, None, None) when not stats (batch_norm's call: no arrays to
    make for statistics it drops).
    """
    cdef cnp.ndarray arr, y, mean = None, invstd = None
    cdef cnp.npy_intp dim
    cdef chan_io io
    cdef double *pm
    cdef double *pi
    cdef int xt, wt = -1, bt = -1, mt = -1, vt = -1, nd, ax, nt, ot
    cdef Py_ssize_t nch, outer = 1, inner = 1, i, m
    cdef bint train, update, rows
    cdef double ep, mom = 0.0
    cdef double *buf
    cdef double *pw
    cdef double *pb
    cdef double *pv
    cdef int rc
    ax = plain_channel_axis(x, axis, n_threads, &nt)
    if ax < 0 or not plain_eps(eps):
        return None
    arr = <cnp.ndarray>x
    xt = cnp.PyArray_TYPE(arr)
    nd = cnp.PyArray_NDIM(arr)
    ep = eps
    nch = cnp.PyArray_DIM(arr, ax)
    for i in range(ax):
        outer *= cnp.PyArray_DIM(arr, i)
    for i in range(ax + 1, nd):
        inner *= cnp.PyArray_DIM(arr, i)
    train = bool(training)
    if weight is not None and (wt := plain_vector(weight, nch)) < 0:
        return None
    if bias is not None and (bt := plain_vector(bias, nch)) < 0:
        return None
    if running_mean is not None and (mt := plain_vector(running_mean, nch)) < 0:
        return None
    if running_var is not None and (vt := plain_vector(running_var, nch)) < 0:
        return None
    update = train and (running_mean is not None or running_var is not None)
    if train:
        if outer * inner == 1:
            return None
        if update:
            if type(momentum) is not float or momentum != momentum:
                return None
            mom = momentum
            if ((mt >= 0 and not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>running_mean))
                    or (vt >= 0 and not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>running_var))):
                return None
            # each thread updates its channels' running statistics as it finishes them
            # (chan_io), while others may still read: running statistics that share
            # memory with x, a weight or each other go to the general path, which
            # updates them after
            if (running_shares(running_mean, (x, weight, bias, running_var))
                    or running_shares(running_var, (x, weight, bias, running_mean))):
                return None
    elif mt < 0 or vt < 0:
        return None
    ot = plain_out(out, x, None, (weight, bias, running_mean, running_var))
    if ot < 0:
        return None
    # valid: nothing below can fail but for memory
    y = <cnp.ndarray>out if ot else empty_apart(nd, cnp.PyArray_DIMS(arr), xt, arr, None)
    # the kernels' mean and invstd in buf, made arrays of x's dtype (only when asked for:
    # NumPy's astype calls after had been 0.75 us of a small call); each channel's
    # converted in and out by the thread that works on it (chan_io), the running
    # statistics updated so too
    buf = <double *>bn_alloc64(5 * nch * sizeof(double))
    if buf == NULL:
        raise MemoryError("bncore: out of memory for per-channel work arrays")
    pm = buf + 3 * nch
    pi = buf + 4 * nch
    pv = buf
    pw = NULL
    pb = NULL
    io_clear(&io)
    if wt >= 0:
        pw = buf + nch
        io_src(&io, 0, weight, wt, pw)
    if bt >= 0:
        pb = buf + 2 * nch
        io_src(&io, 1, bias, bt, pb)
    if not train:
        io_src(&io, 2, running_mean, mt, pm)
        io_src(&io, 3, running_var, vt, pv)
    if stats:
        dim = nch
        mean = cnp.PyArray_EMPTY(1, &dim, xt, 0)
        invstd = cnp.PyArray_EMPTY(1, &dim, xt, 0)
        io_result(&io, 0, pm, mean, xt)
        io_result(&io, 1, pi, invstd, xt)
    if update:
        io.momentum = mom
        if mt >= 0:
            io_running(&io, 0, running_mean, mt, pm, 1.0)
        if vt >= 0:
            m = outer * inner
            io_running(&io, 1, running_var, vt, pv, <double>m / <double>(m - 1))
    rows = inner == 1
    with nogil:
        if rows and xt == cnp.NPY_FLOAT32:
            rc = forward_rows(<const float *>cnp.PyArray_DATA(arr), <float *>cnp.PyArray_DATA(y),
                              outer, nch, nch, nch, pm, pv, pi, pw, pb, train, ep, nt, &io)
        elif rows:
            rc = forward_rows(<const double *>cnp.PyArray_DATA(arr),
                              <double *>cnp.PyArray_DATA(y), outer, nch, nch, nch, pm, pv, pi,
                              pw, pb, train, ep, nt, &io)
        elif xt == cnp.NPY_FLOAT32:
            rc = forward_planes(<const float *>cnp.PyArray_DATA(arr),
                                <float *>cnp.PyArray_DATA(y), outer, nch, inner, nch * inner,
                                inner, nch * inner, inner, pm, pv, pi, pw, pb, train, ep, nt,
                                &io)
        else:
            rc = forward_planes(<const double *>cnp.PyArray_DATA(arr),
                                <double *>cnp.PyArray_DATA(y), outer, nch, inner, nch * inner,
                                inner, nch * inner, inner, pm, pv, pi, pw, pb, train, ep, nt,
                                &io)
    bn_free64(buf)
    if rc != 0:
        raise MemoryError("bncore: out of memory for per-channel work arrays")
    return (y, mean, invstd) if stats else (y, None, None)



def backward_common(dy, x, save_mean, save_invstd, weight, training, axis, n_threads,
                    out=None):
    """batch_norm_backward for the common call, without the Python layer's overhead, or
    None: x plain (see forward_common), dy a plain array of x's dtype and shape, save_mean
    and save_invstd plain (C,) vectors, weight None or one, an int axis, n_threads None or
    an int >= 1. Anything else returns None and the general path (bncore._api) takes the
    call. Returns (dx, dweight, dbias), the latter (C,) of x's dtype."""
    cdef cnp.ndarray arr, dx, dweight, dbias
    cdef cnp.npy_intp dim
    cdef chan_io io
    cdef int xt, mt, st, wt = -1, nd, ax, nt, rc, ot
    cdef Py_ssize_t nch, outer = 1, inner = 1, i
    cdef bint train
    cdef double *buf
    cdef double *pw = NULL
    cdef double *pdw
    cdef double *pdb
    ax = plain_channel_axis(x, axis, n_threads, &nt)
    if ax < 0 or not plain_like(dy, x):
        return None
    arr = <cnp.ndarray>x
    xt = cnp.PyArray_TYPE(arr)
    nd = cnp.PyArray_NDIM(arr)
    nch = cnp.PyArray_DIM(arr, ax)
    mt = plain_vector(save_mean, nch)
    st = plain_vector(save_invstd, nch)
    if mt < 0 or st < 0 or (weight is not None and (wt := plain_vector(weight, nch)) < 0):
        return None
    for i in range(ax):
        outer *= cnp.PyArray_DIM(arr, i)
    for i in range(ax + 1, nd):
        inner *= cnp.PyArray_DIM(arr, i)
    train = bool(training)
    ot = plain_out(out, x, dy, (save_mean, save_invstd, weight))
    if ot < 0:
        return None
    # valid: nothing below can fail but for memory
    dx = <cnp.ndarray>out if ot else empty_apart(nd, cnp.PyArray_DIMS(arr), xt, dy, x)
    # dweight and dbias made here in x's dtype (NumPy's two astype calls after had been
    # 0.75 us of a 12 us (1, 512, 7, 7) call); the kernels' doubles in buf, each channel's
    # converted in and out by the thread that works on it (chan_io)
    dim = nch
    dweight = cnp.PyArray_EMPTY(1, &dim, xt, 0)
    dbias = cnp.PyArray_EMPTY(1, &dim, xt, 0)
    buf = <double *>bn_alloc64(5 * nch * sizeof(double))
    if buf == NULL:
        raise MemoryError("bncore: out of memory for per-channel work arrays")
    pdw = buf + 3 * nch
    pdb = buf + 4 * nch
    io_clear(&io)
    io_src(&io, 0, save_mean, mt, buf)
    io_src(&io, 1, save_invstd, st, buf + nch)
    if wt >= 0:
        pw = buf + 2 * nch
        io_src(&io, 2, weight, wt, pw)
    io_result(&io, 0, pdw, dweight, xt)
    io_result(&io, 1, pdb, dbias, xt)
    with nogil:
        if inner == 1 and xt == cnp.NPY_FLOAT32:
            rc = backward_rows(<const float *>cnp.PyArray_DATA(<cnp.ndarray>dy),
                               <const float *>cnp.PyArray_DATA(arr),
                               <float *>cnp.PyArray_DATA(dx), outer, nch, nch, nch, nch, buf,
                               buf + nch, pw, train, pdw, pdb, nt, &io)
        elif inner == 1:
            rc = backward_rows(<const double *>cnp.PyArray_DATA(<cnp.ndarray>dy),
                               <const double *>cnp.PyArray_DATA(arr),
                               <double *>cnp.PyArray_DATA(dx), outer, nch, nch, nch, nch, buf,
                               buf + nch, pw, train, pdw, pdb, nt, &io)
        elif xt == cnp.NPY_FLOAT32:
            rc = backward_planes(<const float *>cnp.PyArray_DATA(<cnp.ndarray>dy),
                                 <const float *>cnp.PyArray_DATA(arr),
                                 <float *>cnp.PyArray_DATA(dx), outer, nch, inner, nch * inner,
                                 inner, nch * inner, inner, nch * inner, inner, buf, buf + nch,
                                 pw, train, pdw, pdb, nt, &io)
        else:
            rc = backward_planes(<const double *>cnp.PyArray_DATA(<cnp.ndarray>dy),
                                 <const double *>cnp.PyArray_DATA(arr),
                                 <double *>cnp.PyArray_DATA(dx), outer, nch, inner,
                                 nch * inner, inner, nch * inner, inner, nch * inner, inner,
                                 buf, buf + nch, pw, train,
                                 pdw, pdb, nt, &io)
    bn_free64(buf)
    if rc != 0:
        raise MemoryError("bncore: out of memory for per-channel work arrays")
    return dx, dweight, dbias


include "_thresholds.pxi"
