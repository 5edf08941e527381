"""The one error type for bad input, so every layer reports it the same way."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad user input: a file, a field or a value that aerosynth cannot use.

    Its message is one line, ``"<where>: <problem>"``, so the CLI can print it as is.

    Args:
        where: the file path or config field at fault.
        problem: what is wrong with it, in a few words.
    """

    def __init__(self, where: str | Path, problem: str) -> None:
        self.where = str(where)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.where}: {self.problem}")
