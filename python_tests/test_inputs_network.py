"""Bad inputs to NetworkTrainer: checkpoint paths and files, data against the model, and integer
arguments; each is an error naming the argument, and no user file or directory is moved."""
import builtins
import os
import pathlib

import pytest
import torch

from molrg_ext.models import make_mlp_denoiser
from molrg_ext.train import NetworkTrainer


def _data(N=16, n=4):
    return torch.randn(N, n, generator=torch.Generator().manual_seed(0))


def _trainer(**kw):
    torch.manual_seed(0)
    return NetworkTrainer(make_mlp_denoiser(4, hidden=8, depth=1), _data(), batch_size=4, **kw)


def test_checkpoint_directory_is_refused_and_left_alone(tmp_path):
    d = tmp_path / "run"
    (d / "keep").mkdir(parents=True)
    (d / "keep" / "f.txt").write_text("user data")
    for ckpt in (str(d), d):
        with pytest.raises(ValueError, match=r"NetworkTrainer: checkpoint must be a checkpoint "
                                             r"file .*which is a directory"):
            _trainer(checkpoint=ckpt)
    assert (d / "keep" / "f.txt").read_text() == "user data"
    assert sorted(os.listdir(tmp_path)) == ["run"]


@pytest.mark.parametrize("ckpt", [1, 12345, b"ckpt.pt", 2.5])
def test_checkpoint_must_be_a_path(ckpt):
    with pytest.raises(TypeError, match="NetworkTrainer: checkpoint must be a str or os.PathLike"):
        _trainer(checkpoint=ckpt)


def test_checkpoint_that_cannot_be_opened_is_not_moved(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt.pt"
    _trainer(checkpoint=str(ckpt)).train(1)
    raw = ckpt.read_bytes()

    real_open = builtins.open

    def denied(file, *a, **k):  # the tests run as root, so chmod 000 would not stop a read
        if os.fspath(file) == str(ckpt):
            raise PermissionError(13, "Permission denied", str(ckpt))
        return real_open(file, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", denied)
        with pytest.raises(PermissionError, match="Permission denied"):
            _trainer(checkpoint=str(ckpt))
    assert ckpt.read_bytes() == raw and sorted(os.listdir(tmp_path)) == ["ckpt.pt"]
    assert _trainer(checkpoint=str(ckpt)).step == 1


@pytest.mark.parametrize("obj, msg", [
    ({"foo": 1}, r"not a NetworkTrainer checkpoint: missing \['model'"),
    ([1, 2], r"not a NetworkTrainer checkpoint \(a dict\), got list"),
    ("text", r"not a NetworkTrainer checkpoint \(a dict\), got str"),
])
def test_readable_file_that_is_not_a_checkpoint_is_a_value_error(tmp_path, obj, msg):
    ckpt = tmp_path / "weights.pt"
    torch.save(obj, ckpt)
    raw = ckpt.read_bytes()
    with pytest.raises(ValueError, match=f"NetworkTrainer: checkpoint '{ckpt}' is {msg}"):
        _trainer(checkpoint=str(ckpt))
    assert ckpt.read_bytes() == raw and sorted(os.listdir(tmp_path)) == ["weights.pt"]


def test_checkpoint_with_wrong_field_types_is_a_value_error(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    tr = _trainer()
    for key, bad in (("step", "3"), ("step", -1), ("history", [1.0]), ("generator", 0)):
        state = tr.state_dict()
        state[key] = bad
        torch.save(state, ckpt)
        with pytest.raises(ValueError, match="step, generator or history has the wrong type"):
            _trainer(checkpoint=str(ckpt))
        with pytest.raises(ValueError, match="NetworkTrainer.load_state_dict: state is not"):
            tr.load_state_dict(state)
    assert tr.step == 0 and tr.history["loss"] == []


def test_corrupt_checkpoint_given_as_pathlib_is_moved_aside(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.warns(RuntimeWarning, match="could not be read"):
        tr = _trainer(checkpoint=ckpt)
    assert tr.step == 0 and not ckpt.exists()
    assert (tmp_path / "ckpt.pt.corrupt").read_bytes() == b"not a checkpoint"
    # torch.load of a truncated checkpoint file raises OSError (EINVAL) at most cut points, or
    # RuntimeError, EOFError: each is a corrupt file, not a file-system error
    tr.train(1)
    tr.save(str(ckpt))
    raw = ckpt.read_bytes()
    for cut in (0, 100, len(raw) // 3, len(raw) // 2, len(raw) - 10):
        ckpt.write_bytes(raw[:cut])
        with pytest.warns(RuntimeWarning, match="could not be read"):
            assert _trainer(checkpoint=ckpt).step == 0
        assert not ckpt.exists() and (tmp_path / "ckpt.pt.corrupt").read_bytes() == raw[:cut]


def test_save_to_a_directory_is_refused_and_leaves_no_tmp(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    tr = _trainer()
    tr.train(1)
    with pytest.raises(ValueError, match=r"NetworkTrainer.save: path must be a checkpoint file "
                                         r".*which is a directory"):
        tr.save(str(d))
    tr.checkpoint = str(d)  # the experiments set the path after construction
    with pytest.raises(ValueError, match="NetworkTrainer.save: checkpoint must be a checkpoint file"):
        tr.save()
    with pytest.raises(TypeError, match="NetworkTrainer.save: path must be a str or os.PathLike"):
        tr.save(7)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(d) == []


def test_failed_save_removes_its_tmp_file(tmp_path, monkeypatch):
    tr = _trainer()

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", fail)
        with pytest.raises(OSError, match="No space left"):
            tr.save(str(tmp_path / "ckpt.pt"))
    assert os.listdir(tmp_path) == []
    assert tr.save(tmp_path / "ckpt.pt") == tmp_path / "ckpt.pt"  # a valid save still works
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_load_bad_paths_and_files(tmp_path):
    tr = _trainer()
    with pytest.raises(TypeError, match="NetworkTrainer.load: path must be a str or os.PathLike"):
        tr.load(None)
    with pytest.raises(ValueError, match="NetworkTrainer.load: path must be .*which is a directory"):
        tr.load(tmp_path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    with pytest.raises(ValueError, match=f"NetworkTrainer.load: path '{junk}' could not be read"):
        tr.load(junk)
    torch.save({"foo": 1}, tmp_path / "d.pt")
    with pytest.raises(ValueError, match="NetworkTrainer.load: path .* is not a NetworkTrainer"):
        tr.load(str(tmp_path / "d.pt"))
    assert junk.read_bytes() == b"junk"  # load never moves a file
    # a real checkpoint loads, from a str or a pathlib.Path
    tr.train(2)
    tr.save(tmp_path / "ok.pt")
    other = _trainer()
    other.load(pathlib.Path(tmp_path / "ok.pt"))
    assert other.step == 2 and other.history["loss"] == tr.history["loss"]


def test_data_dtype_must_match_the_model():
    model = make_mlp_denoiser(4, hidden=8, depth=1)
    with pytest.raises(TypeError, match="NetworkTrainer: data has dtype torch.float64 but model's "
                                        "parameters have dtype torch.float32"):
        NetworkTrainer(model, _data().double(), batch_size=4)
    tr = NetworkTrainer(model.double(), _data().double(), batch_size=4, seed=0)
    assert len(tr.train(2)["loss"]) == 2 and all(p.dtype == torch.float64 for p in tr.ema.parameters())


@pytest.mark.parametrize("seed", [2**64, 2**70, -2**63 - 1])
def test_seed_out_of_generator_range(seed):
    with pytest.raises(ValueError, match=r"NetworkTrainer: seed must be in \[-9223372036854775808, "
                                         r"18446744073709551616\)"):
        _trainer(seed=seed)


def test_seed_range_edges_still_seed_as_before():
    # negative seeds worked before (the experiments pass --seed through); torch maps them mod 2^64
    assert _trainer(seed=-1).generator.initial_seed() == 2**64 - 1
    assert _trainer(seed=2**64 - 1).generator.initial_seed() == 2**64 - 1
    with pytest.raises(ValueError, match="NetworkTrainer: seed"):
        _trainer(seed=2**64)


def test_batch_size_bound():
    m = make_mlp_denoiser(4, hidden=8, depth=1)
    with pytest.raises(ValueError, match=r"NetworkTrainer: batch_size must be in \[1, "
                                         r"2305843009213693952\), got 1180591620717411303424"):
        NetworkTrainer(m, _data(), batch_size=2**70)
    # larger than N is fine (drawn with replacement), as before
    tr = NetworkTrainer(m, _data(N=16), batch_size=40, seed=0)
    tr.train(1)
    assert tr.kimg == pytest.approx(0.04)


def test_sample_sigma_size():
    tr = _trainer()
    with pytest.raises(ValueError, match=r"NetworkTrainer.sample_sigma: B must be in \[0, "):
        tr.sample_sigma(-1)
    with pytest.raises(TypeError, match="NetworkTrainer.sample_sigma: B must be an int"):
        tr.sample_sigma(2.0)
    assert tr.sample_sigma(0).shape == (0,)
    g = torch.Generator().manual_seed(0)
    expected = (torch.randn(5, generator=g) * 1.2 - 1.2).exp()
    torch.testing.assert_close(tr.sample_sigma(5), expected)
