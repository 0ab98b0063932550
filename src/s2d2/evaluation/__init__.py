"""Measuring decoders: accuracy on the bundled tasks, the benchmark grid, tuning, lm-eval, data parallelism and trace
plots."""
