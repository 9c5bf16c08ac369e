"""Trainers: subspace denoisers (Algorithm 1, :mod:`.subspace`) and network denoisers (:mod:`.network`)."""
from .network import NetworkTrainer  # noqa: E402,F401
