import json
import warnings

import pytest
import torch

from molrg_ext import cli
from molrg_ext.experiments.phase_transition import parse_range, run_cell


@pytest.fixture(autouse=True)
def restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_cli_tiny_grid_writes_outputs_and_resumes(tmp_path, capsys):
    argv = ["phase-transition", "--K", "1", "--method", "svd", "--d", "2:3", "--N", "1:4",
            "--instances", "4", "--out", str(tmp_path), "--total"]
    assert cli.main(argv) == 0
    for name in ("K1_svd.csv", "K1_svd.png", "K1_svd_total.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0
    cells = sorted((tmp_path / "cells").glob("*.json"))
    assert len(cells) == 8
    for f in cells:
        rec = json.loads(f.read_text())
        # noise-free K = 1: SVD recovers every instance iff N >= d (Theorem 1 / 2)
        assert rec["success_rate"] == (1.0 if rec["N_k"] >= rec["d"] else 0.0), rec
    assert json.loads((tmp_path / "summary.json").read_text())["K1_svd"]["computed_cells"] == 8
    mtimes = {f: f.stat().st_mtime_ns for f in cells}
    assert cli.main(argv) == 0  # resume: nothing recomputed
    assert json.loads((tmp_path / "summary.json").read_text())["K1_svd"]["computed_cells"] == 0
    assert {f: f.stat().st_mtime_ns for f in cells} == mtimes
    rows = (tmp_path / "K1_svd.csv").read_text().strip().splitlines()
    assert len(rows) == 9 and rows[0].startswith("K,method,d,N_k,success_rate")


def test_changed_settings_recompute(tmp_path):
    base = ["phase-transition", "--K", "1", "--d", "2", "--N", "2", "--instances", "2",
            "--out", str(tmp_path)]
    cli.main(base)
    cli.main(base[:-4] + ["--instances", "3", "--out", str(tmp_path)])
    rec = json.loads((tmp_path / "cells" / "K1_svd_d2_N2.json").read_text())
    assert rec["instances"] == 3 and len(rec["distances"]) == 3


def test_sgd_quick_agrees_with_svd_on_small_cells():
    torch.set_num_threads(1)
    for d, N in ((2, 6), (3, 2)):
        svd = run_cell(1, "svd", d, N, 5, 0.0, "quick", None, 0)
        sgd = run_cell(1, "sgd-hard", d, N, 5, 0.0, "quick", None, 0)
        assert abs(svd["success_rate"] - sgd["success_rate"]) <= 0.2, (d, N, svd, sgd)


def test_kss_cell_k2():
    torch.set_num_threads(1)
    assert run_cell(2, "kss", 3, 8, 5, 0.0, "quick", None, 0)["success_rate"] >= 0.8
    assert run_cell(2, "kss", 4, 2, 5, 0.0, "quick", None, 0)["success_rate"] == 0.0


def test_ensc_cells_record_isolated_samples_without_warning():
    """At N_k = 2, d = 3 the 4 samples in n = 48 are nearly orthogonal, and in 3 of these 20
    instances EnSC leaves 2 of them without a coefficient; at N_k = 8 every sample has edges and
    the cell succeeds."""
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        low = run_cell(2, "ensc", 3, 2, 20, 0.0, "quick", None, 0)
        high = run_cell(2, "ensc", 3, 8, 4, 0.0, "quick", None, 0)
    assert len(low["isolated_samples"]) == 20 and sum(low["isolated_samples"]) > 0
    assert low["success_rate"] == 0.0
    assert high["isolated_samples"] == [0, 0, 0, 0] and high["success_rate"] >= 0.75
    assert "isolated_samples" not in run_cell(2, "kss", 3, 8, 2, 0.0, "quick", None, 0)


def test_cell_files_that_are_not_cells_are_recomputed(tmp_path):
    """A cell file that is valid JSON but not a cell record (written by hand: a list, or a dict
    without the results) stopped the rerun with an AttributeError; it is recomputed now."""
    args = ["phase-transition", "--K", "1", "--method", "svd", "--d", "2", "--N", "2:3",
            "--instances", "2", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    good = json.loads((tmp_path / "cells" / "K1_svd_d2_N3.json").read_text())
    (tmp_path / "cells" / "K1_svd_d2_N2.json").write_text("[1, 2]")
    bad = dict(good)
    del bad["success_rate"]
    (tmp_path / "cells" / "K1_svd_d2_N3.json").write_text(json.dumps(bad))
    assert cli.main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["K1_svd"]["computed_cells"] == 2 and summary["K1_svd"]["cells"] == 2
    rec = json.loads((tmp_path / "cells" / "K1_svd_d2_N3.json").read_text())
    assert rec["success_rate"] == good["success_rate"]
    assert cli.main(args) == 0  # nothing left to compute
    assert json.loads((tmp_path / "summary.json").read_text())["K1_svd"]["computed_cells"] == 0


def test_interrupted_command_says_how_to_resume(monkeypatch, capsys):
    """Ctrl-C printed a KeyboardInterrupt traceback; now one line and exit status 130, saying
    whether a rerun resumes."""
    from molrg_ext.experiments import demo, phase_transition

    def stop(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(phase_transition, "run", stop)
    assert cli.main(["phase-transition", "--K", "1", "--d", "2", "--N", "2"]) == 130
    assert "molrg phase-transition: interrupted; run the same command again to resume" in \
        capsys.readouterr().err
    monkeypatch.setattr(demo, "run", stop)
    assert cli.main(["demo"]) == 130
    err = capsys.readouterr().err
    assert "molrg demo: interrupted" in err and "resume" not in err


def test_bad_arguments():
    assert parse_range("2:8") == list(range(2, 9))
    assert parse_range("2:8:3") == [2, 5, 8] and parse_range("3,5") == [3, 5]
    import argparse

    for bad in ("a:b", "0:3", "2:8:0", "1:2:3:4"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_range(bad)
    with pytest.raises(SystemExit):
        cli.main(["phase-transition", "--K", "2", "--method", "svd", "--d", "2", "--N", "2"])
    with pytest.raises(SystemExit):
        cli.main(["phase-transition", "--method", "pca"])


def test_cli_all_produces_every_panel_of_fig4_and_fig8(tmp_path):
    argv = ["phase-transition", "--all", "--d", "3", "--N", "1,6", "--instances", "3",
            "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    panels = {"K1_svd", "K1_sgd-hard", "K2_kss", "K2_sgd-hard", "K3_kss", "K3_sgd-hard"}
    assert set(summary) == panels
    for name in panels:
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    # baselines (exact solvers of (12) / (18)): fail at N_k = 1 < d, succeed at N_k = 2d
    for name in ("K1_svd", "K2_kss", "K3_kss"):
        rows = {int(r.split(",")[3]): float(r.split(",")[4])
                for r in (tmp_path / f"{name}.csv").read_text().strip().splitlines()[1:]}
        assert rows[1] == 0.0 and rows[6] == 1.0, (name, rows)


def test_heatmap_of_a_grid_with_gaps_draws_only_measured_cells(tmp_path):
    """--d 2,6: the figure has one cell per integer d in [2, 6]; d = 3, 4, 5 were not measured
    and are masked (drawn in the 'bad' colour), not painted with d = 2's or d = 6's rate."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from molrg_ext.experiments import phase_transition as pt

    shown = {}
    real_savefig = plt.Figure.savefig

    def capture(fig, *a, **k):
        shown["grid"] = fig.axes[0].images[0].get_array()
        return real_savefig(fig, *a, **k)

    plt.Figure.savefig = capture
    try:
        res = {(d, N): {"success_rate": 1.0 if d == 2 else 0.25} for d in (2, 6) for N in (2, 3, 12)}
        pt.plot_heatmap(tmp_path, 1, "svd", [2, 6], [2, 3, 12], res)
    finally:
        plt.Figure.savefig = real_savefig
    g = shown["grid"]
    assert g.shape == (5, 11)
    assert not g.mask[0, 0] and g[0, 0] == 1.0 and not g.mask[4, 10] and g[4, 10] == 0.25
    assert g.mask[1:4].all() and g.mask[:, 2:10].all()  # d = 3..5 and N_k = 4..11: not measured
    assert parse_range("5,3,5") == [3, 5]


def test_plots_leave_the_callers_matplotlib_alone(tmp_path):
    """The figures are made without pyplot: the caller's backend (matplotlib.use("Agg") used to
    switch a notebook's) and pyplot's list of open figures stay as they were."""
    import matplotlib
    from matplotlib import pyplot as plt
    from molrg_ext.experiments import phase_transition as pt

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        figs = plt.get_fignums()
        res = {(d, N): {"success_rate": 0.5} for d in (2, 3) for N in (2, 3)}
        pt.plot_heatmap(tmp_path, 2, "svd", [2, 3], [2, 3], res)
        pt._plot_total(tmp_path, 2, "svd", [2, 3], [2, 3], res)
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == figs
    finally:
        matplotlib.use(before)
    for name in ("K2_svd.png", "K2_svd_total.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
