"""python -m bncore bench: every op against PyTorch (when installed), the NumPy reference
and a memory-copy roofline, measured interleaved in one process.

Method: for each case, bncore, PyTorch and the roofline yardstick are sampled round-robin;
each sample times a loop of at least ``--min-time`` seconds after an untimed warm-up of the
same call (each library's idle OpenMP workers spin for a while and would otherwise slow
the next library down); the table shows medians.
Outputs are allocated by both sides on every call (no out= reuse), as a user would.
"% of copy" is the time of a plain threaded copy of x (training/eval forward) or of a
threaded read of x plus a copy (backward) divided by bncore's time: 100% means bncore
moves its data as fast as the machine moves bytes.
"""
import argparse
import json
import platform
import sys
import time

import numpy as np

import bncore
from bncore import _openmp
from bncore import _reference as ref

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # PyTorch is an optional peer
    torch = None


class Case:
    """One benchmark row: how to call bncore, PyTorch and the reference on fresh data."""

    def __init__(self, name, shape, layout, dtype, target, setup, roofline="copy",
                 ref_ok=True, nbytes=None):
        self.name, self.shape, self.layout, self.dtype = name, shape, layout, dtype
        self.target, self.setup, self.roofline, self.ref_ok = target, setup, roofline, ref_ok
        self.nbytes = nbytes

    @property
    def label(self):
        return f"{self.name} {'x'.join(map(str, self.shape))} {self.layout} {self.dtype}"


def _data(shape, dtype, seed=0):
    return np.random.default_rng(seed).normal(1.0, 2.0, shape).astype(dtype)


def _nhwc(shape):
    n, c, *sp = shape
    return (n, *sp, c)


def _torch_cl(x_nhwc):
    return torch.from_numpy(x_nhwc).permute(0, x_nhwc.ndim - 1, *range(1, x_nhwc.ndim - 1))


def bn_train(shape, layout, dtype, target):
    def setup(nt):
        axis = 1 if layout == "NCHW" else -1
        x = _data(shape if layout == "NCHW" else _nhwc(shape), dtype)
        c = shape[1]
        w, b = np.ones(c, dtype), np.zeros(c, dtype)
        rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
        calls = {"bncore": lambda: bncore.batch_norm(x, rm, rv, w, b, training=True, axis=axis,
                                                      n_threads=nt),
                 "reference": lambda: ref.batch_norm(x, rm.copy(), rv.copy(), w, b,
                                                     training=True, axis=axis)}
        if torch is not None:
            xt = torch.from_numpy(x) if layout == "NCHW" else _torch_cl(x)
            wt, bt = torch.from_numpy(w), torch.from_numpy(b)
            rmt, rvt = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
            calls["torch"] = lambda: F.batch_norm(xt, rmt, rvt, wt, bt, training=True)
        return x, calls
    return Case("bn train fwd", shape, layout, np.dtype(dtype).name, target, setup)


def bn_eval(shape, dtype, target):
    def setup(nt):
        x = _data(shape, dtype)
        c = shape[1]
        w, b = np.ones(c, dtype), np.zeros(c, dtype)
        rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
        calls = {"bncore": lambda: bncore.batch_norm(x, rm, rv, w, b, n_threads=nt),
                 "reference": lambda: ref.batch_norm(x, rm, rv, w, b)}
        if torch is not None:
            xt, wt, bt = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)
            rmt, rvt = torch.from_numpy(rm), torch.from_numpy(rv)
            calls["torch"] = lambda: F.batch_norm(xt, rmt, rvt, wt, bt, training=False)
        return x, calls
    return Case("bn eval fwd", shape, "NCHW", np.dtype(dtype).name, target, setup)


def bn_backward(shape, layout, dtype, target):
    def setup(nt):
        axis = 1 if layout == "NCHW" else -1
        s = shape if layout == "NCHW" else _nhwc(shape)
        x, dy = _data(s, dtype), _data(s, dtype, seed=1)
        c = shape[1]
        w = np.ones(c, dtype)
        _, m, inv = bncore.batch_norm_forward(x, w, axis=axis)
        calls = {"bncore": lambda: bncore.batch_norm_backward(dy, x, m, inv, w, axis=axis,
                                                              n_threads=nt),
                 "reference": lambda: ref.batch_norm_backward(dy, x, m, inv, w, axis=axis)}
        if torch is not None:
            conv = torch.from_numpy if layout == "NCHW" else _torch_cl
            xt, dyt, wt = conv(x), conv(dy), torch.from_numpy(w)
            _, mt, it = torch.ops.aten.native_batch_norm(xt, wt, None, None, None, True,
                                                         0.1, 1e-5)
            calls["torch"] = lambda: torch.ops.aten.native_batch_norm_backward(
                dyt, xt, wt, None, None, mt, it, True, 1e-5, [True, True, True])
        return x, calls
    return Case("bn backward", shape, layout, np.dtype(dtype).name, target, setup,
                roofline="read+copy")


def moments_case(shape, dtype, target):
    def setup(nt):
        x = _data(shape, dtype)
        axes = (0,) + tuple(range(2, len(shape)))
        calls = {"bncore": lambda: bncore.moments(x, axis=axes, n_threads=nt),
                 "numpy": lambda: (x.mean(axis=axes), x.var(axis=axes)),
                 "reference": lambda: ref.moments(x, axis=axes)}
        return x, calls
    return Case("moments", shape, "NCHW", np.dtype(dtype).name, target, setup,
                roofline="read")


def family_cases():
    """Row norms, when bncore has them (issue: the normalization family)."""
    if not hasattr(bncore, "layer_norm"):
        return []
    cases = []

    def row(name, shape, target, ours, theirs, roofline="copy"):
        def setup(nt):
            x = _data(shape, np.float32)
            d = shape[-1]
            w = np.ones(d, np.float32)
            calls = {"bncore": lambda: ours(x, w, nt)}
            if torch is not None:
                xt, wt = torch.from_numpy(x), torch.from_numpy(w)
                calls["torch"] = lambda: theirs(xt, wt)
            return x, calls
        return Case(name, shape, "rows", "float32", target, setup, roofline, ref_ok=False)

    for shape, target in (((8192, 768), 1.1), ((65536, 64), 1.5)):
        cases.append(row("layer_norm", shape, target,
                         lambda x, w, nt: bncore.layer_norm(x, x.shape[-1], w, w, n_threads=nt),
                         lambda xt, wt: F.layer_norm(xt, (xt.shape[-1],), wt, wt)))
    for shape, target in (((8192, 768), 2.5), ((65536, 64), 1.5)):
        cases.append(row("rms_norm", shape, target,
                         lambda x, w, nt: bncore.rms_norm(x, x.shape[-1], w, n_threads=nt),
                         lambda xt, wt: F.rms_norm(xt, (xt.shape[-1],), wt)))

    def ln_backward(nt_shape=(8192, 768)):
        def setup(nt):
            x, dy = _data(nt_shape, np.float32), _data(nt_shape, np.float32, 1)
            d = nt_shape[-1]
            w = np.ones(d, np.float32)
            _, m, inv = bncore.layer_norm_forward(x, d, w, w)
            calls = {"bncore": lambda: bncore.layer_norm_backward(dy, x, m, inv, d, w,
                                                                  n_threads=nt)}
            if torch is not None:
                xt, dyt, wt = torch.from_numpy(x), torch.from_numpy(dy), torch.from_numpy(w)
                _, mt, it = torch.ops.aten.native_layer_norm(xt, [d], wt, wt, 1e-5)
                calls["torch"] = lambda: torch.ops.aten.native_layer_norm_backward(
                    dyt, xt, [d], mt, it, wt, wt, [True, True, True])
            return x, calls
        return Case("layer_norm backward", nt_shape, "rows", "float32", 1.5, setup,
                    "read+copy", ref_ok=False)
    cases.append(ln_backward())

    def spatial(name, layout, target, ours, theirs):
        shape = (32, 64, 56, 56)

        def setup(nt):
            axis = 1 if layout == "NCHW" else -1
            x = _data(shape if layout == "NCHW" else _nhwc(shape), np.float32)
            w = np.ones(64, np.float32)
            calls = {"bncore": lambda: ours(x, w, axis, nt)}
            if torch is not None:
                xt = torch.from_numpy(x) if layout == "NCHW" else _torch_cl(x)
                wt = torch.from_numpy(w)
                calls["torch"] = lambda: theirs(xt, wt)
            return x, calls
        return Case(name, shape, layout, "float32", target, setup, ref_ok=False)

    for layout, target in (("NCHW", 1.0), ("NHWC", 1.3)):
        cases.append(spatial("group_norm G=32", layout, target,
                             lambda x, w, a, nt: bncore.group_norm(x, 32, w, w, axis=a,
                                                                   n_threads=nt),
                             lambda xt, wt: F.group_norm(xt, 32, wt, wt)))
    for layout, target in (("NCHW", 3.0), ("NHWC", 5.0)):
        cases.append(spatial("instance_norm", layout, target,
                             lambda x, w, a, nt: bncore.instance_norm(x, weight=w, bias=w,
                                                                      axis=a, n_threads=nt),
                             lambda xt, wt: F.instance_norm(xt, weight=wt, bias=wt)))
    return cases


def all_cases(quick):
    f32 = np.float32
    cases = [
        bn_train((32, 64, 56, 56), "NCHW", f32, 3.0),
        bn_train((256, 256, 14, 14), "NCHW", f32, 3.0),
        bn_train((64, 512, 7, 7), "NCHW", f32, 3.0),
        bn_train((4096, 1024), "NCHW", f32, 1.2),
        bn_train((8, 32, 8, 8), "NCHW", f32, 2.0),
        bn_train((32, 64, 56, 56), "NHWC", f32, 1.5),
        bn_train((256, 256, 14, 14), "NHWC", f32, 1.5),
        bn_eval((32, 64, 56, 56), f32, 1.0),
        bn_eval((1, 64, 56, 56), f32, 1.5),
        bn_backward((32, 64, 56, 56), "NCHW", f32, 2.0),
        bn_backward((256, 256, 14, 14), "NCHW", f32, 2.0),
        bn_backward((32, 64, 56, 56), "NHWC", f32, 1.5),
        bn_backward((256, 256, 14, 14), "NHWC", f32, 1.5),
        moments_case((32, 64, 56, 56), f32, 5.0),
        bn_train((32, 64, 56, 56), "NCHW", np.float64, None),
        bn_train((32, 64, 56, 56), "NHWC", np.float64, None),
    ]
    cases += family_cases()
    if quick:
        keep = {"(8, 32, 8, 8)", "(1, 64, 56, 56)", "(64, 512, 7, 7)"}
        cases = [c for c in cases if str(c.shape) in keep or c.name == "layer_norm"
                 and c.shape == (65536, 64)]
    return cases


def _loop_time(fn, min_time):
    # Untimed warm-up first: bncore and PyTorch each bring an OpenMP runtime whose idle
    # workers keep spinning for a while after a parallel region. Interleaving without a
    # warm-up would bill one library for the other's spinning threads.
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max(min_time / 2, 0.005):
        fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        t = time.perf_counter() - t0
        if t >= min_time:
            return t / n


def measure(calls, repeat, min_time):
    """Median seconds per call of each callable, sampled round-robin (interleaved)."""
    for fn in calls.values():
        fn()
    samples = {k: [] for k in calls}
    for _ in range(repeat):
        for k, fn in calls.items():
            samples[k].append(_loop_time(fn, min_time))
    return {k: float(np.median(v)) for k, v in samples.items()}


def run(cases, nt, repeat, min_time, with_reference, progress=True):
    rows = []
    if torch is not None:
        torch.set_num_threads(nt)
    for i, case in enumerate(cases, 1):
        if progress:
            print(f"[{i}/{len(cases)}] {case.label}", file=sys.stderr, flush=True)
        x, calls = case.setup(nt)
        if not (with_reference and case.ref_ok):
            calls.pop("reference", None)
        dst = np.empty_like(x)
        xc = np.ascontiguousarray(x)
        if case.roofline == "copy":
            calls["roofline"] = lambda: _openmp.threaded_copy(xc, dst, nt)
        elif case.roofline == "read":
            calls["roofline"] = lambda: _openmp.threaded_read(xc, nt)
        else:
            calls["roofline"] = lambda: (_openmp.threaded_read(xc, nt),
                                         _openmp.threaded_copy(xc, dst, nt))
        slow = {k: calls.pop(k) for k in ("reference",) if k in calls}
        t = measure(calls, repeat, min_time)
        if slow:
            t.update(measure(slow, 1, min_time))
        peer = t.get("torch", t.get("numpy"))
        moved = {"copy": 2, "read": 1, "read+copy": 3}[case.roofline] * x.nbytes
        rows.append({
            "case": case.label, "op": case.name, "shape": list(case.shape),
            "layout": case.layout, "dtype": case.dtype, "threads": nt,
            "bncore_s": t["bncore"], "torch_s": t.get("torch"), "numpy_s": t.get("numpy"),
            "reference_s": t.get("reference"), "roofline_s": t["roofline"],
            "speedup": None if peer is None else peer / t["bncore"],
            "peer": "torch" if "torch" in t else ("numpy" if "numpy" in t else None),
            "target": case.target, "gb_per_s": moved / t["bncore"] / 1e9,
            "pct_of_copy": 100.0 * t["roofline"] / t["bncore"],
        })
    return rows


def _ms(s):
    return "-" if s is None else f"{s * 1e3:9.3f}"


def print_table(rows, out=sys.stdout):
    head = (f"{'case':44s} {'bncore ms':>9s} {'torch ms':>9s} {'ref ms':>9s} {'speedup':>8s}"
            f" {'target':>6s} {'':4s} {'GB/s':>6s} {'% copy':>6s}")
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        peer = r["torch_s"] if r["torch_s"] is not None else r["numpy_s"]
        sp = "-" if r["speedup"] is None else f"{r['speedup']:7.2f}x"
        tg = "-" if r["target"] is None else f"{r['target']:5.1f}x"
        verdict = "" if r["target"] is None or r["speedup"] is None else (
            "PASS" if r["speedup"] >= r["target"] else "MISS")
        print(f"{r['case']:44s} {_ms(r['bncore_s'])} {_ms(peer)} {_ms(r['reference_s'])}"
              f" {sp:>8s} {tg:>6s} {verdict:4s} {r['gb_per_s']:6.1f} {r['pct_of_copy']:5.0f}%",
              file=out)
    print("speedup = peer time / bncore time (peer: PyTorch, or NumPy for moments); "
          "% copy = roofline time / bncore time", file=out)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 1
    rows = [r for r in rows if r["speedup"] is not None]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) + 1.5))
    ax.barh([r["case"] for r in rows], [r["speedup"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        if r["target"]:
            ax.plot([r["target"]] * 2, [i - 0.4, i + 0.4], color="tab:red")
    ax.axvline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("speedup over the peer (red: target)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bncore bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few small cases, short samples")
    p.add_argument("--threads", type=int, default=None, help="threads (default: OpenMP's)")
    p.add_argument("--repeat", type=int, default=None, help="samples per case (median)")
    p.add_argument("--min-time", type=float, default=None, help="seconds per sample")
    p.add_argument("--filter", default=None, help="only cases whose name contains this")
    p.add_argument("--no-reference", action="store_true", help="skip the NumPy reference")
    p.add_argument("--json", metavar="FILE", help="write raw medians and metadata")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of speedups (matplotlib)")
    args = p.parse_args(argv)
    nt = args.threads or _openmp.max_threads()
    repeat = args.repeat or (3 if args.quick else 7)
    min_time = args.min_time or (0.01 if args.quick else 0.05)
    cases = all_cases(args.quick)
    if args.filter:
        cases = [c for c in cases if args.filter in c.label]
    if torch is None:
        print("PyTorch is not installed: torch columns are empty "
              "(pip install torch==2.13.0 for the comparison)", file=sys.stderr)
    rows = run(cases, nt, repeat, min_time, not args.no_reference)
    print_table(rows)
    if args.json:
        from bncore._config import config
        meta = {"config": config(), "threads": nt, "repeat": repeat, "min_time": min_time,
                "torch": None if torch is None else torch.__version__,
                "platform": platform.platform(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.plot:
        return plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
