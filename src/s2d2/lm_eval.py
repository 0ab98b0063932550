"""``python -m s2d2.lm_eval``: lm-eval's own command line with the ``s2d2`` model registered and the package's tasks
added (the command the README documents; the plugin itself is :mod:`s2d2.evaluation.lm_eval`)."""

from s2d2.evaluation.lm_eval import S2D2LM, main

__all__ = ["S2D2LM", "main"]

if __name__ == "__main__":
    main()
