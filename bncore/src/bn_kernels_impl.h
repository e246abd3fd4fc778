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

/* acc[j] += x[i] over a contiguous run, lane j = i mod BN_LANES. */
BN_INLINE void BN_NAME(bn_lanes_sum)(const BN_T *x, ptrdiff_t n, double *acc)
{
    ptrdiff_t i = 0;
    for (; i + BN_LANES <= n; i += BN_LANES)
        for (int j = 0; j < BN_LANES; j++) acc[j] += (double)x[i + j];
    for (int j = 0; i < n; i++, j++) acc[j] += (double)x[i];
}

/* sd[j] += d, sdd[j] += d*d with d = x[i] - m. */
BN_INLINE void BN_NAME(bn_lanes_dev)(const BN_T *x, ptrdiff_t n, double m, double *sd,
                                     double *sdd)
{
    ptrdiff_t i = 0;
    for (; i + BN_LANES <= n; i += BN_LANES)
        for (int j = 0; j < BN_LANES; j++) {
            double d = (double)x[i + j] - m;
            sd[j] += d;
            sdd[j] += d * d;
        }
    for (int j = 0; i < n; i++, j++) {
        double d = (double)x[i] - m;
        sd[j] += d;
        sdd[j] += d * d;
    }
}

/* IN: nseg segments of len values, stride elements apart. OUT: their mean and M2. */
static BN_CLONES void BN_NAME(bn_seg_moments)(const BN_T *x, ptrdiff_t nseg, ptrdiff_t len,
                                             ptrdiff_t stride, double *mean, double *m2)
{
    double acc[BN_LANES] = {0}, sd[BN_LANES] = {0}, sdd[BN_LANES] = {0};
    double n = (double)nseg * (double)len;
    if (n == 0) { *mean = 0; *m2 = 0; return; }
    for (ptrdiff_t s = 0; s < nseg; s++) BN_NAME(bn_lanes_sum)(x + s * stride, len, acc);
    double mean0 = bn_lanes_total(acc) / n;
    for (ptrdiff_t s = 0; s < nseg; s++)
        BN_NAME(bn_lanes_dev)(x + s * stride, len, mean0, sd, sdd);
    bn_finish_block(n, mean0, bn_lanes_total(sd), bn_lanes_total(sdd), mean, m2);
}

/* IN: nseg segments as above. OUT: sum of squares (RMS norm). */
static BN_CLONES double BN_NAME(bn_seg_sumsq)(const BN_T *x, ptrdiff_t nseg, ptrdiff_t len,
                                             ptrdiff_t stride)
{
    double acc[BN_LANES] = {0};
    for (ptrdiff_t s = 0; s < nseg; s++) {
        const BN_T *p = x + s * stride;
        ptrdiff_t i = 0;
        for (; i + BN_LANES <= len; i += BN_LANES)
            for (int j = 0; j < BN_LANES; j++) acc[j] += (double)p[i + j] * (double)p[i + j];
        for (int j = 0; i < len; i++, j++) acc[j] += (double)p[i] * (double)p[i];
    }
    return bn_lanes_total(acc);
}

/* y = (x - mean) * scale + shift over n contiguous values. Subtracting first keeps full
 * precision at large offsets and maps x == mean to exactly shift. */
static BN_CLONES void BN_NAME(bn_affine)(const BN_T *restrict x, BN_T *restrict y, ptrdiff_t n,
                                        double mean, double scale, double shift)
{
    for (ptrdiff_t i = 0; i < n; i++) y[i] = (BN_T)(((double)x[i] - mean) * scale + shift);
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

/* IN: dy, x, n values of one channel, its mean. OUT (accumulated): sum(dy), sum(dy*(x-mean)). */
static BN_CLONES void BN_NAME(bn_bwd_sums)(const BN_T *dy, const BN_T *x, ptrdiff_t n,
                                          double mean, double *sum_dy, double *sum_dy_xmu)
{
    double a[BN_LANES] = {0}, b[BN_LANES] = {0};
    ptrdiff_t i = 0;
    for (; i + BN_LANES <= n; i += BN_LANES)
        for (int j = 0; j < BN_LANES; j++) {
            double g = (double)dy[i + j];
            a[j] += g;
            b[j] += g * ((double)x[i + j] - mean);
        }
    for (int j = 0; i < n; i++, j++) {
        double g = (double)dy[i];
        a[j] += g;
        b[j] += g * ((double)x[i] - mean);
    }
    *sum_dy += bn_lanes_total(a);
    *sum_dy_xmu += bn_lanes_total(b);
}

/* dx = k*dy + q*(x - mean) + r over n contiguous values (batch-norm training backward). */
static BN_CLONES void BN_NAME(bn_bwd_dx)(const BN_T *restrict dy, const BN_T *restrict x,
                                        BN_T *restrict dx, ptrdiff_t n, double mean, double k,
                                        double q, double r)
{
    for (ptrdiff_t i = 0; i < n; i++)
        dx[i] = (BN_T)(k * (double)dy[i] + q * ((double)x[i] - mean) + r);
}

/* ------------------------------------------------------------- rows of channels (cl) */

/* IN: nrows rows of nch channels, ld apart; work: 3*nch doubles of scratch.
 * OUT: per-channel mean[c] and m2[c] of the block (corrected two-pass). */
static BN_CLONES void BN_NAME(bn_cl_moments)(const BN_T *x, ptrdiff_t nrows, ptrdiff_t nch,
                                            ptrdiff_t ld, double *restrict work,
                                            double *restrict mean, double *restrict m2)
{
    double *restrict s = work, *restrict sd = work + nch, *restrict sdd = work + 2 * nch;
    double n = (double)nrows;
    for (ptrdiff_t c = 0; c < nch; c++) { s[c] = 0; sd[c] = 0; sdd[c] = 0; }
    for (ptrdiff_t r = 0; r < nrows; r++) {
        const BN_T *restrict p = x + r * ld;
        for (ptrdiff_t c = 0; c < nch; c++) s[c] += (double)p[c];
    }
    for (ptrdiff_t c = 0; c < nch; c++) s[c] /= n;
    for (ptrdiff_t r = 0; r < nrows; r++) {
        const BN_T *restrict p = x + r * ld;
        for (ptrdiff_t c = 0; c < nch; c++) {
            double d = (double)p[c] - s[c];
            sd[c] += d;
            sdd[c] += d * d;
        }
    }
    for (ptrdiff_t c = 0; c < nch; c++)
        bn_finish_block(n, s[c], sd[c], sdd[c], &mean[c], &m2[c]);
}

/* y[r, c] = (x[r, c] - mean[c]) * scale[c] + shift[c]. */
static BN_CLONES void BN_NAME(bn_cl_affine)(const BN_T *x, ptrdiff_t ldx, BN_T *y, ptrdiff_t ldy,
                                           ptrdiff_t nrows, ptrdiff_t nch,
                                           const double *restrict mean,
                                           const double *restrict scale,
                                           const double *restrict shift)
{
    for (ptrdiff_t r = 0; r < nrows; r++) {
        const BN_T *restrict p = x + r * ldx;
        BN_T *restrict q = y + r * ldy;
        for (ptrdiff_t c = 0; c < nch; c++)
            q[c] = (BN_T)(((double)p[c] - mean[c]) * scale[c] + shift[c]);
    }
}

/* Accumulate per channel: sum_dy[c] += dy[r, c]; sum_dy_xmu[c] += dy[r, c]*(x[r, c]-mean[c]). */
static BN_CLONES void BN_NAME(bn_cl_bwd_sums)(const BN_T *dy, ptrdiff_t lddy, const BN_T *x,
                                             ptrdiff_t ldx, ptrdiff_t nrows, ptrdiff_t nch,
                                             const double *restrict mean,
                                             double *restrict sum_dy,
                                             double *restrict sum_dy_xmu)
{
    for (ptrdiff_t r = 0; r < nrows; r++) {
        const BN_T *restrict g = dy + r * lddy;
        const BN_T *restrict p = x + r * ldx;
        for (ptrdiff_t c = 0; c < nch; c++) {
            double gc = (double)g[c];
            sum_dy[c] += gc;
            sum_dy_xmu[c] += gc * ((double)p[c] - mean[c]);
        }
    }
}

/* dx[r, c] = k[c]*dy[r, c] + q[c]*(x[r, c] - mean[c]) + r_[c]. */
static BN_CLONES void BN_NAME(bn_cl_bwd_dx)(const BN_T *dy, ptrdiff_t lddy, const BN_T *x,
                                           ptrdiff_t ldx, BN_T *dx, ptrdiff_t lddx,
                                           ptrdiff_t nrows, ptrdiff_t nch,
                                           const double *restrict mean,
                                           const double *restrict k,
                                           const double *restrict q,
                                           const double *restrict r_)
{
    for (ptrdiff_t r = 0; r < nrows; r++) {
        const BN_T *restrict g = dy + r * lddy;
        const BN_T *restrict p = x + r * ldx;
        BN_T *restrict o = dx + r * lddx;
        for (ptrdiff_t c = 0; c < nch; c++)
            o[c] = (BN_T)(k[c] * (double)g[c] + q[c] * ((double)p[c] - mean[c]) + r_[c]);
    }
}

#undef BN_NAME
#undef BN_CAT
#undef BN_CAT_
