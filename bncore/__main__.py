"""python -m bncore {info | check | bench}

info   print the build and runtime configuration (show_config)
check  run every public op (and the Moments accumulator) against its pure-NumPy float64
       reference twin on random data, float32 and float64, and print pass/fail, the worst
       error and the speed against the reference
bench  the benchmark table against PyTorch and a copy roofline (see --help)
"""
import argparse
import sys

import numpy as np

import bncore
from bncore import _reference as ref
from bncore._timing import measure   # not bncore._bench: info and check never import torch


def _cases(rng):
    """(name, bncore call, reference call) triples; each returns a tuple of arrays."""
    x4 = rng.normal(5.0, 2.0, (16, 32, 28, 28)).astype(np.float32)
    xcl = np.ascontiguousarray(x4.transpose(0, 2, 3, 1))
    x2 = rng.normal(size=(4096, 256)).astype(np.float32)
    dy4 = rng.normal(size=x4.shape).astype(np.float32)
    dycl = np.ascontiguousarray(dy4.transpose(0, 2, 3, 1))
    c = x4.shape[1]
    w, b = rng.normal(size=c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    rm, rv = rng.normal(size=c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)

    def affine(x, axis):
        n = x.shape[axis]
        return (rng.normal(size=n).astype(np.float32), rng.normal(size=n).astype(np.float32))

    def train(x, axis):
        wx, bx = affine(x, axis)
        return (lambda: bncore.batch_norm_forward(x, wx, bx, axis=axis),
                lambda: ref.batch_norm_forward(x, wx, bx, axis=axis))

    def back(dy, x, axis):
        wx, _ = affine(x, axis)
        m, s = ref.batch_norm_forward(x, axis=axis)[1:]
        return (lambda: bncore.batch_norm_backward(dy, x, m, s, wx, axis=axis),
                lambda: ref.batch_norm_backward(dy, x, m, s, wx, axis=axis))

    cases = [
        ("moments axis=(0,2,3)", lambda: bncore.moments(x4, axis=(0, 2, 3)),
         lambda: ref.moments(x4, axis=(0, 2, 3))),
        ("moments axis=None", lambda: bncore.moments(x2), lambda: ref.moments(x2)),
        ("batch_norm train NCHW", *train(x4, 1)),
        ("batch_norm train NHWC", *train(xcl, -1)),
        ("batch_norm train (N, C)", *train(x2, 1)),
        ("batch_norm eval NCHW",
         lambda: (bncore.batch_norm(x4, rm, rv, w, b),),
         lambda: (ref.batch_norm(x4, rm.copy(), rv.copy(), w, b),)),
        ("batch_norm backward NCHW", *back(dy4, x4, 1)),
        ("batch_norm backward NHWC", *back(dycl, xcl, -1)),
    ]
    x64 = x4[:4].astype(np.float64)
    cases += [
        ("moments float64", lambda: bncore.moments(x64, axis=(0, 2, 3)),
         lambda: ref.moments(x64, axis=(0, 2, 3))),
        ("Moments update+merge", lambda: _streamed(x4), lambda: ref.moments(x4, axis=0)),
        ("batch_norm train NCHW float64", *train(x64, 1)),
        ("batch_norm backward float64", *back(dy4[:4].astype(np.float64), x64, 1)),
    ]
    if hasattr(bncore, "layer_norm"):
        cases += _family_cases(rng, x4, dy4, xcl, dycl)
    return cases


def _streamed(x):
    """The Moments accumulator over x's batch axis, two halves merged: (mean, var)."""
    a = bncore.Moments().update(x[: len(x) // 2], axis=0)
    a.merge(bncore.Moments().update(x[len(x) // 2:], axis=0))
    return a.mean, a.var()


def _family_cases(rng, x4, dy4, xcl, dycl):
    """The layer, RMS, group and instance norm forwards (with their statistics) and
    backwards, against the reference's."""
    xs = rng.normal(3.0, 2.0, (2048, 384)).astype(np.float32)
    dys = rng.normal(size=xs.shape).astype(np.float32)
    wl = rng.normal(size=384).astype(np.float32)
    c = x4.shape[1]
    g32 = rng.normal(size=c).astype(np.float32)

    def pair(name, *args, **kw):
        """bncore's and the reference's ``name`` on the same arguments."""
        return (lambda: getattr(bncore, name)(*args, **kw),
                lambda: getattr(ref, name)(*args, **kw))

    def backward(name, fwd_args, bwd_args, *, weight, **kw):
        """``name``_backward from the reference forward's saved statistics."""
        saved = getattr(ref, f"{name}_forward")(*fwd_args, weight, **kw)[1:]
        return pair(f"{name}_backward", *bwd_args[:2], *saved, *bwd_args[2:], weight, **kw)

    return [
        ("layer_norm_forward", *pair("layer_norm_forward", xs, 384, wl, wl)),
        ("layer_norm_backward", *backward("layer_norm", (xs, 384), (dys, xs, 384), weight=wl)),
        ("rms_norm_forward", *pair("rms_norm_forward", xs, 384, wl)),
        ("rms_norm_backward", *backward("rms_norm", (xs, 384), (dys, xs, 384), weight=wl)),
        ("group_norm_forward NCHW G=8", *pair("group_norm_forward", x4, 8, g32, g32)),
        ("group_norm_backward NHWC G=8",
         *backward("group_norm", (xcl, 8), (dycl, xcl, 8), weight=g32, axis=-1)),
        ("instance_norm_forward NHWC", *pair("instance_norm_forward", xcl, axis=-1)),
        ("instance_norm_backward NCHW",
         *backward("instance_norm", (x4,), (dy4, x4), weight=g32)),
        ("layer_norm", *pair("layer_norm", xs, 384, wl, wl)),
        ("rms_norm", *pair("rms_norm", xs, 384, wl)),
        ("group_norm NCHW G=8", *pair("group_norm", x4, 8, g32, g32)),
        ("instance_norm NCHW", *pair("instance_norm", x4)),
    ]


def _rel_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return np.inf
    scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-30)
    return float(np.max(np.abs(got - want), initial=0.0)) / scale


def check(argv=None):
    p = argparse.ArgumentParser(prog="python -m bncore check",
                                description="every op against its NumPy float64 reference")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="relative tolerance of float32 results (float64 results: 1e-12)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    bncore.show_config()
    print()
    print(f"{'op':32s} {'result':6s} {'max rel err':>11s} {'bncore':>10s} {'reference':>10s}"
          f" {'speedup':>8s}")
    failed = 0
    for name, fast, slow in _cases(np.random.default_rng(args.seed)):
        got, want = fast(), slow()
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        err = max(_rel_error(g, w) for g, w in zip(got, want))
        f32 = any(np.asarray(g).dtype == np.float32 for g in got)
        ok = err <= (args.tol if f32 else min(args.tol, 1e-12)) and len(got) == len(want)
        failed += not ok
        t = measure({"fast": fast, "slow": slow}, repeat=3, min_time=0.02)
        t_fast, t_slow = float(np.median(t["fast"])), float(np.median(t["slow"]))
        print(f"{name:32s} {'pass' if ok else 'FAIL':6s} {err:11.2e} {t_fast * 1e3:8.3f}ms"
              f" {t_slow * 1e3:8.2f}ms {t_slow / t_fast:7.1f}x")
    print(f"\n{'all passed' if not failed else f'{failed} FAILED'}")
    return 1 if failed else 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "info":
        argparse.ArgumentParser(prog="python -m bncore info",
                                description="print the build and runtime configuration"
                                ).parse_args(rest)
        bncore.show_config()
        return 0
    if cmd == "check":
        return check(rest)
    if cmd == "bench":
        from bncore import _bench
        return _bench.main(rest)
    print(f"unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
