"""The cache-size thresholds taken at import (bncore._config.thresholds()): the rule, and
that the paths they choose between give the same bits."""
import os
import subprocess
import sys

import numpy as np
import pytest

import bncore
from bncore import _config

MIB = 1 << 20


def _getconf(name):
    """What getconf (the C library's sysconf) reports, 0 for nothing."""
    out = subprocess.run(["getconf", name], capture_output=True, text=True, check=True)
    v = out.stdout.strip()
    return int(v) if v.isdigit() and int(v) > 0 else 0


def test_rule_from_the_l3_in_a_fresh_process():
    """Forwards stream from min(L3, 64 MiB) moved, backwards from min(L3, 32 MiB); inputs
    of 16 MiB are far; no L3 reported counts as 32 MiB; the L2 and L1 as reported (512 and
    32 KiB where not). Every kernel module agrees."""
    code = ("from bncore import _config, _batchnorm, _rownorm, _stats; "
            "print(_config.thresholds()); "
            "print(len({m._thresholds() for m in (_batchnorm, _rownorm, _stats)}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(bncore.__file__)))
    got, distinct = out.stdout.split("\n")[:2]
    l3 = _getconf("LEVEL3_CACHE_SIZE") or _getconf("LEVEL2_CACHE_SIZE")
    llc = l3 or 32 * MIB
    want = {"l3_bytes": l3, "stream_forward_bytes": min(llc, 64 * MIB),
            "stream_backward_bytes": min(llc, 32 * MIB), "far_bytes": 16 * MIB,
            "l2_bytes": _getconf("LEVEL2_CACHE_SIZE") or 512 << 10,
            "l1_bytes": _getconf("LEVEL1_DCACHE_SIZE") or 32 << 10}
    assert eval(got) == want
    assert distinct == "1"


def test_set_thresholds_returns_the_old_and_sets_every_module():
    from bncore import _batchnorm, _rownorm, _stats
    old = _config.set_thresholds(1, 2, 3, 4, 5)
    try:
        assert {m._thresholds() for m in (_batchnorm, _rownorm, _stats)} == {(1, 2, 3, 4, 5)}
        assert _config.thresholds()["stream_backward_bytes"] == 2
        _config.set_thresholds(6, 7, 8, 9)   # no l1_bytes: the L1's stays
        assert {m._thresholds() for m in (_batchnorm, _rownorm, _stats)} == {(6, 7, 8, 9, 5)}
    finally:
        assert _config.set_thresholds(**old) == {"stream_forward_bytes": 6,
                                                 "stream_backward_bytes": 7, "far_bytes": 8,
                                                 "l2_bytes": 9, "l1_bytes": 5}
    assert _config.thresholds()["stream_forward_bytes"] == old["stream_forward_bytes"]


def test_show_config_reports_the_thresholds(capsys):
    bncore.show_config()
    out = capsys.readouterr().out
    assert "streaming stores: forwards moving" in out
    t = _config.thresholds()
    assert f"L2 {t['l2_bytes'] >> 10} KiB, L1d {t['l1_bytes'] >> 10} KiB a core" in out


def _calls(dtype):
    """Every op over small odd shapes, both layouts: name -> callable returning arrays."""
    rng = np.random.default_rng(5)
    x4 = (rng.standard_normal((3, 37, 9, 13)) * 2 + 5).astype(dtype)
    d4 = rng.standard_normal(x4.shape).astype(dtype)
    xl = np.moveaxis(x4, 1, -1).copy()
    dl = np.moveaxis(d4, 1, -1).copy()
    x2 = (rng.standard_normal((67, 301)) + 3).astype(dtype)
    d2 = rng.standard_normal(x2.shape).astype(dtype)
    c = 37
    w, b = rng.normal(size=c), rng.normal(size=c)
    rm, rv = rng.normal(size=c), rng.uniform(1, 2, c)
    w2 = rng.normal(size=301).astype(dtype)
    calls = {}
    for name, x, d, ax in (("nchw", x4, d4, 1), ("nhwc", xl, dl, -1)):
        def bn_train(x=x, ax=ax):
            return bncore.batch_norm_forward(x, w, b, axis=ax)

        def bn_bwd(x=x, d=d, ax=ax):
            _, m, s = bncore.batch_norm_forward(x, w, b, axis=ax)
            return bncore.batch_norm_backward(d, x, m, s, w, axis=ax)

        def gn(x=x, d=d, ax=ax):
            y, m, s = bncore.group_norm_forward(x, 1 if ax == 1 else 37, w, b, axis=ax)
            return (y, m, s) + tuple(bncore.group_norm_backward(d, x, m, s, 1 if ax == 1
                                                                else 37, w, axis=ax))

        calls[f"bn train {name}"] = bn_train
        calls[f"bn eval {name}"] = lambda x=x, ax=ax: bncore.batch_norm(
            x, rm, rv, w, b, training=False, axis=ax)
        calls[f"bn backward {name}"] = bn_bwd
        calls[f"group norm {name}"] = gn
        calls[f"instance norm {name}"] = lambda x=x, ax=ax: bncore.instance_norm(x, axis=ax)
        calls[f"moments {name}"] = lambda x=x, ax=ax: bncore.moments(
            x, axis=(0, 2, 3) if ax == 1 else (0, 1, 2))

    # 40 channels, a multiple of 8: unstreamed, the channels-last affine goes row by row
    # (bn_cl_affine); streamed, as one span over the rows
    x40 = (rng.standard_normal((3, 9, 13, 40)) * 2 + 5).astype(dtype)
    w40, b40 = rng.normal(size=40), rng.normal(size=40)
    rm40, rv40 = rng.normal(size=40), rng.uniform(1, 2, 40)
    calls["bn train nhwc 40"] = lambda: bncore.batch_norm_forward(x40, w40, b40, axis=-1)
    calls["bn eval nhwc 40"] = lambda: bncore.batch_norm(x40, rm40, rv40, w40, b40,
                                                         training=False, axis=-1)
    calls["group norm nhwc 40"] = lambda: bncore.group_norm_forward(x40, 5, w40, b40, axis=-1)
    calls["instance norm nhwc 40"] = lambda: bncore.instance_norm(x40, axis=-1)

    # planes of 16 values: the backward's dx plane by plane, streamed or by the plain loop
    xs = (rng.standard_normal((20, 16, 4, 4)) + 2).astype(dtype)
    ds = rng.standard_normal(xs.shape).astype(dtype)

    def bn_bwd_short(x=xs, d=ds):
        _, m, s = bncore.batch_norm_forward(x, axis=1)
        return (bncore.batch_norm_backward(d, x, m, s, w[:16], axis=1)
                + bncore.batch_norm_backward(d, x, m, s, w[:16], axis=1, training=False))

    calls["bn backward short planes"] = bn_bwd_short

    def ln(x=x2, d=d2):
        y, m, s = bncore.layer_norm_forward(x, (301,), w2, w2)
        return (y, m, s) + tuple(bncore.layer_norm_backward(d, x, m, s, (301,), w2))

    def rms(x=x2, d=d2):
        y, s = bncore.rms_norm_forward(x, (301,), w2)
        return (y, s) + tuple(bncore.rms_norm_backward(d, x, s, (301,), w2))

    # channels of more than 4096 values over short planes: the channel-by-channel
    # backward, whose sums prefetch planes ahead beyond the L2s (plane_fetch)
    xc = (rng.standard_normal((50, 5, 9, 11)) + 2).astype(dtype)
    dc = rng.standard_normal(xc.shape).astype(dtype)

    def bn_bwd_long(x=xc, d=dc):
        _, m, s = bncore.batch_norm_forward(x, axis=1)
        return bncore.batch_norm_backward(d, x, m, s, w[:5], axis=1)

    calls["bn backward long channels"] = bn_bwd_long
    # wide channels-last groups, straight from each (sample, group) block (direct_groups),
    # the next block prefetched beyond the L2s
    xg = (rng.standard_normal((3, 5, 7, 96)) - 4).astype(dtype)
    calls["group norm wide nhwc"] = lambda x=xg: bncore.group_norm_forward(x, 2, axis=-1)
    calls["layer norm"] = ln
    calls["rms norm"] = rms
    return calls


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streamed_and_far_paths_give_the_same_bits(dtype):
    """Thresholds of 0 (every output streamed, every input far and beyond the L2s)
    against thresholds no array reaches: the same bits, for every op; the streamed lines
    and the ordinary stores at each run's ends, the prefetching variants, all of it on
    odd shapes."""
    results = {}
    big = 1 << 62
    try:
        for key, thr in (("all", (0, 0, 0, 0)), ("none", (big, big, big, big))):
            _config.set_thresholds(*thr)
            results[key] = {k: f() for k, f in _calls(dtype).items()}
    finally:
        from conftest import PINNED_THRESHOLDS
        _config.set_thresholds(**PINNED_THRESHOLDS)
    for k in results["all"]:
        a, b = results["all"][k], results["none"][k]
        a = a if isinstance(a, tuple) else (a,)
        b = b if isinstance(b, tuple) else (b,)
        for i, (u, v) in enumerate(zip(a, b)):
            if u is None:
                assert v is None
                continue
            assert np.array_equal(u, v, equal_nan=True), f"{k} output {i}"


def _cpu_has(*features):
    flags = open("/proc/cpuinfo").read().replace("\n", " ") if os.path.exists(
        "/proc/cpuinfo") else ""
    return all(f" {f} " in flags for f in features)


def _cpu_has_v4():
    return _cpu_has("avx512f", "avx512dq", "avx512vl", "avx512bw", "avx512cd")


def test_f16c_conversions_are_on_exactly_where_the_cpu_has_it(capsys):
    """The float16 conversions use F16C by default on a CPU that has it (never on one
    without); use_f16c returns the old setting; show_config says which."""
    has = _cpu_has("avx", "f16c")
    assert _config.config()["f16c"] is has
    assert _config.use_f16c(False) is has
    try:
        assert _config.config()["f16c"] is False
        assert _config.use_f16c(True) is False
    finally:
        _config.use_f16c(True)
    assert _config.config()["f16c"] is has
    bncore.show_config()
    assert ("with F16C" if has else "portable") in capsys.readouterr().out


def test_float16_level_is_the_cpus_by_default_and_capped_at_it():
    """half_level: 2 (float16 kernels) where the CPU has AVX2, FMA and F16C, 1 (F16C
    conversions) with F16C only, 0 without; a request above the CPU's is capped; every
    module follows, config() reports it, and use_f16c(True) restores the CPU's level."""
    cpu = 2 if _cpu_has("avx", "f16c", "avx2", "fma") else 1 if _cpu_has("avx", "f16c") else 0
    old = _config.half_level(0)
    try:
        assert old == cpu
        assert _config.config()["f16c"] is False
        for want in (1, 2, 0, 2):
            _config.half_level(want)
            assert _config.half_level(want) == min(want, cpu)
            assert _config.config()["float16_kernels"] is (min(want, cpu) == 2)
        assert _config.config()["f16c"] is (cpu > 0)
        _config.half_level(0)
        _config.use_f16c(True)
        assert _config.half_level(cpu) == cpu
    finally:
        _config.half_level(old)


def test_avx512_twins_are_on_exactly_where_the_cpu_has_them():
    """use_avx512 returns the old setting: on by default on an AVX-512 CPU (the layer/RMS
    norm backward then runs its AVX-512 twins), never on one without; show_config says so."""
    assert _config.use_avx512(False) is _cpu_has_v4()
    try:
        assert _config.use_avx512(True) is False
    finally:
        _config.use_avx512(True)
    assert _config.use_avx512(True) is _cpu_has_v4()
    assert ("AVX-512" in _config.config()["simd"]) is _cpu_has_v4()


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(2, 64, 7, 7), (4, 32, 4, 5), (8, 48, 2, 2), (1, 16, 32, 31),
                                   (16, 8, 1, 7), (3, 40, 2, 8)])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_avx512_small_channel_batch_norm_backward_gives_the_same_bits(shape, training,
                                                                      n_threads):
    """Float batch-norm backward over small channels in cache (bn_seg_bwd_fused_f32, whose
    AVX-512 twin takes channels of 32 values and more) with and without the twins: the same
    bytes, over planes of 49, 20 and 4 values, 992 (the 16-value steps, the four-value
    steps and the scalar tail), channels of 7 and of 16 values (the clone's), with a weight
    and without, training and not, at large means. Each channel's dy holds pairs of +-1e9
    among values near 1e-3, so that its double sums keep the small values' bits or lose
    them by the order of their additions, and a changed lane or order shows in the float32
    results."""
    rng = np.random.default_rng(6)
    x = (rng.normal(size=shape) * 3 + 1e3).astype(np.float32)
    dy = rng.normal(size=shape) * 1e-3
    per = np.moveaxis(dy, 1, 0).reshape(shape[1], -1)        # a view: channel, values
    for c in range(shape[1]):
        at = rng.permutation(per.shape[1])[:2 * max(1, per.shape[1] // 16)]
        per[c, at] = np.repeat([1e9, -1e9], len(at) // 2)
    dy = dy.astype(np.float32)
    w = rng.normal(size=shape[1]).astype(np.float32)
    _, m, inv = bncore.batch_norm_forward(x, w)
    got = {}
    try:
        for on in (False, True):
            _config.use_avx512(on)
            got[on] = (bncore.batch_norm_backward(dy, x, m, inv, w, training=training,
                                                  n_threads=n_threads)
                       + bncore.batch_norm_backward(dy, x, m, inv, training=training,
                                                    n_threads=n_threads))
    finally:
        _config.use_avx512(True)
    for a, b in zip(got[False], got[True]):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(300, 771), (5, 13), (16, 4096), (32, 8192), (40, 2053),
                                   (7, 3, 64)])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_avx512_twins_give_the_same_bits(shape, dtype, n_threads):
    """Layer and RMS norm backward with and without the AVX-512 twins: the same bytes,
    over the row path, the column tiles of one chunk (32, 8192) and of several (16, 4096 on
    two threads), odd widths; float64 shows the double sums' own bits."""
    rng = np.random.default_rng(5)
    x = (rng.normal(size=shape) * 3 + 100).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    d = shape[-1]
    w = rng.normal(size=d).astype(dtype)
    _, m, inv = bncore.layer_norm_forward(x, d, w)
    _, ir = bncore.rms_norm_forward(x, d, w)
    got = {}
    try:
        for on in (False, True):
            _config.use_avx512(on)
            got[on] = (bncore.layer_norm_backward(dy, x, m, inv, d, w, n_threads=n_threads)
                       + bncore.rms_norm_backward(dy, x, ir, d, w, n_threads=n_threads))
    finally:
        _config.use_avx512(True)
    for a, b in zip(got[False], got[True]):
        if a is not None:
            assert a.tobytes() == b.tobytes()
