"""Determinism (threads, OMP_NUM_THREADS, concurrent Python threads), leaks,
peak memory of temporaries. GIL release is checked in test_threads.py."""
import concurrent.futures
import gc
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import psutil
import pytest

import bncore


def ops(shape=(16, 64, 24, 24), dtype=np.float32, seed=0):
    """name -> call(n_threads) returning a tuple of arrays, for every public op."""
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 2.0, shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    dyl = np.ascontiguousarray(np.moveaxis(dy, 1, -1))
    c, d = shape[1], shape[-1]
    w = rng.normal(size=c).astype(dtype)
    wd = rng.normal(size=d).astype(dtype)
    _, m, s = bncore.batch_norm_forward(x, w)
    _, ml, sl = bncore.batch_norm_forward(xl, w, axis=-1)
    _, lm, ls = bncore.layer_norm_forward(x, d, wd, wd)
    _, r = bncore.rms_norm_forward(x, d, wd)
    _, gm, gs = bncore.group_norm_forward(x, 8, w, w)
    _, im, is_ = bncore.instance_norm_forward(xl, w, w, axis=-1)

    def tup(v):
        return v if isinstance(v, tuple) else (v,)

    table = {
        "moments": lambda nt: bncore.moments(x, axis=(0, 2, 3), n_threads=nt),
        "moments_all": lambda nt: bncore.moments(x, n_threads=nt),
        "bn_train": lambda nt: bncore.batch_norm_forward(x, w, w, n_threads=nt),
        "bn_train_cl": lambda nt: bncore.batch_norm_forward(xl, w, w, axis=-1, n_threads=nt),
        "bn_eval": lambda nt: bncore.batch_norm(x, m, 1 / s ** 2, w, w, n_threads=nt),
        "bn_backward": lambda nt: bncore.batch_norm_backward(dy, x, m, s, w, n_threads=nt),
        "bn_backward_cl": lambda nt: bncore.batch_norm_backward(dyl, xl, ml, sl, w, axis=-1,
                                                                n_threads=nt),
        "layer_norm": lambda nt: bncore.layer_norm_forward(x, d, wd, wd, n_threads=nt),
        "layer_norm_backward": lambda nt: bncore.layer_norm_backward(dy, x, lm, ls, d, wd,
                                                                     n_threads=nt),
        "rms_norm": lambda nt: bncore.rms_norm_forward(x, d, wd, n_threads=nt),
        "rms_norm_backward": lambda nt: bncore.rms_norm_backward(dy, x, r, d, wd,
                                                                 n_threads=nt),
        "group_norm": lambda nt: bncore.group_norm_forward(x, 8, w, w, n_threads=nt),
        "group_norm_cl": lambda nt: bncore.group_norm_forward(xl, 8, w, w, axis=-1,
                                                              n_threads=nt),
        "group_norm_backward": lambda nt: bncore.group_norm_backward(dy, x, gm, gs, 8, w,
                                                                     n_threads=nt),
        "instance_norm_cl": lambda nt: bncore.instance_norm_forward(xl, w, w, axis=-1,
                                                                    n_threads=nt),
        "instance_norm_backward_cl": lambda nt: bncore.instance_norm_backward(
            dyl, xl, im, is_, w, axis=-1, n_threads=nt),
    }
    return {k: (lambda f: lambda nt=None: tuple(np.asarray(a) for a in tup(f(nt))))(f)
            for k, f in table.items()}


OPS = ops()


def identical(a, b):
    return len(a) == len(b) and all(np.array_equal(u, v, equal_nan=True) for u, v in zip(a, b))


@pytest.mark.parametrize("name", sorted(OPS))
def test_bitwise_identical_for_1_2_3_8_threads(name):
    base = OPS[name](1)
    for nt in (2, 3, 8):
        assert identical(base, OPS[name](nt)), f"{name} differs with {nt} threads"


def test_bitwise_identical_across_omp_num_threads():
    script = (
        "import hashlib, sys; sys.path.insert(0, %r)\n"
        "from test_reliability import OPS\n"
        "h = hashlib.sha256()\n"
        "for name in sorted(OPS):\n"
        "    for a in OPS[name]():\n"
        "        h.update(a.tobytes())\n"
        "print(h.hexdigest())\n" % os.path.dirname(__file__))
    digests = []
    for threads in ("1", "2", "4"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        digests.append(out.stdout.strip())
    assert len(set(digests)) == 1, digests


def test_eight_python_threads_at_once_give_serial_results():
    names = sorted(OPS)
    serial = {n: OPS[n](2) for n in names}
    jobs = [names[i % len(names)] for i in range(48)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda n: (n, OPS[n](2)), jobs))
    for n, res in results:
        assert identical(res, serial[n]), f"{n} differs when called concurrently"


def rss():
    gc.collect()
    return psutil.Process().memory_info().rss


@pytest.mark.parametrize("name", sorted(ops((2, 8, 4, 4))))
def test_no_leak_over_100k_calls(name):
    """100,000 calls in two windows of 50,000. Caches and not-yet-collected objects settle
    in the first window; a leak of even one byte per call would show as >= 50 KB of
    traced growth (or RSS growth) in the second."""
    call = ops((2, 8, 4, 4), np.float64, seed=1)[name]
    ours = [tracemalloc.Filter(True, "*bncore*"), tracemalloc.Filter(True, "*numpy*")]
    for _ in range(2000):
        call()
    tracemalloc.start()
    snaps, sizes = [], []
    for _ in range(2):
        for _ in range(50_000):
            call()
        sizes.append(rss())
        snaps.append(tracemalloc.take_snapshot().filter_traces(ours))
    tracemalloc.stop()
    grown = sum(s.size_diff for s in snaps[1].compare_to(snaps[0], "filename"))
    assert grown < 16 * 1024, f"{name}: traced memory grew by {grown} B in 50,000 calls"
    assert sizes[1] - sizes[0] < 1024 * 1024, f"{name}: RSS grew by {sizes[1] - sizes[0]} B"


ROWS, CH, NC = 16 * 64 * 24, 64, 16 * 64       # statistics per op on (16, 64, 24, 24)


@pytest.mark.parametrize("name,nstats", [
    ("bn_train", CH), ("bn_train_cl", CH), ("bn_backward", CH), ("bn_backward_cl", CH),
    ("moments", CH), ("layer_norm", ROWS), ("layer_norm_backward", ROWS), ("rms_norm", ROWS),
    ("group_norm", NC), ("group_norm_backward", NC), ("instance_norm_cl", NC)])
def test_peak_memory_beyond_outputs_is_small(name, nstats):
    """Temporaries visible to tracemalloc (NumPy arrays) beyond the outputs: a fixed
    256 KiB plus 16 bytes (a float64 mean and invstd) per statistic: O(C) for batch norm,
    per row for layer/RMS norm, per (n, c) for group/instance norm.

    Measured on (16, 64, 24, 24) float32 (2.4 MB per array): batch norm and moments under
    10 KB beyond their outputs; layer norm ~394 KB = 24576 rows x 16 B. Kernel scratch from
    C malloc is not traced: at most MAX_CHUNKS (64) partial vectors of C doubles."""
    call = OPS[name]
    call()
    tracemalloc.start()
    tracemalloc.reset_peak()
    out = call()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    extra = peak - sum(a.nbytes for a in out)
    assert extra < 256 * 1024 + 16 * nstats, (name, extra)
