"""Experiment drivers behind the ``molrg`` CLI (one module per command)."""
