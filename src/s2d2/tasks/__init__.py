"""Seeded synthetic tasks for training and evaluating small block-diffusion models."""
