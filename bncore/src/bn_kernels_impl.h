/*
 * Element-type specific block kernels, included by bn_kernels.h once per BN_T
 * (float, double) with BN_SFX naming the instance (bn_affine_f32, bn_affine_f64, ...).
 *
 * Two block shapes cover every op:
 *   seg_*  "planes": nseg contiguous segments of len elements, stride elements apart
 *          (NCHW channel planes, rows of layer/RMS norm, groups of group norm);
 *   cl_*   "rows of channels": nrows rows of nch contiguous channels, ld elements apart
 *          (channels-last); loops run across channels so they vectorise with one
 *          accumulator per channel.
 * Inner loops are stride-1, branch-free and accumulate in double.
 */
#define BN_CAT_(a, b) a##_##b
#define BN_CAT(a, b) BN_CAT_(a, b)
#define BN_NAME(name) BN_CAT(name, BN_SFX)

/* Four BN_T values as doubles, and four doubles stored as BN_T (unaligned). Macros, not
 * inline functions: a helper is lowered for the default target before it is inlined into
 * the AVX2 clone, which splits each conversion in halves; written in place, GCC emits one
 * vcvtps2pd ymm, m128 (float) or one vmovupd (double). */
#define BN_LOAD4(p) ((bn_v4d){(double)(p)[0], (double)(p)[1], (double)(p)[2], (double)(p)[3]})
/* Store four results at q: streaming (non-temporal) when stream is set and q is 16-byte
 * aligned, else an ordinary store. Same bits either way. */
#if BN_HAVE_STREAM && BN_T_IS_FLOAT
#define BN_PUT4(q, v, stream) do { if ((stream) && !((uintptr_t)(q) & 15)) \
        _mm_stream_ps((q), (__m128)__builtin_convertvector((v), bn_v4f)); \
        else BN_STORE4((q), (v)); } while (0)
#elif BN_HAVE_STREAM
#define BN_PUT4(q, v, stream) do { bn_v4d w_ = (v); if ((stream) && !((uintptr_t)(q) & 15)) { \
        _mm_stream_pd((q), (__m128d){w_[0], w_[1]}); \
        _mm_stream_pd((q) + 2, (__m128d){w_[2], w_[3]}); } \
        else BN_STORE4((q), w_); } while (0)
#else
#define BN_PUT4(q, v, stream) BN_STORE4((q), (v))
#endif
/* Store eight floats at q: streaming when nt (q 16-byte aligned), else ordinary. */
#if BN_HAVE_STREAM
#define BN_PUT8F(q, v, nt) do { bn_v8f u_ = (v); if (nt) { \
        _mm_stream_ps((q), (__m128){u_[0], u_[1], u_[2], u_[3]}); \
        _mm_stream_ps((q) + 4, (__m128){u_[4], u_[5], u_[6], u_[7]}); } \
        else memcpy((q), &u_, sizeof u_); } while (0)
#else
#define BN_PUT8F(q, v, nt) do { bn_v8f u_ = (v); memcpy((q), &u_, sizeof u_); } while (0)
#endif
#define BN_STORE4(p, v) do { bn_v4d v_ = (v); BN_T *p_ = (p); \
        p_[0] = (BN_T)v_[0]; p_[1] = (BN_T)v_[1]; p_[2] = (BN_T)v_[2]; p_[3] = (BN_T)v_[3]; \
    } while (0)

/* One segment p[0, len) of bn_seg_dev: its deviations (BN_DEV on four lanes, BN_DEV1 on
 * one) into the accumulators d0-d3, q0-q3 (16 values a step, BN_ACC4), then d0, q0 (4 a
 * step), then td, tq (the rest). */
#define BN_SEG_DEV_ROW(p_, len_) do { const BN_T *p = (p_); ptrdiff_t i = 0; \
        for (; i + 16 <= (len_); i += 16) { \
            bn_v4d u0 = BN_DEV(BN_LOAD4(p + i)), u1 = BN_DEV(BN_LOAD4(p + i + 4)); \
            bn_v4d u2 = BN_DEV(BN_LOAD4(p + i + 8)), u3 = BN_DEV(BN_LOAD4(p + i + 12)); \
            BN_ACC4(u0, u1, u2, u3); \
        } \
        for (; i + 4 <= (len_); i += 4) { \
            bn_v4d u = BN_DEV(BN_LOAD4(p + i)); \
            d0 += u; \
            q0 = BN_FMA4(u, u, q0); \
        } \
        for (; i < (len_); i++) { \
            double u = BN_DEV1((double)p[i]); \
            td += u; \
            tq = BN_FMA(u, u, tq); \
        } \
    } while (0)
/* sum(u) and sum(u*u) over nseg segments (as bn_seg_moments) of the deviations
 * u = (x - k) - m, or u = x - k when only_k (a constant at each call: no subtraction of m).
 * Four accumulator pairs (BN_ACC4): with two, the adds into q were the critical path. */
BN_INLINE void BN_NAME(bn_seg_dev_pf)(const BN_T *x, ptrdiff_t nseg, ptrdiff_t len,
                                      ptrdiff_t stride, double k, double m, int only_k,
                                      double *sd, double *sdd, bn_pf2 *pf, int steps)
{
    bn_v4d kk = {k, k, k, k}, mm = {m, m, m, m};
    bn_v4d d0 = {0}, d1 = {0}, d2 = {0}, d3 = {0}, q0 = {0}, q1 = {0}, q2 = {0}, q3 = {0};
    double td = 0, tq = 0;
#define BN_DEV(v) (only_k ? (v) - kk : ((v) - kk) - mm)
#define BN_DEV1(v) (only_k ? (v) - k : ((v) - k) - m)
    for (ptrdiff_t s = 0; s < nseg; s++) {
        if (pf != NULL)   /* a later region's steps spread over the segments (L2 hint) */
            for (int j = 0; j < steps; j++)
                bn_pf2_step_l2(pf);
        BN_SEG_DEV_ROW(x + s * stride, len);
    }
#undef BN_DEV
#undef BN_DEV1
    *sd = bn_v4d_total((d0 + d1) + (d2 + d3)) + td;
    *sdd = bn_v4d_total((q0 + q1) + (q2 + q3)) + tq;
}

BN_INLINE void BN_NAME(bn_seg_dev)(const BN_T *x, ptrdiff_t nseg, ptrdiff_t len,
                                   ptrdiff_t stride, double k, double m, int only_k,
                                   double *sd, double *sdd)
{
    BN_NAME(bn_seg_dev_pf)(x, nseg, len, stride, k, m, only_k, sd, sdd, NULL, 0);
}

#if BN_T_IS_FLOAT
/* Moments of nseg segments (as bn_seg_moments) in one double pass around a float shift K:
 * K = the float nearest pivot + mean(x - pivot), the mean from a float pass (8 lanes, no
 * conversion; within ~1e-5 of the spread of x - pivot). u = x - K is exact in double;
 * mean = K + sum(u)/n, M2 = sum(u*u) - sum(u)^2/n (the corrected two-pass, with one
 * conversion and one subtraction per value instead of two and three: the FP add ports
 * were the limit). A constant segment set: a zero float sum when the pivot is its value,
 * else K within a few ulps of it, so u has a few bits and every sum is exact: M2 == 0,
 * mean == value. Returns 0, computing nothing, when K is not finite (a float sum that
 * overflowed, inf or nan): the caller's double passes handle those as before. */
BN_INLINE int BN_NAME(bn_seg_shifted)(const float *x, ptrdiff_t nseg, ptrdiff_t len,
                                      ptrdiff_t stride, double pivot, double n, double *mean,
                                      double *m2, const char *fp, const char *fe)
{
    float pf = (float)pivot, ts = 0;
    bn_v8f s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, pv = {pf, pf, pf, pf, pf, pf, pf, pf}, v;
    for (ptrdiff_t s = 0; s < nseg; s++) {
        const float *p = x + s * stride;
        ptrdiff_t i = 0;
        for (; i + 32 <= len; i += 32) {   /* four chains: the adds' latency is the limit */
            bn_prefetch_step(&fp, fe);       /* (fp: 128 bytes of a later block a step) */
            memcpy(&v, p + i, sizeof v); s0 += v - pv;
            memcpy(&v, p + i + 8, sizeof v); s1 += v - pv;
            memcpy(&v, p + i + 16, sizeof v); s2 += v - pv;
            memcpy(&v, p + i + 24, sizeof v); s3 += v - pv;
        }
        for (; i + 8 <= len; i += 8) { memcpy(&v, p + i, sizeof v); s0 += v - pv; }
        for (; i < len; i++) ts += p[i] - pf;
    }
    s0 = (s0 + s1) + (s2 + s3);
    double tot = ((double)s0[0] + (double)s0[4]) + ((double)s0[1] + (double)s0[5]) +
                 ((double)s0[2] + (double)s0[6]) + ((double)s0[3] + (double)s0[7]) + ts;
    double K = (double)(float)(pivot + tot / n);
    if (!isfinite(K))
        return 0;
    double sd, sdd;
    BN_NAME(bn_seg_dev)(x, nseg, len, stride, K, 0.0, 1, &sd, &sdd);
    bn_finish_block(n, K - pivot, sd, sdd, mean, m2);
    return 1;
}
#endif

/* IN: nseg segments of len values, stride elements apart, and a pivot. OUT: the mean of
 * (x - pivot) and the M2 of x. Sixteen double lanes in four vector registers; the lane of
 * a value and the order of every addition depend on (nseg, len) only. */
BN_INLINE void BN_NAME(bn_seg_moments_pf_body)(const BN_T *x, ptrdiff_t nseg,
                                               ptrdiff_t len, ptrdiff_t stride, double pivot,
                                               double *mean, double *m2, const char *pf,
                                               const char *pe)
{
    bn_v4d a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    bn_v4d k = {pivot, pivot, pivot, pivot};
    double t = 0;
    double n = (double)nseg * (double)len;
    if (n == 0) { *mean = 0; *m2 = 0; return; }
#if BN_T_IS_FLOAT
    /* float: the shift from a float pass (8 lanes, no conversion), the sums in double
     * around it; the double first pass below only when that shift is not finite */
    if (BN_NAME(bn_seg_shifted)(x, nseg, len, stride, pivot, n, mean, m2, pf, pe))
        return;
#endif
    for (ptrdiff_t s = 0; s < nseg; s++) {
        const BN_T *p = x + s * stride;
        ptrdiff_t i = 0;
        for (; i + 16 <= len; i += 16) {
            if (sizeof(BN_T) == 8 || !(i & 16))   /* 128 bytes of a later block per 128 */
                bn_prefetch_step(&pf, pe);
            a0 += BN_LOAD4(p + i) - k;
            a1 += BN_LOAD4(p + i + 4) - k;
            a2 += BN_LOAD4(p + i + 8) - k;
            a3 += BN_LOAD4(p + i + 12) - k;
        }
        for (; i + 4 <= len; i += 4) a0 += BN_LOAD4(p + i) - k;
        for (; i < len; i++) t += (double)p[i] - pivot;
    }
    /* mean0 relative to the pivot; deviations below use the absolute x - (pivot + mean0)
     * computed as (x - pivot) - mean0, both steps exact or nearly so */
    double mean0 = (bn_v4d_total((a0 + a1) + (a2 + a3)) + t) / n;
    double sd, sdd;
    BN_NAME(bn_seg_dev)(x, nseg, len, stride, pivot, mean0, 0, &sd, &sdd);
    bn_finish_block(n, mean0, sd, sdd, mean, m2);
}

BN_INLINE void BN_NAME(bn_seg_moments_body)(const BN_T *x, ptrdiff_t nseg, ptrdiff_t len,
                                            ptrdiff_t stride, double pivot, double *mean,
                                            double *m2)
{
    BN_NAME(bn_seg_moments_pf_body)(x, nseg, len, stride, pivot, mean, m2, NULL, NULL);
}

static BN_CLONES void BN_NAME(bn_seg_moments)(const BN_T *x, ptrdiff_t nseg, ptrdiff_t len,
                                             ptrdiff_t stride, double pivot, double *mean,
                                             double *m2)
{
    BN_NAME(bn_seg_moments_body)(x, nseg, len, stride, pivot, mean, m2);
}

/* bn_seg_moments (the same bits) that also prefetches the nnext bytes at pf (into L1) in
 * its first pass, 128 bytes of them per 128 bytes read: the next block of a long plane
 * (plane_block_stats), where one burst of its prefetches before the block waited on the
 * fill buffers (moments over (0, 2, 3) of (32, 64, 56, 56) 1.07x, float64 1.12x,
 * (8, 64, 112, 112) 1.11x, (16, 32, 64, 64) 1.13x; float64 batch-norm training
 * (32, 64, 56, 56) 1.03x). */
static BN_CLONES void BN_NAME(bn_seg_moments_pf)(const BN_T *x, ptrdiff_t len, double pivot,
                                                double *mean, double *m2, const BN_T *pf,
                                                ptrdiff_t nnext)
{
    const char *p = (const char *)pf;
    BN_NAME(bn_seg_moments_pf_body)(x, 1, len, 0, pivot, mean, m2, p,
                                    p != NULL ? p + nnext : NULL);
}

#if BN_T_IS_FLOAT
/* Moments of n = nseg * len floats (segments as bn_seg_moments), n <= BN_RUN_MAX, in one
 * double pass around a shift K: a float near the mean of the first (up to 16) values
 * (their sum in float lanes: within a few float ulps of it), or 0 where that is not
 * finite. u = x - K is exact in double; mean (of x - K) =
 * sum(u)/n, M2 = sum(u^2) - sum(u)^2/n, with a relative error of about
 * sqrt(n/16) * eps * sum(u^2) / M2 (n/16 at worst). That ratio is 1 + z^2, z = K's
 * distance from the mean in standard deviations: about 1/4 for a shift averaging 16
 * values, so the statistics are as exact as the corrected two-pass ones (the float64
 * running statistics of a float32 batch are exact to two ulps), and never worse than
 * z^2 <= n (and a few float ulps) since K lies among the values of the run, within
 * sqrt(n - 1) standard deviations of their mean (Samuelson): below n^2/16 * eps, 7e-9 (an eighth of a float32
 * ulp) at BN_RUN_MAX. Layer-norm rows (up to BLOCK values: bn_rows_norm, which shifts
 * by the first value), the (sample, group) runs of group and instance norm
 * and batch-norm channels that small, which read each value once here instead of twice
 * (float shift pass, then double pass). A constant run gives K == its value, u == 0:
 * M2 == 0 and mean == K exactly. Squares of float differences cannot overflow a double;
 * inf and nan reach sum(u) as they reach NumPy's mean (inf, or nan for inf - inf) and
 * make M2 nan. */
#ifndef BN_RUN_MAX
#define BN_RUN_MAX 32768
#endif
/* The shift K of bn_run_moments, from the first (up to 16) of the len values at x. */
BN_INLINE double BN_NAME(bn_run_shift)(const float *x, ptrdiff_t len)
{
    double K = 0;
    if (len >= 16) {
        /* a tree in float lanes (converting 16 values to double cost 7% of a 64-value
         * layer-norm row): K need only be a float near the mean. Each value is scaled by
         * 1/16 first (exact but for subnormals), so no partial sum can overflow */
        const bn_v8f sixteenth = {0.0625f, 0.0625f, 0.0625f, 0.0625f,
                                  0.0625f, 0.0625f, 0.0625f, 0.0625f};
        bn_v8f a, b;
        memcpy(&a, x, sizeof a);
        memcpy(&b, x + 8, sizeof b);
        a = a * sixteenth + b * sixteenth;
        const bn_v4f h = {a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]};
        K = (double)((h[0] + h[2]) + (h[1] + h[3]));
    } else {
        for (ptrdiff_t i = 0; i < len; i++)
            K += (double)x[i];
        K /= (double)len;
    }
    return bn_pivot((double)(float)K);
}

/* K and the sums sd = sum(u), sdd = sum(u^2), u = x - K, of bn_run_moments. */
BN_INLINE void BN_NAME(bn_run_sums_body)(const float *x, ptrdiff_t nseg, ptrdiff_t len,
                                         ptrdiff_t stride, double *shift, double *sd,
                                         double *sdd)
{
    const double K = BN_NAME(bn_run_shift)(x, len);
    BN_NAME(bn_seg_dev)(x, nseg, len, stride, K, 0.0, 1, sd, sdd);
    *shift = K;
}

/* mean (relative to the shift) and M2 of n values from their sums (bn_run_sums_body). */
BN_INLINE void bn_run_finish(double n, double sd, double sdd, double *mean, double *m2)
{
    *m2 = bn_m2_of(n, sd, sdd);
    *mean = sd / n;
}

BN_INLINE void BN_NAME(bn_run_moments_body)(const float *x, ptrdiff_t nseg, ptrdiff_t len,
                                            ptrdiff_t stride, double *shift, double *mean,
                                            double *m2)
{
    double sd, sdd;
    BN_NAME(bn_run_sums_body)(x, nseg, len, stride, shift, &sd, &sdd);
    bn_run_finish((double)nseg * (double)len, sd, sdd, mean, m2);
}

static BN_CLONES void BN_NAME(bn_run_moments)(const float *x, ptrdiff_t nseg, ptrdiff_t len,
                                             ptrdiff_t stride, double *shift, double *mean,
                                             double *m2)
{
    BN_NAME(bn_run_moments_body)(x, nseg, len, stride, shift, mean, m2);
}

/* bn_run_moments that also prefetches (into L2) prows rows of pwidth bytes, pld bytes
 * apart, from pf, spread evenly over its segments: the next channel group's planes of a
 * share of the samples (forward_group), or the next block of short planes far apart
 * (bn_plane_run_stats_f32), where one burst of prefetches before the statistics had
 * stalled them. The same bits. */
static BN_CLONES void BN_NAME(bn_run_moments_pf)(const float *x, ptrdiff_t nseg,
                                                ptrdiff_t len, ptrdiff_t stride,
                                                double *shift, double *mean, double *m2,
                                                const float *pf, ptrdiff_t prows,
                                                ptrdiff_t pwidth, ptrdiff_t pld)
{
    bn_pf2 f = {(const char *)pf, 0, pwidth, pld, pf != NULL ? prows : 0};
    ptrdiff_t lines = (pwidth + 127) / 128 * prows;   /* steps in all */
    int steps = nseg > 0 ? (int)((lines + nseg - 1) / nseg) : 0;
    const double K = BN_NAME(bn_run_shift)(x, len);
    double sd, sdd;
    BN_NAME(bn_seg_dev_pf)(x, nseg, len, stride, K, 0.0, 1, &sd, &sdd, &f, steps);
    while (f.rows > 0)   /* what the segments left (rounding) */
        bn_pf2_step_l2(&f);
    *shift = K;
    bn_run_finish((double)nseg * (double)len, sd, sdd, mean, m2);
}

/* bn_run_moments of one segment of len values that also prefetches (into L1) the nnext
 * bytes at pf (NULL: nothing), two lines per 32 values (128 bytes: as fast as it reads),
 * the next block of a long plane (bn_plane_run_stats_f32); the additions of
 * bn_seg_dev's loop, so its bits. (Pieces of 32 values, one bn_seg_dev row each, had
 * cost the float16 training's statistics of a channel in L2 9%; pieces inside
 * bn_seg_dev, for every caller, the short planes of forward_group 4-6%.) */
static BN_CLONES void BN_NAME(bn_run_moments_pf1)(const float *x, ptrdiff_t len,
                                                 double *shift, double *mean, double *m2,
                                                 const float *pf, ptrdiff_t nnext)
{
    const char *p = (const char *)pf, *e = pf != NULL ? p + nnext : NULL;
    const double k = BN_NAME(bn_run_shift)(x, len);
    const bn_v4d kk = {k, k, k, k};
    bn_v4d d0 = {0}, d1 = {0}, d2 = {0}, d3 = {0}, q0 = {0}, q1 = {0}, q2 = {0}, q3 = {0};
    double td = 0, tq = 0;
#define BN_DEV(v) ((v) - kk)
#define BN_DEV1(v) ((v) - k)
    ptrdiff_t i = 0;
    for (; i + 16 <= len; i += 16) {   /* BN_SEG_DEV_ROW's loop, with the prefetch */
        if (!(i & 16))
            bn_prefetch_step(&p, e);
        bn_v4d u0 = BN_DEV(BN_LOAD4(x + i)), u1 = BN_DEV(BN_LOAD4(x + i + 4));
        bn_v4d u2 = BN_DEV(BN_LOAD4(x + i + 8)), u3 = BN_DEV(BN_LOAD4(x + i + 12));
        BN_ACC4(u0, u1, u2, u3);
    }
    const float *tail = x + i;   /* (the macro has an i of its own) */
    const ptrdiff_t rest = len - i;
    BN_SEG_DEV_ROW(tail, rest);   /* its tails */
#undef BN_DEV
#undef BN_DEV1
    while (p < e)   /* what the pieces left */
        bn_prefetch_step(&p, e);
    *shift = k;
    bn_run_finish((double)len, bn_v4d_total((d0 + d1) + (d2 + d3)) + td,
                  bn_v4d_total((q0 + q1) + (q2 + q3)) + tq, mean, m2);
}

/* plane_block_stats' one-pass float blocks [b0, b1) of a channel (outer planes of inner
 * values, so apart; blocks of `block` values: a piece of a long plane, or whole short
 * planes) merged into st around the pivot, each block's moments as bn_run_moments
 * (block_moments' one_pass bits) while the next block is fetched spread over its pass,
 * where a burst of its prefetches before it waited on the fill buffers: into L1 from the
 * rest of a long plane (bn_run_moments_pf1: batch-norm training (32, 64, 56, 56)
 * 1.06-1.11x, (8, 64, 112, 112) 1.11-1.15x, (16, 32, 64, 64) 1.15x; 1.03-1.04x over into
 * L2), into L2 from short planes far apart (bn_run_moments_pf: (256, 256, 14, 14)
 * 1.03-1.04x; 0.99x into L1). */
static BN_CLONES void bn_plane_run_stats_f32(const float *x, ptrdiff_t outer, ptrdiff_t inner,
                                            ptrdiff_t so, ptrdiff_t b0, ptrdiff_t b1,
                                            ptrdiff_t block, double pivot, bn_moments *st)
{
    double shift, m, m2;
    if (inner >= block) {
        const ptrdiff_t bpp = (inner + block - 1) / block;
        for (ptrdiff_t b = b0; b < b1; b++) {
            const ptrdiff_t p = b / bpp, off = (b - p * bpp) * block;
            const ptrdiff_t length = inner - off < block ? inner - off : block;
            const float *nxt = b + 1 >= b1 ? NULL
                               : off + length < inner ? x + p * so + off + length
                               : x + (p + 1) * so;
            bn_run_moments_pf1_f32(x + p * so + off, length, &shift, &m, &m2, nxt,
                                   (inner < block ? inner : block) * (ptrdiff_t)sizeof(float));
            bn_chan_merge(st, (double)length, m + (shift - pivot), m2);
        }
    } else {
        const ptrdiff_t g = block / inner;
        for (ptrdiff_t b = b0; b < b1; b++) {
            const ptrdiff_t p = b * g, nplanes = outer - p < g ? outer - p : g;
            const ptrdiff_t nnext = outer - p - g < g ? outer - p - g : g;
            bn_run_moments_pf_f32(x + p * so, nplanes, inner, so, &shift, &m, &m2,
                                  b + 1 < b1 ? x + (p + g) * so : NULL, nnext,
                                  inner * (ptrdiff_t)sizeof(float),
                                  so * (ptrdiff_t)sizeof(float));
            bn_chan_merge(st, (double)(nplanes * inner), m + (shift - pivot), m2);
        }
    }
}

#endif

/* IN: nseg segments as above. OUT: sum of squares (RMS norm). */
BN_INLINE double BN_NAME(bn_seg_sumsq_body)(const BN_T *x, ptrdiff_t nseg, ptrdiff_t len,
                                            ptrdiff_t stride)
{
    /* four accumulator chains: with two, the latency of the adds was the limit */
    bn_v4d a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    double t = 0;
    for (ptrdiff_t s = 0; s < nseg; s++) {
        const BN_T *p = x + s * stride;
        ptrdiff_t i = 0;
        for (; i + 16 <= len; i += 16) {
            bn_v4d u0 = BN_LOAD4(p + i), u1 = BN_LOAD4(p + i + 4);
            bn_v4d u2 = BN_LOAD4(p + i + 8), u3 = BN_LOAD4(p + i + 12);
            a0 = BN_FMA4(u0, u0, a0);
            a1 = BN_FMA4(u1, u1, a1);
            a2 = BN_FMA4(u2, u2, a2);
            a3 = BN_FMA4(u3, u3, a3);
        }
        for (; i + 4 <= len; i += 4) {
            bn_v4d u = BN_LOAD4(p + i);
            a0 = BN_FMA4(u, u, a0);
        }
        for (; i < len; i++) t = BN_FMA((double)p[i], (double)p[i], t);
    }
    return bn_v4d_total((a0 + a1) + (a2 + a3)) + t;
}

static BN_CLONES double BN_NAME(bn_seg_sumsq)(const BN_T *x, ptrdiff_t nseg, ptrdiff_t len,
                                             ptrdiff_t stride)
{
    return BN_NAME(bn_seg_sumsq_body)(x, nseg, len, stride);
}

/* y = (x - mean) * scale + shift over n contiguous values. Subtracting first keeps full
 * precision at large offsets and maps x == mean to exactly shift. */
static BN_CLONES void BN_NAME(bn_affine)(const BN_T *restrict x, BN_T *restrict y, ptrdiff_t n,
                                        double mean, double scale, double shift)
{
    for (ptrdiff_t i = 0; i < n; i++) y[i] = (BN_T)(((double)x[i] - mean) * scale + shift);
}

/* bn_affine over nseg segments of len values (x and y with their own strides): one call
 * per channel instead of one per plane. With stream, y's whole lines are written with
 * streaming stores (see bn_stream_span; the caller fences). */
BN_INLINE void BN_NAME(bn_seg_affine_body)(const BN_T *x, BN_T *y, ptrdiff_t nseg,
                                           ptrdiff_t len, ptrdiff_t sx, ptrdiff_t sy,
                                           double mean, double scale, double shift, int stream,
                                           const char *pf, const char *pe)
{
    unsigned pfc = 0;   /* vectors: a prefetch step of [pf, pe) (128 bytes) per 4 (128 bytes) */
#if BN_T_IS_FLOAT
    /* float32 arithmetic, 8 lanes, ~3x less work than a round trip through double. The
     * mean is split as hi + lo (two floats): x - hi is exact near the mean (Sterbenz), so
     * ((x - hi) - lo) carries the deviation to float precision even at a 1e6 offset, and
     * x == mean gives exactly shift. Vector and scalar elements evaluate the same float
     * expression, so where the streamed lines start cannot change a bit. */
    const float hi = (float)mean, lo = (float)(mean - (double)hi);
    const float k = (float)scale, b = (float)shift;
    const bn_v8f vhi = {hi, hi, hi, hi, hi, hi, hi, hi}, vlo = {lo, lo, lo, lo, lo, lo, lo, lo};
    const bn_v8f vk = {k, k, k, k, k, k, k, k}, vb = {b, b, b, b, b, b, b, b};
    for (ptrdiff_t s = 0; s < nseg; s++) {
        const float *p = x + s * sx;
        float *q = y + s * sy;
#define BN_SCALAR(i) q[i] = ((p[i] - hi) - lo) * k + b
#define BN_VEC(i, nt) do { bn_v8f v_; memcpy(&v_, p + (i), sizeof v_); \
        if ((++pfc & 3) == 0) bn_prefetch_step_l2(&pf, pe); \
        BN_PUT8F(q + (i), ((v_ - vhi) - vlo) * vk + vb, nt); } while (0)
        BN_SPAN_LOOP(q, len, stream, 8, BN_SCALAR, BN_VEC);
#undef BN_SCALAR
#undef BN_VEC
    }
#else
    bn_v4d m = {mean, mean, mean, mean}, k = {scale, scale, scale, scale};
    bn_v4d b = {shift, shift, shift, shift};
    for (ptrdiff_t s = 0; s < nseg; s++) {
        const BN_T *p = x + s * sx;
        BN_T *q = y + s * sy;
#define BN_SCALAR(i) q[i] = (BN_T)(((double)p[i] - mean) * scale + shift)
#define BN_VEC(i, nt) do { if ((++pfc & 3) == 0) bn_prefetch_step_l2(&pf, pe); \
        BN_PUT4(q + (i), (BN_LOAD4(p + (i)) - m) * k + b, nt); } while (0)
        BN_SPAN_LOOP(q, len, stream, 4, BN_SCALAR, BN_VEC);
#undef BN_SCALAR
#undef BN_VEC
    }
#endif
}

static BN_CLONES void BN_NAME(bn_seg_affine)(const BN_T *x, BN_T *y, ptrdiff_t nseg,
                                            ptrdiff_t len, ptrdiff_t sx, ptrdiff_t sy,
                                            double mean, double scale, double shift)
{
    BN_NAME(bn_seg_affine_body)(x, y, nseg, len, sx, sy, mean, scale, shift, 0, NULL, NULL);
}

static BN_CLONES void BN_NAME(bn_seg_affine_stream)(const BN_T *x, BN_T *y, ptrdiff_t nseg,
                                                   ptrdiff_t len, ptrdiff_t sx, ptrdiff_t sy,
                                                   double mean, double scale, double shift)
{
    BN_NAME(bn_seg_affine_body)(x, y, nseg, len, sx, sy, mean, scale, shift, 1, NULL, NULL);
}

/* bn_seg_affine(_stream) of one segment that also prefetches [pf, pe) (e.g. the next
 * channel), two lines per 128 bytes of x: the reads of the next channel overlap the
 * writes of this one, where one phase after the other left the memory bus half idle. */
static BN_CLONES void BN_NAME(bn_seg_affine_pf)(const BN_T *x, BN_T *y, ptrdiff_t len,
                                               double mean, double scale, double shift,
                                               int stream, const void *pf, const void *pe)
{
    BN_NAME(bn_seg_affine_body)(x, y, 1, len, 0, 0, mean, scale, shift, stream,
                                (const char *)pf, (const char *)pe);
}

/* The affine of np planes of inner values laid end to end (plane j at x + j * inner, y
 * likewise), plane j with channel j's parameters as bn_planes_affine:
 * y = (x - mean[j]) * (w[j] * invstd[j]) + b[j], as one loop over the np * inner values,
 * the lanes of a vector that straddles two planes each taking its own plane's
 * (inner >= 8, so that a vector meets at most two). Every element evaluates
 * bn_seg_affine's expression with its plane's parameters: the same bits. Streamed as
 * bn_seg_affine, whole lines of the run: a run's lines are full but at its two ends,
 * where a short plane's two end lines rarely are (a partial line goes to memory as a
 * read-modify-write). The eval affine of (256, 256, 14, 14) 1.12-1.24x; in the caches,
 * where nothing is streamed, it gained nothing over plane by plane (the straddling
 * vectors cost what the planes' scalar tails did). */
#if BN_T_IS_FLOAT
#define BN_RUN_LANES 8
#define BN_RUN_PARAMS(j) do { const double m_ = mean[j]; \
        hi_ = (float)m_; lo_ = (float)(m_ - (double)hi_); \
        k = (float)((w ? w[j] : 1.0) * invstd[j]); bb = (float)(b ? b[j] : 0.0); } while (0)
#define BN_RUN_SPLAT(v, a) bn_v8f v = {a, a, a, a, a, a, a, a}
#define BN_RUN_EXPR(v, H, LO, K, B) (((v) - (H)) - (LO)) * (K) + (B)
#define BN_RUN_SEL(m, a, c) ((bn_v8f)((((bn_v8i)(a)) & (m)) | (((bn_v8i)(c)) & ~(m))))
#define BN_RUN_LOAD(v, i) bn_v8f v; memcpy(&v, p + (i), sizeof v)
#define BN_RUN_PUT(i, v, nt) BN_PUT8F(q + (i), (v), nt)
#define BN_SCALAR(i) do { while ((i) >= e) BN_RUN_NEXT(); \
        q[i] = ((p[i] - hi_) - lo_) * k + bb; } while (0)
#else
#define BN_RUN_LANES 4
#define BN_RUN_PARAMS(j) do { hi_ = mean[j]; lo_ = 0.0; k = (w ? w[j] : 1.0) * invstd[j]; \
        bb = b ? b[j] : 0.0; } while (0)
#define BN_RUN_SPLAT(v, a) bn_v4d v = {a, a, a, a}
#define BN_RUN_EXPR(v, H, LO, K, B) ((v) - (H)) * (K) + (B)
#define BN_RUN_SEL(m, a, c) ((bn_v4d)((((bn_v4l)(a)) & (m)) | (((bn_v4l)(c)) & ~(m))))
#define BN_RUN_LOAD(v, i) bn_v4d v = BN_LOAD4(p + (i))
#define BN_RUN_PUT(i, v, nt) BN_PUT4(q + (i), (v), nt)
#define BN_SCALAR(i) do { while ((i) >= e) BN_RUN_NEXT(); \
        q[i] = (BN_T)(((double)p[i] - hi_) * k + bb); } while (0)
#endif
#define BN_RUN_NEXT() do { j++; e += inner; BN_RUN_PARAMS(j); \
        H = (typeof(H)){0} + hi_; LO = (typeof(LO)){0} + lo_; K = (typeof(K)){0} + k; \
        B = (typeof(B)){0} + bb; } while (0)
#define BN_VEC(i, nt) do { BN_RUN_LOAD(v_, i); BN_RUN_PUT(i, BN_RUN_EXPR(v_, H, LO, K, B), nt); \
    } while (0)
BN_INLINE void BN_NAME(bn_run_affine_body)(const BN_T *p, BN_T *q, ptrdiff_t np,
                                           ptrdiff_t inner, const double *mean,
                                           const double *invstd, const double *w,
                                           const double *b, int stream)
{
#if BN_T_IS_FLOAT
    typedef float bn_rs;
    typedef bn_v8i bn_rmask;
    typedef int bn_rme;
    const bn_v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
#else
    typedef double bn_rs;
    typedef bn_v4l bn_rmask;
    typedef long long bn_rme;
    const bn_v4l lane = {0, 1, 2, 3};
#endif
    const ptrdiff_t n = np * inner, W = BN_RUN_LANES;
    ptrdiff_t j = 0, e = inner, i = 0, s0, s1;   /* the plane at hand, where it ends */
    bn_rs hi_, lo_, k, bb;
    BN_RUN_PARAMS(0);
    BN_RUN_SPLAT(H, hi_);
    BN_RUN_SPLAT(LO, lo_);
    BN_RUN_SPLAT(K, k);
    BN_RUN_SPLAT(B, bb);
    /* vectors on the grid of the streamed lines (from s0), the head before it scalar */
    bn_stream_span(q, n, sizeof(BN_T), stream, &s0, &s1);
    for (; i < s0; i++) BN_SCALAR(i);
    while (i + W <= n) {
        while (i >= e) BN_RUN_NEXT();
        const ptrdiff_t lim = e < n ? e : n;
        for (; i + W <= lim && i < s1; i += W) BN_VEC(i, 1);
        for (; i + W <= lim; i += W) BN_VEC(i, 0);
        if (i + W > n || i >= e)
            continue;
        /* i < e < i + W: lanes below e - i take plane j, the others plane j + 1 */
        const bn_rmask m_ = lane < (bn_rmask){0} + (bn_rme)(e - i);
        const typeof(H) H0 = H, L0 = LO, K0 = K, B0 = B;
        BN_RUN_LOAD(v_, i);
        (void)L0;
        BN_RUN_NEXT();
        const typeof(H) o_ = BN_RUN_EXPR(v_, BN_RUN_SEL(m_, H0, H), BN_RUN_SEL(m_, L0, LO),
                                         BN_RUN_SEL(m_, K0, K), BN_RUN_SEL(m_, B0, B));
        if (i < s1) BN_RUN_PUT(i, o_, 1); else BN_RUN_PUT(i, o_, 0);
        i += W;
    }
    for (; i < n; i++) BN_SCALAR(i);
}
#undef BN_SCALAR
#undef BN_VEC
#undef BN_RUN_LOAD
#undef BN_RUN_PUT
#undef BN_RUN_NEXT
#undef BN_RUN_LANES
#undef BN_RUN_PARAMS
#undef BN_RUN_SPLAT
#undef BN_RUN_EXPR
#undef BN_RUN_SEL

/* The affine of short planes of adjacent channels (each sample's planes contiguous, x's
 * samples so apart, y's yso): samples [n0, n1) by channels [c0, c1). The planes of a band
 * of channels are one run of values per sample, each value's channel parameters read from
 * tables expanded over the band's planes (float: the mean's hi and lo, the scale and the
 * shift as floats; double: as they are), made once per band and used by every sample.
 * Plane by plane, a plane of 4 values had paid its parameters' conversion and splat and a
 * loop set-up for 4 scalar values (eval (256, 64, 2, 2) took 4.5 cycles a value). Each
 * value gets bn_seg_affine_body's expression with its channel's parameters: the same
 * bits. Worth it where each table entry serves several samples (BN_SHORT_REUSE). */
#define BN_SHORT_PLANE (BN_T_IS_FLOAT ? BN_SHORT_PLANE_F32 : BN_SHORT_PLANE_F64)
static BN_CLONES void BN_NAME(bn_planes_affine_rect)(const BN_T *x, BN_T *y, ptrdiff_t n0,
                                                    ptrdiff_t n1, ptrdiff_t c0, ptrdiff_t c1,
                                                    ptrdiff_t inner, ptrdiff_t so,
                                                    ptrdiff_t yso, const double *mean,
                                                    const double *invstd, const double *w,
                                                    const double *b)
{
#if BN_T_IS_FLOAT
    float tab[4 * BN_SHORT_TAB] __attribute__((aligned(32)));
    const ptrdiff_t W = 8, len = BN_SHORT_TAB;
    float *th = tab, *tl = tab + len, *tk = tab + 2 * len, *tb = tab + 3 * len;
#else
    double tab[3 * (BN_SHORT_TAB / 2)] __attribute__((aligned(32)));
    const ptrdiff_t W = 4, len = BN_SHORT_TAB / 2;
    double *th = tab, *tk = tab + len, *tb = tab + 2 * len;
#endif
    const ptrdiff_t band = len / inner > 0 ? len / inner : 1;
    for (ptrdiff_t cb = c0; cb < c1; cb += band) {
        const ptrdiff_t ce = cb + band < c1 ? cb + band : c1, end = (ce - cb) * inner;
        for (ptrdiff_t c = cb; c < ce; c++) {
            const double m = mean[c], k = (w ? w[c] : 1.0) * invstd[c], bb = b ? b[c] : 0.0;
            for (ptrdiff_t u = (c - cb) * inner; u < (c - cb + 1) * inner; u++) {
#if BN_T_IS_FLOAT
                th[u] = (float)m;
                tl[u] = (float)(m - (double)th[u]);
                tk[u] = (float)k;
                tb[u] = (float)bb;
#else
                th[u] = m;
                tk[u] = k;
                tb[u] = bb;
#endif
            }
        }
        for (ptrdiff_t n = n0; n < n1; n++) {
            const BN_T *p = x + n * so + cb * inner;
            BN_T *q = y + n * yso + cb * inner;
            ptrdiff_t i = 0;
            for (; i + W <= end; i += W) {
#if BN_T_IS_FLOAT
                bn_tab8_affine(p + i, q + i, th + i, tl + i, tk + i, tb + i);
#else
                bn_v4d m_, k_, b_;
                memcpy(&m_, th + i, 32);
                memcpy(&k_, tk + i, 32);
                memcpy(&b_, tb + i, 32);
                BN_STORE4(q + i, (BN_LOAD4(p + i) - m_) * k_ + b_);
#endif
            }
            for (; i < end; i++)
#if BN_T_IS_FLOAT
                q[i] = ((p[i] - th[i]) - tl[i]) * tk[i] + tb[i];
#else
                q[i] = (p[i] - th[i]) * tk[i] + tb[i];
#endif
        }
    }
}

/* The eval affine of planes t0 .. t0 + nplanes - 1 in memory order (plane t is sample
 * t / nch, channel t % nch; x's planes at n * so + c * sc, y's at n * yso + c * ysc), one
 * call for the run: called plane by plane, a 49-value plane cost about as much in the
 * call as in its values. Channel c: y = (x - mean[c]) * (w[c] * invstd[c]) + b[c], w and
 * b optional (NULL: ones, zeros); streamed as bn_seg_affine (the caller fences). Streamed
 * planes of adjacent channels (sc == inner, ysc == inner) go sample by sample, each
 * sample's planes one run (bn_run_affine_body): the same bits. */
static BN_CLONES void BN_NAME(bn_planes_affine)(const BN_T *x, BN_T *y, ptrdiff_t t0,
                                               ptrdiff_t nplanes, ptrdiff_t nch,
                                               ptrdiff_t inner, ptrdiff_t so, ptrdiff_t sc,
                                               ptrdiff_t yso, ptrdiff_t ysc,
                                               const double *mean, const double *invstd,
                                               const double *w, const double *b, int stream)
{
    ptrdiff_t n = t0 / nch, c = t0 - n * nch;
    if (!stream && sc == inner && ysc == inner && inner < BN_SHORT_PLANE &&
            nplanes >= BN_SHORT_REUSE * nch) {
        /* short planes: the chunk's whole samples as one rectangle, a partial sample at
         * either end as its own */
        const ptrdiff_t t1 = t0 + nplanes, nlast = t1 / nch, clast = t1 - nlast * nch;
        if (c > 0)
            BN_NAME(bn_planes_affine_rect)(x, y, n, n + 1, c, nch, inner, so, yso, mean,
                                           invstd, w, b);
        n += c > 0;
        BN_NAME(bn_planes_affine_rect)(x, y, n, nlast, 0, nch, inner, so, yso, mean, invstd,
                                       w, b);
        if (clast > 0)
            BN_NAME(bn_planes_affine_rect)(x, y, nlast, nlast + 1, 0, clast, inner, so, yso,
                                           mean, invstd, w, b);
        return;
    }
    if (stream && sc == inner && ysc == inner && inner >= 8) {   /* a sample's: one run */
        for (ptrdiff_t t = 0; t < nplanes; ) {
            const ptrdiff_t np = nplanes - t < nch - c ? nplanes - t : nch - c;
            BN_NAME(bn_run_affine_body)(x + n * so + c * sc, y + n * yso + c * ysc, np, inner,
                                        mean + c, invstd + c, w ? w + c : NULL,
                                        b ? b + c : NULL, stream);
            t += np;
            c = 0;
            n++;
        }
        return;
    }
    /* other planes, unstreamed, in a chunk with every channel's planes at least twice:
     * the channels' parameters made once for the chunk, not once a plane (in the caches
     * float eval (128, 128, 4, 4) 1.36x, (64, 64, 5, 5) 1.25x, (32, 64, 8, 8) 1.13x,
     * double 1.06-1.18x; beyond them as before). The same expressions: the same bits. */
#if BN_T_IS_FLOAT
    if (!stream && nch <= BN_PLANE_TAB && nplanes >= 2 * nch) {
        float tab[4 * BN_PLANE_TAB] __attribute__((aligned(32)));
        float *th = tab, *tl = tab + nch, *tk = tab + 2 * nch, *tb = tab + 3 * nch;
        for (ptrdiff_t j = 0; j < nch; j++) {
            const double m = mean[j];
            th[j] = (float)m;
            tl[j] = (float)(m - (double)th[j]);
            tk[j] = (float)((w ? w[j] : 1.0) * invstd[j]);
            tb[j] = (float)(b ? b[j] : 0.0);
        }
        for (ptrdiff_t t = 0; t < nplanes; t++) {
            const float *p = x + n * so + c * sc;
            float *q = y + n * yso + c * ysc;
            const float hi = th[c], lo = tl[c], k = tk[c], bb = tb[c];
            const bn_v8f vh = {hi, hi, hi, hi, hi, hi, hi, hi};
            const bn_v8f vl = {lo, lo, lo, lo, lo, lo, lo, lo};
            const bn_v8f vk = {k, k, k, k, k, k, k, k};
            const bn_v8f vb = {bb, bb, bb, bb, bb, bb, bb, bb};
            ptrdiff_t i = 0;
            for (; i + 8 <= inner; i += 8) {
                bn_v8f v_;
                memcpy(&v_, p + i, sizeof v_);
                v_ = ((v_ - vh) - vl) * vk + vb;
                memcpy(q + i, &v_, sizeof v_);
            }
            for (; i < inner; i++)
                q[i] = ((p[i] - hi) - lo) * k + bb;
            if (++c == nch) {
                c = 0;
                n++;
            }
        }
        return;
    }
#else
    if (!stream && nch <= BN_PLANE_TAB && nplanes >= 2 * nch) {
        double tab[2 * BN_PLANE_TAB] __attribute__((aligned(32)));
        double *tk = tab, *tb = tab + nch;
        for (ptrdiff_t j = 0; j < nch; j++) {
            tk[j] = (w ? w[j] : 1.0) * invstd[j];
            tb[j] = b ? b[j] : 0.0;
        }
        for (ptrdiff_t t = 0; t < nplanes; t++) {
            const double *p = x + n * so + c * sc;
            double *q = y + n * yso + c * ysc;
            const double m = mean[c], k = tk[c], bb = tb[c];
            const bn_v4d vm = {m, m, m, m}, vk = {k, k, k, k}, vb = {bb, bb, bb, bb};
            ptrdiff_t i = 0;
            for (; i + 4 <= inner; i += 4)
                BN_STORE4(q + i, (BN_LOAD4(p + i) - vm) * vk + vb);
            for (; i < inner; i++)
                q[i] = (p[i] - m) * k + bb;
            if (++c == nch) {
                c = 0;
                n++;
            }
        }
        return;
    }
#endif
    for (ptrdiff_t t = 0; t < nplanes; t++) {
        BN_NAME(bn_seg_affine_body)(x + n * so + c * sc, y + n * yso + c * ysc, 1, inner, 0, 0,
                                    mean[c], (w ? w[c] : 1.0) * invstd[c], b ? b[c] : 0.0,
                                    stream, NULL, NULL);
        if (++c == nch) {
            c = 0;
            n++;
        }
    }
}

/* The affine of one NCHW group: cg channels of s values each, contiguous, channel j with
 * its own k[j] and b[j] (the mean is the group's): one call for the group instead of one
 * per channel (a call cost as much as a 49-value channel). The bits of bn_seg_affine
 * channel by channel. In address order: the last channel first (the last read), in steps
 * down of a channel, left each store to miss (the prefetchers follow rising streams):
 * group norm (128, 64, 14, 14) G=8 1.08x on 2 threads, 1.75x on 1; (8, 64, 56, 56) G=1
 * 1.05x, 1.21x on 1. */
static BN_CLONES void BN_NAME(bn_group_affine)(const BN_T *x, BN_T *y, ptrdiff_t cg, ptrdiff_t s,
                                              double mean, const double *k, const double *b,
                                              int stream)
{
    for (ptrdiff_t j = 0; j < cg; j++)
        BN_NAME(bn_seg_affine_body)(x + j * s, y + j * s, 1, s, 0, 0, mean, k[j], b[j], stream,
                                    NULL, NULL);
}

/* Group norm of NCHW (sample, group) blocks t0 .. t0 + nblk - 1, block t the cg * s
 * contiguous values of group t % g (w and b: per channel, or NULL): each block's
 * statistics as run_moments takes them, mean[t] and biased var[t], then
 * y = (x - mean) * (w[c] * invstd) + b[c] with bn_seg_affine's arithmetic, the channel's
 * scale and shift spread over its s values so the block is one vector loop. One call for
 * many small blocks (at most BN_SMALL_GROUP values: instance norm over 3x3 planes, group
 * norm over 1x1), where two kernel calls, the span bookkeeping and a scalar tail per block
 * cost more than its values. The bits of group_block. Streamed stores: the caller fences. */
static BN_CLONES void BN_NAME(bn_group_blocks)(const BN_T *x, BN_T *y, ptrdiff_t t0,
                                              ptrdiff_t nblk, ptrdiff_t g, ptrdiff_t cg,
                                              ptrdiff_t s, double eps, const double *w,
                                              const double *b, double *mean, double *var,
                                              int stream)
{
    const ptrdiff_t len = cg * s;
    /* blocks phase by phase, in runs of about 4096 values (in L1): every block's
     * statistics, then their divisions and square roots (independent, so they overlap;
     * block by block each waited ~40 cycles on its own), then each block's affine */
    const ptrdiff_t run = len >= 4096 / BN_GROUP_RUN ? (4096 + len - 1) / len : BN_GROUP_RUN;
    double inv[BN_GROUP_RUN];
#if BN_T_IS_FLOAT
    float kv[BN_SMALL_GROUP + 8] __attribute__((aligned(32)));
    float bv[BN_SMALL_GROUP + 8] __attribute__((aligned(32)));
#else
    double kv[BN_SMALL_GROUP + 4] __attribute__((aligned(32)));
    double bv[BN_SMALL_GROUP + 4] __attribute__((aligned(32)));
#endif
    ptrdiff_t gi = t0 % g;   /* the group of the run's first block, kept without a division */
    for (ptrdiff_t r0 = t0; r0 < t0 + nblk; r0 += run) {
        const ptrdiff_t nr = t0 + nblk - r0 < run ? t0 + nblk - r0 : run;
        for (ptrdiff_t t = r0; t < r0 + nr; t++) {
            const BN_T *p = x + t * len;
            double m, m2, pivot;
#if BN_T_IS_FLOAT
            BN_NAME(bn_run_moments_body)(p, 1, len, 0, &pivot, &m, &m2);
#else
            pivot = bn_pivot((double)p[0]);
            BN_NAME(bn_seg_moments_body)(p, 1, len, 0, pivot, &m, &m2);
#endif
            mean[t] = m + pivot;
            var[t] = m2 / (double)len;
        }
        for (ptrdiff_t i = 0; i < nr; i++)
            inv[i] = 1.0 / sqrt(var[r0 + i] + eps);
        for (ptrdiff_t t = r0; t < r0 + nr; t++, gi = gi + 1 == g ? 0 : gi + 1) {
            const BN_T *p = x + t * len;
            BN_T *q = y + t * len;
            const double m = mean[t], invstd = inv[t - r0];
            const ptrdiff_t c0 = gi * cg;
            /* float: bn_seg_affine's (float)scale and (float)shift; loops without a branch
             * per channel (one value a channel: the fill was most of the time) */
            if (s == 1) {
                if (w)
                    for (ptrdiff_t j = 0; j < cg; j++) kv[j] = (BN_T)(w[c0 + j] * invstd);
                else
                    for (ptrdiff_t j = 0; j < cg; j++) kv[j] = (BN_T)invstd;
                if (b)
                    for (ptrdiff_t j = 0; j < cg; j++) bv[j] = (BN_T)b[c0 + j];
                else
                    for (ptrdiff_t j = 0; j < cg; j++) bv[j] = 0;
            } else {
                for (ptrdiff_t j = 0; j < cg; j++) {
                    const BN_T k = (BN_T)((w ? w[c0 + j] : 1.0) * invstd);
                    const BN_T sh = (BN_T)(b ? b[c0 + j] : 0.0);
                    for (ptrdiff_t i = j * s; i < (j + 1) * s; i++) {
                        kv[i] = k;
                        bv[i] = sh;
                    }
                }
            }
#if BN_T_IS_FLOAT
            const float hi = (float)m, lo = (float)(m - (double)hi);
            const bn_v8f vhi = {hi, hi, hi, hi, hi, hi, hi, hi};
            const bn_v8f vlo = {lo, lo, lo, lo, lo, lo, lo, lo};
#define BN_SCALAR(i) q[i] = ((p[i] - hi) - lo) * kv[i] + bv[i]
#define BN_VEC(i, nt) do { bn_v8f v_, k_, b_; memcpy(&v_, p + (i), sizeof v_); \
        memcpy(&k_, kv + (i), sizeof k_); memcpy(&b_, bv + (i), sizeof b_); \
        BN_PUT8F(q + (i), ((v_ - vhi) - vlo) * k_ + b_, nt); } while (0)
            BN_SPAN_LOOP(q, len, stream, 8, BN_SCALAR, BN_VEC);
#else
            const bn_v4d vm = {m, m, m, m};
#define BN_SCALAR(i) q[i] = ((double)p[i] - m) * kv[i] + bv[i]
#define BN_VEC(i, nt) do { bn_v4d k_, b_; memcpy(&k_, kv + (i), 32); memcpy(&b_, bv + (i), 32); \
        BN_PUT4(q + (i), (BN_LOAD4(p + (i)) - vm) * k_ + b_, nt); } while (0)
            BN_SPAN_LOOP(q, len, stream, 4, BN_SCALAR, BN_VEC);
#endif
#undef BN_SCALAR
#undef BN_VEC
        }
    }
}

/* Touch every cache line of nseg segments (the next statistics block), so short planes
 * far apart, which the hardware prefetcher does not follow across pages, arrive early. */
static inline void BN_NAME(bn_prefetch_seg)(const BN_T *x, ptrdiff_t nseg, ptrdiff_t len,
                                            ptrdiff_t stride)
{
    const ptrdiff_t step = 64 / sizeof(BN_T);
    for (ptrdiff_t s = 0; s < nseg; s++)
        for (ptrdiff_t i = 0; i < len; i += step) __builtin_prefetch(x + s * stride + i, 0, 3);
}

/* y = x * scale[i] + shift[i] elementwise (row norms with an elementwise affine). */
static BN_CLONES void BN_NAME(bn_affine_vec)(const BN_T *restrict x, BN_T *restrict y,
                                            ptrdiff_t n, double mean, double invstd,
                                            const double *restrict w, const double *restrict b)
{
    if (w && b)
        for (ptrdiff_t i = 0; i < n; i++)
            y[i] = (BN_T)(((double)x[i] - mean) * invstd * w[i] + b[i]);
    else if (w)
        for (ptrdiff_t i = 0; i < n; i++) y[i] = (BN_T)(((double)x[i] - mean) * invstd * w[i]);
    else if (b)
        for (ptrdiff_t i = 0; i < n; i++) y[i] = (BN_T)(((double)x[i] - mean) * invstd + b[i]);
    else
        for (ptrdiff_t i = 0; i < n; i++) y[i] = (BN_T)(((double)x[i] - mean) * invstd);
}

/* IN: nseg segments of len values of dy and x (sdy and sx elements apart) and the
 * channel's mean. OUT (accumulated): sum(dy), sum(dy*(x-mean)). Four accumulator pairs
 * (with two, the adds were the critical path) carried across segments and reduced once: a
 * channel of short planes (7x7, 8x8) is one call, not one per plane. Lanes depend on the
 * shape only. T: the element type, LD4(p) four of its values as doubles, LD1(v) one;
 * PF(s): a statement run before segment s (the prefetch). The float and float16
 * (bn_seg_bwd_sums_h16) kernels share it: the same lanes and additions, the same bits. */
#define BN_BWD_SUMS(T, LD4, LD1, PF) do { \
        bn_v4d a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}; \
        bn_v4d b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0}; \
        const bn_v4d m = {mean, mean, mean, mean}; \
        double ta = 0, tb = 0; \
        for (ptrdiff_t s = 0; s < nseg; s++) { \
            const T *g = dy + s * sdy, *p = x + s * sx; \
            ptrdiff_t i = 0; \
            PF(s); \
            for (; i + 16 <= len; i += 16) { \
                bn_v4d g0 = LD4(g + i), g1 = LD4(g + i + 4); \
                bn_v4d g2 = LD4(g + i + 8), g3 = LD4(g + i + 12); \
                bn_v4d u0 = LD4(p + i) - m, u1 = LD4(p + i + 4) - m; \
                bn_v4d u2 = LD4(p + i + 8) - m, u3 = LD4(p + i + 12) - m; \
                a0 += g0; \
                a1 += g1; \
                a2 += g2; \
                a3 += g3; \
                b0 = BN_FMA4(g0, u0, b0); \
                b1 = BN_FMA4(g1, u1, b1); \
                b2 = BN_FMA4(g2, u2, b2); \
                b3 = BN_FMA4(g3, u3, b3); \
            } \
            for (; i + 4 <= len; i += 4) { \
                bn_v4d g0 = LD4(g + i), u0 = LD4(p + i) - m; \
                a0 += g0; \
                b0 = BN_FMA4(g0, u0, b0); \
            } \
            for (; i < len; i++) { \
                double v = LD1(g[i]); \
                ta += v; \
                tb = BN_FMA(v, LD1(p[i]) - mean, tb); \
            } \
        } \
        *sum_dy += bn_v4d_total((a0 + a1) + (a2 + a3)) + ta; \
        *sum_dy_xmu += bn_v4d_total((b0 + b1) + (b2 + b3)) + tb; \
    } while (0)
#define BN_LOAD1(v) ((double)(v))

BN_INLINE void BN_NAME(bn_seg_bwd_sums_body)(const BN_T *dy, const BN_T *x, ptrdiff_t nseg,
                                             ptrdiff_t len, ptrdiff_t sdy, ptrdiff_t sx,
                                             double mean, double *sum_dy,
                                             double *sum_dy_xmu, ptrdiff_t pd)
{
#define BN_PF(s) do { if (pd && (s) + pd < nseg) {   /* segment s + pd of both arrays */ \
            BN_NAME(bn_prefetch_seg)(g + pd * sdy, 1, len, 0); \
            BN_NAME(bn_prefetch_seg)(p + pd * sx, 1, len, 0); } } while (0)
    BN_BWD_SUMS(BN_T, BN_LOAD4, BN_LOAD1, BN_PF);
#undef BN_PF
}

static BN_CLONES void BN_NAME(bn_seg_bwd_sums)(const BN_T *dy, const BN_T *x, ptrdiff_t nseg,
                                              ptrdiff_t len, ptrdiff_t sdy, ptrdiff_t sx,
                                              double mean, double *sum_dy,
                                              double *sum_dy_xmu, ptrdiff_t pd)
{
    BN_NAME(bn_seg_bwd_sums_body)(dy, x, nseg, len, sdy, sx, mean, sum_dy, sum_dy_xmu, pd);
}

/* dx = k*dy + q*(x - mean) + r of four values (g, p: dy, x; LD4 as in BN_BWD_SUMS; kk, qq,
 * rr and m the coefficients and the mean on four lanes), and of one (LD1). */
#define BN_DX4(LD4, g, p) BN_FMA4(kk, LD4(g), BN_FMA4(qq, LD4(p) - m, rr))
#define BN_DX1(LD1, g, p) BN_FMA(k, LD1(g), BN_FMA(q, LD1(p) - mean, r))

/* dx = k*dy + q*(x - mean) + r over nseg segments of len values (batch-norm training
 * backward; each array with its own segment stride), optionally with streaming stores. */
BN_INLINE void BN_NAME(bn_seg_bwd_dx_body)(const BN_T *dy, const BN_T *x, BN_T *dx,
                                           ptrdiff_t nseg, ptrdiff_t len, ptrdiff_t sdy,
                                           ptrdiff_t sx, ptrdiff_t sdx, double mean, double k,
                                           double q, double r, int stream, const char *pg,
                                           const char *eg, const char *px, const char *ex)
{
    bn_v4d m = {mean, mean, mean, mean}, kk = {k, k, k, k}, qq = {q, q, q, q};
    bn_v4d rr = {r, r, r, r};
    unsigned pfc = 0;   /* vectors: a prefetch step of [pg, eg) and [px, ex) per 128 bytes of x */
#define BN_SCALAR(i) o[i] = (BN_T)BN_DX1(BN_LOAD1, g[i], p[i])
#define BN_DXV(i) BN_STORE4(o + (i), BN_DX4(BN_LOAD4, g + (i), p + (i)))
    if (BN_T_IS_FLOAT && !stream && pg == NULL && px == NULL) {
        /* float, nothing streamed or fetched: the plain loop. Short planes had paid the
         * span's set-up per plane: backward (128, 128, 4, 4) 1.36x, (512, 16, 3, 3)
         * 1.11-1.15x, (64, 128, 5, 5) 1.08-1.15x, within noise elsewhere (double ran
         * 0.8-1.0x at 4x4 planes, and keeps the span loop). The same bits. */
        for (ptrdiff_t s = 0; s < nseg; s++) {
            const BN_T *g = dy + s * sdy, *p = x + s * sx;
            BN_T *o = dx + s * sdx;
            ptrdiff_t i = 0;
            for (; i + 4 <= len; i += 4)
                BN_DXV(i);
            for (; i < len; i++)
                BN_SCALAR(i);
        }
        return;
    }
#undef BN_DXV
    for (ptrdiff_t s = 0; s < nseg; s++) {
        const BN_T *g = dy + s * sdy, *p = x + s * sx;
        BN_T *o = dx + s * sdx;
#define BN_VEC(i, nt) do { bn_v4d g_ = BN_LOAD4(g + (i)), u_ = BN_LOAD4(p + (i)) - m; \
        if ((++pfc & (128 / (4 * sizeof(BN_T)) - 1)) == 0) { \
            bn_prefetch_step_l2(&pg, eg); bn_prefetch_step_l2(&px, ex); } \
        u_ = BN_FMA4(qq, u_, rr); BN_PUT4(o + (i), BN_FMA4(kk, g_, u_), nt); } while (0)
        BN_SPAN_LOOP(o, len, stream, 4, BN_SCALAR, BN_VEC);
#undef BN_SCALAR
#undef BN_VEC
    }
}

/* Small channels (batch 1, 7x7 planes) cost more per call than per value: nch channels
 * (gsc, sc, dsc elements apart) in one call each, with the bodies above inlined. The
 * same bits as one call per channel. sums: sum_dy[c], sum_dy_xmu[c] are added to. dx:
 * coefficients k[c], q[c], r[c], in address order. The last channel first, each from its
 * last plane down (the last read), left each store to miss, as steps down do (the
 * prefetchers follow rising streams): address order ran batch-norm backward (64, 512, 7, 7)
 * 1.6x, (128, 1024, 7, 7) 1.09x, (16, 256, 14, 14) 1.04x (1.33x on one thread). */
static BN_CLONES void BN_NAME(bn_seg_bwd_sums_many)(const BN_T *dy, const BN_T *x, ptrdiff_t nch,
                                                   ptrdiff_t nseg, ptrdiff_t len,
                                                   ptrdiff_t sdy, ptrdiff_t sx, ptrdiff_t gsc,
                                                   ptrdiff_t sc, const double *mean,
                                                   double *sum_dy, double *sum_dy_xmu)
{
    for (ptrdiff_t c = 0; c < nch; c++)
        BN_NAME(bn_seg_bwd_sums_body)(dy + c * gsc, x + c * sc, nseg, len, sdy, sx, mean[c],
                                      &sum_dy[c], &sum_dy_xmu[c], 0);
}

static BN_CLONES void BN_NAME(bn_seg_bwd_dx_many)(const BN_T *dy, const BN_T *x, BN_T *dx,
                                                 ptrdiff_t nch, ptrdiff_t nseg, ptrdiff_t len,
                                                 ptrdiff_t sdy, ptrdiff_t sx, ptrdiff_t sdx,
                                                 ptrdiff_t gsc, ptrdiff_t sc, ptrdiff_t dsc,
                                                 const double *mean, const double *k,
                                                 const double *q, const double *r, int stream)
{
    for (ptrdiff_t c = 0; c < nch; c++)
        BN_NAME(bn_seg_bwd_dx_body)(dy + c * gsc, x + c * sc, dx + c * dsc, nseg, len, sdy, sx,
                                    sdx, mean[c], k[c], q[c], r[c], stream, NULL, NULL, NULL,
                                    NULL);
}

#if BN_T_IS_FLOAT
/* bn_seg_bwd_sums_many, the coefficients (batch norm's dx_coefficients: training or not)
 * and bn_seg_bwd_dx_many for nch small float channels (nseg * len <= BN_FUSED_MAX), one
 * channel at a time: its dy and x - mean, widened to double for the sums, stay in L1
 * buffers for its dx, which then converts nothing and subtracts nothing (a quarter of
 * the vector operations fewer; the in-cache backward is bound by them). The same bits as
 * the three steps: each value's lane and order in the sums, and dx's expression. The
 * stores of each quarter-step right after its conversions keep the sixteen registers
 * enough (holding them to the step's end spilled an accumulator: 1.04x). A C loop on one
 * thread, against the three steps in groups of 8 channels: 1.16-1.25x at 196 values a
 * channel, 1.14-1.15x at 49, 1.2x at 64, 1.65x at 16, 1.04-1.09x at 400-1024. The two
 * buffers 1032 doubles apart: 4 KiB apart, the loads of one waited on the stores of the
 * other (4K aliasing: 0.98-1.0x at 400 and 1024). sum_dy and sum_dy_xmu are added to;
 * k = w invstd, q = -k invstd^2 sum_dy_xmu inv_m, r = -k sum_dy inv_m (0 when not
 * training). No streaming stores: for channels in cache. */
#define BN_FUSED_MAX 1024
#define BN_FUSED_PARAMS (const float *dy, const float *x, float *dx, ptrdiff_t nch, \
        ptrdiff_t nseg, ptrdiff_t len, ptrdiff_t sdy, ptrdiff_t sx, ptrdiff_t sdx, ptrdiff_t gsc, \
        ptrdiff_t sc, ptrdiff_t dsc, const double *mean, const double *invstd, const double *w, \
        double inv_m, int training, double *sum_dy, double *sum_dy_xmu)
/* Channel c's dx coefficients from its sums (batch norm's dx_coefficients' arithmetic). */
#define BN_FUSED_COEFS(c) \
        const double k = (w ? w[c] : 1.0) * invstd[c]; \
        const double q = training ? -k * invstd[c] * invstd[c] * sum_dy_xmu[c] * inv_m : 0.0; \
        const double r = training ? -k * sum_dy[c] * inv_m : 0.0
/* The scalar steps that the clone and its AVX-512 twin share (the twin's bits are the
 * clone's): value i of a segment into the buffers and the sums ta, tb; dx of value i. */
#define BN_FUSED_SCALAR(i) do { double v_ = (double)g[i], u_ = (double)p[i] - mc; \
        gb[o + (i)] = v_; ub[o + (i)] = u_; ta += v_; tb = BN_FMA(v_, u_, tb); } while (0)
#define BN_FUSED_DXS(i) out[i] = (float)BN_FMA(k, gv[i], BN_FMA(q, uv[i], r))
#define BN_FUSED_STEP(a, b, off) do { bn_v4d g_ = BN_LOAD4(g + i + (off)), \
        u_ = BN_LOAD4(p + i + (off)) - m; memcpy(gb + o + i + (off), &g_, 32); \
        memcpy(ub + o + i + (off), &u_, 32); a += g_; b = BN_FMA4(g_, u_, b); } while (0)
#if BN_HAVE_V4
/* bn_seg_bwd_fused_f32 on eight lanes (see BN_HAVE_V4), for channels of 32 values and
 * more: every value is widened to double for the sums and narrowed back for dx, and those
 * conversions bound it in cache. The same bits: the sums' four four-lane accumulator
 * pairs are two eight-lane ones (a0|a1, a2|a3), the four-value steps add into lanes 0-3
 * alone (masked), the scalar tail is the clone's; dx is elementwise, the same expression.
 * A C loop on one thread over 128 KiB of dy and x, against the AVX2 clone: 1.06x at 32
 * values a channel, 1.0x at 49, 1.1x at 64, 1.07x at 196, 1.1x at 256 and 400, 1.15-1.2x at
 * 784 and 1024; 0.95x at 16 (the clone keeps those). The batch-norm backward in process,
 * two threads, two runs: (8, 512, 7, 7) 1.10-1.11x, (2, 256, 16, 16) 1.10-1.12x, (1, 256,
 * 32, 32) 1.08-1.14x, (1, 512, 14, 14) 1.06-1.09x, (16, 256, 7, 7) 1.02-1.09x, (32, 32, 5,
 * 5) 1.02-1.08x, (1, 1024, 7, 7) 0.99-1.01x. The AVX2 sums and dx of longer channels
 * (bn_seg_bwd_sums, bn_seg_bwd_dx) ran no faster on eight lanes (0.96-1.05x; float64
 * 0.79-1.01x), and keep one path. */
#define BN_ZL(p) _mm512_cvtps_pd(_mm256_loadu_ps(p))
#define BN_FUSED_STEP8(a, b, off) do { __m512d g_ = BN_ZL(g + i + (off)), \
        u_ = _mm512_sub_pd(BN_ZL(p + i + (off)), zm); \
        _mm512_storeu_pd(gb + o + i + (off), g_); _mm512_storeu_pd(ub + o + i + (off), u_); \
        a = _mm512_add_pd(a, g_); b = _mm512_fmadd_pd(g_, u_, b); } while (0)
static BN_V4 void bn_seg_bwd_fused_v4_f32 BN_FUSED_PARAMS
{
    double buf[2 * BN_FUSED_MAX + 8] __attribute__((aligned(64)));
    double *gb = buf, *ub = buf + BN_FUSED_MAX + 8;
    for (ptrdiff_t c = 0; c < nch; c++) {
        __m512d a01 = _mm512_setzero_pd(), a23 = _mm512_setzero_pd();
        __m512d b01 = _mm512_setzero_pd(), b23 = _mm512_setzero_pd();
        const double mc = mean[c];
        const __m512d zm = _mm512_set1_pd(mc);
        const __m256d ym = _mm256_set1_pd(mc);
        double ta = 0, tb = 0;
        for (ptrdiff_t sg = 0; sg < nseg; sg++) {
            const float *g = dy + c * gsc + sg * sdy, *p = x + c * sc + sg * sx;
            const ptrdiff_t o = sg * len;
            ptrdiff_t i = 0;
            for (; i + 16 <= len; i += 16) {
                BN_FUSED_STEP8(a01, b01, 0);
                BN_FUSED_STEP8(a23, b23, 8);
            }
            for (; i + 4 <= len; i += 4) {   /* a0, b0: lanes 0-3 */
                __m256d g4 = _mm256_cvtps_pd(_mm_loadu_ps(g + i));
                __m256d u4 = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(p + i)), ym);
                _mm256_storeu_pd(gb + o + i, g4);
                _mm256_storeu_pd(ub + o + i, u4);
                __m512d g0 = _mm512_castpd256_pd512(g4), u0 = _mm512_castpd256_pd512(u4);
                a01 = _mm512_mask_add_pd(a01, 0x0F, a01, g0);
                b01 = _mm512_mask3_fmadd_pd(g0, u0, b01, 0x0F);
            }
            for (; i < len; i++)
                BN_FUSED_SCALAR(i);
        }
        sum_dy[c] += bn_v8d_pair_total(a01, a23) + ta;
        sum_dy_xmu[c] += bn_v8d_pair_total(b01, b23) + tb;
        BN_FUSED_COEFS(c);
        const __m512d kk = _mm512_set1_pd(k), qq = _mm512_set1_pd(q), rr = _mm512_set1_pd(r);
        const __m256d k4 = _mm256_set1_pd(k), q4 = _mm256_set1_pd(q), r4 = _mm256_set1_pd(r);
        for (ptrdiff_t sg = 0; sg < nseg; sg++) {
            float *out = dx + c * dsc + sg * sdx;
            const double *gv = gb + sg * len, *uv = ub + sg * len;
            ptrdiff_t j = 0;
            for (; j + 8 <= len; j += 8) {
                __m512d u_ = _mm512_fmadd_pd(qq, _mm512_loadu_pd(uv + j), rr);
                __m512d o_ = _mm512_fmadd_pd(kk, _mm512_loadu_pd(gv + j), u_);
                _mm256_storeu_ps(out + j, _mm512_cvtpd_ps(o_));
            }
            for (; j + 4 <= len; j += 4) {
                __m256d u_ = _mm256_fmadd_pd(q4, _mm256_loadu_pd(uv + j), r4);
                __m256d o_ = _mm256_fmadd_pd(k4, _mm256_loadu_pd(gv + j), u_);
                _mm_storeu_ps(out + j, _mm256_cvtpd_ps(o_));
            }
            for (; j < len; j++)
                BN_FUSED_DXS(j);
        }
    }
}
#undef BN_FUSED_STEP8
#undef BN_ZL
#endif

static BN_CLONES void bn_seg_bwd_fused_f32 BN_FUSED_PARAMS
{
#if BN_HAVE_V4
    if (bn_use_v4 && nseg * len >= 32) {
        bn_seg_bwd_fused_v4_f32(dy, x, dx, nch, nseg, len, sdy, sx, sdx, gsc, sc, dsc, mean,
                                invstd, w, inv_m, training, sum_dy, sum_dy_xmu);
        return;
    }
#endif
    double buf[2 * BN_FUSED_MAX + 8] __attribute__((aligned(64)));
    double *gb = buf, *ub = buf + BN_FUSED_MAX + 8;
    for (ptrdiff_t c = 0; c < nch; c++) {
        bn_v4d a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
        const double mc = mean[c];
        const bn_v4d m = {mc, mc, mc, mc};
        double ta = 0, tb = 0;
        for (ptrdiff_t sg = 0; sg < nseg; sg++) {   /* bn_seg_bwd_sums_body's lanes */
            const float *g = dy + c * gsc + sg * sdy, *p = x + c * sc + sg * sx;
            const ptrdiff_t o = sg * len;
            ptrdiff_t i = 0;
            for (; i + 16 <= len; i += 16) {
                BN_FUSED_STEP(a0, b0, 0);
                BN_FUSED_STEP(a1, b1, 4);
                BN_FUSED_STEP(a2, b2, 8);
                BN_FUSED_STEP(a3, b3, 12);
            }
            for (; i + 4 <= len; i += 4)
                BN_FUSED_STEP(a0, b0, 0);
            for (; i < len; i++)
                BN_FUSED_SCALAR(i);
        }
        sum_dy[c] += bn_v4d_total((a0 + a1) + (a2 + a3)) + ta;
        sum_dy_xmu[c] += bn_v4d_total((b0 + b1) + (b2 + b3)) + tb;
        BN_FUSED_COEFS(c);
        const bn_v4d kk = {k, k, k, k}, qq = {q, q, q, q}, rr = {r, r, r, r};
        for (ptrdiff_t sg = 0; sg < nseg; sg++) {
            float *out = dx + c * dsc + sg * sdx;
            const double *gv = gb + sg * len, *uv = ub + sg * len;
            ptrdiff_t i = 0;
            for (; i + 4 <= len; i += 4) {
                bn_v4d g_, u_;
                memcpy(&g_, gv + i, 32);
                memcpy(&u_, uv + i, 32);
                u_ = BN_FMA4(qq, u_, rr);
                BN_STORE4(out + i, BN_FMA4(kk, g_, u_));
            }
            for (; i < len; i++)
                BN_FUSED_DXS(i);
        }
    }
}
#undef BN_FUSED_STEP
#undef BN_FUSED_PARAMS
#undef BN_FUSED_COEFS
#undef BN_FUSED_SCALAR
#undef BN_FUSED_DXS
#endif

/* Group norm backward of NCHW (sample, group) blocks t0 .. t0 + nblk - 1 (block t: the
 * cg * s contiguous values of group t % g, its mean[t] and invstd[t]; w per channel or
 * NULL): each channel's sum(dy) and sum(dy * (x - mean)) into sdy/sdyx[t * cg + j], the
 * group's coefficients (group_qr's arithmetic), then dx = k*dy + q*(x - mean) + r channel
 * by channel in address order (the last first ran (128, 64, 14, 14) G=8 at 1/1.19 the
 * speed, 1/1.85 on one thread: see bn_seg_bwd_dx_many). One call for many small blocks
 * (see bn_group_blocks), with the bodies of bn_seg_bwd_sums and bn_seg_bwd_dx inlined:
 * the bits of group_block_bwd. Streamed stores: the caller fences. */
static BN_CLONES void BN_NAME(bn_group_blocks_bwd)(const BN_T *dy, const BN_T *x, BN_T *dx,
                                                  ptrdiff_t t0, ptrdiff_t nblk, ptrdiff_t g,
                                                  ptrdiff_t cg, ptrdiff_t s,
                                                  const double *mean, const double *invstd,
                                                  const double *w, double *sdy, double *sdyx,
                                                  int stream)
{
    const ptrdiff_t len = cg * s;
    const double n = (double)len;
    /* runs of blocks phase by phase (as bn_group_blocks): the channel sums of every block,
     * then the runs' group sums channel by channel, a chain per block (one block's two
     * chains of cg dependent adds waited on each other's latency), then each dx; runs of
     * about 1024 values, so that the sums the chains read across blocks stay in L1 */
    const ptrdiff_t run = len >= 1024 / BN_GROUP_RUN ? (1024 + len - 1) / len : BN_GROUP_RUN;
    double ta[BN_GROUP_RUN], tb[BN_GROUP_RUN];
    ptrdiff_t gi0 = t0 % g;   /* the group of the run's first block, kept without a division */
    for (ptrdiff_t r0 = t0; r0 < t0 + nblk; r0 += run) {
        const ptrdiff_t nr = t0 + nblk - r0 < run ? t0 + nblk - r0 : run;
        for (ptrdiff_t t = r0; t < r0 + nr; t++) {
            const ptrdiff_t off = t * len;
            double *a = sdy + t * cg, *bs = sdyx + t * cg;
            const double m = mean[t];
            if (s == 1) {
                /* one value a channel: what the body leaves for it, 0 + dy and
                 * 0 + fma(dy, x - mean, 0) (the 0 + turns a -0 into +0), four at a time */
                const BN_T *g_ = dy + off, *p = x + off;
                const bn_v4d z = {0, 0, 0, 0}, vm = {m, m, m, m};
                ptrdiff_t j = 0;
                for (; j + 4 <= cg; j += 4) {
                    bn_v4d v_ = BN_LOAD4(g_ + j), u_ = BN_LOAD4(p + j) - vm, e_;
                    e_ = BN_FMA4(v_, u_, z);
                    v_ = z + v_;
                    e_ = z + e_;
                    memcpy(a + j, &v_, 32);
                    memcpy(bs + j, &e_, 32);
                }
                for (; j < cg; j++) {
                    a[j] = 0.0 + (double)g_[j];
                    bs[j] = 0.0 + BN_FMA((double)g_[j], (double)p[j] - m, 0.0);
                }
            } else {
                for (ptrdiff_t j = 0; j < cg; j++) {
                    a[j] = 0;
                    bs[j] = 0;
                    BN_NAME(bn_seg_bwd_sums_body)(dy + off + j * s, x + off + j * s, 1, s, 0,
                                                  0, m, &a[j], &bs[j], 0);
                }
            }
        }
        /* group_qr's sums, in channel order: a chain per block, four blocks at a time
         * (eight chains in flight; one block's two waited on the adds' latency) */
        const double *wr[BN_GROUP_RUN];   /* each block's weights (its group's), or NULL */
        for (ptrdiff_t i = 0, gi = gi0; i < nr; i++, gi = gi + 1 == g ? 0 : gi + 1)
            wr[i] = w ? w + gi * cg : NULL;
        ptrdiff_t i = 0;
        for (; i + 4 <= nr; i += 4) {
            const double *a0 = sdy + (r0 + i) * cg, *b0 = sdyx + (r0 + i) * cg;
            double s0 = 0, s1 = 0, s2 = 0, s3 = 0, e0 = 0, e1 = 0, e2 = 0, e3 = 0;
            for (ptrdiff_t j = 0; j < cg; j++) {
                const double w0 = wr[i] ? wr[i][j] : 1.0, w1 = wr[i + 1] ? wr[i + 1][j] : 1.0;
                const double w2 = wr[i + 2] ? wr[i + 2][j] : 1.0;
                const double w3 = wr[i + 3] ? wr[i + 3][j] : 1.0;
                s0 += w0 * a0[j];
                e0 += w0 * b0[j];
                s1 += w1 * a0[cg + j];
                e1 += w1 * b0[cg + j];
                s2 += w2 * a0[2 * cg + j];
                e2 += w2 * b0[2 * cg + j];
                s3 += w3 * a0[3 * cg + j];
                e3 += w3 * b0[3 * cg + j];
            }
            ta[i] = s0, ta[i + 1] = s1, ta[i + 2] = s2, ta[i + 3] = s3;
            tb[i] = e0, tb[i + 1] = e1, tb[i + 2] = e2, tb[i + 3] = e3;
        }
        for (; i < nr; i++) {
            const double *a0 = sdy + (r0 + i) * cg, *b0 = sdyx + (r0 + i) * cg;
            double s0 = 0, e0 = 0;
            for (ptrdiff_t j = 0; j < cg; j++) {
                const double w0 = wr[i] ? wr[i][j] : 1.0;
                s0 += w0 * a0[j];
                e0 += w0 * b0[j];
            }
            ta[i] = s0;
            tb[i] = e0;
        }
        for (ptrdiff_t t = r0; t < r0 + nr; t++, gi0 = gi0 + 1 == g ? 0 : gi0 + 1) {
            const ptrdiff_t off = t * len, c0 = gi0 * cg;
            const double m = mean[t], inv = invstd[t];
            const double q = -inv * inv * inv * tb[t - r0] / n, r = -inv * ta[t - r0] / n;
            if (s == 1) {   /* bn_seg_bwd_dx's arithmetic, a channel per lane */
                const BN_T *g_ = dy + off, *p = x + off;
                BN_T *o = dx + off;
                const bn_v4d vm = {m, m, m, m}, vi = {inv, inv, inv, inv};
                const bn_v4d qq = {q, q, q, q}, rr = {r, r, r, r};
                const double *wc = w ? w + c0 : NULL;
#define BN_SCALAR(i) o[i] = (BN_T)BN_FMA((wc ? wc[i] : 1.0) * inv, (double)g_[i], \
                                         BN_FMA(q, (double)p[i] - m, r))
#define BN_VEC(i, nt) do { bn_v4d d_ = BN_LOAD4(g_ + (i)), u_ = BN_LOAD4(p + (i)) - vm, k_; \
        if (wc) { memcpy(&k_, wc + (i), 32); k_ = k_ * vi; } else k_ = vi; \
        u_ = BN_FMA4(qq, u_, rr); BN_PUT4(o + (i), BN_FMA4(k_, d_, u_), nt); } while (0)
                BN_SPAN_LOOP(o, cg, stream, 4, BN_SCALAR, BN_VEC);
#undef BN_SCALAR
#undef BN_VEC
            } else {
                for (ptrdiff_t j = 0; j < cg; j++)
                    BN_NAME(bn_seg_bwd_dx_body)(dy + off + j * s, x + off + j * s,
                                                dx + off + j * s, 1, s, 0, 0, 0, m,
                                                (w ? w[c0 + j] : 1.0) * inv, q, r, stream,
                                                NULL, NULL, NULL, NULL);
            }
        }
    }
}

static BN_CLONES void BN_NAME(bn_bwd_dx)(const BN_T *dy, const BN_T *x, BN_T *dx, ptrdiff_t n,
                                        double mean, double k, double q, double r)
{
    BN_NAME(bn_seg_bwd_dx_body)(dy, x, dx, 1, n, 0, 0, 0, mean, k, q, r, 0, NULL, NULL, NULL,
                                NULL);
}

static BN_CLONES void BN_NAME(bn_seg_bwd_dx)(const BN_T *dy, const BN_T *x, BN_T *dx,
                                            ptrdiff_t nseg, ptrdiff_t len, ptrdiff_t sdy,
                                            ptrdiff_t sx, ptrdiff_t sdx, double mean, double k,
                                            double q, double r, int stream)
{
    BN_NAME(bn_seg_bwd_dx_body)(dy, x, dx, nseg, len, sdy, sx, sdx, mean, k, q, r, stream,
                                NULL, NULL, NULL, NULL);
}

/* bn_seg_bwd_dx of one segment that also prefetches [pg, pg + npf) and [px, px + npf)
 * (the next channel's dy and x), 128 bytes of each per 128 bytes of x: reading the next
 * channel overlaps writing this one (see bn_seg_affine_pf). */
static BN_CLONES void BN_NAME(bn_seg_bwd_dx_pf)(const BN_T *dy, const BN_T *x, BN_T *dx,
                                               ptrdiff_t len, double mean, double k, double q,
                                               double r, int stream, const BN_T *pg,
                                               const BN_T *px, ptrdiff_t npf)
{
    BN_NAME(bn_seg_bwd_dx_body)(dy, x, dx, 1, len, 0, 0, 0, mean, k, q, r, stream,
                                (const char *)pg, (const char *)(pg + npf), (const char *)px,
                                (const char *)(px + npf));
}

#if BN_T_IS_FLOAT
/* float16 twins of bn_seg_bwd_sums and bn_seg_bwd_dx (where bn_half_fused: CPUs with
 * AVX2, FMA and F16C; the float arithmetic of their x86-64-v3 clones): each value widened
 * as it is loaded (exact), each dx rounded to float, then to float16, as the float kernels
 * on widened copies followed by a rounding pass give, without the float32 copies (the
 * float16 batch-norm backward (32, 64, 56, 56) on two threads: 3.4 -> 2.5 ms, and
 * 1.9 with the AVX-512 twins below). Both passes are bound by the conversions to and
 * from double (F16C's, then the float kernels'): PyTorch's float16 backward, which
 * accumulates in float, takes 1.3-1.7 ms. */
#if BN_HAVE_F16C
#define BN_H16 __attribute__((target("arch=x86-64-v3")))
/* (intrinsics: __builtin_convertvector split each widening in halves, through the stack) */
#define BN_LOAD4H(p) ((bn_v4d)_mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(p)))))
#define BN_LOAD1H(v) ((double)_cvtsh_ss(v))
#define BN_ROUND1H(v) ((uint16_t)_cvtss_sh((float)(v), _MM_FROUND_TO_NEAREST_INT))
/* eight doubles (d0, d1) rounded to float, then float16, stored at q */
/* four doubles rounded to float, then float16, stored at q */
#define BN_STORE4H(q, d) _mm_storel_epi64((__m128i *)(q), \
        _mm_cvtps_ph(_mm256_cvtpd_ps((__m256d)(d)), _MM_FROUND_TO_NEAREST_INT))
#define BN_STORE8H(q, d0, d1) _mm_storeu_si128((__m128i *)(q), _mm256_cvtps_ph(_mm256_set_m128( \
        _mm256_cvtpd_ps((__m256d)(d1)), _mm256_cvtpd_ps((__m256d)(d0))), \
        _MM_FROUND_TO_NEAREST_INT))
/* ... with a streaming store (q 16-byte aligned) */
#define BN_STREAM8H(q, d0, d1) _mm_stream_si128((__m128i *)(q), _mm256_cvtps_ph(_mm256_set_m128( \
        _mm256_cvtpd_ps((__m256d)(d1)), _mm256_cvtpd_ps((__m256d)(d0))), \
        _MM_FROUND_TO_NEAREST_INT))
#else
#define BN_H16
#define BN_LOAD1H(v) ((double)bn_half_to_float1(v))
#define BN_LOAD4H(p) ((bn_v4d){BN_LOAD1H((p)[0]), BN_LOAD1H((p)[1]), BN_LOAD1H((p)[2]), \
        BN_LOAD1H((p)[3])})
#define BN_ROUND1H(v) bn_float_to_half1((float)(v))
#define BN_STORE4H(q, d) do { bn_v4d e_ = (d); \
        for (int j_ = 0; j_ < 4; j_++) (q)[j_] = BN_ROUND1H(e_[j_]); } while (0)
#define BN_STORE8H(q, d0, d1) do { bn_v4d e0_ = (d0), e1_ = (d1); \
        for (int j_ = 0; j_ < 4; j_++) { (q)[j_] = BN_ROUND1H(e0_[j_]); \
            (q)[4 + j_] = BN_ROUND1H(e1_[j_]); } } while (0)
#define BN_STREAM8H BN_STORE8H
#endif
#define BN_NO_PF(s) do { } while (0)

#if BN_HAVE_V4 && BN_HAVE_F16C
/* AVX-512 twins of the two below (bn_use_v4), for these kernels are bound by their
 * conversions (F16C's to float, then to double), which go 16 values an instruction here.
 * Each eight-lane accumulator is two of the four-lane kernel's side by side (a0|a1,
 * a2|a3): the same lanes, the same additions in the same order; the four-value tail adds
 * into a0 alone (a masked add), so the bits are the same. */
#define BN_LOAD16H(p, lo, hi) do { __m512 f_ = _mm512_cvtph_ps( \
        _mm256_loadu_si256((const __m256i *)(p))); \
        (lo) = _mm512_cvtps_pd(_mm512_castps512_ps256(f_)); \
        (hi) = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f_), 1))); \
    } while (0)

static BN_V4 void bn_seg_bwd_sums_h16_v4(const uint16_t *dy, const uint16_t *x, ptrdiff_t nseg,
                                         ptrdiff_t len, ptrdiff_t sdy, ptrdiff_t sx,
                                         double mean, double *sum_dy, double *sum_dy_xmu)
{
    __m512d a01 = _mm512_setzero_pd(), a23 = a01, b01 = a01, b23 = a01;
    const __m512d m8 = _mm512_set1_pd(mean);
    const bn_v4d m = {mean, mean, mean, mean};
    double ta = 0, tb = 0;
    for (ptrdiff_t s = 0; s < nseg; s++) {
        const uint16_t *g = dy + s * sdy, *p = x + s * sx;
        ptrdiff_t i = 0;
        for (; i + 16 <= len; i += 16) {
            __m512d g0, g1, u0, u1;
            BN_LOAD16H(g + i, g0, g1);
            BN_LOAD16H(p + i, u0, u1);
            u0 = _mm512_sub_pd(u0, m8);
            u1 = _mm512_sub_pd(u1, m8);
            a01 = _mm512_add_pd(a01, g0);
            a23 = _mm512_add_pd(a23, g1);
            b01 = _mm512_fmadd_pd(g0, u0, b01);
            b23 = _mm512_fmadd_pd(g1, u1, b23);
        }
        for (; i + 4 <= len; i += 4) {   /* into a0, b0: lanes 0-3 */
            bn_v4d g0 = BN_LOAD4H(g + i), u0 = BN_LOAD4H(p + i) - m;
            __m512d g8 = _mm512_castpd256_pd512((__m256d)g0);
            a01 = _mm512_mask_add_pd(a01, 0x0f, a01, g8);
            b01 = _mm512_mask3_fmadd_pd(g8, _mm512_castpd256_pd512((__m256d)u0), b01, 0x0f);
        }
        for (; i < len; i++) {
            double v = BN_LOAD1H(g[i]);
            ta += v;
            tb = BN_FMA(v, BN_LOAD1H(p[i]) - mean, tb);
        }
    }
    bn_v4d a0 = (bn_v4d)_mm512_castpd512_pd256(a01), a1 = (bn_v4d)_mm512_extractf64x4_pd(a01, 1);
    bn_v4d a2 = (bn_v4d)_mm512_castpd512_pd256(a23), a3 = (bn_v4d)_mm512_extractf64x4_pd(a23, 1);
    bn_v4d b0 = (bn_v4d)_mm512_castpd512_pd256(b01), b1 = (bn_v4d)_mm512_extractf64x4_pd(b01, 1);
    bn_v4d b2 = (bn_v4d)_mm512_castpd512_pd256(b23), b3 = (bn_v4d)_mm512_extractf64x4_pd(b23, 1);
    *sum_dy += bn_v4d_total((a0 + a1) + (a2 + a3)) + ta;
    *sum_dy_xmu += bn_v4d_total((b0 + b1) + (b2 + b3)) + tb;
}

/* bn_seg_bwd_dx_h16's 16-value steps (elementwise: the same bits); returns where they
 * stopped */
static BN_V4 ptrdiff_t bn_seg_bwd_dx16_h16_v4(const uint16_t *g, const uint16_t *p, uint16_t *o,
                                              ptrdiff_t len, double mean, double k, double q,
                                              double r, int nt, bn_pf2 *fg, bn_pf2 *fx)
{
    const __m512d m8 = _mm512_set1_pd(mean), k8 = _mm512_set1_pd(k), q8 = _mm512_set1_pd(q);
    const __m512d r8 = _mm512_set1_pd(r);
    ptrdiff_t i = 0;
    for (; i + 16 <= len; i += 16) {
        __m512d g0, g1, u0, u1;
        if ((i & 63) == 0) {   /* a step of each per 128 bytes of x */
            bn_pf2_step_l2(fg);
            bn_pf2_step_l2(fx);
        }
        BN_LOAD16H(g + i, g0, g1);
        BN_LOAD16H(p + i, u0, u1);
        u0 = _mm512_fmadd_pd(q8, _mm512_sub_pd(u0, m8), r8);
        u1 = _mm512_fmadd_pd(q8, _mm512_sub_pd(u1, m8), r8);
        __m256 f0 = _mm512_cvtpd_ps(_mm512_fmadd_pd(k8, g0, u0));
        __m256 f1 = _mm512_cvtpd_ps(_mm512_fmadd_pd(k8, g1, u1));
        __m512 f = _mm512_insertf32x8(_mm512_castps256_ps512(f0), f1, 1);
        __m256i h = _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT);
        if (nt)   /* (a branch the predictor always gets right) */
            _mm256_stream_si256((__m256i *)(o + i), h);
        else
            _mm256_storeu_si256((__m256i *)(o + i), h);
    }
    return i;
}
#undef BN_LOAD16H
#endif

static BN_H16 void bn_seg_bwd_sums_h16(const uint16_t *dy, const uint16_t *x, ptrdiff_t nseg,
                                       ptrdiff_t len, ptrdiff_t sdy, ptrdiff_t sx,
                                       double mean, double *sum_dy, double *sum_dy_xmu)
{
#if BN_HAVE_V4 && BN_HAVE_F16C
    if (bn_use_v4) {
        bn_seg_bwd_sums_h16_v4(dy, x, nseg, len, sdy, sx, mean, sum_dy, sum_dy_xmu);
        return;
    }
#endif
    BN_BWD_SUMS(uint16_t, BN_LOAD4H, BN_LOAD1H, BN_NO_PF);
}

/* dx of the run [i, n) of a plane (g, p, o at its start); nt: o + i is 64-byte aligned and
 * n - i a multiple of 32, stored with streaming stores (bn_stream_span) */
static BN_H16 void bn_seg_bwd_dx_run_h16(const uint16_t *g, const uint16_t *p, uint16_t *o,
                                         ptrdiff_t i, ptrdiff_t n, double mean, double k,
                                         double q, double r, int nt, bn_pf2 *fg, bn_pf2 *fx)
{
    const bn_v4d m = {mean, mean, mean, mean}, kk = {k, k, k, k}, qq = {q, q, q, q};
    const bn_v4d rr = {r, r, r, r};
#if BN_HAVE_V4 && BN_HAVE_F16C
    if (bn_use_v4)
        i += bn_seg_bwd_dx16_h16_v4(g + i, p + i, o + i, n - i, mean, k, q, r, nt, fg, fx);
#endif
    for (; i + 8 <= n; i += 8) {
        if ((i & 63) == 0) {   /* a step of each per 128 bytes of x */
            bn_pf2_step_l2(fg);
            bn_pf2_step_l2(fx);
        }
        if (nt)
            BN_STREAM8H(o + i, BN_DX4(BN_LOAD4H, g + i, p + i),
                        BN_DX4(BN_LOAD4H, g + i + 4, p + i + 4));
        else
            BN_STORE8H(o + i, BN_DX4(BN_LOAD4H, g + i, p + i),
                       BN_DX4(BN_LOAD4H, g + i + 4, p + i + 4));
    }
    for (; i < n; i++)
        o[i] = BN_ROUND1H(BN_DX1(BN_LOAD1H, g[i], p[i]));
}

/* ... with streaming stores of the lines each plane of dx covers entirely when stream (the
 * caller fences), prefetching (into L2) the planes of the next channel's dy and x
 * meanwhile: nseg planes of len values at pg and px (gso and so apart) when pg is not
 * NULL, as much of them per plane of dx as a plane of x, so that reading the next channel
 * overlaps writing this one (bn_seg_bwd_dx_pf) */
static BN_H16 void bn_seg_bwd_dx_h16(const uint16_t *dy, const uint16_t *x, uint16_t *dx,
                                     ptrdiff_t nseg, ptrdiff_t len, ptrdiff_t sdy,
                                     ptrdiff_t sx, ptrdiff_t sdx, double mean, double k,
                                     double q, double r, int stream, const uint16_t *pg,
                                     const uint16_t *px, ptrdiff_t gso, ptrdiff_t so)
{
    ptrdiff_t nf = pg != NULL ? nseg : 0, wb = len * (ptrdiff_t)sizeof(uint16_t), lo, hi;
    bn_pf2 fg = {(const char *)pg, 0, wb, gso * (ptrdiff_t)sizeof(uint16_t), nf};
    bn_pf2 fx = {(const char *)px, 0, wb, so * (ptrdiff_t)sizeof(uint16_t), nf};
    for (ptrdiff_t s = 0; s < nseg; s++) {
        const uint16_t *g = dy + s * sdy, *p = x + s * sx;
        uint16_t *o = dx + s * sdx;
        bn_stream_span(o, len, sizeof(uint16_t), stream, &lo, &hi);
        bn_seg_bwd_dx_run_h16(g, p, o, 0, lo, mean, k, q, r, 0, &fg, &fx);
        bn_seg_bwd_dx_run_h16(g, p, o, lo, hi, mean, k, q, r, 1, &fg, &fx);
        bn_seg_bwd_dx_run_h16(g, p, o, hi, len, mean, k, q, r, 0, &fg, &fx);
    }
}
#endif


/* ------------------------------------------------------------- rows of channels (cl) */

/* Channels-last loops run over tiles of 16 channels held in four vector registers across
 * the rows of a block (no per-row load/store of accumulators); leftover channels are
 * handled one by one with the same arithmetic. */

#if BN_T_IS_FLOAT
/* Channels-last block moments for float input, in one pass over memory.
 * The double kernel below (two passes, every value converted twice, column tiles) ran at
 * ~1 cycle per value hot and 3.5 cold: the FP add ports and a column walk the hardware
 * prefetcher cannot follow. Here each value is read and converted once:
 * - shift: the caller passes K[c], a float near the channel's mean: the pivot for a
 *   chunk's first block, then the chunk's running mean. u = x - K is exact in double, and
 *   sum(u), sum(u*u) in double give mean = K + sum(u)/n, M2 = sum(u*u) - sum(u)^2/n.
 * - accuracy: the cancellation costs eps * n * (mean - K)^2, and the channel's M2 holds at
 *   least ~(mean - K)^2: K is a value of the channel (the pivot) or the mean of n' >= n of
 *   its values, and merging those with this block adds n*n'/(n+n') * (mean - K)^2. So the
 *   relative error stays near n * eps (1e-14). Rounding K to float adds at most half the
 *   float spacing at the mean, the resolution of the data itself. A constant channel has
 *   K == its value in every block: u == 0, mean == value and M2 == 0 exactly. inf and nan
 *   propagate through sum(u) as in numpy (a finite K keeps an inf mean inf). u and u*u
 *   cannot overflow in double.
 * - memory: 32-channel tiles walk the block's rows from L1/L2 while the next block
 *   (`next_rows` rows of `nnext` bytes from `next`, `next_ld` bytes apart; or NULL) is
 *   prefetched row after row, two lines per row step, so reading memory overlaps the
 *   arithmetic. */

/* sum(u) and sum(u*u), u = x - K, for nv vectors of 4 channels (nv = 8 or 1, constant at
 * each call), prefetching two lines of the region pf per row. */
BN_INLINE void bn_cl_sums_f32(const float *x, ptrdiff_t nrows, ptrdiff_t ld, int nv,
                              const double *restrict K, double *restrict sd,
                              double *restrict sdd, bn_pf2 *pf)
{
    bn_v4d d[8] = {{0}}, q[8] = {{0}}, m[8];
    memcpy(m, K, (size_t)nv * sizeof(bn_v4d));
    for (ptrdiff_t r = 0; r < nrows; r++) {
        bn_pf2_step(pf);
#pragma GCC unroll 8
        for (int j = 0; j < nv; j++) {   /* unrolled: the accumulators stay in registers */
            bn_v4d u = BN_LOAD4(x + r * ld + 4 * j) - m[j], qj = q[j];
            d[j] += u;
            q[j] = BN_FMA4(u, u, qj);
        }
    }
    memcpy(sd, d, (size_t)nv * sizeof(bn_v4d));
    memcpy(sdd, q, (size_t)nv * sizeof(bn_v4d));
}

/* Moments of channels [0, w) of the block (w = 32, 4 or 1) into mean (relative to pivot)
 * and m2. */
BN_INLINE void bn_cl_tile_f32(const float *x, ptrdiff_t nrows, ptrdiff_t ld, int w,
                              const double *restrict K, const double *restrict pivot,
                              double *restrict mean, double *restrict m2, bn_pf2 *pf)
{
    double sd[32] __attribute__((aligned(32))), sdd[32] __attribute__((aligned(32)));
    double n = (double)nrows;
    if (w == 1) {
        double a = 0, b = 0;
        for (ptrdiff_t r = 0; r < nrows; r++) {
            double u = (double)x[r * ld] - K[0];
            a += u;
            b = BN_FMA(u, u, b);
        }
        sd[0] = a;
        sdd[0] = b;
    } else {
        bn_cl_sums_f32(x, nrows, ld, w / 4, K, sd, sdd, pf);
    }
    for (int i = 0; i < w; i++)
        bn_finish_block(n, K[i] - pivot[i], sd[i], sdd[i], &mean[i], &m2[i]);
}

/* IN: nrows rows of nch channels, ld apart; K[nch] float shifts (see above); pivot[nch];
 * next: the next block to prefetch (nnext bytes) or NULL. OUT: per-channel mean[c] of
 * (x - pivot[c]) and m2[c] of the block. */
static BN_CLONES void bn_cl_moments_shift_f32(const float *x, ptrdiff_t nrows, ptrdiff_t nch,
                                             ptrdiff_t ld, const double *restrict K,
                                             const double *restrict pivot,
                                             const float *next, ptrdiff_t nnext,
                                             ptrdiff_t next_rows, ptrdiff_t next_ld,
                                             double *restrict mean, double *restrict m2)
{
    bn_pf2 pf = {(const char *)next, 0, nnext, next_ld, next && nnext > 0 ? next_rows : 0};
    ptrdiff_t c = 0;
    for (; c + 32 <= nch; c += 32)
        bn_cl_tile_f32(x + c, nrows, ld, 32, K + c, pivot + c, mean + c, m2 + c, &pf);
    for (; c + 4 <= nch; c += 4)
        bn_cl_tile_f32(x + c, nrows, ld, 4, K + c, pivot + c, mean + c, m2 + c, &pf);
    for (; c < nch; c++)
        bn_cl_tile_f32(x + c, nrows, ld, 1, K + c, pivot + c, mean + c, m2 + c, &pf);
}
#else
/* Moments of the 16 channels at x (nrows rows, ld apart) by the corrected two-pass around
 * the pivots k: mean[i] of (x - pivot), m2[i]. */
BN_INLINE void bn_cl_tile2_f64(const double *x, ptrdiff_t nrows, ptrdiff_t ld,
                               const double *restrict pivot, double *restrict mean,
                               double *restrict m2)
{
    const double n = (double)nrows;
    bn_v4d a[4] = {{0}}, d[4] = {{0}}, q[4] = {{0}}, m[4], k[4];
    memcpy(k, pivot, sizeof k);
    for (ptrdiff_t r = 0; r < nrows; r++)
        for (int j = 0; j < 4; j++) a[j] += BN_LOAD4(x + r * ld + 4 * j) - k[j];
    for (int j = 0; j < 4; j++) m[j] = a[j] / n;
    for (ptrdiff_t r = 0; r < nrows; r++)
        for (int j = 0; j < 4; j++) {
            bn_v4d u = (BN_LOAD4(x + r * ld + 4 * j) - k[j]) - m[j];
            d[j] += u;
            q[j] += u * u;
        }
    for (int j = 0; j < 4; j++)
        for (int i = 0; i < 4; i++)
            bn_finish_block(n, m[j][i], d[j][i], q[j][i], &mean[4 * j + i], &m2[4 * j + i]);
}

/* IN: nrows rows of nch channels, ld apart; per-channel shifts K (near each channel's
 * mean: see rows_chunk_stats) and pivots. OUT: per-channel mean[c] of (x - pivot[c]) and
 * m2[c] of the block. One pass per tile of 16 channels around K: sd = sum(u),
 * sdd = sum(u^2), u = x - K, M2 = sdd - sd^2/n, whose relative error is about
 * (1 + z^2) times a two-pass one's, z = (mean - K) / std. A tile where some channel has
 * z^2 > 1 (2 sd^2 / n > sdd, or nan: a nan, or both infinities) is done again by the
 * corrected two-pass (bn_cl_tile2_f64): so every M2 is within twice the two-pass error,
 * and a constant channel (sdd == 0 only when K is its value) gives M2 == 0; a channel with
 * one infinity gets the two-pass's mean (that infinity) and M2 (nan). Half the work of the
 * two-pass in cache, where that work was the cost (moments (3136, 256) 1.85x). */
static BN_CLONES void BN_NAME(bn_cl_moments_shift)(const BN_T *x, ptrdiff_t nrows,
                                                  ptrdiff_t nch, ptrdiff_t ld,
                                                  const double *restrict K,
                                                  const double *restrict pivot,
                                                  const BN_T *next, ptrdiff_t nnext,
                                                  ptrdiff_t next_rows, ptrdiff_t next_ld,
                                                  double *restrict mean, double *restrict m2)
{
    const double n = (double)nrows;
    bn_pf2 pf = {(const char *)next, 0, nnext, next_ld, next && nnext > 0 ? next_rows : 0};
    ptrdiff_t c = 0;
    for (; c + 16 <= nch; c += 16) {
        bn_v4d k0, k1, k2, k3, d[4], q[4];
        bn_v4d d0 = {0}, d1 = {0}, d2 = {0}, d3 = {0}, q0 = {0}, q1 = {0}, q2 = {0}, q3 = {0};
        memcpy(&k0, K + c, 32);
        memcpy(&k1, K + c + 4, 32);
        memcpy(&k2, K + c + 8, 32);
        memcpy(&k3, K + c + 12, 32);
        for (ptrdiff_t r = 0; r < nrows; r++) {   /* written out: the sums stay in registers */
            const BN_T *p = x + r * ld + c;
            bn_pf2_step(&pf);
            bn_v4d u0 = BN_LOAD4(p) - k0, u1 = BN_LOAD4(p + 4) - k1;
            bn_v4d u2 = BN_LOAD4(p + 8) - k2, u3 = BN_LOAD4(p + 12) - k3;
            BN_ACC4(u0, u1, u2, u3);
        }
        d[0] = d0; d[1] = d1; d[2] = d2; d[3] = d3;
        q[0] = q0; q[1] = q1; q[2] = q2; q[3] = q3;
        int ok = 1;
        for (int j = 0; j < 4; j++)
            for (int i = 0; i < 4; i++)
                ok &= 2.0 * d[j][i] * (d[j][i] / n) <= q[j][i];
        if (!ok) {
            bn_cl_tile2_f64(x + c, nrows, ld, pivot + c, mean + c, m2 + c);
            continue;
        }
        for (int j = 0; j < 4; j++)
            for (int i = 0; i < 4; i++)
                bn_finish_block(n, K[c + 4 * j + i] - pivot[c + 4 * j + i], d[j][i], q[j][i],
                                &mean[c + 4 * j + i], &m2[c + 4 * j + i]);
    }
    for (; c < nch; c++) {
        double a = 0, d = 0, q = 0;
        for (ptrdiff_t r = 0; r < nrows; r++) a += (double)x[r * ld + c] - pivot[c];
        double m0 = a / n;
        for (ptrdiff_t r = 0; r < nrows; r++) {
            double u = ((double)x[r * ld + c] - pivot[c]) - m0;
            d += u;
            q += u * u;
        }
        bn_finish_block(n, m0, d, q, &mean[c], &m2[c]);
    }
}

#endif


/* y[r, c] = (x[r, c] - mean[c]) * scale[c] + shift[c]. Row by row, so each output line
 * is written whole (which streaming stores need); the per-channel vectors come from L1. */
#if BN_T_IS_FLOAT
/* float: the arithmetic of bn_seg_affine (8 float lanes, the mean split as hi + lo, see
 * there), so both layouts give the same bits, at a third of the instructions of a round
 * trip through double (in cache that ran at ~1.6 cycles per value, the whole cost of a
 * channels-last eval). The per-channel floats are made once per call (32 KiB on the
 * stack; made per tile of 256 channels for each block of 32 KiB of rows, as before, they
 * cost about 0.75 instructions a value at 1024 channels, half as much as the affine).
 * - Ordinary stores and a multiple of 8 channels (up to BN_CL_TILE), the usual case: row
 *   by row, 8 channels a vector, no scalar code. The span below, its channel index
 *   wrapping at each row's end (a carried add and a branch per vector, the branch missed
 *   once a row), ran 1.3x slower in L2 in a C loop (0.48 cycles a value, rows 0.37, a copy
 *   0.30), and in process, against the span (separate processes, medians of three):
 *   eval (2, 28, 28, 128) 20.2 -> 15.9 us, (1, 56, 56, 64) 18.3 -> 15.3, (4, 14, 14, 256)
 *   19.0 -> 16.6, instance norm (32, 56, 56, 64) 1.31 -> 1.19 ms, group norm G=8 1.28 ->
 *   1.21 ms, within 3% elsewhere. Blocks of 4 rows sharing each vector's parameters
 *   (fewer loads) were faster in L1 but 0.86-0.95x from L3: 4 output streams, not 1.
 * - Streaming stores over contiguous rows (x and y rows nch apart): one span of
 *   nrows * nch values, the channel index wrapping at each row's end, so streaming stores
 *   cover every whole line of the output. Row by row, a row of 64 floats starting 16 bytes
 *   into a line (NumPy's alignment) left a line at each row boundary to two ordinary
 *   partial writes, one in four of y's lines read for ownership, and 8 of its 64 values to
 *   scalar code: 5% (eval) to 9% (training) slower at (32, 56, 56, 64) in paired
 *   in-process runs (alternated processes could not tell them apart: within their noise).
 * - Otherwise (rows apart with streaming stores, channels not a multiple of 8, or wider
 *   than BN_CL_TILE - 8): row by row, in tiles of up to BN_CL_TILE channels (bands of
 *   8 KiB per row when wider). */
#define BN_CL_TILE 2048
/* The float parameters of n channels: the mean split as hi + lo, the scale, the shift. */
BN_INLINE void bn_cl_float_params(const double *restrict mean, const double *restrict scale,
                                  const double *restrict shift, ptrdiff_t n,
                                  float *restrict hi, float *restrict lo, float *restrict k,
                                  float *restrict b)
{
    for (ptrdiff_t c = 0; c < n; c++) {
        hi[c] = (float)mean[c];
        lo[c] = (float)(mean[c] - (double)hi[c]);
        k[c] = (float)scale[c];
        b[c] = (float)shift[c];
    }
}

BN_INLINE void BN_NAME(bn_cl_affine_body)(const float *x, ptrdiff_t ldx, float *y,
                                          ptrdiff_t ldy, ptrdiff_t nrows, ptrdiff_t nch,
                                          const double *restrict mean,
                                          const double *restrict scale,
                                          const double *restrict shift, int stream)
{
    float f[4 * BN_CL_TILE] __attribute__((aligned(32)));
    if (!stream && nch % 8 == 0 && nch <= BN_CL_TILE) {
        float *restrict hi = f, *restrict lo = f + nch, *restrict k = f + 2 * nch;
        float *restrict b = f + 3 * nch;
        bn_cl_float_params(mean, scale, shift, nch, hi, lo, k, b);
        for (ptrdiff_t r = 0; r < nrows; r++) {
            const float *p = x + r * ldx;
            float *q = y + r * ldy;
            for (ptrdiff_t c = 0; c < nch; c += 8)
                bn_tab8_affine(p + c, q + c, hi + c, lo + c, k + c, b + c);
        }
        return;
    }
    if (ldx == nch && ldy == nch && nch + 8 <= BN_CL_TILE) {
        /* the floats of channel c % nch at every c < nch + 8: a vector of 8 starting at
         * any channel reads its lanes' parameters contiguously, across a row's end too */
        const ptrdiff_t e = nch + 8;
        float *restrict hi = f, *restrict lo = f + e, *restrict k = f + 2 * e;
        float *restrict b = f + 3 * e;
        ptrdiff_t j = 0;   /* the channel of the next value */
        bn_cl_float_params(mean, scale, shift, nch, hi, lo, k, b);
        /* the 8 after them wrap around (a counter: c % nch, a division per channel, had
         * taken 60% of the call for a sample of 16 rows of 64 channels) */
        for (ptrdiff_t c = nch, cc = 0; c < e; c++) {
            hi[c] = hi[cc];
            lo[c] = lo[cc];
            k[c] = k[cc];
            b[c] = b[cc];
            if (++cc == nch)
                cc = 0;
        }
#define BN_SCALAR(i) do { y[i] = ((x[i] - hi[j]) - lo[j]) * k[j] + b[j]; \
        if (++j == nch) j = 0; } while (0)
#define BN_VEC(i, nt) do { bn_v8f v_, h_, l_, k_, b_; memcpy(&v_, x + (i), sizeof v_); \
        memcpy(&h_, hi + j, sizeof h_); memcpy(&l_, lo + j, sizeof l_); \
        memcpy(&k_, k + j, sizeof k_); memcpy(&b_, b + j, sizeof b_); \
        BN_PUT8F(y + (i), ((v_ - h_) - l_) * k_ + b_, nt); \
        j += 8; while (j >= nch) j -= nch; } while (0)   /* once, unless nch < 8 */
        BN_SPAN_LOOP(y, nrows * nch, stream, 8, BN_SCALAR, BN_VEC);
#undef BN_SCALAR
#undef BN_VEC
        return;
    }
    for (ptrdiff_t c0 = 0; c0 < nch; c0 += BN_CL_TILE) {
        const ptrdiff_t tc = nch - c0 < BN_CL_TILE ? nch - c0 : BN_CL_TILE;
        float *restrict hi = f, *restrict lo = f + tc, *restrict k = f + 2 * tc;
        float *restrict b = f + 3 * tc;
        bn_cl_float_params(mean + c0, scale + c0, shift + c0, tc, hi, lo, k, b);
        for (ptrdiff_t r = 0; r < nrows; r++) {
            const float *p = x + r * ldx + c0;
            float *q = y + r * ldy + c0;
#define BN_SCALAR(c) q[c] = ((p[c] - hi[c]) - lo[c]) * k[c] + b[c]
#define BN_VEC(c, nt) do { bn_v8f v_, h_, l_, k_, b_; memcpy(&v_, p + (c), sizeof v_); \
        memcpy(&h_, hi + (c), sizeof h_); memcpy(&l_, lo + (c), sizeof l_); \
        memcpy(&k_, k + (c), sizeof k_); memcpy(&b_, b + (c), sizeof b_); \
        BN_PUT8F(q + (c), ((v_ - h_) - l_) * k_ + b_, nt); } while (0)
            BN_SPAN_LOOP(q, tc, stream, 8, BN_SCALAR, BN_VEC);
#undef BN_SCALAR
#undef BN_VEC
        }
    }
}
#undef BN_CL_TILE
#else
BN_INLINE void BN_NAME(bn_cl_affine_body)(const BN_T *x, ptrdiff_t ldx, BN_T *y, ptrdiff_t ldy,
                                          ptrdiff_t nrows, ptrdiff_t nch,
                                          const double *restrict mean,
                                          const double *restrict scale,
                                          const double *restrict shift, int stream)
{
    for (ptrdiff_t r = 0; r < nrows; r++) {
        const BN_T *p = x + r * ldx;
        BN_T *q = y + r * ldy;
#define BN_SCALAR(c) q[c] = (BN_T)(((double)p[c] - mean[c]) * scale[c] + shift[c])
#define BN_VEC(c, nt) do { bn_v4d m_, k_, b_; memcpy(&m_, mean + (c), 32); \
        memcpy(&k_, scale + (c), 32); memcpy(&b_, shift + (c), 32); \
        BN_PUT4(q + (c), (BN_LOAD4(p + (c)) - m_) * k_ + b_, nt); } while (0)
        BN_SPAN_LOOP(q, nch, stream, 4, BN_SCALAR, BN_VEC);
#undef BN_SCALAR
#undef BN_VEC
    }
}
#endif

#if BN_T_IS_FLOAT
/* Channels-last group-norm blocks (nrows rows of nch <= 1024 channels, ld apart), two at
 * once, row by row: the affine of block A (none where xa is NULL) and the statistics of
 * block B (none where xb is NULL). A's affine is bn_cl_affine's arithmetic with one mean
 * for every channel, its hi and lo in registers (a vector of 8 values loads 3 vectors,
 * not 5: loads were the limit); B's statistics are bn_run_moments' (*shift_b, *mean_b
 * relative to it, *m2_b). The same bits as those. A block's statistics are arithmetic on
 * data in cache, its affine waits on memory (its output lines are read for ownership);
 * one after the other, the arithmetic ran with the memory idle (group norm (32, 7, 7,
 * 512) G=8: statistics alone 58 us, the affine alone 133, both 174), and the next
 * block's statistics beside this block's affine overlap the two. */
static BN_CLONES void bn_cl_group_pipe_f32(const float *xa, float *ya, const float *xb,
                                          ptrdiff_t ld, ptrdiff_t nrows, ptrdiff_t nch,
                                          double mean_a, const double *restrict scale,
                                          const double *restrict shift, int stream,
                                          double *shift_b, double *mean_b, double *m2_b)
{
    float kb[2 * 1024] __attribute__((aligned(32)));
    float *restrict kf = kb, *restrict bf = kb + nch;
    const float hs = (float)mean_a, ls = (float)(mean_a - (double)hs);
    const bn_v8f hi = {hs, hs, hs, hs, hs, hs, hs, hs}, lo = {ls, ls, ls, ls, ls, ls, ls, ls};
    if (xa)
        for (ptrdiff_t c = 0; c < nch; c++) {
            kf[c] = (float)scale[c];
            bf[c] = (float)shift[c];
        }
    const double k = xb ? BN_NAME(bn_run_shift)(xb, nch) : 0.0;
    const bn_v4d kk = {k, k, k, k};
    bn_v4d d0 = {0}, d1 = {0}, d2 = {0}, d3 = {0}, q0 = {0}, q1 = {0}, q2 = {0}, q3 = {0};
    double td = 0, tq = 0;
#define BN_DEV(v) ((v) - kk)
#define BN_DEV1(v) ((v) - k)
#define BN_SCALAR(c) q[c] = ((p[c] - hs) - ls) * kf[c] + bf[c]
#define BN_VEC(c, nt) do { bn_v8f v_, k_, b_; memcpy(&v_, p + (c), sizeof v_); \
        memcpy(&k_, kf + (c), sizeof k_); memcpy(&b_, bf + (c), sizeof b_); \
        BN_PUT8F(q + (c), ((v_ - hi) - lo) * k_ + b_, nt); } while (0)
    for (ptrdiff_t r = 0; r < nrows; r++) {
        if (xb)
            BN_SEG_DEV_ROW(xb + r * ld, nch);
        if (xa) {
            const float *p = xa + r * ld;
            float *q = ya + r * ld;
            BN_SPAN_LOOP(q, nch, stream, 8, BN_SCALAR, BN_VEC);
        }
    }
#undef BN_DEV
#undef BN_DEV1
#undef BN_SCALAR
#undef BN_VEC
    if (xb) {
        *shift_b = k;
        bn_run_finish((double)nrows * (double)nch,
                      bn_v4d_total((d0 + d1) + (d2 + d3)) + td,
                      bn_v4d_total((q0 + q1) + (q2 + q3)) + tq, mean_b, m2_b);
    }
}
#else
/* bn_cl_affine with one mean for every channel (a block of channels-last group norm),
 * double: the mean in a register, a vector loads x, scale and shift (not the mean too);
 * bn_cl_affine's expression, its bits. Group norm (32, 7, 7, 512) G=8. */
static BN_CLONES void bn_cl_affine_group_f64(const double *x, ptrdiff_t ldx, double *y,
                                            ptrdiff_t ldy, ptrdiff_t nrows, ptrdiff_t nch,
                                            double mean, const double *restrict scale,
                                            const double *restrict shift, int stream)
{
    const bn_v4d m = {mean, mean, mean, mean};
    for (ptrdiff_t r = 0; r < nrows; r++) {
        const double *p = x + r * ldx;
        double *q = y + r * ldy;
#define BN_SCALAR(c) q[c] = (p[c] - mean) * scale[c] + shift[c]
#define BN_VEC(c, nt) do { bn_v4d k_, b_; memcpy(&k_, scale + (c), 32); \
        memcpy(&b_, shift + (c), 32); BN_PUT4(q + (c), (BN_LOAD4(p + (c)) - m) * k_ + b_, nt); \
    } while (0)
        BN_SPAN_LOOP(q, nch, stream, 4, BN_SCALAR, BN_VEC);
#undef BN_SCALAR
#undef BN_VEC
    }
}

/* Mean and M2 of nseg segments of len doubles (stride apart) in one pass around K, a
 * value near their mean (as bn_cl_moments_shift: within twice the two-pass error when
 * K is within a standard deviation of the mean). Returns 0, with no results, when it
 * is not (or for a nan, or both infinities): the caller's two-pass then. */
static BN_CLONES int bn_shift_moments_f64(const double *x, ptrdiff_t nseg, ptrdiff_t len,
                                         ptrdiff_t stride, double K, double *mean,
                                         double *m2)
{
    const double n = (double)nseg * (double)len;
    double sd, sdd;
    bn_seg_dev_f64(x, nseg, len, stride, K, 0.0, 1, &sd, &sdd);
    if (!(2.0 * sd * (sd / n) <= sdd))
        return 0;
    bn_finish_block(n, K, sd, sdd, mean, m2);
    return 1;
}
#endif

static BN_CLONES void BN_NAME(bn_cl_affine)(const BN_T *x, ptrdiff_t ldx, BN_T *y, ptrdiff_t ldy,
                                           ptrdiff_t nrows, ptrdiff_t nch,
                                           const double *restrict mean,
                                           const double *restrict scale,
                                           const double *restrict shift)
{
    BN_NAME(bn_cl_affine_body)(x, ldx, y, ldy, nrows, nch, mean, scale, shift, 0);
}

static BN_CLONES void BN_NAME(bn_cl_affine_stream)(const BN_T *x, ptrdiff_t ldx, BN_T *y,
                                                  ptrdiff_t ldy, ptrdiff_t nrows, ptrdiff_t nch,
                                                  const double *restrict mean,
                                                  const double *restrict scale,
                                                  const double *restrict shift)
{
    BN_NAME(bn_cl_affine_body)(x, ldx, y, ldy, nrows, nch, mean, scale, shift, 1);
}

/* The channels-last backward kernels, from bn_cl_bwd_impl.h (float, double; below, the
 * float16 twins). */
#define BN_E BN_T
#define BN_CLN(name) BN_NAME(name)
#define BN_CLFN BN_CLONES
#define BN_CLINL BN_INLINE
#define BN_CLD4 BN_LOAD4
#define BN_CLD1(v) ((double)(v))
#define BN_CLPUT4 BN_PUT4
#define BN_CLSET1(o, v) ((o) = (BN_T)(v))
#define BN_CLSZ ((ptrdiff_t)sizeof(BN_T))
#include "bn_cl_bwd_impl.h"

#if BN_T_IS_FLOAT
#define BN_E uint16_t
#define BN_CLN(name) name##_h16
#define BN_CLFN BN_H16
#define BN_CLINL static inline __attribute__((always_inline)) BN_H16
#define BN_CLD4 BN_LOAD4H
#define BN_CLD1 BN_LOAD1H
#define BN_CLPUT4(q, v, nt) BN_STORE4H((q), (v))
#define BN_CLSET1(o, v) ((o) = BN_ROUND1H(v))
#define BN_CLSZ ((ptrdiff_t)sizeof(float))
#include "bn_cl_bwd_impl.h"
#endif

/* ---- row-norm family (rownorm) ---- */

/* Layer and RMS norm over rows of d contiguous values (bncore/_rownorm.pyx). Statistics
 * come from bn_seg_moments / bn_seg_sumsq; these are the elementwise passes. With stream
 * set, the rows' whole output lines go out with streaming stores (bn_stream_span; the
 * caller runs bn_fence once after its last row), same bits either way. */

/* y = ((x - mean) * invstd) * w[i] + b[i]; w and/or b may be NULL. For float the
 * arithmetic is float, 8 lanes, with the mean split hi + lo as in bn_seg_affine (exact
 * near the mean at any offset; x == mean gives exactly b[i]); for double it is double. */
/* The span loop of bn_row_affine with the expression inline: VEXPR of v (x), ww (w) and
 * bb (b) vectors at i, SEXPR of element i. */
#define BN_ROW_AFFINE_LOOP(VEXPR, SEXPR) do { \
        ptrdiff_t lo_, hi_, i; \
        bn_stream_span(y, n, sizeof(*y), stream, &lo_, &hi_); \
        for (i = 0; i + BN_RW <= lo_; i += BN_RW) BN_ROW_VEC(VEXPR, 0); \
        for (; i < lo_; i++) y[i] = (SEXPR); \
        for (; i < hi_; i += BN_RW) BN_ROW_VEC(VEXPR, 1); \
        for (; i + BN_RW <= n; i += BN_RW) BN_ROW_VEC(VEXPR, 0); \
        for (; i < n; i++) y[i] = (SEXPR); \
        BN_FETCH_LAST(fetch, n); } while (0)
#if BN_T_IS_FLOAT
#define BN_RW 8
#define BN_ROW_VEC(VEXPR, nt) do { bn_v8f v, ww, bb; memcpy(&v, x + i, sizeof v); \
        BN_FETCH_SPREAD(fetch, i); \
        if (w) memcpy(&ww, w + i, sizeof ww); \
        if (b) memcpy(&bb, b + i, sizeof bb); \
        BN_PUT8F(y + i, (VEXPR), nt); } while (0)

BN_INLINE void BN_NAME(bn_row_affine_body)(const BN_T *restrict x, BN_T *restrict y,
                                           ptrdiff_t n, double mean, double invstd,
                                           const BN_T *restrict w, const BN_T *restrict b,
                                           int stream, const BN_T *fetch)
{
    const float hi = (float)mean, lo = (float)(mean - (double)hi), s = (float)invstd;
    const bn_v8f vhi = {hi, hi, hi, hi, hi, hi, hi, hi}, vlo = {lo, lo, lo, lo, lo, lo, lo, lo};
    const bn_v8f vs = {s, s, s, s, s, s, s, s};
    if (w && b)
        BN_ROW_AFFINE_LOOP(((v - vhi) - vlo) * vs * ww + bb, ((x[i] - hi) - lo) * s * w[i] + b[i]);
    else if (w)
        BN_ROW_AFFINE_LOOP(((v - vhi) - vlo) * vs * ww, ((x[i] - hi) - lo) * s * w[i]);
    else if (b)
        BN_ROW_AFFINE_LOOP(((v - vhi) - vlo) * vs + bb, ((x[i] - hi) - lo) * s + b[i]);
    else
        BN_ROW_AFFINE_LOOP(((v - vhi) - vlo) * vs, ((x[i] - hi) - lo) * s);
}
#else
#define BN_RW 4
#define BN_ROW_VEC(VEXPR, nt) do { bn_v4d v = BN_LOAD4(x + i), ww, bb; \
        BN_FETCH_SPREAD(fetch, i); \
        if (w) memcpy(&ww, w + i, sizeof ww); \
        if (b) memcpy(&bb, b + i, sizeof bb); \
        BN_PUT4(y + i, (VEXPR), nt); } while (0)

BN_INLINE void BN_NAME(bn_row_affine_body)(const BN_T *restrict x, BN_T *restrict y,
                                           ptrdiff_t n, double mean, double invstd,
                                           const BN_T *restrict w, const BN_T *restrict b,
                                           int stream, const BN_T *fetch)
{
    const bn_v4d vm = {mean, mean, mean, mean}, vs = {invstd, invstd, invstd, invstd};
    if (w && b)
        BN_ROW_AFFINE_LOOP((v - vm) * vs * ww + bb, (x[i] - mean) * invstd * w[i] + b[i]);
    else if (w)
        BN_ROW_AFFINE_LOOP((v - vm) * vs * ww, (x[i] - mean) * invstd * w[i]);
    else if (b)
        BN_ROW_AFFINE_LOOP((v - vm) * vs + bb, (x[i] - mean) * invstd + b[i]);
    else
        BN_ROW_AFFINE_LOOP((v - vm) * vs, (x[i] - mean) * invstd);
}
#endif
#undef BN_ROW_AFFINE_LOOP
#undef BN_ROW_VEC
#undef BN_RW

static BN_CLONES void BN_NAME(bn_row_affine)(const BN_T *restrict x, BN_T *restrict y,
                                            ptrdiff_t n, double mean, double invstd,
                                            const BN_T *restrict w, const BN_T *restrict b,
                                            int stream)
{
    BN_NAME(bn_row_affine_body)(x, y, n, mean, invstd, w, b, stream, NULL);
}

/* Layer norm (rms = 0) or RMS norm (rms = 1) of nrows rows of d values (x and y rows ldx
 * and ldy elements apart; d no more than one statistics block), staged over groups of up
 * to 16 rows (about 16 KiB): each stage (statistics, then 1/sqrt, then bn_row_affine) runs
 * over every row of the group before the next begins. A row's statistics end in a chain of
 * dependent steps (horizontal sums, divisions, a square root) that at small d costs more
 * than its arithmetic; rows of one stage are independent, so their chains overlap. RMS
 * rows and double rows get bn_seg_sumsq / bn_seg_moments' bits; float layer-norm rows one
 * pass (bn_run_moments). Each row's affine prefetches the row about 16 KiB ahead (up to
 * nfetch rows from x: the caller's later rows), one row in, one row fetched: the hardware's
 * prefetcher alone left the rows waiting on memory between the groups' stages (two
 * threads: d = 64 1.2x, 128 1.2x, 768 1.23x), where fetching the whole next group at once
 * had run 6-10% slower. The fetch is spread over the row's affine (BN_FETCH_SPREAD), not
 * issued in one burst before it: two threads, layer norm (16384, 1024) 1.035x, RMS norm
 * (8192, 768) 1.015x, (8192, 768) and (65536, 64) 1.0x. Float layer-norm rows take
 * bn_run_moments' one double pass around a shift K, but K is the row's first value (or 0
 * where it is not finite) rather than a float tree over its first 16: that tree, its
 * conversion and its horizontal adds cost 14% of a 64-value row in L1 (two threads:
 * (65536, 64) 1.13x, (1024, 64) 1.08x, (16384, 128) 1.02x, (8192, 768) 1.03x, one thread
 * 1.11x). K is one of the row's d <= BLOCK values, so within sqrt(d - 1) standard
 * deviations of its mean (Samuelson), and M2's relative error stays below about
 * 2 d^2 eps (1e-9 at 2048 values, 1e-12 at 64) where a float32 ulp is 6e-8: mean,
 * invstd and y came out bit for bit the same as with the tree's shift on 1.26 million
 * values of rows with offsets up to 1e5 and outliers first. mean may be NULL (rms);
 * invstd gets 1 / sqrt(var + eps), or 1 / sqrt(mean(x^2) + eps). */
#define BN_ROWS_GROUP 16
static BN_CLONES void BN_NAME(bn_rows_norm)(const BN_T *x, BN_T *y, ptrdiff_t nrows,
                                           ptrdiff_t nfetch, ptrdiff_t d, ptrdiff_t ldx,
                                           ptrdiff_t ldy,
                                           double eps, const BN_T *w, const BN_T *b,
                                           double *mean, double *invstd, int rms, int stream)
{
    const double n = (double)d;
    ptrdiff_t rows = 16384 / (d * (ptrdiff_t)sizeof(BN_T) + 1);
    rows = rows < 1 ? 1 : rows > BN_ROWS_GROUP ? BN_ROWS_GROUP : rows;
    double m[BN_ROWS_GROUP], q[BN_ROWS_GROUP], s[BN_ROWS_GROUP];
    ptrdiff_t ahead = 16384 / (d * (ptrdiff_t)sizeof(BN_T) + 1);   /* rows in 16 KiB */
    ahead = ahead < 1 ? 1 : ahead;
    for (ptrdiff_t r0 = 0; r0 < nrows; r0 += rows) {
        const ptrdiff_t nr = nrows - r0 < rows ? nrows - r0 : rows;
        const BN_T *xg = x + r0 * ldx;
        if (rms) {
            for (ptrdiff_t i = 0; i < nr; i++)
                q[i] = BN_NAME(bn_seg_sumsq_body)(xg + i * ldx, 1, d, 0);
        } else {
#if BN_T_IS_FLOAT
            double k[BN_ROWS_GROUP];
            for (ptrdiff_t i = 0; i < nr; i++) {   /* one double pass around the first value */
                k[i] = bn_pivot((double)xg[i * ldx]);
                BN_NAME(bn_seg_dev)(xg + i * ldx, 1, d, 0, k[i], 0.0, 1, &m[i], &q[i]);
            }
            for (ptrdiff_t i = 0; i < nr; i++) {   /* divisions 4 rows to a vector */
                double mi;
                bn_run_finish(n, m[i], q[i], &mi, &q[i]);
                m[i] = mi + k[i];
            }
#else
            for (ptrdiff_t i = 0; i < nr; i++) {
                double pivot = bn_pivot((double)xg[i * ldx]);
                BN_NAME(bn_seg_moments_body)(xg + i * ldx, 1, d, 0, pivot, &m[i], &q[i]);
                m[i] += pivot;
            }
#endif
        }
        for (ptrdiff_t i = 0; i < nr; i++)
            s[i] = 1.0 / sqrt(q[i] / n + eps);
        for (ptrdiff_t i = 0; i < nr; i++) {
            const int fetch = stream && r0 + i + ahead < nfetch;   /* a row in, a row fetched */
            invstd[r0 + i] = s[i];
            if (!rms)
                mean[r0 + i] = m[i];
            BN_NAME(bn_row_affine_body)(xg + i * ldx, y + (r0 + i) * ldy, d, rms ? 0.0 : m[i],
                                        s[i], w, rms ? NULL : b, stream,
                                        fetch ? x + (r0 + i + ahead) * ldx : NULL);
        }
    }
}
#undef BN_ROWS_GROUP

/* Backward of one row of layer norm (rms = 0) or RMS norm (rms = 1, mean = 0):
 *   g = dy * w, xhat = (x - mean) * invstd,
 *   dx = invstd * (g - [mean(g)] - xhat * mean(g * xhat))
 *      = g * invstd + (x - mean) * q + r,  q = -invstd^2 mean(g xhat), r = -invstd [mean(g)]
 * (bn_row_bwd_qr), and the per-column partials dw[i] += dy * xhat, db[i] += dy (db may be
 * NULL). w: d weights as double (ones when the op has none). All arithmetic is double: dx
 * is a difference of terms up to invstd * |g| that cancel (to exactly zero for a constant
 * dy), which float arithmetic would leave at ~1e-7 of that scale. The first pass (row sums
 * and column partials) runs two independent accumulator pairs, so it is not bound by the
 * latency of one add chain, and takes t = dy * (x - mean) once for both sums it feeds:
 * sum(g * (x - mean)) as sum(t * w) and dw's partial as t * invstd, one multiply a value
 * fewer than (dy * w) * (x - mean) and dy * ((x - mean) * invstd) (AVX2 clone, two
 * threads, in process: (8192, 768) 1.054x, (65536, 64) 1.034x, (1024, 4096) 1.02x; the
 * AVX-512 twins, two multiply pipes to the AVX2 clone's three, 1.0-1.01x). Lanes depend
 * on d only; bn_row_bwd_sums has the same.
 * fetch_dy, fetch_x: a later row to prefetch over the first pass (BN_ROW_FETCH), or NULL. */
#define BN_ROW_SUMS_STEP(i) \
        bn_v4d g0 = BN_LOAD4(dy + (i)), g1 = BN_LOAD4(dy + (i) + 4); \
        bn_v4d u0 = BN_LOAD4(x + (i)) - m, u1 = BN_LOAD4(x + (i) + 4) - m; \
        bn_v4d w0, w1; \
        memcpy(&w0, w + (i), 32); \
        memcpy(&w1, w + (i) + 4, 32); \
        bn_v4d t0 = g0 * u0, t1 = g1 * u1; \
        sg0 = BN_FMA4(g0, w0, sg0); \
        sg1 = BN_FMA4(g1, w1, sg1); \
        sx0 = BN_FMA4(t0, w0, sx0); \
        sx1 = BN_FMA4(t1, w1, sx1)
/* dx of element j (scalar) and of elements j..j+3 (vector) from q, r (vq, vr) and
 * s = invstd (scalar invstd): every path that writes a layer-norm dx rounds alike. */
#define BN_ROW_DX(j) ((BN_T)BN_FMA((double)dy[j], w[j] * invstd, \
        BN_FMA((double)x[j] - mean, q, r)))
#define BN_ROW_DXV(j, nt) do { bn_v4d ww, g_ = BN_LOAD4(dy + (j)), u_ = BN_LOAD4(x + (j)) - m; \
        memcpy(&ww, w + (j), 32); ww = ww * s; u_ = BN_FMA4(u_, vq, vr); \
        BN_PUT4(dx + (j), BN_FMA4(g_, ww, u_), nt); \
    } while (0)
#define BN_ROW_DXS(j) dx[j] = BN_ROW_DX(j)
/* The prefetch of a later row (fetch_dy, fetch_x; NULL: none) spread over a row's first
 * pass (BN_FETCH_SPREAD). */
#define BN_ROW_FETCH(i) do { BN_FETCH_SPREAD(fetch_dy, i); BN_FETCH_SPREAD(fetch_x, i); \
    } while (0)
#define BN_ROW_FETCH_END do { BN_FETCH_LAST(fetch_dy, d); BN_FETCH_LAST(fetch_x, d); \
    } while (0)
/* The scalar tail of the row sums from i (into tg, tx), and of the row sums with the
 * column partials: one code for the clones and the AVX-512 twins. */
#define BN_ROW_SUMS_TAIL(i) \
    for (; (i) < d; (i)++) { \
        double g = (double)dy[i], u = (double)x[i] - mean, t = g * u; \
        tg = BN_FMA(g, w[i], tg); \
        tx = BN_FMA(t, w[i], tx); \
    }
#define BN_ROW_BWD_TAIL(i) \
    for (; (i) < d; (i)++) { \
        double g = (double)dy[i], u = (double)x[i] - mean, t = g * u; \
        tg = BN_FMA(g, w[i], tg); \
        tx = BN_FMA(t, w[i], tx); \
        dw[i] = BN_FMA(t, invstd, dw[i]); \
        if (db) db[i] += g; \
    }
static BN_CLONES void BN_NAME(bn_row_bwd)(const BN_T *restrict dy, const BN_T *restrict x,
                                         BN_T *restrict dx, ptrdiff_t d, double mean,
                                         double invstd, const double *restrict w,
                                         double *restrict dw, double *restrict db, int rms,
                                         int stream, const BN_T *fetch_dy,
                                         const BN_T *fetch_x)
{
    const bn_v4d m = {mean, mean, mean, mean}, s = {invstd, invstd, invstd, invstd};
    bn_v4d sg0 = {0}, sg1 = {0}, sx0 = {0}, sx1 = {0};
    double tg = 0, tx = 0, q, r;
    ptrdiff_t i = 0;
    for (; i + 8 <= d; i += 8) {
        BN_ROW_FETCH(i);
        BN_ROW_SUMS_STEP(i);
        bn_v4d a0, a1;
        memcpy(&a0, dw + i, 32);
        memcpy(&a1, dw + i + 4, 32);
        a0 = BN_FMA4(t0, s, a0);
        a1 = BN_FMA4(t1, s, a1);
        memcpy(dw + i, &a0, 32);
        memcpy(dw + i + 4, &a1, 32);
        if (db) {
            memcpy(&a0, db + i, 32);
            memcpy(&a1, db + i + 4, 32);
            a0 += g0;
            a1 += g1;
            memcpy(db + i, &a0, 32);
            memcpy(db + i + 4, &a1, 32);
        }
    }
    BN_ROW_BWD_TAIL(i);
    BN_ROW_FETCH_END;
    bn_row_bwd_qr(bn_v4d_total(sg0 + sg1) + tg, bn_v4d_total(sx0 + sx1) + tx, d, invstd,
                  rms, &q, &r);
    const bn_v4d vq = {q, q, q, q}, vr = {r, r, r, r};
    BN_SPAN_LOOP(dx, d, stream, 4, BN_ROW_DXS, BN_ROW_DXV);
}

/* The prefetch of two later rows (fetch_dy, fetch_x and the rows ldg, ldx on; NULL: none)
 * spread over the first pass of a pair of rows, as BN_ROW_FETCH. */
#define BN_ROW2_FETCH(i) do { if (fetch_dy != NULL) { \
        BN_ROW_FETCH(i); BN_FETCH_SPREAD(fetch_dy + ldg, i); BN_FETCH_SPREAD(fetch_x + ldx, i); \
    } } while (0)
#define BN_ROW2_FETCH_END do { if (fetch_dy != NULL) { \
        BN_ROW_FETCH_END; BN_FETCH_LAST(fetch_dy + ldg, d); BN_FETCH_LAST(fetch_x + ldx, d); \
    } } while (0)
/* The scalar tail of a pair's first pass from i: each row's sums (tg, tx; hg, hx) and each
 * column's partials, row 0's term then row 1's, as two bn_row_bwd calls add them. */
#define BN_ROW2_TAIL(i) \
    for (; (i) < d; (i)++) { \
        double g = (double)dy[i], u = (double)x[i] - ma, t = g * u; \
        double h = (double)dyb[i], e = (double)xb[i] - mb, c = h * e; \
        tg = BN_FMA(g, w[i], tg); \
        tx = BN_FMA(t, w[i], tx); \
        hg = BN_FMA(h, w[i], hg); \
        hx = BN_FMA(c, w[i], hx); \
        dw[i] = BN_FMA(c, ib, BN_FMA(t, ia, dw[i])); \
        if (db) db[i] = (db[i] + g) + h; \
    }
/* dx of one row of a pair (dy, x, dx, mean, invstd, q, r of that row in scope), as
 * bn_row_bwd writes it. */
#define BN_ROW_DX_PASS4 do { \
        const bn_v4d m = {mean, mean, mean, mean}, s = {invstd, invstd, invstd, invstd}; \
        const bn_v4d vq = {q, q, q, q}, vr = {r, r, r, r}; \
        BN_SPAN_LOOP(dx, d, stream, 4, BN_ROW_DXS, BN_ROW_DXV); \
    } while (0)

/* The parameters, start and finish of bn_row_bwd2 and its AVX-512 twin: the finish takes
 * the vector parts of the two rows' sums (SGA, SXA; SGB, SXB) and PASS, a row's dx loop. */
#define BN_ROW_BWD2_PARAMS (const BN_T *restrict dy, const BN_T *restrict x, \
        BN_T *restrict dx, ptrdiff_t ldg, ptrdiff_t ldx, ptrdiff_t ldd, ptrdiff_t d, \
        const double *mean2, const double *invstd2, const double *restrict w, \
        double *restrict dw, double *restrict db, int rms, int stream, const BN_T *fetch_dy, \
        const BN_T *fetch_x)
#define BN_ROW_BWD2_START \
    const BN_T *restrict dyb = dy + ldg, *restrict xb = x + ldx; \
    BN_T *const dxb = dx + ldd; \
    const double ma = mean2 && !rms ? mean2[0] : 0.0, mb = mean2 && !rms ? mean2[1] : 0.0; \
    const double ia = invstd2[0], ib = invstd2[1]; \
    double tg = 0, tx = 0, hg = 0, hx = 0, qa, ra, qb, rb
#define BN_ROW_BWD2_FINISH(SGA, SXA, SGB, SXB, PASS) do { \
        BN_ROW2_TAIL(i); \
        BN_ROW2_FETCH_END; \
        bn_row_bwd_qr((SGA) + tg, (SXA) + tx, d, ia, rms, &qa, &ra); \
        bn_row_bwd_qr((SGB) + hg, (SXB) + hx, d, ib, rms, &qb, &rb); \
        { \
            const double mean = ma, invstd = ia, q = qa, r = ra; \
            PASS; \
        } \
        { \
            const BN_T *restrict dy = dyb, *restrict x = xb; \
            BN_T *restrict dx = dxb; \
            const double mean = mb, invstd = ib, q = qb, r = rb; \
            PASS; \
        } \
    } while (0)

/* bn_row_bwd of two rows (row 1 ldg, ldx and ldd elements on; mean2, invstd2 the two
 * rows'; mean2 NULL for RMS norm) with their first passes together: each column partial
 * is loaded and stored once a pair and takes row 0's term then row 1's, as two calls add
 * them, so the bits are two calls' (tests/test_clones.py); the two rows' sums are four
 * independent chains. In a C loop on one thread, rows in L1 or L2: 768 values 1.12x,
 * 2048 1.24x, 4096 1.22-1.29x over two bn_row_bwd calls (AVX-512 twins). */
static BN_CLONES void BN_NAME(bn_row_bwd2)BN_ROW_BWD2_PARAMS
{
    BN_ROW_BWD2_START;
    const bn_v4d vma = {ma, ma, ma, ma}, vmb = {mb, mb, mb, mb};
    const bn_v4d vsa = {ia, ia, ia, ia}, vsb = {ib, ib, ib, ib};
    bn_v4d sg0 = {0}, sg1 = {0}, sx0 = {0}, sx1 = {0};
    bn_v4d hg0 = {0}, hg1 = {0}, hx0 = {0}, hx1 = {0};
    ptrdiff_t i = 0;
    for (; i + 8 <= d; i += 8) {
        BN_ROW2_FETCH(i);
        bn_v4d w0, w1, a0, a1;
        memcpy(&w0, w + i, 32);
        memcpy(&w1, w + i + 4, 32);
        bn_v4d g0 = BN_LOAD4(dy + i), g1 = BN_LOAD4(dy + i + 4);
        bn_v4d u0 = BN_LOAD4(x + i) - vma, u1 = BN_LOAD4(x + i + 4) - vma;
        bn_v4d h0 = BN_LOAD4(dyb + i), h1 = BN_LOAD4(dyb + i + 4);
        bn_v4d e0 = BN_LOAD4(xb + i) - vmb, e1 = BN_LOAD4(xb + i + 4) - vmb;
        bn_v4d t0 = g0 * u0, t1 = g1 * u1, c0 = h0 * e0, c1 = h1 * e1;
        sg0 = BN_FMA4(g0, w0, sg0);
        sg1 = BN_FMA4(g1, w1, sg1);
        sx0 = BN_FMA4(t0, w0, sx0);
        sx1 = BN_FMA4(t1, w1, sx1);
        hg0 = BN_FMA4(h0, w0, hg0);
        hg1 = BN_FMA4(h1, w1, hg1);
        hx0 = BN_FMA4(c0, w0, hx0);
        hx1 = BN_FMA4(c1, w1, hx1);
        memcpy(&a0, dw + i, 32);
        memcpy(&a1, dw + i + 4, 32);
        a0 = BN_FMA4(t0, vsa, a0);
        a1 = BN_FMA4(t1, vsa, a1);
        a0 = BN_FMA4(c0, vsb, a0);
        a1 = BN_FMA4(c1, vsb, a1);
        memcpy(dw + i, &a0, 32);
        memcpy(dw + i + 4, &a1, 32);
        if (db) {
            memcpy(&a0, db + i, 32);
            memcpy(&a1, db + i + 4, 32);
            a0 = (a0 + g0) + h0;
            a1 = (a1 + g1) + h1;
            memcpy(db + i, &a0, 32);
            memcpy(db + i + 4, &a1, 32);
        }
    }
    BN_ROW_BWD2_FINISH(bn_v4d_total(sg0 + sg1), bn_v4d_total(sx0 + sx1),
                       bn_v4d_total(hg0 + hg1), bn_v4d_total(hx0 + hx1), BN_ROW_DX_PASS4);
}

/* bn_row_bwd's row sums alone, with its lanes: *q and *r of the row (bn_row_bwd_qr), for
 * bn_rows_bwd_tile. */
static BN_CLONES void BN_NAME(bn_row_bwd_sums)(const BN_T *restrict dy, const BN_T *restrict x,
                                              ptrdiff_t d, double mean, double invstd,
                                              const double *restrict w, int rms, double *q,
                                              double *r)
{
    const bn_v4d m = {mean, mean, mean, mean};
    bn_v4d sg0 = {0}, sg1 = {0}, sx0 = {0}, sx1 = {0};
    double tg = 0, tx = 0;
    ptrdiff_t i = 0;
    for (; i + 8 <= d; i += 8) {
        BN_ROW_SUMS_STEP(i);
    }
    BN_ROW_SUMS_TAIL(i);
    bn_row_bwd_qr(bn_v4d_total(sg0 + sg1) + tg, bn_v4d_total(sx0 + sx1) + tx, d, invstd,
                  rms, q, r);
}

/* The frame of bn_rows_bwd_tile and of its AVX-512 twin: ROW_SETUP declares a row's
 * vector constants, STEP(j) the W columns from j (dx and the column sums aw, ab). */
#define BN_ROWS_BWD_TILE_FRAME(W, ROW_SETUP, STEP) \
    for (ptrdiff_t c0 = 0; c0 < n; c0 += BN_BWD_TILE) { \
        const ptrdiff_t nc = n - c0 < BN_BWD_TILE ? n - c0 : BN_BWD_TILE; \
        const double *restrict w = w0 + c0; \
        double aw[BN_BWD_TILE] = {0}, ab[BN_BWD_TILE] = {0}; \
        for (ptrdiff_t k = 0; k < nrows; k++) { \
            const BN_T *dy = dy0 + k * ldg + c0, *x = x0 + k * ldx + c0; \
            BN_T *dx = dx0 + k * ldd + c0; \
            const double mean = rmean ? rmean[k] : 0.0, invstd = rinvstd[k]; \
            const double q = rq[k], r = rr[k]; \
            ROW_SETUP; \
            ptrdiff_t j = 0; \
            if (k + 4 < nrows) {   /* row k + 4's piece: dy and x, and dx for writing */ \
                const char *pg = (const char *)(dy + 4 * ldg), *px = (const char *)(x + 4 * ldx); \
                const char *pd = (const char *)(dx + 4 * ldd); \
                for (ptrdiff_t b = 0; b < (ptrdiff_t)(nc * sizeof(BN_T)); b += 64) { \
                    __builtin_prefetch(pg + b, 0, 3); \
                    __builtin_prefetch(px + b, 0, 3); \
                    __builtin_prefetch(pd + b, 1, 3); \
                } \
            } \
            for (; j + (W) <= nc; j += (W)) { \
                STEP(j); \
            } \
            for (; j < nc; j++) { \
                double g = (double)dy[j], u = (double)x[j] - mean; \
                BN_ROW_DXS(j); \
                aw[j] = BN_FMA(g * u, invstd, aw[j]); \
                ab[j] += g; \
            } \
        } \
        memcpy(dw + c0, aw, nc * sizeof(double)); \
        if (db) memcpy(db + c0, ab, nc * sizeof(double)); \
    }

/* Columns [0, n) of nrows rows of the layer/RMS norm backward, the rows' q and r known
 * (bn_row_bwd_sums): dx as bn_row_bwd (the same bits), and the column sums
 * dw[j] = sum(dy * xhat), db[j] = sum(dy) over the rows in order (db may be NULL), kept in
 * L1 for BN_BWD_TILE columns at a time. mean may be NULL (rms). dx may be dy. Each row's
 * piece fetches the piece four rows down (rows of 8 KiB and more: every piece in a page of
 * its own, which the prefetchers do not enter), dx's lines for writing: layer-norm
 * backward (64, 4096) 1.24x, (96, 4096) 1.34x, (32, 8192) 1.09x, 0.95-1.0x at 2048 values
 * (Xeon, 2 MiB L2s). */
static BN_CLONES void BN_NAME(bn_rows_bwd_tile)(const BN_T *dy0, const BN_T *x0, BN_T *dx0,
                                               ptrdiff_t nrows, ptrdiff_t n, ptrdiff_t ldg,
                                               ptrdiff_t ldx, ptrdiff_t ldd,
                                               const double *rmean, const double *rinvstd,
                                               const double *rq, const double *rr,
                                               const double *restrict w0, double *restrict dw,
                                               double *restrict db)
{
#define BN_TILE_SETUP4 \
        const bn_v4d m = {mean, mean, mean, mean}, s = {invstd, invstd, invstd, invstd}; \
        const bn_v4d vq = {q, q, q, q}, vr = {r, r, r, r}
#define BN_TILE_STEP4(j) do { \
        bn_v4d g = BN_LOAD4(dy + (j)), u = BN_LOAD4(x + (j)) - m, a, b; \
        BN_ROW_DXV((j), 0); \
        memcpy(&a, aw + (j), 32); \
        memcpy(&b, ab + (j), 32); \
        a = BN_FMA4(g * u, s, a); \
        b += g; \
        memcpy(aw + (j), &a, 32); \
        memcpy(ab + (j), &b, 32); \
    } while (0)
    BN_ROWS_BWD_TILE_FRAME(4, BN_TILE_SETUP4, BN_TILE_STEP4);
#undef BN_TILE_SETUP4
#undef BN_TILE_STEP4
}

#if BN_HAVE_V4
/* bn_row_bwd on eight lanes (see BN_HAVE_V4): the same operations on the same lanes, so
 * the same bits; the scalar tail and unaligned ends are bn_row_bwd's own code. */
#if BN_T_IS_FLOAT
#define BN_ZLOAD(p) _mm512_cvtps_pd(_mm256_loadu_ps(p))
#define BN_ZPUT(q, v, nt) do { __m256 o_ = _mm512_cvtpd_ps(v); \
        if (nt) _mm256_stream_ps((q), o_); else _mm256_storeu_ps((q), o_); } while (0)
#else
#define BN_ZLOAD(p) _mm512_loadu_pd(p)
#define BN_ZPUT(q, v, nt) do { if (nt) _mm512_stream_pd((q), (v)); \
        else _mm512_storeu_pd((q), (v)); } while (0)
#endif
#define BN_ROW_DXZ(j, nt) do { __m512d g_ = BN_ZLOAD(dy + (j)); \
        __m512d u_ = _mm512_sub_pd(BN_ZLOAD(x + (j)), zm); \
        __m512d w_ = _mm512_mul_pd(_mm512_loadu_pd(w + (j)), zs); \
        BN_ZPUT(dx + (j), _mm512_fmadd_pd(g_, w_, _mm512_fmadd_pd(u_, zq, zr)), nt); \
    } while (0)
/* BN_ROW_SUMS_STEP on eight lanes: g, u of values i..i+7 and the row sums sg, sx. */
#define BN_ROW_SUMS_STEP8(i) \
        __m512d g = BN_ZLOAD(dy + (i)), u = _mm512_sub_pd(BN_ZLOAD(x + (i)), zm); \
        __m512d wv = _mm512_loadu_pd(w + (i)); \
        __m512d t = _mm512_mul_pd(g, u); \
        sg = _mm512_fmadd_pd(g, wv, sg); \
        sx = _mm512_fmadd_pd(t, wv, sx)
static BN_V4 void BN_NAME(bn_row_bwd_v4)(const BN_T *restrict dy, const BN_T *restrict x,
                                        BN_T *restrict dx, ptrdiff_t d, double mean,
                                        double invstd, const double *restrict w,
                                        double *restrict dw, double *restrict db, int rms,
                                        int stream, const BN_T *fetch_dy, const BN_T *fetch_x)
{
    const __m512d zm = _mm512_set1_pd(mean), zs = _mm512_set1_pd(invstd);
    __m512d sg = _mm512_setzero_pd(), sx = _mm512_setzero_pd();
    double tg = 0, tx = 0, q, r;
    ptrdiff_t i = 0;
    for (; i + 8 <= d; i += 8) {
        BN_ROW_FETCH(i);
        BN_ROW_SUMS_STEP8(i);
        _mm512_storeu_pd(dw + i, _mm512_fmadd_pd(t, zs, _mm512_loadu_pd(dw + i)));
        if (db)
            _mm512_storeu_pd(db + i, _mm512_add_pd(_mm512_loadu_pd(db + i), g));
    }
    BN_ROW_BWD_TAIL(i);
    BN_ROW_FETCH_END;
    bn_row_bwd_qr(bn_v8d_total(sg) + tg, bn_v8d_total(sx) + tx, d, invstd, rms, &q, &r);
    const __m512d zq = _mm512_set1_pd(q), zr = _mm512_set1_pd(r);
    BN_SPAN_LOOP(dx, d, stream, 8, BN_ROW_DXS, BN_ROW_DXZ);
}

/* bn_row_bwd2 on eight lanes: the same operations, so the same bits. */
#define BN_ROW_DX_PASS8 do { \
        const __m512d zm = _mm512_set1_pd(mean), zs = _mm512_set1_pd(invstd); \
        const __m512d zq = _mm512_set1_pd(q), zr = _mm512_set1_pd(r); \
        BN_SPAN_LOOP(dx, d, stream, 8, BN_ROW_DXS, BN_ROW_DXZ); \
    } while (0)
static BN_V4 void BN_NAME(bn_row_bwd2_v4)BN_ROW_BWD2_PARAMS
{
    BN_ROW_BWD2_START;
    const __m512d zma = _mm512_set1_pd(ma), zmb = _mm512_set1_pd(mb);
    const __m512d zsa = _mm512_set1_pd(ia), zsb = _mm512_set1_pd(ib);
    __m512d sga = _mm512_setzero_pd(), sxa = _mm512_setzero_pd();
    __m512d sgb = _mm512_setzero_pd(), sxb = _mm512_setzero_pd();
    ptrdiff_t i = 0;
    for (; i + 8 <= d; i += 8) {
        BN_ROW2_FETCH(i);
        __m512d wv = _mm512_loadu_pd(w + i);
        __m512d g = BN_ZLOAD(dy + i), u = _mm512_sub_pd(BN_ZLOAD(x + i), zma);
        __m512d h = BN_ZLOAD(dyb + i), e = _mm512_sub_pd(BN_ZLOAD(xb + i), zmb);
        __m512d t = _mm512_mul_pd(g, u), c = _mm512_mul_pd(h, e);
        sga = _mm512_fmadd_pd(g, wv, sga);
        sxa = _mm512_fmadd_pd(t, wv, sxa);
        sgb = _mm512_fmadd_pd(h, wv, sgb);
        sxb = _mm512_fmadd_pd(c, wv, sxb);
        __m512d a = _mm512_fmadd_pd(t, zsa, _mm512_loadu_pd(dw + i));
        _mm512_storeu_pd(dw + i, _mm512_fmadd_pd(c, zsb, a));
        if (db)
            _mm512_storeu_pd(db + i, _mm512_add_pd(_mm512_add_pd(_mm512_loadu_pd(db + i), g),
                                                   h));
    }
    BN_ROW_BWD2_FINISH(bn_v8d_total(sga), bn_v8d_total(sxa), bn_v8d_total(sgb),
                       bn_v8d_total(sxb), BN_ROW_DX_PASS8);
}
#undef BN_ROW_DX_PASS8

/* bn_row_bwd_sums on eight lanes: the same sums, so the same q and r. */
static BN_V4 void BN_NAME(bn_row_bwd_sums_v4)(const BN_T *restrict dy, const BN_T *restrict x,
                                             ptrdiff_t d, double mean, double invstd,
                                             const double *restrict w, int rms, double *q,
                                             double *r)
{
    const __m512d zm = _mm512_set1_pd(mean);
    __m512d sg = _mm512_setzero_pd(), sx = _mm512_setzero_pd();
    double tg = 0, tx = 0;
    ptrdiff_t i = 0;
    for (; i + 8 <= d; i += 8) {
        BN_ROW_SUMS_STEP8(i);
    }
    BN_ROW_SUMS_TAIL(i);
    bn_row_bwd_qr(bn_v8d_total(sg) + tg, bn_v8d_total(sx) + tx, d, invstd, rms, q, r);
}

/* bn_rows_bwd_tile on eight lanes: the same operations, so the same bits. */
static BN_V4 void BN_NAME(bn_rows_bwd_tile_v4)(const BN_T *dy0, const BN_T *x0, BN_T *dx0,
                                              ptrdiff_t nrows, ptrdiff_t n, ptrdiff_t ldg,
                                              ptrdiff_t ldx, ptrdiff_t ldd,
                                              const double *rmean, const double *rinvstd,
                                              const double *rq, const double *rr,
                                              const double *restrict w0, double *restrict dw,
                                              double *restrict db)
{
#define BN_TILE_SETUP8 \
        const __m512d zm = _mm512_set1_pd(mean), zs = _mm512_set1_pd(invstd); \
        const __m512d zq = _mm512_set1_pd(q), zr = _mm512_set1_pd(r)
#define BN_TILE_STEP8(j) do { \
        __m512d g = BN_ZLOAD(dy + (j)), u = _mm512_sub_pd(BN_ZLOAD(x + (j)), zm); \
        BN_ROW_DXZ((j), 0); \
        _mm512_storeu_pd(aw + (j), _mm512_fmadd_pd(_mm512_mul_pd(g, u), zs, \
                                                   _mm512_loadu_pd(aw + (j)))); \
        _mm512_storeu_pd(ab + (j), _mm512_add_pd(_mm512_loadu_pd(ab + (j)), g)); \
    } while (0)
    BN_ROWS_BWD_TILE_FRAME(8, BN_TILE_SETUP8, BN_TILE_STEP8);
#undef BN_TILE_SETUP8
#undef BN_TILE_STEP8
}
#undef BN_ROW_DXZ
#undef BN_ROW_SUMS_STEP8
#undef BN_ZLOAD
#undef BN_ZPUT
#endif

#undef BN_ROW_SUMS_STEP
#undef BN_ROW_SUMS_TAIL
#undef BN_ROW_FETCH
#undef BN_ROW_FETCH_END
#undef BN_ROW2_FETCH
#undef BN_ROW2_FETCH_END
#undef BN_ROW2_TAIL
#undef BN_ROW_DX_PASS4
#undef BN_ROW_BWD2_PARAMS
#undef BN_ROW_BWD2_START
#undef BN_ROW_BWD2_FINISH
#undef BN_ROW_BWD_TAIL
#undef BN_ROWS_BWD_TILE_FRAME
#undef BN_ROW_DX
#undef BN_ROW_DXV
#undef BN_ROW_DXS

#undef BN_LOAD4
#undef BN_PUT4
#undef BN_STORE4
#undef BN_NAME
#undef BN_CAT
#undef BN_CAT_
