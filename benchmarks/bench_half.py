"""asv: float16 input and output (computed in float32, rounded back).

One suite over batch-norm training, eval and backward (NCHW and channels-last), layer
norm and its backward, group norm (NCHW and channels-last) and its backward, at the
bench's shapes, on 1 and 2 threads: float16 read and written by the kernels themselves,
or widened a piece at a time (see README, "Dtypes").
"""
import numpy as np

import bncore

from .common import channel_axis, data

THREADS = [1, 2]
OPS = ["batch_norm train", "batch_norm eval", "batch_norm backward",
       "batch_norm train NHWC", "batch_norm backward NHWC", "layer_norm",
       "layer_norm backward", "group_norm", "group_norm NHWC", "group_norm backward"]


class Float16:
    params = (OPS, THREADS)
    param_names = ["op", "n_threads"]

    def setup(self, op, n_threads):
        nt = n_threads
        if op.startswith("layer_norm"):
            x = data((8192, 768), np.float16)
            dy = data((8192, 768), np.float16, seed=1)
            _, m, s = bncore.layer_norm_forward(x, 768)
            self.call = (
                (lambda: bncore.layer_norm(x, 768, n_threads=nt)) if op == "layer_norm"
                else (lambda: bncore.layer_norm_backward(dy, x, m, s, 768, n_threads=nt)))
            return
        layout = "NHWC" if op.endswith("NHWC") else "NCHW"
        axis = channel_axis(layout)
        x = data((32, 64, 56, 56), np.float16, layout)
        dy = data((32, 64, 56, 56), np.float16, layout, seed=1)
        rm, rv = np.zeros(64, np.float32), np.ones(64, np.float32)
        if op.startswith("batch_norm train"):
            self.call = lambda: bncore.batch_norm(x, rm, rv, training=True, axis=axis,
                                                  n_threads=nt)
        elif op == "batch_norm eval":
            self.call = lambda: bncore.batch_norm(x, rm, rv, n_threads=nt)
        elif op.startswith("batch_norm backward"):
            _, m, s = bncore.batch_norm_forward(x, axis=axis)
            self.call = lambda: bncore.batch_norm_backward(dy, x, m, s, axis=axis,
                                                           n_threads=nt)
        elif op.startswith("group_norm") and "backward" not in op:
            self.call = lambda: bncore.group_norm(x, 32, axis=axis, n_threads=nt)
        else:
            _, m, s = bncore.group_norm_forward(x, 32)
            self.call = lambda: bncore.group_norm_backward(dy, x, m, s, 32, n_threads=nt)

    def time_op(self, op, n_threads):
        self.call()
