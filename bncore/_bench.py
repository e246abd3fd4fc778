"""python -m bncore bench: every op against PyTorch (when installed), the NumPy reference
and a memory-copy roofline, measured interleaved in one process.

Method: for each case, bncore, its peer (PyTorch, or NumPy for moments) and the roofline
yardstick are sampled round-robin, --repeat times; each sample times a loop of at least
--min-time seconds after an untimed warm-up of the same call (each library's idle OpenMP
workers spin for a while and would otherwise slow the next library down); the table shows
medians. Both sides allocate their outputs on every call (no out= reuse), as a user would.
The NumPy float64 reference twin (bncore._reference) is timed once per case, after the
others (with --quick, only for inputs up to 8 MB).

Columns: speedup = peer time / bncore time, checked against the case's target (PASS or
MISS); GB/s = the bytes the op must move at least (x and y for a forward, dy, x and dx
for a backward, x for moments; dy and x twice more for a channels-last batch-norm
backward, x once more for a channels-last training forward beyond the caches) / bncore
time; % copy = time of a plain threaded copy of x (forward; for a backward, a threaded
read of a second array of x's size, as dy is, plus a copy of x; a read of x plus a copy
for a channels-last training forward beyond the caches, which must read x twice; a read
for moments; for the channels-last batch-norm backward, which must read dy and x twice,
reads of two arrays, a copy and a read again) / bncore time: 100%
means bncore moves its data as fast as this machine moves bytes. The copy
writes into a buffer allocated once; the ops allocate theirs on every call. PyTorch's
arrays over 32 MiB come fresh from the operating system on every call, which zeroes their
pages first; bncore keeps its freed outputs of that size for reuse (bncore._outputs), so
after the warm-up call it pays that only when the cache is off (BNCORE_OUTPUT_CACHE_MB=0).
ceiling = peer time / copy time: the speedup a kernel running at 100% of the copy would
show in this run; a target above it is out of reach of any kernel that moves the minimum
bytes at copy speed (marked MISS>).
"""
import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np

from bncore._outputs import empty_like_apart

import bncore
from bncore import _openmp
from bncore import _reference as ref
from bncore._timing import _loop_time, measure  # noqa: F401 (tools and scripts use them)

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # PyTorch is an optional peer (pip install "bncore[bench]")
    torch = None

QUICK_REFERENCE_BYTES = 8 << 20     # --quick skips the (slow, float64) reference above this
FAR_BYTES = 16 << 20                # beyond the caches: the kernels' bn_far_bytes
NOISY = 0.25                        # (max - min) / median of bncore's samples flagged "~"
# bytes moved, in units of x.nbytes. "dy+copy": a backward, which reads dy and x and writes
# dx: a read of a second array (as dy is) and a copy of x. "read+copy": the channels-last
# training forward beyond the caches (x read for the statistics, then again for y).
# "2read+copy": channels-last batch-norm backward, which reads dy and x twice (all rows'
# sums before any dx, and no channel's rows fit a cache)
_TRAFFIC = {"copy": 2, "read": 1, "dy+copy": 3, "read+copy": 3, "2read+copy": 5}


class Case:
    """One table row. ``build(n_threads)`` makes the data and returns ``(x, calls)``:
    ``calls`` maps "bncore", the peer ("torch" or "numpy") and "reference" to callables."""

    def __init__(self, op, shape, layout, dtype, target, build, *, traffic="copy",
                 quick=False, peer="torch", peer_note=None):
        self.op, self.shape, self.layout = op, tuple(shape), layout
        self.dtype, self.target, self.build = np.dtype(dtype).name, target, build
        self.traffic, self.quick, self.peer = traffic, quick, peer
        self.peer_note = peer_note   # a known fault of the peer's result on this case

    @property
    def label(self):
        return f"{self.op} {'x'.join(map(str, self.shape))} {self.layout} {self.dtype}"


# ----------------------------------------------------------------------------- data

def _array(shape, dtype, layout="NCHW", seed=0):
    """Random N(1, 2) data of logical shape ``shape``; "NHWC" moves axis 1 last."""
    if layout == "NHWC":
        shape = (shape[0], *shape[2:], shape[1])
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    x *= 2.0
    x += 1.0
    return x.astype(dtype, copy=False)


def _axis(layout):
    return -1 if layout == "NHWC" else 1


def _to_torch(a, layout):
    """A tensor sharing a's memory; NHWC arrays become channels_last NCHW tensors."""
    t = torch.from_numpy(a)
    if layout == "NHWC":
        t = t.permute(0, a.ndim - 1, *range(1, a.ndim - 1))
    return t


def _first_array(result, layout):
    """The first output of a call as an ndarray in bncore's layout (for the sanity check)."""
    if isinstance(result, (tuple, list)):
        result = result[0]
    if torch is not None and isinstance(result, torch.Tensor):
        if layout == "NHWC":
            result = result.permute(0, *range(2, result.ndim), 1)
        result = result.detach().numpy()
    return np.asarray(result)


# ---------------------------------------------------------------------- batch norm

def bn_train(shape, layout, dtype, target, quick=False):
    def build(nt):
        axis, c = _axis(layout), shape[1]
        x = _array(shape, dtype, layout)
        w, b = _array((c,), dtype, seed=2), _array((c,), dtype, seed=3)
        rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
        calls = {
            "bncore": lambda: bncore.batch_norm(x, rm, rv, w, b, training=True, axis=axis,
                                                n_threads=nt),
            "reference": lambda: ref.batch_norm(x, rm.copy(), rv.copy(), w, b,
                                                training=True, axis=axis)}
        if torch is not None:
            xt, wt, bt = _to_torch(x, layout), torch.from_numpy(w), torch.from_numpy(b)
            rmt, rvt = torch.zeros(c, dtype=xt.dtype), torch.ones(c, dtype=xt.dtype)
            calls["torch"] = lambda: F.batch_norm(xt, rmt, rvt, wt, bt, training=True)
        return x, calls
    # channels-last beyond the caches: each channel's statistics need every row before any
    # row can be normalised, and no row block holds a whole channel, so x is read twice
    far = math.prod(shape) * np.dtype(dtype).itemsize >= FAR_BYTES
    return Case("bn train fwd", shape, layout, dtype, target, build,
                traffic="read+copy" if layout == "NHWC" and far else "copy", quick=quick)


def bn_eval(shape, dtype, target, quick=False):
    def build(nt):
        c = shape[1]
        x = _array(shape, dtype)
        w, b = _array((c,), dtype, seed=2), _array((c,), dtype, seed=3)
        rm, rv = _array((c,), dtype, seed=4), np.linspace(0.5, 2.0, c).astype(dtype)
        calls = {"bncore": lambda: bncore.batch_norm(x, rm, rv, w, b, n_threads=nt),
                 "reference": lambda: ref.batch_norm(x, rm, rv, w, b)}
        if torch is not None:
            xt, wt, bt, rmt, rvt = map(torch.from_numpy, (x, w, b, rm, rv))
            calls["torch"] = lambda: F.batch_norm(xt, rmt, rvt, wt, bt, training=False)
        return x, calls
    return Case("bn eval fwd", shape, "NCHW", dtype, target, build, quick=quick)


def bn_backward(shape, layout, dtype, target, quick=False):
    def build(nt):
        axis, c = _axis(layout), shape[1]
        x, dy = _array(shape, dtype, layout), _array(shape, dtype, layout, seed=1)
        w = _array((c,), dtype, seed=2)
        _, m, inv = bncore.batch_norm_forward(x, w, axis=axis)
        calls = {"bncore": lambda: bncore.batch_norm_backward(dy, x, m, inv, w, axis=axis,
                                                              n_threads=nt),
                 "reference": lambda: ref.batch_norm_backward(dy, x, m, inv, w, axis=axis)}
        if torch is not None:
            xt, dyt, wt = _to_torch(x, layout), _to_torch(dy, layout), torch.from_numpy(w)
            _, mt, it = torch.ops.aten.native_batch_norm(xt, wt, None, None, None, True,
                                                         0.1, 1e-5)
            calls["torch"] = lambda: torch.ops.aten.native_batch_norm_backward(
                dyt, xt, wt, None, None, mt, it, True, 1e-5, [True, True, True])
        return x, calls
    return Case("bn backward", shape, layout, dtype, target, build,
                traffic="2read+copy" if layout == "NHWC" else "dy+copy", quick=quick)


def moments_case(shape, dtype, target, layout="NCHW", per_sample=False, quick=False):
    """moments per channel (over every axis but the channel axis), or per sample and
    channel (over the spatial axes: kept axes apart in channels-last memory)."""
    def build(nt):
        x = _array(shape, dtype, layout)
        cl = layout == "NHWC"
        if per_sample:
            axes = tuple(range(1, len(shape) - 1)) if cl else tuple(range(2, len(shape)))
        else:
            axes = tuple(range(len(shape) - 1)) if cl else (0, *range(2, len(shape)))
        calls = {"bncore": lambda: bncore.moments(x, axis=axes, n_threads=nt),
                 "numpy": lambda: (x.mean(axis=axes), x.var(axis=axes)),
                 "reference": lambda: ref.moments(x, axis=axes)}
        return x, calls
    return Case("moments per sample" if per_sample else "moments", shape, layout, dtype,
                target, build, traffic="read", quick=quick, peer="numpy")


# -------------------------------------------------------------------------- family

def row_norm(op, shape, target, quick=False):
    """layer_norm / rms_norm over the last axis of a (rows, D) float32 array."""
    def build(nt):
        x, d = _array(shape, np.float32), shape[-1]
        w, b = _array((d,), np.float32, seed=2), _array((d,), np.float32, seed=3)
        if op == "layer_norm":
            calls = {"bncore": lambda: bncore.layer_norm(x, d, w, b, n_threads=nt),
                     "reference": lambda: ref.layer_norm(x, d, w, b)}
        else:
            calls = {"bncore": lambda: bncore.rms_norm(x, d, w, 1e-6, n_threads=nt),
                     "reference": lambda: ref.rms_norm(x, d, w, 1e-6)}
        if torch is not None:
            xt, wt, bt = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)
            calls["torch"] = ((lambda: F.layer_norm(xt, (d,), wt, bt)) if op == "layer_norm"
                              else (lambda: F.rms_norm(xt, (d,), wt, 1e-6)))
        return x, calls
    return Case(op, shape, "rows", "float32", target, build, quick=quick)


def layer_norm_backward_case(shape, target, quick=False):
    def build(nt):
        x, dy, d = _array(shape, np.float32), _array(shape, np.float32, seed=1), shape[-1]
        w, b = _array((d,), np.float32, seed=2), _array((d,), np.float32, seed=3)
        _, m, inv = bncore.layer_norm_forward(x, d, w, b)
        calls = {"bncore": lambda: bncore.layer_norm_backward(dy, x, m, inv, d, w,
                                                              n_threads=nt),
                 "reference": lambda: ref.layer_norm_backward(dy, x, m, inv, d, w)}
        if torch is not None:
            xt, dyt, wt, bt = map(torch.from_numpy, (x, dy, w, b))
            _, mt, it = torch.ops.aten.native_layer_norm(xt, [d], wt, bt, 1e-5)
            calls["torch"] = lambda: torch.ops.aten.native_layer_norm_backward(
                dyt, xt, [d], mt, it, wt, bt, [True, True, True])
        return x, calls
    return Case("layer_norm backward", shape, "rows", "float32", target, build,
                traffic="dy+copy", quick=quick)


def spatial_norm(op, shape, layout, target, groups=32, quick=False, dtype=np.float32):
    """group_norm (``groups`` groups) or instance_norm of a 4-D array (float32 unless
    ``dtype``)."""
    def build(nt):
        axis, c = _axis(layout), shape[1]
        x = _array(shape, dtype, layout)
        w, b = _array((c,), dtype, seed=2), _array((c,), dtype, seed=3)
        if op == "group_norm":
            calls = {"bncore": lambda: bncore.group_norm(x, groups, w, b, axis=axis,
                                                         n_threads=nt),
                     "reference": lambda: ref.group_norm(x, groups, w, b, axis=axis)}
        else:
            calls = {"bncore": lambda: bncore.instance_norm(x, weight=w, bias=b, axis=axis,
                                                            n_threads=nt),
                     "reference": lambda: ref.instance_norm(x, weight=w, bias=b, axis=axis)}
        if torch is not None:
            xt, wt, bt = _to_torch(x, layout), torch.from_numpy(w), torch.from_numpy(b)
            calls["torch"] = ((lambda: F.group_norm(xt, groups, wt, bt)) if op == "group_norm"
                              else (lambda: F.instance_norm(xt, weight=wt, bias=bt)))
        return x, calls
    name = f"group_norm G={groups}" if op == "group_norm" else op
    return Case(name, shape, layout, np.dtype(dtype).name, target, build, quick=quick)


def _torch_backward(forward, dy, inputs):
    """PyTorch's backward of forward(*inputs) for output gradient dy, timed alone: the
    graph is built once and run again on every call (retain_graph), as a training step
    runs it."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    y = forward(*leaves)
    return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)


def family_backward(op, shape, layout, groups=32, quick=False, target=None, peer_note=None):
    """rms_norm / group_norm / instance_norm backward (float32; no target unless given:
    the issue names none), PyTorch's through autograd."""
    def build(nt):
        x, dy = _array(shape, np.float32, layout), _array(shape, np.float32, layout, seed=1)
        if op == "rms_norm":
            d = shape[-1]
            w = _array((d,), np.float32, seed=2)
            _, inv = bncore.rms_norm_forward(x, d, w, 1e-6)
            calls = {"bncore": lambda: bncore.rms_norm_backward(dy, x, inv, d, w,
                                                                n_threads=nt),
                     "reference": lambda: ref.rms_norm_backward(dy, x, inv, d, w)}
            if torch is not None:
                calls["torch"] = _torch_backward(lambda a, b: F.rms_norm(a, (d,), b, 1e-6),
                                                 torch.from_numpy(dy),
                                                 (torch.from_numpy(x), torch.from_numpy(w)))
            return x, calls
        axis, c = _axis(layout), shape[1]
        w, b = _array((c,), np.float32, seed=2), _array((c,), np.float32, seed=3)
        if op == "group_norm":
            _, m, inv = bncore.group_norm_forward(x, groups, w, b, axis=axis)
            calls = {"bncore": lambda: bncore.group_norm_backward(
                         dy, x, m, inv, groups, w, axis=axis, n_threads=nt),
                     "reference": lambda: ref.group_norm_backward(dy, x, m, inv, groups, w,
                                                                  axis=axis)}
            fwd = lambda a, wt, bt: F.group_norm(a, groups, wt, bt)   # noqa: E731
        else:
            _, m, inv = bncore.instance_norm_forward(x, w, b, axis=axis)
            calls = {"bncore": lambda: bncore.instance_norm_backward(
                         dy, x, m, inv, w, axis=axis, n_threads=nt),
                     "reference": lambda: ref.instance_norm_backward(dy, x, m, inv, w,
                                                                     axis=axis)}
            fwd = lambda a, wt, bt: F.instance_norm(a, weight=wt, bias=bt)   # noqa: E731
        if torch is not None:
            calls["torch"] = _torch_backward(
                fwd, _to_torch(dy, layout),
                (_to_torch(x, layout), torch.from_numpy(w), torch.from_numpy(b)))
        return x, calls
    name = {"rms_norm": "rms_norm backward", "group_norm": f"group_norm G={groups} backward",
            "instance_norm": "instance_norm backward"}[op]
    return Case(name, shape, layout, "float32", target, build, traffic="dy+copy",
                quick=quick, peer_note=peer_note)


# PyTorch 2.13's instance_norm backward of a channels-last batch of one is wrong (dx and
# dweight off by about 130% against the float64 reference, while its contiguous path and
# bncore agree with it to 1e-7): timed as a user gets it, flagged in the table.
TORCH_IN_BWD_CL_N1 = ("PyTorch 2.13's channels-last instance_norm backward at batch 1 "
                      "returns wrong gradients (bncore matches the float64 reference)")


def family_cases():
    """The row-norm family, when this build of bncore has it (else [] and a note)."""
    if not hasattr(bncore, "layer_norm"):
        return []
    big, rows = (32, 64, 56, 56), (8192, 768)
    return [
        row_norm("layer_norm", rows, 1.1),
        row_norm("layer_norm", (65536, 64), 1.5, quick=True),
        layer_norm_backward_case(rows, 1.5, quick=True),
        row_norm("rms_norm", rows, 2.5, quick=True),
        row_norm("rms_norm", (65536, 64), 1.5),
        spatial_norm("group_norm", big, "NCHW", 1.0, quick=True),
        spatial_norm("group_norm", big, "NHWC", 1.3),
        spatial_norm("group_norm", big, "NHWC", None, dtype=np.float16),   # no target
        spatial_norm("instance_norm", big, "NCHW", 3.0),
        spatial_norm("instance_norm", big, "NHWC", 5.0, quick=True),
        # the other backward passes (no targets)
        family_backward("rms_norm", rows, "rows"),
        family_backward("group_norm", big, "NCHW"),
        family_backward("group_norm", big, "NHWC"),
        family_backward("instance_norm", big, "NCHW"),
        family_backward("instance_norm", big, "NHWC"),
        # small calls (per-request inference): never slower than PyTorch
        row_norm("layer_norm", (8, 768), 1.0),
        layer_norm_backward_case((8, 768), 1.0),
        # never slower: long rows, few of them (dx in float64 costs: a known gap)
        layer_norm_backward_case((64, 4096), 1.0),
        spatial_norm("group_norm", (1, 64, 16, 16), "NCHW", 1.0),
        # batch 1, channels-last: every thread on the one sample
        spatial_norm("group_norm", (1, 64, 56, 56), "NHWC", 1.0),
        spatial_norm("instance_norm", (1, 64, 56, 56), "NHWC", 1.0),
        family_backward("instance_norm", (1, 64, 56, 56), "NHWC", target=1.0,
                        peer_note=TORCH_IN_BWD_CL_N1),
        # batch 1, one group, NCHW: every thread on the one run
        spatial_norm("group_norm", (1, 64, 56, 56), "NCHW", 1.0, groups=1),
        # wide groups over 7x7, channels-last: statistics straight from each block
        spatial_norm("group_norm", (32, 512, 7, 7), "NHWC", 1.0, groups=8),
        # small groups many per call (0.3-0.9x PyTorch with a call per block or channel,
        # or a parallel region per sample): (N, C) features and 3x3 maps
        spatial_norm("group_norm", (64, 1024, 1, 1), "NCHW", 1.0, groups=8),
        family_backward("group_norm", (64, 1024, 1, 1), "NCHW", groups=8, target=1.0),
        spatial_norm("instance_norm", (256, 32, 3, 3), "NCHW", 1.0),
        spatial_norm("group_norm", (256, 32, 3, 3), "NHWC", 1.0, groups=8),
        # 14x14 planes in small groups (0.6-0.9x PyTorch while dx went last channel first)
        family_backward("group_norm", (128, 64, 14, 14), "NCHW", groups=8, target=1.0),
    ]


def all_cases():
    f32, f64 = np.float32, np.float64
    big, mid, small = (32, 64, 56, 56), (256, 256, 14, 14), (64, 512, 7, 7)
    return [
        bn_train(big, "NCHW", f32, 3.0),
        bn_train(mid, "NCHW", f32, 3.0),
        bn_train(small, "NCHW", f32, 3.0, quick=True),
        bn_train((4096, 1024), "NCHW", f32, 1.2, quick=True),
        bn_train((8, 32, 8, 8), "NCHW", f32, 2.0, quick=True),
        bn_train(big, "NHWC", f32, 1.5, quick=True),
        bn_train(mid, "NHWC", f32, 1.5),
        bn_eval(big, f32, 1.0),
        bn_eval((1, 64, 56, 56), f32, 1.5, quick=True),
        bn_backward(big, "NCHW", f32, 2.0, quick=True),
        bn_backward(mid, "NCHW", f32, 2.0),
        bn_backward(big, "NHWC", f32, 1.5, quick=True),
        bn_backward(mid, "NHWC", f32, 1.5),
        moments_case(big, f32, 5.0, quick=True),
        # per sample and channel of channels-last data: kept axes apart (gathered into a
        # copy before, 1.5x NumPy), now a block per sample
        moments_case(big, f32, 5.0, layout="NHWC", per_sample=True),
        bn_train(big, "NCHW", f64, None),
        bn_train(big, "NHWC", f64, None),
        bn_backward(small, "NCHW", f64, None),
        bn_backward((8, 32, 8, 8), "NCHW", f32, 1.0),
        # batch 1, 7x7: small channels in groups (the cost was per channel, not per value)
        bn_backward((1, 512, 7, 7), "NCHW", f32, 1.0),
        # never slower: eval over 7x7 planes (ran at 0.61x streamed plane by plane), wide
        # channels-last rows over few samples (0.8-1.0x PyTorch before their blocks were
        # walked in address order), and a backward over 7x7 planes (1.0x channel by channel)
        bn_eval((64, 2048, 7, 7), f32, 1.0),
        bn_train((64, 2048, 7, 7), "NHWC", f32, 1.0),
        bn_backward((256, 512, 7, 7), "NHWC", f32, 1.0),
        bn_backward((128, 1024, 7, 7), "NCHW", f32, 1.0),
        # BatchNorm1d-like, 64 rows of 1024 channels: one row chunk, the threads split the
        # channels (0.76x PyTorch on one thread)
        bn_backward((64, 1024, 1, 1), "NHWC", f32, 1.0),
        # float16 (computed in float32 and rounded back; no target: PyTorch's float16
        # kernels accumulate in float, bncore in double as for float32)
        bn_train(big, "NCHW", np.float16, None),
        bn_eval(big, np.float16, None),
        bn_backward(big, "NCHW", np.float16, None),
        bn_backward(big, "NHWC", np.float16, None),
    ] + family_cases()


def _agreement(got, want, layout):
    """Max |bncore - peer| over the first output, relative to max |peer| (shape-checked)."""
    a, b = _first_array(got, "NCHW"), _first_array(want, layout)
    if a.shape != b.shape:
        return float("inf")
    a, b = a.astype(np.float64), b.astype(np.float64)
    scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-30)
    return float(np.max(np.abs(a - b), initial=0.0)) / scale


def run_case(case, nt, repeat, min_time, reference):
    x, calls = case.build(nt)
    slow = calls.pop("reference")
    if not reference or (reference == "small" and x.nbytes > QUICK_REFERENCE_BYTES):
        slow = None
    # One call of each side first: compiles nothing, but faults in pages and checks that
    # both sides compute the same thing (a layout mix-up would make the timing moot).
    peer_key = case.peer if case.peer in calls else None
    ours = calls["bncore"]()
    agree = None if peer_key is None else _agreement(ours, calls[peer_key](), case.layout)
    del ours
    xc = np.ascontiguousarray(x)
    # clear of xc modulo 4096 (bncore._outputs): a copy into a buffer allocated right
    # after its source (16 bytes past it, modulo 4096) ran 4.3x slower on this machine
    dst = empty_like_apart(xc.shape, xc.dtype, xc)
    if case.traffic == "copy":
        calls["copy"] = lambda: _openmp.threaded_copy(xc, dst, nt)
    elif case.traffic == "read":
        calls["copy"] = lambda: _openmp.threaded_read(xc, nt)
    elif case.traffic == "read+copy":
        calls["copy"] = lambda: (_openmp.threaded_read(xc, nt),
                                 _openmp.threaded_copy(xc, dst, nt))
    else:
        # a second array, as dy is: reading x twice in a row would find part of it still
        # in the L3 (a 25 MB x read then copied: 2.4 ms; a 25 MB dy read, then x copied:
        # 2.9 ms on this machine), a yardstick faster than any backward can be
        xc2 = empty_like_apart(xc.shape, xc.dtype, dst)
        np.copyto(xc2, xc)
        if case.traffic == "dy+copy":
            calls["copy"] = lambda: (_openmp.threaded_read(xc2, nt),
                                     _openmp.threaded_copy(xc, dst, nt))
        else:   # "2read+copy": each array read 25+ MB after its last use
            calls["copy"] = lambda: (_openmp.threaded_read(xc, nt),
                                     _openmp.threaded_read(xc2, nt),
                                     _openmp.threaded_copy(xc, dst, nt),
                                     _openmp.threaded_read(xc2, nt))
    samples = measure(calls, repeat, min_time)
    if slow is not None:
        samples["reference"] = measure({"reference": slow}, 1, min_time)["reference"]
    med = {k: float(np.median(v)) for k, v in samples.items()}
    t = med["bncore"]
    peer_t = med.get(peer_key) if peer_key else None
    b = samples["bncore"]
    ceiling = None if peer_t is None else peer_t / med["copy"]
    return {
        "case": case.label, "op": case.op, "shape": list(case.shape), "layout": case.layout,
        "dtype": case.dtype, "threads": nt, "nbytes_x": int(x.nbytes),
        "bncore_s": t, "peer": peer_key, "peer_s": peer_t,
        "torch_s": med.get("torch"), "numpy_s": med.get("numpy"),
        "reference_s": med.get("reference"), "copy_s": med["copy"],
        "copy_kind": case.traffic, "speedup": None if peer_t is None else peer_t / t,
        "target": case.target,
        "verdict": _verdict(case.target, None if peer_t is None else peer_t / t, ceiling),
        "ceiling": ceiling,
        "gb_per_s": _TRAFFIC[case.traffic] * x.nbytes / t / 1e9,
        "pct_of_copy": 100.0 * med["copy"] / t,
        "spread": (max(b) - min(b)) / t, "max_rel_diff_vs_peer": agree,
        "peer_note": case.peer_note, "samples_s": samples,
    }


def _verdict(target, speedup, ceiling):
    """PASS, MISS, or MISS> (a miss whose target is above this run's copy ceiling)."""
    if target is None or speedup is None:
        return None
    if speedup >= target:
        return "PASS"
    return "MISS>" if ceiling < target else "MISS"


def run(cases, nt, repeat, min_time, reference, progress=True):
    if torch is not None:
        torch.set_num_threads(nt)
    rows, t_start = [], time.perf_counter()
    try:
        for i, case in enumerate(cases, 1):
            if progress:
                print(f"[{i}/{len(cases)}] {case.label}  ({time.perf_counter() - t_start:.0f}s)",
                      file=sys.stderr, flush=True)
            rows.append(run_case(case, nt, repeat, min_time, reference))
    except KeyboardInterrupt:
        print("interrupted: showing the cases measured so far", file=sys.stderr)
    return rows


# -------------------------------------------------------------------------- output

def _ms(s, width=9, digits=3):
    return f"{'-':>{width}s}" if s is None else f"{s * 1e3:{width}.{digits}f}"


def print_table(rows, out=None):
    out = sys.stdout if out is None else out   # at call time: redirect_stdout works
    wc = max([42] + [len(r["case"]) for r in rows])
    head = (f"{'case':{wc}s} {'bncore ms':>9s} {'ref ms':>9s} {'peer ms':>9s} {'peer':5s}"
            f" {'speedup':>8s} {'target':>7s} {'':5s} {'GB/s':>6s} {'% copy':>6s}"
            f" {'ceiling':>7s}")
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        tg = "-" if r["target"] is None else f">={r['target']:.1f}x"
        noisy = "~" if r["spread"] > NOISY else " "
        ceil = "-" if r.get("ceiling") is None else f"{r['ceiling']:.2f}x"
        print(f"{r['case']:{wc}s} {_ms(r['bncore_s'])}{noisy}{_ms(r['reference_s'], 9, 2)}"
              f" {_ms(r['peer_s'])} {r['peer'] or '-':5s} {sp:>8s} {tg:>7s}"
              f" {r['verdict'] or '':5s} {r['gb_per_s']:6.1f} {r['pct_of_copy']:5.0f}%"
              f" {ceil:>7s}",
              file=out)
    judged = [r for r in rows if r["verdict"]]
    if judged:
        n_pass = sum(r["verdict"] == "PASS" for r in judged)
        n_out = sum(r["verdict"] == "MISS>" for r in judged)
        print(f"\n{n_pass}/{len(judged)} cases meet their speedup target"
              + (f"; {n_out} miss(es) with the target above the copy ceiling (MISS>)"
                 if n_out else ""), file=out)
    print("speedup = peer time / bncore time; GB/s = minimum bytes moved / bncore time; "
          "% copy = threaded copy (read) time / bncore time;\n"
          "ceiling = peer time / copy time (the speedup at 100% copy; MISS> = target above "
          "it);\n"
          f"~ = bncore's samples spread over more than {NOISY:.0%} of the median (busy "
          "machine: rerun); ref = NumPy float64 reference, timed once", file=out)
    for r in rows:
        d = r["max_rel_diff_vs_peer"]
        if d is not None and not d <= 1e-3:
            why = r.get("peer_note") or "the comparison may be of different computations"
            print(f"warning: {r['case']}: bncore and {r['peer']} differ by {d:.2e} "
                  f"(relative): {why}", file=out)


def _meta(nt, args):
    try:
        from bncore._config import config
        cfg = config()
    except ImportError:  # older builds: keep what show_config prints
        import contextlib
        import io
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            bncore.show_config()
        cfg = buf.getvalue()
    return {
        "bncore": bncore.__version__, "numpy": np.__version__,
        "torch": None if torch is None else torch.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "processor": platform.processor(), "cpu_count": os.cpu_count(),
        "threads": nt, "torch_threads": None if torch is None else torch.get_num_threads(),
        "repeat": args.repeat, "min_time_s": args.min_time, "quick": args.quick,
        "filter": args.filter, "loadavg": list(os.getloadavg()), "config": cfg,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if r["speedup"] is not None]
    if not rows:
        print("--plot: no case has a peer to compare with", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.6))
    color = {"PASS": "tab:green", "MISS": "tab:red", "MISS>": "tab:orange"}
    ax.barh([r["case"] for r in rows], [r["speedup"] for r in rows],
            color=[color.get(r["verdict"], "tab:gray") for r in rows])
    for i, r in enumerate(rows):
        if r["target"]:
            ax.plot([r["target"]] * 2, [i - 0.4, i + 0.4], color="black", lw=1.5)
        if r.get("ceiling"):
            ax.plot([r["ceiling"]] * 2, [i - 0.4, i + 0.4], color="tab:blue", lw=1.5, ls=":")
    ax.axvline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("speedup over the peer (peer time / bncore time)\nblack tick: target; "
                  "dotted: copy ceiling; orange: a miss with the target above the ceiling")
    ax.set_title(f"bncore {bncore.__version__}, {rows[0]['threads']} threads")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bncore bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="one case per op kind, shorter samples (well under a minute)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="threads for bncore, PyTorch and the copy (default: OpenMP's)")
    p.add_argument("--repeat", type=int, default=None, metavar="N",
                   help="samples per side and case; the table shows medians (default 7, "
                        "--quick 3)")
    p.add_argument("--min-time", type=float, default=None, metavar="S",
                   help="seconds per sample (default 0.05, --quick 0.02)")
    p.add_argument("--filter", default=None, metavar="SUBSTR",
                   help="only cases whose name contains SUBSTR (case-insensitive), "
                        "e.g. 'backward', 'NHWC', 'layer_norm'")
    p.add_argument("--no-reference", action="store_true", help="skip the NumPy reference")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("--json", metavar="FILE", help="write every sample, median and metadata")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of speedups (matplotlib)")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.repeat is not None and args.repeat < 1:
        p.error("--repeat must be >= 1")
    if args.min_time is not None and not (0 < args.min_time < math.inf):
        p.error("--min-time must be a number of seconds > 0")   # nan would never end a sample
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        # fail before a long run, not after it, where the results would be lost
        where = os.path.dirname(os.path.abspath(path)) if path else None
        if path and (os.path.isdir(path) or not os.path.isdir(where)
                     or not os.access(where, os.W_OK)):
            p.error(f"{flag} {path}: cannot write there (no such directory, a directory, "
                    "or not writable)")
    if args.plot:   # fail before a long run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("--plot needs matplotlib: pip install matplotlib "
                  "(or pip install \"bncore[bench]\")", file=sys.stderr)
            return 2
    nt = args.threads or _openmp.max_threads()
    args.repeat = args.repeat or (3 if args.quick else 7)
    if args.min_time is None:
        args.min_time = 0.02 if args.quick else 0.05

    cases = all_cases()
    if args.quick:
        cases = [c for c in cases if c.quick]
    if args.filter:
        cases = [c for c in cases if args.filter.lower() in c.label.lower()]
    if not cases:
        print(f"no case matches --filter {args.filter!r} (see --list)", file=sys.stderr)
        return 2
    if args.list:
        for c in cases:
            print(c.label)
        return 0
    if not hasattr(bncore, "layer_norm"):
        print("note: this bncore has no layer/group/instance/RMS norm yet: family cases "
              "skipped", file=sys.stderr)
    if torch is None:
        print("note: PyTorch is not installed: no peer for most cases "
              "(pip install torch==2.13.0)", file=sys.stderr)
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"note: load average {load:.1f} on {os.cpu_count()} cpus: other work is "
              "running, timings will be noisy", file=sys.stderr)

    print(f"bncore {bncore.__version__} | numpy {np.__version__} | torch "
          f"{torch.__version__ if torch is not None else 'not installed'} | {nt} threads | "
          f"{args.repeat} samples x >= {args.min_time * 1e3:.0f} ms, medians")
    reference = False if args.no_reference else ("small" if args.quick else True)
    rows = run(cases, nt, args.repeat, args.min_time, reference)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": _meta(nt, args), "rows": rows}, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
