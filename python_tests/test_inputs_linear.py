"""Argument checks of LinearDenoiser, linear_distill, linearity_score and edm_sigma_grid (inputs
found by fuzzing that were accepted silently or failed deep inside with messages naming nothing)."""
import math

import numpy as np
import pytest
import torch

from molrg_ext.linear_distill import LinearDenoiser, linear_distill
from molrg_ext.metrics.linearity import edm_sigma_grid, linearity_score


def gen(seed):
    return torch.Generator().manual_seed(seed)


def _X():
    return torch.randn(30, 4, dtype=torch.float64, generator=gen(0))


def _den(x, s):
    return x / (1 + s ** 2)


def _bank():
    """A two-level LinearDenoiser with known W and b."""
    W = torch.stack([torch.eye(4, dtype=torch.float64) * 0.5, torch.eye(4, dtype=torch.float64)])
    b = torch.arange(8, dtype=torch.float64).reshape(2, 4)
    return LinearDenoiser(torch.tensor([0.5, 1.0], dtype=torch.float64), W, b, (4,)), W, b


# ------------------------------------------------------------------------------ LinearDenoiser
def test_linear_denoiser_refuses_infinite_sigma():
    L, W, b = _bank()
    x = _X()[:2]
    torch.testing.assert_close(L(x, 1.0), x @ W[1].T + b[1])  # valid levels unchanged
    assert L.index(0.5) == 0
    for s in (math.inf, -math.inf):  # had been taken as level 0 (relative tolerance inf)
        with pytest.raises(ValueError, match=f"LinearDenoiser: sigma must be finite, got {s}"):
            L.index(s)
        with pytest.raises(ValueError, match="LinearDenoiser: sigma must be finite"):
            L(x, s)
        with pytest.raises(ValueError, match="LinearDenoiser: sigma must be finite"):
            L(x, torch.tensor(s, dtype=torch.float64))
    with pytest.raises(ValueError, match="LinearDenoiser: sigma must be finite, got inf"):
        L(x, torch.tensor([math.inf, 1.0], dtype=torch.float64))


def test_linear_denoiser_refuses_non_finite_x():
    L, _, _ = _bank()
    x = _X()[:3].clone()
    x[1, 2] = math.nan
    with pytest.raises(ValueError, match="LinearDenoiser: x contains NaN or Inf values"):
        L(x, 0.5)
    x[1, 2] = math.inf
    with pytest.raises(ValueError, match="LinearDenoiser: x contains NaN or Inf values"):
        L(x, torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64))


def test_linear_denoiser_constructor_checks():
    s2 = torch.tensor([0.5, 1.0])
    W2, b2 = torch.eye(4).repeat(2, 1, 1), torch.zeros(2, 4)
    # three levels for two matrices had been an IndexError at the first call with sigma = 2
    with pytest.raises(ValueError, match=r"LinearDenoiser: sigmas must hold one level per matrix "
                                         r"of W: W has S = 2 .*sigmas has shape \(3,\)"):
        LinearDenoiser(torch.tensor([0.5, 1.0, 2.0]), W2, b2, (4,))
    with pytest.raises(ValueError, match="LinearDenoiser: W contains NaN or Inf"):
        LinearDenoiser(s2, torch.full((2, 4, 4), math.nan), b2, (4,))
    with pytest.raises(ValueError, match="LinearDenoiser: b contains NaN or Inf"):
        LinearDenoiser(s2, W2, torch.full((2, 4), math.inf), (4,))
    with pytest.raises(ValueError, match="LinearDenoiser: sigmas must be finite and > 0, got nan"):
        LinearDenoiser(torch.tensor([math.nan, 0.5]), W2, b2, (4,))
    with pytest.raises(ValueError, match=r"LinearDenoiser: b must be \[S, n\] = \[2, 4\]"):
        LinearDenoiser(s2, W2, torch.zeros(2, 3), (4,))
    with pytest.raises(ValueError, match=r"LinearDenoiser: W must be \[S, n, n\]"):
        LinearDenoiser(s2, torch.eye(4), b2, (4,))
    with pytest.raises(ValueError, match=r"LinearDenoiser: sample_shape \(5,\) has 5 entries but "
                                         r"W is \[S, n, n\] with n = 4"):
        LinearDenoiser(s2, W2, b2, (5,))
    with pytest.raises(TypeError, match="LinearDenoiser: sample_shape must be a sequence of ints"):
        LinearDenoiser(s2, W2, b2, 4)
    with pytest.raises(TypeError, match="LinearDenoiser: W must be a torch.Tensor, got list"):
        LinearDenoiser(s2, [[1.0]], b2, (4,))
    with pytest.raises(TypeError, match="LinearDenoiser: b has dtype torch.float64 but W has"):
        LinearDenoiser(s2, W2, b2.double(), (4,))
    with pytest.raises(TypeError, match="LinearDenoiser: sigmas must be real"):
        LinearDenoiser(s2.to(torch.complex64), W2, b2, (4,))
    L = LinearDenoiser(s2, W2, b2 + 1, torch.Size([2, 2]))  # the shape of a distilled bank
    assert L.sample_shape == (2, 2)
    x = torch.randn(3, 2, 2)
    torch.testing.assert_close(L(x, 1.0), x + 1)


# ------------------------------------------------------------------------------ linear_distill
@pytest.mark.parametrize("out, exc, msg", [
    (lambda x, s: x * math.nan, ValueError, "contains NaN or Inf values \\(sigma = 0.5\\)"),
    (lambda x, s: x * math.inf, ValueError, "contains NaN or Inf values"),
    (lambda x, s: x.to(torch.complex128), TypeError, "must be real floating point, got dtype "
                                                     "torch.complex128"),
    (lambda x, s: x.long(), TypeError, "must be real floating point, got dtype torch.int64"),
    (lambda x, s: x.tolist(), TypeError, "must be a tensor, got list"),
    (lambda x, s: x.reshape(-1), ValueError,
     "must have the input's shape \\(16, 4\\), got \\(64,\\)"),
])
def test_linear_distill_checks_denoiser_output(out, exc, msg):
    # NaN had hit a lstsq internal assert, Inf gave a NaN W, complex lost its imaginary part
    with pytest.raises(exc, match="linear_distill: the denoiser's output " + msg):
        linear_distill(out, _X(), [0.5, 1.0], n_samples=40, batch_size=16)


def test_linear_distill_overflow_and_generator():
    X32 = _X().float()
    with pytest.raises(ValueError, match="linear_distill: the fitted W or b overflows X0's dtype "
                                         "torch.float32"):
        linear_distill(lambda x, s: x.double() * 1e200, X32, [0.5])
    with pytest.raises(ValueError, match="linear_distill: sigmas must be finite and > 0 in X0's "
                                         "dtype torch.float32"):
        linear_distill(_den, X32, [1e200])
    with pytest.raises(TypeError, match="linear_distill: generator must be a torch.Generator or "
                                        "None, got str"):
        linear_distill(_den, _X(), [0.5], generator="x")
    L = linear_distill(_den, _X(), [0.5, 2.0], generator=gen(1))  # the exact map comes back
    for j, s in enumerate([0.5, 2.0]):
        torch.testing.assert_close(L.W[j], torch.eye(4, dtype=torch.float64) / (1 + s * s))


# ----------------------------------------------------------------------------- linearity_score
@pytest.mark.parametrize("out, exc, msg", [
    (lambda x, s: x[:, :1], ValueError, r"must have the input's shape \(15, 4\), got \(15, 1\)"),
    (lambda x, s: x[:3], ValueError, r"must have the input's shape \(15, 4\), got \(3, 4\)"),
    (lambda x, s: x * math.nan, ValueError, r"contains NaN or Inf values \(sigma = 0.5\)"),
    (lambda x, s: x.long(), TypeError, "must be real floating point, got dtype torch.int64"),
    (lambda x, s: None, TypeError, "must be a tensor, got NoneType"),
])
def test_linearity_score_checks_denoiser_output(out, exc, msg):
    # a wrong shape had scored exactly 1.0 and NaN outputs a NaN score
    with pytest.raises(exc, match="linearity_score: the denoiser's output " + msg):
        linearity_score(out, _X(), [0.5], n_pairs=5)


@pytest.mark.parametrize("kw, exc, msg", [
    (dict(alpha=math.nan), ValueError, "alpha must be finite, got nan"),
    (dict(beta=math.inf), ValueError, "beta must be finite, got inf"),
    (dict(alpha=-math.inf), ValueError, "alpha must be finite, got -inf"),
    (dict(alpha=complex(1, 1)), TypeError, r"alpha must be a real number, got complex"),
    (dict(beta=torch.ones(3, 7)), ValueError, r"beta must be one number, got a tensor of shape"),
    (dict(n_pairs="x"), TypeError, "n_pairs must be an int, got 'x'"),
    (dict(n_pairs=True), TypeError, "n_pairs must be an int, got True"),
    (dict(n_pairs=1.5), TypeError, "n_pairs must be an int, got 1.5"),
    (dict(generator="x"), TypeError, "generator must be a torch.Generator or None, got str"),
    (dict(sigmas="x"), TypeError, "sigmas must hold real numbers, got 'x'"),
    (dict(sigmas=["a"]), ValueError, "sigmas must be a rectangular sequence of real numbers"),
    (dict(sigmas=[1 + 1j, 1]), TypeError, "sigmas must hold real numbers"),
    (dict(sigmas=torch.tensor([0.5 + 0j])), TypeError, "sigmas must hold real numbers"),
])
def test_linearity_score_argument_checks(kw, exc, msg):
    args = dict(sigmas=[0.5], n_pairs=5)
    args.update(kw)
    with pytest.raises(exc, match="linearity_score: " + msg):
        linearity_score(_den, _X(), **args)


def test_linearity_score_weights_as_numbers():
    """alpha and beta are used as Python floats: a huge int had been an OverflowError, and a
    0-d tensor or numpy scalar gives the same score as the float."""
    def D(x, s):
        return torch.tanh(x)

    def score(a, b=0.3):
        return linearity_score(D, _X(), [0.5, 1.0], n_pairs=8, alpha=a, beta=b, generator=gen(2))

    torch.testing.assert_close(score(2 ** 70), score(float(2 ** 70)), rtol=0, atol=0)
    torch.testing.assert_close(score(torch.tensor(0.6, dtype=torch.float64)), score(0.6),
                               rtol=0, atol=0)
    torch.testing.assert_close(score(np.int64(1), np.float64(0.5)), score(1.0, 0.5),
                               rtol=0, atol=0)


# ------------------------------------------------------------------------------ edm_sigma_grid
@pytest.mark.parametrize("kw, exc, msg", [
    (dict(num="x"), TypeError, "num must be an int, got 'x'"),
    (dict(num=2.5), TypeError, "num must be an int, got 2.5"),  # had been truncated to 2
    (dict(num=np.float64(3.7)), TypeError, "num must be an int"),
    (dict(num=2 ** 70), ValueError, r"num must be in \[2, 2147483648\)"),  # had been OverflowError
    (dict(num=1), ValueError, r"num must be in \[2, 2147483648\), got 1"),
    (dict(sigma_min=None), TypeError, "sigma_min must be a real number, got NoneType"),
    (dict(sigma_max="x"), TypeError, "sigma_max must be a real number, got str"),
    (dict(rho=[1, 2]), TypeError, "rho must be a real number, got list"),
    (dict(sigma_min=-1), ValueError, "sigma_min must be finite and > 0, got -1.0"),
    (dict(rho=math.nan), ValueError, "rho must be finite and > 0, got nan"),
    (dict(sigma_min=100.0), ValueError, "sigma_max must be > sigma_min, got sigma_min = 100.0 and "
                                        "sigma_max = 80.0"),
])
def test_edm_sigma_grid_argument_checks(kw, exc, msg):
    with pytest.raises(exc, match="edm_sigma_grid: " + msg):
        edm_sigma_grid(**kw)


def test_edm_sigma_grid_accepts_integer_scalars():
    a, b, rho = 80.0 ** (1 / 7), 0.002 ** (1 / 7), 7
    expect = [(a + i / 2 * (b - a)) ** rho for i in range(3)]
    for num in (3, np.int64(3), torch.tensor(3)):
        torch.testing.assert_close(edm_sigma_grid(num),
                                   torch.tensor(expect, dtype=torch.float64), rtol=1e-12, atol=0)
    grid = edm_sigma_grid(3, sigma_min=np.int64(1), sigma_max=torch.tensor(2.0))
    torch.testing.assert_close(grid, edm_sigma_grid(3, sigma_min=1.0, sigma_max=2.0),
                               rtol=0, atol=0)
    with pytest.raises(TypeError, match="edm_sigma_grid: num must be an int, got True"):
        edm_sigma_grid(True)
