"""asv: per-channel moments and the streaming, mergeable Moments accumulator."""
import numpy as np

import bncore

from .common import data


class ChannelMoments:
    """moments over every axis but the channel axis 1, and over everything."""
    params = (["float32", "float64"], [(32, 64, 56, 56), (4096, 1024)], [1, 2])
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


class PerSampleMoments:
    """moments per sample and channel of channels-last (32, 56, 56, 64) data: over (1, 2)
    of the contiguous array, and over (2, 3) of its (N, C, H, W) view (kept axes apart in
    memory: a block per sample, no gathered copy)."""
    params = (["float32", "float64"], ["NHWC", "NCHW-view"], [1, 2])
    param_names = ["dtype", "layout", "n_threads"]

    def setup(self, dtype, layout, n_threads):
        x = data((32, 56, 56, 64), dtype)
        self.x, self.axes = (x, (1, 2)) if layout == "NHWC" else (x.transpose(0, 3, 1, 2),
                                                                  (2, 3))

    def time_moments(self, dtype, layout, n_threads):
        bncore.moments(self.x, axis=self.axes, n_threads=n_threads)

    def peakmem_moments(self, dtype, layout, n_threads):
        bncore.moments(self.x, axis=self.axes, n_threads=n_threads)


class RequestMoments:
    """The per-call cost, where the overhead is most of it: moments per channel of one
    channels-last (1, 16, 16, 64) sample over (1, 2) (float32: about 30 us through the
    general Python path, 4.5 us through _stats.moments_common), and a streaming update by
    one small batch."""
    params = (["float32", "float64"],)
    param_names = ["dtype"]

    def setup(self, dtype):
        self.x = data((1, 16, 16, 64), dtype)
        self.batch = data((256, 64), dtype)
        self.acc = bncore.Moments().update(self.batch, axis=0)

    def time_moments(self, dtype):
        bncore.moments(self.x, axis=(1, 2))

    def time_update(self, dtype):
        """Moments.update of a (256, 64) mini-batch of features (float32: 16.6 us through
        the general path, 7.6 us through _stats.update_common)."""
        self.acc.update(self.batch, axis=0)


class StreamingMoments:
    """Moments.update over 8 batches, then the exact Chan merge of 8 partial states."""

    def setup(self):
        self.batches = [data((256, 64, 8, 8), np.float32, seed=s) for s in range(8)]
        self.parts = [bncore.Moments().update(b, axis=(0, 2, 3)) for b in self.batches]

    def time_update(self):
        acc = bncore.Moments()
        for b in self.batches:
            acc.update(b, axis=(0, 2, 3))

    def time_merge(self):
        total = bncore.Moments()
        for p in self.parts:
            total.merge(p)
