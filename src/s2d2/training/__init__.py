"""Making models: the bundled model's training loop and tiny random checkpoints of every family."""
