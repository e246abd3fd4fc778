"""Memory: no leaks, O(C) temporaries, 64-bit sizes, zero-size batches.

- Leaks: every op is called up to 100,000 times on a tiny input in a subprocess (about
  1.5 s per op at most): RSS must stay flat (C-level leaks: kernel scratch is malloc'd),
  then 3,000 more calls under tracemalloc must not grow the traced heap (Python-level
  leaks: arrays, views), and no argument may gain references (leaked borrows).
- Peak memory: tracemalloc's peak during a call on an 8 MB input (C = 64) minus the bytes
  of the returned arrays is O(C) for batch norm and moments, O(rows) for layer/RMS norm,
  O(N*C) for group/instance norm and per-sample moments (their statistics), never O(x).
- Huge: moments of broadcast views of more than 2**31 values (stride-0 reduced axes cost
  nothing), and a real 2.0 GiB float32 array (> 2**31 bytes: byte offsets need 64 bits)
  through moments and an in-place training batch norm, checked at markers placed past
  the 2 GiB mark.
- Zero-size batches against PyTorch 2.13: empty outputs, zero parameter gradients,
  running stats untouched.
"""
import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import bncore

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_ops(dtype=np.float64):
    """name -> zero-argument call on a (2, 8, 4, 4) input, and the arrays it reads."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 4, 4)).astype(dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    w, b = np.ones(8, dtype), np.zeros(8, dtype)
    rm, rv = np.zeros(8), np.ones(8)
    out = np.empty_like(x)
    _, m, s = bncore.batch_norm_forward(x)
    _, lm, ls = bncore.layer_norm_forward(x, 4)
    _, r = bncore.rms_norm_forward(x, 4)
    _, gm, gs = bncore.group_norm_forward(x, 2)
    _, im, is_ = bncore.instance_norm_forward(x)
    acc = bncore.Moments().update(x, axis=0)
    B = bncore
    ops = {
        "moments": lambda: B.moments(x, axis=(0, 2, 3)),
        "Moments.update+merge": lambda: B.Moments().update(x, axis=0).merge(acc),
        "batch_norm-train": lambda: B.batch_norm(x, rm, rv, w, b, training=True),
        "batch_norm-eval-out": lambda: B.batch_norm(x, rm, rv, w, b, out=out),
        "batch_norm_forward": lambda: B.batch_norm_forward(x, w, b),
        "batch_norm_forward-channels-last": lambda: B.batch_norm_forward(xl, w, b, axis=-1),
        "batch_norm_backward": lambda: B.batch_norm_backward(dy, x, m, s, w),
        "layer_norm_forward": lambda: B.layer_norm_forward(x, 4, np.ones(4)),
        "layer_norm_backward": lambda: B.layer_norm_backward(dy, x, lm, ls, 4),
        "rms_norm_forward": lambda: B.rms_norm_forward(x, 4),
        "rms_norm_backward": lambda: B.rms_norm_backward(dy, x, r, 4),
        "group_norm_forward": lambda: B.group_norm_forward(x, 2, w, b),
        "group_norm-channels-last": lambda: B.group_norm(xl, 2, w, b, axis=-1),
        "group_norm_backward": lambda: B.group_norm_backward(dy, x, gm, gs, 2, w),
        "instance_norm": lambda: B.instance_norm(x, rm, rv, w, b),
        "instance_norm_forward": lambda: B.instance_norm_forward(x, w, b),
        "instance_norm_backward": lambda: B.instance_norm_backward(dy, x, im, is_, w),
        "rejected-call": lambda: _swallow(lambda: B.batch_norm(x, rm, rv, np.ones(3))),
    }
    return ops, dict(x=x, dy=dy, xl=xl, w=w, b=b, rm=rm, rv=rv, out=out, m=m, s=s, lm=lm,
                     ls=ls, r=r, gm=gm, gs=gs, im=im, is_=is_)


def _swallow(call):
    try:
        call()
    except ValueError:
        pass


_LEAK_SCRIPT = """
import gc, json, sys, time, tracemalloc
sys.path.insert(0, {here!r})
import psutil
from test_memory import tiny_ops
ops, args = tiny_ops()
proc = psutil.Process()
report = {{}}
for name, call in ops.items():
    refs = {{k: sys.getrefcount(v) for k, v in args.items()}}
    t0 = time.perf_counter()
    for _ in range(2000):                       # warm-up: caches, freelists, arenas
        call()
    per_call = (time.perf_counter() - t0) / 2000
    calls = int(min(100_000, max(20_000, 1.5 / per_call)))
    gc.collect()
    rss0 = proc.memory_info().rss
    for _ in range(calls):
        call()
    gc.collect()
    rss1 = proc.memory_info().rss
    tracemalloc.start()
    for _ in range(1000):
        call()
    gc.collect()
    traced0 = tracemalloc.get_traced_memory()[0]
    for _ in range(2000):
        call()
    gc.collect()
    traced1 = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    gained = {{k: sys.getrefcount(v) - refs[k] for k, v in args.items()
              if sys.getrefcount(v) != refs[k]}}
    report[name] = dict(calls=calls, rss_growth=rss1 - rss0, traced_growth=traced1 - traced0,
                        refs_gained=gained, us_per_call=per_call * 1e6)
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def leak_report():
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", _LEAK_SCRIPT.format(here=HERE)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(tiny_ops()[0]))
def test_no_leak_over_many_calls(leak_report, name):
    """Measured (2 busy cores): 22,000-100,000 calls per op, RSS growth 0 B for every op
    (page granularity: 4 KB), traced growth under 1 KB per 2,000 calls, no reference
    gained. A leak of 16 bytes per call would show as >= 350 KB of RSS, 32 KB traced."""
    r = leak_report[name]
    assert r["calls"] >= 20_000
    assert r["rss_growth"] < 256 * 1024, f"{name}: RSS grew {r['rss_growth']} B in " \
                                         f"{r['calls']} calls"
    assert r["traced_growth"] < 8 * 1024, f"{name}: traced heap grew " \
                                          f"{r['traced_growth']} B in 2,000 calls"
    assert not r["refs_gained"], f"{name}: arguments gained references {r['refs_gained']}"


def test_every_public_op_is_leak_checked():
    ops = {n for n in bncore.__all__ if n not in ("__version__", "show_config")}
    covered = {n.split("-")[0].split(".")[0].replace("_forward", "").replace("_backward", "")
               for n in tiny_ops()[0]}
    base = {n.replace("_forward", "").replace("_backward", "") for n in ops}
    assert base <= covered, f"no leak check for {sorted(base - covered)}"


# ------------------------------------------------------------------ peak memory

C = 64
N_ROWS = 32 * 64 * 32            # layer/RMS norm over the last dim of (32, 64, 32, 32)
N_NC = 32 * C


def peak_ops(dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(3, 2, (32, C, 32, 32)).astype(dtype)     # 8 MB in float32
    dy = rng.normal(size=x.shape).astype(dtype)
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    dyl = np.ascontiguousarray(np.moveaxis(dy, 1, -1))
    w = np.ones(C, dtype)
    rm, rv = np.zeros(C), np.ones(C)
    _, m, s = bncore.batch_norm_forward(x)
    _, ml, sl = bncore.batch_norm_forward(xl, axis=-1)
    _, lm, ls = bncore.layer_norm_forward(x, 32)
    _, r = bncore.rms_norm_forward(x, 32)
    _, gm, gs = bncore.group_norm_forward(x, 8)
    _, gml, gsl = bncore.group_norm_forward(xl, 8, axis=-1)
    _, im, is_ = bncore.instance_norm_forward(x)
    _, iml, isl = bncore.instance_norm_forward(xl, axis=-1)
    B = bncore
    per_c, per_row, per_nc = C, N_ROWS, N_NC
    return {   # name: (call, number of statistics the op keeps)
        "moments": (lambda: B.moments(x, axis=(0, 2, 3)), per_c),
        "moments-channels-last": (lambda: B.moments(xl, axis=(0, 1, 2)), per_c),
        "Moments.update": (lambda: B.Moments().update(x, axis=(0, 2, 3)), per_c),
        # kept axes apart (per sample and channel): blocks of the data, no gathered copy
        "moments-per-sample-channels-last": (lambda: B.moments(xl, axis=(1, 2)), per_nc),
        "moments-per-sample-channels-last-view": (
            lambda: B.moments(xl.transpose(0, 3, 1, 2), axis=(2, 3)), per_nc),
        "batch_norm-train": (lambda: B.batch_norm(x, rm, rv, w, w, training=True), per_c),
        "batch_norm-train-channels-last": (
            lambda: B.batch_norm(xl, rm, rv, w, w, training=True, axis=-1), per_c),
        "batch_norm-eval": (lambda: B.batch_norm(x, rm, rv, w, w), per_c),
        "batch_norm-out": (lambda: B.batch_norm(x, rm, rv, w, w, out=np.empty_like(x)),
                           per_c),
        "batch_norm_forward": (lambda: B.batch_norm_forward(x, w, w), per_c),
        "batch_norm_backward": (lambda: B.batch_norm_backward(dy, x, m, s, w), per_c),
        "batch_norm_backward-channels-last": (
            lambda: B.batch_norm_backward(dyl, xl, ml, sl, w, axis=-1), per_c),
        "layer_norm_forward": (lambda: B.layer_norm_forward(x, 32), per_row),
        "layer_norm_backward": (lambda: B.layer_norm_backward(dy, x, lm, ls, 32), per_row),
        "rms_norm_forward": (lambda: B.rms_norm_forward(x, 32), per_row),
        "rms_norm_backward": (lambda: B.rms_norm_backward(dy, x, r, 32), per_row),
        "group_norm_forward": (lambda: B.group_norm_forward(x, 8, w, w), per_nc),
        "group_norm_forward-channels-last": (
            lambda: B.group_norm_forward(xl, 8, w, w, axis=-1), per_nc),
        "group_norm_backward": (lambda: B.group_norm_backward(dy, x, gm, gs, 8, w), per_nc),
        "group_norm_backward-channels-last": (
            lambda: B.group_norm_backward(dyl, xl, gml, gsl, 8, w, axis=-1), per_nc),
        "instance_norm": (lambda: B.instance_norm(x, rm, rv, w, w), per_nc),
        "instance_norm-channels-last": (lambda: B.instance_norm(xl, rm, rv, w, w, axis=-1),
                                        per_nc),
        "instance_norm_backward": (lambda: B.instance_norm_backward(dy, x, im, is_, w),
                                   per_nc),
        "instance_norm_backward-channels-last": (
            lambda: B.instance_norm_backward(dyl, xl, iml, isl, w, axis=-1), per_nc),
    }


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(peak_ops(np.float32)))
def test_peak_memory_beyond_the_outputs_is_per_statistic(name, dtype):
    """Traced peak minus returned bytes <= 16 float64 per statistic + 16 KB.

    Measured on (32, 64, 32, 32) (8 MB float32, 16 MB float64), beyond the outputs:
    batch norm and moments 1.5-3.8 KB (C = 64: a few float64 vectors of C); layer norm
    1049 KB (65,536 rows x 16 B: the float64 mean and invstd before the cast to x's
    stats dtype), RMS norm 526-1049 KB; group/instance norm 7-184 KB (2,048 (n, c) pairs
    x a few float64 arrays). Not traced: kernel scratch from C malloc (at most 64
    partial vectors of C doubles per call)."""
    call, nstats = peak_ops(np.dtype(dtype))[name]
    call()
    tracemalloc.start()
    tracemalloc.reset_peak()
    out = call()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    outs = out if isinstance(out, tuple) else (out,)
    returned = sum(a.nbytes for a in outs if isinstance(a, np.ndarray))
    extra = peak - returned
    assert extra <= 16 * 8 * nstats + 16 * 1024, \
        f"{name} ({dtype}): {extra} B of temporaries beyond {returned} B of outputs"


# ------------------------------------------------------------------ huge arrays

def test_moments_of_a_broadcast_view_of_more_than_2_31_values():
    """(1000, 2**22, 64): 2.7e11 values behind 256 KB; axis 1 is stride 0."""
    base = np.random.default_rng(0).normal(5.0, 2.0, (1000, 64)).astype(np.float32)
    view = np.broadcast_to(base[:, None, :], (1000, 2 ** 22, 64))
    assert view.size > 2 ** 31
    mean, var = bncore.moments(view, axis=(0, 1))
    b64 = base.astype(np.float64)
    np.testing.assert_allclose(mean, b64.mean(0), rtol=1e-6)
    np.testing.assert_allclose(var, b64.var(0), rtol=1e-5)
    n = 1000 * 2 ** 22                            # ddof=1: M2 / (n - 1) over all values
    view64 = np.broadcast_to(b64[:, None, :], view.shape)
    _, var1 = bncore.moments(view64, axis=(0, 1), ddof=1)
    np.testing.assert_allclose(var1, b64.var(0) * n / (n - 1), rtol=1e-12)
    acc = bncore.Moments().update(view, axis=(0, 1)).update(view, axis=(0, 1))
    assert acc.count == 2 * n
    np.testing.assert_allclose(acc.var(), b64.var(0), rtol=1e-12)


def test_moments_of_a_scalar_broadcast_to_2_32_values():
    view = np.broadcast_to(np.float64(3.25), (2 ** 16, 2 ** 16))
    mean, var = bncore.moments(view)
    assert mean == 3.25 and var == 0.0
    mean, var = bncore.moments(view, axis=0)
    assert mean.shape == (2 ** 16,)                 # kept axis: stride 0 too
    assert np.all(mean == 3.25) and np.all(var == 0.0)


@pytest.fixture(scope="module")
def two_gib():
    """(4, 2, 2**26 + 64) float32: 2,147,485,696 bytes (> 2**31), zeros except markers."""
    x = np.zeros((4, 2, 2 ** 26 + 64), np.float32)
    assert x.nbytes > 2 ** 31
    marks = {(0, 0, 0): 7.0, (3, 1, -1): 5.0, (3, 1, -2): -3.0, (3, 0, -1): 2.0,
             (2, 1, 2 ** 26): 11.0}
    for k, v in marks.items():
        x[k] = v
    yield x, marks
    del x


def _expected(marks, channel, count):
    vals = np.array([v for k, v in marks.items() if k[1] == channel], np.float64)
    mean = vals.sum() / count
    var = (((vals - mean) ** 2).sum() + (count - vals.size) * mean ** 2) / count
    return mean, var


def test_more_than_2_31_bytes_moments_and_in_place_batch_norm(two_gib):
    x, marks = two_gib
    count = x.shape[0] * x.shape[2]
    mean, var = bncore.moments(x, axis=(0, 2))
    for ch in (0, 1):
        em, ev = _expected(marks, ch, count)
        np.testing.assert_allclose(mean[ch], em, rtol=1e-5)
        np.testing.assert_allclose(var[ch], ev, rtol=1e-5)
    # channels-last view of the same memory: rows of 2 channels, > 2**31 bytes apart
    rows = x.reshape(-1, 2)
    rmean, _ = bncore.moments(rows, axis=0)
    flat = {np.ravel_multi_index(k if k[2] >= 0 else (k[0], k[1], x.shape[2] + k[2]),
                                 x.shape): v for k, v in marks.items()}
    for ch in (0, 1):
        vals = sum(v for i, v in flat.items() if i % 2 == ch)
        np.testing.assert_allclose(rmean[ch], vals / rows.shape[0], rtol=1e-5)
    # training batch norm in place: y at the markers past the 2 GiB mark
    rm, rv = np.zeros(2), np.ones(2)
    y = bncore.batch_norm(x, rm, rv, training=True, momentum=1.0, eps=0.0, out=x)
    assert y is x
    for ch in (0, 1):
        em, ev = _expected(marks, ch, count)
        assert rm[ch] == pytest.approx(em, rel=1e-5)
        assert rv[ch] == pytest.approx(ev * count / (count - 1), rel=1e-5)
        for k, v in marks.items():
            if k[1] == ch:
                assert y[k] == pytest.approx((v - em) / np.sqrt(ev), rel=1e-4)
        assert y[1, ch, 1] == pytest.approx(-em / np.sqrt(ev), rel=1e-4)
        assert y[3, ch, -10] == pytest.approx(-em / np.sqrt(ev), rel=1e-4)


# ------------------------------------------------------------------ zero-size batches

ZERO_SHAPES = [(0, 3, 4, 5), (0, 3), (2, 3, 0), (2, 3, 0, 5)]


@pytest.fixture(scope="module")
def torch():
    import torch            # a test dependency (pinned 2.13.0): never skipped
    return torch


def _torch_run(torch, op, x, w, rm, rv):
    F = torch.nn.functional
    xt = torch.from_numpy(x).requires_grad_(True)
    wt = torch.from_numpy(w.copy()).requires_grad_(True)
    bt = torch.zeros_like(wt, requires_grad=True)
    rmt, rvt = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    if op == "batch_norm-train":
        y = F.batch_norm(xt, rmt, rvt, wt, bt, training=True)
    elif op == "batch_norm-eval":
        y = F.batch_norm(xt, rmt, rvt, wt, bt, training=False)
    elif op == "group_norm":
        y = F.group_norm(xt, 1, wt, bt)
    elif op == "instance_norm":
        y = F.instance_norm(xt, rmt, rvt, wt, bt, use_input_stats=True)
    elif op == "layer_norm":
        y = F.layer_norm(xt, x.shape[-1:])
    else:
        y = F.rms_norm(xt, x.shape[-1:])
    y.sum().backward()
    grads = (xt.grad, wt.grad if op not in ("layer_norm", "rms_norm") else None)
    return y.detach().numpy(), grads, rmt.numpy(), rvt.numpy()


def _bncore_run(op, x, w, rm, rv):
    B = bncore
    if op == "batch_norm-train":
        y, m, s = B.batch_norm_forward(x, w, np.zeros_like(w), running_mean=rm, running_var=rv)
        g = B.batch_norm_backward(np.ones_like(x), x, m, s, w)
    elif op == "batch_norm-eval":
        y, m, s = B.batch_norm_forward(x, w, np.zeros_like(w), training=False,
                                       running_mean=rm, running_var=rv)
        g = B.batch_norm_backward(np.ones_like(x), x, m, s, w, training=False)
    elif op == "group_norm":
        y, m, s = B.group_norm_forward(x, 1, w, np.zeros_like(w))
        g = B.group_norm_backward(np.ones_like(x), x, m, s, 1, w)
    elif op == "instance_norm":
        y = B.instance_norm(x, rm, rv, w, np.zeros_like(w))
        _, m, s = B.instance_norm_forward(x, w)
        g = B.instance_norm_backward(np.ones_like(x), x, m, s, w)
    elif op == "layer_norm":
        y, m, s = B.layer_norm_forward(x, x.shape[-1])
        g = B.layer_norm_backward(np.ones_like(x), x, m, s, x.shape[-1])[:1] + (None,)
    else:
        y, r = B.rms_norm_forward(x, x.shape[-1])
        g = B.rms_norm_backward(np.ones_like(x), x, r, x.shape[-1])[:1] + (None,)
    return y, (g[0], g[1])


@pytest.mark.parametrize("shape", ZERO_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", ["batch_norm-train", "batch_norm-eval", "group_norm",
                                "instance_norm", "layer_norm", "rms_norm"])
def test_zero_size_batches_behave_as_in_pytorch(torch, op, shape):
    """Same output shape and dtype as PyTorch, zero parameter gradients, running stats
    untouched. PyTorch quirks not followed (DESIGN.md: stats untouched, empty output; an
    empty sum is 0): F.instance_norm on an N = 0 batch sets the running stats to NaN and
    its backward fails (IndexError), and F.group_norm's weight gradient is NaN when the
    spatial size is 0. (0, C) has one spatial value: PyTorch rejects it; bncore may too."""
    x = np.zeros(shape)
    c = shape[1]
    w = np.linspace(1, 2, c)
    rm0, rv0 = np.linspace(-1, 1, c), np.linspace(1, 2, c)
    rm, rv = rm0.copy(), rv0.copy()
    try:
        y, (dx, dw) = _bncore_run(op, x, w, rm, rv)
    except ValueError as exc:    # (0, C): one spatial value; PyTorch raises too
        assert op == "instance_norm" and len(shape) == 2, exc
        assert "more than 1 spatial element" in str(exc)
        y = dx = dw = None
    assert np.array_equal(rm, rm0) and np.array_equal(rv, rv0), "running stats modified"
    if y is None:
        return
    assert y.shape == shape and y.dtype == x.dtype and dx.shape == shape
    if dw is not None:
        assert dw.shape == (c,) and not np.any(dw)
    if op == "instance_norm" and (len(shape) == 2 or shape[0] == 0):
        return                                   # PyTorch raises (quirks above)
    yt, (dxt, dwt), rmt, rvt = _torch_run(torch, op, x, w, rm0, rv0)
    assert yt.shape == y.shape and dxt.shape == dx.shape
    assert np.array_equal(rmt, rm0) and np.array_equal(rvt, rv0)
    if dw is not None and not (op == "group_norm" and shape[0]):    # NaN (quirk above)
        assert np.array_equal(dwt.numpy(), dw)


@pytest.mark.parametrize("op", ["batch_norm", "group_norm", "instance_norm", "layer_norm"])
def test_zero_channels(op):
    """C = 0 (not a batch, but an empty array all the same): empty results everywhere,
    forward and backward alike (group_norm_backward with one group works, so must the
    instance_norm_backward built on it)."""
    x = np.zeros((2, 0, 3))
    w = np.ones(0)
    if op == "batch_norm":
        y, m, s = bncore.batch_norm_forward(x, w)
        dx, dw, db = bncore.batch_norm_backward(x, x, m, s, w)
    elif op == "group_norm":
        y, m, s = bncore.group_norm_forward(x, 1, w)
        dx, dw, db = bncore.group_norm_backward(x, x, m, s, 1, w)
    elif op == "instance_norm":
        y, m, s = bncore.instance_norm_forward(x, w)
        dx, dw, db = bncore.instance_norm_backward(x, x, m, s, w)
    else:
        y, m, s = bncore.layer_norm_forward(x, (0, 3))
        dx, dw, db = bncore.layer_norm_backward(x, x, m, s, (0, 3))
    assert y.shape == dx.shape == x.shape
    assert dw.size == db.size == 0
