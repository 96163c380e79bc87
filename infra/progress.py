"""Progress bars for long-running commands, written to stderr so stdout stays parseable."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from infra.compressed import READ_ERRORS, open_binary

# soft_wrap: long messages (file:line: reason) stay on one line, so they can be grepped.
stderr = Console(stderr=True, soft_wrap=True)


class RateColumn(ProgressColumn):
    """Items per second, using the task's own unit (``fields["unit"]``)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None and task.elapsed:
            speed = task.completed / task.elapsed  # rich keeps no speed for tasks completed in one step
        unit = task.fields.get("unit", "items")
        if speed is None:
            return Text(f"? {unit}/s", style="progress.data.speed")
        return Text(f"{speed:,.0f} {unit}/s", style="progress.data.speed")


def progress_bar() -> Progress:
    """A bar with done/total count, percentage, rate, elapsed and remaining time."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=stderr,
        transient=False,
    )


def lag_text(lag: int | None) -> str:
    """A consumer's lag for a progress line; ``None`` while the group has not assigned partitions or fetched.

    Printing 0 there would claim a caught-up consumer over a full topic.
    """
    return f"lag {lag:,}" if lag is not None else "lag not known yet (joining the group, first fetch)"


def count_lines(path: Path) -> int | None:
    """Lines of a text file as a line reader sees them (a last line without a newline counts).

    A gzip file's lines are counted after decompression; ``None`` if the file cannot be
    read to its end (damaged gzip, a read error: the reader then says where it stopped).
    """
    count, last = 0, b"\n"
    try:
        with open_binary(path) as handle:
            while chunk := handle.read(1 << 22):
                count += chunk.count(b"\n")
                last = chunk[-1:]
    except READ_ERRORS:
        return None
    return count + (last != b"\n")
