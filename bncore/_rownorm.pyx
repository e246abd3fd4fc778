# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Row-wise kernels: layer, group, instance and RMS norm (to be written)."""
