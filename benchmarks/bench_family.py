"""asv: layer, RMS, group and instance norm (skipped where bncore does not have the op)."""
import numpy as np

import bncore

from .common import channel_axis, data


def _need(name):
    if not hasattr(bncore, name):
        raise NotImplementedError(f"bncore has no {name}")


class RowNorms:
    params = ([np.float32, np.float64], [(8192, 768), (65536, 64)], [1, 2])
    param_names = ["dtype", "shape", "n_threads"]

    def setup(self, dtype, shape, n_threads):
        _need("layer_norm")
        self.x = data(shape, dtype)
        self.dy = data(shape, dtype, seed=1)
        self.d = shape[-1]
        self.w = np.ones(self.d, dtype)
        _, self.mean, self.invstd = bncore.layer_norm_forward(self.x, self.d, self.w, self.w)
        _, self.invrms = bncore.rms_norm_forward(self.x, self.d, self.w)

    def time_layer_norm(self, dtype, shape, n_threads):
        bncore.layer_norm(self.x, self.d, self.w, self.w, n_threads=n_threads)

    def time_layer_norm_backward(self, dtype, shape, n_threads):
        bncore.layer_norm_backward(self.dy, self.x, self.mean, self.invstd, self.d, self.w,
                                   n_threads=n_threads)

    def peakmem_layer_norm_backward(self, dtype, shape, n_threads):
        bncore.layer_norm_backward(self.dy, self.x, self.mean, self.invstd, self.d, self.w,
                                   n_threads=n_threads)

    def time_rms_norm(self, dtype, shape, n_threads):
        bncore.rms_norm(self.x, self.d, self.w, n_threads=n_threads)

    def time_rms_norm_backward(self, dtype, shape, n_threads):
        bncore.rms_norm_backward(self.dy, self.x, self.invrms, self.d, self.w,
                                 n_threads=n_threads)


class SpatialNorms:
    params = ([np.float32], [(32, 64, 56, 56), (8, 32, 16, 16)], ["NCHW", "NHWC"], [1, 2])
    param_names = ["dtype", "shape", "layout", "n_threads"]

    def setup(self, dtype, shape, layout, n_threads):
        _need("group_norm")
        self.axis = channel_axis(layout)
        self.x = data(shape, dtype, layout)
        self.dy = data(shape, dtype, layout, seed=1)
        self.w = np.ones(shape[1], dtype)
        _, self.gm, self.gi = bncore.group_norm_forward(self.x, 32, self.w, self.w,
                                                        axis=self.axis)

    def time_group_norm(self, dtype, shape, layout, n_threads):
        bncore.group_norm(self.x, 32, self.w, self.w, axis=self.axis, n_threads=n_threads)

    def time_group_norm_backward(self, dtype, shape, layout, n_threads):
        bncore.group_norm_backward(self.dy, self.x, self.gm, self.gi, 32, self.w,
                                   axis=self.axis, n_threads=n_threads)

    def peakmem_group_norm_backward(self, dtype, shape, layout, n_threads):
        bncore.group_norm_backward(self.dy, self.x, self.gm, self.gi, 32, self.w,
                                   axis=self.axis, n_threads=n_threads)

    def time_instance_norm(self, dtype, shape, layout, n_threads):
        bncore.instance_norm(self.x, weight=self.w, bias=self.w, axis=self.axis,
                             n_threads=n_threads)
