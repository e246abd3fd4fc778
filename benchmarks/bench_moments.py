"""asv: per-channel moments and the streaming Moments accumulator."""
import numpy as np

import bncore

from .common import data


class ChannelMoments:
    params = ([np.float32, np.float64], [(32, 64, 56, 56), (4096, 1024)], [1, 2])
    param_names = ["dtype", "shape", "n_threads"]

    def setup(self, dtype, shape, n_threads):
        self.x = data(shape, dtype)
        self.axes = (0,) + tuple(range(2, len(shape)))

    def time_moments(self, dtype, shape, n_threads):
        bncore.moments(self.x, axis=self.axes, n_threads=n_threads)

    def time_moments_all(self, dtype, shape, n_threads):
        bncore.moments(self.x, n_threads=n_threads)

    def peakmem_moments(self, dtype, shape, n_threads):
        bncore.moments(self.x, axis=self.axes, n_threads=n_threads)


class StreamingMoments:
    def setup(self):
        self.batches = [data((256, 64, 8, 8), np.float32, seed=s) for s in range(8)]

    def time_update_and_merge(self):
        parts = [bncore.Moments().update(b, axis=(0, 2, 3)) for b in self.batches]
        total = bncore.Moments()
        for p in parts:
            total.merge(p)
