"""Trainers: subspace denoisers (Algorithm 1, :mod:`.subspace`) and network denoisers (:mod:`.network`)."""
from .subspace import SubspaceTrainer

__all__ = ["SubspaceTrainer"]
