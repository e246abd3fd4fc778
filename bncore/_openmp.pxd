# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""OpenMP shim: the same .pyx compiles with or without OpenMP (see setup.py)."""

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define BNCORE_HAVE_OPENMP 1
    /* an orphaned barrier: binds to the parallel region of the calling thread */
    static inline void bncore_barrier(void) {
    #pragma omp barrier
    }
    #else
    #define BNCORE_HAVE_OPENMP 0
    static int omp_get_max_threads(void) { return 1; }
    static int omp_get_num_procs(void) { return 1; }
    static int omp_get_thread_num(void) { return 0; }
    static int omp_get_num_threads(void) { return 1; }
    static inline void bncore_barrier(void) {}
    #endif
    """
    const int BNCORE_HAVE_OPENMP
    int omp_get_max_threads() noexcept nogil
    int omp_get_num_procs() noexcept nogil
    int omp_get_thread_num() noexcept nogil
    int omp_get_num_threads() noexcept nogil
    void bncore_barrier() noexcept nogil


cdef int thread_cap(int n_threads) noexcept nogil


cdef inline int work_threads(int n_threads, Py_ssize_t tasks, Py_ssize_t elems,
                             Py_ssize_t serial_elems) noexcept nogil:
    """Threads worth starting: none beyond the tasks, one for tiny inputs.

    Only the speed depends on this: results never do (the work split is shape-only).
    """
    if elems < serial_elems or tasks <= 1:
        return 1
    return <int>min(<Py_ssize_t>n_threads, tasks)


cdef inline int team_threads(int nt, int n_threads) noexcept nogil:
    """The team to start for a region worth nt threads (work_threads): one thread, or all
    n_threads, the threads beyond nt finding no work.

    libgomp keeps one pool of threads, as large as the last team: a team of 2 <= t < the
    pool ends the pool's other threads, and the next larger team creates them anew
    (pthread_create; a team of 1 leaves the pool alone). One op whose regions start teams
    of 16 and 8 (group-norm backward (128, 64, 14, 14) G=8 NCHW: 205 chunks, then 8 runs
    of samples for the weight gradients) re-created 8 threads on every call: 0.46 ms on 16
    threads against 0.12 without the 8-thread region, slower than on 8 threads (0.24).
    Only the speed depends on this: the work split is the shape's."""
    return 1 if nt <= 1 else n_threads
