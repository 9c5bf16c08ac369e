"""Metrics: subspace recovery and clustering (:mod:`.recovery`), generation scores (:mod:`.generation`)."""
from .generation import (
    copy_detection_score,
    gl_score,
    max_cosine_similarity,
    nearest_neighbor_distances,
    nn_distance_sum,
)
from .linearity import edm_sigma_grid, linearity_score
from .recovery import clustering_accuracy, recovery_success, subspace_distance

__all__ = [
    "subspace_distance",
    "recovery_success",
    "clustering_accuracy",
    "gl_score",
    "copy_detection_score",
    "max_cosine_similarity",
    "nearest_neighbor_distances",
    "nn_distance_sum",
    "linearity_score",
    "edm_sigma_grid",
]
