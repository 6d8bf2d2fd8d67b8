"""Errors the CLI turns into one clear line and an exit code, never a traceback."""

from __future__ import annotations

from pathlib import Path


class ParityError(Exception):
    """Base class: ``exit_code`` is what the CLI exits with."""

    exit_code = 2

    def __init__(self, path: str | Path | None, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.path}: {self.problem}" if self.path else self.problem


class InputError(ParityError):
    """Bad user input: a job folder, config, preview, LoRA or model file that cannot be used (exit 2)."""

    exit_code = 2


class EnvironmentProblem(ParityError):
    """The machine cannot do what was asked: CUDA absent, base model not found (exit 3)."""

    exit_code = 3


class OutputError(InputError):
    """The report folder (``--out``) cannot be written. Exit 2 when the folder is the problem (a file where a
    folder should be, read-only, not ours), 3 when the machine is (disk full, I/O error). An InputError, so that
    every stage that lets input errors end the run lets this one end it too."""

    def __init__(self, path: str | Path | None, problem: str, exit_code: int = 2):
        self.exit_code = exit_code
        super().__init__(path, problem)
