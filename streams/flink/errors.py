"""The Flink path's errors, in a module light enough for the CLI to import before anything heavy."""

from __future__ import annotations


class FlinkConfigError(ValueError):
    """The settings cannot run the job (a missing jar, input directory, ...); the message says what to fix."""


class FlinkJobError(RuntimeError):
    """Flink rejected or failed the job; the message carries Flink's reason."""


class FlinkOutputError(RuntimeError):
    """The job's output could not be read or stored; the message names the file or topic."""
