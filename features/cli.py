"""``adreach features ...``: batch jobs that write features (mounted by :mod:`infra.cli`).

``features_app`` is the group; each job adds its own command to it (``queries`` and
``relevance-corpus`` here; ``fm-embeddings`` and ``backfill`` from
:mod:`training.embeddings_cli`, registered at the end of this module). Shared helpers
(settings, exit codes, error printing) are imported from :mod:`infra.cli` inside the
commands, after it has finished loading.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import pydantic
import typer

from infra.option_errors import option_errors
from infra.settings import QueryFeatureSettings, Settings

T = TypeVar("T")

features_app = typer.Typer(
    help="Batch feature jobs: LLM/encoder query features, relevance training corpora, foundation-model "
    "embeddings, stream-feature backfills.",
    no_args_is_help=True,
)


def _settings(ctx: typer.Context, **query_overrides: Any) -> Settings:
    from infra.cli import EXIT_USAGE, _fail

    settings = ctx.obj
    assert isinstance(settings, Settings)
    values = {key: value for key, value in query_overrides.items() if value is not None}
    if not values:
        return settings
    try:
        queries = QueryFeatureSettings.model_validate({**settings.queries.model_dump(), **values})
    except pydantic.ValidationError as exc:
        _fail(
            option_errors(exc, values, "queries", {"backend": "--backend", "relevance_samples": "--samples"}),
            EXIT_USAGE,
        )
    return settings.model_copy(update={"queries": queries})


def _set_up(build: Callable[[], T]) -> T:
    """Run a set-up step, turning its known failures into exit codes a user can act on."""
    from features.queries.cache import QueryCacheError
    from features.queries.encoder import EncoderUnavailableError
    from features.queries.taxonomy import TaxonomyError
    from features.queries.vllm_backend import VLLMUnavailableError
    from infra.cli import EXIT_OPERATIONAL, EXIT_USAGE, _fail

    try:
        return build()
    except (TaxonomyError, VLLMUnavailableError) as exc:
        _fail(str(exc), EXIT_USAGE)
    except (EncoderUnavailableError, QueryCacheError) as exc:
        _fail(str(exc), EXIT_OPERATIONAL)


def run_query_features(
    settings: Settings,
    *,
    input_path: Path | None = None,
    until_idle: float | None = None,
    max_seconds: float | None = None,
    group: str | None = None,
    every: float = 2.0,
) -> Any:
    """Run the query-feature pipeline over a file or the Kafka stream; return its stats.

    ``adreach demo`` calls this on the CPU backend after the stream engine.
    """
    from features.queries.pipeline import QueryFeaturePipeline
    from infra.cli import EXIT_USAGE, _fail, require_cluster
    from infra.progress import progress_bar, stderr

    if input_path is None:  # before loading the encoder (seconds): an unreachable cluster is said at once
        require_cluster(settings)
    pipeline = _set_up(lambda: QueryFeaturePipeline(settings))
    stderr.print(
        f"[green]queries:[/] backend {pipeline.backend.generator}; cache {settings.query_cache_path}; "
        f"features -> Feast view query_features in {settings.feature_repo_dir}",
        highlight=False,
    )
    try:
        if input_path is not None:
            from features.queries.sources import QuerySourceError, count_file_events, read_file

            try:
                total = count_file_events(input_path)
                with progress_bar() as bar:
                    task = bar.add_task(f"query features from {input_path.name}", total=total, unit="events")
                    for searches, events, invalid in read_file(input_path):
                        pipeline.process(searches, events)
                        pipeline.stats.invalid_searches += invalid
                        bar.advance(task, events)
                    if total is not None:  # the whole input was read (blank lines are not counted as events)
                        bar.update(task, completed=total)
            except QuerySourceError as exc:
                _fail(str(exc), EXIT_USAGE)
        else:
            _follow_kafka(pipeline, settings, until_idle, max_seconds, group, every)
    finally:
        pipeline.close()
    return pipeline.stats


def _follow_kafka(
    pipeline: Any,
    settings: Settings,
    until_idle: float | None,
    max_seconds: float | None,
    group: str | None,
    every: float,
) -> None:
    from confluent_kafka import KafkaException

    from features.queries.sources import KafkaQuerySource
    from infra.cli import EXIT_OPERATIONAL, _fail
    from infra.progress import lag_text, stderr

    try:
        source = KafkaQuerySource(settings, group=group)
    except KafkaException as exc:
        _fail(f"Kafka at {settings.bootstrap_servers}: {exc}", EXIT_OPERATIONAL)
    stderr.print(
        f"[green]queries:[/] reading search events from {source.topic!r} at {settings.bootstrap_servers} "
        f"(group {source.group!r})",
        highlight=False,
    )
    started = last_event = last_report = time.monotonic()
    try:
        while True:
            searches, messages = source.poll()
            now = time.monotonic()
            if messages:
                last_event = now
                pipeline.process(searches, messages)
                pipeline.stats.invalid_searches = source.undecodable
                source.commit()
            if now - last_report >= every:
                last_report = now
                progress = f"queries: {pipeline.stats.describe()}; {lag_text(source.lag())}"
                stderr.print(progress, highlight=False)
            if max_seconds is not None and now - started >= max_seconds:
                break
            idle = until_idle is not None and now - last_event >= until_idle
            if idle and source.assigned() and source.lag() == 0:
                break
    except KeyboardInterrupt:
        stderr.print("interrupted: every committed batch is stored", highlight=False)
    except KafkaException as exc:
        _fail(f"Kafka at {settings.bootstrap_servers}: {exc}", EXIT_OPERATIONAL)
    finally:
        source.close()


@features_app.command("queries")
def queries_command(
    ctx: typer.Context,
    input_path: Annotated[
        Path | None,
        typer.Option(
            "--input", "-i", help="events.parquet (file or directory) or events.jsonl[.gz]; default: Kafka."
        ),
    ] = None,
    backend: Annotated[str | None, typer.Option(help="cpu or vllm (default: queries.backend).")] = None,
    until_idle: Annotated[
        float | None, typer.Option(help="Kafka: exit once caught up and idle this many seconds.")
    ] = None,
    max_seconds: Annotated[float | None, typer.Option(help="Kafka: exit after this many seconds.")] = None,
    group: Annotated[
        str, typer.Option(help="Kafka consumer group (offsets are committed).")
    ] = "adreach-queries",
    show: Annotated[int, typer.Option(help="Print at most this many rejected model outputs.")] = 10,
) -> None:
    """Query features from search events: category, commercial intent, keywords, embedding -> Feast.

    New queries are normalized and de-duplicated, looked up in the cache (a query is never
    generated twice per backend/model/taxonomy), generated in batches and written to the
    Feast view query_features. Exits 1 when model outputs were rejected (invalid JSON,
    schema violation, category outside the taxonomy); they are counted, never written.
    """
    from infra.cli import EXIT_REJECTED
    from infra.progress import stderr

    settings = _settings(ctx, backend=backend)
    stats = run_query_features(
        settings, input_path=input_path, until_idle=until_idle, max_seconds=max_seconds, group=group
    )
    for rejection in stats.rejections.examples[:show]:
        stderr.print(
            f"rejected {rejection.key!r}: {rejection.reason}: {rejection.detail}",
            highlight=False,
            markup=False,
        )
    print(f"query features: {stats.describe()}")
    if stats.invalid_searches:
        stderr.print(
            f"{stats.invalid_searches:,} search events were not valid events (malformed, a time without a "
            "zone or outside 2000..2100, a blank query) and were left out; `adreach produce` names each one",
            highlight=False,
        )
    if input_path is not None and stats.events and not stats.searches and not stats.invalid_searches:
        stderr.print(
            f"warning: none of the {stats.events:,} lines or rows of {input_path} is a search event "
            '(type "search"; the README\'s Ad events section shows one)',
            highlight=False,
            markup=False,
        )
    if stats.rejections.total or stats.invalid_searches:
        raise typer.Exit(EXIT_REJECTED)


@features_app.command("relevance-corpus")
def relevance_corpus_command(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="The corpus (JSONL); stats go to OUT.stats.json.")],
    pairs: Annotated[
        Path | None, typer.Option(help='Labelled pairs, JSONL: {"query", "ad", "relevant": true|false}.')
    ] = None,
    truth: Annotated[
        Path | None,
        typer.Option(help="Or: a simulation's ground-truth directory (queries and ads with topics)."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="--truth: number of pairs to build.")] = 2_000,
    gold: Annotated[
        Path | None, typer.Option(help="Expert gold set, JSONL like --pairs (default: the packaged one).")
    ] = None,
    samples: Annotated[
        int | None, typer.Option(help="Reasoning samples per pair (default: queries.relevance_samples).")
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="Teacher: cpu or vllm (default: queries.backend).")
    ] = None,
) -> None:
    """Build a query–ad relevance training corpus with AdNanny's data factory.

    A teacher writes reasoning + label, a gold set validates it (slices where it disagrees
    too often are dropped), and reject sampling keeps only reasoning that reaches the
    known label. Exits 1 when no pair was accepted.
    """
    from features.queries.backend import open_backend
    from features.queries.cache import QueryCache
    from features.queries.factory import (
        CorpusInputError,
        ReasoningDataFactory,
        gold_pairs,
        pairs_from_simulation,
        read_pairs,
    )
    from infra.cli import EXIT_REJECTED, EXIT_USAGE, _fail
    from infra.outputs import writable_file

    settings = _settings(ctx, backend=backend, relevance_samples=samples)
    if (pairs is None) == (truth is None):
        _fail("give exactly one of --pairs FILE and --truth DIR", EXIT_USAGE)
    writable_file(out, "--out")
    try:
        labelled = read_pairs(pairs) if pairs is not None else pairs_from_simulation(truth, limit)  # type: ignore[arg-type]
        gold_set = gold_pairs(gold)
    except CorpusInputError as exc:
        _fail(str(exc), EXIT_USAGE)
    teacher = _set_up(lambda: open_backend(settings.queries))
    if samples is not None and samples > 1 and not teacher.emits_reasoning:  # (asked for explicitly)
        from infra.progress import stderr

        stderr.print(
            f"note: the {settings.queries.backend} backend gives one deterministic verdict per pair (no "
            f"reasoning to sample): {settings.queries.relevance_samples} samples per pair are taken as 1; "
            "the vllm backend samples reasoning",
            highlight=False,
            markup=False,
        )
    cache = _set_up(lambda: QueryCache(settings.query_cache_path, 384))  # query categories (slices)
    factory = ReasoningDataFactory(
        teacher,
        cache,
        samples=settings.queries.relevance_samples,
        min_agreement=settings.queries.gold_min_agreement,
    )
    source = str(pairs) if pairs is not None else f"simulation truth {truth}"
    try:
        report = factory.build(labelled, gold_set, out, source)
    finally:
        cache.close()
        teacher.close()
    print(report.describe())
    print(f"corpus: {out} ({report.accepted:,} rows); statistics: {out}.stats.json")
    if report.accepted == 0:
        raise typer.Exit(EXIT_REJECTED)


def demo_query_features(settings: Settings, examples: int = 3) -> None:
    """``adreach demo``: query features from the demo's search events on the CPU backend, then a
    few of them read back through Feast's SDK."""
    from features.definitions import QUERY_FEATURES
    from features.store import open_store
    from infra.progress import stderr

    settings = settings.model_copy(update={"queries": settings.queries.model_copy(update={"backend": "cpu"})})
    stderr.print("[green]queries:[/] query features from the search events (cpu backend)", highlight=False)
    stats = run_query_features(settings, until_idle=3.0, group=f"{settings.stream.consumer_group}-queries")
    print(f"query features: {stats.describe()}")
    if not stats.rows_written:
        return
    queries = ["running shoes", "cheap flights", "mortgage rates"][:examples]
    names = ["category", "commercial_intent", "keywords", "embedding"]
    rows = (
        open_store(settings)
        .get_online_features(
            features=[f"{QUERY_FEATURES.name}:{n}" for n in names],
            entity_rows=[{"query": q} for q in queries],
        )
        .to_dict()
    )
    print("query features read back through Feast (query_features):")
    for i, query in enumerate(queries):
        if rows["category"][i] is None:
            continue
        embedding = rows["embedding"][i]
        print(
            f"  {query!r}: category={rows['category'][i]}, "
            f"commercial_intent={rows['commercial_intent'][i]:.2f}, "
            f"keywords={rows['keywords'][i]}, embedding=[{embedding[0]:.3f}, {embedding[1]:.3f}, ...] "
            f"({len(embedding)}-d)"
        )


def _register_model_features() -> None:
    from training.embeddings_cli import register

    register(features_app)  # issue 7: fm-embeddings, backfill


_register_model_features()
