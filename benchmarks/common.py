"""Shared data builders for the asv suites (fixed seeds, both layouts)."""
import numpy as np

SEED = 20261125


def data(shape, dtype, layout="NCHW", seed=SEED):
    """Random input; layout 'NHWC' moves the channel axis (axis 1 of ``shape``) last."""
    if layout == "NHWC":
        shape = (shape[0],) + tuple(shape[2:]) + (shape[1],)
    return np.random.default_rng(seed).normal(1.0, 2.0, shape).astype(dtype)


def channel_axis(layout):
    return 1 if layout == "NCHW" else -1
