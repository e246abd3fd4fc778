# Included by each kernel module (_batchnorm, _rownorm, _stats): each holds its own copy of
# the cache-size thresholds (static in bn_kernels.h), set here at its import from the
# machine's caches and read or set through these (bncore._config gathers them), and its
# switch for the AVX-512 twins (on where the CPU has AVX-512), and its level of float16 code
# (bn_half.h: F16C conversions where the CPU has F16C, kernels that read float16 themselves
# where it also has AVX2 and FMA).
from bncore._kernels cimport (
    bn_far_bytes, bn_init_f16c, bn_init_thresholds, bn_l1_bytes, bn_l2_bytes, bn_set_f16c,
    bn_half_fused, bn_set_half_level,
    bn_set_thresholds, bn_set_v4, bn_stream_bwd, bn_stream_fwd,
)

bn_init_thresholds()
bn_init_f16c()


def _thresholds():
    """This module's (bn_stream_fwd, bn_stream_bwd, bn_far_bytes, bn_l2_bytes, bn_l1_bytes)."""
    return bn_stream_fwd, bn_stream_bwd, bn_far_bytes, bn_l2_bytes, bn_l1_bytes


def _set_thresholds(Py_ssize_t fwd, Py_ssize_t bwd, Py_ssize_t far, Py_ssize_t l2,
                    Py_ssize_t l1):
    """Set this module's thresholds (see bncore._config.set_thresholds)."""
    bn_set_thresholds(fwd, bwd, far, l2, l1)


def _set_f16c(bint on):
    """This module's float16 conversions with F16C (where the CPU has it) or portable;
    returns the old setting (see bncore._config.use_f16c)."""
    return bool(bn_set_f16c(on))


def _half_fused():
    """Whether this module's float16 kernels read and write float16 themselves (level 2)."""
    return bool(bn_half_fused())


def _set_half_level(int level):
    """This module's float16 code level (bn_half.h; capped at the CPU's); returns the old
    one (see bncore._config.half_level)."""
    return bn_set_half_level(level)


def _set_avx512(bint on):
    """Let this module's kernels use their AVX-512 twins (where the CPU has them) or not;
    returns the old setting (see bncore._config.use_avx512)."""
    return bool(bn_set_v4(on))
