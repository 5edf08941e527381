"""Reading a JSON object from a user-supplied file, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

from aerosynth.data.errors import InputError


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path``.

    Args:
        path: the file to read.

    Returns:
        The parsed object.

    Raises:
        InputError: the file is unreadable, not JSON, or holds something other than an object.
    """
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"unreadable JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise InputError(path, "expected a JSON object")
    return doc
