"""python -m bncore {info | check | bench}: what the README and --help say each does, and
bad arguments rejected before any work (bench's own table and JSON: test_bench.py)."""
import subprocess
import sys

import pytest

import bncore
from bncore import __main__ as cli
from bncore import _bench


def test_info_prints_the_configuration_without_importing_torch():
    """info (and check) leave PyTorch alone: importing it takes a second and caps
    OpenMP's default thread count at the core count for the whole process."""
    code = ("import sys; from bncore.__main__ import main; rc = main(['info']); "
            "print('torch imported' if 'torch' in sys.modules else 'no torch'); "
            "sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"bncore {bncore.__version__}")
    assert "simd:" in r.stdout and r.stdout.rstrip().endswith("no torch")


@pytest.mark.parametrize("argv", [["info", "--bogus"], ["info", "extra"], ["check", "--x"],
                                  ["bench", "--bogus"]])
def test_unknown_arguments_are_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "usage: python -m bncore" in capsys.readouterr().err


def test_unknown_command(capsys):
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


def _check_cases():
    import numpy as np
    return cli._cases(np.random.default_rng(0))


def test_check_calls_every_public_op_and_the_accumulator(monkeypatch):
    """README: check runs every public op against its reference twin: each public
    function (and Moments) is called by some case, float32 and float64 both."""
    called = set()
    ops = [n for n in bncore.__all__ if n not in ("__version__", "show_config", "Moments")]
    for name in ops:
        fn = getattr(bncore, name)
        monkeypatch.setattr(bncore, name,
                            lambda *a, _f=fn, _n=name, **k: called.add(_n) or _f(*a, **k))

    class Counted(bncore.Moments):
        def merge(self, other):
            called.add("Moments")
            return super().merge(other)

    monkeypatch.setattr(bncore, "Moments", Counted)
    cases = _check_cases()
    for _, fast, _ in cases:
        fast()
    assert set(ops) | {"Moments"} <= called, sorted(set(ops) | {"Moments"} - called)
    assert any("float64" in name for name, _, _ in cases)


def test_check_passes_and_fails_as_it_says(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("all passed") and " FAIL " not in out
    assert len([ln for ln in out.splitlines() if " pass " in ln]) == len(_check_cases())
    # a tolerance nothing float can meet: every case fails, and the exit status says so
    assert cli.main(["check", "--tol", "0"]) == 1
    out = capsys.readouterr().out
    assert f"{len(_check_cases())} FAILED" in out


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf"])
def test_bench_min_time_must_be_positive_seconds(value, capsys):
    """--min-time nan never ended a sample; 0 silently meant the default."""
    with pytest.raises(SystemExit) as e:
        _bench.main(["--min-time", value, "--list"])
    assert e.value.code == 2
    assert "--min-time must be a number of seconds > 0" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_bench_output_paths_are_checked_before_the_run(flag, tmp_path, capsys):
    """A --json or --plot path that cannot be written is a usage error at once, not a
    traceback after the whole run (its results lost)."""
    for bad in (tmp_path / "no" / "such" / "dir" / "out", tmp_path):
        with pytest.raises(SystemExit) as e:
            _bench.main([flag, str(bad), "--filter", "8x32x8x8"])
        assert e.value.code == 2
        assert f"{flag} {bad}: cannot write there" in capsys.readouterr().err


def test_an_unbuilt_source_tree_says_so_on_import(tmp_path):
    """After `pip install .`, Python run from the repository's root imports the source
    tree (no compiled modules) before the installed bncore: the ImportError says what
    happened and what to do, instead of a circular-import puzzle."""
    import os
    import shutil
    src = os.path.dirname(bncore.__file__)
    shutil.copytree(src, tmp_path / "bncore",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.c", "__pycache__"))
    code = ("import sys; sys.meta_path = [f for f in sys.meta_path "
            "if '__editable__' not in repr(f)]; sys.path.insert(0, sys.argv[1]); "
            "import bncore")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1
    assert "is an unbuilt source tree" in r.stderr and "pip install -e ." in r.stderr, r.stderr
