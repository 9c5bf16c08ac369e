"""The shared parsers of _args (real_number, check_seed, real_tensor's element check) at the call
sites that had their own copies: 10**400 is a ValueError naming the argument (had been an
OverflowError at several), numpy real scalars are taken everywhere, bool and complex elements of
sequences are refused, and each argument is checked once per call path."""
import math
import os

import numpy as np
import pytest
import torch

import molrg_ext as M
from molrg_ext import schedules as S
from molrg_ext._args import check_seed, real_number, real_tensor
from molrg_ext.data import sample_from_bases, sample_molrg
from molrg_ext.gaussian_denoiser import GaussianDenoiser
from molrg_ext.hidden_gaussian import OptimalDenoiser
from molrg_ext.linear_distill import linear_distill
from molrg_ext.metrics.linearity import edm_sigma_grid, linearity_score
from molrg_ext.modules import SubspaceDAE
from molrg_ext.posterior import posterior_mean_coefficients
from molrg_ext.train import network, subspace
from molrg_ext.train.network import NetworkTrainer
from molrg_ext.train.subspace import SubspaceTrainer

BIG = 10**400  # beyond float64


class _Net(torch.nn.Module):
    """model(x, sigma) around a plain network."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, sigma):
        return self.net(x)


# ------------------------------------------------------------------------------- the parsers
def test_real_number_forms_and_errors():
    for v in (2, 2.5, np.float32(2.5), np.int64(2), torch.tensor(2.5), torch.tensor([2]),
              np.array(2.5)):
        assert real_number(v, "x", "f") == float(v)
    for v, got in ((True, "bool"), (np.bool_(True), "dtype bool"), (1j, "complex"),
                   (torch.tensor([True]), "dtype torch.bool"),
                   (torch.tensor(1j), "dtype torch.complex64"), ("1", "str"), (None, "NoneType")):
        with pytest.raises(TypeError, match=f"^f: x must be a real number, got {got}$"):
            real_number(v, "x", "f")
    with pytest.raises(ValueError, match=r"^f: x must be one number, got a tensor of shape \(2,\)"):
        real_number(torch.ones(2), "x", "f")
    with pytest.raises(ValueError, match="^f: x must be within float64's range"):
        real_number(BIG, "x", "f")
    for v, kw, what in ((math.nan, {}, "finite"), (math.inf, {}, "finite"),
                        (0.0, dict(lo=0, lo_open=True), "finite and > 0"),
                        (-1, dict(lo=0), "finite and >= 0"), (1.0, dict(lo=0, hi=1, hi_open=True),
                                                              r"in \[0, 1\)"),
                        (math.nan, dict(lo=0, hi=math.inf), r"in \[0, inf\]")):
        with pytest.raises(ValueError, match=f"^f: x must be {what}, got {float(v)}$"):
            real_number(v, "x", "f", **kw)
    assert real_number(math.inf, "x", "f", 0, math.inf) == math.inf  # inf allowed explicitly


def test_check_seed_range():
    assert check_seed(2**64 - 1, "seed", "f") == 2**64 - 1
    assert check_seed(-2**63, "seed", "f", lo=-2**63) == -2**63
    with pytest.raises(ValueError, match=r"^f: seed must be in \[0, 18446744073709551616\), "
                                         r"got -1"):
        check_seed(-1, "seed", "f")
    with pytest.raises(TypeError, match="^f: seed must be an int, got 1.5"):
        check_seed(1.5, "seed", "f")


BOOLS = [[True], [[1.0], [True]], [np.bool_(True), 2.0], (torch.tensor(True),)]


@pytest.mark.parametrize("v, dtype", [(v, None) for v in [[1j, 2], [2, 1 + 0j]] + BOOLS]
                         + [(v, torch.float64) for v in BOOLS])
def test_real_tensor_refuses_bool_and_complex_elements(v, dtype):
    # real_tensor([1j, 2]) had returned a complex tensor, [True] a bool one, and [True] with a
    # dtype 1.0 (with a real dtype, complex elements were already refused by torch)
    with pytest.raises(TypeError, match="^f: x must hold real numbers"):
        real_tensor(v, "x", "f", dtype)


def test_subspace_dae_refuses_bool_levels_in_sequences():
    m = SubspaceDAE(6, [2, 2], schedule="vp")
    x = torch.randn(4, 6)
    with pytest.raises(TypeError, match="^SubspaceDAE.forward: sigma must hold real numbers"):
        m(x, [True] * 4)  # had been sigma = 1 for every sample
    with pytest.raises(TypeError, match="^SubspaceDAE.forward: t must hold real numbers"):
        m(x, t=[True] * 4)
    with pytest.raises(TypeError, match="^SubspaceDAE.forward: t must hold real numbers"):
        m(x, t=True)


# ------------------------------------------------------------- 10**400 names the argument
def _X():
    return torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


SITES = [
    ("GaussianDenoiser.matrix: sigma",
     lambda: GaussianDenoiser.fit(_X()).matrix(BIG)),
    ("sample_molrg: noise_std", lambda: sample_molrg(8, [2, 3], N=5, noise_std=BIG)),
    ("sample_from_bases: noise_std",
     lambda: sample_from_bases(sample_molrg(8, [2], N=3).bases, N=3, noise_std=BIG)),
    ("linearity_score: alpha",
     lambda: linearity_score(lambda x, s: x, _X(), [0.5], n_pairs=2, alpha=BIG)),
    ("edm_sigma_grid: sigma_max", lambda: edm_sigma_grid(sigma_max=BIG)),
    ("VP: beta_max", lambda: S.VP(beta_max=BIG)),
    ("NetworkTrainer: lr",
     lambda: NetworkTrainer(_Net(torch.nn.Linear(3, 3)), _X().float(), batch_size=2,
                            lr=BIG)),
    ("NetworkTrainer: P_mean",
     lambda: NetworkTrainer(_Net(torch.nn.Linear(3, 3)), _X().float(), batch_size=2,
                            P_mean=BIG)),
    ("posterior_mean_coefficients: s", lambda: posterior_mean_coefficients(BIG, 1)),
    ("OptimalDenoiser: s", lambda: OptimalDenoiser(_X(), s=BIG)),
    ("linear_distill: sigmas\\[1\\]", lambda: linear_distill(lambda x, s: x, _X(), [0.5, BIG])),
]


@pytest.mark.parametrize("msg, call", SITES, ids=[s[0].replace("\\", "") for s in SITES])
def test_beyond_float64_is_a_value_error_naming_the_argument(msg, call):
    # an OverflowError naming nothing at most of these (inf at linearity_score and edm_sigma_grid)
    with pytest.raises(ValueError, match=f"^{msg} must be within float64's range, got 1000"):
        call()


# ---------------------------------------------------------- numpy scalars taken consistently
def test_numpy_scalars_are_taken_where_python_numbers_are():
    # these call sites had refused np.float32 / np.int64 (only float subclasses got through)
    X = _X()
    a = SubspaceTrainer(2, 1, lr=1e-3, init_scale=0.2, tol=1e-6)
    b = SubspaceTrainer(2, 1, lr=np.float32(1e-3), init_scale=np.float32(0.2),
                        tol=np.float32(1e-6))
    assert (b.lr, b.init_scale, b.tol) == (float(np.float32(1e-3)), float(np.float32(0.2)),
                                           float(np.float32(1e-6)))
    assert type(b.lr) is float and a.lr == 1e-3
    t = NetworkTrainer(_Net(torch.nn.Linear(3, 3)), X.float(), batch_size=2,
                       lr=np.float32(0.5),
                       ema_decay=np.float64(0.9), P_std=np.int64(1))
    assert (t.lr, t.ema_decay, t.P_std) == (0.5, 0.9, 1.0)
    L, L2 = (linear_distill(lambda x, s: 0.5 * x, X, sig,
                            generator=torch.Generator().manual_seed(0))
             for sig in ([np.float32(0.5), np.int64(1)], [0.5, 1]))
    assert torch.equal(L.W, L2.W) and torch.equal(L.b, L2.b)
    data = sample_molrg(6, [2, 2], N=20, seed=1)
    lv = M.make_levels(S.VP(), L=4, dims=[2, 2])
    U1, U2 = data.bases.float().clone(), data.bases.float().clone()
    M.train_step(data.X.float(), U1, [2, 2], lv, 4, 0, 0, lr=np.float32(0.25))
    M.train_step(data.X.float(), U2, [2, 2], lv, 4, 0, 0, lr=0.25)
    assert torch.equal(U1, U2)


# -------------------------------------------------------------- one check per call path
def test_subspace_fit_does_not_repeat_the_public_checks(monkeypatch):
    data = sample_molrg(6, [2, 2], N=20, seed=1)

    def refuse(*a, **k):
        raise AssertionError("fit called a public checker again")

    monkeypatch.setattr(subspace, "paper_init", refuse)
    monkeypatch.setattr(subspace, "retract", refuse)
    for init in ("paper", "random"):
        SubspaceTrainer(2, 2, lr=1e-3, steps=2, batch=4, init=init, levels=4).fit(
            data.X, data.bases if init == "paper" else None)


def test_network_checkpoint_state_checked_once_per_path(monkeypatch, tmp_path):
    X = _X().float()
    model = torch.nn.Linear(3, 3)
    t = NetworkTrainer(_Net(model), X, batch_size=2, seed=1)
    path = os.fspath(tmp_path / "c.pt")
    t.save(path)
    calls = []
    real = network._check_state
    monkeypatch.setattr(network, "_check_state", lambda *a: calls.append(a[1]) or real(*a))
    NetworkTrainer(_Net(torch.nn.Linear(3, 3)), X, batch_size=2, checkpoint=path)
    t.load(path)
    t.load_state_dict(t.state_dict())
    assert calls == [f"checkpoint {path!r}", f"path {path!r}", "state"]


def test_vp_gamma_checks_t_once(monkeypatch):
    vp = S.VP()
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    expect = vp.s(t) * vp.sigma(t)
    calls = []
    real = S.check_range
    monkeypatch.setattr(S, "check_range", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    assert torch.equal(vp.gamma(t), expect)
    assert calls == ["t"]
    with pytest.raises(ValueError, match=r"^VP.gamma: t must be in \[0, 1\], got 2.0"):
        vp.gamma(2.0)
