# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Output arrays placed apart from the inputs their kernel reads in step with them."""
cimport numpy as cnp

cdef object empty_apart(int nd, cnp.npy_intp *dims, int typenum, object a, object b)
