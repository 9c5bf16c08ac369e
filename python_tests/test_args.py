"""The shared argument parsers of molrg_ext._args: integers and subspace dimensions."""
import numpy as np
import pytest
import torch

import molrg_ext as M
from molrg_ext.cluster import KSubspaces
from molrg_ext.data import sample_from_bases, sample_molrg
from molrg_ext.metrics.recovery import subspace_distance
from molrg_ext.schedules import VP
from molrg_ext.train.subspace import SubspaceTrainer
from molrg_ext._args import as_int, dims_list, is_one_value


def test_as_int_accepts_integer_likes_and_refuses_the_rest():
    assert as_int(3, "a", "f") == 3
    assert as_int(np.int32(3), "a", "f") == 3
    assert as_int(torch.tensor(3), "a", "f") == 3
    for bad in (2.0, 2.9, True, None, "3", torch.tensor(3.0)):
        with pytest.raises(TypeError, match="f: a must be an int"):
            as_int(bad, "a", "f")


def test_as_int_bounds():
    assert as_int(0, "a", "f", 0, 4) == 0 and as_int(3, "a", "f", 0, 4) == 3
    with pytest.raises(ValueError, match=r"f: a must be in \[0, 4\), got 4"):
        as_int(4, "a", "f", 0, 4)
    with pytest.raises(ValueError, match=r"f: a must be in \[0, 4\), got -1"):
        as_int(-1, "a", "f", 0, 4)
    with pytest.raises(ValueError, match="f: a must be >= 1, got 0"):
        as_int(0, "a", "f", 1)
    with pytest.raises(ValueError, match="f: a must be in < 4, got 9"):
        as_int(9, "a", "f", hi=4)


def test_is_one_value():
    assert is_one_value(3) and is_one_value(np.int64(3)) and is_one_value(torch.tensor(3))
    assert is_one_value(np.array(3))
    assert not is_one_value([3]) and not is_one_value(torch.tensor([3]))
    assert not is_one_value(np.array([3, 4]))


@pytest.mark.parametrize("dims, K, out", [
    (2, 3, [2, 2, 2]),
    (2, None, [2]),
    (torch.tensor(2), 2, [2, 2]),
    (np.int64(4), 1, [4]),
    ([1, 2, 3], None, [1, 2, 3]),
    ((1, 2), 2, [1, 2]),
    (torch.tensor([3, 1]), 2, [3, 1]),
    (np.array([3, 1]), None, [3, 1]),
])
def test_dims_list_forms(dims, K, out):
    got = dims_list(dims, K, "f")
    assert got == out and all(type(d) is int for d in got)


@pytest.mark.parametrize("dims, K, kw, err, msg", [
    ([2, 2.9], 2, {}, TypeError, r"f: dims\[1\] must be an int, got 2.9"),
    (2.0, 2, {}, TypeError, "f: dims must be an int, got 2.0"),
    (True, 2, {}, TypeError, "f: dims must be an int"),
    (None, 2, {}, TypeError, "f: dims must be an int, got None"),
    ("ab", 2, {}, TypeError, "f: dims must be a sequence of ints"),
    (torch.tensor([1.0, 2.0]), 2, {}, TypeError, "f: dims must hold integers"),
    ([2, 0], 2, {}, ValueError, r"f: dims\[1\] must be >= 1, got 0"),
    (0, 2, {}, ValueError, "f: dims must be >= 1"),
    ([2, 2, 2], 2, {}, ValueError, "f: dims must have K = 2 entries, got 3"),
    ([], None, {}, ValueError, r"f: dims is empty \(K = 0\)"),
    (np.ones((2, 2), dtype=np.int64), 2, {}, ValueError, "1-D sequence"),
    ([2, 7], 2, dict(hi=6), ValueError, r"f: dims\[1\] = 7 must be <= n = 6"),
    ([7], 1, dict(hi=6, hi_name="dmax", name="d"), ValueError, r"f: d\[0\] = 7 must be <= dmax = 6"),
])
def test_dims_list_errors_name_the_argument(dims, K, kw, err, msg):
    with pytest.raises(err, match=msg):
        dims_list(dims, K, "f", **kw)


def test_every_dims_parser_is_the_shared_one():
    """The public entry points give dims=[2, 2.9] and dims=[2, 0] the same errors, named by
    their own function: one parser, not one per module."""
    X = torch.randn(2, 8, 5)
    U = torch.linalg.qr(torch.randn(2, 5, 3))[0]
    calls = {
        "sample_molrg": lambda d: sample_molrg(5, d, N=4),
        "sample_from_bases": lambda d: sample_from_bases(U, d, N=4),
        "subspace_dae": lambda d: M.subspace_dae(X[0], U, 1.0, 1.0, dims=d),
        "train_step": lambda d: M.train_step(X[:1], U[None], d, M.make_levels(VP(), L=4), 4, 0, 0),
        "make_levels": lambda d: M.make_levels(VP(), L=4, dims=d),
        "subspace_distance": lambda d: subspace_distance(U, U, dims=d),
        "SubspaceTrainer": lambda d: SubspaceTrainer(2, d),
        "SubspaceDAE": lambda d: M.SubspaceDAE(5, d),
        "KSubspaces": lambda d: KSubspaces(2, d).fit(X.reshape(-1, 5)),
    }
    for where, call in calls.items():
        with pytest.raises(TypeError, match=rf"{where}: dims\[1\] must be an int, got 2.9"):
            call([2, 2.9])
        with pytest.raises(ValueError, match=rf"{where}: dims\[1\] must be >= 1, got 0"):
            call([2, 0])


def test_review_edge_cases_of_the_shared_parsers():
    """Iterators count as sequences; bool tensors are not ints; one int for dims follows the K
    that pi gives; SubspaceDAE names a non-int dims as such; numbers beyond float32 for phi reach
    the op's non-finite check (named) instead of failing in torch.full."""
    x = torch.randn(4, 5)
    U = torch.linalg.qr(torch.randn(2, 5, 3))[0]
    ref = M.subspace_dae(x, U, 1.0, 1.0, dims=[2, 3])
    assert torch.equal(M.subspace_dae(x, U, 1.0, 1.0, dims=iter([2, 3])), ref)
    assert sample_molrg(5, map(int, "23"), N=4).dims == [2, 3]
    assert M.SubspaceDAE(5, (d for d in [2, 3])).dims == [2, 3]
    assert float(subspace_distance(U, U, dims=iter([2, 3]))) < 1e-6  # parsed once, used twice
    for bad in (torch.tensor(True), np.array(True)):
        with pytest.raises(TypeError, match="subspace_dae: dims must be an int"):
            M.subspace_dae(x, U, 1.0, 1.0, dims=bad)
    for bad in (2.0, None, True):
        with pytest.raises(TypeError, match="SubspaceDAE: dims must be an int"):
            M.SubspaceDAE(5, bad)
    with pytest.raises(ValueError, match="SubspaceDAE: K is required"):
        M.SubspaceDAE(5, 2)
    _, _, bias = M.posterior_mean_coefficients(1.0, 0.5, dims=2, pi=[0.5, 0.5])
    _, _, bias2 = M.posterior_mean_coefficients(1.0, 0.5, dims=[2, 2], pi=[0.5, 0.5])
    assert bias.shape == (2,) and torch.equal(bias, bias2)
    lv = M.make_levels(VP(), L=4, dims=2, pi=[0.2, 0.8])
    assert lv.bias.shape == (4, 2)
    with pytest.raises(RuntimeError, match="subspace_dae: phi contains NaN or Inf"):
        M.subspace_dae(x, U, 1.0, 1e39)
    y = M.subspace_dae(x, U, 3.4028235e38, 1.0)  # rounds to float32's largest finite value
    assert y.shape == x.shape  # accepted (c rounds to float32's largest finite value)
