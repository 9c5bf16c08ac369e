"""The network experiments run end to end at tiny sizes, write their files and resume."""
import contextlib
import csv
import json
import os

import numpy as np
import pytest
import torch

from molrg_ext import cli
from molrg_ext.datasets_offline import camera_patches, digits_images
from molrg_ext.experiments.gl_score import crossing


def _json(path):
    with open(path) as f:
        return json.load(f)


def _text(path):
    with open(path) as f:
        return f.read()


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def test_offline_datasets():
    pytest.importorskip("skimage")  # camera_patches (the images extra)
    d = digits_images()
    assert d.shape == (1797, 1, 8, 8) and d.min() == -1 and d.max() == 1
    p = camera_patches(50, size=8, seed=1)
    assert p.shape == (50, 1, 8, 8) and p.min() >= -1 and p.max() <= 1
    torch.testing.assert_close(p, camera_patches(50, size=8, seed=1))
    with pytest.raises(ValueError, match="size"):
        camera_patches(5, size=10_000)
    with pytest.raises(TypeError, match="N must be an int"):
        camera_patches(2.7)
    with pytest.raises(ValueError, match="no sample image 'data_dir'"):
        camera_patches(3, image="data_dir")
    # binary_blobs draws its image: seeded, the patches repeat
    torch.testing.assert_close(camera_patches(5, image="binary_blobs", seed=3),
                               camera_patches(5, image="binary_blobs", seed=3))


def test_crossing_interpolates_on_log_scale():
    assert crossing([1, 10, 100], [0.0, 0.5, 1.0])["ratio"] == pytest.approx(10.0)
    assert crossing([1, 100], [0.0, 1.0]) == {"ratio": pytest.approx(10.0), "status": "crossed"}
    assert crossing([1, 10], [0.1, 0.2]) == {"ratio": None, "status": "never"}
    # already above the level at the smallest ratio: the crossing is not located
    assert crossing([4, 2], [0.9, 0.6]) == {"ratio": None, "status": "at_or_below_smallest",
                                            "smallest_ratio": 2.0}


def test_rank_vs_snr_cli(tmp_path):
    pytest.importorskip("skimage")  # its default dataset is camera patches (the images extra)
    out = str(tmp_path / "rank")
    args = ["rank-vs-snr", "--out", out, "--checkpoints", "3", "--noises", "2", "--real-steps", "2",
            "--channels", "8", "--no-progress"]
    assert cli.main(args) == 0
    res = _json(os.path.join(out, "rank_vs_snr.json"))
    dae = res["subspace_dae"]
    assert len(dae["sigma"]) == 18
    # Lemma 2 for the exact subspace DAE: 6 <= rank <= 12, D = 12 at high noise, d = 6 at low noise
    assert min(dae["rank_mean"]) >= 6 and max(dae["rank_mean"]) <= 12
    assert dae["rank_mean"][0] == 12 and dae["rank_mean"][-1] == 6
    net = res["unet_molrg@3"]
    assert net["kimg"] == pytest.approx(3 * 64 / 1000) and all(0 < r <= 1 for r in net["ratio_mean"])
    assert {"unet_digits@2", "unet_patches@2"} <= set(res)
    for f in ("rank_vs_snr.csv", "rank_vs_snr.png", "ckpt/unet_molrg.pt"):
        assert os.path.exists(os.path.join(out, f))
    # rerun with one more checkpoint: the first is reused, training resumes from step 3
    before = os.path.getmtime(os.path.join(out, "ckpt", "unet_digits.pt"))
    assert cli.main(args[:4] + ["3", "5"] + args[5:]) == 0
    res2 = _json(os.path.join(out, "rank_vs_snr.json"))
    assert res2["unet_molrg@3"] == net and res2["unet_molrg@5"]["kimg"] == pytest.approx(0.32)
    assert len(res2["unet_molrg:grad_norm"]) == 5
    assert os.path.getmtime(os.path.join(out, "ckpt", "unet_digits.pt")) == before


def test_gl_score_cli(tmp_path):
    out = str(tmp_path / "gl")
    args = ["gl-score", "--out", out, "--dims", "3", "--ratios", "2", "8", "--steps", "5",
            "--gen", "30", "--channels", "8", "--model", "mlp", "--no-progress"]
    assert cli.main(args) == 0
    res = _json(os.path.join(out, "gl_score.json"))
    cells = res["cells"]
    assert len(cells) == 2
    for c in cells.values():
        assert c["gl"] > 0 and np.isfinite(c["gl"]) and c["N_k"] in (6, 24)
    assert os.path.exists(os.path.join(out, "gl_score.png"))
    assert cli.main(args) == 0  # resumes: nothing recomputed, same numbers
    assert _json(os.path.join(out, "gl_score.json"))["cells"] == cells


def test_edit_cli(tmp_path):
    """Section 4.2 at a tiny size (100 training steps of a width-8 U-Net, four images, sigma = 1):
    moving x_t by alpha along the Jacobian's right singular vector v_i changes the denoiser output
    by ~|alpha| sigma_i (first order), more than the same step along a random unit direction.
    The first-order and |alpha| = 6 checks are on the first image (they held on 60 seeds; their
    worst over four images did not). The v1-vs-random check is on the mean over the four images:
    with one image and one random direction the ratio came within 0.02 of the 1.2 limit on 5 of
    20 seeds and under it on 1 of 60; the mean over four images stayed >= 1.257 on 20 seeds.
    Measured (seed 0; the first image's numbers are those of a one-image run): sv = [0.4696,
    0.4414]; change along v1 0.4679 / 0.4686 at alpha = -1 / 1 (0.4459 / 0.4362 along v2), 2.646 /
    2.610 at alpha = -6 / 6 (0.94 / 0.93 of 6 sv1); random 0.311 / 0.306 and 1.949 / 1.876;
    v1 / random over the four images 1.32-1.53, their mean 1.34-1.48 by alpha."""
    out = str(tmp_path / "edit")
    alphas = [-6.0, -1.0, 0.0, 1.0, 6.0]
    assert cli.main(["edit", "--out", out, "--steps", "100", "--channels", "8", "--images", "4",
                     "--directions", "1", "2", "--alphas", *map(str, alphas),
                     "--no-progress"]) == 0
    res = _json(os.path.join(out, "edit.json"))
    images, svs = res["images"], res["top_singular_values"]
    assert len(images) == len(svs) == 4
    assert all(len(sv) == 2 and sv[0] >= sv[1] > 0 for sv in svs)
    rows = res["rows"]
    assert len(rows) == 4 * 3 * 5  # images x (2 singular directions + random) x 5 alphas
    change = {(r["image"], r["direction"], r["alpha"]): r["denoiser_change"] for r in rows}
    assert all(change[(im, d, 0.0)] == pytest.approx(0, abs=1e-5)
               for im in images for d in ("v1", "v2", "random"))
    im0, sv = images[0], svs[0]
    for i, name in enumerate(("v1", "v2")):
        for a in (-1.0, 1.0):  # first order: ||J v_i|| = sigma_i (within 3%; measured <= 1.2%)
            assert change[(im0, name, a)] == pytest.approx(sv[i], rel=0.03), (name, a, change, sv)
    for a in (-6.0, 6.0):  # |alpha| = 6: still ~|alpha| sigma_1 (within 15%; measured 6-7%)
        assert change[(im0, "v1", a)] == pytest.approx(6 * sv[0], rel=0.15), (a, change, sv)
    for a in (-6.0, -1.0, 1.0, 6.0):  # the top singular direction beats a random one
        ratio = np.mean([change[(im, "v1", a)] / change[(im, "random", a)] for im in images])
        assert ratio > 1.2, (a, ratio, change)
    summary = res["mean_denoiser_change_at_max_alpha"]
    assert summary["v1"] == pytest.approx(np.mean([change[(im, "v1", a)] for im in images
                                                   for a in (-6.0, 6.0)]))
    assert summary["v1"] > 1.2 * summary["random"]
    assert os.path.exists(os.path.join(out, "edit.png"))


def test_x0_mlp_memorises_few_samples_and_generalises_with_many():
    """Fig. 5(a) at a tiny size (the medium preset's model, fewer steps): with N_k = d_k the
    generated samples collapse onto the training points (GL near 0); with N_k = 40 d_k they spread
    like fresh MoLRG samples. Both lie on the true subspaces. With EDM's preconditioning the same
    short training leaves off-subspace noise of ~1.3 and GL ~ 3 at both ratios."""
    from molrg_ext.experiments.gl_score import run_cell

    torch.set_num_threads(1)
    cfg = dict(steps=1500, batch=64, lr=1e-3, gen=300, channels=32, precond="x0", weighting="none")
    low = run_cell(3, 1, cfg, "mlp", seed=3000)
    high = run_cell(3, 40, cfg, "mlp", seed=3000)
    assert low["gl"] < 0.15 and high["gl"] > 0.5 and high["gl"] - low["gl"] > 0.4
    # memorisation: samples sit on training points, far closer than fresh data does
    assert low["median_nn_to_train_gen"] < 0.2 * low["median_nn_to_train_ref"]
    # samples are on the subspaces (data norm ~ sqrt(3) = 1.7)
    assert low["median_off_subspace_gen"] < 0.1 and high["median_off_subspace_gen"] < 0.1


def test_x0_mlp_rank_follows_subspace_dae():
    """Fig. 3(b) at a tiny size: the x0-predicting MLP's Jacobian rank ratio along the Heun
    trajectory is low (d / n = 0.125 for the subspace DAE) at high SNR and close to the subspace
    DAE's curve overall. 16 trajectories and bounds from 50 data/training seeds: with 4
    trajectories and limits net_high < 0.17, drop > 0.05 it failed on 5 of 20 seeds (net_high up
    to 0.214); with 16 the 50 seeds gave net_high 0.134-0.184 (still far under D / n = 0.25),
    mid 0.025-0.056, all 0.021-0.039 and drop 0.047-0.098 (means 0.152, 0.037, 0.030, 0.073);
    each bound sits 3.3 or more standard deviations past its mean."""
    from molrg_ext.data import sample_molrg
    from molrg_ext.experiments.rank_vs_snr import dae_gap, rank_curve
    from molrg_ext.models import make_mlp_denoiser
    from molrg_ext.modules import SubspaceDAE
    from molrg_ext.train import NetworkTrainer

    torch.set_num_threads(1)
    molrg = sample_molrg(48, [6, 6], N=1000, seed=0)
    X = molrg.X[0]
    noise = torch.randn(16, 48, generator=torch.Generator().manual_seed(1))
    dae = rank_curve(SubspaceDAE(48, molrg.dims, U=molrg.bases[0].double(), dtype=torch.float64),
                     noise.double(), "analytic")
    torch.manual_seed(0)
    model = make_mlp_denoiser(48, hidden=256, sigma_data=float(X.std()), precond="x0")
    tr = NetworkTrainer(model, X, batch_size=64, lr=1e-3, ema_decay=0.99, seed=0, weighting="none")
    tr.train(1000)
    net = rank_curve(tr.ema, noise, "jacrev")
    gap = dae_gap(net, dae)
    assert gap["dae_high_snr"] == pytest.approx(6 / 48)
    # (a width-128 MLP still has rank/n = 0.25 at every level after 1000 steps: too little)
    assert gap["net_high_snr"] < 0.2 and gap["mid"] < 0.07 and gap["all"] < 0.06, gap
    # the DAE rank drops from D = 12 to d = 6 as the SNR grows; the network's does too
    assert np.mean(net["ratio_mean"][:5]) > np.mean(net["ratio_mean"][-5:]) + 0.035, net


def _curve_fields(v):
    return {k: x for k, x in v.items() if k != "seconds"}


def test_rank_vs_snr_rerun_settings_and_earlier_checkpoints(tmp_path, capsys):
    """A rerun into the same --out with another seed is refused (exit 2, the difference named)
    instead of labelling the old curves with the new seed; --fresh starts over. A checkpoint
    earlier than the saved network's step is trained again from scratch: it equals an
    uninterrupted run's, and the CSV lists the curves in step order either way."""
    base = ["--noises", "2", "--real-steps", "0", "--channels", "4", "--no-progress"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert cli.main(["rank-vs-snr", "--out", a, "--checkpoints", "6", *base]) == 0
    with pytest.raises(SystemExit) as e:
        cli.main(["rank-vs-snr", "--out", a, "--checkpoints", "6", "--seed", "1", *base])
    assert e.value.code == 2 and "seed: 0 -> 1" in capsys.readouterr().err
    assert cli.main(["rank-vs-snr", "--out", a, "--checkpoints", "3", "6", *base]) == 0
    assert cli.main(["rank-vs-snr", "--out", b, "--checkpoints", "3", "6", *base]) == 0
    ra, rb = (_json(os.path.join(d, "rank_vs_snr.json")) for d in (a, b))
    for k in ("unet_molrg@3", "unet_molrg@6"):
        assert _curve_fields(ra[k]) == _curve_fields(rb[k]), k
    assert ra["unet_molrg:grad_norm"] == rb["unet_molrg:grad_norm"] and len(rb["unet_molrg:grad_norm"]) == 6
    csv_a, csv_b = (_text(os.path.join(d, "rank_vs_snr.csv")) for d in (a, b))
    assert csv_a == csv_b
    # the CSV shows the checkpoints asked for; the JSON keeps the others
    assert cli.main(["rank-vs-snr", "--out", a, "--checkpoints", "6", *base]) == 0
    assert "unet_molrg@3," not in _text(os.path.join(a, "rank_vs_snr.csv"))
    assert "unet_molrg@3" in _json(os.path.join(a, "rank_vs_snr.json"))
    assert cli.main(["rank-vs-snr", "--out", a, "--checkpoints", "6", "--seed", "1", "--fresh",
                     *base]) == 0
    ra = _json(os.path.join(a, "rank_vs_snr.json"))
    assert ra["config"]["seed"] == 1 and "unet_molrg@3" not in ra
    assert _curve_fields(ra["unet_molrg@6"]) != _curve_fields(rb["unet_molrg@6"])


def test_gl_score_ratios_with_the_same_n_k_are_one_cell(tmp_path, capsys):
    """--ratios 0.1 0.3 0.5 with d_k = 3: 0.1 and 0.3 both give N_k = 1 (the same cell, same GL)
    and were plotted and printed as two ratios; 0.5 gives N_k = 2 (2/3, not 0.5). Now the cell
    is computed once, and the CSV, crossing and printout use the realised N_k / d_k."""
    out = str(tmp_path / "gl")
    args = ["gl-score", "--out", out, "--dims", "3", "--ratios", "0.1", "0.3", "0.5", "--steps",
            "5", "--gen", "8", "--channels", "4", "--model", "mlp", "--no-progress"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "N_k/d_k = 0.3 gives N_k = 1, as 0.1 does; computed once" in text
    assert "d_k=3 N_k=2 N_k/d_k=0.6667 (asked 0.5)" in text
    cells = _json(os.path.join(out, "gl_score.json"))["cells"]
    assert sorted(c["N_k"] for c in cells.values()) == [1, 2]
    with open(os.path.join(out, "gl_score.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["N_k_over_d_k"]) for r in rows] == pytest.approx([1 / 3, 2 / 3])


def test_gl_score_cells_are_keyed_by_seed(tmp_path):
    out = str(tmp_path / "gl")
    args = ["gl-score", "--out", out, "--dims", "3", "--ratios", "2", "--steps", "5", "--gen",
            "8", "--channels", "4", "--model", "mlp", "--no-progress"]
    assert cli.main(args) == 0
    assert cli.main(args + ["--seed", "1"]) == 0
    cells = _json(os.path.join(out, "gl_score.json"))["cells"]
    assert len(cells) == 2 and len({c["gl"] for c in cells.values()}) == 2


def test_edit_sample_change_is_from_the_unedited_sample(tmp_path):
    """sample_change was ||sample(alpha) - sample(0)|| when --alphas held 0 and ||sample(alpha) -
    x_0|| when it did not (1.8126 against 1.8335 for the same edit), under one column name. It is
    now from the unedited sample either way."""
    base = ["edit", "--steps", "5", "--channels", "4", "--images", "1", "--directions", "1",
            "--no-progress"]
    got = []
    for name, alphas in (("with0", ["-3", "0", "3"]), ("without0", ["-3", "3"])):
        out = str(tmp_path / name)
        assert cli.main(base + ["--out", out, "--alphas", *alphas]) == 0
        rows = _json(os.path.join(out, "edit.json"))["rows"]
        got.append({(r["direction"], r["alpha"]): r["sample_change"] for r in rows})
    for key, v in got[1].items():
        assert v == pytest.approx(got[0][key], rel=1e-4, abs=1e-6), key
    assert all(got[0][(d, 0.0)] == 0 for d in ("v1", "random"))


def test_edit_refuses_a_model_of_other_settings(tmp_path, capsys):
    out = str(tmp_path / "edit")
    args = ["edit", "--out", out, "--channels", "4", "--images", "1", "--directions", "1",
            "--alphas", "0", "1", "--no-progress"]
    assert cli.main(args + ["--steps", "10"]) == 0
    with pytest.raises(SystemExit) as e:
        cli.main(args + ["--steps", "5"])
    assert e.value.code == 2 and "steps: 10 -> 5" in capsys.readouterr().err
    _write(os.path.join(out, "mine.txt"), "not the command's")
    assert cli.main(args + ["--steps", "5", "--fresh"]) == 0
    assert os.path.exists(os.path.join(out, "mine.txt"))  # --fresh deletes only its own files
    assert _json(os.path.join(out, "edit.settings.json"))["steps"] == 5


def test_commands_sharing_an_out_keep_their_own_settings_and_files(tmp_path):
    """rank-vs-snr and edit in one --out: neither refuses because of the other, and --fresh on
    one deletes only its own files (they had shared settings.json and ckpt/)."""
    out = str(tmp_path / "shared")
    rank = ["rank-vs-snr", "--out", out, "--checkpoints", "2", "--noises", "2", "--real-steps",
            "0", "--channels", "4", "--no-progress"]
    edit = ["edit", "--out", out, "--steps", "3", "--channels", "4", "--images", "1",
            "--directions", "1", "--alphas", "0", "1", "--no-progress"]
    assert cli.main(rank) == 0 and cli.main(edit) == 0
    assert cli.main(edit + ["--fresh"]) == 0
    assert os.path.exists(os.path.join(out, "ckpt", "unet_molrg.pt"))
    assert os.path.exists(os.path.join(out, "rank-vs-snr.settings.json"))
    assert cli.main(rank) == 0  # still its own settings: accepted, nothing recomputed


@pytest.mark.parametrize("argv, option", [
    (["rank-vs-snr", "--noises", "0"], "--noises"),
    (["rank-vs-snr", "--real-steps", "-5"], "--real-steps"),
    (["rank-vs-snr", "--threads", "-3"], "--threads"),
    (["gl-score", "--ratios", "inf"], "--ratios"),
    (["gl-score", "--ratios", "nan"], "--ratios"),
    (["edit", "--steps", "-5"], "--steps"),
    (["edit", "--alphas", "nan"], "--alphas"),
    (["edit", "--sigma", "0"], "--sigma"),
    (["hidden-gaussian", "--steps", "0"], "--steps"),
    (["hidden-gaussian", "--datasets", ","], "--datasets"),
    (["hidden-gaussian", "--digits-d", "100"], "--digits-d"),
    (["hidden-gaussian", "--sizes", "0"], "--sizes"),
    (["phase-transition", "--instances", "0"], "--instances"),
    (["phase-transition", "--noise", "-1"], "--noise"),
    (["demo", "--K", "-1"], "--K"),
    (["demo", "--Nk", "0"], "--Nk"),
    (["bench", "--threads", "-2"], "--threads"),
    (["bench", "--shapes=-8,1,2,4"], "--shapes"),
    (["bench", "--repeats", "0"], "--repeats"),
])
def test_bad_values_are_usage_errors_naming_the_option(argv, option, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and option in err[-1], err


def test_a_corrupt_results_file_is_moved_aside_and_recomputed(tmp_path):
    out = str(tmp_path / "gl")
    args = ["gl-score", "--out", out, "--dims", "3", "--ratios", "2", "--steps", "5", "--gen",
            "8", "--channels", "4", "--model", "mlp", "--no-progress"]
    assert cli.main(args) == 0
    path = os.path.join(out, "gl_score.json")
    cells = _json(path)["cells"]
    text = _text(path)
    _write(path, text[: len(text) // 2])
    with pytest.warns(RuntimeWarning, match="not valid JSON"):
        assert cli.main(args) == 0
    again = _json(path)["cells"]
    assert {k: _curve_fields(v) for k, v in again.items()} == {
        k: _curve_fields(v) for k, v in cells.items()}  # recomputed: the same but for the timing
    assert os.path.exists(path + ".corrupt")


def test_rank_vs_snr_old_folder_without_settings(tmp_path, capsys):
    """A folder of an older version (no settings file): the results' config stands in for it,
    and networks whose config cannot be read (results moved aside as corrupt) are refused every
    time, not once."""
    out = str(tmp_path / "old")
    args = ["rank-vs-snr", "--out", out, "--checkpoints", "2", "--noises", "2", "--real-steps",
            "0", "--channels", "4", "--no-progress"]
    assert cli.main(args) == 0
    os.remove(os.path.join(out, "rank-vs-snr.settings.json"))
    assert cli.main(args) == 0  # same settings as the results' config: accepted
    os.remove(os.path.join(out, "rank-vs-snr.settings.json"))
    _write(os.path.join(out, "rank_vs_snr.json"), "{")
    for _ in range(2):
        with pytest.raises(SystemExit) as e:
            with pytest.warns(RuntimeWarning) if _ == 0 else contextlib.nullcontext():
                cli.main(args + ["--seed", "1"])
        assert e.value.code == 2
    assert "--fresh" in capsys.readouterr().err
