"""``adreach features fm-embeddings`` and ``adreach features backfill`` (registered on the features group).

Kept apart from ``features/cli.py`` so the features group can gain commands from
several places without their code meeting in one file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from training.cli_common import exit_usage, fail, load_data, model_settings, progress_task


def fm_embeddings_command(
    ctx: typer.Context,
    events: Annotated[Path, typer.Option("--events", "-e", help="Event log: Parquet file or directory.")],
    backfill: Annotated[
        bool,
        typer.Option(
            "--backfill/--once",
            help="Replay runs every models.embedding_every_s over the whole log (default), or run once.",
        ),
    ] = True,
    at: Annotated[
        str | None,
        typer.Option("--at", help="With --once: the run's time (RFC 3339; default: end of the log)."),
    ] = None,
    every: Annotated[
        int | None, typer.Option("--every", help="Seconds between runs (default: models.embedding_every_s).")
    ] = None,
) -> None:
    """Write the FM's user embeddings (and each user's last K) into the Feast view fm_embeddings.

    Each run at time T embeds the users active in the last interval from their events
    before T, stamped T: offline rows for point-in-time training sets, online rows for serving.
    """
    import pyarrow as pa

    from features.store import open_store
    from infra.arrow_times import EventTimeError, rfc3339_epoch_ms
    from models.registry import RegistryError
    from training.embeddings import run_times
    from training.pipeline import ModelMismatchError, load_foundation, materialize_embeddings

    settings = model_settings(ctx, embedding_every_s=every)
    try:
        fm, saved = load_foundation(settings)
    except (RegistryError, ModelMismatchError) as exc:
        fail(str(exc), exit_usage())
    at_ms: int | None = None
    if at is not None:
        try:
            at_ms = int(rfc3339_epoch_ms(pa.array([at], pa.string()))[0].as_py())
        except EventTimeError:
            fail(f"--at {at!r}: not an RFC 3339 time such as 2026-01-08T12:00:00Z", exit_usage())
    dataset = load_data(events, settings)
    open_store(settings)
    runs = (
        len(run_times(dataset.start_ms, dataset.end_ms, settings.models.embedding_every_s)) if backfill else 1
    )
    with progress_task("fm-embeddings runs", runs, "runs") as advance:
        stats = materialize_embeddings(
            settings, fm, dataset, backfill=backfill, at_ms=at_ms, progress=advance
        )
    print(
        f"fm v{saved.version}: {stats.runs} runs, {stats.rows:,} rows for {stats.users:,} users "
        f"(embedding {stats.embedding_dim} floats, history of {stats.history}) into view fm_embeddings"
    )
    if stats.skipped:
        print(
            f"{stats.skipped:,} active users left out: the online store already holds a run of theirs at or "
            "after this time (a run back in time would replace what serving reads; use --backfill to rebuild "
            "the history)"
        )


def backfill_command(
    ctx: typer.Context,
    events: Annotated[Path, typer.Option("--events", "-e", help="Event log: Parquet file or directory.")],
    flush: Annotated[
        int | None,
        typer.Option(
            "--flush", help="Seconds of arrivals per engine flush (default: models.replay_flush_s)."
        ),
    ] = None,
) -> None:
    """Replay an event log through the stream engine into Feast's offline store (feature history)."""
    from features.store import open_store
    from training.events import EventLogError, read_events
    from training.replay import replay_stream_features

    settings = model_settings(ctx, replay_flush_s=flush)
    try:
        table = read_events(events)
    except EventLogError as exc:
        fail(str(exc), exit_usage())
    open_store(settings)
    with progress_task("replaying events", table.num_rows, "events") as advance:
        stats = replay_stream_features(
            settings, table, flush_s=settings.models.replay_flush_s, progress=advance
        )
    print(
        f"{stats.events:,} events in {stats.batches} flushes -> "
        f"{stats.feature_rows:,} offline feature rows ({stats.late} late)"
    )


def register(app: typer.Typer) -> None:
    """Add the commands to a ``features`` command group."""
    app.command("fm-embeddings")(fm_embeddings_command)
    app.command("backfill")(backfill_command)
