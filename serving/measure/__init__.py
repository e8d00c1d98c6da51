"""Measurement of served models: the load generator, dense vs pruned comparison, their reports."""
