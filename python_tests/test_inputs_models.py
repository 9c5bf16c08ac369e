"""Argument checks of SubspaceDAE, random_orthonormal and the network denoisers (fuzz report B,
findings 2-6): bad input is a TypeError or ValueError naming the function and the argument."""
import math

import pytest
import torch

import molrg_ext
from molrg_ext import SubspaceDAE, random_orthonormal
from molrg_ext.models import EDMDenoiser, MLPNet, UNet, make_mlp_denoiser, make_unet_denoiser, sigma_vector
from molrg_ext.posterior import posterior_mean_coefficients
from molrg_ext.schedules import EDM, VP

F64 = torch.float64
NAN = float("nan")


def _x(dtype=torch.float32):
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=dtype)


@pytest.mark.parametrize("kw, err, match", [
    (dict(U=[[0.0]]), TypeError, "SubspaceDAE: U must be a torch.Tensor, got list"),
    (dict(U=torch.full((2, 6, 2), NAN)), ValueError, "SubspaceDAE: U contains NaN or Inf"),
    (dict(U=torch.zeros(2, 6, 2, dtype=torch.int64)), TypeError,
     "SubspaceDAE: U must be a floating-point tensor, got dtype torch.int64"),
    (dict(U=torch.zeros(2, 6, 2, dtype=torch.complex64)), TypeError,
     "SubspaceDAE: U must be a floating-point tensor, got dtype torch.complex64"),
    (dict(dtype=torch.int64), TypeError, "SubspaceDAE: dtype must be torch.float32 or torch.float64"),
    (dict(dtype=torch.float16), TypeError, "SubspaceDAE: dtype must be torch.float32 or torch.float64"),
    (dict(schedule="cosine"), ValueError, r"SubspaceDAE: schedule must be .* got 'cosine'"),
    (dict(schedule=3), TypeError, r"SubspaceDAE: schedule must have methods s\(t\) and sigma\(t\)"),
    (dict(pi="ab"), TypeError, "SubspaceDAE: pi must hold real numbers"),
    (dict(instances=2**40), ValueError, r"SubspaceDAE: instances must be in \[1, 2147483648\)"),
])
def test_subspace_dae_constructor_refuses(kw, err, match):
    with pytest.raises(err, match=match):
        SubspaceDAE(6, 2, 2, **kw)


def test_subspace_dae_n_beyond_int32_is_named():
    with pytest.raises(ValueError, match=r"SubspaceDAE: n must be in \[1, 2147483648\)"):
        SubspaceDAE(2**40, 2, 2)


def test_subspace_dae_schedule_by_name():
    """schedule="vp" used to be stored as the string and fail in forward(t=) with an
    AttributeError; a name the package knows now gives that schedule."""
    g = torch.Generator().manual_seed(1)
    U = random_orthonormal(6, 2, 2, generator=g, dtype=F64)
    by_name = SubspaceDAE(6, 2, 2, U=U, schedule="vp", dtype=F64)
    by_obj = SubspaceDAE(6, 2, 2, U=U, schedule=VP(), dtype=F64)
    assert isinstance(by_name.schedule, VP)
    x = _x(F64)
    torch.testing.assert_close(by_name(x, t=0.4), by_obj(x, t=0.4), rtol=0, atol=0)
    t = torch.tensor(0.4, dtype=F64)
    torch.testing.assert_close(by_name(x, t=0.4), by_obj(x, VP().sigma(t), s=VP().s(t)))


@pytest.mark.parametrize("args, kw, err, match", [
    ((-1.0,), {}, ValueError, r"SubspaceDAE.forward: sigma must be finite and > 0, got -1.0"),
    ((NAN,), {}, ValueError, r"SubspaceDAE.forward: sigma must be finite and > 0, got nan"),
    ((torch.tensor([1.0, NAN, 1.0, 1.0]),), {}, ValueError,
     r"SubspaceDAE.forward: sigma must be finite and > 0 \(in torch.float32\), got nan"),
    (("abc",), {}, TypeError, "SubspaceDAE.forward: sigma must hold real numbers, got 'abc'"),
    ((True,), {}, TypeError, "SubspaceDAE.forward: sigma must be a number or a tensor, got bool"),
    (([1.0, 2.0],), {}, ValueError,
     r"SubspaceDAE.forward: sigma must be one value or broadcast to x_t's per-sample shape \[4\], "
     r"got shape \(2,\)"),
    ((1e300,), {}, ValueError, r"SubspaceDAE.forward: sigma must be <= 3.40282e\+38"),
    ((1.0,), dict(s=-1.0), ValueError, "SubspaceDAE.forward: s must be finite and > 0, got -1.0"),
    ((1e20,), dict(s=1e20), ValueError, r"SubspaceDAE.forward: s \* sigma must be <= 3.40282e\+38"),
])
def test_subspace_dae_forward_names_sigma(args, kw, err, match):
    with pytest.raises(err, match=match):
        SubspaceDAE(6, 2, 2)(_x(), *args, **kw)


@pytest.mark.parametrize("t, err, match", [
    (0.0, ValueError, r"SubspaceDAE.forward: t must give a finite noise level sigma\(t\) > 0 .* got "
                      r"t = 0 \(the schedule's sigma = 0, s = 1\)"),
    (torch.tensor([0.5, 0.5, 0.0, 0.5]), ValueError, "SubspaceDAE.forward: t must give .* got t = 0"),
    ("abc", TypeError, "SubspaceDAE.forward: t must hold real numbers"),
    (torch.full((3,), 0.5), ValueError, "SubspaceDAE.forward: t must be one value or broadcast"),
])
def test_subspace_dae_forward_names_t(t, err, match):
    with pytest.raises(err, match=match):
        SubspaceDAE(6, 2, 2, schedule=VP())(_x(), t=t)


def test_tiny_sigma_overflow_names_sigma_and_its_range():
    """phi ~ 1 / (2 sigma^2) is beyond float64 below sigma ~ 5.27e-155 (float32: 3.83e-20): a
    ValueError naming sigma and the bound, not "dae_jacobian_spectrum: phi contains NaN"."""
    m = SubspaceDAE(6, 2, 2, dtype=F64)
    x = _x(F64)
    with pytest.raises(ValueError, match=r"SubspaceDAE.coefficients: sigma is too small for "
                                         r"torch.float64: at sigma = 1e-300, s = 1, .* s \* sigma "
                                         r"must be >= about 5.27e-155"):
        molrg_ext.jacobian_spectrum(m, x, 1e-300)
    with pytest.raises(ValueError, match="SubspaceDAE.forward: sigma is too small for torch.float64"):
        m(x, 1e-300)
    with pytest.raises(ValueError, match=r"SubspaceDAE.forward: sigma is too small for "
                                         r"torch.float32: .* >= about 3.83e-20"):
        SubspaceDAE(6, 2, 2)(_x(), 1e-30)
    with pytest.raises(ValueError, match=r"SubspaceDAE.forward: t is too small for torch.float32: "
                                         r"at t = 1e-30 \(the schedule's sigma = 1e-30, s = 1\)"):
        SubspaceDAE(6, 2, 2, schedule=EDM())(_x(), t=1e-30)
    # just above the bound the coefficients are finite and as before
    c, phi, bias = m.coefficients(6e-155)
    c0, phi0, bias0 = posterior_mean_coefficients(torch.tensor(1.0, dtype=F64),
                                                  torch.tensor(6e-155, dtype=F64), m.dims)
    assert math.isfinite(phi.item()) and phi.item() == pytest.approx(1 / (2 * 6e-155**2), rel=1e-12)
    assert torch.equal(c, c0) and torch.equal(phi, phi0) and torch.equal(bias, bias0)


def test_coefficients_names_its_arguments():
    m = SubspaceDAE(6, 2, 2)
    with pytest.raises(ValueError, match="SubspaceDAE.coefficients: sigma must be finite and > 0"):
        m.coefficients(0.0)
    with pytest.raises(ValueError, match=r"SubspaceDAE.coefficients: sigma and s must broadcast "
                                         r"together, got shapes \(2,\) and \(3,\)"):
        m.coefficients([1.0, 2.0], [1.0, 2.0, 3.0])


@pytest.mark.parametrize("args, match", [
    ((2**70, 1), r"random_orthonormal: the result \[\*batch, n, d\] = \[1180591620717411303424, 1\]"),
    ((2, 1, 2**70), "random_orthonormal: the result .* more than a tensor can"),
])
def test_random_orthonormal_huge_sizes(args, match):
    with pytest.raises(ValueError, match=match):
        random_orthonormal(*args)


def test_edm_denoiser_x_must_match_the_net():
    den = make_mlp_denoiser(4, 8, 1)
    with pytest.raises(TypeError, match="EDMDenoiser: x has dtype torch.float64 but the net's "
                                        "parameters have torch.float32"):
        den(torch.randn(3, 4, dtype=F64), 1.0)
    with pytest.raises(TypeError, match="EDMDenoiser: sigma must hold real numbers, got 'abc'"):
        den(torch.randn(3, 4), "abc")
    with pytest.raises(TypeError, match="EDMDenoiser: sigma must be a number or a tensor, got bool"):
        den(torch.randn(3, 4), True)
    # a list of levels is still taken
    torch.testing.assert_close(den(torch.ones(2, 4), [0.5, 0.5]), den(torch.ones(2, 4), 0.5))


def test_edm_denoiser_takes_x_a_net_casts_itself():
    """The dtype check runs only after the net fails: a net that casts its input to its own
    dtype still gets float64 x (it did before the checks)."""
    class Casting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x, c_noise):
            return self.lin(x.float()).to(x.dtype)

    den = EDMDenoiser(Casting())
    out = den(torch.randn(3, 4, dtype=F64), 0.5)
    assert out.dtype == F64 and out.shape == (3, 4)


def test_edm_denoiser_over_unet_without_image_shape():
    den = EDMDenoiser(UNet(1, 4, 4))
    for x in (torch.randn(2, 16), torch.randn(2, 3, 4, 4), torch.randn(2, 1, 5, 5)):
        with pytest.raises(ValueError, match=r"EDMDenoiser: x must be images \[B, 1, H, W\] with H "
                                             r"and W divisible by 2 for its UNet"):
            den(x, 1.0)
    # image-shaped input (also another even side) works as before
    assert den(torch.randn(2, 1, 4, 4), 1.0).shape == (2, 1, 4, 4)
    assert den(torch.randn(2, 1, 8, 8), 1.0).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("make, err, match", [
    (lambda: MLPNet(4, hidden="a"), TypeError, "MLPNet: hidden must be an int, got 'a'"),
    (lambda: MLPNet(4, hidden=1.5), TypeError, "MLPNet: hidden must be an int, got 1.5"),
    (lambda: MLPNet(True, 8, 1), TypeError, "MLPNet: n must be an int, got True"),
    (lambda: MLPNet(4, 8, depth=2**40), ValueError, r"MLPNet: depth must be in \[1, 65536\)"),
    (lambda: MLPNet(4, 2**70, 1), ValueError, r"MLPNet: hidden must be in \[1, 2147483648\)"),
    (lambda: MLPNet(4, emb_dim=3), ValueError, "MLPNet: emb_dim must be even, got 3"),
    (lambda: MLPNet(4, emb_dim=0), ValueError, r"MLPNet: emb_dim must be in \[2, "),
    (lambda: UNet(1, 4, 4, num_blocks=2**70), ValueError, r"UNet: num_blocks must be in \[1, 65536\)"),
    (lambda: UNet(1, 4, 4, num_blocks=1.5), TypeError, "UNet: num_blocks must be an int"),
    (lambda: UNet(1, 1e300), TypeError, "UNet: resolution must be an int"),
    (lambda: UNet(1, 4, 4, emb_dim=-1), ValueError, r"UNet: emb_dim must be in \[1, "),
    (lambda: UNet(1, 4, 4, emb_dim=0), ValueError, r"UNet: emb_dim must be in \[1, "),
    (lambda: UNet(1, 4, 4, dropout=NAN), ValueError, r"UNet: dropout must be in \[0, 1\), got nan"),
    (lambda: UNet(1, 4, 4, dropout=1.0), ValueError, r"UNet: dropout must be in \[0, 1\), got 1.0"),
    (lambda: UNet(1, 4, 4, dropout="0.1"), TypeError, "UNet: dropout must be a real number, got str"),
    (lambda: UNet(1, 4, 4, channel_mult="12"), TypeError, "UNet: channel_mult must be a sequence of ints"),
    (lambda: EDMDenoiser(None), TypeError, "EDMDenoiser: net must be callable"),
    (lambda: EDMDenoiser(MLPNet(6, 8, 1), sigma_data=True), TypeError,
     "EDMDenoiser: sigma_data must be a real number, got bool"),
    (lambda: EDMDenoiser(MLPNet(6, 8, 1), image_shape=(-1, 2, 3)), ValueError,
     r"EDMDenoiser: image_shape\[0\] must be >= 1, got -1"),
    (lambda: EDMDenoiser(MLPNet(6, 8, 1), image_shape=(0, 2, 3)), ValueError,
     r"EDMDenoiser: image_shape\[0\] must be >= 1, got 0"),
    (lambda: EDMDenoiser(MLPNet(6, 8, 1), image_shape=(1.5, 2, 2)), TypeError,
     r"EDMDenoiser: image_shape\[0\] must be an int, got 1.5"),
    (lambda: EDMDenoiser(MLPNet(6, 8, 1), image_shape=(6,)), ValueError,
     r"EDMDenoiser: image_shape must be \(C, H, W\), 3 ints, got \[6\]"),
    (lambda: make_unet_denoiser("144", 4), TypeError,
     "make_unet_denoiser: image_shape must be a sequence of ints, got '144'"),
    (lambda: make_unet_denoiser((1, 4), 4), ValueError,
     r"make_unet_denoiser: image_shape must be \(C, H, W\), 3 ints, got \[1, 4\]"),
    (lambda: make_unet_denoiser((1, 4, 4), model_channels=2.5), TypeError,
     "UNet: model_channels must be an int"),
    (lambda: make_mlp_denoiser(4, hidden="a"), TypeError, "MLPNet: hidden must be an int"),
    (lambda: sigma_vector(1.0, -1, torch.ones(2)), ValueError, "denoiser: batch must be >= 0, got -1"),
    (lambda: sigma_vector(1.0, 2, None), TypeError, "denoiser: like must be a torch.Tensor, got NoneType"),
])
def test_model_constructors_refuse(make, err, match):
    with pytest.raises(err, match=match):
        make()
