"""Determinism and thread safety.

- Every op returns bitwise-identical results for n_threads = 1, 2, 3, 8 and None, and for
  OMP_NUM_THREADS = 1, 2, 3 (subprocesses), on inputs big enough to go parallel (> 64K
  values; the kernels stay serial under 32K) in both layouts, float32 and float64.
- Eight Python threads calling every op at once, on shared and on separate inputs, get
  exactly the serial results and leave the inputs untouched.
- Calls keep the OpenMP threads they find: every region starts one thread or all
  n_threads, so repeated calls and one op after another neither end nor create threads
  (libgomp ends the pool's threads beyond a smaller team; ids of /proc/self/task).
- Kernels release the GIL. Robust on a busy 2-core machine: a heartbeat thread ticks
  while one long call runs; if the call held the GIL the heartbeat would stall for the
  whole call, so the longest stall must be well under the call's duration (the best of
  five tries; a busy-machine hiccup cannot fail it, a held GIL fails every try). Whether
  two calls actually overlap in wall time is a speed question, left to the benchmarks:
  on a 2-core CI machine it depends on memory bandwidth and load, not on bncore.
"""
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import bncore
from bncore import _config, _rownorm
from bncore import _reference as ref

SHAPE = (8, 64, 16, 16)          # 131,072 values: several chunks per thread


def make_ops(shape=SHAPE, dtype=np.float32, seed=0):
    """name -> call(n_threads) returning a tuple of arrays; every public op, both layouts.

    Built in a function so that each Python thread can get its own inputs."""
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 2.0, shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))           # channels-last copies
    dyl = np.ascontiguousarray(np.moveaxis(dy, 1, -1))
    xs = np.ascontiguousarray(x[:, :, ::-1].transpose(0, 1, 3, 2))[:, :, ::-1]  # strided
    c, d = shape[1], shape[-1]
    w, b = rng.normal(size=c).astype(dtype), rng.normal(size=c).astype(dtype)
    wd = rng.normal(size=d).astype(dtype)
    rm, rv = rng.normal(size=c), rng.uniform(0.5, 2, c)
    _, m, s = bncore.batch_norm_forward(x, w)
    _, ml, sl = bncore.batch_norm_forward(xl, w, axis=-1)
    _, lm, ls = bncore.layer_norm_forward(x, d, wd, wd)
    _, lm2, ls2 = bncore.layer_norm_forward(xl, c)
    _, r = bncore.rms_norm_forward(x, d, wd)
    _, gm, gs = bncore.group_norm_forward(x, 8, w, b)
    _, gml, gsl = bncore.group_norm_forward(xl, 8, w, b, axis=-1)
    _, im, is_ = bncore.instance_norm_forward(x, w, b)
    _, iml, isl = bncore.instance_norm_forward(xl, w, b, axis=-1)

    def train(xx, ax):
        def run(nt):
            rm_, rv_ = rm.copy(), rv.copy()
            y = bncore.batch_norm(xx, rm_, rv_, w, b, training=True, axis=ax, n_threads=nt)
            return y, rm_, rv_
        return run

    def inst(xx, ax):
        def run(nt):
            rm_, rv_ = rm.copy(), rv.copy()
            y = bncore.instance_norm(xx, rm_, rv_, w, b, axis=ax, n_threads=nt)
            return y, rm_, rv_
        return run

    B = bncore
    table = {
        "moments": lambda nt: B.moments(x, axis=(0, 2, 3), n_threads=nt),
        "moments-channels-last": lambda nt: B.moments(xl, axis=(0, 1, 2), n_threads=nt),
        "moments-all": lambda nt: B.moments(x, n_threads=nt),
        "moments-strided": lambda nt: B.moments(xs, axis=0, n_threads=nt),
        "batch_norm-train": train(x, 1),
        "batch_norm-train-channels-last": train(xl, -1),
        "batch_norm-eval": lambda nt: B.batch_norm(x, rm, rv, w, b, n_threads=nt),
        "batch_norm-eval-channels-last": lambda nt: B.batch_norm(xl, rm, rv, w, b, axis=-1,
                                                                 n_threads=nt),
        "batch_norm_forward": lambda nt: B.batch_norm_forward(x, w, b, n_threads=nt),
        "batch_norm_forward-strided": lambda nt: B.batch_norm_forward(xs, w, b, n_threads=nt),
        "batch_norm_forward-channels-last": lambda nt: B.batch_norm_forward(
            xl, w, b, axis=-1, n_threads=nt),
        "batch_norm_backward": lambda nt: B.batch_norm_backward(dy, x, m, s, w, n_threads=nt),
        "batch_norm_backward-channels-last": lambda nt: B.batch_norm_backward(
            dyl, xl, ml, sl, w, axis=-1, n_threads=nt),
        "batch_norm_backward-eval": lambda nt: B.batch_norm_backward(
            dy, x, m, s, w, training=False, n_threads=nt),
        "layer_norm": lambda nt: B.layer_norm(x, d, wd, wd, n_threads=nt),
        "layer_norm_forward": lambda nt: B.layer_norm_forward(x, d, wd, wd, n_threads=nt),
        "layer_norm_forward-channels-last": lambda nt: B.layer_norm_forward(xl, c,
                                                                            n_threads=nt),
        "layer_norm_backward": lambda nt: B.layer_norm_backward(dy, x, lm, ls, d, wd,
                                                                n_threads=nt),
        "layer_norm_backward-channels-last": lambda nt: B.layer_norm_backward(
            dyl, xl, lm2, ls2, c, n_threads=nt),
        "rms_norm": lambda nt: B.rms_norm(x, d, wd, n_threads=nt),
        "rms_norm_forward": lambda nt: B.rms_norm_forward(x, (shape[-2], d), n_threads=nt),
        "rms_norm_backward": lambda nt: B.rms_norm_backward(dy, x, r, d, wd, n_threads=nt),
        "group_norm": lambda nt: B.group_norm(x, 8, w, b, n_threads=nt),
        "group_norm_forward": lambda nt: B.group_norm_forward(x, 8, w, b, n_threads=nt),
        "group_norm_forward-channels-last": lambda nt: B.group_norm_forward(
            xl, 8, w, b, axis=-1, n_threads=nt),
        "group_norm_backward": lambda nt: B.group_norm_backward(dy, x, gm, gs, 8, w,
                                                                n_threads=nt),
        "group_norm_backward-channels-last": lambda nt: B.group_norm_backward(
            dyl, xl, gml, gsl, 8, w, axis=-1, n_threads=nt),
        "instance_norm": inst(x, 1),
        "instance_norm-channels-last": inst(xl, -1),
        "instance_norm_forward": lambda nt: B.instance_norm_forward(x, w, b, n_threads=nt),
        "instance_norm_forward-channels-last": lambda nt: B.instance_norm_forward(
            xl, w, b, axis=-1, n_threads=nt),
        "instance_norm_backward": lambda nt: B.instance_norm_backward(dy, x, im, is_, w,
                                                                      n_threads=nt),
        "instance_norm_backward-channels-last": lambda nt: B.instance_norm_backward(
            dyl, xl, iml, isl, w, axis=-1, n_threads=nt),
    }
    inputs = dict(x=x, dy=dy, xl=xl, dyl=dyl, xs=xs, w=w, b=b, rm=rm, rv=rv)
    ops = {k: (lambda f: lambda nt=None: tuple(np.asarray(a) for a in _tup(f(nt))))(f)
           for k, f in table.items()}
    return ops, inputs


def _tup(v):
    return v if isinstance(v, tuple) else (v,)


OPS, INPUTS = make_ops()
OPS64, _ = make_ops((4, 32, 24, 24), np.float64, seed=3)       # 73,728 values


def identical(a, b):
    return len(a) == len(b) and all(
        u.dtype == v.dtype and u.shape == v.shape and np.array_equal(u, v, equal_nan=True)
        for u, v in zip(a, b))


def test_the_table_covers_every_public_op():
    ops = {n for n in bncore.__all__ if n not in ("__version__", "show_config", "Moments")}
    covered = {k.split("-")[0] for k in OPS}
    assert ops <= covered, f"no determinism case for {sorted(ops - covered)}"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_bitwise_identical_for_any_n_threads(name, dtype):
    ops = OPS if dtype == "float32" else OPS64
    base = ops[name](1)
    assert all(a.size > 0 for a in base)
    for nt in (2, 3, 8, None):
        assert identical(base, ops[name](nt)), f"{name} ({dtype}) differs with {nt} threads"


# Channels-last group and instance norm run a sample per thread, or put every thread on
# each sample when that leaves fewer threads idle (fewer samples than threads, as in
# batch-1 inference, or a last round that only some threads fill). Each case has several
# row chunks per sample (rows_chunks: 4 for 3,136 rows of 64 channels, 2 for 16,384 of 5
# and 9,216 of 12), so both ways run across n_threads: n=1 is shared by any team of 2 or
# more; n=3 is shared by 2 threads and runs a sample per thread with 3. The last two are
# one row chunk each (196 rows of 256 channels, 144 of 400), so their threads split the
# groups instead (cols_forward): float anywhere, double in shares of 16 channels (G=50:
# groups of 8 channels, two to a share; instance norm's groups of one, 16).
FEW_SAMPLES = [((1, 56, 56, 64), 8), ((3, 56, 56, 64), 32), ((1, 128, 128, 5), 5),
               ((1, 96, 96, 12), 4), ((1, 14, 14, 256), 8), ((1, 12, 12, 400), 50)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape,groups", FEW_SAMPLES)
def test_channels_last_samples_shared_by_the_threads(shape, groups, dtype):
    rng = np.random.default_rng(5)
    x = rng.normal(3.0, 2.0, shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    c = shape[-1]
    w, b = rng.normal(size=c).astype(dtype), rng.normal(size=c).astype(dtype)

    def run(nt):
        y, m, s = bncore.group_norm_forward(x, groups, w, b, axis=-1, n_threads=nt)
        grads = bncore.group_norm_backward(dy, x, m, s, groups, w, axis=-1, n_threads=nt)
        yi, mi, si = bncore.instance_norm_forward(x, w, b, axis=-1, n_threads=nt)
        gradsi = bncore.instance_norm_backward(dy, x, mi, si, w, axis=-1, n_threads=nt)
        return (y, m, s) + tuple(grads) + (yi, mi, si) + tuple(gradsi)

    base = run(1)
    for nt in (2, 3, 8):
        assert identical(base, run(nt)), f"differs with {nt} threads"
    xx = x.copy()   # in place, shared by the threads
    bncore.group_norm(xx, groups, w, b, axis=-1, out=xx, n_threads=2)
    assert np.array_equal(xx, base[0])
    gg = dy.copy()
    bncore.group_norm_backward(gg, x, base[1], base[2], groups, w, axis=-1, out=gg,
                               n_threads=2)
    assert np.array_equal(gg, base[3])
    # and the values are right: the float64 reference
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=1e-10, atol=1e-10)
    ry, rm, rs = ref.group_norm_forward(x, groups, w, b, axis=-1)
    for got, want in zip(base[:3], (ry, rm, rs)):
        np.testing.assert_allclose(got, want, **tol)
    for got, want in zip(base[3:6], ref.group_norm_backward(dy, x, rm, rs, groups, w, axis=-1)):
        np.testing.assert_allclose(got, want, **tol)
    ry, rm, rs = ref.instance_norm_forward(x, w, b, axis=-1)
    for got, want in zip(base[6:9], (ry, rm, rs)):
        np.testing.assert_allclose(got, want, **tol)
    for got, want in zip(base[9:], ref.instance_norm_backward(dy, x, rm, rs, w, axis=-1)):
        np.testing.assert_allclose(got, want, **tol)


# Channels-last batch-norm backward of one row chunk (few rows, many channels): the
# threads take tiles of channels, each starting at a multiple of 32 (the last takes the
# rest, odd widths included); every channel's sums stay the bits of one call over the
# whole row, so dx, dweight and dbias are those of one thread.
FEW_ROWS = [((64, 1024), "float32"), ((64, 1, 1, 1000), "float32"), ((40, 777), "float64"),
            ((160, 1, 1, 256), "float32"),
            ((2, 5, 5, 2050), "float32")]


@pytest.mark.parametrize("shape,dtype", FEW_ROWS)
def test_channels_last_few_rows_split_by_channel_tiles(shape, dtype):
    rng = np.random.default_rng(8)
    x = rng.normal(1e3, 2.0, shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    c = shape[-1]
    w = rng.normal(size=c).astype(dtype)
    _, m, s = bncore.batch_norm_forward(x, w, training=True, axis=-1)

    def run(nt):
        return (bncore.batch_norm_backward(dy, x, m, s, w, training=True, axis=-1,
                                           n_threads=nt)
                + bncore.batch_norm_backward(dy, x, m, s, None, training=False, axis=-1,
                                             n_threads=nt))

    base = run(1)
    for nt in (2, 3, 5, 8):
        assert identical(base, run(nt)), f"differs with {nt} threads"
    want = ref.batch_norm_backward(dy, x, m, s, w, training=True, axis=-1)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=1e-10, atol=1e-10)
    for got, exp in zip(base[:3], want):
        np.testing.assert_allclose(got, exp, **tol)


# Channels-last statistics with more threads than row chunks (the chunks come from the
# shape): each chunk's blocks of 256 channels go to threads of their own, with the bits of
# the whole row on one thread. (2048, 600): 8 chunks of 3 channel blocks; (600, 520): 5 of
# 3; (3, 20, 10, 1100): 8 of 5, the last block 76 channels wide.
MORE_THREADS_THAN_CHUNKS = [((2048, 600), "float32"), ((600, 520), "float64"),
                            ((3, 20, 10, 1100), "float32")]


@pytest.mark.parametrize("shape,dtype", MORE_THREADS_THAN_CHUNKS)
def test_channels_last_statistics_split_by_channel_blocks(shape, dtype):
    rng = np.random.default_rng(11)
    x = rng.normal(1e3, 2.0, shape).astype(dtype)
    c = shape[-1]
    w, b = rng.normal(size=c).astype(dtype), rng.normal(size=c).astype(dtype)
    axes = tuple(range(x.ndim - 1))

    def run(nt):
        return (bncore.batch_norm_forward(x, w, b, training=True, axis=-1, n_threads=nt)
                + bncore.moments(x, axis=axes, n_threads=nt))

    base = run(1)
    for nt in (2, 8, 16):
        assert identical(base, run(nt)), f"differs with {nt} threads"
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=1e-10, atol=1e-10)
    for got, want in zip(base[:3], ref.batch_norm_forward(x, w, b, training=True, axis=-1)):
        np.testing.assert_allclose(got, want, **tol)
    xs = x.astype(np.float64).reshape(-1, c)   # moments keep x's dtype: rounded once
    r = 1e-7 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(base[3], xs.mean(axis=0), rtol=r)
    np.testing.assert_allclose(base[4], xs.var(axis=0), rtol=10 * r)


# Layer/RMS norm backward of a few wide float rows (2048 values or more, under 128 rows,
# dy and x within 4 MiB) goes by column tiles: the row sums with the threads on rows, then
# dx and each column's sums with the threads on tiles of columns. The same bits for any
# thread count, and each row's dx has the bits the row path (128 rows and more) gives it;
# rows of wider arrays (views) too. Odd widths leave a last tile of a few columns; (3, 5000)
# has more tiles than rows. Rows whose dy and x fit two thirds of the L1 (48 KiB: up to
# 4096 floats) go by rows instead, or with more threads than row chunks ((64, 4096): 4)
# by each chunk's tiles, with the row path's bits: an L1 of 32 KiB puts them all on tiles.
WIDE_ROWS = [(64, 4096), (7, 2051), (127, 2048), (3, 5000)]


@pytest.mark.parametrize("l1", [32 << 10, 48 << 10])
@pytest.mark.parametrize("rows,d", WIDE_ROWS)
def test_few_wide_rows_split_by_column_tiles(rows, d, l1):
    from conftest import PINNED_THRESHOLDS
    _config.set_thresholds(**{**PINNED_THRESHOLDS, "l1_bytes": l1})
    try:
        wide_rows_case(rows, d)
    finally:
        _config.set_thresholds(**PINNED_THRESHOLDS)


def wide_rows_case(rows, d):
    rng = np.random.default_rng(9)
    x = rng.normal(100.0, 2.0, (128, d)).astype(np.float32)
    dy = rng.normal(size=(128, d)).astype(np.float32)
    w = rng.normal(size=d).astype(np.float32)
    _, m, s = bncore.layer_norm_forward(x, d, w, w)
    _, r = bncore.rms_norm_forward(x, d, w)
    g, xx, mm, ss, rr = dy[:rows], x[:rows], m[:rows], s[:rows], r[:rows]

    def run(nt):
        return (bncore.layer_norm_backward(g, xx, mm, ss, d, w, n_threads=nt)
                + bncore.layer_norm_backward(g, xx, mm, ss, d, n_threads=nt)
                + bncore.rms_norm_backward(g, xx, rr, d, w, n_threads=nt))

    base = run(1)
    for nt in (2, 3, 8, None):
        assert identical(base, run(nt)), f"differs with {nt} threads"

    def double_sums(nt):   # dweight/dbias before the float32 outputs round them
        out = []   # (the kernel call takes float64 statistics; the forward gave float32)
        m64, s64, r64 = (a.astype(np.float64) for a in (mm, ss, rr))
        for mean, inv, dbias in ((m64, s64, np.empty(d)), (None, r64, None)):
            dw, dx = np.empty(d), np.empty_like(g)
            _rownorm.backward(g, xx, dx, rows, d, d, d, d, mean, inv, w.astype(np.float64),
                              dw, dbias, mean is None, nt)
            out += [dx, dw] + ([] if dbias is None else [dbias])
        return tuple(out)

    sums = double_sums(1)
    for nt in (2, 3, 8):
        assert identical(sums, double_sums(nt)), f"float64 sums differ with {nt} threads"
    assert np.array_equal(base[0], bncore.layer_norm_backward(dy, x, m, s, d, w)[0][:rows])
    assert np.array_equal(base[6], bncore.rms_norm_backward(dy, x, r, d, w)[0][:rows])
    tol = dict(rtol=1e-4, atol=1e-4)
    for got, exp in zip(base[:3], ref.layer_norm_backward(g, xx, mm, ss, d, w)):
        np.testing.assert_allclose(got, exp, **tol)
    for got, exp in zip(base[6:], ref.rms_norm_backward(g, xx, rr, d, w)):
        np.testing.assert_allclose(got, exp, **tol)
    inplace = g.copy()   # dx written over dy: every tile reads its dy before writing dx
    got = bncore.layer_norm_backward(inplace, xx, mm, ss, d, w, out=inplace)
    assert got[0] is inplace and identical(got, base[:3])
    gv = np.zeros((rows, d + 9), np.float32)[:, 5:5 + d]   # rows of wider arrays
    xv = np.zeros((rows, d + 3), np.float32)[:, 2:2 + d]
    gv[...], xv[...] = g, xx
    assert identical(bncore.layer_norm_backward(gv, xv, mm, ss, d, w), base[:3])
    assert identical(bncore.rms_norm_backward(gv, xv, rr, d, w), base[6:])


# NCHW group norm with fewer (sample, group) runs than threads, or a last round only some
# threads fill: every thread on each run (group_rows_team: the run's chunks, then its
# channels; backward: its channels). Runs of 3136 * 64 = 200704 floats (12 chunks), and a
# float64 run of 1600 * 32 values.
FEW_RUNS = [((1, 64, 56, 56), 1, "float32"), ((3, 16, 48, 48), 1, "float32"),
            ((1, 64, 56, 56), 2, "float32"), ((1, 32, 40, 40), 1, "float64")]


def group_inputs(seed, shape, dtype, offset, c):
    """x (normal around offset), dy, and per-channel weight and bias of c channels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(offset, 2.0, shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    return x, dy, rng.normal(size=c).astype(dtype), rng.normal(size=c).astype(dtype)


@pytest.mark.parametrize("shape,groups,dtype", FEW_RUNS)
def test_nchw_group_runs_shared_by_the_threads(shape, groups, dtype):
    x, dy, w, b = group_inputs(6, shape, dtype, 3.0, shape[1])

    def run(nt):
        y, m, s = bncore.group_norm_forward(x, groups, w, b, n_threads=nt)
        return (y, m, s) + tuple(bncore.group_norm_backward(dy, x, m, s, groups, w,
                                                            n_threads=nt))

    base = run(1)
    for nt in (2, 3, 8):
        assert identical(base, run(nt)), f"differs with {nt} threads"
    xx = x.copy()   # in place, shared by the threads
    bncore.group_norm(xx, groups, w, b, out=xx, n_threads=2)
    assert np.array_equal(xx, base[0])
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=1e-10, atol=1e-10)
    ry, rm, rs = ref.group_norm_forward(x, groups, w, b)
    for got, want in zip(base[:3], (ry, rm, rs)):
        np.testing.assert_allclose(got, want, **tol)
    for got, want in zip(base[3:], ref.group_norm_backward(dy, x, rm, rs, groups, w)):
        np.testing.assert_allclose(got, want, **tol)


# Channels-last groups of 48 to 1024 channels (16 over at most 64 rows) and at most
# BN_RUN_MAX values take their statistics straight from each (sample, group) block, a run
# of blocks per thread (direct_groups; float blocks pipelined, each block's statistics
# beside the last one's affine, so in place the affine must not reach the next block):
# 64 channels a group over 49 rows, 17 over 63, 48 over 400, float64 too; and float groups
# of 32 channels over 196 rows in inputs of up to 2 MiB (DIRECT_BYTES), and of 16 channels
# in a batch of one over up to 256 rows (DIRECT_ONE_ROWS).
WIDE_GROUPS = [((32, 7, 7, 512), 8, "float32"), ((2, 7, 9, 51), 3, "float32"),
               ((2, 20, 20, 96), 2, "float32"), ((3, 5, 7, 48), 3, "float64"),
               ((1, 4, 4, 1024), 1, "float32"), ((4, 14, 14, 256), 8, "float32"),
               ((2, 14, 14, 512), 16, "float32"), ((1, 14, 14, 384), 24, "float32"),
               ((1, 16, 16, 256), 16, "float32")]


@pytest.mark.parametrize("shape,groups,dtype", WIDE_GROUPS)
def test_channels_last_wide_groups_straight_from_the_block(shape, groups, dtype):
    c = shape[-1]
    x, _, w, b = group_inputs(7, shape, dtype, 1e3, c)
    base = bncore.group_norm_forward(x, groups, w, b, axis=-1, n_threads=1)
    for nt in (2, 3, 8):
        assert identical(base, bncore.group_norm_forward(x, groups, w, b, axis=-1,
                                                         n_threads=nt)), f"{nt} threads"
    xx = x.copy()
    bncore.group_norm(xx, groups, w, b, axis=-1, out=xx, n_threads=2)
    assert np.array_equal(xx, base[0])
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=1e-10, atol=1e-10)
    for got, want in zip(base, ref.group_norm_forward(x, groups, w, b, axis=-1)):
        np.testing.assert_allclose(got, want, **tol)
    # the statistics to float64 precision at a 1e3 offset (exact: float64 two-pass)
    xs = x.astype(np.float64).reshape(shape[0], -1, groups, c // groups)
    var = xs.var(axis=(1, 3))
    np.testing.assert_allclose(1.0 / base[2].astype(np.float64) ** 2 - 1e-5, var,
                               rtol=1e-5 if dtype == "float32" else 1e-9)


_DIGEST_SCRIPT = """
import hashlib, json, sys
sys.path.insert(0, {tests!r})
import numpy as np, bncore
from test_threads import OPS, OPS64, INPUTS
out = {{}}
for table, tag in ((OPS, ""), (OPS64, "/f64")):
    for name in sorted(table):
        h = hashlib.sha256()
        for a in table[name]():
            h.update(a.tobytes())
        out[name + tag] = h.hexdigest()
acc = bncore.Moments().update(INPUTS["x"][:5], axis=(0, 2, 3)).update(INPUTS["x"][5:],
                                                                      axis=(0, 2, 3))
out["Moments"] = hashlib.sha256(acc.mean.tobytes() + acc.var().tobytes()).hexdigest()
from bncore import _openmp
print(json.dumps({{"threads": _openmp.max_threads(), "digests": out}}))
"""


def test_bitwise_identical_across_OMP_NUM_THREADS():
    """n_threads=None under OMP_NUM_THREADS=1, 2 and 3, in fresh processes."""
    script = _DIGEST_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    runs = {}
    for threads in ("1", "2", "3"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[threads] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [runs[t]["threads"] for t in ("1", "2", "3")] == [1, 2, 3], \
        "OMP_NUM_THREADS was not honoured"
    base = runs["1"]["digests"]
    assert len(base) >= len(OPS) + len(OPS64) + 1
    for t in ("2", "3"):
        differ = sorted(k for k in base if runs[t]["digests"][k] != base[k])
        assert not differ, f"OMP_NUM_THREADS={t} changes the results of {differ}"


_POOL_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import numpy as np, bncore
from test_threads import make_ops
cases = dict(make_ops()[0])
for k, v in make_ops((4, 32, 24, 24), np.float64, seed=3)[0].items():
    cases[k + "/f64"] = v
x = np.random.default_rng(0).normal(size=(128, 64, 14, 14)).astype(np.float32)
_, m, s = bncore.group_norm_forward(x, 8)
cases["group_norm_backward (128, 64, 14, 14) G=8"] = (
    lambda nt: bncore.group_norm_backward(x, x, m, s, 8, n_threads=nt))
x16 = x.astype(np.float16)   # its conversions run on the call's threads too
cases["batch_norm_forward float16"] = lambda nt: bncore.batch_norm_forward(x16, n_threads=nt)
_, lm, ls = bncore.layer_norm_forward(x16, (14, 14))
cases["layer_norm_backward float16"] = (
    lambda nt: bncore.layer_norm_backward(x16, x16, lm, ls, (14, 14), n_threads=nt))
tids = lambda: sorted(os.listdir("/proc/self/task"))
nt = {nt}
for f in cases.values():      # the pool grows to its largest team
    f(nt)
churn = []
for name, f in sorted(cases.items()):
    before = tids()
    f(nt)
    f(nt)
    if tids() != before:
        churn.append(name)
first = tids()
for f in cases.values():      # one op after another
    f(nt)
print(json.dumps({{"threads": len(first), "churn": churn, "steady": tids() == first}}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
def test_calls_keep_the_openmp_threads_they_find():
    """Every region starts a team of one thread or of all n_threads, so the OpenMP pool
    keeps its threads from call to call and op to op. libgomp ends the pool's threads
    beyond a smaller team (of two or more) and creates them anew for the next larger one:
    a group-norm backward whose weight-gradient step started 8 threads of 16 re-created 8
    threads on every call (slower on 16 threads than on 8). In a fresh process: the
    thread ids of /proc/self/task stay the same over repeated calls of every op, with
    n_threads=16 (more than this machine may have; the pool is libgomp's all the same)."""
    script = _POOL_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), nt=16)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["threads"] >= 16, f"no 16-thread pool: {got['threads']} threads"
    assert not got["churn"], f"calls end or create OpenMP threads: {got['churn']}"
    assert got["steady"], "running the ops one after another ends or creates threads"


_HUGE_COUNT_SCRIPT = """
import json, os, sys
import numpy as np, bncore
from bncore import _openmp
rng = np.random.default_rng(0)
x = rng.normal(3.0, 2.0, (16, 64, 32, 32)).astype(np.float32)
dy = rng.normal(size=x.shape).astype(np.float32)
def run(nt):
    fwd = bncore.batch_norm_forward(x, n_threads=nt)
    return (*fwd, bncore.layer_norm(x, (32, 32), n_threads=nt),
            *bncore.batch_norm_backward(dy, x, *fwd[1:], n_threads=nt))
one = run(1)
same = all(all(np.array_equal(a, b) for a, b in zip(run(nt), one))
           for nt in (2**31, 2**70, 65536, 100000))
print(json.dumps({{"same": bool(same), "max": _openmp.thread_max(),
                  "threads": len(os.listdir("/proc/self/task"))}}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
def test_huge_thread_counts_start_at_most_thread_max_threads():
    """n_threads=2**31 (documented as accepted) had started a team of 65536 threads, and
    the process died (SIGSEGV) running out of thread stacks. In a fresh process: counts of
    2**31, 2**70, 65536 and 100000 on an input big enough for threads give the one-thread
    bits and start no more than thread_max() threads: the processors or 256, the more."""
    script = _HUGE_COUNT_SCRIPT.format()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["same"]
    assert got["max"] == max(256, len(os.sched_getaffinity(0)))
    # the pool (max - 1 and the main thread), OpenBLAS's (a thread a processor at most)
    assert got["threads"] <= got["max"] + len(os.sched_getaffinity(0)) + 2


_FORK_SCRIPT = """
import hashlib, json, os, sys
sys.path.insert(0, {tests!r})
import numpy as np, bncore
from bncore import _openmp

def digests(nts):
    from test_threads import make_ops
    ops = make_ops()[0]
    x16 = np.random.default_rng(1).normal(size=(8, 64, 16, 16)).astype(np.float16)
    ops["batch_norm_forward float16"] = lambda nt: bncore.batch_norm_forward(x16, n_threads=nt)
    ops["Moments"] = lambda nt: (bncore.Moments().update(x16, axis=(0, 2, 3)).var(),)
    out = {{}}
    for name, f in sorted(ops.items()):
        for nt in nts:
            h = hashlib.sha256()
            for a in f(nt):
                h.update(np.asarray(a).tobytes())
            out[name + "/" + str(nt)] = h.hexdigest()
    return out

def child(nts):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        import signal
        signal.alarm(60)   # a hung child ends (and the parent reads no JSON)
        os.close(r)
        import contextlib, io
        shown = io.StringIO()
        with contextlib.redirect_stdout(shown):
            bncore.show_config()
        facts = {{"forked_child": _openmp.forked_child(), "max_threads": _openmp.max_threads(),
                 "config": bncore._config.config()["max_threads"], "shown": shown.getvalue()}}
        facts["digests"] = digests(nts)
        os.write(w, json.dumps(facts).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.waitpid(pid, 0)
    return json.loads(data)

early = child([2])                 # forked before any team of bncore's ran
parent = digests([2])              # teams of two run here
late = child([None, 2, 3])         # forked after: one thread, whatever is asked
print(json.dumps({{"early": early, "late": late, "parent": parent,
                  "parent_threads": _openmp.max_threads()}}))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_after_threads_ran_computes_on_one_thread():
    """libgomp's thread pool does not survive fork: a child forked after a team of two or
    more threads ran in its parent (multiprocessing's default "fork" start method on
    Linux) waited forever in its first parallel region. In a fresh process: a child forked
    before any team ran keeps OpenMP's threads; one forked after runs every op (float32,
    float16, Moments) with n_threads None, 2 and 3 to completion on one thread
    (max_threads(), config() and show_config() say so) and gets the parent's bits."""
    script = _FORK_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)   # (a hung child: TimeoutExpired)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["parent_threads"] == 2
    assert not got["early"]["forked_child"] and got["early"]["max_threads"] == 2
    assert got["late"]["forked_child"] and got["late"]["max_threads"] == 1
    assert got["late"]["config"] == 1
    assert "one thread in this child" in got["late"]["shown"]
    assert "one thread in this child" not in got["early"]["shown"]
    assert got["early"]["digests"] == got["parent"]
    for nt in ("None", "2", "3"):
        late = {k.rsplit("/", 1)[0]: v for k, v in got["late"]["digests"].items()
                if k.endswith("/" + nt)}
        assert late == {k.rsplit("/", 1)[0]: v for k, v in got["parent"].items()}, nt


def _snapshot(inputs):
    return {k: v.copy() for k, v in inputs.items()}


@pytest.mark.parametrize("inputs", ["shared", "separate"])
def test_eight_python_threads_at_once_give_the_serial_results(inputs):
    """96 calls spread over 8 threads, each with n_threads=2 (nested teams): every op's
    result equals the serial one bitwise. 'shared': every thread reads the same arrays;
    'separate': each job builds its own inputs (seed 0 or 1) and compares with that."""
    names = sorted(OPS)
    tables = {0: OPS, 1: make_ops(seed=1)[0]} if inputs == "separate" else {0: OPS}
    serial = {(s, n): t[n](1) for s, t in tables.items() for n in names}
    before = _snapshot(INPUTS)
    jobs = [(i % len(tables), names[i % len(names)]) for i in range(3 * len(names))]
    local = threading.local()

    def run(job):
        seed, name = job
        if inputs == "separate":       # a private copy of every input for this thread
            if not hasattr(local, "tables"):
                local.tables = {}
            if seed not in local.tables:
                local.tables[seed] = make_ops(seed=seed)[0]
            return job, local.tables[seed][name](2)
        return job, tables[seed][name](2)

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, jobs))
    assert len(results) == len(jobs)
    for job, res in results:
        assert identical(res, serial[job]), f"{job[1]} differs when called concurrently"
    for k, v in before.items():
        assert np.array_equal(INPUTS[k], v), f"input {k} was modified"


# ------------------------------------------------------------------ the GIL

BIG = (64, 64, 64, 64)            # 16.8M float32 values: one call is tens of ms


@pytest.fixture(scope="module")
def big():
    rng = np.random.default_rng(7)
    x = rng.standard_normal(BIG, dtype=np.float32)
    return x, np.ascontiguousarray(np.moveaxis(x, 1, -1)), rng.standard_normal(
        BIG, dtype=np.float32)


def _gil_ops(big):
    x, xl, dy = big
    c = x.shape[1]
    ones = np.ones(c, np.float32)
    _, m, s = bncore.batch_norm_forward(x, n_threads=1)
    B = bncore
    return {
        "moments": lambda: B.moments(x, axis=(0, 2, 3), n_threads=1),
        "Moments.update": lambda: B.Moments().update(x, axis=(0, 2, 3)),
        "batch_norm": lambda: B.batch_norm(x, m, 1 / s ** 2, n_threads=1),
        "batch_norm_forward": lambda: B.batch_norm_forward(x, n_threads=1),
        "batch_norm_forward-channels-last": lambda: B.batch_norm_forward(xl, axis=-1,
                                                                         n_threads=1),
        "batch_norm_backward": lambda: B.batch_norm_backward(dy, x, m, s, n_threads=1),
        "layer_norm": lambda: B.layer_norm(x, 64, n_threads=1),
        "layer_norm_backward": lambda: B.layer_norm_backward(
            dy, x, *B.layer_norm_forward(x, 64, n_threads=1)[1:], 64, n_threads=1),
        "rms_norm": lambda: B.rms_norm(x, 64, n_threads=1),
        "group_norm": lambda: B.group_norm(x, 8, ones, ones, n_threads=1),
        "group_norm-channels-last": lambda: B.group_norm(xl, 8, axis=-1, n_threads=1),
        "instance_norm": lambda: B.instance_norm(x, n_threads=1),
        "instance_norm_backward": lambda: B.instance_norm_backward(
            dy, x, *B.instance_norm_forward(x, n_threads=1)[1:], n_threads=1),
    }


def _longest_stall(call):
    """(longest gap between heartbeats while ``call`` ran, duration of the call)."""
    stop = threading.Event()
    gaps = [0.0]
    started = threading.Event()

    def heartbeat():
        last = time.perf_counter()
        started.set()
        while not stop.is_set():
            now = time.perf_counter()
            gaps[0] = max(gaps[0], now - last)
            last = now

    t = threading.Thread(target=heartbeat)
    t.start()
    started.wait()
    time.sleep(0.01)
    gaps[0] = 0.0
    t0 = time.perf_counter()
    call()
    duration = time.perf_counter() - t0
    stop.set()
    t.join()
    return gaps[0], duration


@pytest.mark.parametrize("name", ["moments", "Moments.update", "batch_norm",
                                  "batch_norm_forward", "batch_norm_forward-channels-last",
                                  "batch_norm_backward", "layer_norm", "layer_norm_backward",
                                  "rms_norm", "group_norm", "group_norm-channels-last",
                                  "instance_norm", "instance_norm_backward"])
def test_kernels_release_the_gil(big, name):
    """A kernel holding the GIL for a call of T ms stalls the heartbeat for ~T ms on every
    try; released, the heartbeat keeps ticking (stalls of a few ms: the switch interval,
    allocation, the OS). Measured on 2 busy cores: stall/duration 0.03-0.29 for every op
    (calls of 20-460 ms); a GIL-holding control, sum(range(3e7)), gives 0.99."""
    call = _gil_ops(big)[name]
    call()                                     # warm-up: page faults, thread pools
    ratios = []
    for _ in range(5):
        stall, duration = _longest_stall(call)
        ratios.append(stall / duration)
        if ratios[-1] < 0.5:
            break
    assert min(ratios) < 0.5, (f"{name}: the heartbeat stalled for {min(ratios):.0%} of the "
                               f"call ({duration * 1e3:.0f} ms): the GIL is held")



def test_batch_norm_beyond_the_caches_prefetching_the_next_channel():
    """Data over 16 MiB (streamed stores) in channels over 4096 values: each thread's
    channel affine / dx prefetches its next channel. Same bits for any thread count, and
    the float64 reference's values."""
    rng = np.random.default_rng(11)
    shape = (4, 32, 192, 192)                    # 18.9 MB of float32, 147,456 values a channel
    x = (rng.standard_normal(shape, dtype=np.float32) * 2 + 5)
    dy = rng.standard_normal(shape, dtype=np.float32)
    w = rng.normal(1, 0.5, 32)
    b = rng.normal(0, 0.5, 32)
    runs = []
    for nt in (1, 2, 3):
        y, m, s = bncore.batch_norm_forward(x, w, b, n_threads=nt)
        runs.append((y, m, s) + tuple(bncore.batch_norm_backward(dy, x, m, s, w, n_threads=nt)))
    for other in runs[1:]:
        for u, v in zip(runs[0], other):
            assert np.array_equal(u, v)
    y, m, s, dx, dw, db = runs[0]
    ry, rm, rs = ref.batch_norm_forward(x.astype(np.float64), w, b)
    np.testing.assert_allclose(y, ry, rtol=0, atol=2e-6 * np.abs(ry).max())
    np.testing.assert_allclose(m, rm, rtol=1e-7)    # saved in x's dtype
    np.testing.assert_allclose(s, rs, rtol=1e-7)
    rdx, rdw, rdb = ref.batch_norm_backward(dy.astype(np.float64), x.astype(np.float64),
                                            m.astype(np.float64), s.astype(np.float64), w)
    np.testing.assert_allclose(dx, rdx, rtol=0, atol=2e-6 * np.abs(rdx).max())
    np.testing.assert_allclose(dw, rdw, rtol=2e-7)
    np.testing.assert_allclose(db, rdb, rtol=2e-7)


def test_wide_rows_beyond_the_caches_prefetching_the_next_channel_block():
    """Channels-last statistics of rows wider than a channel block (256) over 16 MiB:
    each block prefetches the next channel block of its rows, the last one the next rows
    (beyond_caches). 2056 channels (eight blocks and an 8-channel one), contiguous and as a
    view with rows 2100 apart; group norm's shared-sample path too. Same bits for any
    thread count, and the float64 reference's values at a large offset."""
    rng = np.random.default_rng(13)
    big = rng.standard_normal((2080, 2100), dtype=np.float32) * 3 + 1e3   # 17.5 MB
    for x in (np.ascontiguousarray(big[:, :2056]), big[:, :2056]):
        assert x.nbytes >= 16 * 2**20
        w = rng.normal(1, 0.5, 2056)
        runs = [bncore.moments(x, axis=0, n_threads=nt)
                + bncore.batch_norm_forward(x, w, None, axis=-1, n_threads=nt)
                for nt in (1, 2, 3)]
        for other in runs[1:]:
            for u, v in zip(runs[0], other):
                assert np.array_equal(u, v)
        x64 = x.astype(np.float64)
        mean, var, y = runs[0][0], runs[0][1], runs[0][2]
        np.testing.assert_allclose(mean, x64.mean(axis=0), rtol=6e-8)   # float32 results,
        np.testing.assert_allclose(var, x64.var(axis=0), rtol=6e-8)     # half an ulp off
        ry = ref.batch_norm_forward(x64, w, None, axis=-1)[0]
        np.testing.assert_allclose(y, ry, rtol=0, atol=2e-6 * np.abs(ry).max())
    x = big[:, :2080].reshape(2, 1040, 2080)                 # two samples of 1040 rows
    runs = [bncore.group_norm_forward(x, 8, axis=-1, n_threads=nt) for nt in (1, 2, 3)]
    for other in runs[1:]:
        for u, v in zip(runs[0], other):
            assert np.array_equal(u, v)
    ry, rm, _ = ref.group_norm_forward(x.astype(np.float64), 8, axis=-1)
    np.testing.assert_allclose(runs[0][0], ry, rtol=0, atol=2e-6 * np.abs(ry).max())
    np.testing.assert_allclose(runs[0][1], rm, rtol=1e-7)


@pytest.mark.parametrize("shape,dtype", [((64, 1000, 7, 7), np.float32),
                                         ((64, 1000, 5, 5), np.float64)])
def test_backward_beyond_the_caches_short_planes_by_sample(shape, dtype):
    """Batch-norm backward over planes under 256 bytes (196 and 200 here) with dy, x and dx
    over 32 MiB: both passes walk memory sample by sample (backward_by_sample), the sums
    by chunks of samples (47 and 24 chunks of 64 samples: uneven) added in chunk order.
    Same bits for any thread count, training and eval, and the float64 reference's
    values."""
    rng = np.random.default_rng(14)
    x = (rng.standard_normal(shape) * 3 + 40).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    assert 3 * x.nbytes >= 32 * 2**20
    c = shape[1]
    w = rng.normal(1, 0.5, c)
    _, m, s = bncore.batch_norm_forward(x, w, None)
    for training in (True, False):
        runs = [bncore.batch_norm_backward(dy, x, m, s, w, training=training, n_threads=nt)
                for nt in (1, 2, 3)]
        for other in runs[1:]:
            for u, v in zip(runs[0], other):
                assert np.array_equal(u, v)
        dx, dw, db = runs[0]
        rdx, rdw, rdb = ref.batch_norm_backward(dy.astype(np.float64), x.astype(np.float64),
                                                m.astype(np.float64), s.astype(np.float64), w,
                                                training=training)
        tol = 2e-6 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(dx, rdx, rtol=0, atol=tol * np.abs(rdx).max())
        np.testing.assert_allclose(dw, rdw, rtol=0, atol=tol * np.abs(rdw).max())
        np.testing.assert_allclose(db, rdb, rtol=0, atol=tol * np.abs(rdb).max())


@pytest.mark.parametrize("shape", [(96, 1000, 7, 7),     # 196-byte planes: not streamed
                                   (32, 1000, 12, 12)])  # 576-byte planes: streamed
def test_eval_beyond_the_caches_planes_in_memory_order(shape):
    """Eval batch norm over an output above 16 MiB, walked as runs of (n, c) planes in
    memory order (bn_planes_affine): chunk ends fall mid-sample (1000 channels), short
    planes go out with ordinary stores and longer ones streamed. Same bits for any thread
    count, into a fresh output, into a strided out= and in place, and the float64
    reference's values."""
    rng = np.random.default_rng(12)
    x = (rng.standard_normal(shape, dtype=np.float32) * 3 + 40)
    c = shape[1]
    rm, rv = rng.normal(40, 1, c), rng.uniform(4, 12, c)
    w, b = rng.normal(1, 0.5, c), rng.normal(0, 0.5, c)
    runs = [bncore.batch_norm(x, rm, rv, w, b, training=False, n_threads=nt)
            for nt in (1, 2, 3)]
    for other in runs[1:]:
        assert np.array_equal(runs[0], other)
    ry = ref.batch_norm(x.astype(np.float64), rm, rv, w, b, training=False)
    np.testing.assert_allclose(runs[0], ry, rtol=0, atol=2e-6 * np.abs(ry).max())
    big = np.full(shape[:-1] + (2 * shape[-1],), np.nan, np.float32)
    out = big[..., ::2]                          # y's planes strided, x's contiguous
    got = bncore.batch_norm(x, rm, rv, w, b, training=False, out=out, n_threads=2)
    assert got is out and np.array_equal(out, runs[0])
    assert np.isnan(big[..., 1::2]).all()        # the gaps untouched
    x_in = x.copy()
    bncore.batch_norm(x_in, rm, rv, w, b, training=False, out=x_in, n_threads=2)
    assert np.array_equal(x_in, runs[0])


def test_row_norms_beyond_the_caches_prefetching_rows_ahead():
    """Layer and RMS norm of rows over 16 MiB (streamed), where each row's affine fetches
    a row about 16 KiB ahead (across the threads' chunk ends too): same bits for any
    thread count, and the float64 reference's values."""
    rng = np.random.default_rng(12)
    for d in (64, 768):
        x = (rng.standard_normal((17 * 2**20 // (4 * d), d), dtype=np.float32) * 3 + 100)
        w = rng.normal(1, 0.5, d).astype(np.float32)
        b = rng.normal(0, 0.5, d).astype(np.float32)
        runs = [(bncore.layer_norm_forward(x, (d,), w, b, n_threads=nt)
                 + bncore.rms_norm_forward(x, (d,), w, n_threads=nt)) for nt in (1, 2, 3)]
        for other in runs[1:]:
            for u, v in zip(runs[0], other):
                assert np.array_equal(u, v)
        x64 = x.astype(np.float64)
        ry = ref.layer_norm(x64, (d,), w.astype(np.float64), b.astype(np.float64))
        np.testing.assert_allclose(runs[0][0], ry, rtol=0, atol=4e-6 * np.abs(ry).max())
        rr = ref.rms_norm(x64, (d,), w.astype(np.float64))
        np.testing.assert_allclose(runs[0][3], rr, rtol=0, atol=4e-6 * np.abs(rr).max())


# more samples than group_param_grads' runs (PARAM_CHUNKS), not a multiple of them: each
# run's weight-gradient sums on its own thread, the runs added in order after
MANY_SAMPLES = [((19, 16, 5, 5), 1, 4), ((19, 5, 5, 16), -1, 4), ((130, 4, 4, 64), -1, 8),
                ((67, 8, 6, 6), 1, 8)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape,axis,groups", MANY_SAMPLES)
def test_group_weight_grads_over_many_samples(shape, axis, groups, dtype):
    c = shape[axis]
    x, dy, w, b = group_inputs(7, shape, dtype, 2.0, c)

    def run(nt):
        _, m, s = bncore.group_norm_forward(x, groups, w, b, axis=axis, n_threads=nt)
        _, mi, si = bncore.instance_norm_forward(x, w, b, axis=axis, n_threads=nt)
        return (bncore.group_norm_backward(dy, x, m, s, groups, w, axis=axis, n_threads=nt)
                + bncore.instance_norm_backward(dy, x, mi, si, w, axis=axis, n_threads=nt))

    base = run(1)
    for nt in (2, 3, 8):
        assert identical(base, run(nt)), f"differs with {nt} threads"
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=1e-10, atol=1e-10)
    _, rm, rs = ref.group_norm_forward(x, groups, w, b, axis=axis)
    for got, want in zip(base[:3], ref.group_norm_backward(dy, x, rm, rs, groups, w,
                                                           axis=axis)):
        np.testing.assert_allclose(got, want, **tol)
    _, rm, rs = ref.instance_norm_forward(x, w, b, axis=axis)
    for got, want in zip(base[3:], ref.instance_norm_backward(dy, x, rm, rs, w, axis=axis)):
        np.testing.assert_allclose(got, want, **tol)


# rows few for their width (_batchnorm.few_rows): the threads split the channels, in the
# forward (forward_cols) and the backward (tiles); and just past the bound, by rows
FEW_ROWS = [((1, 7, 7, 2048), -1), ((8, 4096), 1), ((64, 1300), 1), ((3, 4, 4, 1024), -1),
            ((130, 2048), 1)]
# NCHW batches of one: each thread converts its own channels' parameters (chan_io), eval
# by runs of channels, the backward's small channels in one fused kernel (7x7, 1x1000)
BATCH_OF_ONE = [((1, 300, 5, 5), 1), ((1, 2048, 7, 7), 1), ((1, 40, 1, 1000), 1),
                ((2, 77, 3, 3), 1)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape,axis", FEW_ROWS + BATCH_OF_ONE)
def test_batch_norm_few_wide_rows(shape, axis, dtype):
    c = shape[axis]
    x, dy, w, b = group_inputs(8, shape, dtype, 40.0, c)

    def run(nt):
        rm, rv = np.linspace(-1, 1, c).astype(dtype), np.linspace(1, 2, c).astype(dtype)
        y, m, s = bncore.batch_norm_forward(x, w, b, running_mean=rm, running_var=rv,
                                            axis=axis, n_threads=nt)
        ye = bncore.batch_norm(x, rm, rv, w, b, training=False, axis=axis, n_threads=nt)
        return (y, m, s, rm, rv, ye) + bncore.batch_norm_backward(dy, x, m, s, w, axis=axis,
                                                                  n_threads=nt)

    base = run(1)
    for nt in (2, 3, 8):
        assert identical(base, run(nt)), f"differs with {nt} threads"
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == "float32" else dict(rtol=1e-9, atol=1e-9)
    ry, rm_, rs = ref.batch_norm_forward(x, w, b, axis=axis)
    for got, want in zip(base[:3], (ry, rm_, rs)):
        np.testing.assert_allclose(got, want, **tol)
    for got, want in zip(base[6:], ref.batch_norm_backward(dy, x, base[1], base[2], w,
                                                           axis=axis)):
        np.testing.assert_allclose(got, want, **tol)
