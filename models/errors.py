"""Errors raised while reading a model: they name the file and the problem.

Loaders catch low-level exceptions (struct errors, JSON errors, numpy shape
errors) at the file boundary and re-raise them as `ModelLoadError`, so a user
sees "model.safetensors: truncated: ..." instead of a traceback from deep
inside a parser.
"""

from __future__ import annotations

from pathlib import Path


class ModelLoadError(Exception):
    """A model file or folder could not be used."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnknownArchitectureError(ModelLoadError):
    """The checkpoint names an architecture the registry does not know."""
