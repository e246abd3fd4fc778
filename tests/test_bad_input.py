"""Bad input for every public function: a TypeError/ValueError naming the argument and
what was expected, raised before anything is written (README: "What is rejected").

One table, ``CASES``: each row is a valid call of one public function (``GOOD``) with one
argument replaced by something wrong. The valid calls train (running stats are updated)
and pass ``out=``, so a call that wrote anything before raising would be caught: every
array argument (x, dy, weight, bias, running and saved statistics, out) is snapshotted
before the call and compared, NaN-aware, after it. Rows are generated per argument kind,
for every function that has that argument, and the table is checked against
``bncore.__all__`` so a new public function cannot go uncovered.
"""
import inspect
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest

import bncore

N, C, H, W = 4, 6, 3, 5          # x is (N, C, H, W); groups of 2 channels; rows of W
G = 3
FAMILY = [f"{op}{suffix}" for op in ("layer_norm", "rms_norm", "group_norm", "instance_norm")
          for suffix in ("", "_forward", "_backward")]


def fresh():
    """Every argument a call might receive, newly made for each case. Running stats and
    saved statistics hold a NaN so that a NaN-blind comparison could not hide a write."""
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, (N, C, H, W))
    acc = bncore.Moments().update(x[:2], axis=0)
    return dict(
        x=x, dy=rng.normal(size=x.shape), w=rng.normal(size=C), b=rng.normal(size=C),
        rm=np.array([0.5, np.nan, 1, 2, 3, 4]), rv=np.array([2.0, 1, np.nan, 1, 1, 1]),
        mean=rng.normal(size=C), invstd=rng.uniform(1, 2, C),
        wd=rng.normal(size=W), bd=rng.normal(size=W),
        lmean=rng.normal(size=(N, C, H)), linv=rng.uniform(1, 2, (N, C, H)),
        gmean=rng.normal(size=(N, G)), ginv=rng.uniform(1, 2, (N, G)),
        imean=rng.normal(size=(N, C)), iinv=rng.uniform(1, 2, (N, C)),
        out=np.full(x.shape, -7.0), acc=acc, acc2=bncore.Moments().update(x[2:], axis=0),
    )


def _update(a, **kw):
    return a["acc"].update(**kw)


def _merge(a, **kw):
    return a["acc"].merge(**kw)


def _var(a, **kw):
    return a["acc"].var(**kw)


def _std(a, **kw):
    return a["acc"].std(**kw)


# A valid call of every public function (and Moments method): name -> a -> kwargs.
GOOD = {
    "moments": lambda a: dict(x=a["x"], axis=(0, 2, 3)),
    "Moments.update": lambda a: dict(x=a["x"], axis=0),
    "Moments.merge": lambda a: dict(other=a["acc2"]),
    "Moments.var": lambda a: dict(ddof=1),
    "Moments.std": lambda a: dict(ddof=1),
    "batch_norm": lambda a: dict(x=a["x"], running_mean=a["rm"], running_var=a["rv"],
                                 weight=a["w"], bias=a["b"], training=True, out=a["out"]),
    "batch_norm_forward": lambda a: dict(x=a["x"], weight=a["w"], bias=a["b"], training=True,
                                         running_mean=a["rm"], running_var=a["rv"],
                                         out=a["out"]),
    "batch_norm_backward": lambda a: dict(dy=a["dy"], x=a["x"], save_mean=a["mean"],
                                          save_invstd=a["invstd"], weight=a["w"],
                                          out=a["out"]),
    "layer_norm": lambda a: dict(x=a["x"], normalized_shape=W, weight=a["wd"], bias=a["bd"],
                                 out=a["out"]),
    "layer_norm_forward": lambda a: dict(x=a["x"], normalized_shape=W, weight=a["wd"],
                                         bias=a["bd"], out=a["out"]),
    "layer_norm_backward": lambda a: dict(dy=a["dy"], x=a["x"], mean=a["lmean"],
                                          invstd=a["linv"], normalized_shape=W,
                                          weight=a["wd"], out=a["out"]),
    "rms_norm": lambda a: dict(x=a["x"], normalized_shape=W, weight=a["wd"], out=a["out"]),
    "rms_norm_forward": lambda a: dict(x=a["x"], normalized_shape=W, weight=a["wd"],
                                       out=a["out"]),
    "rms_norm_backward": lambda a: dict(dy=a["dy"], x=a["x"], invrms=a["linv"],
                                        normalized_shape=W, weight=a["wd"], out=a["out"]),
    "group_norm": lambda a: dict(x=a["x"], num_groups=G, weight=a["w"], bias=a["b"],
                                 out=a["out"]),
    "group_norm_forward": lambda a: dict(x=a["x"], num_groups=G, weight=a["w"], bias=a["b"],
                                         out=a["out"]),
    "group_norm_backward": lambda a: dict(dy=a["dy"], x=a["x"], mean=a["gmean"],
                                          invstd=a["ginv"], num_groups=G, weight=a["w"],
                                          out=a["out"]),
    "instance_norm": lambda a: dict(x=a["x"], running_mean=a["rm"], running_var=a["rv"],
                                    weight=a["w"], bias=a["b"], use_input_stats=True,
                                    out=a["out"]),
    "instance_norm_forward": lambda a: dict(x=a["x"], weight=a["w"], bias=a["b"],
                                            out=a["out"]),
    "instance_norm_backward": lambda a: dict(dy=a["dy"], x=a["x"], mean=a["imean"],
                                             invstd=a["iinv"], weight=a["w"], out=a["out"]),
}
METHODS = {"Moments.update": _update, "Moments.merge": _merge, "Moments.var": _var,
           "Moments.std": _std}
STATS = ("moments", "Moments.update")          # accept int/bool x, no out, no channel axis
ROW_NORMS = ("layer_norm", "layer_norm_forward", "layer_norm_backward", "rms_norm",
             "rms_norm_forward", "rms_norm_backward")
AXIS_1_OR_LAST = tuple(n for n in GOOD if n.startswith(("group_norm", "instance_norm")))


def target(name):
    return METHODS.get(name) or (lambda a, **kw: getattr(bncore, name)(**kw))


def ro(arr):
    arr = arr.copy()
    arr.flags.writeable = False
    return arr


def _shrink_x(fn, n_keep, h, w):
    """Overrides for x (dy) and out cut to x[:n_keep, :, :h, :w] (one value per ...)."""
    keys = [k for k in ("x", "dy") if k in GOOD[fn](fresh())]
    return {k: (lambda a, k=k: a[k][:n_keep, :, :h, :w]) for k in keys} | {
        "out": lambda a: np.full((n_keep, C, h, w), -7.0)}


CASES = []


def case(fn, label, exc, match, **overrides):
    CASES.append(pytest.param(fn, overrides, exc, match, id=f"{fn}-{label}"))


BAD_FLOAT_DTYPES = [("int32", np.int32), ("int64", np.int64), ("uint8", np.uint8),
                    ("bool", np.bool_), ("complex", np.complex128), ("object", object),
                    ("longdouble", np.longdouble)]


def signature(name):
    fn = bncore
    for part in name.split("."):
        fn = getattr(fn, part)
    return set(inspect.signature(fn).parameters) - {"self"}


def _cases_for(fn, good):
    """Rows for each argument kind that ``fn`` takes."""
    kw = good(fresh())
    params = signature(fn)
    both_x_dy = ("x", "dy") if "dy" in kw else ("x",)
    # --- dtype of x (and dy): normalisation ops take float16/32/64 only
    if "x" in kw:
        bad = BAD_FLOAT_DTYPES[4:] if fn in STATS else BAD_FLOAT_DTYPES
        for label, dt in bad:
            case(fn, f"x-{label}", TypeError, r"\bx must be a ",
                 x=lambda a, dt=dt: a["x"].astype(dt))
        case(fn, "x-str", TypeError, r"\bx must be a ", x=lambda a: np.full(a["x"].shape, "a"))
        case(fn, "x-None", TypeError, r"\bx must be a ", x=None)
        case(fn, "x-datetime", TypeError, r"\bx must be a ",
             x=lambda a: a["x"].astype(np.int64).astype("datetime64[s]"))
    if "dy" in kw:
        for label, dt in BAD_FLOAT_DTYPES[:5]:
            case(fn, f"dy-{label}", TypeError, r"\bdy must be a ",
                 dy=lambda a, dt=dt: a["dy"].astype(dt))
        case(fn, "dy-float32-vs-float64", TypeError, r"\bdy must have the dtype of x",
             dy=lambda a: a["dy"].astype(np.float32))
        case(fn, "dy-shape", ValueError, r"\bdy must have the shape of x",
             dy=lambda a: a["dy"][:2])
        case(fn, "dy-transposed-shape", ValueError, r"\bdy must have the shape of x",
             dy=lambda a: a["dy"].transpose(0, 1, 3, 2))
    # --- ndim of x
    if fn in ROW_NORMS:
        case(fn, "x-0d", ValueError, r"normalized_shape .* trailing dimensions of x",
             **{k: (lambda a, k=k: a[k][0, 0, 0, 0]) for k in both_x_dy})
        case(fn, "x-fewer-dims-than-normalized_shape", ValueError, r"normalized_shape",
             normalized_shape=(N, C, H, W, 1))
    elif fn not in STATS and "x" in kw:
        case(fn, "x-1d", ValueError, r"\bx must have at least 2 dimensions",
             **{k: (lambda a, k=k: a[k][0, 0, 0]) for k in both_x_dy}, out=None)
        case(fn, "x-0d", ValueError, r"\bx must have at least 2 dimensions",
             **{k: (lambda a, k=k: a[k][0, 0, 0, 0]) for k in both_x_dy}, out=None)
    # --- per-channel (or per-normalized-element) parameters
    pshape = "W" if fn in ROW_NORMS else "C"
    for p in ("weight", "bias"):
        if p in kw:
            case(fn, f"{p}-short", ValueError, rf"\b{p} must have shape \(\d+,\)",
                 **{p: np.ones(W - 1 if pshape == "W" else C - 1)})
            case(fn, f"{p}-2d", ValueError, rf"\b{p} must have shape",
                 **{p: lambda a, v="wd" if pshape == "W" else "w": a[v].reshape(1, -1)})
            case(fn, f"{p}-scalar", ValueError, rf"\b{p} must have shape", **{p: 1.0})
            for label, dt in (("complex", np.complex128), ("bool", np.bool_),
                              ("object", object), ("str", "U1")):
                case(fn, f"{p}-{label}", TypeError, rf"\b{p} must be a real",
                     **{p: np.ones(W if pshape == "W" else C, dtype=dt)})
    # --- running statistics (updated in place when training)
    for p in ("running_mean", "running_var"):
        if p in kw:
            case(fn, f"{p}-short", ValueError, rf"\b{p} must have shape \(6,\)",
                 **{p: np.zeros(C - 1)})
            case(fn, f"{p}-2d", ValueError, rf"\b{p} must have shape \(6,\)",
                 **{p: np.zeros((1, C))})
            case(fn, f"{p}-list", TypeError, rf"\b{p} must be a NumPy float array",
                 **{p: [0.0] * C})
            case(fn, f"{p}-int", TypeError, rf"\b{p} must be a float array",
                 **{p: np.zeros(C, np.int64)})
            case(fn, f"{p}-complex", TypeError, rf"\b{p} must be a float array",
                 **{p: np.zeros(C, np.complex128)})
            case(fn, f"{p}-read-only", ValueError, rf"\b{p} is read-only",
                 **{p: lambda a, p=p: ro(a["rm" if p == "running_mean" else "rv"])})
    # --- saved statistics of the backward passes
    saved = [p for p in ("save_mean", "save_invstd", "mean", "invstd", "invrms") if p in kw]
    for p in saved:
        case(fn, f"{p}-wrong-shape", ValueError, rf"\b{p} must have shape",
             **{p: lambda a, p=p, good=good: np.ones(np.shape(good(a)[p])[:-1] + (7,))})
        case(fn, f"{p}-complex", TypeError, rf"\b{p} must be a real",
             **{p: lambda a, p=p, good=good: np.asarray(good(a)[p], np.complex128)})
        case(fn, f"{p}-None", TypeError, rf"\b{p}\b.*required", **{p: None})
    # --- channel axis
    if fn in STATS:
        case(fn, "axis-out-of-range", np.exceptions.AxisError, r"\baxis 4\b", axis=4)
        case(fn, "axis-negative-out-of-range", np.exceptions.AxisError, r"\baxis -5\b",
             axis=-5)
        case(fn, "axis-repeated", ValueError, r"\baxis .* repeats an axis", axis=(1, -3))
        case(fn, "axis-float", TypeError, r"\baxis must be an int", axis=1.0)
        case(fn, "axis-str", TypeError, r"\baxis must be an int", axis="0")
    elif "x" in kw and fn not in ROW_NORMS:
        case(fn, "axis-out-of-range", np.exceptions.AxisError, r"\baxis 4\b", axis=4)
        case(fn, "axis-negative-out-of-range", np.exceptions.AxisError, r"\baxis -5\b",
             axis=-5)
        case(fn, "axis-float", TypeError, r"\baxis must be an int", axis=1.5)
        case(fn, "axis-tuple", TypeError, r"\baxis must be an int", axis=(1, 1))
        if fn in AXIS_1_OR_LAST:
            case(fn, "axis-not-1-or-last", ValueError, r"\baxis must be 1 .* or -1", axis=2)
    # --- out
    if "out" in kw:
        case(fn, "out-read-only", ValueError, r"\bout is read-only", out=lambda a: ro(a["out"]))
        case(fn, "out-shape", ValueError, r"\bout must have shape", out=lambda a: a["out"][0])
        case(fn, "out-float32", TypeError, r"\bout must have dtype float64",
             out=lambda a: a["out"].astype(np.float32))
        case(fn, "out-list", TypeError, r"\bout must be a NumPy array", out=[0.0])
    # --- scalars
    if "eps" in params:
        for label, value in (("negative", -1e-5), ("nan", np.nan), ("inf", np.inf)):
            case(fn, f"eps-{label}", ValueError, r"\beps must be a finite number >= 0",
                 eps=value)
        case(fn, "eps-str", TypeError, r"\beps must be a real number", eps="1e-5")
        case(fn, "eps-complex", TypeError, r"\beps must be a real number", eps=1e-5j)
    if "n_threads" in params:
        for label, value in (("zero", 0), ("negative", -2)):
            case(fn, f"n_threads-{label}", ValueError, r"\bn_threads must be", n_threads=value)
        for label, value in (("str", "2"), ("float", 2.0), ("bool", True)):
            case(fn, f"n_threads-{label}", TypeError, r"\bn_threads must be", n_threads=value)
    if fn in ("moments", "Moments.var", "Moments.std"):
        case(fn, "ddof-nan", ValueError, r"\bddof must not be NaN", ddof=np.nan)
        case(fn, "ddof-str", TypeError, r"\bddof must be a real number", ddof="1")
    if "running_mean" in kw:
        case(fn, "momentum-nan", ValueError, r"\bmomentum must not be NaN", momentum=np.nan)
        case(fn, "momentum-str", TypeError, r"\bmomentum must be a real number",
             momentum="0.1")
    if "num_groups" in kw:
        for label, value in (("not-divisor", 4), ("zero", 0), ("negative", -3),
                             ("more-than-C", 2 * C)):
            case(fn, f"num_groups-{label}", ValueError,
                 r"\bnum_groups \(-?\d+\) must be a positive divisor", num_groups=value)
        for label, value in (("str", "3"), ("float", 3.0), ("None", None)):
            case(fn, f"num_groups-{label}", TypeError, r"\bnum_groups must be an int",
                 num_groups=value)
    if "normalized_shape" in kw:
        # sizes past Py_ssize_t: the one-step path once cast them in a function that could
        # not raise, and normalised each value on its own (no error, a wrong result)
        for label, value in (("mismatch", (C, W)), ("wrong-int", H), ("empty", ()),
                             ("negative", -W), ("huge-int", 2**70), ("2**63", 2**63),
                             ("huge-in-tuple", (H, 2**70)), ("minus-2**63", -2**63)):
            case(fn, f"normalized_shape-{label}", ValueError,
                 r"\bnormalized_shape .* must match the trailing dimensions of x",
                 normalized_shape=value)
            # without weights, whose shape the size would fail first
            case(fn, f"normalized_shape-{label}-no-weights", ValueError,
                 r"\bnormalized_shape .* must match the trailing dimensions of x",
                 normalized_shape=value, weight=None,
                 **({"bias": None} if "bias" in kw else {}))
        for label, value in (("str", "5"), ("float", 5.0), ("float-tuple", (5.0,)),
                             ("None", None)):
            case(fn, f"normalized_shape-{label}", TypeError,
                 r"\bnormalized_shape must be an int or a tuple of ints",
                 normalized_shape=value)


for _fn, _good in GOOD.items():
    _cases_for(_fn, _good)

# --- one value per channel / group / instance where the statistics come from x
for fn in ("batch_norm", "batch_norm_forward"):
    case(fn, "one-value-per-channel", ValueError,
         r"more than 1 value per channel when training, got \bx\b", **_shrink_x(fn, 1, 1, 1))
    case(fn, "one-value-per-channel-2d", ValueError,
         r"more than 1 value per channel when training, got \bx\b",
         x=lambda a: a["x"][:1, :, 0, 0], out=lambda a: a["out"][:1, :, 0, 0])
    case(fn, "one-value-per-channel-last", ValueError,
         r"more than 1 value per channel when training, got \bx\b",
         x=lambda a: a["x"][:1, :1, :1, :], axis=-1, out=None,
         running_mean=lambda a: a["rm"][:W], running_var=lambda a: a["rv"][:W],
         weight=None, bias=None)
for fn in ("group_norm", "group_norm_forward"):
    case(fn, "one-value-per-group", ValueError, r"more than 1 value per group, got \bx\b",
         **_shrink_x(fn, N, 1, 1), num_groups=C)
for fn in ("instance_norm", "instance_norm_forward"):
    case(fn, "one-value-per-instance", ValueError,
         r"more than 1 spatial element per instance .* got \bx\b", **_shrink_x(fn, N, 1, 1))
    case(fn, "one-value-per-instance-2d", ValueError,
         r"more than 1 spatial element per instance .* got \bx\b",
         x=lambda a: a["x"][:, :, 0, 0], out=None)

# --- eval without running statistics, and the remaining special cases
case("batch_norm", "eval-without-running-stats", ValueError,
     r"\brunning_mean and running_var are required", training=False, running_mean=None)
case("batch_norm_forward", "eval-without-running-var", ValueError,
     r"\brunning_mean and running_var are required", training=False, running_var=None)
case("batch_norm", "eval-running_var-short", ValueError, r"\brunning_var must have shape",
     training=False, running_var=np.ones(C - 1))
case("instance_norm", "eval-without-running-stats", ValueError,
     r"\brunning_mean and running_var are required", use_input_stats=False,
     running_var=None)
case("instance_norm", "eval-running_mean-short", ValueError,
     r"\brunning_mean must have shape", use_input_stats=False, running_mean=np.zeros(C - 1))
case("instance_norm", "eval-eps-nan", ValueError, r"\beps must be a finite",
     use_input_stats=False, eps=np.nan)
case("Moments.update", "x-feature-shape", ValueError, r"\bx\b.*feature shape|feature shape.*\bx\b",
     x=lambda a: a["x"][:, :2])
case("Moments.merge", "other-feature-shape", ValueError,
     r"\bother\b.*feature shape|feature shape.*\bother\b",
     other=lambda a: bncore.Moments().update(a["x"][:, :2], axis=0))
case("Moments.merge", "other-not-a-Moments", TypeError, r"\bother must be a Moments",
     other=lambda a: a["x"])
case("Moments.merge", "other-None", TypeError, r"\bother must be a Moments", other=None)


# ------------------------------------------------------------------ snapshots

def _snapshot(obj):
    if isinstance(obj, np.ndarray):
        return ("array", obj.copy(), obj.dtype, obj.shape, obj.flags.writeable)
    if isinstance(obj, bncore.Moments):
        return ("moments", obj.count, np.array(obj.mean, copy=True), np.array(obj.var(),
                                                                              copy=True))
    if isinstance(obj, list):
        return ("list", list(obj))
    return None


def _same(a, b):
    if a.dtype.kind in "fc":
        return np.array_equal(a, b, equal_nan=True)
    return np.array_equal(a, b)


def _check_unchanged(obj, snap, what):
    kind = snap[0]
    if kind == "array":
        _, copy, dtype, shape, writeable = snap
        assert obj.dtype == dtype and obj.shape == shape, f"{what} changed dtype or shape"
        assert obj.flags.writeable == writeable, f"{what} changed its writeable flag"
        assert _same(obj, copy), f"{what} was modified"
    elif kind == "moments":
        _, count, mean, var = snap
        assert obj.count == count, f"{what} (a Moments) changed its count"
        assert _same(np.asarray(obj.mean), mean) and _same(np.asarray(obj.var()), var), \
            f"{what} (a Moments) was modified"
    elif kind == "list":
        assert obj == snap[1], f"{what} (a list) was modified"


def call(fn, overrides, a):
    kw = GOOD[fn](a)
    for k, v in overrides.items():
        kw[k] = v(a) if callable(v) else v
    return kw, (lambda: target(fn)(a, **kw))


def _with_and_without_out(cases):
    """Each case with the good call's out= array, and again with out=None where the good
    call has an out= and the case is not about it: a plain out= takes the one-step fast
    path as out=None does (bncore._fastpath), so each path meets every case."""
    a = fresh()
    for p in cases:
        fn, overrides = p.values[0], p.values[1]
        yield pytest.param(*p.values, True, id=p.id)
        if "out" in GOOD[fn](a) and "out" not in overrides:
            yield pytest.param(*p.values, False, id=p.id + "-no-out")


@pytest.mark.parametrize("fn,overrides,exc,match,with_out", list(_with_and_without_out(CASES)))
def test_rejected_with_a_clear_error_and_nothing_modified(fn, overrides, exc, match, with_out):
    a = fresh()
    kw, run = call(fn, overrides, a)
    if not with_out:
        kw["out"] = None
    watched = dict(a) | {f"argument {k}": v for k, v in kw.items()}
    snaps = {k: _snapshot(v) for k, v in watched.items()}
    with pytest.raises(exc, match=match) as info:
        run()
    # AxisError is a ValueError and an IndexError; nothing else may leak through
    assert isinstance(info.value, (TypeError, ValueError)), type(info.value)
    for k, v in watched.items():
        if snaps[k] is not None:
            _check_unchanged(v, snaps[k], f"{k} (by {fn})")


@pytest.mark.parametrize("fn", sorted(GOOD))
def test_the_valid_call_behind_each_case_works_and_writes(fn):
    """Each case differs from a call that succeeds by one argument, and that call writes
    out / the running stats / the accumulator: so 'nothing modified' above has teeth."""
    a = fresh()
    kw, run = call(fn, {}, a)
    before = {k: _snapshot(v) for k, v in a.items()}
    run()
    writes = {"out"} & set(kw) | ({"rm", "rv"} if "running_mean" in kw else set())
    if fn in ("Moments.update", "Moments.merge"):
        writes = {"acc"}
    for k in writes:
        with pytest.raises(AssertionError):
            _check_unchanged(a[k], before[k], k)


def public_functions():
    return sorted(n for n in bncore.__all__
                  if n not in ("__version__", "show_config", "Moments")) + \
        sorted(METHODS)


def test_every_public_function_has_bad_input_cases():
    covered = {p.values[0] for p in CASES}
    missing = [n for n in public_functions() if n not in covered]
    assert not missing, f"no bad-input cases (add a GOOD call) for {missing}"


def test_every_argument_kind_is_covered_for_every_function():
    """For each public function: x, and each of dy/weight/bias/running stats/saved
    statistics/axis/out/eps/momentum/n_threads/num_groups/normalized_shape it takes."""
    ids = {p.id for p in CASES}
    gaps = []
    for n in public_functions():
        for p in sorted(signature(n) - {"keepdims", "training", "use_input_stats"}):
            if not any(i.startswith(f"{n}-{p}") or (p == "axis" and f"{n}-axis" in i)
                       for i in ids):
                gaps.append(f"{n}({p}=...)")
    assert not gaps, f"arguments with no bad-input case: {gaps}"


def test_the_whole_family_is_public():
    """The family is part of the API contract (DESIGN.md)."""
    missing = [n for n in FAMILY if n not in bncore.__all__ or not hasattr(bncore, n)]
    assert not missing, f"family ops missing from bncore.__all__: {missing}"


# ------------------------------------------------------------------ accepted input

ACCEPTED = [
    ("moments-int", lambda a: bncore.moments(a["x"].astype(np.int64), axis=0)),
    ("moments-bool", lambda a: bncore.moments(a["x"] > 2)),
    ("moments-list", lambda a: bncore.moments([[1, 2], [3, 4]], axis=1)),
    ("moments-uint8-0d", lambda a: bncore.moments(np.uint8(3))),
    ("moments-empty-axis-tuple", lambda a: bncore.moments(a["x"], axis=())),
    ("Moments-int", lambda a: bncore.Moments().update(a["x"].astype(np.int16), axis=0)),
    ("batch_norm-eval-read-only-running-stats",
     lambda a: bncore.batch_norm(a["x"], ro(a["rm"]), ro(a["rv"]))),
    ("batch_norm-read-only-x-weight", lambda a: bncore.batch_norm(
        ro(a["x"]), a["rm"], a["rv"], ro(a["w"]), ro(a["b"]), training=True)),
    ("batch_norm-float32-running-stats-float64-x", lambda a: bncore.batch_norm(
        a["x"], a["rm"].astype(np.float32), a["rv"].astype(np.float32), training=True)),
    ("batch_norm-byteswapped-running-stats", lambda a: bncore.batch_norm(
        a["x"], a["rm"].astype(">f8"), a["rv"].astype(">f4"), training=True)),
    ("batch_norm-int-weight", lambda a: bncore.batch_norm(a["x"], a["rm"], a["rv"],
                                                          np.arange(C))),
    ("batch_norm-list-x", lambda a: bncore.batch_norm(a["x"].tolist(), a["rm"], a["rv"])),
    ("batch_norm-out-is-x", lambda a: bncore.batch_norm(a["x"], a["rm"], a["rv"],
                                                        out=a["x"])),
    ("batch_norm-eps-zero", lambda a: bncore.batch_norm(a["x"], a["rm"], a["rv"], eps=0)),
    ("batch_norm-numpy-int-axis", lambda a: bncore.batch_norm(a["x"], a["rm"], a["rv"],
                                                              axis=np.int64(1))),
    ("batch_norm-training-zero-size", lambda a: bncore.batch_norm(
        a["x"][:0], a["rm"], a["rv"], training=True)),
    ("layer_norm-tuple-shape-numpy-ints", lambda a: bncore.layer_norm(
        a["x"], (np.int64(H), np.int32(W)))),
    ("rms_norm-eps-None", lambda a: bncore.rms_norm(a["x"], W, eps=None)),
    ("group_norm-channels-last", lambda a: bncore.group_norm(a["x"], 5, axis=-1)),
    ("instance_norm-no-running-stats", lambda a: bncore.instance_norm(a["x"])),
]


@pytest.mark.parametrize("call_", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_accepted(call_):
    """Things that look odd but are valid (and must stay so)."""
    call_(fresh())


def same_results(fn, want_overrides, got_overrides):
    """Run fn's GOOD call with each set of overrides (fresh arguments for each) and check
    that every result is the same; returns the second call's arguments and results."""
    runs = []
    for overrides in (want_overrides, got_overrides):
        kw, run = call(fn, overrides, fresh())
        r = run()
        runs.append((kw, r if isinstance(r, tuple) else (r,)))
    for w, g in zip(runs[0][1], runs[1][1]):
        np.testing.assert_array_equal(g, w)
    return runs[1]


def with_param(name):
    """The GOOD functions whose signature has parameter ``name``."""
    return sorted(n for n in GOOD if name in inspect.signature(
        getattr(bncore, n, lambda: None)).parameters)


@pytest.mark.parametrize("fn", with_param("out"))
def test_out_of_either_byte_order(fn):
    """out= may be byte-swapped (README: any byte order), as a NumPy ufunc's out may: the
    call writes the same values into it as into a native out, and returns it."""
    kw, got = same_results(fn, {}, {"out": lambda a: a["out"].astype(">f8")})
    assert got[0] is kw["out"] and kw["out"].dtype == np.dtype(">f8")


@pytest.mark.parametrize("fn", with_param("eps"))
@pytest.mark.parametrize("eps", [Decimal("1e-5"), Fraction(1, 100000), np.float32(1e-5)],
                         ids=["Decimal", "Fraction", "float32"])
def test_eps_of_any_real_type_is_taken_as_a_float(fn, eps):
    """eps need only convert to a float: every op with eps gives what eps=float(eps)
    gives (group_norm_forward once wrote out, then raised on a Decimal)."""
    same_results(fn, {"eps": float(eps)}, {"eps": eps})


@pytest.mark.parametrize("fn", with_param("n_threads"))
@pytest.mark.parametrize("n_threads", [2**31, 2**70])
def test_any_positive_thread_count_is_accepted(fn, n_threads):
    """A thread count past a C int is taken as the most bncore starts
    (bncore._openmp.thread_max()), not an OverflowError; the results are those of one
    thread (the same bits for any count)."""
    same_results(fn, {"n_threads": 1}, {"n_threads": n_threads})
