"""The ``adreach`` command line.

Every command reads the one settings object (``--config FILE`` / ``ADREACH_CONFIG`` /
``./adreach.toml``, then ``ADREACH_*`` variables). Progress goes to stderr, results
to stdout. Exit codes: 0 success, 1 the work ran but something was rejected or not
delivered, 2 bad usage or configuration, 3 an operational error (broker, Kafka).
"""

from __future__ import annotations

import logging
import sys
import time
from enum import StrEnum
from gzip import GzipFile
from io import BufferedIOBase
from pathlib import Path
from typing import Annotated, BinaryIO, NoReturn

import pydantic
import rich.markup
import typer

from estimation.cli import reach_app
from estimation.quality.cli import quality_app
from features.cli import demo_query_features, features_app
from infra.compressed import (
    damage_hint,
    decompressed,
    json_lines_command,
    lines_until_damaged,
    open_binary,
    starts_like_json_array,
)
from infra.help_text import reflow_help, show_setting_defaults
from infra.progress import LineTotal, lag_text, progress_bar, stderr
from infra.settings import KAFKA_LOGGER, ConfigFileError, Settings, load_settings
from infra.signals import InterruptGuard, threads_ignore_sigint
from streams.flink.cli import add_flink_commands
from training.cli import evaluate_command, train_app

app = typer.Typer(
    name="adreach",
    help="Streaming ad features and audience estimation: Kafka events in, Feast features and reach out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
broker_app = typer.Typer(help="Run the embedded Kafka-compatible broker (Tansu).", no_args_is_help=True)
app.add_typer(broker_app, name="broker")
stream_app = typer.Typer(help="Turn events into windowed features in Feast.", no_args_is_help=True)
app.add_typer(stream_app, name="stream")
app.add_typer(reach_app, name="reach")  # issue 5: reach build / reach serve (estimation/cli.py)
app.add_typer(quality_app, name="quality")  # issue 6: quality user / aggregate (estimation/quality/cli.py)
app.add_typer(features_app, name="features")  # issue 8: features queries / relevance-corpus (features/cli.py)
app.add_typer(train_app, name="train")  # issue 7: train fm / train vm (training/cli.py)
app.command("evaluate")(evaluate_command)  # issue 7 (training/cli.py)
add_flink_commands(stream_app)  # issue 4: stream flink / flink-writer / flink-record (streams/flink/cli.py)

EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_OPERATIONAL = 3
EXIT_INTERRUPTED = 130  # the shell convention for Ctrl-C


class OutputFormat(StrEnum):
    kafka = "kafka"
    jsonl = "jsonl"
    parquet = "parquet"


def _fail(message: str, code: int) -> NoReturn:
    # The message is plain text: "[gpu]" in "pip install -e '.[gpu]'" is not markup.
    stderr.print(f"[bold red]error:[/] {rich.markup.escape(message)}", highlight=False)
    raise typer.Exit(code)


def _settings(ctx: typer.Context) -> Settings:
    settings = ctx.obj
    assert isinstance(settings, Settings)
    return settings


@app.callback()
def _main(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="TOML settings file (default: $ADREACH_CONFIG or ./adreach.toml)."
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also show the Kafka client's own log lines.")
    ] = False,
) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger(KAFKA_LOGGER).setLevel(logging.INFO if verbose else logging.CRITICAL)
    try:
        ctx.obj = load_settings(config)
    except ConfigFileError as exc:
        _fail(str(exc), EXIT_USAGE)
    except pydantic.ValidationError as exc:
        _fail(f"invalid settings:\n{exc}", EXIT_USAGE)


# -- broker ---------------------------------------------------------------------------------


@broker_app.command("start")
def broker_start(ctx: typer.Context) -> None:
    """Start the embedded broker on broker.host:broker.port and wait until it is ready."""
    from streams.broker import BrokerError, EmbeddedBroker
    from streams.topics import TopicError, ensure_topics

    settings = _settings(ctx)
    broker = EmbeddedBroker(settings)
    was_running = broker.status().running
    try:
        status = broker.start()
        created = ensure_topics(settings) if settings.uses_embedded_broker else []
    except (BrokerError, TopicError) as exc:
        _fail(str(exc), EXIT_OPERATIONAL)
    print(("already running: " if was_running else "started: ") + status.describe())
    if created:
        print(f"created topics: {', '.join(created)}")
    if not settings.uses_embedded_broker:
        stderr.print(
            f"[yellow]note:[/] kafka.bootstrap_servers is set to {settings.bootstrap_servers}; "
            "adreach clients use that cluster, not this embedded broker."
        )


@broker_app.command("stop")
def broker_stop(ctx: typer.Context) -> None:
    """Stop the embedded broker (its in-memory topics are discarded)."""
    from streams.broker import EmbeddedBroker

    broker = EmbeddedBroker(_settings(ctx))
    print("stopped embedded broker" if broker.stop() else "embedded broker was not running")


@broker_app.command("status")
def broker_status(ctx: typer.Context) -> None:
    """Say whether the embedded broker runs; exit 1 when it does not."""
    from streams.broker import EmbeddedBroker

    status = EmbeddedBroker(_settings(ctx)).status()
    print(status.describe())
    if not status.running:
        raise typer.Exit(EXIT_REJECTED)


# -- schema ---------------------------------------------------------------------------------


@app.command("schema")
def schema(
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write to this file instead of stdout.")
    ] = None,
) -> None:
    """Print the JSON Schema of the ad events (for producers in other languages)."""
    from streams.schema_file import render_schema

    text = render_schema()
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        print(f"wrote {out}")


# -- produce --------------------------------------------------------------------------------


@app.command("produce")
def produce(
    ctx: typer.Context,
    file: Annotated[
        str, typer.Argument(help="JSON Lines file of events (plain or gzip), or - for standard input.")
    ],
    topic: Annotated[str | None, typer.Option(help="Target topic (default: kafka.topics.events).")] = None,
    show: Annotated[int, typer.Option(help="Print at most this many rejected lines.")] = 20,
) -> None:
    """Validate and produce JSON Lines events; bad lines are reported and dead-lettered.

    Exits 1 when any line was rejected (all good lines are still delivered).
    """
    from streams.ingest import IngestReport, produce_lines
    from streams.producer import DeliveryError, EventProducer
    from streams.topics import TopicError, ensure_topics, existing_topics

    settings = _settings(ctx)
    total: LineTotal | None = None
    if file == "-":
        source = "<stdin>"
        handle: BinaryIO | BufferedIOBase = decompressed(sys.stdin.buffer)
    else:
        path = Path(file)
        if path.is_dir():
            _fail(f"{file} is a directory; give a JSON Lines file (or - for standard input)", EXIT_USAGE)
        if not path.is_file():
            _fail(f"no such file: {file}", EXIT_USAGE)
        try:
            handle = open_binary(path)  # (reads the first bytes: gzip or not)
        except OSError as exc:
            _fail(f"cannot read {file}: {exc.strerror or exc}", EXIT_USAGE)
        source, total = path.name, LineTotal(path)
    if starts_like_json_array(handle):
        convert = f"{json_lines_command(file, isinstance(handle, GzipFile))} | adreach produce -"
        _fail(
            f"{source} starts with '[': it looks like one JSON array, and produce reads JSON Lines (one "
            f"event object per line). Nothing was sent. Convert it first, e.g.: {convert}",
            EXIT_USAGE,
        )
    damage: list[str] = []
    try:
        ensure_topics(settings)
        if topic is not None and topic not in existing_topics(settings):
            stderr.print(
                f"warning: topic {topic!r} does not exist: the cluster creates it on the first write if it "
                "allows that (with its default partitions and configs), else the sends fail; the stream "
                f"engine reads kafka.topics.events = {settings.kafka.topics.events!r}",
                highlight=False,
                markup=False,
            )
    except TopicError as exc:
        _fail(str(exc), EXIT_OPERATIONAL)
    with threads_ignore_sigint():  # Ctrl-C must interrupt our read of the input, not a helper thread
        producer = EventProducer(settings, on_invalid="dead_letter", topic=topic)
        bar = progress_bar()
        bar.start()
    delivery_error: DeliveryError | None = None
    unconfirmed = 0
    with InterruptGuard() as interrupts, handle, bar:
        task = bar.add_task(f"producing {source}", total=None if total is None else total.total, unit="lines")
        read = 0

        def advance(lines: int) -> None:
            nonlocal read
            read += lines
            bar.advance(task, lines)
            if total is not None:
                bar.update(task, total=total.estimate(handle, read))

        if interrupts.requested:  # Ctrl-C during start-up: read nothing
            report = IngestReport(source=source, interrupted=True)
        else:
            with interrupts.interruptible():  # produce_lines turns Ctrl-C into report.interrupted
                report = produce_lines(
                    producer,
                    lines_until_damaged(handle, damage),
                    source,
                    progress=lambda _b, n: advance(n),
                )
        bar.update(task, description=f"flushing {source}")
        try:
            producer.close()
        except DeliveryError as exc:
            delivery_error = exc
        except KeyboardInterrupt:  # a second Ctrl-C while waiting for Kafka
            unconfirmed = producer.in_flight
    interrupted = report.interrupted or interrupts.requested
    for rejection in report.rejections[:show]:
        stderr.print(rejection.describe(source), highlight=False, markup=False)
    if report.rejected > show:
        stderr.print(f"... and {report.rejected - show} more rejected lines", highlight=False)
    stats = producer.stats
    print(
        f"sent {report.sent:,} events to {producer.topic} ({stats.delivered:,} acknowledged), "
        f"rejected {report.rejected:,} lines ({stats.dead_letters_delivered:,} dead-lettered to "
        f"{producer.dead_letter_topic}), {stats.failed:,} delivery failures, {report.lines:,} lines "
        f"in {report.seconds:.1f} s ({report.events_per_second:,.0f} events/s)"
    )
    if damage:
        stderr.print(
            f"{source}: reading stopped after line {report.lines:,}: {damage[0]} ({damage_hint(handle)}); "
            "every line before it was sent or rejected as reported",
            highlight=False,
            markup=False,
        )
    if delivery_error is not None:
        _fail(str(delivery_error), EXIT_REJECTED)
    if unconfirmed:
        stderr.print(
            f"interrupted while waiting for Kafka: {unconfirmed:,} queued records were not confirmed "
            "and may not have been delivered"
        )
        raise typer.Exit(EXIT_INTERRUPTED)
    if interrupted:
        stderr.print(
            f"interrupted at line {report.lines:,}: every line before it was sent or rejected as reported "
            "(that line itself may or may not have been)"
        )
        raise typer.Exit(EXIT_INTERRUPTED)
    if report.rejected or damage:
        raise typer.Exit(EXIT_REJECTED)


# -- simulate -------------------------------------------------------------------------------


@app.command("simulate")
def simulate_command(
    ctx: typer.Context,
    users: Annotated[int | None, typer.Option(help="Population size (default: simulate.users).")] = None,
    days: Annotated[float | None, typer.Option(help="Simulated days (default: simulate.days).")] = None,
    events: Annotated[
        int | None, typer.Option(help="Approximate event count (default: simulate.events).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default: simulate.seed).")] = None,
    output_format: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="Where events go.")
    ] = OutputFormat.kafka,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Directory for JSON Lines/Parquet output and the ground truth."),
    ] = Path("sim-output"),
) -> None:
    """Simulate users, campaigns and ad traffic; write events and save the ground truth.

    Events go to Kafka (default), to OUT/events.jsonl or to OUT/events/*.parquet; the
    ground truth (population, providers' confusion matrices, response model, shifts)
    always goes to OUT/truth/.
    """
    settings = _settings(ctx)
    overrides = {
        key: value
        for key, value in {"users": users, "days": days, "events": events, "seed": seed}.items()
        if value is not None
    }
    summary, refused = _run_simulation(settings, overrides, output_format, out)
    print(summary)
    if refused:  # simulated events the SDK refused: dead-lettered, not delivered
        raise typer.Exit(EXIT_REJECTED)


def _run_simulation(
    settings: Settings, overrides: dict[str, int | float], output_format: OutputFormat, out: Path
) -> tuple[str, int]:
    """Simulate into ``output_format``; the summary, and how many events the SDK refused (Kafka only)."""
    from streams.ingest import KafkaEventSink
    from streams.producer import DeliveryError, EventProducer
    from streams.simulation import JsonLinesSink, ParquetSink, SimulationConfig, Simulator, simulate
    from streams.topics import TopicError, ensure_topics

    try:
        config = SimulationConfig.from_settings(settings.simulate, **overrides)
    except ValueError as exc:
        _fail(str(exc), EXIT_USAGE)
    if out.exists() and not out.is_dir():
        _fail(f"--out {out} is a file; give a directory for the events and the ground truth", EXIT_USAGE)
    out.mkdir(parents=True, exist_ok=True)
    sink: ParquetSink | JsonLinesSink | KafkaEventSink
    if output_format is OutputFormat.kafka:
        try:
            ensure_topics(settings)
        except TopicError as exc:
            _fail(str(exc), EXIT_OPERATIONAL)
        sink = KafkaEventSink(EventProducer(settings, on_invalid="dead_letter"))
        where = f"Kafka topic {settings.kafka.topics.events} at {settings.bootstrap_servers}"
    elif output_format is OutputFormat.jsonl:
        sink = JsonLinesSink(out / "events.jsonl")
        where = str(out / "events.jsonl")
    else:
        sink = ParquetSink(out / "events")
        where = str(out / "events")
    with progress_bar() as bar:
        task = bar.add_task("building population", total=None, unit="events")
        simulator = Simulator(config)
        bar.update(task, description="simulating events", total=config.events)
        try:
            summary = simulate(
                config, sink, out / "truth", progress=lambda n: bar.advance(task, n), simulator=simulator
            )
        except DeliveryError as exc:
            _fail(str(exc), EXIT_OPERATIONAL)
        bar.update(task, total=summary.events, completed=summary.events)
    counts = ", ".join(f"{name} {count:,}" for name, count in sorted(summary.counts.items()))
    lines = [
        f"simulated {summary.events:,} events from {config.users:,} users in {summary.seconds:.1f} s "
        f"({summary.events / max(summary.seconds, 1e-9):,.0f} events/s)",
        f"  by type: {counts}",
        f"  event time: {summary.first_event_time} .. {summary.last_event_time}",
        f"  events: {where}",
        f"  ground truth: {out / 'truth'}",
    ]
    if isinstance(sink, KafkaEventSink):
        stats = sink.producer.stats
        lines.append(
            f"  delivered: {stats.delivered:,} events acknowledged by Kafka, "
            f"{stats.dead_lettered:,} dead-lettered"
        )
        if sink.invalid:
            lines.append(f"  [!] {sink.invalid} simulated events failed validation and were dead-lettered")
    return "\n".join(lines), sink.invalid if isinstance(sink, KafkaEventSink) else 0


# -- stream ---------------------------------------------------------------------------------


@stream_app.command("run")
def stream_run(
    ctx: typer.Context,
    until_idle: Annotated[
        float | None,
        typer.Option(
            help="Exit once caught up and no event arrived for this many seconds (default: run forever)."
        ),
    ] = None,
    max_seconds: Annotated[float | None, typer.Option(help="Exit after this many seconds.")] = None,
    group: Annotated[
        str | None,
        typer.Option(
            help="Consumer group (default: stream.consumer_group); workers in one group share the work."
        ),
    ] = None,
    worker_id: Annotated[
        str | None, typer.Option(help="Name of this worker in logs and group listings.")
    ] = None,
    every: Annotated[float, typer.Option(help="Seconds between progress lines.")] = 2.0,
) -> None:
    """Run a stream worker in the foreground: events from Kafka become windowed features in Feast.

    Prints throughput, feature rows written, dead-lettered events and consumer lag every
    few seconds. Ctrl-C finishes the current cycle (features stored, state checkpointed)
    and exits; start more workers with the same --group to split the partitions.
    """
    settings = _settings(ctx)
    if group:
        settings = settings.model_copy(
            update={"stream": settings.stream.model_copy(update={"consumer_group": group})}
        )
    summary = _run_stream(
        settings, until_idle=until_idle, max_seconds=max_seconds, worker_id=worker_id, every=every
    )
    print(summary)


@app.command("dead-letters")
def dead_letters(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, help="Show the newest this many.")] = 20,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per dead letter (JSON Lines).")
    ] = False,
) -> None:
    """Show the newest rejected messages of the dead-letter topic: when, the error class, where
    each came from (file line, or topic, partition and offset) and why, then its start.

    Reads without joining a consumer group (nothing is committed). --json prints every header
    and the whole original value, one object per line, for tools.
    """
    import json

    from streams.dead_letters import DeadLetterTopicError, describe, newest_dead_letters

    settings = _settings(ctx)
    require_cluster(settings)
    try:
        letters = newest_dead_letters(settings, limit)
    except DeadLetterTopicError as exc:
        _fail(str(exc), EXIT_OPERATIONAL)
    if as_json:
        for letter in letters:
            print(json.dumps(letter.as_json(), ensure_ascii=False))
        return
    topic = settings.kafka.topics.dead_letter
    if not letters:
        print(f"no dead letters in {topic}")
        return
    for letter in letters:
        print(describe(letter))
    print(f"{len(letters):,} newest dead letters of {topic} (--limit {limit})")


def require_cluster(settings: Settings) -> None:
    """Exit with the client's cause (code 3) unless a broker of ``kafka.bootstrap_servers``
    answers: a consumer alone would wait for an assignment forever, saying nothing."""
    from streams.topics import KafkaUnavailableError, cluster_metadata

    try:
        cluster_metadata(settings)
    except KafkaUnavailableError as exc:
        _fail(str(exc), EXIT_OPERATIONAL)


def _warn_not_compiled(what: str, source: str, fallback: str) -> None:
    """Say that an optional C extension is missing, what runs instead, and how to get it."""
    stderr.print(
        f"[yellow]stream: the compiled {what} ({source}) is not installed; {fallback} "
        "(same results, slower). Reinstall with a C compiler at hand: pip install -e .[/]",
        highlight=False,
    )


def _run_stream(
    settings: Settings,
    *,
    until_idle: float | None,
    max_seconds: float | None,
    worker_id: str | None = None,
    every: float = 2.0,
) -> str:
    import signal

    from streams.topics import KafkaUnavailableError

    require_cluster(settings)  # before the worker's imports (Feast's take seconds)
    from streams.engine.worker import StreamError, StreamStats, StreamWorker

    last_report = [time.monotonic(), 0]

    def report(stats: StreamStats, rows: int) -> None:
        now = time.monotonic()
        if now - last_report[0] < every:
            return
        rate = (stats.events - last_report[1]) / (now - last_report[0])
        last_report[:] = [now, stats.events]
        stderr.print(
            f"stream: {stats.events:,} events ({rate:,.0f}/s), {stats.feature_rows:,} feature rows written, "
            f"{stats.dead_lettered:,} dead-lettered ({stats.late:,} late, {stats.future:,} future), "
            + lag_text(worker.lag()),
            highlight=False,
        )

    try:
        worker = StreamWorker(settings, worker_id=worker_id, on_cycle=report)
    except KafkaUnavailableError as exc:
        _fail(str(exc), EXIT_OPERATIONAL)
    stderr.print(
        f"[green]stream:[/] group {settings.stream.consumer_group!r} reading "
        f"{settings.kafka.topics.events!r} at {settings.bootstrap_servers}; "
        f"features -> Feast repo {settings.feature_repo_dir}",
        highlight=False,
    )
    from features.online import COMPILED_RESP_AVAILABLE
    from streams.engine.decode import FAST_DECODE_AVAILABLE
    from streams.engine.kernels import KERNELS_AVAILABLE

    if settings.stream.compiled_decode and not FAST_DECODE_AVAILABLE:
        _warn_not_compiled("decoder", "streams/engine/_fastdecode.c", "decoding with msgspec alone")
    if not KERNELS_AVAILABLE:
        _warn_not_compiled("state kernels", "streams/engine/_kernels.c", "summing and merging with NumPy")
    redis = settings.features.online_store == "redis"
    if redis and settings.features.compiled_redis_writer and not COMPILED_RESP_AVAILABLE:
        _warn_not_compiled("Redis writer", "features/_resp.c", "encoding writes with Arrow")

    def on_interrupt(signum: int, frame: object) -> None:
        stderr.print("stopping: finishing the current cycle (Ctrl-C again to abort)", highlight=False)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        worker.stop()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        stats = worker.run(max_seconds=max_seconds, idle_exit_s=until_idle)
    except StreamError as exc:
        _fail(str(exc), EXIT_OPERATIONAL)
    finally:
        signal.signal(signal.SIGINT, previous)
    elapsed = time.monotonic() - stats.started
    return (
        f"stream: {stats.events:,} events in {elapsed:.1f} s ({stats.events_per_second:,.0f}/s); "
        f"{stats.feature_rows:,} feature rows written; {stats.dead_lettered:,} dead-lettered "
        f"({stats.malformed:,} malformed, {stats.late:,} late, {stats.future:,} future); "
        f"{stats.users_deleted:,} users deleted; {stats.store_retries} store retries"
    )


# -- demo -----------------------------------------------------------------------------------


@app.command("demo")
def demo(
    ctx: typer.Context,
    events: Annotated[int, typer.Option(help="Approximate number of events to simulate.")] = 1_000_000,
    users: Annotated[int, typer.Option(help="Simulated population size.")] = 100_000,
    out: Annotated[
        Path | None, typer.Option(help="Where to keep the ground truth (default: <state_dir>/demo).")
    ] = None,
    keep_broker: Annotated[
        bool, typer.Option("--keep-broker", help="Leave an embedded broker the demo started running.")
    ] = False,
) -> None:
    """End to end on the embedded default: broker, simulated traffic into Kafka, stream features into Feast.

    Starts the embedded broker, simulates a population and ~1M events into Kafka, runs the
    stream engine until it has caught up, and prints a few users' fresh features read back
    through Feast; then turns the search queries into query features (CPU encoder).
    """
    from streams.broker import BrokerError, EmbeddedBroker

    settings = _settings(ctx)
    started = time.perf_counter()
    broker = EmbeddedBroker(settings)
    started_broker = False
    if settings.uses_embedded_broker:
        started_broker = not broker.status().running
        try:
            status = broker.start()
        except BrokerError as exc:
            _fail(str(exc), EXIT_OPERATIONAL)
        stderr.print(f"[green]broker:[/] {status.describe()}", highlight=False)
    out = out or settings.state_dir / "demo"
    settings = _demo_settings(settings, out)
    try:
        summary, _ = _run_simulation(settings, {"events": events, "users": users}, OutputFormat.kafka, out)
        print(summary)
        stderr.print("[green]stream:[/] computing windowed features into Feast", highlight=False)
        print(_run_stream(settings, until_idle=3.0, max_seconds=None))
        demo_query_features(settings)  # issue 8: query features on the CPU backend (features/cli.py)
    finally:
        if started_broker and not keep_broker:
            broker.stop()
    _print_fresh_features(settings, out)
    _demo_reach(settings, out)
    _demo_quality(settings, out)
    print(f"demo finished in {time.perf_counter() - started:.1f} s")
    if started_broker and keep_broker:
        print(f"the embedded broker keeps running at {broker.address}; stop it with `adreach broker stop`")


def _demo_settings(settings: Settings, out: Path) -> Settings:
    """A fresh feature repository, consumer group and repartition topic for this demo run."""
    import shutil
    import uuid

    run = uuid.uuid4().hex[:8]
    repo = out / "feature_repo"
    shutil.rmtree(repo, ignore_errors=True)
    stream = settings.stream.model_copy(
        update={
            "consumer_group": f"adreach-demo-{run}",
            "repartition_topic": f"{settings.stream.repartition_topic}.demo-{run}",
            "state_dir": out / "stream" / run,
        }
    )
    features = settings.features.model_copy(update={"repo_dir": repo})
    return settings.model_copy(update={"stream": stream, "features": features})


def _print_fresh_features(settings: Settings, out: Path, users: int = 3) -> None:
    """Read a few active users' features back through Feast's own SDK, as a model would."""
    import pyarrow.dataset as ds

    from features.store import open_store

    history = ds.dataset(settings.feature_repo_dir / "data" / "user_activity", format="parquet").to_table(
        columns=["user_id", "impressions_24h"]
    )
    if history.num_rows == 0:
        print("no user features were written")
        return
    busiest = history.sort_by([("impressions_24h", "descending")]).column("user_id").to_pylist()
    chosen = list(dict.fromkeys(busiest))[:users]
    names = [
        "impressions_1h",
        "clicks_24h",
        "ctr_24h",
        "searches_24h",
        "distinct_ads_24h",
        "last_clicked_ads",
    ]
    store = open_store(settings)
    rows = store.get_online_features(
        features=[f"user_activity:{name}" for name in names], entity_rows=[{"user_id": u} for u in chosen]
    ).to_dict()
    print("fresh features read back through Feast (user_activity):")
    for i, user in enumerate(chosen):
        values = ", ".join(f"{name}={rows[name][i]!r}" for name in names)
        print(f"  {user}: {values}")
    print(f"feature repository: {settings.feature_repo_dir}")


def _demo_reach(settings: Settings, out: Path) -> None:
    """Issue 5: a reach sample from the simulated population and a few example forecasts."""
    from estimation.demo import print_reach_examples

    print("reach forecasts (estimate vs exact):")
    print_reach_examples(out / "truth", out / "reach-sample", settings.reach)


def _demo_quality(settings: Settings, out: Path) -> None:
    """Issue 6: the simulated providers' quality, from a panel and from campaign aggregates."""
    from estimation.quality.demo import print_quality_report

    print("data-source quality of the simulated providers:")
    print_quality_report(out / "truth", out / "reach-sample", settings)


reflow_help(app)  # (after every command above is registered)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: the app as Typer builds it, option help showing settings' values."""
    command = typer.main.get_command(app)
    show_setting_defaults(command)
    command(args=argv, prog_name="adreach")


if __name__ == "__main__":
    main()
