"""Metrics: subspace recovery and clustering (:mod:`.recovery`), generation scores (:mod:`.generation`)."""
from .generation import (  # noqa: E402,F401
    copy_detection_score,
    gl_score,
    max_cosine_similarity,
    nearest_neighbor_distances,
    nn_distance_sum,
)
