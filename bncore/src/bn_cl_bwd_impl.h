/*
 * The channels-last batch-norm backward kernels (bn_cl_bwd_sums, bn_cl_bwd_dx), included
 * by bn_kernels_impl.h for float and double (from BN_T) and, in the float instance, once
 * more for float16 (bn_half_fused: the _h16 twins, F16C loads and stores), so that the
 * float16 kernels run the float ones' row blocks, tiles, lanes and arithmetic: their bits,
 * rounded. The includer defines:
 *   BN_E           the element type (float, double or uint16_t)
 *   BN_CLN(name)   the instance's name for name
 *   BN_CLFN        the attributes of its entry points (BN_CLONES, or x86-64-v3 for _h16)
 *   BN_CLINL       those of its inline helpers
 *   BN_CLD4(p)     four elements at p as doubles; BN_CLD1(v) one element as a double
 *   BN_CLPUT4(q, v, nt)  four doubles stored at q (streaming when nt, where it can)
 *   BN_CLSET1(o, v)      one double stored into the element o
 *   BN_CLSZ        the element size that sets the row blocks of the sums (sizeof(float)
 *                  for float16: the float kernel's blocks, and so its bits)
 * and this file undefines them at its end.
 */
/* Accumulate per channel: sum_dy[c] += dy[r, c]; sum_dy_xmu[c] += dy[r, c]*(x[r, c]-mean[c]).
 * Blocks of rows (16 KiB of each array) are walked by tiles of 32 channels (16 register
 * accumulators) from L1, while the next block of both arrays is prefetched in address
 * order (when their rows are contiguous), as in the float moments kernel. */
BN_CLINL void BN_CLN(bn_cl_bwd_tile)(const BN_E *dy, ptrdiff_t lddy, const BN_E *x,
                                     ptrdiff_t ldx, ptrdiff_t nrows, int nv,
                                     const double *restrict mean, double *restrict sum_dy,
                                     double *restrict sum_dy_xmu, const char **pg,
                                     const char *eg, const char **px, const char *ex)
{
    bn_v4d a[8] = {{0}}, b[8] = {{0}}, m[8], t;
    memcpy(m, mean, (size_t)nv * sizeof(bn_v4d));
    for (ptrdiff_t r = 0; r < nrows; r++) {
        bn_prefetch_step(pg, eg);
        bn_prefetch_step(px, ex);
#pragma GCC unroll 8
        for (int j = 0; j < nv; j++) {   /* unrolled: the accumulators stay in registers */
            bn_v4d g = BN_CLD4(dy + r * lddy + 4 * j), u = BN_CLD4(x + r * ldx + 4 * j) - m[j];
            bn_v4d bj = b[j];
            a[j] += g;
            b[j] = BN_FMA4(g, u, bj);
        }
    }
    for (int j = 0; j < nv; j++) {
        memcpy(&t, sum_dy + 4 * j, 32); t += a[j]; memcpy(sum_dy + 4 * j, &t, 32);
        memcpy(&t, sum_dy_xmu + 4 * j, 32); t += b[j]; memcpy(sum_dy_xmu + 4 * j, &t, 32);
    }
}

/* width: the channels of the rows whose blocks are walked (nch, or more when the call takes
 * the channels of a tile of them): it sets the row blocks, and so the bits of each channel's
 * sums, which are then the same whichever tile of 32 channels (c = 0 mod 32) a call starts
 * at. */
static BN_CLFN void BN_CLN(bn_cl_bwd_sums)(const BN_E *dy, ptrdiff_t lddy, const BN_E *x,
                                           ptrdiff_t ldx, ptrdiff_t nrows, ptrdiff_t nch,
                                           ptrdiff_t width, const double *restrict mean,
                                           double *restrict sum_dy,
                                           double *restrict sum_dy_xmu, int far)
{
    ptrdiff_t rb = 16384 / (width * BN_CLSZ);
    int contiguous = lddy == nch && ldx == nch;
    /* blocks of 16 KiB of each array, at least 4 rows beyond the caches (far): wider rows
     * in blocks of 16 put 256 KiB of dy and x in L2 at 2048 channels with as much again
     * prefetched. Over 16 rows (in-process A/B, 21 rounds): backward (64,7,7,2048) 1.13x,
     * (32,7,7,4096) 1.14x, (16,7,7,2048) 1.09x, (128,7,7,1024) 1.04x, (256,7,7,512) 1.03x.
     * In cache at least 16 rows, each tile's sums loaded and stored once per 16 rows:
     * (1024,1024) 1.13x, (64,1024) 1.12x, (16,7,7,1024) 1.06x, (32,2048) 1.04x */
    if (rb < (far ? 4 : 16)) rb = far ? 4 : 16;
    for (ptrdiff_t r0 = 0; r0 < nrows; r0 += rb) {
        ptrdiff_t nr = nrows - r0 < rb ? nrows - r0 : rb, nn = nrows - r0 - nr, c = 0;
        const char *pg = NULL, *eg = NULL, *px = NULL, *ex = NULL;
        if (contiguous && nn > 0) {
            size_t bytes = (size_t)((nn < rb ? nn : rb) * nch) * sizeof(BN_E);
            pg = (const char *)(dy + (r0 + nr) * lddy);
            px = (const char *)(x + (r0 + nr) * ldx);
            eg = pg + bytes;
            ex = px + bytes;
        }
        for (; c + 32 <= nch; c += 32)
            BN_CLN(bn_cl_bwd_tile)(dy + r0 * lddy + c, lddy, x + r0 * ldx + c, ldx, nr, 8,
                                   mean + c, sum_dy + c, sum_dy_xmu + c, &pg, eg, &px, ex);
        for (; c + 4 <= nch; c += 4)
            BN_CLN(bn_cl_bwd_tile)(dy + r0 * lddy + c, lddy, x + r0 * ldx + c, ldx, nr, 1,
                                   mean + c, sum_dy + c, sum_dy_xmu + c, &pg, eg, &px, ex);
        for (; c < nch; c++)
            for (ptrdiff_t r = r0; r < r0 + nr; r++) {
                double g = BN_CLD1(dy[r * lddy + c]);
                sum_dy[c] += g;
                sum_dy_xmu[c] = BN_FMA(g, BN_CLD1(x[r * ldx + c]) - mean[c], sum_dy_xmu[c]);
            }
    }
}

/* dx[r, c] = k[c]*dy[r, c] + q[c]*(x[r, c] - mean[c]) + r_[c]. Tiles of up to
 * BN_CL_DX_TILE channels: the tile's four coefficients are packed per group of four
 * channels (one stream of loads instead of four pointers, which GCC kept reloading from
 * the stack), then the rows of the tile are walked two at a time, each coefficient load
 * serving both (loads were the limit: six per four values). With stream set, rows go one
 * at a time and the whole output lines of a row whose tile segment is 16-byte aligned
 * (32 for double: groups of four then never straddle a line) are written with streaming
 * stores; the same bits either way. 0.45 -> 0.32 ns/value at 2048 channels, 0.35 -> 0.27
 * at 64, one thread in cache. */
#define BN_CL_DX_TILE 256
#define BN_CL_DXV(o, g, p, j, nt) do { bn_v4d m_, k_, q_, r2_, g_ = BN_CLD4((g) + (j)), \
        u_ = BN_CLD4((p) + (j)); const double *c_ = co + 4 * (j); \
        memcpy(&m_, c_, 32); memcpy(&k_, c_ + 4, 32); memcpy(&q_, c_ + 8, 32); \
        memcpy(&r2_, c_ + 12, 32); u_ = u_ - m_; u_ = BN_FMA4(q_, u_, r2_); \
        BN_CLPUT4((o) + (j), BN_FMA4(k_, g_, u_), nt); } while (0)
#define BN_CL_DXS(o, g, p, j) BN_CLSET1((o)[j], BN_FMA(k[c0 + (j)], BN_CLD1((g)[j]), \
        BN_FMA(q[c0 + (j)], BN_CLD1((p)[j]) - mean[c0 + (j)], r_[c0 + (j)])))
/* Pack the coefficients of channels [c0, c0 + w4) (w4 a multiple of 4) into co. */
BN_CLINL void BN_CLN(bn_cl_dx_pack)(double *restrict co, ptrdiff_t c0, ptrdiff_t w4,
                                    const double *restrict mean, const double *restrict k,
                                    const double *restrict q, const double *restrict r_)
{
    for (ptrdiff_t j = 0; j < w4; j += 4) {
        memcpy(co + 4 * j, mean + c0 + j, 32);
        memcpy(co + 4 * j + 4, k + c0 + j, 32);
        memcpy(co + 4 * j + 8, q + c0 + j, 32);
        memcpy(co + 4 * j + 12, r_ + c0 + j, 32);
    }
}

/* Rows [0, nrows) of the tile of channels [c0, c0 + w), its coefficients packed in co. */
BN_CLINL void BN_CLN(bn_cl_dx_tile)(const BN_E *dy, ptrdiff_t lddy, const BN_E *x,
                                    ptrdiff_t ldx, BN_E *dx, ptrdiff_t lddx,
                                    ptrdiff_t nrows, ptrdiff_t c0, ptrdiff_t w,
                                    const double *restrict co,
                                    const double *restrict mean, const double *restrict k,
                                    const double *restrict q, const double *restrict r_,
                                    int stream)
{
    const uintptr_t align = sizeof(BN_E) == 4 ? 15 : 31;
    const ptrdiff_t w4 = w & ~(ptrdiff_t)3;
    ptrdiff_t row = 0;
    if (!stream)
        for (; row + 2 <= nrows; row += 2) {
            const BN_E *g = dy + row * lddy + c0, *p = x + row * ldx + c0;
            const BN_E *g2 = g + lddy, *p2 = p + ldx;
            BN_E *o = dx + row * lddx + c0, *o2 = o + lddx;
            for (ptrdiff_t j = 0; j < w4; j += 4) {
                BN_CL_DXV(o, g, p, j, 0);
                BN_CL_DXV(o2, g2, p2, j, 0);
            }
            for (ptrdiff_t j = w4; j < w; j++) {
                BN_CL_DXS(o, g, p, j);
                BN_CL_DXS(o2, g2, p2, j);
            }
        }
    for (; row < nrows; row++) {
        const BN_E *g = dy + row * lddy + c0, *p = x + row * ldx + c0;
        BN_E *o = dx + row * lddx + c0;
        ptrdiff_t lo = 0, hi = 0, j = 0;
        if (stream && !((uintptr_t)o & align))
            bn_stream_span(o, w4, sizeof(BN_E), 1, &lo, &hi);
        for (; j < lo; j += 4) BN_CL_DXV(o, g, p, j, 0);
        for (; j < hi; j += 4) BN_CL_DXV(o, g, p, j, 1);
        for (; j < w4; j += 4) BN_CL_DXV(o, g, p, j, 0);
        for (; j < w; j++) BN_CL_DXS(o, g, p, j);
    }
}

/* Rows wider than a tile are walked whole, tile after tile, every tile's coefficients
 * packed once per call (in a heap buffer; without one, per tile over all the rows): two
 * rows at a time from the caches (a coefficient load serves both), one at a time with
 * stream or far set (the rows beyond the caches), so that dy, x and dx are each read or
 * written in address order, the order the hardware prefetchers follow. History, in-process
 * A/B: one tile over all of a chunk's rows at a time fetched the rest of each row with it
 * and lost it before its tile's turn; blocks of 128 KiB of rows walked tile by tile were
 * 1.06-1.21x faster ((256,7,7,512) 1.15-1.21x), and whole rows faster again, over 31-51
 * rounds: one row at a time (256,7,7,512) 1.4-1.5x, (32,28,28,512) 1.25x, (64,7,7,1001)
 * 1.3x, and from 16 to 32 MiB of dy, x and dx (128,7,7,300) 1.16x, (64,7,7,512) 1.22x,
 * (96,7,7,400) 1.22x, where pairs of rows gave 0.9-1.09x; in cache pairs of rows (8,7,7,1024)
 * 0.98x and (16,7,7,2048) 1.18x, where single rows gave 0.88x and 1.07x. Same bits. */
static BN_CLFN void BN_CLN(bn_cl_bwd_dx)(const BN_E *dy, ptrdiff_t lddy, const BN_E *x,
                                         ptrdiff_t ldx, BN_E *dx, ptrdiff_t lddx,
                                         ptrdiff_t nrows, ptrdiff_t nch,
                                         const double *restrict mean,
                                         const double *restrict k,
                                         const double *restrict q,
                                         const double *restrict r_, int stream, int far)
{
    double cot[4 * BN_CL_DX_TILE] __attribute__((aligned(32)));
    double *all = NULL;
    ptrdiff_t rb = nrows;
    if (nch > BN_CL_DX_TILE) {
        all = (double *)aligned_alloc(32, (size_t)nch * 32);
        if (all != NULL) {
            BN_CLN(bn_cl_dx_pack)(all, 0, nch & ~(ptrdiff_t)3, mean, k, q, r_);
            rb = stream || far ? 1 : 2;
        }
    }
    for (ptrdiff_t r0 = 0; r0 < nrows; r0 += rb) {
        const ptrdiff_t nr = nrows - r0 < rb ? nrows - r0 : rb;
        for (ptrdiff_t c0 = 0; c0 < nch; c0 += BN_CL_DX_TILE) {
            const ptrdiff_t w = nch - c0 < BN_CL_DX_TILE ? nch - c0 : BN_CL_DX_TILE;
            const double *co = cot;
            if (all != NULL)
                co = all + 4 * c0;
            else
                BN_CLN(bn_cl_dx_pack)(cot, c0, w & ~(ptrdiff_t)3, mean, k, q, r_);
            BN_CLN(bn_cl_dx_tile)(dy + r0 * lddy, lddy, x + r0 * ldx, ldx, dx + r0 * lddx,
                                  lddx, nr, c0, w, co, mean, k, q, r_, stream);
        }
    }
    free(all);
}
#undef BN_CL_DXV
#undef BN_CL_DXS
#undef BN_CL_DX_TILE

#undef BN_E
#undef BN_CLN
#undef BN_CLFN
#undef BN_CLINL
#undef BN_CLD4
#undef BN_CLD1
#undef BN_CLPUT4
#undef BN_CLSET1
#undef BN_CLSZ
