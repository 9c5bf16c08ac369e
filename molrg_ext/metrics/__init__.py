"""Metrics: subspace recovery and clustering (:mod:`.recovery`), generation scores (:mod:`.generation`)."""
from .recovery import clustering_accuracy, recovery_success, subspace_distance

__all__ = ["subspace_distance", "recovery_success", "clustering_accuracy"]
