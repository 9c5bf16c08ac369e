"""Trainers: subspace denoisers (Algorithm 1, :mod:`.subspace`) and network denoisers (:mod:`.network`)."""
from .network import NetworkTrainer
from .subspace import SubspaceTrainer

__all__ = ["SubspaceTrainer", "NetworkTrainer"]
