"""Files a user names (config files, grids, checkpoint JSON): read with one clear sentence for whatever is wrong."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from s2d2.errors import ModelLoadError, S2D2Error


def parse_json_file(path: str | os.PathLike[str], error: type[S2D2Error] = ModelLoadError,
                    label: str | None = None) -> Any:
    """The JSON value in a file, of any shape; a missing, unreadable or invalid file is ``error``, one sentence that
    calls the file ``label`` (default: its path)."""
    path = Path(path)
    name = label or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{name} does not exist.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{name} cannot be read ({type(e).__name__}).") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{name} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from None
