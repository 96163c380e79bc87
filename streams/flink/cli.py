"""``adreach stream flink``, ``flink-writer`` and ``flink-record`` (mounted by :mod:`infra.cli`).

The shared helpers (settings, exit codes, error printing) are imported from
:mod:`infra.cli` inside the commands, after it has finished loading.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import typer

from infra.option_errors import option_errors
from infra.settings import FlinkSettings, Settings

Source = Literal["kafka", "files"]


def add_flink_commands(app: typer.Typer) -> None:
    """Attach the Flink commands to the ``stream`` command group."""
    app.command("flink")(flink)
    app.command("flink-writer")(flink_writer)
    app.command("flink-record")(flink_record)


def _settings(ctx: typer.Context, **overrides: Any) -> Settings:
    from infra.cli import EXIT_USAGE, _fail

    settings = ctx.obj
    assert isinstance(settings, Settings)
    values = {key: value for key, value in overrides.items() if value is not None}
    try:
        flink = FlinkSettings.model_validate({**settings.flink.model_dump(), **values})
    except pydantic.ValidationError as exc:
        _fail(option_errors(exc, values, "flink", _OPTIONS), EXIT_USAGE)
    return settings.model_copy(update={"flink": flink})


# The command-line options that override ``flink.*`` settings, by setting.
_OPTIONS = {
    "source": "--source",
    "input_dir": "--input",
    "monitor_interval_s": "--monitor",
    "sink": "--sink",
    "output_dir": "--output",
    "jobmanager": "--jobmanager",
    "parallelism": "--parallelism",
}


class _Stop:
    """Ctrl-C asks the loop to finish its batch and return."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: object) -> None:
        from infra.progress import stderr

        stderr.print("stopping: storing what was read (Ctrl-C again to abort)", highlight=False)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.requested = True


def flink(
    ctx: typer.Context,
    source: Annotated[
        str | None, typer.Option(help="kafka (the events topic) or files (default: flink.source).")
    ] = None,
    input_dir: Annotated[
        Path | None,
        typer.Option("--input", help="Files source: JSON Lines files, one per source partition (.gz)."),
    ] = None,
    monitor: Annotated[
        float | None, typer.Option(help="Files source: watch --input for new files every N seconds.")
    ] = None,
    sink: Annotated[
        str | None,
        typer.Option(help="files (JSON part files) or kafka (topic per group); default flink.sink."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Files sink directory (default: flink.output_dir).")
    ] = None,
    jobmanager: Annotated[
        str | None,
        typer.Option(help="Submit to this Flink cluster (REST host:port) instead of a local mini-cluster."),
    ] = None,
    parallelism: Annotated[
        int | None, typer.Option(help="Job parallelism (default: flink.parallelism).")
    ] = None,
    print_sql: Annotated[
        bool, typer.Option("--print-sql", help="Print the generated Flink SQL and exit.")
    ] = False,
    feast: Annotated[
        bool, typer.Option(help="Store the job's rows in Feast from this process (local runs).")
    ] = True,
) -> None:
    """Run the stream features as an Apache Flink job, generated from the feature definitions.

    Locally the job runs on a Flink mini-cluster in this process and its rows are stored
    in Feast as they are committed (a bounded --input replay exits when done). With
    --jobmanager the job is submitted to that cluster and this command exits; run
    `adreach stream flink-writer` next to it to store the rows in Feast.
    """
    from infra.cli import EXIT_OPERATIONAL, EXIT_USAGE, _fail
    from infra.progress import stderr
    from streams.flink.errors import FlinkConfigError, FlinkJobError, FlinkOutputError
    from streams.flink.job import build_job_sql, run_job
    from streams.topics import TopicError

    if input_dir is not None and source is None:
        source = "files"
    settings = _settings(
        ctx,
        source=source,
        input_dir=input_dir,
        monitor_interval_s=monitor,
        sink=sink,
        output_dir=output,
        jobmanager=jobmanager,
        parallelism=parallelism,
    )
    config = settings.flink
    try:
        if print_sql:
            print(build_job_sql(settings).script())
            return
        remote = config.jobmanager is not None
        bounded = config.source == "files" and config.monitor_interval_s is None
        stderr.print(
            f"[green]flink:[/] {config.source} -> {config.sink}, parallelism {config.parallelism}, "
            f"{'cluster ' + str(config.jobmanager) if remote else 'local mini-cluster'}",
            highlight=False,
        )
        if remote or not bounded:
            run = run_job(settings, wait=False)
            stderr.print(f"[green]flink:[/] job {run.job_id} submitted ({run.jvm_start_s:.1f} s JVM start)")
            if remote or not feast:
                print(f"job {run.job_id}; store its rows with: adreach stream flink-writer")
                return
            rows, deleted = _follow(settings)
            print(
                f"flink: job {run.job_id} stopped; {rows:,} feature rows stored in Feast{_deleted(deleted)}"
            )
            return
        run = run_job(settings, wait=True)
        rows, deleted = _store_files(settings) if feast and config.sink == "files" else (0, 0)
    except FlinkConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    except (FlinkJobError, FlinkOutputError, TopicError) as exc:
        _fail(str(exc), EXIT_OPERATIONAL)
    print(
        f"flink: job {run.job_id} finished in {run.run_s:.1f} s (+{run.jvm_start_s:.1f} s JVM start); "
        f"{rows:,} feature rows stored in Feast{_deleted(deleted)}"
    )


def _deleted(users: int) -> str:
    return f"; {users:,} users deleted" if users else ""


def _store_files(settings: Settings) -> tuple[int, int]:
    """Apply the job's committed files: (feature rows stored, users deleted)."""
    from streams.flink.writer import FileOutputWriter

    writer = FileOutputWriter(settings)
    try:
        return writer.apply_new(), writer.users_deleted
    finally:
        writer.close()


def _follow(settings: Settings, until_idle: float | None = None) -> tuple[int, int]:
    """Store the job's rows as they are committed until Ctrl-C (or ``until_idle`` s without rows);
    returns (feature rows stored, users deleted)."""
    from streams.flink.writer import FileOutputWriter, KafkaOutputWriter

    stop = _Stop()
    previous = signal.signal(signal.SIGINT, stop)
    last_rows = time.monotonic()
    writer: FileOutputWriter | KafkaOutputWriter
    writer = FileOutputWriter(settings) if settings.flink.sink == "files" else KafkaOutputWriter(settings)
    try:
        while not stop.requested:
            if isinstance(writer, FileOutputWriter):
                stored = writer.apply_new()
                if not stored:
                    time.sleep(settings.flink.writer_poll_s)
            else:
                stored = writer.poll(settings.flink.writer_poll_s)
            if stored:
                last_rows = time.monotonic()
            elif until_idle is not None and time.monotonic() - last_rows >= until_idle:
                break
        if isinstance(writer, FileOutputWriter):
            writer.apply_new()
        return writer.rows_written, writer.users_deleted
    finally:
        signal.signal(signal.SIGINT, previous)
        writer.close()


def flink_writer(
    ctx: typer.Context,
    sink: Annotated[
        str | None, typer.Option("--from", help="files or kafka: where the job writes (default: flink.sink).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Files sink directory (default: flink.output_dir).")
    ] = None,
    until_idle: Annotated[
        float | None,
        typer.Option(help="Exit after this many seconds without new rows (default: run forever)."),
    ] = None,
) -> None:
    """Store the Flink job's feature rows in Feast's online and offline stores.

    Reads committed part files under the files sink's directory, or the per-group feature
    topics (read_committed) of the Kafka sink; the latest row per entity goes online,
    every row offline.
    """
    from features.online import OnlineStoreError
    from infra.cli import EXIT_OPERATIONAL, _fail
    from streams.flink.errors import FlinkOutputError

    settings = _settings(ctx, sink=sink, output_dir=output)
    if settings.flink.sink == "files" and not settings.flink_output_dir.is_dir():
        from infra.progress import stderr

        stderr.print(
            f"note: {settings.flink_output_dir} does not exist yet: waiting for the Flink job's part files "
            "there (flink.output_dir, --output)",
            highlight=False,
            markup=False,
        )
    try:
        rows, deleted = _follow(settings, until_idle)
    except (FlinkOutputError, OnlineStoreError) as exc:
        _fail(str(exc), EXIT_OPERATIONAL)
    print(f"flink-writer: {rows:,} feature rows stored in Feast{_deleted(deleted)}")


def flink_record(
    ctx: typer.Context,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Directory for partition-NNNN.jsonl.gz files.")
    ],
    topic: Annotated[str | None, typer.Option(help="Topic to record (default: the events topic).")] = None,
) -> None:
    """Record a Kafka topic as per-partition files for `adreach stream flink --input` (exact replays)."""
    from infra.cli import EXIT_OPERATIONAL, _fail
    from streams.flink.replay import ReplayError, record_topic

    try:
        counts = record_topic(_settings(ctx), output, topic)
    except ReplayError as exc:
        _fail(str(exc), EXIT_OPERATIONAL)
    print(f"recorded {sum(counts.values()):,} messages from {len(counts)} partitions into {output}")
