"""Per-call cost of the one-step ("common call") entry points against the general Python
path of the same call, interleaved in one process: medians of --rounds samples, each a
loop of at least --min-time seconds (bncore._bench's timing).

The general path is reached by making the fast entry decline (patched for the sample),
which is the code every such call took before it had a fast path. Both give the same
bits (tests/test_moments.py, tests/test_fastpath.py).

    python tools/fastpath_overhead.py [--rounds 9] [--min-time 0.03]
"""
import argparse
import statistics

import numpy as np

import bncore
from bncore import _api, _family, _stats
from bncore._bench import _loop_time


def _declining(module, name, value):
    """Run fn with module.name replaced by value (a fast entry that declines)."""
    def wrap(fn):
        def run():
            keep = getattr(module, name)
            setattr(module, name, value)
            try:
                return fn()
            finally:
                setattr(module, name, keep)
        return run
    return wrap


def cases():
    """(label, fast call, general call) triples."""
    rng = np.random.default_rng(0)
    out = []
    for shape in [(1, 16, 16, 64), (1, 56, 56, 64)]:
        for dt in (np.float32, np.float64):
            x = rng.standard_normal(shape).astype(dt)
            out.append((f"moments {shape} {dt.__name__} over (1, 2)",
                        lambda x=x: bncore.moments(x, axis=(1, 2)),
                        lambda x=x: _api._moments_general(x, (1, 2), 0, False, None)))
    for shape in [(2, 8, 4, 4), (8, 64, 28, 28)]:
        x = rng.standard_normal(shape).astype(np.float32)
        c = shape[1]
        w, rm, rv = np.ones(c, np.float32), np.zeros(c, np.float32), np.ones(c, np.float32)
        call = lambda x=x, w=w, rm=rm, rv=rv: bncore.instance_norm(x, rm, rv, w, w)  # noqa
        out.append((f"instance_norm running stats {shape} float32", call,
                    _declining(_family, "_plain_running", lambda *a: False)(call)))
    for shape in [(256, 64), (4096, 64)]:
        x = rng.standard_normal(shape).astype(np.float32)
        acc = bncore.Moments().update(x, axis=0)
        call = lambda x=x, acc=acc: acc.update(x, axis=0)  # noqa: E731
        out.append((f"Moments.update {shape} float32", call,
                    _declining(_stats, "update_common", lambda x, axis: None)(call)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--min-time", type=float, default=0.03)
    args = p.parse_args(argv)
    rows = []
    for label, fast, general in cases():
        a, b = [], []
        for _ in range(args.rounds):
            a.append(_loop_time(fast, args.min_time))
            b.append(_loop_time(general, args.min_time))
        tf, tg = statistics.median(a), statistics.median(b)
        rows.append((label, tg, tf))
        print(f"{label:48s} general {1e6 * tg:7.1f} us  fast {1e6 * tf:7.1f} us  "
              f"{tg / tf:.2f}x", flush=True)
    return rows


if __name__ == "__main__":
    main()
