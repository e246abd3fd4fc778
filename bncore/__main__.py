"""python -m bncore {info | check | bench}

info   print the build and runtime configuration (show_config)
check  run every public op against its pure-NumPy float64 reference twin on random data
       and print pass/fail, the worst error and the speed against the reference
bench  the benchmark table against PyTorch and a copy roofline (see --help)
"""
import argparse
import sys

import numpy as np

import bncore
from bncore import _reference as ref
from bncore._bench import measure


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
    if hasattr(bncore, "layer_norm"):
        xs = rng.normal(size=(2048, 384)).astype(np.float32)
        wl = rng.normal(size=384).astype(np.float32)
        g32 = rng.normal(size=c).astype(np.float32)
        cases += [
            ("layer_norm", lambda: (bncore.layer_norm(xs, 384, wl, wl),),
             lambda: (ref.layer_norm(xs, 384, wl, wl),)),
            ("rms_norm", lambda: (bncore.rms_norm(xs, 384, wl),),
             lambda: (ref.rms_norm(xs, 384, wl),)),
            ("group_norm NCHW G=8", lambda: (bncore.group_norm(x4, 8, g32, g32),),
             lambda: (ref.group_norm(x4, 8, g32, g32),)),
            ("instance_norm NCHW", lambda: (bncore.instance_norm(x4),),
             lambda: (ref.instance_norm(x4),)),
        ]
    return cases


def _rel_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return np.inf
    scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-30)
    return float(np.max(np.abs(got - want), initial=0.0)) / scale


def check(argv=None):
    p = argparse.ArgumentParser(prog="python -m bncore check",
                                description="every op against its NumPy float64 reference")
    p.add_argument("--tol", type=float, default=1e-4, help="relative tolerance (float32 data)")
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
        ok = err <= args.tol and len(got) == len(want)
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
