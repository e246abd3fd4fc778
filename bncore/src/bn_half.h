/* float16 <-> float32 conversions for bncore's float16 inputs and outputs (bncore computes
 * float16 in float32: the input is widened, the float32 kernel runs, the result is rounded
 * back). IEEE binary16, rounding to nearest, ties to even: NumPy's astype, bit for bit
 * (but for the payload bits of signalling NaNs, which the F16C instructions quiet).
 *
 * NumPy's own conversions run a value at a time: 8.8 ms to widen a (32, 64, 56, 56) array
 * and 17.1 ms to round it back, where bncore's float32 training forward of it takes 1.5 ms
 * and PyTorch's float16 one 1.2. With F16C (every x86-64-v3 CPU) eight values go per
 * instruction; elsewhere the portable bit arithmetic below gives the same bits. On
 * x86-64-v3 CPUs some kernels read and write float16 themselves with these instructions
 * (bn_half_fused; the _h16 kernels of bn_kernels_impl.h and bn_cl_bwd_impl.h): the float
 * kernels' arithmetic on the widened values, each result rounded, as here. */
#ifndef BN_HALF_H
#define BN_HALF_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(BNCORE_NO_F16C)
#define BN_HAVE_F16C 1
#include <immintrin.h>
#else
#define BN_HAVE_F16C 0
#endif

/* Which float16 code runs (each module including this header has its own copy: set at
 * its import from the CPU, bn_init_f16c; tests lower it, bn_set_half_level, to check
 * the other paths): 0 the portable conversions and staged kernels; 1 F16C conversions
 * (CPUs with F16C but without AVX2 and FMA); 2 also the kernels that read and write
 * float16 themselves (bn_half_fused: the x86-64-v3 clones of bncore's float kernels,
 * with F16C loads and stores). The bits are the same on every level. */
static int bn_use_f16c __attribute__((unused)) = 0;

static inline int bn_cpu_half_level(void)
{
#if BN_HAVE_F16C
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx") || !__builtin_cpu_supports("f16c"))
        return 0;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 2 : 1;
#else
    return 0;
#endif
}

static inline void bn_init_f16c(void)
{
    bn_use_f16c = bn_cpu_half_level();
}

/* Whether the F16C path runs. */
static inline int bn_f16c_on(void)
{
    return bn_use_f16c > 0;
}

/* Whether the fused float16 kernels run (level 2). */
static inline int bn_half_fused(void)
{
    return bn_use_f16c > 1;
}

/* The level (0-2) where the CPU allows it, else the CPU's; returns the old level. */
static inline int bn_set_half_level(int level)
{
    int old = bn_use_f16c, cpu = bn_cpu_half_level();
    bn_use_f16c = level < cpu ? level : cpu;
    return old;
}

/* F16C on (the CPU's level) or off (0); returns whether it was on. */
static inline int bn_set_f16c(int on)
{
    return bn_set_half_level(on ? 2 : 0) > 0;
}

/* Exact: every binary16 value is a float32 value. NaN payloads are kept (as NumPy). */
static inline float bn_half_to_float1(uint16_t h)
{
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, f;
    float v;
    if (e == 0) {               /* zero or subnormal: m * 2^-24, exact in float */
        v = (float)m * 5.9604644775390625e-08f;
        memcpy(&f, &v, 4);
        f |= s;
    } else if (e == 31) {       /* infinity or NaN */
        f = s | 0x7f800000u | (m << 13);
    } else {
        f = s | ((e + 112u) << 23) | (m << 13);
    }
    memcpy(&v, &f, 4);
    return v;
}

/* Round to nearest binary16, ties to even; beyond the largest (65504) by half a step or
 * more, infinity; NaN stays NaN (quiet, the payload's top bits kept). */
static inline uint16_t bn_float_to_half1(float v)
{
    uint32_t f, a;
    memcpy(&f, &v, 4);
    const uint16_t s = (uint16_t)((f >> 16) & 0x8000u);
    a = f & 0x7fffffffu;
    if (a >= 0x7f800000u)                       /* infinity, NaN */
        return (uint16_t)(s | (a == 0x7f800000u ? 0x7c00u : 0x7e00u | ((a >> 13) & 0x1ffu)));
    if (a >= 0x477ff000u)                       /* 65520 and up: infinity */
        return (uint16_t)(s | 0x7c00u);
    if (a < 0x38800000u) {                      /* under 2^-14: a subnormal step of 2^-24 */
        const uint32_t e = a >> 23;
        if (e < 102u)                           /* under 2^-25: rounds to zero */
            return s;
        const uint32_t m = (a & 0x7fffffu) | 0x800000u, sh = 126u - e;   /* 14..24 */
        uint32_t q = m >> sh;
        const uint32_t rem = m & ((1u << sh) - 1u), half = 1u << (sh - 1u);
        if (rem > half || (rem == half && (q & 1u)))
            q++;
        return (uint16_t)(s | q);               /* q == 0x400: the smallest normal */
    }
    /* normal: rebias the exponent, round 23 mantissa bits to 10 (a carry into the
     * exponent is the right result, up to 0x7bff below 65520) */
    a -= 0x38000000u;
    return (uint16_t)(s | ((a + 0x0fffu + ((a >> 13) & 1u)) >> 13));
}

#if BN_HAVE_F16C
__attribute__((target("avx,f16c")))
static void bn_half_to_float_f16c(const uint16_t *x, float *y, ptrdiff_t n)
{
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m128i a = _mm_loadu_si128((const __m128i *)(x + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(x + i + 8));
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(a));
        _mm256_storeu_ps(y + i + 8, _mm256_cvtph_ps(b));
    }
    for (; i < n; i++)
        y[i] = _cvtsh_ss(x[i]);
}

__attribute__((target("avx,f16c")))
static void bn_float_to_half_f16c(const float *x, uint16_t *y, ptrdiff_t n)
{
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m128i a = _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT);
        __m128i b = _mm256_cvtps_ph(_mm256_loadu_ps(x + i + 8), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(y + i), a);
        _mm_storeu_si128((__m128i *)(y + i + 8), b);
    }
    for (; i < n; i++)
        y[i] = (uint16_t)_cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT);
}
#endif

/* The float32 eval affine of bncore's kernels, y = ((x - hi) - lo) * k + b in float
 * (the mean split hi + lo, k = w * invstd and b rounded to float: bn_planes_affine,
 * bn_cl_affine), on float16 x and y: widened, the float32 kernels' bits, rounded. A plane
 * of n values with one channel's parameters (bn_affine_half), or nrows rows of nch
 * channels (ldx, ldy apart) with a table of each channel's (bn_rows_affine_half). */
static inline float bn_affine1(float v, float hi, float lo, float k, float b)
{
    return ((v - hi) - lo) * k + b;
}

#if BN_HAVE_F16C
__attribute__((target("avx,f16c")))
static inline __m256 bn_affine8(__m256 v, __m256 hi, __m256 lo, __m256 k, __m256 b)
{
    return _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_sub_ps(v, hi), lo), k), b);
}

__attribute__((target("avx,f16c")))
static void bn_affine_half_f16c(const uint16_t *x, uint16_t *y, ptrdiff_t n, float hi,
                                float lo, float k, float b)
{
    const __m256 vh = _mm256_set1_ps(hi), vl = _mm256_set1_ps(lo), vk = _mm256_set1_ps(k);
    const __m256 vb = _mm256_set1_ps(b);
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i)));
        _mm_storeu_si128((__m128i *)(y + i),
                         _mm256_cvtps_ph(bn_affine8(v, vh, vl, vk, vb),
                                         _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < n; i++)
        y[i] = (uint16_t)_cvtss_sh(bn_affine1(_cvtsh_ss(x[i]), hi, lo, k, b),
                                   _MM_FROUND_TO_NEAREST_INT);
}

__attribute__((target("avx,f16c")))
static void bn_rows_affine_half_f16c(const uint16_t *x, ptrdiff_t ldx, uint16_t *y,
                                     ptrdiff_t ldy, ptrdiff_t nrows, ptrdiff_t nch,
                                     const float *hi, const float *lo, const float *k,
                                     const float *b)
{
    for (ptrdiff_t r = 0; r < nrows; r++) {
        const uint16_t *p = x + r * ldx;
        uint16_t *q = y + r * ldy;
        ptrdiff_t c = 0;
        for (; c + 8 <= nch; c += 8) {
            __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + c)));
            v = bn_affine8(v, _mm256_loadu_ps(hi + c), _mm256_loadu_ps(lo + c),
                           _mm256_loadu_ps(k + c), _mm256_loadu_ps(b + c));
            _mm_storeu_si128((__m128i *)(q + c), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
        }
        for (; c < nch; c++)
            q[c] = (uint16_t)_cvtss_sh(bn_affine1(_cvtsh_ss(p[c]), hi[c], lo[c], k[c], b[c]),
                                       _MM_FROUND_TO_NEAREST_INT);
    }
}
#endif

static inline void bn_affine_half(const uint16_t *x, uint16_t *y, ptrdiff_t n, float hi,
                                  float lo, float k, float b)
{
#if BN_HAVE_F16C
    if (bn_use_f16c) {
        bn_affine_half_f16c(x, y, n, hi, lo, k, b);
        return;
    }
#endif
    for (ptrdiff_t i = 0; i < n; i++)
        y[i] = bn_float_to_half1(bn_affine1(bn_half_to_float1(x[i]), hi, lo, k, b));
}

static inline void bn_rows_affine_half(const uint16_t *x, ptrdiff_t ldx, uint16_t *y,
                                       ptrdiff_t ldy, ptrdiff_t nrows, ptrdiff_t nch,
                                       const float *hi, const float *lo, const float *k,
                                       const float *b)
{
#if BN_HAVE_F16C
    if (bn_use_f16c) {
        bn_rows_affine_half_f16c(x, ldx, y, ldy, nrows, nch, hi, lo, k, b);
        return;
    }
#endif
    for (ptrdiff_t r = 0; r < nrows; r++)
        for (ptrdiff_t c = 0; c < nch; c++)
            y[r * ldy + c] = bn_float_to_half1(bn_affine1(bn_half_to_float1(x[r * ldx + c]),
                                                          hi[c], lo[c], k[c], b[c]));
}

/* n values, x to y (contiguous) */
static inline void bn_half_to_float(const uint16_t *x, float *y, ptrdiff_t n)
{
#if BN_HAVE_F16C
    if (bn_use_f16c) {
        bn_half_to_float_f16c(x, y, n);
        return;
    }
#endif
    for (ptrdiff_t i = 0; i < n; i++)
        y[i] = bn_half_to_float1(x[i]);
}

static inline void bn_float_to_half(const float *x, uint16_t *y, ptrdiff_t n)
{
#if BN_HAVE_F16C
    if (bn_use_f16c) {
        bn_float_to_half_f16c(x, y, n);
        return;
    }
#endif
    for (ptrdiff_t i = 0; i < n; i++)
        y[i] = bn_float_to_half1(x[i]);
}
#endif
