"""How bncore's kernels scale with threads, against PyTorch and a threaded copy.

    python tools/scaling.py [--threads 1,2,4,8,16] [--filter SUBSTR ...] [--repeat N]
                            [--min-time S] [--json FILE] [--no-bits]

For each bench case (``python -m bncore bench --list``; by default those whose x is 1 MB or
more) and each thread count, the bench's own measurement (``bncore._bench.run``: bncore,
PyTorch and the copy yardstick sampled round-robin, medians) at that count. The table shows
bncore's time at each count, its speedup over its own one-thread time, its speedup over
PyTorch at the same count and its % of the copy yardstick. Unless ``--no-bits``, it also
checks that every output of each case has the same bits at every thread count (the
contract in README: results do not depend on ``n_threads``), and exits 1 where not.

Meant for machines with more cores than the two of CI: the kernels are tuned there, and
this is how to see that they still scale (and stay exact) on 8 or 16.
"""
import argparse
import json
import sys

import numpy as np

import bncore
from bncore import _bench as B


def _arrays(result):
    """The output arrays of one call, in order (a call returns an array or a tuple)."""
    items = result if isinstance(result, tuple) else (result,)
    return [np.asarray(a) for a in items if a is not None]


def bits_agree(case, threads):
    """Whether each output of ``case`` has the same bytes at every thread count."""
    first = None
    for nt in threads:
        _, calls = case.build(nt)
        got = [a.tobytes() for a in _arrays(calls["bncore"]())]
        if first is None:
            first = got
        elif got != first:
            return False
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2,4,8,16")
    p.add_argument("--filter", nargs="*", default=None, metavar="SUBSTR",
                   help="cases whose label holds any of these (default: x of 1 MB or more)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.03)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--no-bits", action="store_true")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    cases = B.all_cases()
    if args.filter:
        cases = [c for c in cases if any(s in c.label for s in args.filter)]
    else:
        cases = [c for c in cases if np.prod(c.shape) * np.dtype(c.dtype).itemsize >= 1 << 20]
    rows = {nt: B.run(cases, nt, args.repeat, args.min_time, False, progress=False)
            for nt in threads}
    bad = []
    print(f"bncore {bncore.__version__} | torch {getattr(B.torch, '__version__', None)} | "
          f"threads {threads} | medians of {args.repeat}")
    print(f"{'case':48s} {'ms at ' + str(threads[0]) + '..' + str(threads[-1]) + ' threads':>40s}"
          f"  scaling  vs torch  % copy  bits")
    for i, case in enumerate(cases):
        r = [rows[nt][i] for nt in threads]
        ok = True if args.no_bits else bits_agree(case, threads)
        if not ok:
            bad.append(case.label)
        ms = " ".join(f"{x['bncore_s'] * 1e3:7.3f}" for x in r)
        sc = r[0]["bncore_s"] / r[-1]["bncore_s"]
        vs = r[-1]["speedup"]
        print(f"{case.label[:48]:48s} {ms:>40s}  {sc:6.2f}x  "
              f"{'-' if vs is None else f'{vs:6.2f}x':>8s}  {r[-1]['pct_of_copy']:5.0f}%  "
              f"{'-' if args.no_bits else ('same' if ok else 'DIFF')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": threads, "rows": {str(nt): rows[nt] for nt in threads},
                       "bits_differ": bad}, f, indent=1)
    if bad:
        print("outputs differ across thread counts:", ", ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
