"""The errors a training raises: one base class, so a trainer's command line reports any of them."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training cannot start or go on."""


class DatasetError(TrainingError, ValueError):
    """The training data is empty or inconsistent."""


class ConfigMismatchError(TrainingError):
    """A checkpoint was made with a different training config."""


class NonFiniteLossError(TrainingError):
    """The loss (or gradient norm) became NaN or infinite."""
