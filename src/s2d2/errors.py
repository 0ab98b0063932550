"""Typed exceptions for errors a user can cause.

Every message is one clear sentence; the CLI prints it on stderr and exits with code 2, and the library raises
the same sentence, so callers can catch :class:`S2D2Error` and show it as is.
"""

from __future__ import annotations


class S2D2Error(Exception):
    """Base class of every error a user can cause (bad configuration, model or input)."""


class ConfigError(S2D2Error, ValueError):
    """A decoding option has an invalid value, or two options cannot be combined."""


class ModelLoadError(S2D2Error):
    """A model directory, checkpoint, tokenizer or hub id cannot be loaded."""


class InputError(S2D2Error, ValueError):
    """A prompt cannot be decoded: empty, longer than the model's context, not valid UTF-8, holding the mask token,
    or a chat message holding a special token."""
