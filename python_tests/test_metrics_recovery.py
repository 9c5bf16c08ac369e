import itertools
import math

import pytest
import torch

from molrg_ext.metrics import clustering_accuracy, recovery_success, subspace_distance
from molrg_ext.modules import random_orthonormal


def line(theta, n=5, offset=0):
    u = torch.zeros(n, 1, dtype=torch.float64)
    u[offset, 0], u[offset + 1, 0] = math.cos(theta), math.sin(theta)
    return u


def test_angle_between_lines_spectral_and_fro():
    for theta in (0.0, 0.3, 1.0, math.pi / 2):
        A = line(0.0)[None]
        B = line(theta)[None]
        assert math.isclose(subspace_distance(A, B).item(), math.sin(theta), abs_tol=1e-12)
        assert math.isclose(subspace_distance(A, B, norm="fro").item(),
                            math.sqrt(2) * math.sin(theta), abs_tol=1e-12)


def test_invariant_to_rotation_within_subspace_and_to_permutation():
    g = torch.Generator().manual_seed(0)
    U = random_orthonormal(12, 3, 4, 3, generator=g, dtype=torch.float64)  # [P=4, K=3, 12, 3]
    R = random_orthonormal(3, 3, 4, 3, generator=g, dtype=torch.float64)
    est = (U @ R)[:, [2, 0, 1]]
    dist, perm = subspace_distance(est, U, return_perm=True)
    assert dist.shape == (4,) and torch.all(dist < 1e-12)
    assert perm.tolist() == [[1, 2, 0]] * 4


def test_hungarian_equals_brute_force_over_permutations():
    g = torch.Generator().manual_seed(1)
    A = random_orthonormal(6, 2, 5, 3, generator=g, dtype=torch.float64)
    B = random_orthonormal(6, 2, 5, 3, generator=g, dtype=torch.float64)
    dist = subspace_distance(A, B, norm="fro")
    for p in range(5):
        best = min(
            sum(torch.linalg.matrix_norm(A[p, pi[k]] @ A[p, pi[k]].T - B[p, k] @ B[p, k].T).item()
                for k in range(3)) / 3
            for pi in itertools.permutations(range(3)))
        assert math.isclose(dist[p].item(), best, rel_tol=1e-10)


def test_padded_dims_ignore_extra_columns():
    g = torch.Generator().manual_seed(2)
    U = random_orthonormal(10, 4, 2, generator=g, dtype=torch.float64)
    junk = U.clone()
    junk[1, :, 2:] = torch.randn(10, 2, generator=g, dtype=torch.float64)
    assert subspace_distance(junk, U, dims=[4, 2]).item() < 1e-12
    assert subspace_distance(junk, U, dims=[4, 4]).item() > 0.1


def test_recovery_success_and_clustering_accuracy():
    assert recovery_success(torch.tensor([0.1, 0.5, 0.51])).tolist() == [True, True, False]
    lab = torch.tensor([0, 0, 1, 1, 2, 2])
    assert clustering_accuracy(lab, torch.tensor([2, 2, 0, 0, 1, 1])).item() == 1.0
    assert math.isclose(clustering_accuracy(lab, torch.tensor([2, 2, 0, 1, 1, 1])).item(), 5 / 6)
    batch = clustering_accuracy(torch.stack([lab, lab]), torch.stack([lab, torch.zeros(6).long()]))
    assert torch.allclose(batch, torch.tensor([1.0, 1 / 3], dtype=torch.float64))


def test_bad_input():
    U = torch.randn(2, 5, 2)
    with pytest.raises(ValueError, match="norm"):
        subspace_distance(U, U, norm="nuc")
    with pytest.raises(ValueError, match="differ in K or n"):
        subspace_distance(U, torch.randn(3, 5, 2))
    with pytest.raises(ValueError, match="NaN"):
        subspace_distance(U * float("nan"), U)
    with pytest.raises(ValueError, match="dims"):
        subspace_distance(U, U, dims=[3, 1])
    with pytest.raises(TypeError, match=r"dims_true\[0\] must be an int, got 1.5"):
        subspace_distance(U, U, dims=[2, 1], dims_true=[1.5, 2])
    with pytest.raises(ValueError, match="U_est must be"):
        subspace_distance(torch.randn(5, 2), U)
    with pytest.raises(ValueError, match="differ in shape"):
        clustering_accuracy(torch.zeros(3).long(), torch.zeros(4).long())
    with pytest.raises(TypeError, match="integers"):
        clustering_accuracy(torch.zeros(3), torch.zeros(3))
