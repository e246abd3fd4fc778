# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""nogil kernel declarations and the tiling shared by every bncore kernel module.

Other Cython code can ``cimport bncore._kernels`` and call these directly: they take raw
pointers and element strides, never touch Python objects and never raise.

Tiling (see DESIGN.md "Kernels and numerics"):

- planes: a channel is ``outer`` planes of ``inner`` contiguous values, ``so`` elements
  apart. Its values are cut into blocks of about BLOCK elements (a slice of a long plane,
  or several short planes) so that both passes of the block statistics run in L1. The
  block sequence depends on the shape only, so does every result.
- rows: ``R`` rows of ``C`` contiguous channels, ``ld`` apart. Row blocks of ``rows_per_block``
  rows (the last of a chunk up to twice that: block_rows) by at most CHANNEL_BLOCK
  channels are reduced across channels at once, in one pass
  around per-channel shifts (bn_cl_moments_shift), then merged into per-channel states
  that share one count.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport isfinite
from libc.stdint cimport uint16_t

from bncore._openmp cimport team_threads, work_threads

cdef extern from "bn_kernels.h" nogil:
    ctypedef struct bn_moments:
        double n
        double mean
        double m2
        double shift
    const char *bn_simd_level()
    void *bn_alloc64(size_t n)
    void bn_free64(void *p)
    Py_ssize_t bn_stream_fwd
    Py_ssize_t bn_stream_bwd
    Py_ssize_t bn_far_bytes
    Py_ssize_t bn_l2_bytes
    Py_ssize_t bn_l1_bytes
    void bn_set_thresholds(Py_ssize_t fwd, Py_ssize_t bwd, Py_ssize_t far, Py_ssize_t l2,
                           Py_ssize_t l1)
    void bn_init_thresholds()
    int bn_set_v4(int on)
    void bn_init_f16c()
    int bn_set_f16c(int on)
    int bn_set_half_level(int level)
    int bn_half_fused()
    void bn_seg_bwd_sums_h16(const uint16_t *dy, const uint16_t *x, Py_ssize_t nseg,
                             Py_ssize_t len, Py_ssize_t sdy, Py_ssize_t sx, double mean,
                             double *sum_dy, double *sum_dy_xmu)
    void bn_cl_bwd_sums_h16(const uint16_t *dy, Py_ssize_t lddy, const uint16_t *x,
                            Py_ssize_t ldx, Py_ssize_t nrows, Py_ssize_t nch, Py_ssize_t width,
                            const double *mean, double *sum_dy, double *sum_dy_xmu, int far)
    void bn_cl_bwd_dx_h16(const uint16_t *dy, Py_ssize_t lddy, const uint16_t *x,
                          Py_ssize_t ldx, uint16_t *dx, Py_ssize_t lddx, Py_ssize_t nrows,
                          Py_ssize_t nch, const double *mean, const double *k, const double *q,
                          const double *r, int stream, int far)
    void bn_seg_bwd_dx_h16(const uint16_t *dy, const uint16_t *x, uint16_t *dx,
                           Py_ssize_t nseg, Py_ssize_t len, Py_ssize_t sdy, Py_ssize_t sx,
                           Py_ssize_t sdx, double mean, double k, double q, double r,
                           int stream, const uint16_t *pg, const uint16_t *px, Py_ssize_t gso,
                           Py_ssize_t so)
    void bn_half_to_float(const uint16_t *x, float *y, Py_ssize_t n)
    void bn_float_to_half(const float *x, uint16_t *y, Py_ssize_t n)
    void bn_cl_float_params(const double *mean, const double *scale, const double *shift,
                            Py_ssize_t n, float *hi, float *lo, float *k, float *b)
    void bn_affine_half(const uint16_t *x, uint16_t *y, Py_ssize_t n, float hi, float lo,
                        float k, float b)
    void bn_rows_affine_half(const uint16_t *x, Py_ssize_t ldx, uint16_t *y, Py_ssize_t ldy,
                             Py_ssize_t nrows, Py_ssize_t nch, const float *hi,
                             const float *lo, const float *k, const float *b)
    Py_ssize_t bn_llc_bytes()
    double bn_pivot(double first)
    void bn_chan_merge(bn_moments *a, double nb, double mb, double m2b)
    void bn_group_param_grads(double *dweight, double *dbias, const double *sum_dy_xmu,
                              const double *sum_dy, const double *invstd, Py_ssize_t n,
                              Py_ssize_t g, Py_ssize_t cg)
    void bn_chan_merge_vec(double na, double *mean, double *m2, double nb, const double *mb,
                           const double *m2b, Py_ssize_t nch)

    void bn_seg_moments_f32(const float *x, Py_ssize_t nseg, Py_ssize_t len, Py_ssize_t stride,
                            double pivot, double *mean, double *m2)
    void bn_seg_moments_f64(const double *x, Py_ssize_t nseg, Py_ssize_t len, Py_ssize_t stride,
                            double pivot, double *mean, double *m2)
    const Py_ssize_t BN_RUN_MAX
    void bn_run_moments_f32(const float *x, Py_ssize_t nseg, Py_ssize_t len,
                            Py_ssize_t stride, double *shift, double *mean, double *m2)
    void bn_plane_run_stats_f32(const float *x, Py_ssize_t outer, Py_ssize_t inner,
                                Py_ssize_t so, Py_ssize_t b0, Py_ssize_t b1, Py_ssize_t block,
                                double pivot, bn_moments *st)
    void bn_seg_moments_pf_f32(const float *x, Py_ssize_t len, double pivot, double *mean,
                               double *m2, const float *pf, Py_ssize_t nnext)
    void bn_seg_moments_pf_f64(const double *x, Py_ssize_t len, double pivot, double *mean,
                               double *m2, const double *pf, Py_ssize_t nnext)
    void bn_run_moments_pf_f32(const float *x, Py_ssize_t nseg, Py_ssize_t len,
                               Py_ssize_t stride, double *shift, double *mean, double *m2,
                               const float *pf, Py_ssize_t prows, Py_ssize_t pwidth,
                               Py_ssize_t pld)
    double bn_seg_sumsq_f32(const float *x, Py_ssize_t nseg, Py_ssize_t len, Py_ssize_t stride)
    double bn_seg_sumsq_f64(const double *x, Py_ssize_t nseg, Py_ssize_t len, Py_ssize_t stride)
    void bn_affine_f32(const float *x, float *y, Py_ssize_t n, double mean, double scale,
                       double shift)
    void bn_affine_f64(const double *x, double *y, Py_ssize_t n, double mean, double scale,
                       double shift)
    void bn_seg_affine_f32(const float *x, float *y, Py_ssize_t nseg, Py_ssize_t len,
                           Py_ssize_t sx, Py_ssize_t sy, double mean, double scale,
                           double shift)
    void bn_seg_affine_f64(const double *x, double *y, Py_ssize_t nseg, Py_ssize_t len,
                           Py_ssize_t sx, Py_ssize_t sy, double mean, double scale,
                           double shift)
    void bn_seg_affine_stream_f32(const float *x, float *y, Py_ssize_t nseg, Py_ssize_t len,
                                  Py_ssize_t sx, Py_ssize_t sy, double mean, double scale,
                                  double shift)
    void bn_seg_affine_stream_f64(const double *x, double *y, Py_ssize_t nseg, Py_ssize_t len,
                                  Py_ssize_t sx, Py_ssize_t sy, double mean, double scale,
                                  double shift)
    void bn_planes_affine_f32(const float *x, float *y, Py_ssize_t t0, Py_ssize_t nplanes,
                              Py_ssize_t nch, Py_ssize_t inner, Py_ssize_t so, Py_ssize_t sc,
                              Py_ssize_t yso, Py_ssize_t ysc, const double *mean,
                              const double *invstd, const double *w, const double *b,
                              int stream)
    void bn_planes_affine_f64(const double *x, double *y, Py_ssize_t t0, Py_ssize_t nplanes,
                              Py_ssize_t nch, Py_ssize_t inner, Py_ssize_t so, Py_ssize_t sc,
                              Py_ssize_t yso, Py_ssize_t ysc, const double *mean,
                              const double *invstd, const double *w, const double *b,
                              int stream)
    void bn_planes_affine_rect_f32(const float *x, float *y, Py_ssize_t n0, Py_ssize_t n1,
                                   Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t inner,
                                   Py_ssize_t so, Py_ssize_t yso, const double *mean,
                                   const double *invstd, const double *w, const double *b)
    void bn_planes_affine_rect_f64(const double *x, double *y, Py_ssize_t n0, Py_ssize_t n1,
                                   Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t inner,
                                   Py_ssize_t so, Py_ssize_t yso, const double *mean,
                                   const double *invstd, const double *w, const double *b)
    const Py_ssize_t BN_SHORT_REUSE
    const Py_ssize_t BN_SHORT_PLANE_F32
    const Py_ssize_t BN_SHORT_PLANE_F64
    void bn_seg_affine_pf_f32(const float *x, float *y, Py_ssize_t len, double mean,
                              double scale, double shift, int stream, const void *pf,
                              const void *pe)
    void bn_seg_affine_pf_f64(const double *x, double *y, Py_ssize_t len, double mean,
                              double scale, double shift, int stream, const void *pf,
                              const void *pe)
    void bn_seg_bwd_dx_pf_f32(const float *dy, const float *x, float *dx, Py_ssize_t len,
                              double mean, double k, double q, double r, int stream,
                              const float *pg, const float *px, Py_ssize_t npf)
    void bn_seg_bwd_dx_pf_f64(const double *dy, const double *x, double *dx, Py_ssize_t len,
                              double mean, double k, double q, double r, int stream,
                              const double *pg, const double *px, Py_ssize_t npf)
    void bn_prefetch_seg_f32(const float *x, Py_ssize_t nseg, Py_ssize_t len, Py_ssize_t stride)
    void bn_prefetch_seg_f64(const double *x, Py_ssize_t nseg, Py_ssize_t len, Py_ssize_t stride)
    void bn_affine_vec_f32(const float *x, float *y, Py_ssize_t n, double mean, double invstd,
                           const double *w, const double *b)
    void bn_affine_vec_f64(const double *x, double *y, Py_ssize_t n, double mean, double invstd,
                           const double *w, const double *b)
    void bn_seg_bwd_sums_f32(const float *dy, const float *x, Py_ssize_t nseg, Py_ssize_t len,
                             Py_ssize_t sdy, Py_ssize_t sx, double mean, double *sum_dy,
                             double *sum_dy_xmu, Py_ssize_t pd)
    void bn_seg_bwd_sums_f64(const double *dy, const double *x, Py_ssize_t nseg,
                             Py_ssize_t len, Py_ssize_t sdy, Py_ssize_t sx, double mean,
                             double *sum_dy, double *sum_dy_xmu, Py_ssize_t pd)
    void bn_seg_bwd_sums_many_f32(const float *dy, const float *x, Py_ssize_t nch,
                                  Py_ssize_t nseg, Py_ssize_t len, Py_ssize_t sdy,
                                  Py_ssize_t sx, Py_ssize_t gsc, Py_ssize_t sc,
                                  const double *mean, double *sum_dy, double *sum_dy_xmu)
    void bn_seg_bwd_sums_many_f64(const double *dy, const double *x, Py_ssize_t nch,
                                  Py_ssize_t nseg, Py_ssize_t len, Py_ssize_t sdy,
                                  Py_ssize_t sx, Py_ssize_t gsc, Py_ssize_t sc,
                                  const double *mean, double *sum_dy, double *sum_dy_xmu)
    void bn_seg_bwd_fused_f32(const float *dy, const float *x, float *dx, Py_ssize_t nch,
                              Py_ssize_t nseg, Py_ssize_t len, Py_ssize_t sdy, Py_ssize_t sx,
                              Py_ssize_t sdx, Py_ssize_t gsc, Py_ssize_t sc, Py_ssize_t dsc,
                              const double *mean, const double *invstd, const double *w,
                              double inv_m, int training, double *sum_dy,
                              double *sum_dy_xmu)
    enum: BN_FUSED_MAX
    void bn_seg_bwd_dx_many_f32(const float *dy, const float *x, float *dx, Py_ssize_t nch,
                                Py_ssize_t nseg, Py_ssize_t len, Py_ssize_t sdy,
                                Py_ssize_t sx, Py_ssize_t sdx, Py_ssize_t gsc, Py_ssize_t sc,
                                Py_ssize_t dsc, const double *mean, const double *k,
                                const double *q, const double *r, int stream)
    void bn_seg_bwd_dx_many_f64(const double *dy, const double *x, double *dx, Py_ssize_t nch,
                                Py_ssize_t nseg, Py_ssize_t len, Py_ssize_t sdy,
                                Py_ssize_t sx, Py_ssize_t sdx, Py_ssize_t gsc, Py_ssize_t sc,
                                Py_ssize_t dsc, const double *mean, const double *k,
                                const double *q, const double *r, int stream)
    void bn_bwd_dx_f32(const float *dy, const float *x, float *dx, Py_ssize_t n, double mean,
                       double k, double q, double r)
    void bn_bwd_dx_f64(const double *dy, const double *x, double *dx, Py_ssize_t n, double mean,
                       double k, double q, double r)
    void bn_cl_moments_shift_f32(const float *x, Py_ssize_t nrows, Py_ssize_t nch,
                                 Py_ssize_t ld, const double *K, const double *pivot,
                                 const float *next, Py_ssize_t nnext, Py_ssize_t next_rows,
                                 Py_ssize_t next_ld, double *mean, double *m2)
    void bn_cl_moments_shift_f64(const double *x, Py_ssize_t nrows, Py_ssize_t nch,
                                 Py_ssize_t ld, const double *K, const double *pivot,
                                 const double *next, Py_ssize_t nnext, Py_ssize_t next_rows,
                                 Py_ssize_t next_ld, double *mean, double *m2)
    void bn_cl_affine_f32(const float *x, Py_ssize_t ldx, float *y, Py_ssize_t ldy,
                          Py_ssize_t nrows, Py_ssize_t nch, const double *mean,
                          const double *scale, const double *shift)
    void bn_cl_affine_f64(const double *x, Py_ssize_t ldx, double *y, Py_ssize_t ldy,
                          Py_ssize_t nrows, Py_ssize_t nch, const double *mean,
                          const double *scale, const double *shift)
    void bn_group_affine_f32(const float *x, float *y, Py_ssize_t cg, Py_ssize_t s,
                             double mean, const double *k, const double *b, int stream)
    void bn_group_affine_f64(const double *x, double *y, Py_ssize_t cg, Py_ssize_t s,
                             double mean, const double *k, const double *b, int stream)
    void bn_cl_group_pipe_f32(const float *xa, float *ya, const float *xb, Py_ssize_t ld,
                              Py_ssize_t nrows, Py_ssize_t nch, double mean_a,
                              const double *scale, const double *shift, int stream,
                              double *shift_b, double *mean_b, double *m2_b)
    void bn_cl_affine_group_f64(const double *x, Py_ssize_t ldx, double *y, Py_ssize_t ldy,
                                Py_ssize_t nrows, Py_ssize_t nch, double mean,
                                const double *scale, const double *shift, int stream)
    int bn_shift_moments_f64(const double *x, Py_ssize_t nseg, Py_ssize_t len,
                             Py_ssize_t stride, double K, double *mean, double *m2)
    void bn_cl_affine_stream_f32(const float *x, Py_ssize_t ldx, float *y, Py_ssize_t ldy,
                                 Py_ssize_t nrows, Py_ssize_t nch, const double *mean,
                                 const double *scale, const double *shift)
    void bn_cl_affine_stream_f64(const double *x, Py_ssize_t ldx, double *y, Py_ssize_t ldy,
                                 Py_ssize_t nrows, Py_ssize_t nch, const double *mean,
                                 const double *scale, const double *shift)
    void bn_cl_bwd_sums_f32(const float *dy, Py_ssize_t lddy, const float *x, Py_ssize_t ldx,
                            Py_ssize_t nrows, Py_ssize_t nch, Py_ssize_t width,
                            const double *mean, double *sum_dy, double *sum_dy_xmu, int far)
    void bn_cl_bwd_sums_f64(const double *dy, Py_ssize_t lddy, const double *x, Py_ssize_t ldx,
                            Py_ssize_t nrows, Py_ssize_t nch, Py_ssize_t width,
                            const double *mean, double *sum_dy, double *sum_dy_xmu, int far)
    void bn_cl_bwd_dx_f32(const float *dy, Py_ssize_t lddy, const float *x, Py_ssize_t ldx,
                          float *dx, Py_ssize_t lddx, Py_ssize_t nrows, Py_ssize_t nch,
                          const double *mean, const double *k, const double *q,
                          const double *r, int stream, int far)
    void bn_seg_bwd_dx_f32(const float *dy, const float *x, float *dx, Py_ssize_t nseg,
                           Py_ssize_t len, Py_ssize_t sdy, Py_ssize_t sx, Py_ssize_t sdx,
                           double mean, double k, double q, double r, int stream)
    void bn_cl_bwd_dx_f64(const double *dy, Py_ssize_t lddy, const double *x, Py_ssize_t ldx,
                          double *dx, Py_ssize_t lddx, Py_ssize_t nrows, Py_ssize_t nch,
                          const double *mean, const double *k, const double *q,
                          const double *r, int stream, int far)
    void bn_seg_bwd_dx_f64(const double *dy, const double *x, double *dx, Py_ssize_t nseg,
                           Py_ssize_t len, Py_ssize_t sdy, Py_ssize_t sx, Py_ssize_t sdx,
                           double mean, double k, double q, double r, int stream)


cdef enum:
    BLOCK = 2048            # elements per statistics block: 8 KiB f32, 16 KiB f64 (L1)
    CHANNEL_BLOCK = 256     # channels per rows block: the per-channel sums stay in L1
    MAX_CHUNKS = 64         # shape-only parallel split; keeps partials O(C)
    CHUNK_ELEMS = 65536     # at least this many values per parallel chunk
    SERIAL_ELEMS = 32768    # below this, threads cost more than they give


# ------------------------------------------------------------------ typed dispatch

cdef inline void seg_moments(const floating *x, Py_ssize_t nseg, Py_ssize_t length,
                             Py_ssize_t stride, double pivot, double *mean,
                             double *m2) noexcept nogil:
    if floating is float:
        bn_seg_moments_f32(x, nseg, length, stride, pivot, mean, m2)
    else:
        bn_seg_moments_f64(x, nseg, length, stride, pivot, mean, m2)


cdef inline void seg_moments_pf(const floating *x, Py_ssize_t length, double pivot,
                                double *mean, double *m2, const floating *pf,
                                Py_ssize_t nnext) noexcept nogil:
    """seg_moments of one segment, prefetching nnext elements at pf (NULL: none) in its
    first pass."""
    if floating is float:
        bn_seg_moments_pf_f32(x, length, pivot, mean, m2, pf,
                              nnext * <Py_ssize_t>sizeof(float))
    else:
        bn_seg_moments_pf_f64(x, length, pivot, mean, m2, pf,
                              nnext * <Py_ssize_t>sizeof(double))


cdef inline double seg_sumsq(const floating *x, Py_ssize_t nseg, Py_ssize_t length,
                             Py_ssize_t stride) noexcept nogil:
    if floating is float:
        return bn_seg_sumsq_f32(x, nseg, length, stride)
    else:
        return bn_seg_sumsq_f64(x, nseg, length, stride)


cdef inline void affine(const floating *x, floating *y, Py_ssize_t n, double mean,
                        double scale, double shift) noexcept nogil:
    if floating is float:
        bn_affine_f32(x, y, n, mean, scale, shift)
    else:
        bn_affine_f64(x, y, n, mean, scale, shift)


cdef inline void seg_affine(const floating *x, floating *y, Py_ssize_t nseg, Py_ssize_t length,
                            Py_ssize_t sx, Py_ssize_t sy, double mean, double scale,
                            double shift) noexcept nogil:
    if floating is float:
        bn_seg_affine_f32(x, y, nseg, length, sx, sy, mean, scale, shift)
    else:
        bn_seg_affine_f64(x, y, nseg, length, sx, sy, mean, scale, shift)


cdef inline void seg_affine_stream(const floating *x, floating *y, Py_ssize_t nseg,
                                   Py_ssize_t length, Py_ssize_t sx, Py_ssize_t sy,
                                   double mean, double scale, double shift) noexcept nogil:
    if floating is float:
        bn_seg_affine_stream_f32(x, y, nseg, length, sx, sy, mean, scale, shift)
    else:
        bn_seg_affine_stream_f64(x, y, nseg, length, sx, sy, mean, scale, shift)


cdef inline void planes_affine(const floating *x, floating *y, Py_ssize_t t0,
                               Py_ssize_t nplanes, Py_ssize_t nch, Py_ssize_t inner,
                               Py_ssize_t so, Py_ssize_t sc, Py_ssize_t yso, Py_ssize_t ysc,
                               const double *mean, const double *invstd, const double *w,
                               const double *b, bint stream) noexcept nogil:
    if floating is float:
        bn_planes_affine_f32(x, y, t0, nplanes, nch, inner, so, sc, yso, ysc, mean, invstd, w,
                             b, stream)
    else:
        bn_planes_affine_f64(x, y, t0, nplanes, nch, inner, so, sc, yso, ysc, mean, invstd, w,
                             b, stream)


cdef inline bint short_planes(Py_ssize_t inner, Py_ssize_t itemsize) noexcept nogil:
    """Planes too short for an affine of their own (bn_planes_affine_rect)."""
    return inner < (BN_SHORT_PLANE_F32 if itemsize == 4 else BN_SHORT_PLANE_F64)


cdef inline void planes_affine_rect(const floating *x, floating *y, Py_ssize_t n0,
                                    Py_ssize_t n1, Py_ssize_t c0, Py_ssize_t c1,
                                    Py_ssize_t inner, Py_ssize_t so, Py_ssize_t yso,
                                    const double *mean, const double *invstd, const double *w,
                                    const double *b) noexcept nogil:
    if floating is float:
        bn_planes_affine_rect_f32(x, y, n0, n1, c0, c1, inner, so, yso, mean, invstd, w, b)
    else:
        bn_planes_affine_rect_f64(x, y, n0, n1, c0, c1, inner, so, yso, mean, invstd, w, b)


cdef inline void seg_affine_pf(const floating *x, floating *y, Py_ssize_t length,
                               double mean, double scale, double shift, bint stream,
                               const floating *pf, Py_ssize_t npf) noexcept nogil:
    """y = (x - mean) * scale + shift over one segment while prefetching pf[0..npf)."""
    if floating is float:
        bn_seg_affine_pf_f32(x, y, length, mean, scale, shift, stream, pf, pf + npf)
    else:
        bn_seg_affine_pf_f64(x, y, length, mean, scale, shift, stream, pf, pf + npf)


cdef inline void seg_bwd_dx_pf(const floating *dy, const floating *x, floating *dx,
                               Py_ssize_t length, double mean, double k, double q, double r,
                               bint stream, const floating *pg, const floating *px,
                               Py_ssize_t npf) noexcept nogil:
    """dx = k*dy + q*(x - mean) + r over one segment while prefetching pg[0..npf) and
    px[0..npf)."""
    if floating is float:
        bn_seg_bwd_dx_pf_f32(dy, x, dx, length, mean, k, q, r, stream, pg, px, npf)
    else:
        bn_seg_bwd_dx_pf_f64(dy, x, dx, length, mean, k, q, r, stream, pg, px, npf)


cdef inline void prefetch_seg(const floating *x, Py_ssize_t nseg, Py_ssize_t length,
                              Py_ssize_t stride) noexcept nogil:
    if floating is float:
        bn_prefetch_seg_f32(x, nseg, length, stride)
    else:
        bn_prefetch_seg_f64(x, nseg, length, stride)


cdef inline void affine_vec(const floating *x, floating *y, Py_ssize_t n, double mean,
                            double invstd, const double *w, const double *b) noexcept nogil:
    if floating is float:
        bn_affine_vec_f32(x, y, n, mean, invstd, w, b)
    else:
        bn_affine_vec_f64(x, y, n, mean, invstd, w, b)


cdef inline void seg_bwd_sums(const floating *dy, const floating *x, Py_ssize_t nseg,
                              Py_ssize_t length, Py_ssize_t sdy, Py_ssize_t sx, double mean,
                              double *sum_dy, double *sum_dy_xmu,
                              Py_ssize_t pd=0) noexcept nogil:
    """sum(dy) and sum(dy * (x - mean)) over nseg segments, added to; with pd > 0, each
    segment prefetches the one pd segments on, in both arrays (see plane_fetch)."""
    if floating is float:
        bn_seg_bwd_sums_f32(dy, x, nseg, length, sdy, sx, mean, sum_dy, sum_dy_xmu, pd)
    else:
        bn_seg_bwd_sums_f64(dy, x, nseg, length, sdy, sx, mean, sum_dy, sum_dy_xmu, pd)


cdef inline void seg_bwd_sums_many(const floating *dy, const floating *x, Py_ssize_t nch,
                                   Py_ssize_t nseg, Py_ssize_t length, Py_ssize_t sdy,
                                   Py_ssize_t sx, Py_ssize_t gsc, Py_ssize_t sc,
                                   const double *mean, double *sum_dy,
                                   double *sum_dy_xmu) noexcept nogil:
    if floating is float:
        bn_seg_bwd_sums_many_f32(dy, x, nch, nseg, length, sdy, sx, gsc, sc, mean, sum_dy,
                                 sum_dy_xmu)
    else:
        bn_seg_bwd_sums_many_f64(dy, x, nch, nseg, length, sdy, sx, gsc, sc, mean, sum_dy,
                                 sum_dy_xmu)


cdef inline void seg_bwd_dx_many(const floating *dy, const floating *x, floating *dx,
                                 Py_ssize_t nch, Py_ssize_t nseg, Py_ssize_t length,
                                 Py_ssize_t sdy, Py_ssize_t sx, Py_ssize_t sdx, Py_ssize_t gsc,
                                 Py_ssize_t sc, Py_ssize_t dsc, const double *mean,
                                 const double *k, const double *q, const double *r,
                                 bint stream) noexcept nogil:
    if floating is float:
        bn_seg_bwd_dx_many_f32(dy, x, dx, nch, nseg, length, sdy, sx, sdx, gsc, sc, dsc, mean,
                               k, q, r, stream)
    else:
        bn_seg_bwd_dx_many_f64(dy, x, dx, nch, nseg, length, sdy, sx, sdx, gsc, sc, dsc, mean,
                               k, q, r, stream)


cdef inline void bwd_dx(const floating *dy, const floating *x, floating *dx, Py_ssize_t n,
                        double mean, double k, double q, double r) noexcept nogil:
    if floating is float:
        bn_bwd_dx_f32(dy, x, dx, n, mean, k, q, r)
    else:
        bn_bwd_dx_f64(dy, x, dx, n, mean, k, q, r)


cdef inline void cl_affine(const floating *x, Py_ssize_t ldx, floating *y, Py_ssize_t ldy,
                           Py_ssize_t nrows, Py_ssize_t nch, const double *mean,
                           const double *scale, const double *shift) noexcept nogil:
    if floating is float:
        bn_cl_affine_f32(x, ldx, y, ldy, nrows, nch, mean, scale, shift)
    else:
        bn_cl_affine_f64(x, ldx, y, ldy, nrows, nch, mean, scale, shift)


cdef inline void cl_affine_stream(const floating *x, Py_ssize_t ldx, floating *y,
                                  Py_ssize_t ldy, Py_ssize_t nrows, Py_ssize_t nch,
                                  const double *mean, const double *scale,
                                  const double *shift) noexcept nogil:
    if floating is float:
        bn_cl_affine_stream_f32(x, ldx, y, ldy, nrows, nch, mean, scale, shift)
    else:
        bn_cl_affine_stream_f64(x, ldx, y, ldy, nrows, nch, mean, scale, shift)


cdef inline void cl_bwd_sums(const floating *dy, Py_ssize_t lddy, const floating *x,
                             Py_ssize_t ldx, Py_ssize_t nrows, Py_ssize_t nch,
                             const double *mean, double *sum_dy, double *sum_dy_xmu,
                             bint far, Py_ssize_t width=0) noexcept nogil:
    """Channels-last sums (bn_cl_bwd_sums); width: the rows' channels when the call takes
    a tile of them (nch when 0)."""
    if width == 0:
        width = nch
    if floating is float:
        bn_cl_bwd_sums_f32(dy, lddy, x, ldx, nrows, nch, width, mean, sum_dy, sum_dy_xmu, far)
    else:
        bn_cl_bwd_sums_f64(dy, lddy, x, ldx, nrows, nch, width, mean, sum_dy, sum_dy_xmu, far)


cdef inline void cl_bwd_dx(const floating *dy, Py_ssize_t lddy, const floating *x,
                           Py_ssize_t ldx, floating *dx, Py_ssize_t lddx, Py_ssize_t nrows,
                           Py_ssize_t nch, const double *mean, const double *k,
                           const double *q, const double *r, bint stream=False,
                           bint far=False) noexcept nogil:
    """dx of channels-last rows (bn_cl_bwd_dx). far: dy, x and dx are beyond the caches
    (implied by stream)."""
    if floating is float:
        bn_cl_bwd_dx_f32(dy, lddy, x, ldx, dx, lddx, nrows, nch, mean, k, q, r, stream, far)
    else:
        bn_cl_bwd_dx_f64(dy, lddy, x, ldx, dx, lddx, nrows, nch, mean, k, q, r, stream, far)


cdef inline void seg_bwd_dx(const floating *dy, const floating *x, floating *dx,
                            Py_ssize_t nseg, Py_ssize_t length, Py_ssize_t sdy, Py_ssize_t sx,
                            Py_ssize_t sdx, double mean, double k, double q, double r,
                            bint stream) noexcept nogil:
    if floating is float:
        bn_seg_bwd_dx_f32(dy, x, dx, nseg, length, sdy, sx, sdx, mean, k, q, r, stream)
    else:
        bn_seg_bwd_dx_f64(dy, x, dx, nseg, length, sdy, sx, sdx, mean, k, q, r, stream)


# ------------------------------------------------------------------ tiling

cdef inline Py_ssize_t plane_nblocks(Py_ssize_t outer, Py_ssize_t inner) noexcept nogil:
    """Number of statistics blocks in one channel of ``outer`` planes of ``inner`` values."""
    if inner <= 0 or outer <= 0:
        return 0
    if inner >= BLOCK:
        return outer * ((inner + BLOCK - 1) // BLOCK)
    cdef Py_ssize_t g = BLOCK // inner
    return (outer + g - 1) // g


cdef inline void block_moments(const floating *x, Py_ssize_t nseg, Py_ssize_t length,
                               Py_ssize_t stride, double pivot, bint one_pass, double *mean,
                               double *m2) noexcept nogil:
    """seg_moments (mean relative to pivot, M2), or with one_pass for float the one
    double pass around the block's own float shift (bn_run_moments), its mean moved to
    the pivot: each value read once instead of twice (float shift pass, double pass), as
    exact as for the float runs of the normalisation ops (see there). The normalisation
    ops' batch statistics take one_pass; moments() does not."""
    cdef double shift
    if floating is float:
        if one_pass:
            bn_run_moments_f32(x, nseg, length, stride, &shift, mean, m2)
            mean[0] = mean[0] + (shift - pivot)
            return
    seg_moments(x, nseg, length, stride, pivot, mean, m2)


cdef inline void plane_block_stats(const floating *x, Py_ssize_t outer, Py_ssize_t inner,
                                   Py_ssize_t so, Py_ssize_t b0, Py_ssize_t b1,
                                   bn_moments *st, bint one_pass=False) noexcept nogil:
    """Merge blocks [b0, b1) of the channel whose first plane is at ``x`` into ``st``.

    st.mean is relative to st.shift, the channel's pivot (its first value): every chunk of
    a channel gets the same one. The channel's mean is st.mean + st.shift.
    """
    cdef Py_ssize_t b, p, off, length, g, nplanes, bpp
    cdef double m, m2
    cdef double pivot = bn_pivot(<double>x[0])
    st.shift = pivot
    if floating is float and one_pass:   # the next block fetched meanwhile (see there)
        bn_plane_run_stats_f32(x, outer, inner, so, b0, b1, BLOCK, pivot, st)
        return
    if inner >= BLOCK:
        bpp = (inner + BLOCK - 1) // BLOCK
        for b in range(b0, b1):
            p = b // bpp
            off = (b - p * bpp) * BLOCK
            length = min(<Py_ssize_t>BLOCK, inner - off)
            # the next block fetched during this one's first pass (not in one burst
            # before it, which waited on the fill buffers)
            if b + 1 >= b1:
                seg_moments_pf(x + p * so + off, length, pivot, &m, &m2, NULL, 0)
            elif off + length < inner:
                seg_moments_pf(x + p * so + off, length, pivot, &m, &m2,
                               x + p * so + off + length,
                               min(<Py_ssize_t>BLOCK, inner - off - length))
            else:
                seg_moments_pf(x + p * so + off, length, pivot, &m, &m2, x + (p + 1) * so,
                               min(<Py_ssize_t>BLOCK, inner))
            bn_chan_merge(st, <double>length, m, m2)
    else:
        g = BLOCK // inner
        for b in range(b0, b1):
            p = b * g
            nplanes = min(g, outer - p)
            if b + 1 < b1:   # short planes far apart: fetch the next block early
                prefetch_seg(x + (p + g) * so, min(g, outer - p - g), inner, so)
            block_moments(x + p * so, nplanes, inner, so, pivot, one_pass, &m, &m2)
            bn_chan_merge(st, <double>(nplanes * inner), m, m2)


cdef inline bint streams(Py_ssize_t nbytes, int narrays, const void *out, const void *a,
                         const void *b=NULL) noexcept nogil:
    """Whether an output of nbytes goes out with streaming stores: when the narrays arrays
    of that size the op moves (x and y; dy, x and dx) outgrow what the L3 keeps for it
    (bn_stream_fwd, bn_stream_bwd: set from the machine's L3 at import, see
    bn_init_thresholds), so the output would be written back to memory anyway. With a
    32 MiB L3 both are 32 MiB: 16 MiB of output for a forward, 10.7 MiB for a backward,
    where an output-size rule waited for 16: batch norm (64,512,7,7) float64 1.2-1.29x,
    channels-last (32,28,28,128) 1.5-1.67x, (64,7,7,1024) 1.16x, float64 (32,28,28,64)
    1.14x (float64 (64,7,7,512) 0.94x); group norm channels-last (16,56,56,64) 1.18x, NCHW
    1.09x, instance norm 1.06x, RMS norm (4096,768) 1.06x, layer norm 1.03x ((49152,64)
    0.98x).

    Never over an input (out is a or b: in place): a streaming store to a line the kernel
    has just read, still cached, first evicts it, and the in-place calls beyond the
    threshold ran slower than into a new array, where with ordinary stores they run
    faster (two threads, float32, against out= a new array): batch-norm training (96, 64,
    56, 56) 7.06 ms in place vs 5.47, eval 4.60 vs 3.44, group norm 6.86 vs 5.65; the
    backward (32, 64, 56, 56) with dx over dy 4.35 vs 2.07, group norm 2.91 vs 1.66,
    layer norm (8192, 768) 2.63 vs 1.63."""
    if out == a or (b != NULL and out == b):
        return False
    return narrays * nbytes >= (bn_stream_fwd if narrays == 2 else bn_stream_bwd)


cdef inline Py_ssize_t plane_chunks(Py_ssize_t outer, Py_ssize_t nch,
                                    Py_ssize_t inner) noexcept nogil:
    """Chunks per channel for planes statistics, from the shape alone.

    Channels are the unit of parallel work while there are enough of them; a few huge
    channels (moments over everything, C < 32) are cut into chunks of blocks instead,
    merged in chunk order afterwards.
    """
    cdef Py_ssize_t nb = plane_nblocks(outer, inner), s
    if nch >= 32 or nb < 64:
        return 1
    s = min(nb // 32, <Py_ssize_t>MAX_CHUNKS // nch)
    return max(s, 1)


cdef inline Py_ssize_t rows_per_block(Py_ssize_t nch, Py_ssize_t itemsize) noexcept nogil:
    """Rows per statistics block of up to CHANNEL_BLOCK channels at itemsize 4 (what
    rows_chunk_stats takes for both types): a block of floats fills L1 (32 KiB), where the
    next block, prefetched meanwhile, lands; and at least 128 rows, so that the per-block
    work per channel (shift, merge) is spread over 128 rows when channels are many. For
    double the block is twice the bytes and in L2: its one pass reads each value once.
    Blocks of 16 double rows (L1-sized, as the two-pass wanted) ran 1.3-2x slower in
    cache, their per-block work the cost. rows_chunks sizes chunks with itemsize 8."""
    cdef Py_ssize_t cb = min(nch, <Py_ssize_t>CHANNEL_BLOCK)
    cdef Py_ssize_t rows = (<Py_ssize_t>(16 * BLOCK)) // max(cb * itemsize, 1)
    return max(16 if itemsize == 8 else 128, rows)


cdef inline bint beyond_caches(Py_ssize_t nbytes) noexcept nogil:
    """Whether the nbytes an op reads (all its arrays together) come from memory rather
    than the caches: from bn_far_bytes (16 MiB, about what a 32 MiB L3 keeps)."""
    return nbytes >= bn_far_bytes


cdef inline bint beyond_l2(Py_ssize_t nbytes, int nt) noexcept nogil:
    """Whether nbytes outgrow the L2s of nt threads (bn_l2_bytes each, from the machine)."""
    return nbytes >= nt * bn_l2_bytes


cdef inline Py_ssize_t plane_fetch(Py_ssize_t plane_bytes, Py_ssize_t nbytes,
                                   int nt) noexcept nogil:
    """How many planes ahead a pass over a channel's planes (one per sample, pages apart)
    prefetches, 0 for none: 8 for planes under 4 KiB when the nbytes the pass reads
    outgrow the threads' L2s. Each such plane waits on the L3 or memory a line at a time:
    the hardware prefetchers do not cross pages, and a plane that short gives them no
    time. Batch-norm backward (256, 256, 14, 14) 1.71-1.79x, (256, 128, 28, 28) 1.19x,
    (128, 128, 14, 14) 1.13-1.16x, (64, 256, 14, 14) 1.10x (Xeon, 2 MiB L2s); 56x56
    planes (12.5 KiB) ran 0.92-0.96x with it, (16, 256, 14, 14) in the L2s 0.98x, and
    small channels in groups (backward_group) float64 (64, 512, 7, 7) 0.94x: not there."""
    if plane_bytes < 4096 and beyond_l2(nbytes, nt):
        return 8
    return 0


cdef inline Py_ssize_t sample_chunks(Py_ssize_t outer, Py_ssize_t nch,
                                     Py_ssize_t inner) noexcept nogil:
    """Chunks of samples for walks sample by sample, from the shape alone: at least
    CHUNK_ELEMS values each, at most one per sample and MAX_CHUNKS."""
    return max(1, min(min(outer, <Py_ssize_t>MAX_CHUNKS), outer * nch * inner // CHUNK_ELEMS))


cdef inline Py_ssize_t block_rows(Py_ssize_t rb, Py_ssize_t left) noexcept nogil:
    """Rows of the next statistics block of rows_chunk_stats, left rows before the chunk's
    end: rb, or all of them where fewer than 2 * rb are left, so that no block is a short
    remainder (a block costs its channels' shifts, finishes and merge whatever its rows).
    In-process A/B against blocks of rb and a remainder, two threads, medians of 7:
    channels-last group norm (64, 14, 14, 256) G=32 1.04-1.09x (its 196 rows had gone
    128 + 68), (8, 56, 56, 64) G=8 1.02-1.04x, (16, 28, 28, 128) G=32 1.02x, (32, 56, 56,
    64) G=32 1.0-1.03x; per-sample moments (256, 14, 14, 256) 1.12x; batch-norm training
    (3000, 100) 1.04x, (256, 14, 14, 256) NHWC 1.02x; 0.99-1.01x elsewhere."""
    return left if left < 2 * rb else rb


cdef inline Py_ssize_t rows_chunks(Py_ssize_t nrows, Py_ssize_t nch) noexcept nogil:
    """Row chunks for channels-last statistics and passes, from the shape alone: at least
    CHUNK_ELEMS values each, and (up to 8 chunks) 512 rows, since merging the chunks costs
    about as much per channel as reducing a few hundred rows of it."""
    cdef Py_ssize_t min_rows = max(rows_per_block(nch, 8), CHUNK_ELEMS // max(nch, 1),
                                   min(512, nrows // 8))
    cdef Py_ssize_t s = (nrows + min_rows - 1) // min_rows
    return max(1, min(s, <Py_ssize_t>MAX_CHUNKS))


cdef inline Py_ssize_t half_stage(Py_ssize_t nch) noexcept nogil:
    """Floats of the stage that rows_chunk_stats and rows_stats_in widen float16 rows
    into: a block of rows (at most twice rows_per_block) of a channel block, and at least
    one row (rows_stats_in's pivots)."""
    return max(nch, 2 * rows_per_block(nch, 4) * min(nch, <Py_ssize_t>CHANNEL_BLOCK))


cdef inline void rows_chunk_stats(const floating *x, Py_ssize_t r0, Py_ssize_t r1,
                                  Py_ssize_t nch, Py_ssize_t ld, double *work,
                                  const double *pivot, double *mean, double *m2,
                                  bint far, Py_ssize_t c_lo, Py_ssize_t c_hi,
                                  const uint16_t *h=NULL, float *stage=NULL) noexcept nogil:
    """Moments of rows [r0, r1) for every channel into mean[nch] (relative to pivot[nch],
    the same for every chunk) and m2[nch]: blocks of rows (rows_per_block, the float
    rule for both types) by up to CHANNEL_BLOCK channels, each in one pass around
    per-channel shifts K (bn_cl_moments_shift), merged in order.

    ``work`` holds 5 * CHANNEL_BLOCK doubles. All channels share the count r1-r0. ``far``:
    the rows are beyond the caches (beyond_caches), which changes what is prefetched.
    Only channels [c_lo, c_hi) are reduced (c_lo a multiple of CHANNEL_BLOCK; c_hi nch or
    one too): the channel blocks, their rows and their arithmetic are those of the whole
    row, so a chunk's channel blocks can go to different threads with the same bits.
    ``h`` (float only; x is then unused): float16 rows, ld apart, each block widened into
    ``stage`` (half_stage(nch) floats) just before its moments: the same values in the
    same order, the same bits as x = h widened.
    """
    cdef Py_ssize_t rb = rows_per_block(nch, 4), r, c0, c, cb, nr, nnext, nw, nrn, i, k
    cdef double *K = work
    cdef double *bm = work + 3 * CHANNEL_BLOCK
    cdef double *bm2 = bm + CHANNEL_BLOCK
    cdef const floating *nxt
    cdef Py_ssize_t isz = sizeof(floating)
    r = r0
    while r < r1:
        nr = block_rows(rb, r1 - r)
        nnext = block_rows(rb, r1 - r - nr)
        c0 = c_lo
        while c0 < c_hi:
            cb = min(<Py_ssize_t>CHANNEL_BLOCK, c_hi - c0)
            # shifts K, near each channel's mean (the one pass's error grows with their
            # distance from it, see bn_cl_moments_shift): float, the pivots for the
            # chunk's first block, then its running means as floats (x - K exact); double,
            # the mean of the chunk's first (up to) 16 rows, then its running means
            if floating is float or r > r0:
                for c in range(cb):
                    K[c] = pivot[c0 + c]
                    if r > r0 and isfinite(pivot[c0 + c] + mean[c0 + c]):
                        K[c] = pivot[c0 + c] + mean[c0 + c]
                        if floating is float:
                            K[c] = <double><float>K[c]
            else:
                k = min(16, r1 - r0)
                for c in range(cb):
                    K[c] = 0
                for i in range(k):
                    for c in range(cb):
                        K[c] += x[(r0 + i) * ld + c0 + c] - pivot[c0 + c]
                for c in range(cb):
                    K[c] = pivot[c0 + c] + K[c] / <double>k
                    if not isfinite(K[c]):
                        K[c] = pivot[c0 + c]
            nxt = NULL
            if floating is float and h != NULL:
                if cb == ld:   # the block's rows are one span
                    bn_half_to_float(h + r * ld + c0, stage, nr * cb)
                else:
                    for i in range(nr):
                        bn_half_to_float(h + (r + i) * ld + c0, stage + i * cb, cb)
                cl_moments_shift(<const floating *>stage, nr, cb, cb, K, pivot + c0, nxt, 0, 1,
                                 0, bm, bm2)
            elif far and c_hi - c_lo > CHANNEL_BLOCK:
                # rows wider than a channel block, beyond the caches: the block walked
                # next (the next channel block of these rows, or the first of the next
                # rows), nr rows of up to 1 KiB, ld apart. The next row block in address
                # order is a whole row block away (1 MiB at 2048 channels), out of L2
                # by its turn: moments (3136, 2048) 1.4-1.9x, (6272, 1024) 1.6-1.7x,
                # (12544, 512) 1.15-1.2x in-process A/B. In cache the prefetches only
                # cost (0.88-0.93x from 3 to 8 MiB), hence `far`.
                if c0 + cb < c_hi:
                    nxt = x + r * ld + c0 + cb
                    nw = min(<Py_ssize_t>CHANNEL_BLOCK, c_hi - c0 - cb)
                    nrn = nr
                else:
                    nw = min(<Py_ssize_t>CHANNEL_BLOCK, c_hi - c_lo)
                    nrn = nnext
                    if nnext > 0:
                        nxt = x + (r + nr) * ld + c_lo
                cl_moments_shift(x + r * ld + c0, nr, cb, ld, K, pivot + c0, nxt, nw * isz,
                                 nrn, ld * isz, bm, bm2)
            else:
                # the next row block (contiguous rows), prefetched in address order:
                # the part of it in proportion to this channel block
                if nnext > 0 and ld == nch:
                    nxt = x + (r + nr) * ld + nnext * c0
                cl_moments_shift(x + r * ld + c0, nr, cb, ld, K, pivot + c0, nxt,
                                 nnext * cb * isz, 1, 0, bm, bm2)
            bn_chan_merge_vec(<double>(r - r0), mean + c0, m2 + c0, <double>nr, bm, bm2, cb)
            c0 += cb
        r += nr


cdef inline void cl_moments_shift(const floating *x, Py_ssize_t nrows, Py_ssize_t nch,
                                  Py_ssize_t ld, const double *K, const double *pivot,
                                  const floating *nxt, Py_ssize_t nnext, Py_ssize_t next_rows,
                                  Py_ssize_t next_ld, double *mean, double *m2) noexcept nogil:
    if floating is float:
        bn_cl_moments_shift_f32(x, nrows, nch, ld, K, pivot, nxt, nnext, next_rows, next_ld,
                                mean, m2)
    else:
        bn_cl_moments_shift_f64(x, nrows, nch, ld, K, pivot, nxt, nnext, next_rows, next_ld,
                                mean, m2)


# ------------------------------------------------------------------ whole-array statistics

cdef inline int planes_stats(const floating *x, Py_ssize_t outer, Py_ssize_t nch,
                             Py_ssize_t inner, Py_ssize_t so, Py_ssize_t sc, double *mean,
                             double *m2, int n_threads, bint one_pass=False) noexcept nogil:
    """Per-channel mean and M2 of a planes view (outer, nch, inner). -1 if out of memory.
    one_pass: float blocks in one pass around their own shifts (block_moments)."""
    if planes_by_sample(outer, nch, inner, sc, sizeof(floating)):
        return planes_stats_by_sample(x, outer, nch, inner, so, mean, m2, n_threads, one_pass)
    cdef Py_ssize_t nb = plane_nblocks(outer, inner)
    cdef Py_ssize_t nchunks = plane_chunks(outer, nch, inner), t, c, s
    cdef bn_moments *part
    cdef int nt = work_threads(n_threads, nch * nchunks, outer * nch * inner, SERIAL_ELEMS)
    part = <bn_moments *>bn_alloc64(max(nch * nchunks, 1) * sizeof(bn_moments))
    if part == NULL:
        return -1
    for t in prange(nch * nchunks, schedule='static', num_threads=team_threads(nt, n_threads)):
        c = t // nchunks
        s = t - c * nchunks
        part[t].n = 0
        part[t].mean = 0
        part[t].m2 = 0
        plane_block_stats(x + c * sc, outer, inner, so, s * nb // nchunks,
                          (s + 1) * nb // nchunks, &part[t], one_pass)
    for c in range(nch):
        for s in range(1, nchunks):
            bn_chan_merge(&part[c * nchunks], part[c * nchunks + s].n,
                          part[c * nchunks + s].mean, part[c * nchunks + s].m2)
        mean[c] = part[c * nchunks].mean + part[c * nchunks].shift
        m2[c] = part[c * nchunks].m2
    bn_free64(part)
    return 0


cdef inline bint planes_by_sample(Py_ssize_t outer, Py_ssize_t nch, Py_ssize_t inner,
                                  Py_ssize_t sc, Py_ssize_t itemsize) noexcept nogil:
    """Whether planes statistics should walk memory sample by sample rather than channel
    by channel: for many short planes (under a page) with each sample's channels
    contiguous. Channel by channel, such a channel is ``outer`` scraps of a few hundred
    bytes one sample apart; when the sample stride is a multiple of 4 KiB every scrap maps
    to the same cache sets, so past ~128 samples the channel cannot stay in L2 and each
    scrap is a DRAM page miss. Sample by sample memory is read in order. For statistics
    alone (moments): the training forward, which must also write each channel, does better
    channel by channel with the next channel prefetched (see forward_planes)."""
    return sc == inner and outer >= 128 and inner * itemsize < 4096 and nch > 1


cdef inline void merge_row_chunks(const double *buf, Py_ssize_t per, Py_ssize_t nchunks,
                                  Py_ssize_t nrows, Py_ssize_t unit, Py_ssize_t nch,
                                  const double *pivot, double *mean,
                                  double *m2, bint relative=False,
                                  Py_ssize_t ld=0) noexcept nogil:
    """The states of nchunks chunks of nrows rows (chunk k: rows k * nrows // nchunks on,
    unit values per row and channel; mean then M2 of nch channels at buf + k * per, the
    M2 ld doubles after the means (nch when 0), relative to pivot) merged in chunk order
    into mean (absolute; relative to pivot when ``relative``) and m2. The one merge of
    the chunked statistics: planes_stats, rows_stats and the channels-last group norm
    that spreads a sample's chunks or groups over threads (which must match rows_stats
    bit for bit)."""
    cdef Py_ssize_t s, c, r0, r1
    if ld == 0:
        ld = nch
    for c in range(nch):
        mean[c] = buf[c]
        m2[c] = buf[ld + c]
    for s in range(1, nchunks):
        r0 = s * nrows // nchunks
        r1 = (s + 1) * nrows // nchunks
        bn_chan_merge_vec(<double>(r0 * unit), mean, m2, <double>((r1 - r0) * unit),
                          buf + s * per, buf + s * per + ld, nch)
    if not relative:
        for c in range(nch):
            mean[c] += pivot[c]


cdef inline int planes_stats_by_sample(const floating *x, Py_ssize_t outer, Py_ssize_t nch,
                                       Py_ssize_t inner, Py_ssize_t so, double *mean,
                                       double *m2, int n_threads,
                                       bint one_pass=False) noexcept nogil:
    """planes_stats for a view with each sample's (nch, inner) planes contiguous: chunks of
    samples (from the shape alone) in parallel, each plane's moments merged into its
    channel's state in sample order, chunks merged in chunk order. -1 if out of memory."""
    cdef Py_ssize_t nchunks = sample_chunks(outer, nch, inner)
    cdef Py_ssize_t per = 4 * nch, s, n, n0, n1, c
    cdef double *buf
    cdef double *p
    cdef double *pivot
    cdef int nt = work_threads(n_threads, nchunks, outer * nch * inner, SERIAL_ELEMS)
    buf = <double *>bn_alloc64((nchunks * per + nch) * sizeof(double))
    if buf == NULL:
        return -1
    pivot = buf + nchunks * per
    for c in range(nch):   # each channel's first value: every chunk shares the pivots
        pivot[c] = bn_pivot(<double>x[c * inner])
    for s in prange(nchunks, schedule='static', num_threads=team_threads(nt, n_threads)):
        p = buf + s * per
        n0 = s * outer // nchunks
        n1 = (s + 1) * outer // nchunks
        for n in range(n0, n1):
            for c in range(nch):
                block_moments(x + n * so + c * inner, 1, inner, 0, pivot[c], one_pass,
                              &p[2 * nch + c], &p[3 * nch + c])
            bn_chan_merge_vec(<double>((n - n0) * inner), p, p + nch, <double>inner,
                              p + 2 * nch, p + 3 * nch, nch)
    merge_row_chunks(buf, per, nchunks, outer, inner, nch, pivot, mean, m2)
    bn_free64(buf)
    return 0


cdef inline void rows_chunk_state(const floating *x, Py_ssize_t k, Py_ssize_t nchunks,
                                  Py_ssize_t nrows, Py_ssize_t nch, Py_ssize_t ld, double *p,
                                  const double *pivot, bint far, Py_ssize_t j,
                                  Py_ssize_t nj, const uint16_t *h=NULL,
                                  float *stage=NULL) noexcept nogil:
    """rows_stats' chunk k, its channel blocks j to j + nj - 1: its state (mean, m2, then
    a work space per channel block) at p (rows_chunk_per doubles). h, stage: float16 rows
    (see rows_chunk_stats)."""
    rows_chunk_stats(x, k * nrows // nchunks, (k + 1) * nrows // nchunks, nch, ld,
                     p + 2 * nch + j * 5 * CHANNEL_BLOCK, pivot, p, p + nch, far,
                     j * CHANNEL_BLOCK, min(nch, (j + nj) * CHANNEL_BLOCK), h, stage)


cdef inline Py_ssize_t channel_blocks(Py_ssize_t nch) noexcept nogil:
    return (nch + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK


cdef inline Py_ssize_t rows_chunk_per(Py_ssize_t nch) noexcept nogil:
    """Doubles of one chunk's state in rows_stats: mean, m2, a work space per channel block."""
    return 2 * nch + 5 * CHANNEL_BLOCK * max(1, channel_blocks(nch))


cdef inline Py_ssize_t rows_scratch(Py_ssize_t nrows, Py_ssize_t nch) noexcept nogil:
    """Doubles of scratch that rows_stats_in needs for a rows view (nrows, nch)."""
    return rows_chunks(nrows, nch) * rows_chunk_per(nch) + nch


cdef inline int rows_stats(const floating *x, Py_ssize_t nrows, Py_ssize_t nch, Py_ssize_t ld,
                           double *mean, double *m2, int n_threads) noexcept nogil:
    """Per-channel mean and M2 of a rows view (nrows, nch). -1 if out of memory.

    Row chunks are reduced in parallel into partial states, merged in chunk order.
    """
    cdef double *buf = <double *>bn_alloc64(rows_scratch(nrows, nch) * sizeof(double))
    if buf == NULL:
        return -1
    rows_stats_in(x, nrows, nch, ld, mean, m2, n_threads, buf)
    bn_free64(buf)
    return 0


cdef inline double *rows_pivots(double *buf, Py_ssize_t nrows, Py_ssize_t nch) noexcept nogil:
    """Where rows_stats_in leaves the channels' pivots (nch) in its scratch buf."""
    return buf + rows_chunks(nrows, nch) * rows_chunk_per(nch)


cdef inline void rows_stats_in(const floating *x, Py_ssize_t nrows, Py_ssize_t nch,
                               Py_ssize_t ld, double *mean, double *m2, int n_threads,
                               double *buf, bint relative=False, const uint16_t *h=NULL,
                               float *stage=NULL) noexcept nogil:
    """rows_stats in the caller's scratch buf (rows_scratch doubles): a kernel called per
    sample allocates once per thread, not once per sample (group norm (256, 3, 3, 32) G=8
    1.08x, its allocations had been two per sample). ``relative``: the means are left
    relative to the channels' pivots, which stay in buf (rows_pivots). h, stage (float
    only, on one thread: n_threads 1): float16 rows instead of x, each block widened into
    the stage (half_stage floats: rows_chunk_stats): the bits of x = h widened."""
    cdef Py_ssize_t nchunks = rows_chunks(nrows, nch), s, c, t
    cdef Py_ssize_t per = rows_chunk_per(nch), ncb = channel_blocks(nch)
    cdef double *pivot
    cdef int nt = work_threads(n_threads, nchunks, nrows * nch, SERIAL_ELEMS)
    cdef int ntb = work_threads(n_threads, nchunks * ncb, nrows * nch, SERIAL_ELEMS)
    cdef bint far = beyond_caches(nrows * nch * <Py_ssize_t>sizeof(floating))
    pivot = rows_pivots(buf, nrows, nch)
    if floating is float and h != NULL:
        bn_half_to_float(h, stage, nch)   # (the first row's values)
        for c in range(nch):
            pivot[c] = bn_pivot(<double>stage[c])
        for s in range(nchunks):
            rows_chunk_state(x, s, nchunks, nrows, nch, ld, buf + s * per, pivot, far, 0, ncb,
                             h, stage)
        merge_row_chunks(buf, per, nchunks, nrows, 1, nch, pivot, mean, m2, relative)
        return
    for c in range(nch):   # the first row's values: every chunk shares these pivots
        pivot[c] = bn_pivot(<double>x[c])
    if nt == 1:
        # no parallel region: nested in one per sample (channels-last group and instance
        # norm, per-sample moments) it cost more than a small sample: group norm
        # (256, 3, 3, 32) G=8 2.6x, instance norm (256, 3, 3, 32) 2.35x, (64, 7, 7, 64) 1.49x
        for s in range(nchunks):
            rows_chunk_state(x, s, nchunks, nrows, nch, ld, buf + s * per, pivot, far, 0, ncb)
    elif ntb > nt:
        # more threads than chunks (the chunks come from the shape: (4096, 1024) has 8):
        # each chunk's channel blocks go to threads of their own, the same bits. On 16
        # threads (a 16-core Xeon guest) batch-norm training (4096, 1024) had run no
        # faster than on 8: 0.72 -> 0.41 ms, channels-last (64, 7, 7, 2048) 1.25 -> 0.79.
        # A view of one chunk stays on one thread (above): split over two, (32, 2048)
        # ran 0.88x, (100, 300) 0.94x, (128, 512) 1.11x
        for t in prange(nchunks * ncb, schedule='static', num_threads=team_threads(ntb, n_threads)):
            s = t // ncb
            rows_chunk_state(x, s, nchunks, nrows, nch, ld, buf + s * per, pivot, far,
                             t - s * ncb, 1)
    else:
        for s in prange(nchunks, schedule='static', num_threads=team_threads(nt, n_threads)):
            rows_chunk_state(x, s, nchunks, nrows, nch, ld, buf + s * per, pivot, far, 0, ncb)
    merge_row_chunks(buf, per, nchunks, nrows, 1, nch, pivot, mean, m2, relative)


# ------------------------------------------------------------------ row-norm family (rownorm)
# Elementwise passes of layer and RMS norm (bncore/_rownorm.pyx); see bn_kernels_impl.h.

cdef extern from "bn_kernels.h" nogil:
    void bn_row_affine_f32(const float *x, float *y, Py_ssize_t n, double mean, double invstd,
                           const float *w, const float *b, int stream)
    void bn_row_affine_f64(const double *x, double *y, Py_ssize_t n, double mean,
                           double invstd, const double *w, const double *b, int stream)
    void bn_row_bwd_f32(const float *dy, const float *x, float *dx, Py_ssize_t d, double mean,
                        double invstd, const double *w, double *dw, double *db, int rms,
                        int stream, const float *fetch_dy, const float *fetch_x)
    void bn_row_bwd_f64(const double *dy, const double *x, double *dx, Py_ssize_t d,
                        double mean, double invstd, const double *w, double *dw, double *db,
                        int rms, int stream, const double *fetch_dy, const double *fetch_x)
    void bn_row_bwd_v4_f32(const float *dy, const float *x, float *dx, Py_ssize_t d,
                           double mean, double invstd, const double *w, double *dw,
                           double *db, int rms, int stream, const float *fetch_dy,
                           const float *fetch_x)
    void bn_row_bwd_v4_f64(const double *dy, const double *x, double *dx, Py_ssize_t d,
                           double mean, double invstd, const double *w, double *dw,
                           double *db, int rms, int stream, const double *fetch_dy,
                           const double *fetch_x)
    void bn_row_bwd_sums_v4_f32(const float *dy, const float *x, Py_ssize_t d, double mean,
                                double invstd, const double *w, int rms, double *q,
                                double *r)
    void bn_row_bwd_sums_v4_f64(const double *dy, const double *x, Py_ssize_t d,
                                double mean, double invstd, const double *w, int rms,
                                double *q, double *r)
    void bn_rows_bwd_tile_v4_f32(const float *dy, const float *x, float *dx, Py_ssize_t nrows,
                                 Py_ssize_t n, Py_ssize_t ldg, Py_ssize_t ldx, Py_ssize_t ldd,
                                 const double *mean, const double *invstd, const double *q,
                                 const double *r, const double *w, double *dw, double *db)
    void bn_rows_bwd_tile_v4_f64(const double *dy, const double *x, double *dx,
                                 Py_ssize_t nrows, Py_ssize_t n, Py_ssize_t ldg,
                                 Py_ssize_t ldx, Py_ssize_t ldd, const double *mean,
                                 const double *invstd, const double *q, const double *r,
                                 const double *w, double *dw, double *db)
    void bn_row_bwd2_f32(const float *dy, const float *x, float *dx, Py_ssize_t ldg,
                         Py_ssize_t ldx, Py_ssize_t ldd, Py_ssize_t d, const double *mean2,
                         const double *invstd2, const double *w, double *dw, double *db,
                         int rms, int stream, const float *fetch_dy, const float *fetch_x)
    void bn_row_bwd2_f64(const double *dy, const double *x, double *dx, Py_ssize_t ldg,
                         Py_ssize_t ldx, Py_ssize_t ldd, Py_ssize_t d, const double *mean2,
                         const double *invstd2, const double *w, double *dw, double *db,
                         int rms, int stream, const double *fetch_dy, const double *fetch_x)
    void bn_row_bwd2_v4_f32(const float *dy, const float *x, float *dx, Py_ssize_t ldg,
                            Py_ssize_t ldx, Py_ssize_t ldd, Py_ssize_t d,
                            const double *mean2, const double *invstd2, const double *w,
                            double *dw, double *db, int rms, int stream,
                            const float *fetch_dy, const float *fetch_x)
    void bn_row_bwd2_v4_f64(const double *dy, const double *x, double *dx, Py_ssize_t ldg,
                            Py_ssize_t ldx, Py_ssize_t ldd, Py_ssize_t d,
                            const double *mean2, const double *invstd2, const double *w,
                            double *dw, double *db, int rms, int stream,
                            const double *fetch_dy, const double *fetch_x)
    int bn_use_v4
    void bn_row_bwd_sums_f32(const float *dy, const float *x, Py_ssize_t d, double mean,
                             double invstd, const double *w, int rms, double *q, double *r)
    void bn_row_bwd_sums_f64(const double *dy, const double *x, Py_ssize_t d, double mean,
                             double invstd, const double *w, int rms, double *q, double *r)
    void bn_rows_bwd_tile_f32(const float *dy, const float *x, float *dx, Py_ssize_t nrows,
                              Py_ssize_t n, Py_ssize_t ldg, Py_ssize_t ldx, Py_ssize_t ldd,
                              const double *mean, const double *invstd, const double *q,
                              const double *r, const double *w, double *dw, double *db)
    void bn_rows_bwd_tile_f64(const double *dy, const double *x, double *dx,
                              Py_ssize_t nrows, Py_ssize_t n, Py_ssize_t ldg, Py_ssize_t ldx,
                              Py_ssize_t ldd, const double *mean, const double *invstd,
                              const double *q, const double *r, const double *w, double *dw,
                              double *db)
    enum: BN_BWD_TILE
    void bn_rows_norm_f32(const float *x, float *y, Py_ssize_t nrows, Py_ssize_t nfetch,
                          Py_ssize_t d,
                          Py_ssize_t ldx, Py_ssize_t ldy, double eps, const float *w,
                          const float *b, double *mean, double *invstd, int rms, int stream)
    void bn_rows_norm_f64(const double *x, double *y, Py_ssize_t nrows, Py_ssize_t nfetch,
                          Py_ssize_t d,
                          Py_ssize_t ldx, Py_ssize_t ldy, double eps, const double *w,
                          const double *b, double *mean, double *invstd, int rms, int stream)
    void bn_fence()
    void bn_group_blocks_f32(const float *x, float *y, Py_ssize_t t0, Py_ssize_t nblk,
                             Py_ssize_t g, Py_ssize_t cg, Py_ssize_t s, double eps,
                             const double *w, const double *b, double *mean, double *var,
                             int stream)
    void bn_group_blocks_f64(const double *x, double *y, Py_ssize_t t0, Py_ssize_t nblk,
                             Py_ssize_t g, Py_ssize_t cg, Py_ssize_t s, double eps,
                             const double *w, const double *b, double *mean, double *var,
                             int stream)
    void bn_group_blocks_bwd_f32(const float *dy, const float *x, float *dx, Py_ssize_t t0,
                                 Py_ssize_t nblk, Py_ssize_t g, Py_ssize_t cg, Py_ssize_t s,
                                 const double *mean, const double *invstd, const double *w,
                                 double *sdy, double *sdyx, int stream)
    void bn_group_blocks_bwd_f64(const double *dy, const double *x, double *dx,
                                 Py_ssize_t t0, Py_ssize_t nblk, Py_ssize_t g, Py_ssize_t cg,
                                 Py_ssize_t s, const double *mean, const double *invstd,
                                 const double *w, double *sdy, double *sdyx, int stream)
    enum: BN_SMALL_GROUP


cdef inline void row_affine(const floating *x, floating *y, Py_ssize_t n, double mean,
                            double invstd, const floating *w, const floating *b,
                            bint stream) noexcept nogil:
    if floating is float:
        bn_row_affine_f32(x, y, n, mean, invstd, w, b, stream)
    else:
        bn_row_affine_f64(x, y, n, mean, invstd, w, b, stream)


cdef inline void rows_norm(const floating *x, floating *y, Py_ssize_t nrows,
                           Py_ssize_t nfetch, Py_ssize_t d,
                           Py_ssize_t ldx, Py_ssize_t ldy, double eps, const floating *w,
                           const floating *b, double *mean, double *invstd, bint rms,
                           bint stream) noexcept nogil:
    if floating is float:
        bn_rows_norm_f32(x, y, nrows, nfetch, d, ldx, ldy, eps, w, b, mean, invstd, rms,
                         stream)
    else:
        bn_rows_norm_f64(x, y, nrows, nfetch, d, ldx, ldy, eps, w, b, mean, invstd, rms,
                         stream)


cdef inline void row_bwd_sums(const floating *dy, const floating *x, Py_ssize_t d,
                              double mean, double invstd, const double *w, bint rms,
                              double *q, double *r) noexcept nogil:
    if floating is float:
        if bn_use_v4:
            bn_row_bwd_sums_v4_f32(dy, x, d, mean, invstd, w, rms, q, r)
        else:
            bn_row_bwd_sums_f32(dy, x, d, mean, invstd, w, rms, q, r)
    elif bn_use_v4:
        bn_row_bwd_sums_v4_f64(dy, x, d, mean, invstd, w, rms, q, r)
    else:
        bn_row_bwd_sums_f64(dy, x, d, mean, invstd, w, rms, q, r)


cdef inline void rows_bwd_tile(const floating *dy, const floating *x, floating *dx,
                               Py_ssize_t nrows, Py_ssize_t n, Py_ssize_t ldg, Py_ssize_t ldx,
                               Py_ssize_t ldd, const double *mean, const double *invstd,
                               const double *q, const double *r, const double *w,
                               double *dw, double *db) noexcept nogil:
    if floating is float:
        if bn_use_v4:
            bn_rows_bwd_tile_v4_f32(dy, x, dx, nrows, n, ldg, ldx, ldd, mean, invstd, q, r, w,
                                    dw, db)
        else:
            bn_rows_bwd_tile_f32(dy, x, dx, nrows, n, ldg, ldx, ldd, mean, invstd, q, r, w,
                                 dw, db)
    elif bn_use_v4:
        bn_rows_bwd_tile_v4_f64(dy, x, dx, nrows, n, ldg, ldx, ldd, mean, invstd, q, r, w, dw,
                                db)
    else:
        bn_rows_bwd_tile_f64(dy, x, dx, nrows, n, ldg, ldx, ldd, mean, invstd, q, r, w, dw, db)


cdef inline void row_bwd(const floating *dy, const floating *x, floating *dx, Py_ssize_t d,
                         double mean, double invstd, const double *w, double *dw, double *db,
                         bint rms, bint stream, const floating *fetch_dy,
                         const floating *fetch_x) noexcept nogil:
    if floating is float:
        if bn_use_v4:
            bn_row_bwd_v4_f32(dy, x, dx, d, mean, invstd, w, dw, db, rms, stream, fetch_dy,
                              fetch_x)
        else:
            bn_row_bwd_f32(dy, x, dx, d, mean, invstd, w, dw, db, rms, stream, fetch_dy,
                           fetch_x)
    elif bn_use_v4:
        bn_row_bwd_v4_f64(dy, x, dx, d, mean, invstd, w, dw, db, rms, stream, fetch_dy, fetch_x)
    else:
        bn_row_bwd_f64(dy, x, dx, d, mean, invstd, w, dw, db, rms, stream, fetch_dy, fetch_x)


cdef inline void row_bwd2(const floating *dy, const floating *x, floating *dx, Py_ssize_t ldg,
                          Py_ssize_t ldx, Py_ssize_t ldd, Py_ssize_t d, const double *mean2,
                          const double *invstd2, const double *w, double *dw, double *db,
                          bint rms, bint stream, const floating *fetch_dy,
                          const floating *fetch_x) noexcept nogil:
    if floating is float:
        if bn_use_v4:
            bn_row_bwd2_v4_f32(dy, x, dx, ldg, ldx, ldd, d, mean2, invstd2, w, dw, db, rms,
                               stream, fetch_dy, fetch_x)
        else:
            bn_row_bwd2_f32(dy, x, dx, ldg, ldx, ldd, d, mean2, invstd2, w, dw, db, rms,
                            stream, fetch_dy, fetch_x)
    elif bn_use_v4:
        bn_row_bwd2_v4_f64(dy, x, dx, ldg, ldx, ldd, d, mean2, invstd2, w, dw, db, rms,
                           stream, fetch_dy, fetch_x)
    else:
        bn_row_bwd2_f64(dy, x, dx, ldg, ldx, ldd, d, mean2, invstd2, w, dw, db, rms, stream,
                        fetch_dy, fetch_x)
