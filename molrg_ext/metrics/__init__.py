"""Metrics: subspace recovery and clustering (:mod:`.recovery`), generation scores (:mod:`.generation`)."""
from .linearity import edm_sigma_grid, linearity_score  # noqa: F401  (issue 9)
