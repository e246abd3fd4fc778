"""asv: layer, RMS, group and instance norm.

Per op, a forward suite (the op, and its ``_forward`` that also returns the saved
statistics) and a backward suite (time and peak memory); the split keeps each suite's
setup to the data it needs. Every suite skips (NotImplementedError in setup, asv's
convention) while bncore does not have its op.
"""
import numpy as np

import bncore

from .common import channel_axis, data

DTYPES = ["float32", "float64"]
THREADS = [1, 2]
# transformer rows; many short rows; a few wide rows (their backward goes by column
# tiles); a few short rows (the backward's 8 row chunks)
ROW_SHAPES = [(8192, 768), (65536, 64), (64, 4096), (1024, 64)]
# ...; batch 1; wide groups over 7x7 (16 channels a group at G=32: group statistics
# straight from each block when channels-last); 14x14 planes in small NCHW groups (many
# blocks a kernel call, dx in address order)
SPATIAL_SHAPES = [(32, 64, 56, 56), (8, 32, 16, 16), (1, 64, 56, 56), (32, 512, 7, 7),
                  (128, 64, 14, 14)]
LAYOUTS = ["NCHW", "NHWC"]
GROUPS = 32


def _need(name):
    if not hasattr(bncore, name):
        raise NotImplementedError(f"bncore has no {name} yet")


class _Rows:
    params = (DTYPES, ROW_SHAPES, THREADS)
    param_names = ["dtype", "shape", "n_threads"]

    def _data(self, dtype, shape, backward):
        self.x = data(shape, dtype)
        self.dy = data(shape, dtype, seed=1) if backward else None
        self.d = shape[-1]
        self.w, self.b = np.ones(self.d, dtype), np.zeros(self.d, dtype)


class _Spatial:
    params = (DTYPES, SPATIAL_SHAPES, LAYOUTS, THREADS)
    param_names = ["dtype", "shape", "layout", "n_threads"]

    def _data(self, dtype, shape, layout, backward):
        self.axis = channel_axis(layout)
        self.x = data(shape, dtype, layout)
        self.dy = data(shape, dtype, layout, seed=1) if backward else None
        self.w, self.b = np.ones(shape[1], dtype), np.zeros(shape[1], dtype)


# ---------------------------------------------------------------------- layer norm

class LayerNorm(_Rows):
    def setup(self, dtype, shape, n_threads):
        _need("layer_norm")
        self._data(dtype, shape, backward=False)

    def time_layer_norm(self, dtype, shape, n_threads):
        bncore.layer_norm(self.x, self.d, self.w, self.b, n_threads=n_threads)

    def time_layer_norm_forward(self, dtype, shape, n_threads):
        bncore.layer_norm_forward(self.x, self.d, self.w, self.b, n_threads=n_threads)


class LayerNormBackward(_Rows):
    def setup(self, dtype, shape, n_threads):
        _need("layer_norm_backward")
        self._data(dtype, shape, backward=True)
        _, self.mean, self.invstd = bncore.layer_norm_forward(self.x, self.d, self.w, self.b)

    def time_layer_norm_backward(self, dtype, shape, n_threads):
        bncore.layer_norm_backward(self.dy, self.x, self.mean, self.invstd, self.d, self.w,
                                   n_threads=n_threads)

    def peakmem_layer_norm_backward(self, dtype, shape, n_threads):
        bncore.layer_norm_backward(self.dy, self.x, self.mean, self.invstd, self.d, self.w,
                                   n_threads=n_threads)


# ------------------------------------------------------------------------ RMS norm

class RMSNorm(_Rows):
    def setup(self, dtype, shape, n_threads):
        _need("rms_norm")
        self._data(dtype, shape, backward=False)

    def time_rms_norm(self, dtype, shape, n_threads):
        bncore.rms_norm(self.x, self.d, self.w, n_threads=n_threads)

    def time_rms_norm_forward(self, dtype, shape, n_threads):
        bncore.rms_norm_forward(self.x, self.d, self.w, n_threads=n_threads)


class RMSNormBackward(_Rows):
    def setup(self, dtype, shape, n_threads):
        _need("rms_norm_backward")
        self._data(dtype, shape, backward=True)
        _, self.invrms = bncore.rms_norm_forward(self.x, self.d, self.w)

    def time_rms_norm_backward(self, dtype, shape, n_threads):
        bncore.rms_norm_backward(self.dy, self.x, self.invrms, self.d, self.w,
                                 n_threads=n_threads)

    def peakmem_rms_norm_backward(self, dtype, shape, n_threads):
        bncore.rms_norm_backward(self.dy, self.x, self.invrms, self.d, self.w,
                                 n_threads=n_threads)


# ---------------------------------------------------------------------- group norm

class GroupNorm(_Spatial):
    def setup(self, dtype, shape, layout, n_threads):
        _need("group_norm")
        self._data(dtype, shape, layout, backward=False)

    def time_group_norm(self, dtype, shape, layout, n_threads):
        bncore.group_norm(self.x, GROUPS, self.w, self.b, axis=self.axis, n_threads=n_threads)

    def time_group_norm_forward(self, dtype, shape, layout, n_threads):
        bncore.group_norm_forward(self.x, GROUPS, self.w, self.b, axis=self.axis,
                                  n_threads=n_threads)


class GroupNormBackward(_Spatial):
    def setup(self, dtype, shape, layout, n_threads):
        _need("group_norm_backward")
        self._data(dtype, shape, layout, backward=True)
        _, self.mean, self.invstd = bncore.group_norm_forward(self.x, GROUPS, self.w, self.b,
                                                              axis=self.axis)

    def time_group_norm_backward(self, dtype, shape, layout, n_threads):
        bncore.group_norm_backward(self.dy, self.x, self.mean, self.invstd, GROUPS, self.w,
                                   axis=self.axis, n_threads=n_threads)

    def peakmem_group_norm_backward(self, dtype, shape, layout, n_threads):
        bncore.group_norm_backward(self.dy, self.x, self.mean, self.invstd, GROUPS, self.w,
                                   axis=self.axis, n_threads=n_threads)


# ------------------------------------------------------------------- instance norm

class InstanceNorm(_Spatial):
    def setup(self, dtype, shape, layout, n_threads):
        _need("instance_norm")
        self._data(dtype, shape, layout, backward=False)

    def time_instance_norm(self, dtype, shape, layout, n_threads):
        bncore.instance_norm(self.x, weight=self.w, bias=self.b, axis=self.axis,
                             n_threads=n_threads)

    def time_instance_norm_forward(self, dtype, shape, layout, n_threads):
        bncore.instance_norm_forward(self.x, self.w, self.b, axis=self.axis,
                                     n_threads=n_threads)


class InstanceNormBackward(_Spatial):
    def setup(self, dtype, shape, layout, n_threads):
        _need("instance_norm_backward")
        self._data(dtype, shape, layout, backward=True)
        _, self.mean, self.invstd = bncore.instance_norm_forward(self.x, self.w, self.b,
                                                                 axis=self.axis)

    def time_instance_norm_backward(self, dtype, shape, layout, n_threads):
        bncore.instance_norm_backward(self.dy, self.x, self.mean, self.invstd, self.w,
                                      axis=self.axis, n_threads=n_threads)

    def peakmem_instance_norm_backward(self, dtype, shape, layout, n_threads):
        bncore.instance_norm_backward(self.dy, self.x, self.mean, self.invstd, self.w,
                                      axis=self.axis, n_threads=n_threads)
