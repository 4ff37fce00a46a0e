"""Errors caused by user input. Each carries the fix; the CLI prints it as one message."""

from __future__ import annotations


class FinetuneError(Exception):
    """A problem with the user's config, checkpoint or data. `fix` says what to do about it."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None, group: str | None = None):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix
        # The config group whose declaration the error is about (`checkpoint`, `policy`, `model`):
        # the command names where that group's values came from (its option, file and overrides).
        self.group = group

    def __str__(self) -> str:
        return self.problem if not self.fix else f"{self.problem}\n  fix: {self.fix}"


class ConfigError(FinetuneError):
    """The composed config asks for something impossible (a bad path in `model.add`, ...)."""


class CheckpointError(FinetuneError):
    """The checkpoint file is missing, unreadable, unsafe or does not fit the model."""


class PolicyError(FinetuneError):
    """The freeze/train policy is inconsistent (a glob matches nothing, nothing trains, ...)."""


class AuditError(FinetuneError):
    """Training contradicts the declared plan (a trainable parameter never gets a gradient)."""


class TrainingError(FinetuneError):
    """Training itself went wrong (non-finite loss, unwritable run directory)."""


class RunDirError(FinetuneError):
    """The run directory holds something that must not be overwritten."""
