# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Output arrays placed apart from the inputs their kernel reads in step with them.

A kernel that reads x[i] (and dy[i]) while it writes y[i] stalls when y starts 1..256
bytes past x modulo 4096: a core checks each load against the stores still in flight on
the low 12 address bits only, so every load a line or so ahead of the last store looks as
if it might read that store and waits for it ("4K aliasing"). Measured on this machine
(paired, same inputs): NCHW batch-norm training 1.16x slower with y 16 bytes past x and
1.99x at 32, layer norm of (65536, 64) rows 1.09x / 1.47x, channels-last group norm
1.14x / 1.83x, channels-last batch-norm backward 1.24x at 32; 256 bytes or more apart,
or exactly level, cost nothing measurable.

It is the common case, not a corner: glibc serves big arrays from the heap once its
mmap threshold has risen (after the first big free), and two blocks of a page-multiple
size allocated one after the other start 16 bytes apart modulo 4096, so an output
allocated right after its input trails it by 16 bytes, and in a loop by 16 or 32 on
alternate calls (15 of the 38 cases of `python -m bncore bench` did).

So the outputs bncore allocates come from a NumPy memory handler (NEP 49) that asks the
heap for 4 KiB + 128 bytes more and starts the array at the first of eight 64-byte
aligned places 512 bytes apart that trails none of the inputs (each input rules out at
most two). The array owns its memory as any other (its handler frees it); the same size
is asked for on every call of a loop, so the heap hands the same block back and no page
is faulted in again. Arrays of 4 MiB or more get transparent huge pages as NumPy's own
allocator gives them. Small outputs (under 64 KiB) come from NumPy's allocator as usual.

Above 32 MiB glibc no longer keeps freed blocks: each one goes back to the operating
system, and the next array of that size is a fresh mapping whose pages the kernel faults
in and zeroes on first touch, a second write of the whole output. A (256, 256, 14, 14)
float32 training forward spent 11.2 ms that way against 6.0 ms into a reused out= (the
zeroing alone cost as much as a copy). So the handler keeps up to four such freed
blocks, at most `cache_limit()` bytes in all (256 MiB unless BNCORE_OUTPUT_CACHE_MB says
otherwise at import; 0 turns it off), and hands one back for a request of its size (up to
1/8 larger): the same shape in a loop reuses its pages. When all four are taken, a
block not asked for in the last eight big requests (a shape the program has moved on
from) makes room for the newest. `bncore.release_memory()` gives them back to the system.
Scratch blocks (empty_scratch: a float16 call's float32 copies of its inputs) are kept
from 1 MiB (BN_SCRATCH_MIN) on the same terms.

The module also widens float16 to float32 and rounds it back (half_to_float,
float_to_half: bn_half.h, F16C or portable, NumPy's bits), on the call's threads.
"""
cimport numpy as cnp
from cpython.pycapsule cimport PyCapsule_New

cnp.import_array()

cdef extern from *:
    """
    #include <stdint.h>
    #include <stdlib.h>
    #include <string.h>
    #if defined(__linux__)
    #include <sys/mman.h>
    #endif

    #define BN_ALIAS_SPAN 4096u   /* a load is checked against stores on address bits 11:0 */
    #define BN_ALIAS_NEAR 256u    /* trailing an input by 1..this many bytes stalls its loads */
    #define BN_APART_STEP 512u
    #define BN_APART_HDR 64u      /* the block's address, the array's size, the block's
                                     size and whether it is scratch, before it */
    #define BN_CACHE_MIN ((size_t)32 << 20)   /* glibc's largest mmap threshold */
    #define BN_SCRATCH_MIN ((size_t)1 << 20)  /* scratch blocks (empty_scratch) kept from */
    #define BN_CACHE_SLOTS 4
    #define BN_CACHE_STALE 8      /* big requests since a block came back: then it may go */

    static __thread size_t bn_apart_inputs[2];   /* set around each allocation */
    static __thread int bn_apart_scratch;         /* set around a scratch allocation */

    /* freed blocks of BN_CACHE_MIN bytes or more, kept for reuse (see the module notes);
     * arrays can be freed on any thread: a spin lock guards the slots */
    static char *bn_cache_raw[BN_CACHE_SLOTS];
    static size_t bn_cache_cap[BN_CACHE_SLOTS];
    static size_t bn_cache_when[BN_CACHE_SLOTS];   /* bn_cache_clock when it came back */
    static size_t bn_cache_clock;                  /* requests of BN_CACHE_MIN or more */
    static size_t bn_cache_bytes, bn_cache_limit = (size_t)256 << 20;
    static char bn_cache_busy;

    static void bn_cache_lock(void)
    {
        while (__atomic_test_and_set(&bn_cache_busy, __ATOMIC_ACQUIRE))
            ;
    }

    static void bn_cache_unlock(void)
    {
        __atomic_clear(&bn_cache_busy, __ATOMIC_RELEASE);
    }

    /* A cached block of at least `need` bytes and at most 1/8 more (the smallest such),
     * taken out of the cache, or NULL; its size in *cap. */
    static char *bn_cache_take(size_t need, size_t *cap, int scratch)
    {
        char *raw = NULL;
        int best = -1;
        if (need < (scratch ? BN_SCRATCH_MIN : BN_CACHE_MIN))
            return NULL;
        bn_cache_lock();
        bn_cache_clock++;
        for (int k = 0; k < BN_CACHE_SLOTS; k++)
            if (bn_cache_raw[k] != NULL && bn_cache_cap[k] >= need &&
                    bn_cache_cap[k] - need <= need / 8 &&
                    (best < 0 || bn_cache_cap[k] < bn_cache_cap[best]))
                best = k;
        if (best >= 0) {
            raw = bn_cache_raw[best];
            *cap = bn_cache_cap[best];
            bn_cache_raw[best] = NULL;
            bn_cache_bytes -= *cap;
        }
        bn_cache_unlock();
        return raw;
    }

    /* Keep a freed block of cap bytes for reuse when there is room, else free it. Blocks
     * that came back BN_CACHE_STALE or more big requests ago and were not asked for since
     * (shapes a program has moved on from) make room, the oldest first: without that, four
     * blocks of sizes no longer used kept every new size out for good, and each of its
     * calls paid for a fresh mapping (a (64, 64, 56, 56) training forward 9.9 ms instead of
     * 2.9). Blocks in use by a loop over up to four sizes come back within a few requests
     * and stay. */
    static void bn_cache_give(char *raw, size_t cap, int scratch)
    {
        char *evicted[BN_CACHE_SLOTS] = {NULL};
        int nev = 0;
        if (cap >= (scratch ? BN_SCRATCH_MIN : BN_CACHE_MIN) && cap <= bn_cache_limit) {
            bn_cache_lock();
            for (;;) {
                int free_slot = -1, oldest = -1;
                for (int k = 0; k < BN_CACHE_SLOTS; k++) {
                    if (bn_cache_raw[k] == NULL)
                        free_slot = k;
                    else if (bn_cache_clock - bn_cache_when[k] >= BN_CACHE_STALE &&
                             (oldest < 0 || bn_cache_when[k] < bn_cache_when[oldest]))
                        oldest = k;
                }
                if (free_slot >= 0 && bn_cache_bytes + cap <= bn_cache_limit) {
                    bn_cache_raw[free_slot] = raw;
                    bn_cache_cap[free_slot] = cap;
                    bn_cache_when[free_slot] = bn_cache_clock;
                    bn_cache_bytes += cap;
                    raw = NULL;
                    break;
                }
                if (oldest < 0)
                    break;
                evicted[nev++] = bn_cache_raw[oldest];
                bn_cache_bytes -= bn_cache_cap[oldest];
                bn_cache_raw[oldest] = NULL;
            }
            bn_cache_unlock();
        }
        free(raw);
        for (int k = 0; k < nev; k++)
            free(evicted[k]);
    }

    /* Free every cached block (and set the limit, when limit != (size_t)-1); returns the
     * bytes given back. */
    static size_t bn_cache_release(size_t limit)
    {
        char *raw[BN_CACHE_SLOTS];
        size_t freed;
        bn_cache_lock();
        for (int k = 0; k < BN_CACHE_SLOTS; k++) {
            raw[k] = bn_cache_raw[k];
            bn_cache_raw[k] = NULL;
        }
        freed = bn_cache_bytes;
        bn_cache_bytes = 0;
        if (limit != (size_t)-1)
            bn_cache_limit = limit;
        bn_cache_unlock();
        for (int k = 0; k < BN_CACHE_SLOTS; k++)
            free(raw[k]);
        return freed;
    }

    static int bn_trails(uintptr_t out, uintptr_t in)
    {
        uintptr_t d = (out - in) % BN_ALIAS_SPAN;
        return in != 0 && d != 0 && d <= BN_ALIAS_NEAR;
    }

    static void *bn_apart_malloc(void *ctx, size_t size)
    {
        (void)ctx;
        if (size > SIZE_MAX - BN_ALIAS_SPAN - 2 * BN_APART_HDR)
            return NULL;
        size_t cap = size + BN_ALIAS_SPAN + 2 * BN_APART_HDR;
        char *raw = bn_cache_take(cap, &cap, bn_apart_scratch);
        if (raw == NULL)
            raw = (char *)malloc(cap);
        if (raw == NULL)
            return NULL;
        uintptr_t first = ((uintptr_t)raw + BN_APART_HDR + 63) & ~(uintptr_t)63, p = first;
        for (unsigned k = 0; k < 8; k++, p += BN_APART_STEP)
            if (!bn_trails(p, bn_apart_inputs[0]) && !bn_trails(p, bn_apart_inputs[1]))
                break;
        if (p >= first + 8 * BN_APART_STEP)   /* none (cannot happen with two inputs) */
            p = first;
        ((void **)p)[-1] = raw;
        ((size_t *)p)[-2] = size;
        ((size_t *)p)[-3] = cap;
        ((size_t *)p)[-4] = (size_t)bn_apart_scratch;
    #if defined(__linux__) && defined(MADV_HUGEPAGE)
        if (size >= ((size_t)1 << 22)) {   /* as NumPy's allocator does */
            uintptr_t a = (p + 4095) & ~(uintptr_t)4095, e = (p + size) & ~(uintptr_t)4095;
            if (e > a)
                madvise((void *)a, e - a, MADV_HUGEPAGE);
        }
    #endif
        return (void *)p;
    }

    static void *bn_apart_calloc(void *ctx, size_t nelem, size_t elsize)
    {
        if (elsize != 0 && nelem > SIZE_MAX / elsize)
            return NULL;
        void *p = bn_apart_malloc(ctx, nelem * elsize);
        if (p != NULL)
            memset(p, 0, nelem * elsize);
        return p;
    }

    static void bn_apart_free(void *ctx, void *ptr, size_t size)
    {
        (void)ctx; (void)size;
        if (ptr != NULL)
            bn_cache_give((char *)((void **)ptr)[-1], ((size_t *)ptr)[-3],
                          (int)((size_t *)ptr)[-4]);
    }

    static void *bn_apart_realloc(void *ctx, void *ptr, size_t new_size)
    {
        if (ptr == NULL)
            return bn_apart_malloc(ctx, new_size);
        void *q = bn_apart_malloc(ctx, new_size);
        if (q == NULL)
            return NULL;
        size_t old = ((size_t *)ptr)[-2];
        memcpy(q, ptr, old < new_size ? old : new_size);
        bn_apart_free(ctx, ptr, old);
        return q;
    }

    static PyDataMem_Handler bn_apart_handler = {
        "bncore_apart", 1,
        {NULL, bn_apart_malloc, bn_apart_calloc, bn_apart_realloc, bn_apart_free}
    };
    """
    ctypedef struct PyDataMem_Handler:
        pass
    PyDataMem_Handler bn_apart_handler
    size_t bn_apart_inputs[2]
    int bn_apart_scratch
    size_t bn_cache_bytes, bn_cache_limit
    size_t bn_cache_release(size_t limit)
    object PyDataMem_SetHandler(object handler)

cdef enum:
    APART_MIN = 65536   # smaller outputs: NumPy's allocator (and its cache of small blocks)

cdef object _handler = PyCapsule_New(<void *>&bn_apart_handler, "mem_handler", NULL)


cdef inline size_t _address(object a) noexcept:
    return 0 if a is None else <size_t>cnp.PyArray_DATA(<cnp.ndarray>a)


cdef object empty_apart(int nd, cnp.npy_intp *dims, int typenum, object a, object b):
    """An uninitialised C-contiguous array (nd, dims, typenum) that trails neither input
    a nor b (ndarrays or None) by 1..256 bytes modulo 4096 (see the module notes)."""
    cdef cnp.npy_intp n = 1
    cdef int i
    cdef object old, y
    for i in range(nd):
        n *= dims[i]
    if n * cnp.PyArray_DescrFromType(typenum).itemsize < APART_MIN:
        return cnp.PyArray_EMPTY(nd, dims, typenum, 0)
    bn_apart_inputs[0] = _address(a)
    bn_apart_inputs[1] = _address(b)
    old = PyDataMem_SetHandler(_handler)
    try:
        y = cnp.PyArray_EMPTY(nd, dims, typenum, 0)
    finally:
        PyDataMem_SetHandler(old)
        bn_apart_inputs[0] = bn_apart_inputs[1] = 0
    return y


cdef object empty_scratch(int nd, cnp.npy_intp *dims, int typenum, object a, object b):
    """empty_apart for a call's own working copy (float16 input widened to float32): kept
    for reuse when freed from 1 MiB (BN_SCRATCH_MIN), not only from 32 MiB. A float16
    batch-norm backward of (32, 64, 56, 56) holds two 25 MiB float32 copies and its 12 MiB
    result; freed to the heap, the three outgrew glibc's trim threshold (twice its raised
    mmap threshold) and went back to the system after every call, to be faulted in again
    on the next (1,272 pages a call, 14 ms against 3.6 with the copies kept)."""
    global bn_apart_scratch
    bn_apart_scratch = 1
    try:
        return empty_apart(nd, dims, typenum, a, b)
    finally:
        bn_apart_scratch = 0


def empty_like_apart(shape, dtype, a=None, b=None):
    """empty_apart for the Python layer: a C-contiguous array of shape and dtype."""
    cdef cnp.dtype dt = cnp.dtype(dtype)
    cdef tuple sh
    try:
        sh = tuple(shape)
    except TypeError:   # an int
        sh = (shape,)
    cdef cnp.npy_intp dims[32]
    cdef int i
    if len(sh) > 32:
        import numpy as np
        return np.empty(sh, dt)
    for i in range(len(sh)):
        dims[i] = sh[i]
    return empty_apart(len(sh), dims, dt.type_num, a, b)


def release_memory():
    """Give the freed big output blocks bncore keeps for reuse back to the system (see
    bncore._outputs); returns the number of bytes released."""
    return bn_cache_release(<size_t>-1)


def cache_limit(limit=None):
    """The most bytes of freed output blocks kept for reuse; with ``limit`` (an int >= 0,
    0 keeps none; more than memory can hold means no limit), set it first (cached blocks
    are released). Returns the limit in force."""
    if limit is not None:
        limit = int(limit)
        if limit < 0:
            raise ValueError(f"bncore: cache_limit must be >= 0, got {limit}")
        bn_cache_release(<size_t>min(limit, <size_t>-2))   # -1 means "keep the limit"
    return bn_cache_limit


def cached_bytes():
    """Bytes of freed output blocks currently kept for reuse."""
    return bn_cache_bytes


def _limit_from_environment():
    import os
    v = os.environ.get("BNCORE_OUTPUT_CACHE_MB")
    if v is None:
        return
    try:
        mb = float(v)
    except ValueError:
        mb = -1.0
    if not 0 <= mb < float("inf"):   # nan, negative or infinite
        import warnings
        warnings.warn(f"bncore: ignoring BNCORE_OUTPUT_CACHE_MB={v!r} (want a number of "
                      "MiB >= 0)", RuntimeWarning, stacklevel=2)
        return
    cache_limit(int(mb * (1 << 20)))


_limit_from_environment()


# ------------------------------------------------------------------ float16 in and out

import numpy as np
from libc.stdint cimport uint16_t
from cython.parallel cimport prange
from bncore._openmp cimport team_threads, work_threads

cdef extern from "bn_half.h" nogil:
    void bn_init_f16c()
    int bn_f16c_on()
    int bn_set_f16c(int on)
    int bn_set_half_level(int level)
    void bn_half_to_float(const uint16_t *x, float *y, Py_ssize_t n)
    void bn_float_to_half(const float *x, uint16_t *y, Py_ssize_t n)

bn_init_f16c()

cdef enum:
    CONVERT_CHUNK = 32768   # values per parallel piece (elementwise: any split, same bits)
    CONVERT_SERIAL = 65536  # fewer values: one thread


def _f16c():
    """Whether this module's float16 conversions use F16C (bncore._config.config)."""
    return bool(bn_f16c_on())


def _set_f16c(bint on):
    """This module's float16 conversions with F16C (where the CPU has it) or portable;
    returns the old setting (see bncore._config.use_f16c)."""
    return bool(bn_set_f16c(on))


def _set_half_level(int level):
    """This module's float16 code level (only 0 and not 0 differ here: its conversions);
    returns the old one (see bncore._config.half_level)."""
    return bn_set_half_level(level)


cdef bint _dense(cnp.ndarray a):
    """Whether a's values fill its memory with no gaps, in some order of its axes
    (positive strides)."""
    cdef int i, j, k, nd = cnp.PyArray_NDIM(a)
    cdef cnp.npy_intp *st = cnp.PyArray_STRIDES(a)
    cdef cnp.npy_intp *sh = cnp.PyArray_DIMS(a)
    cdef cnp.npy_intp expect = cnp.PyArray_ITEMSIZE(a), best = 0
    cdef bint used[32]
    if cnp.PyArray_IS_C_CONTIGUOUS(a) or cnp.PyArray_IS_F_CONTIGUOUS(a):
        return True
    if nd > 32:
        return False
    for i in range(nd):
        used[i] = sh[i] == 1
        if sh[i] == 0:
            return True
    for k in range(nd):   # the axes by stride, each the size of the ones before
        j = -1
        for i in range(nd):
            if not used[i] and (j < 0 or st[i] < best):
                j = i
                best = st[i]
        if j < 0:
            break
        if st[j] != expect:
            return False
        used[j] = True
        expect *= sh[j]
    return True


cdef bint _same_order(cnp.ndarray a, cnp.ndarray b):
    """a and b dense, of one shape, their values in the same order in memory."""
    cdef int i, nd = cnp.PyArray_NDIM(a)
    if nd != cnp.PyArray_NDIM(b) or not _dense(a) or not _dense(b):
        return False
    for i in range(nd):
        if cnp.PyArray_DIMS(a)[i] != cnp.PyArray_DIMS(b)[i]:
            return False
        if (cnp.PyArray_DIMS(a)[i] > 1 and cnp.PyArray_STRIDES(a)[i] * cnp.PyArray_ITEMSIZE(b)
                != cnp.PyArray_STRIDES(b)[i] * cnp.PyArray_ITEMSIZE(a)):
            return False
    return True


cdef void _convert(const void *src, void *dst, Py_ssize_t n, bint widen,
                   int n_threads) noexcept nogil:
    cdef Py_ssize_t k, nchunks = (n + CONVERT_CHUNK - 1) // CONVERT_CHUNK, i0, m
    cdef int nt = work_threads(n_threads, nchunks, n, CONVERT_SERIAL)
    for k in prange(nchunks, schedule='static', num_threads=team_threads(nt, n_threads)):
        i0 = k * CONVERT_CHUNK
        m = min(<Py_ssize_t>CONVERT_CHUNK, n - i0)
        if widen:
            bn_half_to_float(<const uint16_t *>src + i0, <float *>dst + i0, m)
        else:
            bn_float_to_half(<const float *>src + i0, <uint16_t *>dst + i0, m)


def half_to_float(cnp.ndarray x, int n_threads, other=None):
    """x (float16, native byte order) as a new float32 array, its values in x's memory
    order when x is dense (NumPy's astype there; bit for bit the same values), placed
    apart from ``other`` (the call's other float32 copy, read in step with this one)."""
    cdef cnp.ndarray y
    if not (cnp.PyArray_ISNOTSWAPPED(x) and _dense(x)):
        return x.astype(np.float32)
    if cnp.PyArray_IS_C_CONTIGUOUS(x):
        y = empty_scratch(cnp.PyArray_NDIM(x), cnp.PyArray_DIMS(x), cnp.NPY_FLOAT32, x,
                          other)
    else:
        y = np.empty_like(x, np.float32)   # order 'K': x's order of axes
        if not _same_order(x, y):
            return x.astype(np.float32)
    with nogil:
        _convert(cnp.PyArray_DATA(x), cnp.PyArray_DATA(y), cnp.PyArray_SIZE(x), True,
                 n_threads)
    return y


def float_to_half(cnp.ndarray y, out, int n_threads):
    """y (float32, native) rounded to float16: into out (float16, y's shape) when given,
    else into a new array with y's memory order; returns it (NumPy's astype or copyto
    where the orders differ; the same bits)."""
    cdef cnp.ndarray h
    if out is None:
        if not _dense(y) or not cnp.PyArray_ISNOTSWAPPED(y):
            return y.astype(np.float16)
        h = np.empty_like(y, np.float16)
        if not _same_order(y, h):
            return y.astype(np.float16)
    else:
        h = out
        if not (cnp.PyArray_ISNOTSWAPPED(y) and cnp.PyArray_ISNOTSWAPPED(h)
                and cnp.PyArray_TYPE(h) == cnp.NPY_FLOAT16 and _same_order(y, h)):
            np.copyto(h, y, casting="unsafe")
            return h
    with nogil:
        _convert(cnp.PyArray_DATA(y), cnp.PyArray_DATA(h), cnp.PyArray_SIZE(y), False,
                 n_threads)
    return h
