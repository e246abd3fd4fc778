"""python -m bncore bench: the verdict logic, and one tiny real run end to end.

Timings themselves are not checked (they belong to the benchmarks); what is checked is
that the table and the JSON say what the measured samples say.
"""
import json

import numpy as np
import pytest

from bncore import _bench


@pytest.mark.parametrize("target, speedup, ceiling, want", [
    (None, 2.0, 3.0, None),
    (1.5, None, None, None),
    (1.5, 1.5, 3.0, "PASS"),
    (1.5, 2.0, 1.0, "PASS"),     # above the ceiling is still a pass (the copy was slow)
    (1.5, 1.2, 3.0, "MISS"),
    (1.5, 1.2, 1.4, "MISS>"),    # the target is out of reach of a copy-speed kernel
    (1.5, 1.2, 1.5, "MISS"),
])
def test_verdict(target, speedup, ceiling, want):
    assert _bench._verdict(target, speedup, ceiling) == want


def test_list_and_filter(capsys):
    assert _bench.main(["--list", "--filter", "8x32x8x8"]) == 0
    out = capsys.readouterr().out.split("\n")
    names = [s for s in out if s]
    assert names and all("8x32x8x8" in s for s in names)
    assert _bench.main(["--list", "--filter", "no such case"]) == 2


def test_tiny_run_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    rc = _bench.main(["--filter", "bn train fwd 8x32x8x8", "--repeat", "2",
                      "--min-time", "0.001", "--no-reference", "--json", str(path)])
    assert rc == 0
    table = capsys.readouterr().out
    data = json.loads(path.read_text())
    (row,) = data["rows"]
    assert row["case"] in table and "ceiling" in table
    for side in ("bncore", "torch", "copy"):
        assert len(row["samples_s"][side]) == 2 and min(row["samples_s"][side]) > 0
    med = {k: float(np.median(v)) for k, v in row["samples_s"].items()}
    assert row["bncore_s"] == pytest.approx(med["bncore"])
    assert row["speedup"] == pytest.approx(med["torch"] / med["bncore"])
    assert row["ceiling"] == pytest.approx(med["torch"] / med["copy"])
    assert row["verdict"] == _bench._verdict(row["target"], row["speedup"], row["ceiling"])
    # bncore and PyTorch computed the same thing (checked before any timing)
    assert row["max_rel_diff_vs_peer"] < 1e-4
    assert data["meta"]["threads"] == row["threads"]


def test_bad_options(capsys):
    with pytest.raises(SystemExit):
        _bench.main(["--threads", "0"])
    with pytest.raises(SystemExit):
        _bench.main(["--repeat", "0"])


@pytest.mark.parametrize("op, shape, layout", [
    ("rms_norm", (16, 24), "rows"),
    ("group_norm", (2, 8, 5, 5), "NCHW"),
    ("group_norm", (2, 8, 5, 5), "NHWC"),
    ("instance_norm", (2, 8, 5, 5), "NCHW"),
    ("instance_norm", (2, 8, 5, 5), "NHWC"),
])
def test_family_backward_cases_compare_like_with_like(op, shape, layout):
    """The backward rows PyTorch times through autograd compute what bncore computes (the
    run's own check of the first output, dx), in both layouts."""
    case = _bench.family_backward(op, shape, layout, groups=4)
    row = _bench.run_case(case, 1, 1, 0.001, reference=False)
    assert row["peer"] == "torch" and row["target"] is None and row["verdict"] is None
    assert row["max_rel_diff_vs_peer"] < 1e-4, row["max_rel_diff_vs_peer"]


def test_the_noted_pytorch_fault_is_real():
    """The batch-1 channels-last instance_norm backward row says PyTorch's gradients are
    wrong there: the run's own check of dx sees it (here at a small shape), while bncore's
    agree with the float64 reference (test_threads: samples shared by the threads). If a
    PyTorch upgrade fixes it, this fails: drop the note (TORCH_IN_BWD_CL_N1)."""
    case = _bench.family_backward("instance_norm", (1, 8, 5, 5), "NHWC", target=1.0,
                                  peer_note=_bench.TORCH_IN_BWD_CL_N1)
    row = _bench.run_case(case, 1, 1, 0.001, reference=False)
    assert row["peer_note"] == _bench.TORCH_IN_BWD_CL_N1
    assert row["max_rel_diff_vs_peer"] > 0.1, row["max_rel_diff_vs_peer"]
    ok = _bench.family_backward("instance_norm", (2, 8, 5, 5), "NHWC")   # batch 2: right
    assert _bench.run_case(ok, 1, 1, 0.001, reference=False)["max_rel_diff_vs_peer"] < 1e-4


def test_channels_last_training_beyond_the_caches_counts_a_second_read():
    """A channels-last training forward over more than 16 MiB reads x twice (statistics,
    then the affine): its yardstick is a read plus a copy; NCHW and small channels-last
    inputs keep the copy."""
    assert _bench.bn_train((32, 64, 56, 56), "NHWC", "float32", 1.5).traffic == "read+copy"
    assert _bench.bn_train((32, 64, 56, 56), "NCHW", "float32", 3.0).traffic == "copy"
    assert _bench.bn_train((2, 8, 6, 6), "NHWC", "float32", 1.5).traffic == "copy"
    case = _bench.bn_train((2, 8, 6, 6), "NHWC", "float32", 1.5)
    case.traffic = "read+copy"
    row = _bench.run_case(case, 2, 2, 0.001, False)
    assert row["copy_kind"] == "read+copy"
    assert row["gb_per_s"] == pytest.approx(3 * row["nbytes_x"] / row["bncore_s"] / 1e9)


def test_channels_last_backward_roofline_counts_two_reads():
    """The channels-last batch-norm backward's yardstick moves five arrays' bytes (dy and
    x read twice, dx written): reads of two arrays, a copy and a read again."""
    case = _bench.bn_backward((2, 8, 6, 6), "NHWC", "float32", 1.5)
    row = _bench.run_case(case, 2, 2, 0.001, False)
    assert row["copy_kind"] == "2read+copy"
    assert row["gb_per_s"] == pytest.approx(5 * row["nbytes_x"] / row["bncore_s"] / 1e9)
    assert len(row["samples_s"]["copy"]) == 2 and min(row["samples_s"]["copy"]) > 0
    nchw = _bench.bn_backward((2, 8, 6, 6), "NCHW", "float32", 2.0)
    assert nchw.traffic == "dy+copy"


def test_backward_roofline_reads_a_second_array():
    """A backward reads dy and x and writes dx: its yardstick reads a second array (not x
    again, which the L3 may still hold) and copies x, three arrays' bytes."""
    cases = [_bench.bn_backward((2, 8, 6, 6), "NCHW", "float32", 2.0),
             _bench.layer_norm_backward_case((16, 24), 1.5),
             _bench.family_backward("group_norm", (2, 8, 5, 5), "NCHW", groups=4)]
    for case in cases:
        assert case.traffic == "dy+copy", case.label
        row = _bench.run_case(case, 2, 2, 0.001, False)
        assert row["copy_kind"] == "dy+copy"
        assert row["gb_per_s"] == pytest.approx(3 * row["nbytes_x"] / row["bncore_s"] / 1e9)
        assert len(row["samples_s"]["copy"]) == 2 and min(row["samples_s"]["copy"]) > 0
