"""asv: batch norm forward (training, eval, with saved statistics) and backward.

Grid: dtype x shape x layout x n_threads, kept small so that ``asv run --quick`` stays
fast. ``shape`` is the logical NCHW shape; layout "NHWC" benchmarks the channels-last
array of that shape (channel axis -1). Data come from a fixed seed (benchmarks.common).
"""
import numpy as np

import bncore

from .common import channel_axis, data

DTYPES = ["float32", "float64"]
LAYOUTS = ["NCHW", "NHWC"]
THREADS = [1, 2]


class BatchNormForward:
    """A big activation (channel planes of 12 KB) and a tiny one (call overhead)."""
    params = (DTYPES, [(32, 64, 56, 56), (8, 32, 8, 8)], LAYOUTS, THREADS)
    param_names = ["dtype", "shape", "layout", "n_threads"]

    def setup(self, dtype, shape, layout, n_threads):
        self.x = data(shape, dtype, layout)
        self.axis = channel_axis(layout)
        c = shape[1]
        self.w, self.b = np.ones(c, dtype), np.zeros(c, dtype)
        self.rm, self.rv = np.zeros(c, dtype), np.ones(c, dtype)

    def time_batch_norm_train(self, dtype, shape, layout, n_threads):
        bncore.batch_norm(self.x, self.rm, self.rv, self.w, self.b, training=True,
                          axis=self.axis, n_threads=n_threads)

    def time_batch_norm_eval(self, dtype, shape, layout, n_threads):
        bncore.batch_norm(self.x, self.rm, self.rv, self.w, self.b, training=False,
                          axis=self.axis, n_threads=n_threads)

    def time_batch_norm_forward(self, dtype, shape, layout, n_threads):
        bncore.batch_norm_forward(self.x, self.w, self.b, training=True, axis=self.axis,
                                  n_threads=n_threads)


class BatchNormBackward:
    """A big activation, 7x7 planes (small channels in groups), and BatchNorm1d-like
    (64, 1024) features (channels-last: one row chunk, the threads split the channels)."""
    params = (DTYPES, [(32, 64, 56, 56), (64, 512, 7, 7), (64, 1024, 1, 1)], LAYOUTS, THREADS)
    param_names = ["dtype", "shape", "layout", "n_threads"]

    def setup(self, dtype, shape, layout, n_threads):
        self.axis = channel_axis(layout)
        self.x = data(shape, dtype, layout)
        self.dy = data(shape, dtype, layout, seed=1)
        self.w = np.ones(shape[1], dtype)
        _, self.mean, self.invstd = bncore.batch_norm_forward(self.x, self.w, axis=self.axis)

    def time_backward(self, dtype, shape, layout, n_threads):
        bncore.batch_norm_backward(self.dy, self.x, self.mean, self.invstd, self.w,
                                   axis=self.axis, n_threads=n_threads)

    def time_backward_eval(self, dtype, shape, layout, n_threads):
        bncore.batch_norm_backward(self.dy, self.x, self.mean, self.invstd, self.w,
                                   training=False, axis=self.axis, n_threads=n_threads)

    def peakmem_backward(self, dtype, shape, layout, n_threads):
        bncore.batch_norm_backward(self.dy, self.x, self.mean, self.invstd, self.w,
                                   axis=self.axis, n_threads=n_threads)


class BatchNormTrackAccuracy:
    """Relative variance error at mean 1e6, std 0.1 in float32 (lower is better)."""
    params = (LAYOUTS,)
    param_names = ["layout"]

    def setup(self, layout):
        self.axis = channel_axis(layout)
        self.x = data((16, 8, 32, 32), np.float32, layout) * np.float32(0.05) + np.float32(1e6)

    def track_variance_rel_error(self, layout):
        _, _, invstd = bncore.batch_norm_forward(self.x, axis=self.axis, eps=0.0)
        red = tuple(a for a in range(4) if a != self.axis % 4)
        exact = self.x.astype(np.float64).var(axis=red)
        return float(np.max(np.abs(1.0 / invstd.astype(np.float64) ** 2 - exact) / exact))
    track_variance_rel_error.unit = "relative error"
