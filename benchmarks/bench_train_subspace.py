"""SubspaceTrainer (Algorithm 1) end to end: 50 SGD steps on one phase-transition cell
(P = 20 instances, n = 48, K = 2, d = 4, N_k = 8, batch 128, QR retraction), autograd engine vs
the fused ``train_step`` engine. Single-threaded, as the phase-transition command runs."""
import pytest
import torch

import molrg_ext
from molrg_ext.data import sample_molrg
from molrg_ext.train import SubspaceTrainer


@pytest.mark.parametrize("engine", ["autograd", "fused"])
def test_trainer_50_steps(benchmark, run_case, engine):
    torch.set_num_threads(1)
    data = sample_molrg(48, [4, 4], counts=[8, 8], instances=20, seed=0)
    if engine == "fused" and not hasattr(molrg_ext, "train_step"):
        run_case(None)
    tr = SubspaceTrainer(2, 4, mode="hard", init="paper", lr=0.5, batch=128, steps=50,
                         tol=None, engine=engine)
    benchmark.group = "SubspaceTrainer 50 steps P=20 n=48 K=2 d=4 M=128"
    run_case(lambda: tr.fit(data.X, data.bases), rounds=3)
