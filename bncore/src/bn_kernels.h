/*
 * bncore SIMD block primitives: the only place where bncore touches array elements.
 *
 * Design notes
 * ------------
 * - Everything here works on one cache-sized block and is free of Python objects. The
 *   Cython modules (_stats, _batchnorm, _rownorm) cut arrays into blocks, run blocks on
 *   OpenMP threads and merge block statistics in a fixed order, so results are bitwise
 *   identical for any number of threads.
 * - Accumulation is always in double, in independent lanes of four-double vectors
 *   (GCC vector extensions) reduced in a fixed order. Independent lanes vectorise without
 *   -ffast-math (no reassociation is needed), stay in registers, and the lane of every
 *   value depends on the shape only, never on the thread count or the SIMD clone.
 * - Block statistics are "corrected two-pass" (Chan, Golub & LeVeque 1983): mean0 from a
 *   first pass, then sum(d) and sum(d*d) with d = x - mean0 from a second pass over data
 *   that is still in L1. mean = mean0 + sum(d)/n, M2 = sum(d*d) - sum(d)^2/n. A constant
 *   block gives mean == value and M2 == 0 exactly (d is a small multiple of one ulp, so
 *   every sum is exact), which is what makes a constant channel normalise to exactly
 *   `bias`. Blocks are combined with Chan's merge, bn_chan_merge(), defined once below.
 *   Channels-last float blocks are the exception: one pass around a float shift near the
 *   mean (the pivot, then the running mean), which is as exact there (see
 *   bn_cl_moments_shift_f32) and reads memory once without a second walk.
 * - Every kernel is compiled twice (x86-64-v3 = AVX2+FMA, and the baseline) with GCC's
 *   target_clones and picked by the loader (ifunc), unless the build was told otherwise.
 */
#ifndef BNCORE_KERNELS_H
#define BNCORE_KERNELS_H

/* A header of static functions: a program that includes it uses a few of them, and the
 * compiler need not warn about the rest (bncore's own build passes -Wno-unused-function;
 * code embedding the kernels does not have to). GCC's note on how 32-byte vector
 * arguments are passed (-Wpsabi) cannot be silenced from here: -Wno-psabi does it. */
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#endif

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>   /* sysconf: the cache sizes */
#include "bn_half.h"   /* float16 <-> float32 */
#endif
#if defined(__SSE2__)
#include <emmintrin.h>   /* streaming stores: SSE2 is in every x86-64 clone */
#define BN_HAVE_STREAM 1
#else
#define BN_HAVE_STREAM 0
#endif

/* GCC/Clang vector extensions: four doubles (an AVX2 register, two SSE2 registers in the
 * baseline clone), four and eight floats, and the lane masks of eight floats and of four
 * doubles (a comparison's -1 / 0 per lane). */
typedef double bn_v4d __attribute__((vector_size(32)));
typedef float bn_v4f __attribute__((vector_size(16)));
typedef float bn_v8f __attribute__((vector_size(32)));
typedef int bn_v8i __attribute__((vector_size(32)));
typedef long long bn_v4l __attribute__((vector_size(32)));


#if defined(BNCORE_TARGET_CLONES)
#define BN_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define BN_CLONES
#endif
#define BN_INLINE static inline __attribute__((always_inline))

/* AVX-512 (x86-64-v4) twins of the kernels that arithmetic, not memory alone, bounds: the
 * layer/RMS norm backward (bn_row_bwd_v4, bn_row_bwd2_v4, bn_row_bwd_sums_v4,
 * bn_rows_bwd_tile_v4), which converts every value to double and back and runs two passes
 * of fused multiply-adds over it, and the batch-norm backward of small float channels in
 * cache (bn_seg_bwd_fused_v4_f32). Eight doubles a vector halve the instructions of the
 * four-lane AVX2 clone; the lanes and the order of every sum are the clone's (an
 * eight-lane accumulator is its two four-lane ones side by side), so the bits are the
 * same (tests/test_clones.py). Chosen at run time (bn_use_v4, from the CPU at import;
 * bn_set_v4 turns it off for tests and measurements). Memory-bound kernels gained nothing
 * from such twins (measured: batch-norm and group-norm channels-last 0.94-1.0x, layer-norm
 * forward rows 0.91-1.06x) and keep one path. */
#if defined(BNCORE_TARGET_CLONES) && defined(__x86_64__) && defined(__GNUC__)
#define BN_HAVE_V4 1
#include <immintrin.h>
#define BN_V4 __attribute__((target("arch=x86-64-v4")))
#else
#define BN_HAVE_V4 0
#endif
static int bn_use_v4 __attribute__((unused)) = 0;
static int bn_v4_ok __attribute__((unused)) = 0;

/* Whether this CPU (and its operating system) runs x86-64-v4 code. */
static inline int bn_cpu_v4(void)
{
#if BN_HAVE_V4
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512cd");
#else
    return 0;
#endif
}

/* Use the AVX-512 twins (on = 1, where the CPU has them) or not; returns the old setting. */
static inline int bn_set_v4(int on)
{
    int old = bn_use_v4;
    bn_use_v4 = on && bn_v4_ok;
    return old;
}

/* Scratch for the kernels' partial sums, aligned to a cache line. malloc aligns to 16 bytes
 * (a large block starts 16 bytes into its page), and then every other 32-byte vector access
 * of those sums split two lines: layer-norm backward (8192, 768), which updates its chunk's
 * column sums every row, ran 1.08x aligned, RMS norm 1.06x, (64, 4096) 1.04x. The block's
 * own address is kept in the 8 bytes below the aligned one (raw is 16-byte aligned, so
 * raw + 16 <= p <= raw + 64); free with bn_free64. */
static inline void *bn_alloc64(size_t n)
{
    char *raw = (char *)malloc(n + 64);
    if (raw == NULL) return NULL;
    char *p = (char *)(((uintptr_t)raw + 64) & ~(uintptr_t)63);
    memcpy(p - sizeof(void *), &raw, sizeof(void *));
    return p;
}

static inline void bn_free64(void *p)
{
    if (p != NULL) {
        void *raw;
        memcpy(&raw, (char *)p - sizeof(void *), sizeof(void *));
        free(raw);
    }
}

/* a * b + c with one rounding (fused multiply-add), lane by lane on four doubles, and on
 * one: the x86-64-v3 clone compiles BN_FMA4 to one vfmadd of four lanes, the baseline
 * clone calls libm's fma(), which rounds alike, so both clones give the same bits
 * (-ffp-contract=off keeps GCC from fusing any other a * b + c, which the baseline could
 * not match). Arguments must be plain variables: each is named once per lane. On Zen 3 a
 * multiply and an add are two operations and the adds share their two pipes with the
 * float->double conversions, the kernels' bottleneck; the fused form moves the add to
 * the multiply pipes (and is the more exact). */
#define BN_FMA4(a, b, c) ((bn_v4d){__builtin_fma((a)[0], (b)[0], (c)[0]), \
        __builtin_fma((a)[1], (b)[1], (c)[1]), __builtin_fma((a)[2], (b)[2], (c)[2]), \
        __builtin_fma((a)[3], (b)[3], (c)[3])})
#define BN_FMA(a, b, c) __builtin_fma((a), (b), (c))
/* Four deviation vectors into the sums d0..d3 and sums of squares q0..q3 in scope (four
 * independent chains each: with fewer, the adds' latency was the limit). */
#define BN_ACC4(u0, u1, u2, u3) do { \
        d0 += (u0); d1 += (u1); d2 += (u2); d3 += (u3); \
        q0 = BN_FMA4((u0), (u0), q0); q1 = BN_FMA4((u1), (u1), q1); \
        q2 = BN_FMA4((u2), (u2), q2); q3 = BN_FMA4((u3), (u3), q3); \
    } while (0)

/* ---- streaming (non-temporal) stores
 * Outputs far larger than the caches are written with streaming stores: no
 * read-for-ownership of the output, and x, about to be read again from L2, is not
 * evicted. They pay only for whole 64-byte lines: a partial line goes to memory as a
 * read-modify-write, and its other part, written later by an ordinary store, has to be
 * fetched again (planes of 14x14 floats, 784 bytes, ran 3x slower streamed whole). So a
 * kernel writing a run of n outputs streams only the lines the run covers entirely, and
 * writes the rest with ordinary stores; the bits are the same either way. Kernels do not
 * fence: the caller runs bn_fence() once after its last streamed run, before other threads
 * may read the output (a fence per short run costs more than streaming saves). */

/* [*lo, *hi): the elements of the run q[0..n) (elements of `size` bytes) that lie in
 * 64-byte lines it covers entirely; lo == hi == 0 when none or when stream is 0. */
BN_INLINE void bn_stream_span(const void *q, ptrdiff_t n, size_t size, int stream,
                              ptrdiff_t *lo, ptrdiff_t *hi)
{
    uintptr_t a = (uintptr_t)q;
    ptrdiff_t per = (ptrdiff_t)(64 / size), head;
    *lo = *hi = 0;
    if (!BN_HAVE_STREAM || !stream || a % size)
        return;
    head = (ptrdiff_t)(((64 - (a & 63)) & 63) / size);
    if (n - head < per)
        return;
    *lo = head;
    *hi = head + (n - head) / per * per;
}

/* Order this thread's streaming stores before anything it does next (end of its work). */
static inline void bn_fence(void)
{
#if BN_HAVE_STREAM
    _mm_sfence();
#endif
}

/* The store loop of an elementwise kernel writing q[0..n): VEC(i, nt) computes and stores
 * W elements from i (nt = 1: streaming, q + i is 64-byte aligned; nt = 0: ordinary),
 * SCALAR(i) one element. Ordinary stores before and after the streamed lines. */
#define BN_SPAN_LOOP(q, n, stream, W, SCALAR, VEC) do { \
        ptrdiff_t lo_, hi_, i_; \
        bn_stream_span((q), (n), sizeof(*(q)), (stream), &lo_, &hi_); \
        for (i_ = 0; i_ + (W) <= lo_; i_ += (W)) { VEC(i_, 0); } \
        for (; i_ < lo_; i_++) { SCALAR(i_); } \
        for (; i_ < hi_; i_ += (W)) { VEC(i_, 1); } \
        for (; i_ + (W) <= (n); i_ += (W)) { VEC(i_, 0); } \
        for (; i_ < (n); i_++) { SCALAR(i_); } \
    } while (0)

/* The prefetch of a later row spread over a pass of i = 0, 1, ... over this one: the line of
 * p + i once every 64 bytes (p NULL: nothing), then the row's last line (BN_FETCH_LAST, n
 * values). A burst of the whole row's prefetches before the pass stalled the loads behind
 * them (one thread, rows of 768 floats from memory: 0.69 ns a value, no prefetch 0.64,
 * spread 0.54). */
#define BN_FETCH_SPREAD(p, i) do { \
        if ((p) != NULL && !((i) & (64 / (ptrdiff_t)sizeof(*(p)) - 1))) \
            __builtin_prefetch((p) + (i), 0, 3); } while (0)
#define BN_FETCH_LAST(p, n) do { \
        if ((p) != NULL && (n) > 0) __builtin_prefetch((p) + (n) - 1, 0, 3); } while (0)

/* Prefetch the next two 64-byte lines of the range [*p, end) and step past them: called once
 * per row step of a kernel, it spreads the fetch of the next block over the current one in
 * address order (which DRAM serves best). A NULL range prefetches nothing. */
static inline void bn_prefetch_step(const char **p, const char *end)
{
    if (*p < end) {
        __builtin_prefetch(*p, 0, 3);
        __builtin_prefetch(*p + 64, 0, 3);
        *p += 128;
    }
}

/* A region of rows to prefetch two lines per step, row after row: rows of width bytes, ld
 * bytes apart (one row: an address range). */
typedef struct { const char *p; ptrdiff_t off, width, ld, rows; } bn_pf2;

/* Short planes (bn_planes_affine_rect): shorter than BN_SHORT_PLANE_F32 floats or
 * BN_SHORT_PLANE_F64 doubles, with each table entry serving at least BN_SHORT_REUSE
 * samples; tables of BN_SHORT_TAB floats (half as many doubles) a parameter. */
#define BN_SHORT_PLANE_F32 16
#define BN_SHORT_PLANE_F64 8
#define BN_SHORT_REUSE 4
#define BN_SHORT_TAB 2048
/* Eval chunks holding every channel's planes at least twice take per-channel parameter
 * tables for up to BN_PLANE_TAB channels (bn_planes_affine). */
#define BN_PLANE_TAB 1024

/* A step of the region: its next two lines prefetched into L1 (hint T0), or with l2 into L2
 * (hint T2, as bn_prefetch_step_l2: the next channel's region, read after this one) */
static inline void bn_pf2_step_to(bn_pf2 *f, int l2)
{
    if (f->rows > 0) {
        if (l2) {
            __builtin_prefetch(f->p + f->off, 0, 1);
            __builtin_prefetch(f->p + f->off + 64, 0, 1);
        } else {
            __builtin_prefetch(f->p + f->off, 0, 3);
            __builtin_prefetch(f->p + f->off + 64, 0, 3);
        }
        f->off += 128;
        if (f->off >= f->width) {
            f->off = 0;
            f->p += f->ld;
            f->rows--;
        }
    }
}

static inline void bn_pf2_step(bn_pf2 *f) { bn_pf2_step_to(f, 0); }
static inline void bn_pf2_step_l2(bn_pf2 *f) { bn_pf2_step_to(f, 1); }

/* bn_prefetch_step for data wanted after the current block (the next channel, read once
 * the current one is written): hint T2, not into L1, where the current block's loads are
 * (bn backward on this machine: 1.11-1.14x over no prefetch, where hint T0 gave 1.04x). */
static inline void bn_prefetch_step_l2(const char **p, const char *end)
{
    if (*p < end) {
        __builtin_prefetch(*p, 0, 1);
        __builtin_prefetch(*p + 64, 0, 1);
        *p += 128;
    }
}

/* ---- cache-size thresholds, in bytes: one copy per extension module, set at its import by
 * bn_init_thresholds() (and by tests, which pin them so that every path is exercised on
 * any machine; bncore._config.set_thresholds):
 *   bn_stream_fwd, bn_stream_bwd: a forward (x, y) or backward (dy, x, dx) whose arrays
 *     total this many bytes writes its output with streaming stores (streams());
 *   bn_far_bytes: inputs of this many bytes are taken to come from memory, not the caches
 *     (beyond_caches(): what is prefetched, and how);
 *   bn_l2_bytes: one core's L2 (beyond_l2(): data outgrowing the threads' L2s);
 *   bn_l1_bytes: one core's L1 data cache (the layer/RMS norm backward's rows that stay in
 *     it between their two passes: see row_fits_l1). */
static ptrdiff_t bn_stream_fwd __attribute__((unused)) = (ptrdiff_t)32 << 20;
static ptrdiff_t bn_stream_bwd __attribute__((unused)) = (ptrdiff_t)32 << 20;
static ptrdiff_t bn_far_bytes __attribute__((unused)) = (ptrdiff_t)16 << 20;
static ptrdiff_t bn_l2_bytes __attribute__((unused)) = (ptrdiff_t)512 << 10;
static ptrdiff_t bn_l1_bytes __attribute__((unused)) = (ptrdiff_t)32 << 10;

static inline void bn_set_thresholds(ptrdiff_t fwd, ptrdiff_t bwd, ptrdiff_t far, ptrdiff_t l2,
                                     ptrdiff_t l1)
{
    bn_stream_fwd = fwd;
    bn_stream_bwd = bwd;
    bn_far_bytes = far;
    bn_l2_bytes = l2;
    bn_l1_bytes = l1;
}

/* One core's L1 data cache as the C library reports it (sysconf), or 0 when it does not. */
static inline ptrdiff_t bn_l1_size(void)
{
    long v = -1;
#if defined(_SC_LEVEL1_DCACHE_SIZE)
    v = sysconf(_SC_LEVEL1_DCACHE_SIZE);
#endif
    return v > 0 ? (ptrdiff_t)v : 0;
}

/* One core's L2 as the C library reports it (sysconf), or 0 when it does not. */
static inline ptrdiff_t bn_l2_size(void)
{
    long v = -1;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return v > 0 ? (ptrdiff_t)v : 0;
}

/* The last-level cache as the C library reports it (sysconf), or 0 when it does not. */
static inline ptrdiff_t bn_llc_bytes(void)
{
    long v = -1;
#if defined(_SC_LEVEL3_CACHE_SIZE)
    v = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (v <= 0)
        v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return v > 0 ? (ptrdiff_t)v : 0;
}

/* Streaming pays once the arrays an op moves outgrow what the L3 keeps for it; a store
 * that would stay in the L3 is cheaper ordinary (no trip to memory and back). Measured:
 *  - 32 MiB L3 (Zen 3): both from 32 MiB moved, the L3 itself (the rule these kernels were
 *    tuned with: see streams());
 *  - 480 MiB L3 shared by a whole socket (a two-core guest of a Xeon with AVX-512, 2 MiB L2
 *    per core): forwards 1.05-1.31x faster unstreamed at 49 MiB moved (x and y of 24.5 MiB:
 *    layer norm 8192x768 1.31x, batch-norm training 1.10x, group norm 1.07-1.11x) and at
 *    72 MiB for layer norm (1.18x), but 0.70-0.92x at 98 MiB; backwards lost unstreamed from
 *    37 MiB moved (float64 batch norm 0.85x) and at 73.5 MiB (0.72-0.96x, 1.05x once).
 * So forwards stream from the L3 or 64 MiB, whichever is less, backwards from the L3 or
 * 32 MiB (the guest's share of a big shared L3 is not known; these caps are what the
 * measurements support). No L3 reported: 32 MiB; no L2: 512 KiB; no L1: 32 KiB. */
static inline void bn_init_thresholds(void)
{
    ptrdiff_t l3 = bn_llc_bytes(), l2 = bn_l2_size(), l1 = bn_l1_size();
    bn_l2_bytes = l2 > 0 ? l2 : (ptrdiff_t)512 << 10;
    bn_l1_bytes = l1 > 0 ? l1 : (ptrdiff_t)32 << 10;
    if (l3 <= 0)
        l3 = (ptrdiff_t)32 << 20;
    bn_stream_fwd = l3 < ((ptrdiff_t)64 << 20) ? l3 : (ptrdiff_t)64 << 20;
    bn_stream_bwd = l3 < ((ptrdiff_t)32 << 20) ? l3 : (ptrdiff_t)32 << 20;
    bn_far_bytes = (ptrdiff_t)16 << 20;
    bn_v4_ok = bn_use_v4 = bn_cpu_v4();
}

/* Which SIMD level the kernels run with on this CPU (reported by show_config()). */
static const char *bn_simd_level(void)
{
#if defined(BNCORE_NATIVE)
    return "native (-march=native build)";
#elif defined(BNCORE_TARGET_CLONES)
    __builtin_cpu_init();
    if (bn_cpu_v4())
        return "AVX2+FMA (x86-64-v3 clone, runtime dispatch), AVX-512 for the layer/RMS norm "
               "backward rows and the small-channel batch-norm backward";
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return "AVX2+FMA (x86-64-v3 clone, runtime dispatch)";
    return "baseline (x86-64 clone, runtime dispatch)";
#else
    return "baseline (no runtime dispatch)";
#endif
}

/* ---------------------------------------------------------------- statistics state */

/* Welford/Chan state of one stream of values: count, mean, sum of squared deviations.
 * mean is relative to shift (a pivot taken from the data, see bn_pivot): block means and
 * the deltas between them then live at the scale of the spread, not of the offset, so
 * merges lose nothing at a 1e7 offset; the mean itself is shift + mean. */
typedef struct {
    double n;
    double mean;
    double m2;
    double shift;
} bn_moments;

/* The pivot of a channel: its first value (x - pivot is exact for nearby x, Sterbenz),
 * or 0 when that is not finite, so inf/nan still propagate as NumPy's mean does. */
BN_INLINE double bn_pivot(double first)
{
    return isfinite(first) ? first : 0.0;
}

/* Merge a block (nb, mb, m2b) into (na, *mean, *m2) (Chan et al. 1979): the one merge
 * formula in bncore; every merge goes through here, with its weights f = nb / (na + nb)
 * and g = na * f (computed once when many channels share the counts). With an infinite
 * mean on either side delta is not finite: the mean is then the weighted sum (inf + inf =
 * inf, inf - inf = nan, as NumPy's mean gives) and M2 is nan. */
BN_INLINE void bn_merge_weighted(double na, double nb, double f, double g, double *mean,
                                 double *m2, double mb, double m2b)
{
    double delta = mb - *mean;
    if (isfinite(delta)) {
        *mean += delta * f;
        *m2 += m2b + delta * delta * g;
    } else {
        *mean = (na * *mean + nb * mb) / (na + nb);
        *m2 = NAN;
    }
}

BN_INLINE void bn_merge_values(double na, double nb, double *mean, double *m2, double mb,
                               double m2b)
{
    double f = nb / (na + nb);
    bn_merge_weighted(na, nb, f, na * f, mean, m2, mb, m2b);
}

BN_INLINE void bn_chan_merge(bn_moments *a, double nb, double mb, double m2b)
{
    if (nb == 0) return;
    if (a->n == 0) { a->n = nb; a->mean = mb; a->m2 = m2b; return; }
    bn_merge_values(a->n, nb, &a->mean, &a->m2, mb, m2b);
    a->n += nb;
}

/* Group and instance norm parameter gradients from the per-(sample, channel) sums of the
 * backward (n samples of g groups of cg channels): dweight[c] += sum_dy_xmu[t, c] *
 * invstd[t, group] and dbias[c] += sum_dy[t, c], sample after sample, in loops that
 * vectorise (one multiply and one add each, as written). */
static BN_CLONES void bn_group_param_grads(double *restrict dweight, double *restrict dbias,
                                           const double *restrict sum_dy_xmu,
                                           const double *restrict sum_dy,
                                           const double *restrict invstd, ptrdiff_t n,
                                           ptrdiff_t g, ptrdiff_t cg)
{
    for (ptrdiff_t t = 0; t < n; t++)
        for (ptrdiff_t gi = 0; gi < g; gi++) {
            const double k = invstd[t * g + gi];
            const double *a = sum_dy_xmu + (t * g + gi) * cg, *b = sum_dy + (t * g + gi) * cg;
            double *dw = dweight + gi * cg, *db = dbias + gi * cg;
            for (ptrdiff_t j = 0; j < cg; j++) {
                dw[j] += a[j] * k;
                db[j] += b[j];
            }
        }
}

/* Merge nch blocks that share one count nb into states that share one count na
 * (channels-last rows, Moments.merge). The caller adds nb to its count. */
static BN_CLONES void bn_chan_merge_vec(double na, double *restrict mean, double *restrict m2,
                                        double nb, const double *restrict mb,
                                        const double *restrict m2b, ptrdiff_t nch)
{
    if (nb == 0) return;
    if (na == 0) {
        for (ptrdiff_t c = 0; c < nch; c++) { mean[c] = mb[c]; m2[c] = m2b[c]; }
        return;
    }
    double f = nb / (na + nb), g = na * f;
    for (ptrdiff_t c = 0; c < nch; c++)
        bn_merge_weighted(na, nb, f, g, &mean[c], &m2[c], mb[c], m2b[c]);
}

BN_INLINE double bn_v4d_total(bn_v4d v)
{
    return (v[0] + v[2]) + (v[1] + v[3]);
}

/* dst[i] = src[i], widened (exact) or copied: the common calls' per-channel parameters into
 * the kernels' double work arrays. Each 32 bytes of dst that already hold the values are
 * left unwritten. In a loop of calls the heap hands the work array back at the same
 * address with last call's values still there (but for its first 16 bytes), and those
 * lines sit, shared, in the caches of the threads that read them: rewriting them cost
 * each reader a miss to the writer's core, every call. Group norm (1, 2048, 7, 7) G=8
 * ran 1.14x faster (forward) and 1.08x (backward) so, channels-last 1.11x / 1.06x, two
 * threads. Written or not, dst ends with the values bit for bit (the comparison is of
 * the bits: -0.0 over 0.0 and NaN payloads are written). The AVX2 clone converts eight
 * values an instruction where the baseline converts two. */
BN_INLINE void bn_put4_changed(double *dst, bn_v4d v)
{
    bn_v4l a, b;
    memcpy(&a, &v, sizeof a);
    memcpy(&b, dst, sizeof b);
    a ^= b;
    if ((a[0] | a[1] | a[2] | a[3]) != 0)
        memcpy(dst, &v, sizeof v);
}

static BN_CLONES void bn_widen_f32(const float *restrict src, double *restrict dst, ptrdiff_t n)
{
    ptrdiff_t i = 0;
    for (; i + 4 <= n; i += 4)
        bn_put4_changed(dst + i, (bn_v4d){(double)src[i], (double)src[i + 1],
                                          (double)src[i + 2], (double)src[i + 3]});
    for (; i < n; i++)
        dst[i] = (double)src[i];
}

static BN_CLONES void bn_copy_f64(const double *restrict src, double *restrict dst,
                                  ptrdiff_t n)
{
    ptrdiff_t i = 0;
    for (; i + 4 <= n; i += 4) {
        bn_v4d v;
        memcpy(&v, src + i, sizeof v);
        bn_put4_changed(dst + i, v);
    }
    for (; i < n; i++)
        dst[i] = src[i];
}

/* dst[i] = src[i] rounded to nearest (as NumPy's astype): results out of the work arrays,
 * eight values an instruction in the AVX2 clone. */
static BN_CLONES void bn_narrow_f64(const double *restrict src, float *restrict dst,
                                    ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i < n; i++)
        dst[i] = (float)src[i];
}

#if BN_HAVE_V4
/* bn_v4d_total(lo + hi) of an eight-lane accumulator: that of the two four-lane ones
 * (lanes 0-3 and 4-7) an AVX2 loop keeps for the same eight values a step. */
BN_V4 static inline double bn_v8d_total(__m512d v)
{
    __m256d t = _mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
    bn_v4d u;
    memcpy(&u, &t, sizeof u);
    return (u[0] + u[2]) + (u[1] + u[3]);
}

/* bn_v4d_total((a0 + a1) + (a2 + a3)) of four four-lane accumulators held as two
 * eight-lane ones, a = a0|a1 and b = a2|a3 (bn_seg_bwd_sums_body's, on eight lanes). */
BN_V4 static inline double bn_v8d_pair_total(__m512d a, __m512d b)
{
    __m256d s = _mm256_add_pd(_mm512_castpd512_pd256(a), _mm512_extractf64x4_pd(a, 1));
    __m256d t = _mm256_add_pd(_mm512_castpd512_pd256(b), _mm512_extractf64x4_pd(b, 1));
    __m256d v = _mm256_add_pd(s, t);
    bn_v4d u;
    memcpy(&u, &v, sizeof u);
    return (u[0] + u[2]) + (u[1] + u[3]);
}
#endif

/* One vector of the float affine with per-value parameters from tables (hi + lo the mean
 * split in two floats, k the scale, b the shift, all at the value's index):
 * q[0..8) = ((p - hi) - lo) * k + b, bn_seg_affine's float expression. */
BN_INLINE void bn_tab8_affine(const float *p, float *q, const float *hi, const float *lo,
                              const float *k, const float *b)
{
    bn_v8f v_, h_, l_, k_, b_;
    memcpy(&v_, p, sizeof v_);
    memcpy(&h_, hi, sizeof h_);
    memcpy(&l_, lo, sizeof l_);
    memcpy(&k_, k, sizeof k_);
    memcpy(&b_, b, sizeof b_);
    v_ = ((v_ - h_) - l_) * k_ + b_;
    memcpy(q, &v_, sizeof v_);
}

/* M2 = sdd - sd^2 / n of n values u from sd = sum(u), sdd = sum(u^2): 0 where rounding
 * left it below (a constant run), NaN where the data hold NaN or inf, and inf where the
 * squares of finite data overflowed (a spread past ~1e154: sdd and sd^2 / n both inf,
 * whose difference would be NaN where NumPy's var is inf). */
BN_INLINE double bn_m2_of(double n, double sd, double sdd)
{
    const double v = sdd - sd * (sd / n);
    if (v != v && isfinite(sd) && sdd == INFINITY)
        return INFINITY;
    return v < 0 ? 0.0 : v;
}

/* Finish corrected two-pass moments from mean0, sum(d), sum(d*d) over n values. */
BN_INLINE void bn_finish_block(double n, double mean0, double sd, double sdd,
                               double *mean, double *m2)
{
    *mean = isfinite(mean0) ? mean0 + sd / n : mean0;
    *m2 = bn_m2_of(n, sd, sdd);
}

/* q and r of one row's layer/RMS norm dx = g * invstd + (x - mean) * q + r, from the row
 * sums sg = sum(dy * w), sx = sum(dy * (x - mean) * w) over d values (bn_row_bwd). The
 * 1/d multiplies are off the critical path: two divisions by d waited on the sums, and dx
 * waits on them. */
BN_INLINE void bn_row_bwd_qr(double sg, double sx, ptrdiff_t d, double invstd, int rms,
                             double *q, double *r)
{
    const double inv_d = 1.0 / (double)d;
    const double mg = rms ? 0.0 : sg * inv_d;
    const double mgx = sx * invstd * inv_d;
    *q = -invstd * invstd * mgx;
    *r = -invstd * mg;
}

#define BN_BWD_TILE 128       /* columns whose sums bn_rows_bwd_tile keeps in L1 at a time */
#define BN_SMALL_GROUP 4096   /* values: at most, in the NCHW groups that go many per call */
#define BN_GROUP_RUN 64       /* blocks per phase of bn_group_blocks, at most */

/* Instantiate the element-type specific kernels for float and double. */
#define BN_T float
#define BN_T_IS_FLOAT 1
#define BN_SFX f32
#include "bn_kernels_impl.h"
#undef BN_T
#undef BN_T_IS_FLOAT
#undef BN_SFX

#define BN_T double
#define BN_T_IS_FLOAT 0
#define BN_SFX f64
#include "bn_kernels_impl.h"
#undef BN_T
#undef BN_T_IS_FLOAT
#undef BN_SFX

#if !BN_HAVE_V4   /* one path: the names the modules call resolve to it */
#define bn_row_bwd_v4_f32 bn_row_bwd_f32
#define bn_row_bwd_v4_f64 bn_row_bwd_f64
#define bn_row_bwd2_v4_f32 bn_row_bwd2_f32
#define bn_row_bwd2_v4_f64 bn_row_bwd2_f64
#define bn_row_bwd_sums_v4_f32 bn_row_bwd_sums_f32
#define bn_row_bwd_sums_v4_f64 bn_row_bwd_sums_f64
#define bn_rows_bwd_tile_v4_f32 bn_rows_bwd_tile_f32
#define bn_rows_bwd_tile_v4_f64 bn_rows_bwd_tile_f64
#endif

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

#endif /* BNCORE_KERNELS_H */
