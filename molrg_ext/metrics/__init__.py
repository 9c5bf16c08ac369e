"""Metrics: subspace recovery and clustering (:mod:`.recovery`), generation scores (:mod:`.generation`)."""
