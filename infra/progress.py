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

from infra.compressed import READ_ERRORS, is_gzip, open_binary

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


class LineTotal:
    """The total a progress bar over the lines of ``path`` shows: counted, or estimated for gzip.

    A plain file's lines are counted up front (a scan at disk speed). A gzip file's are
    not: counting them would decompress the whole file a second time (about a tenth of
    ``adreach produce``'s time); the total is instead extrapolated from the lines read so
    far and how far through the compressed bytes the reader is, so the percentage and the
    time left are right from the start and the total converges on the exact count.
    """

    def __init__(self, path: Path) -> None:
        self._compressed_size = path.stat().st_size if is_gzip(path) else None
        self.total = None if self._compressed_size is not None else count_lines(path)

    def estimate(self, handle: object, lines_read: int) -> int | None:
        """The total after ``lines_read`` lines of ``handle`` (the reader opened on ``path``)."""
        if self._compressed_size is None:
            return self.total
        raw = getattr(handle, "fileobj", None)  # a GzipFile's underlying file
        position = raw.tell() if raw is not None and not raw.closed else 0
        if position <= 0 or lines_read <= 0:
            return None
        return max(lines_read, round(lines_read * self._compressed_size / position))
