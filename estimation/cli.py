"""``adreach reach build`` and ``adreach reach serve`` (mounted by :mod:`infra.cli`).

Lives here rather than in :mod:`infra.cli` so that the reach commands are one block to
review; the shared helpers (settings, exit codes, error printing) are imported from
:mod:`infra.cli` inside the commands, after it has finished loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import pydantic
import typer

from infra.option_errors import option_errors
from infra.settings import ReachSettings, Settings

reach_app = typer.Typer(
    help="Reach forecasting: build a stratified in-memory sample, serve estimates over HTTP.",
    no_args_is_help=True,
)


def _reach_settings(ctx: typer.Context, **overrides: Any) -> ReachSettings:
    from infra.cli import EXIT_USAGE, _fail

    settings = ctx.obj
    assert isinstance(settings, Settings)
    values = {key: value for key, value in overrides.items() if value is not None}
    try:
        return ReachSettings.model_validate({**settings.reach.model_dump(), **values})
    except pydantic.ValidationError as exc:
        _fail(option_errors(exc, values, "reach", _OPTIONS), EXIT_USAGE)


# The command-line options that override ``reach.*`` settings, by setting.
_OPTIONS = {
    "sample_rate": "--sample-rate",
    "seed": "--seed",
    "strata_fields": "--strata",
    "host": "--host",
    "port": "--port",
    "shards": "--shards",
    "follow_updates": "--follow",
}


@reach_app.command("build")
def build(
    ctx: typer.Context,
    population: Annotated[
        Path,
        typer.Option(
            "--population",
            help="Population: Parquet, CSV (.csv, .csv.gz) or JSON Lines (.jsonl, .ndjson, .json, "
            "optionally .gz): user_id plus attribute columns.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the sample to.")],
    sample_rate: Annotated[
        float | None, typer.Option(help="Expected fraction of users kept (default: reach.sample_rate).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Hash salt selecting the users (default: reach.seed).")
    ] = None,
    events: Annotated[
        Path | None,
        typer.Option(help="Event history (Parquet file or directory) to learn per-user activity from."),
    ] = None,
    strata: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated attributes to stratify on (default: chosen from data; date and "
            "timestamp columns only when named here)."
        ),
    ] = None,
) -> None:
    """Build a stratified sample (exact totals per stratum, fuzzy fall-back for small strata)."""
    from estimation.activity import ActivityError
    from estimation.build import build_sample
    from estimation.schema import PopulationError
    from estimation.strata import StrataError
    from infra.cli import EXIT_USAGE, _fail
    from infra.progress import stderr

    fields = [name.strip() for name in strata.split(",") if name.strip()] if strata else None
    settings = _reach_settings(ctx, sample_rate=sample_rate, seed=seed, strata_fields=fields)
    if not population.is_file():
        _fail(f"no such population file: {population}", EXIT_USAGE)
    try:
        report = build_sample(
            population, out, settings, events=events, progress=lambda m: stderr.print(f"[dim]{m}[/]")
        )
    except (PopulationError, StrataError, ActivityError) as exc:
        _fail(str(exc), EXIT_USAGE)
    print(report.describe())


@reach_app.command("serve")
def serve(
    ctx: typer.Context,
    sample: Annotated[Path, typer.Option("--sample", help="Directory written by `adreach reach build`.")],
    host: Annotated[str | None, typer.Option(help="Interface to listen on (default: reach.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: reach.port).")] = None,
    shards: Annotated[
        int | None, typer.Option(help="Shard processes; 1 answers in-process (default: reach.shards).")
    ] = None,
    follow: Annotated[
        bool | None,
        typer.Option(
            "--follow/--no-follow", help="Apply user_profile events from Kafka (reach.follow_updates)."
        ),
    ] = None,
    quality: Annotated[
        list[Path] | None,
        typer.Option(
            "--quality",
            help="Provider assessment JSON (adreach quality ... --out) for true_category queries; repeatable "
            "(default: quality.assessments).",
        ),
    ] = None,
) -> None:
    """Serve POST /v1/reach, GET /v1/reach/fields and the OpenAPI docs at /docs."""
    import uvicorn
    from confluent_kafka import KafkaException

    from estimation.forecaster import ReachForecaster
    from estimation.server import create_app
    from estimation.sharding import ShardUnavailableError
    from estimation.store import SampleError
    from estimation.updates import ProfileFollower
    from infra.cli import EXIT_OPERATIONAL, EXIT_USAGE, _fail
    from infra.progress import stderr

    settings = ctx.obj
    assert isinstance(settings, Settings)
    reach = _reach_settings(ctx, host=host, port=port, shards=shards, follow_updates=follow)
    from estimation.quality.forecast import QualityRegistry

    try:
        registry = QualityRegistry.load(quality or settings.quality.assessments)
    except ValueError as exc:
        _fail(str(exc), EXIT_USAGE)
    try:
        forecaster = ReachForecaster.open(sample, shards=reach.shards, settings=reach)
    except SampleError as exc:
        _fail(str(exc), EXIT_USAGE)
    except ShardUnavailableError as exc:
        _fail(str(exc), EXIT_OPERATIONAL)
    follower = None
    try:
        if reach.follow_updates:
            try:
                follower = ProfileFollower(settings.model_copy(update={"reach": reach}), forecaster)
            except KafkaException as exc:
                _fail(f"cannot follow profile updates from Kafka: {exc}", EXIT_OPERATIONAL)
            follower.start()
        info = forecaster.info()
        population = sum(s.get("population", 0) for s in info["shards"])
        size = sum(s.get("sample_users", 0) for s in info["shards"])
        stderr.print(
            f"[green]reach:[/] {size:,} sampled users for {population:,} users in {reach.shards} shard(s); "
            f"http://{reach.host}:{reach.port}/docs" + (f"; following {follower.topic}" if follower else ""),
            highlight=False,
        )
        uvicorn.run(
            create_app(forecaster, follower, quality=registry, quality_settings=settings.quality),
            host=reach.host,
            port=reach.port,
            log_level="warning",
        )
    finally:
        if follower is not None:
            follower.stop()
        forecaster.close()
