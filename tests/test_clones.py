"""The two target_clones of each kernel give the same bits (README: "bitwise identical ...
across machines").

The build compiles every kernel twice, for x86-64-v3 (AVX2+FMA) and the baseline, and the
loader picks one per machine. The compiler fuses nothing (-ffp-contract=off); the kernels'
own fused multiply-adds (BN_FMA4) are vfmadd in the v3 clone and libm's fma() in the
baseline, which must round alike. This compiles a small C program against the kernel
header that calls both clones of the kernels with fused multiply-adds (and two without)
on the same data, odd lengths, offsets and streaming on and off, and compares their
outputs byte for byte. It needs the C compiler the build used and a CPU with AVX2+FMA
(every CI machine: the suite fails, not skips, without them). The same program checks
one property the thread split relies on below the Python layer, where the float32
outputs would round it away: a channels-last sums call over a tile of channels gives the
sums of the call over all of them; and the column-tile path of the layer/RMS norm backward
gives the bits of the row path's one chunk (dx, and the double column sums); and the fused
small-channel batch-norm backward gives the bits of its three steps. Where the CPU
has AVX-512 (x86-64-v4), it also checks the layer/RMS norm backward's AVX-512 twins
(bn_*_v4, chosen at run time) against the baseline clone, byte for byte.
"""
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

SRC = pathlib.Path(__file__).resolve().parent.parent / "bncore" / "src"

HARNESS = r"""
#define BNCORE_TARGET_CLONES 1
#include "bn_kernels.h"
#include <stdio.h>
#include <stdlib.h>

#define BOTH(ret, name, params) \
    ret name##_d params __asm__(#name ".default"); \
    ret name##_v params __asm__(#name ".arch_x86_64_v3");
BOTH(void, bn_row_bwd_f32, (const float *, const float *, float *, ptrdiff_t, double, double,
                            const double *, double *, double *, int, int, const float *,
                            const float *))
BOTH(void, bn_row_bwd_f64, (const double *, const double *, double *, ptrdiff_t, double,
                            double, const double *, double *, double *, int, int,
                            const double *, const double *))
BOTH(void, bn_seg_bwd_dx_f32, (const float *, const float *, float *, ptrdiff_t, ptrdiff_t,
                               ptrdiff_t, ptrdiff_t, ptrdiff_t, double, double, double,
                               double, int))
BOTH(void, bn_seg_bwd_sums_f32, (const float *, const float *, ptrdiff_t, ptrdiff_t,
                                 ptrdiff_t, ptrdiff_t, double, double *, double *,
                                 ptrdiff_t))
BOTH(void, bn_seg_moments_f32, (const float *, ptrdiff_t, ptrdiff_t, ptrdiff_t, double,
                                double *, double *))
BOTH(void, bn_seg_moments_f64, (const double *, ptrdiff_t, ptrdiff_t, ptrdiff_t, double,
                                double *, double *))
BOTH(void, bn_run_moments_f32, (const float *, ptrdiff_t, ptrdiff_t, ptrdiff_t, double *,
                                double *, double *))
BOTH(void, bn_cl_bwd_sums_f32, (const float *, ptrdiff_t, const float *, ptrdiff_t,
                                ptrdiff_t, ptrdiff_t, ptrdiff_t, const double *, double *,
                                double *, int))
BOTH(void, bn_group_blocks_f32, (const float *, float *, ptrdiff_t, ptrdiff_t, ptrdiff_t,
                                 ptrdiff_t, ptrdiff_t, double, const double *,
                                 const double *, double *, double *, int))
BOTH(void, bn_group_blocks_bwd_f32, (const float *, const float *, float *, ptrdiff_t,
                                     ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t,
                                     const double *, const double *, const double *,
                                     double *, double *, int))
BOTH(void, bn_cl_bwd_dx_f32, (const float *, ptrdiff_t, const float *, ptrdiff_t, float *,
                              ptrdiff_t, ptrdiff_t, ptrdiff_t, const double *,
                              const double *, const double *, const double *, int, int))
BOTH(void, bn_rows_norm_f32, (const float *, float *, ptrdiff_t, ptrdiff_t, ptrdiff_t,
                              ptrdiff_t, ptrdiff_t, double, const float *, const float *,
                              double *, double *, int, int))
BOTH(void, bn_seg_affine_f32, (const float *, float *, ptrdiff_t, ptrdiff_t, ptrdiff_t,
                               ptrdiff_t, double, double, double))
BOTH(void, bn_planes_affine_f32, (const float *, float *, ptrdiff_t, ptrdiff_t, ptrdiff_t,
                                  ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t,
                                  const double *, const double *, const double *,
                                  const double *, int))
BOTH(void, bn_planes_affine_f64, (const double *, double *, ptrdiff_t, ptrdiff_t, ptrdiff_t,
                                  ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t,
                                  const double *, const double *, const double *,
                                  const double *, int))
BOTH(void, bn_cl_moments_shift_f64, (const double *, ptrdiff_t, ptrdiff_t, ptrdiff_t,
                                     const double *, const double *, const double *,
                                     ptrdiff_t, ptrdiff_t, ptrdiff_t, double *, double *))
BOTH(int, bn_shift_moments_f64, (const double *, ptrdiff_t, ptrdiff_t, ptrdiff_t, double,
                                 double *, double *))
BOTH(void, bn_row_bwd_sums_f32, (const float *, const float *, ptrdiff_t, double, double,
                                 const double *, int, double *, double *))
BOTH(void, bn_rows_bwd_tile_f32, (const float *, const float *, float *, ptrdiff_t,
                                  ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, const double *,
                                  const double *, const double *, const double *,
                                  const double *, double *, double *))
BOTH(void, bn_row_bwd2_f32, (const float *, const float *, float *, ptrdiff_t, ptrdiff_t,
                             ptrdiff_t, ptrdiff_t, const double *, const double *,
                             const double *, double *, double *, int, int, const float *,
                             const float *))
BOTH(void, bn_row_bwd2_f64, (const double *, const double *, double *, ptrdiff_t, ptrdiff_t,
                             ptrdiff_t, ptrdiff_t, const double *, const double *,
                             const double *, double *, double *, int, int, const double *,
                             const double *))
BOTH(void, bn_row_bwd_sums_f64, (const double *, const double *, ptrdiff_t, double, double,
                                 const double *, int, double *, double *))
BOTH(void, bn_rows_bwd_tile_f64, (const double *, const double *, double *, ptrdiff_t,
                                  ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, const double *,
                                  const double *, const double *, const double *,
                                  const double *, double *, double *))
BOTH(void, bn_seg_bwd_fused_f32, (const float *, const float *, float *, ptrdiff_t, ptrdiff_t,
                                  ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t,
                                  ptrdiff_t, ptrdiff_t, const double *, const double *,
                                  const double *, double, int, double *, double *))

enum { N = 4099, R = 37, C = 45 };
static float xf[N + 64], gf[N + 64], of[2][2 * N];
static double xd[N + 64], gd[N + 64], od[2][N + 64], w[N + 64], a[2][4 * N + 64];
static double pm[8], pinv[8];   /* the planes affine's per-channel mean and invstd */
static int bad;

static void same(const void *p, const void *q, size_t n, const char *what)
{
    if (memcmp(p, q, n)) { printf("MISMATCH %s\n", what); bad++; }
}

int main(void)
{
    srand(11);
    for (int i = 0; i < N + 64; i++) {
        xf[i] = (float)(1e3 + (double)rand() / RAND_MAX);
        gf[i] = (float)((double)rand() / RAND_MAX - 0.5);
        xd[i] = xf[i] * (1 + 1e-9 * i);
        gd[i] = gf[i];
        w[i] = 0.25 + 1e-3 * (i % 97);
    }
    for (int c = 0; c < 8; c++) {
        pm[c] = 1e3 + 0.5 + 0.01 * c;
        pinv[c] = 3.3 - 0.2 * c;
    }
    /* force the dispatchers (and so both clones) to be emitted */
    bn_row_bwd_f32(gf, xf, of[0], 8, 0, 1, w, a[0], a[0] + 8, 0, 0, NULL, NULL);
    bn_row_bwd_f64(gd, xd, od[0], 8, 0, 1, w, a[0], a[0] + 8, 0, 0, NULL, NULL);
    bn_seg_bwd_dx_f32(gf, xf, of[0], 1, 8, 0, 0, 0, 0, 1, 1, 1, 0);
    bn_seg_bwd_sums_f32(gf, xf, 1, 8, 0, 0, 0, a[0], a[0] + 1, 0);
    bn_seg_moments_f32(xf, 1, 8, 0, 0, a[0], a[0] + 1);
    bn_seg_moments_f64(xd, 1, 8, 0, 0, a[0], a[0] + 1);
    bn_run_moments_f32(xf, 1, 8, 0, a[0], a[0] + 1, a[0] + 2);
    bn_cl_bwd_sums_f32(gf, 4, xf, 4, 2, 4, 4, w, a[0], a[0] + 4, 0);
    bn_group_blocks_f32(xf, of[0], 0, 1, 1, 2, 4, 1e-5, NULL, NULL, a[0], a[0] + 1, 0);
    bn_group_blocks_bwd_f32(gf, xf, of[0], 0, 1, 1, 2, 4, w, w, NULL, a[0], a[0] + 2, 0);
    bn_cl_bwd_dx_f32(gf, 4, xf, 4, of[0], 4, 2, 4, w, w, w, w, 0, 0);
    bn_rows_norm_f32(xf, of[0], 2, 2, 4, 4, 4, 1e-5, NULL, NULL, a[0], a[0] + 2, 0, 0);
    bn_seg_affine_f32(xf, of[0], 1, 8, 0, 0, 0, 1, 0);
    bn_row_bwd_sums_f32(gf, xf, 8, 0, 1, w, 0, a[0], a[0] + 1);
    bn_planes_affine_f32(xf, of[0], 0, 1, 1, 8, 8, 8, 8, 8, pm, pinv, NULL, NULL, 0);
    bn_cl_moments_shift_f64(xd, 2, 1, 1, w, w, NULL, 0, 0, 0, a[0], a[0] + 1);
    bn_shift_moments_f64(xd, 1, 8, 0, 1e3, a[0], a[0] + 1);
    bn_planes_affine_f64(xd, od[0], 0, 1, 1, 8, 8, 8, 8, 8, pm, pinv, NULL, NULL, 0);
    bn_rows_bwd_tile_f32(gf, xf, of[0], 1, 8, 8, 8, 8, w, w, w, w, w, a[0], a[0] + 8);
    bn_row_bwd_sums_f64(gd, xd, 8, 0, 1, w, 0, a[0], a[0] + 1);
    bn_row_bwd2_f32(gf, xf, of[0], 8, 8, 8, 8, pm, pinv, w, a[0], a[0] + 8, 0, 0, NULL, NULL);
    bn_row_bwd2_f64(gd, xd, od[0], 8, 8, 8, 8, pm, pinv, w, a[0], a[0] + 8, 0, 0, NULL, NULL);
    bn_rows_bwd_tile_f64(gd, xd, od[0], 1, 8, 8, 8, 8, w, w, w, w, w, a[0], a[0] + 8);
    bn_seg_bwd_fused_f32(gf, xf, of[0], 1, 1, 8, 0, 0, 0, 8, 8, 8, pm, pinv, NULL, 0.125, 1,
                         a[0], a[0] + 1);
    for (int off = 0; off < 3; off++)
        for (int stream = 0; stream < 2; stream++) {
            const float *x = xf + off, *g = gf + 2 * off;
            for (int k = 0; k < 2; k++) {
                memset(of[k], 0, sizeof of[k]);
                memset(od[k], 0, sizeof od[k]);
                memset(a[k], 0, sizeof a[k]);
                for (int r = 0; r < 5; r++)
                    (k ? bn_row_bwd_f32_v : bn_row_bwd_f32_d)(
                        g + r * 771, x + r * 771, of[k] + off + r * 771, 771, 1e3 + 0.5, 3.3,
                        w, a[k], a[k] + 771, r & 1, stream, r < 4 ? g + (r + 1) * 771 : NULL,
                        r < 4 ? x + (r + 1) * 771 : NULL);
            }
            same(of[0], of[1], sizeof of[0], "bn_row_bwd_f32 dx");
            same(a[0], a[1], 2 * 771 * sizeof(double), "bn_row_bwd_f32 dw/db");
            for (int k = 0; k < 2; k++) {
                memset(od[k], 0, sizeof od[k]);
                memset(a[k], 0, sizeof a[k]);
                (k ? bn_row_bwd_f64_v : bn_row_bwd_f64_d)(gd + off, xd, od[k] + off, 1001,
                                                         1e3 + 0.5, 3.3, w, a[k], a[k] + 1001,
                                                         0, stream, gd + 1001, xd + 1001);
                memset(of[k], 0, sizeof of[k]);
                (k ? bn_seg_bwd_dx_f32_v : bn_seg_bwd_dx_f32_d)(g, x, of[k] + off, 3, 1001,
                                                               1003, 1002, 1001, 1e3 + 0.5,
                                                               0.7, -0.3, 0.01, stream);
                (k ? bn_seg_bwd_sums_f32_v : bn_seg_bwd_sums_f32_d)(g, x, 3, 1001, 1003, 1002,
                                                                   1e3 + 0.5, a[k] + 2100,
                                                                   a[k] + 2101, 1);
                (k ? bn_seg_moments_f32_v : bn_seg_moments_f32_d)(x, 3, 1001, 1002, 1e3,
                                                                 a[k] + 2102, a[k] + 2103);
                (k ? bn_seg_moments_f64_v : bn_seg_moments_f64_d)(xd + off, 3, 1001, 1002,
                                                                 1e3, a[k] + 2104,
                                                                 a[k] + 2105);
                (k ? bn_run_moments_f32_v : bn_run_moments_f32_d)(x, 3, 1001, 1002,
                                                                 a[k] + 2106, a[k] + 2107,
                                                                 a[k] + 2108);
                (k ? bn_cl_bwd_sums_f32_v : bn_cl_bwd_sums_f32_d)(g, C, x, C + 1, R, C, C, w,
                                                                 a[k] + 2200, a[k] + 2300,
                                                                 off == 1);
                /* small groups: 9 groups of 3 one-value channels, then of 3 x 7 values */
                (k ? bn_group_blocks_f32_v : bn_group_blocks_f32_d)(
                    x, of[k] + 6000 + off, 0, 9, 3, 3, 1, 1e-5, w, w + 5, a[k] + 2500,
                    a[k] + 2510, stream);
                (k ? bn_group_blocks_f32_v : bn_group_blocks_f32_d)(
                    x, of[k] + 6100 + off, 0, 9, 3, 3, 7, 1e-5, w, NULL, a[k] + 2520,
                    a[k] + 2530, stream);
                (k ? bn_group_blocks_bwd_f32_v : bn_group_blocks_bwd_f32_d)(
                    g, x, of[k] + 6400 + off, 0, 9, 3, 3, 1, a[k] + 2500, w + 20, w,
                    a[k] + 2600, a[k] + 2700, stream);
                (k ? bn_group_blocks_bwd_f32_v : bn_group_blocks_bwd_f32_d)(
                    g, x, of[k] + 6700 + off, 0, 9, 3, 3, 7, a[k] + 2520, w + 20, NULL,
                    a[k] + 2800, a[k] + 3000, stream);
                (k ? bn_cl_bwd_dx_f32_v : bn_cl_bwd_dx_f32_d)(g, C, x, C + 1,
                                                             of[k] + 3100 + off, C, R, C, w,
                                                             w + 1, w + 2, w + 3, stream,
                                                             off == 1);
                (k ? bn_rows_norm_f32_v : bn_rows_norm_f32_d)(x, of[k] + 5000 + off, 9, 9,
                                                             67, 67, 67, 1e-5, gf, NULL,
                                                             a[k] + 2400, a[k] + 2410, 0,
                                                             stream);
                (k ? bn_seg_affine_f32_v : bn_seg_affine_f32_d)(x, of[k] + 5700, 1, 150, 0,
                                                               0, 1e3 + 0.5, 3.3, 0.1);
                /* three rows of the layer-norm backward's column-tile path, 150 columns
                 * of rows 1001 apart: row sums, then one tile (means w + 30, invstds
                 * w + 40) */
                for (int r = 0; r < 3; r++)
                    (k ? bn_row_bwd_sums_f32_v : bn_row_bwd_sums_f32_d)(
                        g + r * 1001, x + r * 1001, 150, w[30 + r], w[40 + r], w, r == 2,
                        a[k] + 3200 + r, a[k] + 3210 + r);
                (k ? bn_rows_bwd_tile_f32_v : bn_rows_bwd_tile_f32_d)(
                    g, x, of[k] + 7000 + off, 3, 150, 1001, 1001, 300, w + 30, w + 40,
                    a[k] + 3200, a[k] + 3210, w + 50, a[k] + 3300, a[k] + 3500);
                /* 12 planes of 13 values from the third of 5 channels (the run path
                 * when streamed: vectors straddling planes), and of 3 values */
                (k ? bn_planes_affine_f32_v : bn_planes_affine_f32_d)(
                    x, of[k] + 7700 + off, 2, 12, 5, 13, 65, 13, 65, 13, pm, pinv, w + 7,
                    w + 60, stream);
                (k ? bn_planes_affine_f32_v : bn_planes_affine_f32_d)(
                    x, of[k] + 7900 + off, 1, 9, 5, 3, 15, 3, 15, 3, pm, pinv, NULL, NULL,
                    stream);
                /* channels-last float64 statistics, one pass around shifts near the
                 * means (pm: 1e3 + 0.5 + ...), 37 rows of 2 tiles and 3 channels */
                (k ? bn_cl_moments_shift_f64_v : bn_cl_moments_shift_f64_d)(
                    xd + off, R, 35, C, pm, w, xd, 64, 2, C, a[k] + 5000, a[k] + 5100);
                (k ? bn_shift_moments_f64_v : bn_shift_moments_f64_d)(
                    xd + off, R, 35, C, 1e3 + 0.5, a[k] + 5200, a[k] + 5201);
                (k ? bn_planes_affine_f64_v : bn_planes_affine_f64_d)(
                    xd + off, od[k] + 2000 + off, 2, 12, 5, 13, 65, 13, 65, 13, pm, pinv,
                    w + 7, NULL, stream);
                /* 4 channels of 2 planes of 13 (a channel's planes 60 apart, channels 17) */
                (k ? bn_seg_bwd_fused_f32_v : bn_seg_bwd_fused_f32_d)(
                    g, x, of[k] + 8050 + off, 4, 2, 13, 60, 60, 60, 17, 17, 17, pm, pinv,
                    stream ? w + 3 : NULL, 1.0 / 26, !stream, a[k] + 5300, a[k] + 5310);
            }
            same(od[0], od[1], sizeof od[0], "double outputs (bn_row_bwd_f64 dx, "
                 "planes_affine)");
            same(of[0], of[1], sizeof of[0], "float outputs (seg_bwd_dx, cl_bwd_dx, "
                 "rows_norm, seg_affine, planes_affine, group_blocks, group_blocks_bwd)");
            same(a[0], a[1], sizeof a[0], "double outputs (sums, moments, dw, db, group "
                 "statistics and sums)");
        }
    /* the planes affine walks a sample's planes of adjacent channels as one run when it
     * streams, and plane by plane when not: the same bits, at every alignment, with
     * vectors straddling planes (planes of 13 and 8) and none (planes of 16) */
    {
        static float pf[2][400];
        static double pd[2][400];
        for (int off = 0; off < 8; off++)
            for (int inner = 8; inner <= 16; inner += 4 + (inner == 12)) {
                for (int stream = 0; stream < 2; stream++) {
                    memset(pf[stream], 0, sizeof pf[stream]);
                    memset(pd[stream], 0, sizeof pd[stream]);
                    bn_planes_affine_f32(xf + off, pf[stream] + off, 3, 14, 5, inner,
                                         5 * inner, inner, 5 * inner, inner, pm, pinv,
                                         w + 7, w + 60, stream);
                    bn_planes_affine_f64(xd + off, pd[stream] + off, 1, 17, 5, inner,
                                         5 * inner, inner, 5 * inner, inner, pm, pinv, NULL,
                                         NULL, stream);
                }
                same(pf[0], pf[1], sizeof pf[0], "planes_affine f32: run and planes");
                same(pd[0], pd[1], sizeof pd[0], "planes_affine f64: run and planes");
            }
    }
    /* the one-pass channels-last float64 statistics around a shift too far from a
     * channel's mean (z^2 > 1) give the corrected two-pass bits for its tile, and around
     * shifts near the means what the two-pass gives to within a few ulps */
    {
        static double K[16], pv[16], m1[16], v1[16], m2[16], v2[16];
        for (int i = 0; i < 16; i++) {
            K[i] = 1e3 + 0.5;   /* xd: 1e3 + U(0, 1) */
            pv[i] = 1e3;
        }
        bn_cl_moments_shift_f64(xd, R, 16, C, K, pv, NULL, 0, 0, 0, m1, v1);
        bn_cl_tile2_f64(xd, R, C, pv, m2, v2);
        for (int i = 0; i < 16; i++)
            if (fabs(m1[i] - m2[i]) > 1e-13 || fabs(v1[i] - v2[i]) > 1e-12 * v2[i]) {
                printf("MISMATCH one-pass statistics, channel %d\n", i);
                bad++;
            }
        /* a group block (37 rows of 35 channels) in one pass: near its mean, the
         * two-pass moments to a few ulps; 10 standard deviations off, declined */
        double gm, gv, tm, tv;
        if (!bn_shift_moments_f64(xd, R, 35, C, 1e3 + 0.5, &gm, &gv)) {
            printf("MISMATCH one-pass group moments declined a near shift\n");
            bad++;
        }
        bn_seg_moments_f64(xd, R, 35, C, 1e3, &tm, &tv);
        if (fabs(gm - (1e3 + tm)) > 1e-12 || fabs(gv - tv) > 1e-12 * tv) {
            printf("MISMATCH one-pass group moments\n");
            bad++;
        }
        if (bn_shift_moments_f64(xd, R, 35, C, 1e3 + 0.5 + 3.0, &gm, &gv)) {
            printf("MISMATCH one-pass group moments took a far shift\n");
            bad++;
        }
        K[7] = 1e3 + 0.5 + 3.0;   /* z ~ 10 for channel 7 */
        bn_cl_moments_shift_f64(xd, R, 16, C, K, pv, NULL, 0, 0, 0, m1, v1);
        same(m1, m2, sizeof m1, "one-pass statistics with a far shift: two-pass means");
        same(v1, v2, sizeof v1, "one-pass statistics with a far shift: two-pass M2");
    }
    /* a tile of channels starting at a multiple of 32, walked with the width of the whole
     * rows, sums each channel as the call over every channel does (the channel split of
     * batch_norm_backward's few-row case relies on it) */
    {
        /* 104 rows of 40: blocks of 102 rows; the tile's 8 channels alone would take 512 */
        static double whole[2][40], tile[2][40];
        bn_cl_bwd_sums_f32(gf, 40, xf, 40, 104, 40, 40, w, whole[0], whole[1], 0);
        bn_cl_bwd_sums_f32(gf + 32, 40, xf + 32, 40, 104, 8, 40, w + 32, tile[0] + 32,
                           tile[1] + 32, 0);
        same(whole[0] + 32, tile[0] + 32, 8 * sizeof(double), "bn_cl_bwd_sums tile sum_dy");
        same(whole[1] + 32, tile[1] + 32, 8 * sizeof(double), "bn_cl_bwd_sums tile xmu");
    }
    /* the fused small-channel batch-norm backward gives the bits of its three steps:
     * bn_seg_bwd_sums_many, dx_coefficients' arithmetic, bn_seg_bwd_dx_many; 3 channels
     * of 2 planes of 37 values (16-value steps, 4-value steps and a scalar tail), and of
     * one plane of 1000 values; training and eval, with and without a weight */
    {
        static float f1[3100], f2[3100];
        static double s1[8], s2[8], kc[3], qc[3], rc[3];
        const ptrdiff_t shapes[2][2] = {{2, 37}, {1, 1000}};
        for (int sh = 0; sh < 2; sh++)
            for (int training = 0; training < 2; training++)
                for (int wt = 0; wt < 2; wt++) {
                    const ptrdiff_t nseg = shapes[sh][0], len = shapes[sh][1];
                    const ptrdiff_t sseg = 3 * len, sch = len;   /* NCHW: (nseg, 3, len) */
                    const double *wv = wt ? w + 9 : NULL, inv_m = 1.0 / (double)(nseg * len);
                    memset(f1, 0, sizeof f1);
                    memset(f2, 0, sizeof f2);
                    memset(s1, 0, sizeof s1);
                    memset(s2, 0, sizeof s2);
                    bn_seg_bwd_fused_f32(gf, xf, f1, 3, nseg, len, sseg, sseg, sseg, sch, sch,
                                         sch, pm, pinv, wv, inv_m, training, s1, s1 + 4);
                    bn_seg_bwd_sums_many_f32(gf, xf, 3, nseg, len, sseg, sseg, sch, sch, pm,
                                             s2, s2 + 4);
                    for (int c = 0; c < 3; c++) {
                        kc[c] = (wv ? wv[c] : 1.0) * pinv[c];
                        qc[c] = training ? -kc[c] * pinv[c] * pinv[c] * s2[4 + c] * inv_m : 0;
                        rc[c] = training ? -kc[c] * s2[c] * inv_m : 0;
                    }
                    bn_seg_bwd_dx_many_f32(gf, xf, f2, 3, nseg, len, sseg, sseg, sseg, sch,
                                           sch, sch, pm, kc, qc, rc, 0);
                    same(f1, f2, sizeof f1, "bn_seg_bwd_fused_f32 dx: its three steps'");
                    same(s1, s2, sizeof s1, "bn_seg_bwd_fused_f32 sums: its three steps'");
                }
    }
    /* the column-tile path of the layer/RMS norm backward (bn_row_bwd_sums per row, then
     * bn_rows_bwd_tile per tile of columns) gives bn_row_bwd's bits for one chunk of the
     * same rows: dx, and each column's sums over the rows in order (the partials of one
     * chunk, from zero); 5 rows of 771 (a last tile of 3 columns), layer and RMS norm */
    {
        enum { RR = 5, D = 771 };
        static double mean[RR], inv[RR], q[RR], rr[RR], rowp[2 * D], tilep[2 * D];
        static float dxr[RR * D], dxt[RR * D];
        for (int rms = 0; rms < 2; rms++) {
            memset(rowp, 0, sizeof rowp);
            for (int k = 0; k < RR; k++) {
                mean[k] = rms ? 0.0 : 1e3 + 0.25 * k;
                inv[k] = 3.3 - 0.1 * k;
                bn_row_bwd_f32(gf + k * D, xf + k * D, dxr + k * D, D, mean[k], inv[k], w,
                               rowp, rms ? NULL : rowp + D, rms, 0, NULL, NULL);
                bn_row_bwd_sums_f32(gf + k * D, xf + k * D, D, mean[k], inv[k], w, rms, &q[k],
                                    &rr[k]);
            }
            for (int j0 = 0; j0 < D; j0 += BN_BWD_TILE)
                bn_rows_bwd_tile_f32(gf + j0, xf + j0, dxt + j0, RR,
                                     D - j0 < BN_BWD_TILE ? D - j0 : BN_BWD_TILE, D, D, D,
                                     rms ? NULL : mean, inv, q, rr, w + j0, tilep + j0,
                                     rms ? NULL : tilep + D + j0);
            same(dxr, dxt, sizeof dxr, "column tiles: dx");
            same(rowp, tilep, (rms ? 1 : 2) * D * sizeof(double), "column tiles: sums");
        }
    }
    /* a pair of rows in one call (bn_row_bwd2: the first passes together) gives two
     * bn_row_bwd calls' bits, in the AVX2 clone, the baseline clone and, where the CPU runs
     * it, the AVX-512 twin: layer and RMS norm, float and double, rows 780 values apart
     * (771 used), streaming on and off, the next pair prefetched */
    {
        enum { D2 = 771, L2 = 780 };
        double m2[2] = {1e3 + 0.5, 1e3 - 0.25}, i2[2] = {3.3, 2.9};
        for (int rms = 0; rms < 2; rms++)
            for (int stream = 0; stream < 2; stream++)
                for (int v = 0; v < 3; v++) {
                    if (v == 2 && !bn_cpu_v4())
                        continue;
                    for (int k = 0; k < 2; k++) {
                        memset(of[k], 0, sizeof of[k]);
                        memset(od[k], 0, sizeof od[k]);
                        memset(a[k], 0, sizeof a[k]);
                    }
                    for (int r = 0; r < 2; r++) {   /* the reference: two calls */
                        bn_row_bwd_f32_d(gf + r * L2, xf + r * L2, of[0] + r * L2, D2,
                                         rms ? 0.0 : m2[r], i2[r], w, a[0],
                                         rms ? NULL : a[0] + D2, rms, stream, NULL, NULL);
                        bn_row_bwd_f64_d(gd + r * L2, xd + r * L2, od[0] + r * L2, D2,
                                         rms ? 0.0 : m2[r], i2[r], w, a[0] + 2000,
                                         rms ? NULL : a[0] + 3000, rms, stream, NULL, NULL);
                    }
                    (v == 0 ? bn_row_bwd2_f32_v : v == 1 ? bn_row_bwd2_f32_d : bn_row_bwd2_v4_f32)(
                        gf, xf, of[1], L2, L2, L2, D2, rms ? NULL : m2, i2, w, a[1],
                        rms ? NULL : a[1] + D2, rms, stream, gf + 2 * L2, xf + 2 * L2);
                    (v == 0 ? bn_row_bwd2_f64_v : v == 1 ? bn_row_bwd2_f64_d : bn_row_bwd2_v4_f64)(
                        gd, xd, od[1], L2, L2, L2, D2, rms ? NULL : m2, i2, w, a[1] + 2000,
                        rms ? NULL : a[1] + 3000, rms, stream, gd + 2 * L2, xd + 2 * L2);
                    same(of[0], of[1], sizeof of[0], "row pair: float dx");
                    same(od[0], od[1], sizeof od[0], "row pair: double dx");
                    same(a[0], a[1], 4000 * sizeof(double), "row pair: partials");
                }
    }
    /* the AVX-512 twins (bn_*_v4, BN_HAVE_V4) give the baseline clone's bits, where this
     * CPU runs them: layer and RMS norm, odd lengths and offsets, streaming on and off,
     * float and double, the row kernel, the row sums and the column tiles (rows 813
     * values apart, a last tile of 3 columns) */
    if (bn_cpu_v4()) {
        enum { RV = 5, DV = 771, LD = 813 };
        bn_v4_ok = 1;   /* bn_set_v4: the small-channel batch-norm twin is chosen inside */
        static double rq[RV], rr2[RV], rm[RV], ri[RV];
        for (int k = 0; k < RV; k++) {
            ri[k] = 3.3 - 0.1 * k;
            rq[k] = -0.01 * (k + 1);
            rr2[k] = 0.002 * k - 0.003;
        }
        for (int off = 0; off < 3; off++)
            for (int stream = 0; stream < 2; stream++)
                for (int rms = 0; rms < 2; rms++) {
                    const float *x = xf + off, *g = gf + 2 * off;
                    double mn = rms ? 0.0 : 1e3 + 0.5;
                    for (int k = 0; k < RV; k++)
                        rm[k] = rms ? 0.0 : 1e3 + 0.25 * k;
                    for (int k = 0; k < 2; k++) {
                        memset(of[k], 0, sizeof of[k]);
                        memset(od[k], 0, sizeof od[k]);
                        memset(a[k], 0, sizeof a[k]);
                        for (int r = 0; r < RV; r++)
                            (k ? bn_row_bwd_v4_f32 : bn_row_bwd_f32_d)(
                                g + r * DV, x + r * DV, of[k] + off + r * DV, DV, mn, 3.3, w,
                                a[k], rms ? NULL : a[k] + DV, rms, stream,
                                r < 4 ? g + (r + 1) * DV : NULL, r < 4 ? x + (r + 1) * DV : NULL);
                        (k ? bn_row_bwd_v4_f64 : bn_row_bwd_f64_d)(
                            gd + off, xd, od[k] + off, 1001, mn, 3.3, w, a[k] + 2000,
                            rms ? NULL : a[k] + 3001, rms, stream, gd + 1001, xd + 1001);
                        (k ? bn_row_bwd_sums_v4_f32 : bn_row_bwd_sums_f32_d)(
                            g, x, 1003, mn, 3.3, w, rms, a[k] + 4010, a[k] + 4011);
                        (k ? bn_row_bwd_sums_v4_f64 : bn_row_bwd_sums_f64_d)(
                            gd, xd + off, 1003, mn, 3.3, w, rms, a[k] + 4012, a[k] + 4013);
                        (k ? bn_rows_bwd_tile_v4_f32 : bn_rows_bwd_tile_f32_d)(
                            g, x, of[k] + N + off, RV, DV, LD, LD, LD, rms ? NULL : rm, ri,
                            rq, rr2, w, a[k] + 5000, rms ? NULL : a[k] + 6000);
                        (k ? bn_rows_bwd_tile_v4_f64 : bn_rows_bwd_tile_f64_d)(
                            gd, xd + off, od[k] + 1001 + off, 3, DV, LD, LD, LD,
                            rms ? NULL : rm, ri, rq, rr2, w, a[k] + 7000,
                            rms ? NULL : a[k] + 8000);
                    }
                    same(of[0], of[1], sizeof of[0], "v4 float dx (row, tiles)");
                    same(od[0], od[1], sizeof od[0], "v4 double dx (row, tiles)");
                    same(a[0], a[1], 9000 * sizeof(double), "v4 sums and partials");
                    /* the batch-norm backward of small float channels: 4 channels of 2
                     * planes of 13 (planes 60 apart, channels 17), 3 of one plane of 49,
                     * 2 of 1000, 5 channels of 7 planes of 7 (samples 35 apart: the
                     * four-value steps and the scalar tail); training or not (rms), with
                     * weights or not (stream), from the means near 1e3 */
                    static float fo[2][3000];
                    static double fs[2][64];
                    for (int k = 0; k < 2; k++) {
                        void (*f)(const float *, const float *, float *, ptrdiff_t,
                                  ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t, ptrdiff_t,
                                  ptrdiff_t, ptrdiff_t, ptrdiff_t, const double *,
                                  const double *, const double *, double, int, double *,
                                  double *) = k ? bn_seg_bwd_fused_f32 : bn_seg_bwd_fused_f32_d;
                        const double *fw = stream ? w + 3 : NULL;
                        memset(fo[k], 0, sizeof fo[k]);
                        memset(fs[k], 0, sizeof fs[k]);
                        bn_set_v4(k);
                        f(g, x, fo[k] + off, 4, 2, 13, 60, 60, 60, 17, 17, 17, rm, ri, fw,
                          1.0 / 26, !rms, fs[k], fs[k] + 8);
                        f(g, x, fo[k] + 200 + off, 3, 1, 49, 0, 0, 0, 49, 49, 49, rm, ri, fw,
                          1.0 / 49, !rms, fs[k] + 16, fs[k] + 24);
                        f(g + 1, x, fo[k] + 400 + off, 2, 1, 1000, 0, 0, 0, 1000, 1000, 1000,
                          rm, ri, fw, 1.0 / 1000, !rms, fs[k] + 32, fs[k] + 40);
                        f(g, x + 2, fo[k] + 2500 + off, 5, 7, 7, 35, 35, 35, 7, 7, 7, rm, ri,
                          fw, 1.0 / 49, !rms, fs[k] + 48, fs[k] + 56);
                        bn_set_v4(0);
                    }
                    same(fo[0], fo[1], sizeof fo[0], "v4 small-channel batch-norm dx");
                    same(fs[0], fs[1], sizeof fs[0], "v4 small-channel batch-norm sums");
                }
        printf("V4 ");
    }
    printf(bad ? "FAILED\n" : "SAME\n");
    return bad != 0;
}
"""


def _compiler():
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return cc.split()[0]


def _cpu_flags():
    return (pathlib.Path("/proc/cpuinfo").read_text() if os.path.exists("/proc/cpuinfo")
            else "").replace("\n", " ")


def _cpu_has_avx2_fma():
    flags = _cpu_flags()
    return " avx2 " in flags and " fma " in flags


def _cpu_has_v4():
    """Whether this CPU has the AVX-512 subsets of x86-64-v4 (the bn_*_v4 twins)."""
    flags = _cpu_flags()
    return all(f" {f} " in flags for f in ("avx512f", "avx512dq", "avx512vl", "avx512bw",
                                            "avx512cd"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="target_clones: Linux builds")
def test_both_clones_give_the_same_bits(tmp_path):
    assert shutil.which(_compiler()), f"no C compiler {_compiler()!r} (the build needs one)"
    assert _cpu_has_avx2_fma(), "this CPU cannot run the x86-64-v3 clone"
    src = tmp_path / "clones.c"
    src.write_text(HARNESS)
    exe = tmp_path / "clones"
    # The harness names each clone by its symbol (name.default, name.arch_x86_64_v3),
    # which GCC's interprocedural passes may drop or rename: GCC 13.3 left
    # bn_seg_moments_f32's two clones undefined at -O3 until all five were off (the
    # build's own modules call the resolver, and are unaffected).
    cc = subprocess.run([_compiler(), "-O3", "-std=gnu11", "-fno-math-errno",
                         "-ffp-contract=off", "-Wno-psabi", "-fno-ipa-modref", "-fno-ipa-icf",
                         "-fno-ipa-cp", "-fno-ipa-sra", "-fno-ipa-pure-const", f"-I{SRC}",
                         str(src), "-o", str(exe), "-lm"],
                        capture_output=True, text=True, timeout=300)
    assert cc.returncode == 0, f"{_compiler()} could not build the harness:\n{cc.stderr[-4000:]}"
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("SAME"), res.stdout + res.stderr
    # the AVX-512 twins ran (and matched) exactly where the CPU has AVX-512
    assert res.stdout.strip().endswith("V4 SAME") == _cpu_has_v4(), res.stdout
