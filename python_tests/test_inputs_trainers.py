"""Input handling of the subspace trainer and its helpers (retract, paper_init, SubspaceTrainer),
the fused train_step and its level table, and the number arguments of subspace_dae: bad bases
and dims are named instead of an IndexError or a silent slice, bools are not numbers, seeds,
batch and levels are bounded as the generator and the op allow, and lr is checked in the data's
dtype."""
import pytest
import torch

import molrg_ext as M
from molrg_ext._args import number_or_tensor
from molrg_ext.schedules import VP
from molrg_ext.train import SubspaceTrainer
from molrg_ext.train.subspace import paper_init, retract

F64 = torch.float64


def _bases(K=2, n=6, d=2, dtype=F64, P=None):
    g = torch.Generator().manual_seed(0)
    shape = (K, n, d) if P is None else (P, K, n, d)
    return torch.linalg.qr(torch.randn(shape, generator=g, dtype=dtype))[0]


# ------------------------------------------------------------------------------------ retract
@pytest.mark.parametrize("U,dims,exc,msg", [
    (_bases(), [-1, 2], ValueError, r"retract: dims\[0\] must be >= 1, got -1"),  # sliced [:-1]
    (_bases(), [2, 2, 2], ValueError, "retract: dims must have K = 2 entries, got 3"),  # IndexError
    (_bases(), [3, 2], ValueError, r"retract: dims\[0\] = 3 must be <= dmax = 2"),
    (torch.randn(1, 2, 3, dtype=F64), [3], ValueError, r"retract: dims\[0\] = 3 exceeds .* n = 2"),
    (_bases(), [2.0, 2], TypeError, r"retract: dims\[0\] must be an int"),
    (torch.tensor(1.0), [1], ValueError, r"retract: U must be \[\.\.\., K, n, dmax\], got shape"),
    (_bases().half(), [2, 2], TypeError, "retract: U must be torch.float32 or torch.float64, got "
                                         "torch.float16"),  # NotImplementedError from QR
    (_bases().to(torch.complex128), [2, 2], TypeError, "retract: U must be .*complex128"),
    ([[0.0]], [1], TypeError, "retract: U must be a torch.Tensor, got list"),
])
def test_retract_bad_input(U, dims, exc, msg):
    with pytest.raises(exc, match=msg):
        retract(U, dims)


def test_retract_checks_with_method_none_and_valid_unchanged():
    """method=None returned U for any dims; valid bases still give Q of QR with a positive
    diagonal of R, padded columns zero."""
    A = torch.randn(3, 2, 7, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"retract: dims\[1\] must be >= 1, got 0"):
        retract(A, [3, 0], None)
    out = retract(A, [3, 1])
    q, r = torch.linalg.qr(A[:, 1, :, :1])
    torch.testing.assert_close(out[:, 1, :, :1], q * torch.sign(r[..., :1, :1]), rtol=0,
                               atol=1e-14)
    assert (out[:, 1, :, 1:] == 0).all()
    assert retract(A, [3, 1], None) is A


# --------------------------------------------------------------------------------- paper_init
@pytest.mark.parametrize("U,kw,exc,msg", [
    (None, {}, TypeError, "paper_init: U_true must be a torch.Tensor, got NoneType"),
    (_bases(), dict(scale=float("nan")), ValueError, "paper_init: scale must be finite and "
                                                     ">= 0, got nan"),  # returned NaN bases
    (_bases(), dict(scale=-0.5), ValueError, "paper_init: scale must be finite and >= 0"),
    (_bases(), dict(scale=True), TypeError, "paper_init: scale must be a real number, got bool"),
    (_bases(), dict(scale="a"), TypeError, "paper_init: scale must be a real number, got str"),
    # a seeded Delta (max |Delta| = 2.31 > 1.8): from torch's global generator the overflow
    # happened only when some of the 24 draws exceeded 1.8 in size (83% of states)
    (_bases(), dict(scale=1e308, generator=torch.Generator().manual_seed(0)), ValueError,
     r"paper_init: scale = 1e\+308 overflows float64"),
    (_bases(), dict(scale=10**400), ValueError, "paper_init: scale must be within float64's range"),
    (_bases().long(), {}, TypeError, "paper_init: U_true must be .*got torch.int64"),  # rounded
    (_bases().to(torch.complex128), {}, TypeError, "paper_init: U_true must be .*complex128"),
    (_bases() * float("nan"), {}, ValueError, "paper_init: U_true contains NaN or Inf"),
])
def test_paper_init_bad_input(U, kw, exc, msg):
    with pytest.raises(exc, match=msg):
        paper_init(U, [2, 2], **kw)


def test_paper_init_dims_checked_and_valid_unchanged():
    with pytest.raises(ValueError, match=r"paper_init: dims\[0\] must be >= 1"):
        paper_init(_bases(), [-1, 2])
    with pytest.raises(ValueError, match="paper_init: dims must have K = 2 entries, got 3"):
        paper_init(_bases(), [2, 2, 2])
    # eq. (48) by hand, with the same generator: U* + scale * Delta, then QR with R's diagonal > 0
    U, gen = _bases(P=2), lambda: torch.Generator().manual_seed(5)  # noqa: E731
    want = U + 0.3 * torch.randn(U.shape, generator=gen(), dtype=F64)
    q, r = torch.linalg.qr(want)
    want = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    torch.testing.assert_close(paper_init(U, [2, 2], 0.3, gen()), want, rtol=0, atol=1e-14)
    # a one-element tensor scale and a float16 U_true (computed in float64) still work
    torch.testing.assert_close(paper_init(U, [2, 2], torch.tensor(0.3, dtype=F64), gen()), want,
                               rtol=0, atol=1e-14)
    assert paper_init(U.half(), [2, 2]).dtype == torch.float16


# --------------------------------------------------------------------------- SubspaceTrainer
@pytest.mark.parametrize("kw,exc,msg", [
    (dict(lr=True), TypeError, "SubspaceTrainer: lr must be a real number, got bool"),
    (dict(init_scale=True), TypeError,
     "SubspaceTrainer: init_scale must be a real number, got bool"),
    (dict(tol=True), TypeError, "SubspaceTrainer: tol must be a real number, got bool"),
    (dict(tol="a"), TypeError, "SubspaceTrainer: tol must be a real number, got str"),
    (dict(lr=10**400), ValueError, "SubspaceTrainer: lr must be within float64's range"),
    (dict(seed=2**70), ValueError, r"SubspaceTrainer: seed must be in \[0, 18446744073709551616\)"),
    (dict(seed=2**63, engine="fused"), ValueError,
     r"SubspaceTrainer: seed must be in \[0, 9223372036854775808\)"),  # train_step's bound
    (dict(batch=2**40), ValueError, r"SubspaceTrainer: batch must be in \[1, 4294967296\)"),
    (dict(levels=2**40), ValueError, r"SubspaceTrainer: levels must be in \[1, 4294967296\)"),
    (dict(steps=2**32, engine="fused"), ValueError, r"SubspaceTrainer: steps must be in"),
    (dict(batch=2.0), TypeError, "SubspaceTrainer: batch must be an int, got 2.0"),
])
def test_trainer_bad_arguments(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        SubspaceTrainer(2, 2, **kw)


def test_trainer_seed_bound_is_the_generators():
    """Seeds up to 2**64 - 1 are what torch.Generator.manual_seed takes (2**70 had failed inside
    fit with 'Overflow when unpacking long long')."""
    with pytest.raises(ValueError, match=r"seed must be in \[0, 18446744073709551616\), got 1844"):
        SubspaceTrainer(2, 2, seed=2**64)
    X = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    a = SubspaceTrainer(2, 2, seed=2**64 - 1, steps=2, init="random", tol=None).fit(X)
    b = SubspaceTrainer(2, 2, seed=2**64 - 1, steps=2, init="random", tol=None).fit(X)
    assert torch.equal(a.U_, b.U_)
    assert SubspaceTrainer(2, 2, tol=1).tol == 1.0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_trainer_lr_checked_in_data_dtype(optimizer):
    """lr = 1e300 is finite but beyond float32: the optimizer's update had raised a bare
    RuntimeError ('value cannot be converted to type float without overflow')."""
    X = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    tr = SubspaceTrainer(2, 2, lr=1e300, steps=1, init="random", optimizer=optimizer)
    with pytest.raises(ValueError, match=r"SubspaceTrainer.fit: lr must be finite in X's dtype "
                                         r"torch.float32 \(<= 3.40282e\+38\), got 1e\+300"):
        tr.fit(X)


# ------------------------------------------------------------------------------ train_step
def _step_args(dtype=F64):
    X = torch.randn(2, 8, 6, dtype=dtype, generator=torch.Generator().manual_seed(0))
    return X, _bases(P=2, dtype=dtype), M.make_levels(VP(), 8)


@pytest.mark.parametrize("field,value,msg", [
    ("gamma", 0.0, r"Levels: gamma must be finite and > 0 \(in torch.float64\), got 0.0 at level"),
    ("s", -1.0, r"Levels: s must be finite and > 0 \(in torch.float64\), got -1.0 at level 0"),
    ("s", float("nan"), "Levels: s must be finite and > 0"),
])
def test_train_step_levels_s_gamma_positive(field, value, msg):
    X, U, lv = _step_args()
    bad = lv._replace(**{field: torch.full((8,), value, dtype=F64)})
    with pytest.raises(ValueError, match=msg):
        M.train_step(X, U, None, bad, 4, 0, 0)


def test_train_step_levels_checked_after_cast_and_in_place_change():
    X, U, lv = _step_args()
    tiny = lv._replace(gamma=torch.full((8,), 1e-50, dtype=F64))
    M.train_step(X, U, None, tiny, 4, 0, 0)  # fine in float64
    with pytest.raises(ValueError, match=r"Levels: gamma must be .* \(in torch.float32\), got 0.0"):
        M.train_step(X.float(), U.float(), None, tiny, 4, 0, 0)  # rounds to 0 in float32
    M.train_step(X, U, None, lv, 4, 0, 0)  # cached table
    lv.gamma[3] = 0.0  # in place: the cached table is rebuilt and checked
    with pytest.raises(ValueError, match="Levels: gamma must be finite and > 0 .* at level 3"):
        M.train_step(X, U, None, lv, 4, 0, 0)


def test_train_step_lr_in_data_dtype():
    X, U, lv = _step_args(torch.float32)
    with pytest.raises(ValueError, match=r"train_step: lr = 1e\+300 overflows X's dtype "
                                         r"torch.float32 \(largest finite value 3.40282e\+38\)"):
        M.train_step(X, U.clone(), None, lv, 4, 0, 0, lr=1e300)
    with pytest.raises(ValueError, match="train_step: lr must be within float64's range, got 1000"):
        M.train_step(X, U.clone(), None, lv, 4, 0, 0, lr=10**400)  # had been an OverflowError
    with pytest.raises(TypeError, match="train_step: lr must be a real number, got str"):
        M.train_step(X, U.clone(), None, lv, 4, 0, 0, lr="a")
    # 1e39 is beyond float32 but not float64: the float64 step applies it
    X, U, lv = _step_args(F64)
    U2 = U.clone()
    _, grad = M.train_step(X, U2, None, lv, 4, 0, 0, lr=1e39)
    torch.testing.assert_close(U2, U - 1e39 * grad, rtol=1e-15, atol=0)


def test_make_levels_pi_named():
    with pytest.raises(TypeError, match="make_levels: pi must hold real numbers, got 'ab'"):
        M.make_levels(VP(), 8, dims=2, pi="ab")
    with pytest.raises(TypeError, match="make_levels: pi must hold real numbers"):
        M.make_levels(VP(), 8, pi=[1, "a"])  # had been named by posterior_mean_coefficients
    lv = M.make_levels(VP(), 8, dims=[1, 2], pi=[0.25, 0.75])
    _, _, bias = M.posterior_mean_coefficients(lv.s, lv.gamma, [1, 2], [0.25, 0.75])
    torch.testing.assert_close(lv.bias, bias, rtol=0, atol=0)


# ------------------------------------------------------------------- numbers of subspace_dae
@pytest.mark.parametrize("kw,name", [(dict(c=True), "c"), (dict(phi=True), "phi"),
                                     (dict(bias=True), "bias")])
@pytest.mark.parametrize("fn", ["subspace_dae", "dae_jacobian_spectrum"])
def test_bools_are_not_numbers(kw, name, fn):
    x = torch.randn(3, 6, dtype=F64)
    a = dict(c=1.0, phi=0.5)
    a.update(kw)
    with pytest.raises(TypeError, match=f"{fn}: {name} must be a number or a tensor, got bool"):
        getattr(M, fn)(x, _bases(), **a)


def test_huge_ints_named():
    x = torch.randn(3, 6, dtype=F64)
    with pytest.raises(ValueError, match="subspace_dae: c must be within float64's range"):
        M.subspace_dae(x, _bases(), 10**400, 0.5)  # had been a bare OverflowError
    with pytest.raises(ValueError, match="f: t must be within float64's range, got 1000"):
        number_or_tensor(10**400, "t", "f")
    assert number_or_tensor(2**70, "t", "f").item() == float(2**70)
    # an int (not a bool) still gives the same as its float
    torch.testing.assert_close(M.subspace_dae(x, _bases(), 2, 1), M.subspace_dae(x, _bases(), 2.0,
                                                                                 1.0))
