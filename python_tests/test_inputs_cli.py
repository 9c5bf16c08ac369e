"""The ``molrg`` command line refuses bad option values as usage errors (exit status 2, one
argparse line naming the option), never with a traceback: --out where a file or folder is in the
way, values too large for the sizes, threads, seeds and floats they become, and empty lists."""
import argparse

import pytest

from molrg_ext import cli
from molrg_ext.experiments import hidden_gaussian as hg
from molrg_ext.experiments._common import (FLOAT32_MAX, INDEX_MAX, finite_float, int_at_least,
                                           int_list, out_dir, out_file, seed_int, threads_int)
from molrg_ext.bench import _modes
from molrg_ext.experiments.phase_transition import parse_range

BIG = "99999999999999999999999"
HUGE = str(2**40)


def usage_error(argv, capsys) -> str:
    """The last line of what cli.main(argv) printed before exiting with status 2."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("command", ["demo", "phase-transition", "gl-score", "rank-vs-snr",
                                     "edit", "hidden-gaussian"])
@pytest.mark.parametrize("below", ["", "/sub"])
def test_out_where_a_file_is_is_a_usage_error(command, below, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    last = usage_error([command, "--out", f"{f}{below}"], capsys)
    assert last.startswith(f"molrg {command}: error: argument --out: must be a folder, but {f} "
                           "exists and is not one"), last
    assert f.read_text() == "x"


def test_bench_out_at_a_folder_or_below_a_file_is_a_usage_error(tmp_path, capsys):
    last = usage_error(["bench", "--out", str(tmp_path)], capsys)
    assert f"argument --out: must be a file path, but {str(tmp_path)!r} is a folder" in last
    f = tmp_path / "afile"
    f.write_text("x")
    last = usage_error(["bench", "--out", f"{f}/b.json"], capsys)
    assert f"argument --out: must be a file path, but {f} exists and is not a folder" in last


@pytest.mark.parametrize("argv, option, message", [
    (["demo", "--K", BIG], "--K", f"must be an int in [1, {INDEX_MAX}], got {BIG}"),
    (["demo", "--lr", "1e300"], "--lr", "must be a finite number >= 0 and <= 3.40282e+38"),
    (["demo", "--Nk", "100000000000"], "--Nk", f"must be an int in [1, {INDEX_MAX}]"),
    (["demo", "--n", "100000000000"], "--n", f"must be an int in [1, {INDEX_MAX}]"),
    (["demo", "--instances", "100000000000"], "--instances", f"must be an int in [1, {INDEX_MAX}]"),
    (["demo", "--seed", BIG], "--seed", "must be an int in [0, 4294967295]"),
    (["gl-score", "--channels", HUGE], "--channels", "must be an int in [1, 1048576]"),
    (["rank-vs-snr", "--channels", HUGE], "--channels", "must be an int in [1, 1048576]"),
    (["edit", "--channels", HUGE], "--channels", "must be an int in [1, 1048576]"),
    (["hidden-gaussian", "--hidden", HUGE], "--hidden", "must be an int in [1, 1048576]"),
    (["hidden-gaussian", "--sizes", "8,100000000000"], "--sizes",
     f"must be an int in [1, {INDEX_MAX}], got 100000000000"),
    (["bench", "--shapes", f"8,2,2,{HUGE}"], "--shapes", f"has a size above {INDEX_MAX}"),
    (["phase-transition", "--N", "100000000000"], "--N", f"must hold ints <= {INDEX_MAX}"),
    (["phase-transition", "--N", "1:100000000000"], "--N", "has more than 10000 values"),
    (["phase-transition", "--d", "49"], "--d", "must hold ints <= 48"),
    (["phase-transition", "--threads", BIG], "--threads", "must be an int in [1, 4096]"),
    (["gl-score", "--threads", BIG], "--threads", "must be an int in [1, 4096]"),
    (["rank-vs-snr", "--threads", BIG], "--threads", "must be an int in [1, 4096]"),
    (["hidden-gaussian", "--threads", BIG], "--threads", "must be an int in [1, 4096]"),
    (["bench", "--threads", BIG], "--threads", "must be an int in [1, 4096]"),
    (["phase-transition", "--seed", "-1"], "--seed", "must be an int >= 0, got -1"),
    (["edit", "--sigma", "1e300"], "--sigma", "must be a finite number > 0.002 and <= 3.40282e+38"),
    (["bench", "--modes", "bogus"], "--modes", "must be a comma list of hard / soft, got 'bogus'"),
    (["bench", "--modes", "soft,"], "--modes", "got 'soft,'"),
    (["hidden-gaussian", "--sizes", ""], "--sizes", "must be a comma list of ints >= 1, got ''"),
    (["hidden-gaussian", "--sizes", ","], "--sizes", "must be a comma list of ints >= 1"),
])
def test_bad_values_are_refused_while_parsing(argv, option, message, tmp_path, capsys):
    last = usage_error(argv + ["--out", str(tmp_path / "o")], capsys)
    assert f"error: argument {option}: " in last and message in last, last
    assert not (tmp_path / "o").exists()  # refused before the command made anything


@pytest.mark.parametrize("argv, message", [
    # products of options that allocate: refused before anything is built
    (["demo", "--K", str(INDEX_MAX)], f"demo: --K must be <= --n = 48 (K d <= n), got {INDEX_MAX}"),
    (["gl-score", "--dims", "3", "--ratios", "1e300"],
     f"gl-score: --ratios times --dims (N_k) must be <= {INDEX_MAX}, got 1e+300 * 3"),
])
def test_products_of_sizes_are_usage_errors(argv, message, tmp_path, capsys):
    last = usage_error(argv + ["--out", str(tmp_path / "o")], capsys)
    assert last.endswith(f"error: {message}"), last


def test_the_types_keep_every_value_in_range(tmp_path):
    assert int_at_least(1)(str(INDEX_MAX)) == INDEX_MAX
    assert seed_int("0") == 0 and seed_int(str(2**32 - 1)) == 2**32 - 1
    assert threads_int("4096") == 4096
    assert finite_float(0.0, hi=FLOAT32_MAX)("3.4e38") == 3.4e38
    assert int_list(1)("8,,32,") == [8, 32]  # empty items are skipped, as before
    assert parse_range("2:8:3") == [2, 5, 8] and parse_range(str(INDEX_MAX)) == [INDEX_MAX]
    assert out_dir()(str(tmp_path)) == str(tmp_path)
    assert out_dir()(str(tmp_path / "new" / "deeper")) == str(tmp_path / "new" / "deeper")
    assert out_file(str(tmp_path / "new" / "b.json")) == str(tmp_path / "new" / "b.json")
    assert out_file("") == ""  # bench: write no JSON
    assert _modes("hard,soft") == "hard,soft"
    for bad in ("2147483648", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be an int"):
            int_at_least(0)(bad)


def test_hidden_gaussian_sizes_text_from_a_namespace():
    # run() takes --sizes as text from a caller's own Namespace: "" is an error there too
    with pytest.raises(ValueError, match="hidden-gaussian: --sizes must be a comma list of ints "
                                         ">= 1, got ''"):
        hg._ints("", "--sizes")
    assert hg._ints("8, 16", "--sizes") == [8, 16]


@pytest.mark.parametrize("argv, option, msg", [
    (["--modes", "bogus"], "--modes", "must be a comma list of hard / soft"),
    (["--threads", "99999999999999999999999"], "--threads", ""),
    (["--shapes", "8,2,2,2147483648"], "--shapes", "has a size above 2147483647"),
    (["--out", "{dir}"], "--out", ""),
])
def test_python_m_benchmarks_checks_its_options_as_molrg_bench(argv, option, msg, tmp_path,
                                                               capsys):
    """The runner's own parser (python -m benchmarks) carries the checks; they had been patched
    onto molrg bench's copy only."""
    from molrg_ext.bench import main as bench_main
    argv = [a.replace("{dir}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as e:
        bench_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err and msg in err and "Traceback" not in err
