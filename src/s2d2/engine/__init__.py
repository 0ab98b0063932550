"""Executing the algorithm's forwards: the single-row runner and the batched engine (continuous batching)."""
