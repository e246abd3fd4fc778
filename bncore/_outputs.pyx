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
    #define BN_APART_HDR 64u      /* the block's address and the array's size, before it */

    static __thread size_t bn_apart_inputs[2];   /* set around each allocation */

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
        char *raw = (char *)malloc(size + BN_ALIAS_SPAN + 2 * BN_APART_HDR);
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
            free(((void **)ptr)[-1]);
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
