"""Smoke test of ``molrg hidden-gaussian``: tiny settings, outputs written, resume skips work."""
import json
import os

from molrg_ext.cli import main


def test_cli_writes_outputs_and_resumes(tmp_path, capsys):
    out = str(tmp_path / "hg")
    argv = ["hidden-gaussian", "--out", out, "--datasets", "molrg,digits", "--sizes", "8",
            "--steps", "3", "--hidden", "16"]
    assert main(argv) == 0
    with open(os.path.join(out, "hidden_gaussian.json")) as f:
        res = json.load(f)
    assert len(res) == 2
    for r in res:
        assert len(r["sigma"]) == 10 and len(r["linearity"]) == 10
        # the multi-delta denoiser is the training mean at sigma = 80 and (nearly) linear there
        assert r["linearity_optimal"][0] > 0.99
        assert all(v >= 0 for v in r["rmse_gaussian"] + r["rmse_optimal"] + r["rmse_posterior"])
    assert os.path.getsize(os.path.join(out, "hidden_gaussian.png")) > 1000
    capsys.readouterr()
    assert main(argv) == 0
    assert "2 finished runs found" in capsys.readouterr().out
