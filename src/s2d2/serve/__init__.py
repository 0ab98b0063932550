"""The OpenAI-compatible HTTP server (``s2d2 serve``) and its playground page."""
