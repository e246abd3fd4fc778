"""Bad input for every public function: a TypeError/ValueError naming the argument and
what was expected, raised before anything is written (README: "What is rejected")."""
import numpy as np
import pytest

import bncore

X = np.random.default_rng(0).normal(size=(4, 6, 3, 5))
C = 6


def fresh():
    """Every array argument a call might receive, newly made for each case."""
    rng = np.random.default_rng(1)
    return dict(
        x=X.copy(), dy=rng.normal(size=X.shape), w=np.ones(C), b=np.zeros(C),
        rm=np.zeros(C), rv=np.ones(C), mean=np.zeros(C), invstd=np.ones(C),
        gmean=np.zeros((4, 3)), ginv=np.ones((4, 3)), imean=np.zeros((4, C)),
        iinv=np.ones((4, C)), lmean=np.zeros((4, 6, 3)), linv=np.ones((4, 6, 3)),
        out=np.empty_like(X),
    )


def ro(a):
    a = a.copy()
    a.flags.writeable = False
    return a


# (id, call(a) using the dict of fresh arrays, exception, message pattern)
CASES = [
    # moments / Moments
    ("moments complex", lambda a: bncore.moments(a["x"] + 0j), TypeError, "x must be a real"),
    ("moments object", lambda a: bncore.moments(a["x"].astype(object)), TypeError, "x must"),
    ("moments string", lambda a: bncore.moments(np.array(["a"])), TypeError, "x must"),
    ("moments axis range", lambda a: bncore.moments(a["x"], axis=4), np.exceptions.AxisError,
     "axis 4"),
    ("moments axis repeated", lambda a: bncore.moments(a["x"], axis=(1, -3)), ValueError,
     "repeats"),
    ("Moments shape", lambda a: bncore.Moments().update(a["x"], 0).update(a["w"], 0),
     ValueError, "feature shape"),
    ("Moments merge type", lambda a: bncore.Moments().merge(a["w"]), TypeError, "Moments"),
    # batch norm
    ("bn int", lambda a: bncore.batch_norm(a["x"].astype(int), a["rm"], a["rv"]), TypeError,
     "x must be a float"),
    ("bn bool", lambda a: bncore.batch_norm(a["x"] > 0, a["rm"], a["rv"]), TypeError,
     "x must be a float"),
    ("bn object", lambda a: bncore.batch_norm(a["x"].astype(object), a["rm"], a["rv"]),
     TypeError, "x must be a float"),
    ("bn string", lambda a: bncore.batch_norm(np.array([["a", "b"]]), a["rm"], a["rv"]),
     TypeError, "x must be a float"),
    ("bn 1-d", lambda a: bncore.batch_norm(a["w"], a["rm"], a["rv"]), ValueError,
     "at least 2 dimensions"),
    ("bn weight size", lambda a: bncore.batch_norm(a["x"], a["rm"], a["rv"], np.ones(5)),
     ValueError, r"weight must have shape \(6,\)"),
    ("bn bias size", lambda a: bncore.batch_norm(a["x"], a["rm"], a["rv"], None, np.ones(7)),
     ValueError, r"bias must have shape \(6,\)"),
    ("bn running_mean size", lambda a: bncore.batch_norm(a["x"], np.zeros(5), a["rv"],
                                                         training=True),
     ValueError, "running_mean must have shape"),
    ("bn running_var list", lambda a: bncore.batch_norm(a["x"], a["rm"], [1.0] * C,
                                                        training=True),
     TypeError, "running_var must be a NumPy float array"),
    ("bn running_mean int", lambda a: bncore.batch_norm(a["x"], np.zeros(C, int), a["rv"],
                                                        training=True),
     TypeError, "running_mean must be a float array"),
    ("bn read-only running_var", lambda a: bncore.batch_norm(a["x"], a["rm"], ro(a["rv"]),
                                                             training=True),
     ValueError, "running_var is read-only"),
    ("bn axis range", lambda a: bncore.batch_norm(a["x"], a["rm"], a["rv"], axis=-5),
     np.exceptions.AxisError, "axis -5"),
    ("bn axis type", lambda a: bncore.batch_norm(a["x"], a["rm"], a["rv"], axis=1.5),
     TypeError, "axis must be an int"),
    ("bn eps negative", lambda a: bncore.batch_norm(a["x"], a["rm"], a["rv"], eps=-1e-5),
     ValueError, "eps"),
    ("bn eps nan", lambda a: bncore.batch_norm(a["x"], a["rm"], a["rv"], eps=np.nan),
     ValueError, "eps"),
    ("bn momentum nan", lambda a: bncore.batch_norm(a["x"], a["rm"], a["rv"], training=True,
                                                    momentum=np.nan),
     ValueError, "momentum"),
    ("bn one value per channel", lambda a: bncore.batch_norm(a["x"][:1, :, :1, :1], a["rm"],
                                                             a["rv"], training=True),
     ValueError, "more than 1 value per channel"),
    ("bn eval without stats", lambda a: bncore.batch_norm(a["x"], None, None), ValueError,
     "running_mean and running_var are required"),
    ("bn out read-only", lambda a: bncore.batch_norm(a["x"], a["rm"], a["rv"],
                                                     out=ro(a["out"])),
     ValueError, "out is read-only"),
    ("bn out shape", lambda a: bncore.batch_norm(a["x"], a["rm"], a["rv"], out=a["out"][0]),
     ValueError, "out must have shape"),
    ("bn out dtype", lambda a: bncore.batch_norm(a["x"], a["rm"], a["rv"],
                                                 out=a["out"].astype(np.float32)),
     TypeError, "out must have dtype"),
    ("bn out type", lambda a: bncore.batch_norm(a["x"], a["rm"], a["rv"], out=[0]),
     TypeError, "out must be a NumPy array"),
    ("bn n_threads", lambda a: bncore.batch_norm(a["x"], a["rm"], a["rv"], n_threads=-2),
     ValueError, "n_threads"),
    ("bn n_threads type", lambda a: bncore.batch_norm(a["x"], a["rm"], a["rv"], n_threads="2"),
     TypeError, "n_threads"),
    ("bn fwd weight complex", lambda a: bncore.batch_norm_forward(a["x"], a["w"] + 1j),
     TypeError, "weight must be a real"),
    ("bnb dy shape", lambda a: bncore.batch_norm_backward(a["dy"][:2], a["x"], a["mean"],
                                                          a["invstd"]),
     ValueError, "dy must have the shape of x"),
    ("bnb dy dtype", lambda a: bncore.batch_norm_backward(a["dy"].astype(np.float32), a["x"],
                                                          a["mean"], a["invstd"]),
     TypeError, "dy must have the dtype of x"),
    ("bnb save_mean size", lambda a: bncore.batch_norm_backward(a["dy"], a["x"], np.zeros(5),
                                                                a["invstd"]),
     ValueError, "save_mean must have shape"),
    ("bnb save_invstd missing", lambda a: bncore.batch_norm_backward(a["dy"], a["x"],
                                                                     a["mean"], None),
     TypeError, "save_mean and save_invstd are required"),
    ("bnb out dtype", lambda a: bncore.batch_norm_backward(
        a["dy"], a["x"], a["mean"], a["invstd"], out=a["out"].astype(np.float32)),
     TypeError, "out must have dtype"),
    # layer / RMS norm
    ("ln shape", lambda a: bncore.layer_norm(a["x"], (3, 4)), ValueError, "normalized_shape"),
    ("ln shape type", lambda a: bncore.layer_norm(a["x"], "5"), TypeError,
     "normalized_shape must be an int"),
    ("ln shape float", lambda a: bncore.layer_norm(a["x"], 5.0), TypeError,
     "normalized_shape must be an int"),
    ("ln weight", lambda a: bncore.layer_norm(a["x"], (3, 5), np.ones(5)), ValueError,
     r"weight must have shape \(3, 5\)"),
    ("ln int", lambda a: bncore.layer_norm(a["x"].astype(np.int32), 5), TypeError,
     "x must be a float"),
    ("ln eps", lambda a: bncore.layer_norm(a["x"], 5, eps=-0.1), ValueError, "eps"),
    ("lnf out shape", lambda a: bncore.layer_norm_forward(a["x"], 5, out=a["out"][:1]),
     ValueError, "out must have shape"),
    ("lnb mean shape", lambda a: bncore.layer_norm_backward(a["dy"], a["x"], a["mean"],
                                                            a["linv"], 5),
     ValueError, "mean must have shape"),
    ("lnb dy", lambda a: bncore.layer_norm_backward(a["dy"][0], a["x"], a["lmean"], a["linv"],
                                                    5),
     ValueError, "dy must have the shape"),
    ("rms weight", lambda a: bncore.rms_norm(a["x"], 5, np.ones(4)), ValueError,
     r"weight must have shape \(5,\)"),
    ("rms complex", lambda a: bncore.rms_norm(a["x"] + 0j, 5), TypeError, "x must be a float"),
    ("rms eps nan", lambda a: bncore.rms_norm(a["x"], 5, eps=np.nan), ValueError, "eps"),
    ("rmsf shape", lambda a: bncore.rms_norm_forward(a["x"], 7), ValueError,
     "normalized_shape"),
    ("rmsb invrms shape", lambda a: bncore.rms_norm_backward(a["dy"], a["x"], a["invstd"], 5),
     ValueError, "invrms must have shape"),
    # group / instance norm
    ("gn groups", lambda a: bncore.group_norm(a["x"], 4), ValueError, "num_groups"),
    ("gn groups zero", lambda a: bncore.group_norm(a["x"], 0), ValueError, "num_groups"),
    ("gn groups type", lambda a: bncore.group_norm(a["x"], "two"), TypeError, "num_groups"),
    ("gn one per group", lambda a: bncore.group_norm(a["x"][:, :, :1, :1], 6), ValueError,
     "more than 1 value per group"),
    ("gn weight", lambda a: bncore.group_norm(a["x"], 3, np.ones(3)), ValueError,
     r"weight must have shape \(6,\)"),
    ("gn axis", lambda a: bncore.group_norm(a["x"], 3, axis=2), ValueError, "axis must be 1"),
    ("gn 1-d", lambda a: bncore.group_norm(a["w"], 3), ValueError, "at least 2 dimensions"),
    ("gnf bool", lambda a: bncore.group_norm_forward(a["x"] > 0, 3), TypeError,
     "x must be a float"),
    ("gnb mean shape", lambda a: bncore.group_norm_backward(a["dy"], a["x"], a["mean"],
                                                            a["ginv"], 3),
     ValueError, r"mean must have shape \(4, 3\)"),
    ("gnb dy dtype", lambda a: bncore.group_norm_backward(a["dy"].astype(np.float32), a["x"],
                                                          a["gmean"], a["ginv"], 3),
     TypeError, "dy must have the dtype"),
    ("in one per instance", lambda a: bncore.instance_norm(a["x"][:, :, :1, :1]), ValueError,
     "more than 1 spatial element"),
    ("in running_mean size", lambda a: bncore.instance_norm(a["x"], np.zeros(5), a["rv"]),
     ValueError, "running_mean must have shape"),
    ("in read-only running_mean", lambda a: bncore.instance_norm(a["x"], ro(a["rm"]), a["rv"]),
     ValueError, "running_mean is read-only"),
    ("in eval without stats", lambda a: bncore.instance_norm(a["x"], use_input_stats=False),
     ValueError, "running_mean and running_var are required"),
    ("in momentum", lambda a: bncore.instance_norm(a["x"], a["rm"], a["rv"], momentum="x"),
     TypeError, "momentum"),
    ("inf eps", lambda a: bncore.instance_norm_forward(a["x"], eps=-1), ValueError, "eps"),
    ("inb invstd shape", lambda a: bncore.instance_norm_backward(a["dy"], a["x"], a["imean"],
                                                                 a["invstd"]),
     ValueError, "invstd must have shape"),
]


@pytest.mark.parametrize("name,call,exc,match", CASES, ids=[c[0] for c in CASES])
def test_rejected_with_a_clear_error_and_nothing_modified(name, call, exc, match):
    args = fresh()
    snapshot = {k: v.copy() for k, v in args.items()}
    with pytest.raises(exc, match=match):
        call(args)
    for k, v in snapshot.items():
        np.testing.assert_array_equal(args[k], v, err_msg=f"{k} was modified by {name}")


def test_every_public_function_has_a_bad_input_case():
    names = {n for n in bncore.__all__ if n not in ("__version__", "show_config")}
    covered = set()
    for _, call, _, _ in CASES:
        covered |= {n for n in names if f"bncore.{n}(" in _source(call)}
    assert names <= covered, f"no bad-input case for {sorted(names - covered)}"


def _source(fn):
    import inspect
    return inspect.getsource(fn)
