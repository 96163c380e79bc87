"""Query features (issue 8): the real MiniLM encoder on CPU, the cache, Feast, the data factory,
and the vLLM backend's requests and validation (its real run is the GPU test at the end)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from features.definitions import QUERY_FEATURES, normalize_query
from features.queries.backend import QueryBatch
from features.queries.cache import QueryCache
from features.queries.cpu import CPUBackend
from features.queries.encoder import MiniLMEncoder
from features.queries.factory import LabelledPair, ReasoningDataFactory, ad_creative, gold_pairs
from features.queries.pipeline import QueryFeaturePipeline
from features.queries.schema import Judgement, Rejection, parse_query_output, parse_relevance_output
from features.queries.taxonomy import load_taxonomy
from features.queries.vllm_backend import (
    ChatRequest,
    VLLMBackend,
    VLLMUnavailableError,
    engine_kwargs,
    fp8_supported,
    query_requests,
    relevance_requests,
    structured_output_kwargs,
)
from infra.settings import QueryFeatureSettings, Settings, load_settings
from streams.simulation.topics import TOPICS, query_pools

# all-MiniLM-L6-v2 through Hugging Face transformers' BertModel + mean pooling + L2 norm
# (computed once outside the project): the first 8 dimensions of three embeddings.
REFERENCE = {
    "running shoes": [-0.04353, 0.02253, -0.00661, 0.03244, 0.02999, -0.02869, -0.02638, -0.01371],
    "Cheap car insurance near me!": [0.01751, 0.1186, 0.0682, 0.03173, 0.06411, 0.02076, 0.04831, 0.06327],
    "stride trail running shoes 2026": [
        -0.13391,
        0.04018,
        0.02169,
        -0.01078,
        -0.00478,
        0.01799,
        -0.08115,
        0.00741,
    ],
}


@pytest.fixture(scope="module")
def cpu_backend() -> CPUBackend:
    return CPUBackend(QueryFeatureSettings())


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return load_settings(state_dir=tmp_path / "state")


def simulator_queries(per_topic: int, seed: int = 3) -> tuple[list[str], list[str]]:
    """Queries the simulator draws, with the topic each was drawn for."""
    rng = np.random.default_rng(seed)
    queries: list[str] = []
    topics: list[str] = []
    for topic, pool in zip(TOPICS, query_pools(rng), strict=True):
        picked = rng.choice(len(pool), size=min(per_topic, len(pool)), replace=False)
        queries += [str(pool[i]) for i in picked]
        topics += [topic.segment] * len(picked)
    return queries, topics


def searches(queries: Sequence[str], start_us: int = 1_767_571_200_000_000) -> pa.Table:
    return pa.table(
        {
            "query": pa.array(list(queries), pa.string()),
            "event_time": pa.array([start_us + i for i in range(len(queries))], pa.timestamp("us", "UTC")),
        }
    )


class CountingBackend:
    """The real CPU backend, counting which queries reach ``generate``."""

    def __init__(self, inner: CPUBackend) -> None:
        self.inner = inner
        self.name = inner.name
        self.generator = inner.generator
        self.taxonomy = inner.taxonomy
        self.emits_reasoning = inner.emits_reasoning
        self.encoder = inner.encoder
        self.generated: list[str] = []

    def generate(self, queries: Sequence[str]) -> QueryBatch:
        self.generated += list(queries)
        return self.inner.generate(queries)

    def judge(self, pairs: Sequence[tuple[str, str]], samples: int = 1) -> list[list[Judgement | Rejection]]:
        return self.inner.judge(pairs, samples)

    def close(self) -> None:
        pass


# -- the encoder


def test_embeddings_match_the_reference_model_and_are_deterministic(cpu_backend: CPUBackend) -> None:
    texts = list(REFERENCE)
    exact = MiniLMEncoder(dtype=torch.float32).encode(texts)
    np.testing.assert_allclose(exact[:, :8], np.asarray(list(REFERENCE.values())), atol=2e-5)
    first = cpu_backend.embed(texts)  # the default precision (bfloat16 where the CPU has it)
    assert first.shape == (3, 384) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    assert np.einsum("ij,ij->i", first, exact).min() > 0.999
    again = cpu_backend.embed(texts)
    assert np.array_equal(first, again)
    # Batch composition (padding, order) does not change a query's embedding beyond float noise.
    mixed = cpu_backend.embed(
        ["a much longer query about gaming laptops for students", texts[1], "x", texts[0]]
    )
    assert np.einsum("ij,ij->i", mixed[[3, 1]], first[:2]).min() > 0.9999


def test_tokenizer_follows_bert_uncased(cpu_backend: CPUBackend) -> None:
    tokenizer = cpu_backend.encoder.tokenizer
    vocab = {i: t for t, i in tokenizer.vocab.items()}

    def tokens(text: str) -> list[str]:
        return [vocab[i] for i in tokenizer.encode(text)]

    assert tokens("Running  SHOES") == ["[CLS]", "running", "shoes", "[SEP]"]
    assert tokens("don't,stop") == ["[CLS]", "don", "'", "t", ",", "stop", "[SEP]"]
    assert tokens("Café") == tokens("cafe")  # accents stripped
    assert "##" in "".join(tokens("fleetfoot"))  # a brand is cut into word pieces
    assert len(tokenizer.encode("word " * 500)) == tokenizer.max_length


# -- the CPU backend's features


def test_taxonomy_classifier_clearly_beats_chance_on_simulator_queries(cpu_backend: CPUBackend) -> None:
    queries, topics = simulator_queries(per_topic=25)
    batch = cpu_backend.generate([normalize_query(q) for q in queries])
    predicted = [r.category for r in batch.records]
    accuracy = float(np.mean([p == t for p, t in zip(predicted, topics, strict=True)]))
    chance = 1 / len(cpu_backend.taxonomy.categories)
    assert accuracy >= 0.8, f"accuracy {accuracy:.2f} (chance {chance:.2f})"
    assert all(r.category in cpu_backend.taxonomy for r in batch.records)
    assert all(0.0 <= r.commercial_intent <= 1.0 for r in batch.records)
    assert all(len(r.keywords) <= 5 and r.query not in r.keywords for r in batch.records)


def test_commercial_intent_separates_shopping_from_questions(cpu_backend: CPUBackend) -> None:
    shopping = [
        "buy cheap running shoes",
        "espresso machine deals",
        "discount gaming laptop",
        "book hotel deals",
    ]
    questions = [
        "how do volcanoes form",
        "what is photosynthesis",
        "history of the olympic games",
        "why do we dream",
    ]
    intent = {r.query: r.commercial_intent for r in cpu_backend.generate(shopping + questions).records}
    assert min(intent[q] for q in shopping) > max(intent[q] for q in questions)


def test_relevance_threshold_agrees_with_the_gold_set(cpu_backend: CPUBackend) -> None:
    gold = gold_pairs()
    verdicts = cpu_backend.judge([(p.query, p.ad) for p in gold])
    agreement = np.mean(
        [(v[0].label == "relevant") == p.relevant for v, p in zip(verdicts, gold, strict=True)]
    )
    assert agreement >= 0.8
    assert 0.0 < cpu_backend.relevance_threshold < 1.0
    assert all(isinstance(v[0], Judgement) and v[0].reasoning == "" for v in verdicts)


# -- pipeline, cache and Feast


def test_cache_prevents_regeneration(cpu_backend: CPUBackend, settings: Settings) -> None:
    counting = CountingBackend(cpu_backend)
    pipeline = QueryFeaturePipeline(settings, counting, write_features=False)
    pipeline.process(searches(["Running Shoes", "running  shoes", "cheap flights", "running shoes"]))
    assert sorted(counting.generated) == ["cheap flights", "running shoes"]
    pipeline.process(searches(["cheap flights", "CHEAP FLIGHTS", "yoga mat"]))
    assert sorted(counting.generated) == ["cheap flights", "running shoes", "yoga mat"]
    pipeline.close()
    # A new run (new process state) finds everything in the persistent cache.
    again = CountingBackend(cpu_backend)
    second = QueryFeaturePipeline(settings, again, write_features=False)
    batch = second.features_for(["running shoes", "yoga mat", "cheap flights"])
    assert again.generated == [] and second.stats.cache_hits == 3
    fresh = cpu_backend.generate(["yoga mat"])
    cached = next(i for i, r in enumerate(batch.records) if r.query == "yoga mat")
    assert np.array_equal(batch.embeddings[cached], fresh.embeddings[0])
    assert batch.records[cached] == fresh.records[0]
    second.close()


def test_features_are_readable_through_feast(cpu_backend: CPUBackend, settings: Settings) -> None:
    from features.store import open_store

    queries, _ = simulator_queries(per_topic=2)
    pipeline = QueryFeaturePipeline(settings, cpu_backend, write_features=True)
    written = pipeline.process(searches(queries + [q.upper() for q in queries]))
    keys = list(dict.fromkeys(normalize_query(q) for q in queries))
    assert written == len(keys) == pipeline.stats.rows_written
    names = ["embedding", "category", "category_score", "commercial_intent", "keywords", "generator"]
    rows = (
        open_store(settings)
        .get_online_features(
            features=[f"{QUERY_FEATURES.name}:{n}" for n in names],
            entity_rows=[{"query": q} for q in keys[:5]] + [{"query": "never searched"}],
        )
        .to_dict()
    )
    # What was generated (and cached) is exactly what Feast returns.
    cached = pipeline.cache.get(cpu_backend.generator, keys[:5])
    position = {r.query: i for i, r in enumerate(cached.records)}
    for i, query in enumerate(keys[:5]):
        record = cached.records[position[query]]
        assert rows["category"][i] == record.category
        assert rows["keywords"][i] == list(record.keywords)
        assert rows["generator"][i] == cpu_backend.generator
        assert rows["embedding"][i] == cached.embeddings[position[query]].tolist()
        assert rows["commercial_intent"][i] == pytest.approx(record.commercial_intent, abs=1e-9)
    assert rows["embedding"][5] is None and rows["category"][5] is None
    pipeline.close()


def canned(answers: dict[str, list[str]]) -> Any:
    """A stand-in for the vLLM engine: fixed answer texts per request key."""

    def complete(requests: Sequence[ChatRequest]) -> list[list[str]]:
        return [answers[r.key][: r.n] for r in requests]

    return complete


def test_malformed_model_output_is_rejected_with_a_counted_reason(
    cpu_backend: CPUBackend, settings: Settings
) -> None:
    answers = {
        "running shoes": ['{"category": "running", "commercial_intent": 0.7, "keywords": ["jogging", "5k"]}'],
        "cheap flights": ['{"category": "travel", "commercial_intent": 0.9, '],  # truncated
        "yoga mat": ['{"category": "yoga", "commercial_intent": 0.5, "keywords": []}'],  # not in the taxonomy
        "lawn mower": ['{"category": "gardening", "commercial_intent": 1.7, "keywords": []}'],  # out of range
        "dog food": ["Sure! The category is pets."],
    }
    backend = VLLMBackend(
        QueryFeatureSettings(model_path="/nonexistent"), complete=canned(answers), encoder=cpu_backend.encoder
    )
    pipeline = QueryFeaturePipeline(settings, backend, write_features=True)
    pipeline.process(searches(list(answers)))
    counts = pipeline.stats.rejections.counts
    assert dict(counts) == {"invalid_json": 2, "out_of_taxonomy": 1, "schema_violation": 1}
    assert pipeline.stats.rows_written == 1 and pipeline.stats.generated == 1
    assert pipeline.cache.count(backend.generator) == 1
    from features.online import OnlineFeatureReader

    with OnlineFeatureReader(settings, (QUERY_FEATURES,)) as reader:
        stored = reader.read(QUERY_FEATURES, list(answers), ["category", "keywords"]).to_pylist()
    assert [row["category"] for row in stored] == ["running", None, None, None, None]
    assert stored[0]["keywords"] == ["jogging", "5k"]
    pipeline.close()


# -- the vLLM backend without a GPU (vllm is never imported)


def test_vllm_engine_configuration_for_fp8_and_bf16() -> None:
    settings = QueryFeatureSettings(model_path="/models/instruct", max_model_len=2048)
    fp8 = engine_kwargs(settings, "fp8")
    bf16 = engine_kwargs(settings, "bf16")
    assert fp8["quantization"] == "fp8" and "quantization" not in bf16
    assert fp8["dtype"] == bf16["dtype"] == "bfloat16"
    assert fp8["model"] == "/models/instruct" and fp8["max_model_len"] == 2048
    assert engine_kwargs(settings)["quantization"] == "fp8"  # the settings' default
    with pytest.raises(VLLMUnavailableError, match="model_path"):
        engine_kwargs(QueryFeatureSettings())
    assert fp8_supported((9, 0)) and fp8_supported((8, 9)) and not fp8_supported((8, 0))
    assert "vllm" not in sys.modules


def test_vllm_requests_carry_the_prompt_schema_and_sampling() -> None:
    settings = QueryFeatureSettings(model_path="/m", keyword_expansions=4, relevance_temperature=0.8)
    taxonomy = load_taxonomy()
    requests = query_requests(["running shoes", "cheap flights"], settings, taxonomy)
    assert [r.key for r in requests] == ["running shoes", "cheap flights"]
    system = requests[0].messages[0]["content"]
    assert all(f"- {c.id}: " in system for c in taxonomy.categories)
    assert requests[0].messages[1] == {"role": "user", "content": "Query: running shoes"}
    assert requests[0].schema["properties"]["category"]["enum"] == list(taxonomy.ids)
    assert requests[0].schema["properties"]["keywords"]["maxItems"] == 4
    assert requests[0].sampling_kwargs() == {"n": 1, "temperature": 0.0, "max_tokens": 384, "seed": 0}
    assert requests[0].group_key() == requests[1].group_key()  # one batched LLM.chat call
    pairs = relevance_requests([("running shoes", "Swiftpace trainers")], settings, samples=4)
    assert pairs[0].n == 4 and pairs[0].temperature == 0.8
    assert list(pairs[0].schema["properties"]) == ["reasoning", "label"]  # reasoning before the label
    assert relevance_requests([("q", "a")], settings, samples=1)[0].temperature == 0.0

    class Params:
        def __init__(self, json: dict[str, Any]) -> None:
            self.json = json

    new_api = structured_output_kwargs(SimpleNamespace(StructuredOutputsParams=Params), requests[0].schema)
    old_api = structured_output_kwargs(SimpleNamespace(GuidedDecodingParams=Params), requests[0].schema)
    assert new_api["structured_outputs"].json == old_api["guided_decoding"].json == requests[0].schema
    with pytest.raises(VLLMUnavailableError):
        structured_output_kwargs(SimpleNamespace(), requests[0].schema)
    assert "vllm" not in sys.modules


def test_output_validation() -> None:
    taxonomy = load_taxonomy()
    ok = parse_query_output(
        "q", '{"category":"pets","commercial_intent":0,"keywords":["Dog  Toys","q"]}', taxonomy, 5
    )
    assert not isinstance(ok, Rejection) and ok.keywords == ("dog toys",)
    extra = parse_query_output(
        "q", '{"category":"pets","commercial_intent":0,"keywords":[],"x":1}', taxonomy, 5
    )
    too_many = parse_query_output(
        "q", json.dumps({"category": "pets", "commercial_intent": 0.1, "keywords": ["a"] * 6}), taxonomy, 5
    )
    assert isinstance(extra, Rejection) and extra.reason == "schema_violation"
    assert isinstance(too_many, Rejection) and too_many.reason == "schema_violation"
    judged = parse_relevance_output("k", '{"reasoning": "Both are about running.", "label": "relevant"}')
    assert judged == Judgement("relevant", "Both are about running.")
    maybe = parse_relevance_output("k", '{"reasoning": "unsure", "label": "maybe"}')
    assert isinstance(maybe, Rejection) and maybe.reason == "schema_violation"


# -- the reasoning data factory


def test_factory_drops_failing_slices_and_keeps_only_correct_reasoning(
    cpu_backend: CPUBackend, tmp_path: Path
) -> None:
    reasoning = {
        True: '{"reasoning": "The query asks for running shoes and the ad sells them.", "label": "relevant"}',
        False: '{"reasoning": "The ad is about something else.", "label": "irrelevant"}',
    }
    running_ad = ad_creative("ad1", "running")
    travel_ad = ad_creative("ad2", "travel")
    pairs = [
        LabelledPair("p1", "trail running shoes", running_ad, True),  # samples: wrong, broken, right
        LabelledPair("p2", "marathon training plan", travel_ad, False),  # no sample right
        LabelledPair("p3", "cheap flights", travel_ad, True),  # in a slice the gold set fails
    ]
    answers = {
        f"{pairs[0].query}\t{running_ad}": [reasoning[False], "not json", reasoning[True]],
        f"{pairs[1].query}\t{travel_ad}": [reasoning[True], reasoning[True], reasoning[True]],
    }
    # Gold: the teacher answers correctly about running, and the gold labels for travel are the
    # opposite of its answers, so the travel slice fails validation.
    gold = [
        LabelledPair("g1", "running shoes", running_ad, True),
        LabelledPair("g2", "jogging shoes", travel_ad, False),
    ]
    gold += [
        LabelledPair(f"g{i}", q, travel_ad, False)
        for i, q in enumerate(["hotel deals", "flights to rome"], 3)
    ]
    answers.update({f"{g.query}\t{g.ad}": [reasoning[True]] for g in gold[2:]})
    answers.update({f"{g.query}\t{g.ad}": [reasoning[g.relevant]] for g in gold[:2]})
    teacher = VLLMBackend(
        QueryFeatureSettings(model_path="/m"), complete=canned(answers), encoder=cpu_backend.encoder
    )
    # The teacher's slices (query categories) come from the CPU backend through a shared cache.
    cache = QueryCache(tmp_path / "cache.sqlite", 384)
    for query in [
        "trail running shoes",
        "marathon training plan",
        "cheap flights",
        "running shoes",
        "jogging shoes",
        "hotel deals",
        "flights to rome",
    ]:
        record = cpu_backend.generate([query])
        cache.put(teacher.generator, record)
    factory = ReasoningDataFactory(teacher, cache, samples=3, min_agreement=0.7, min_gold_per_slice=2)
    report = factory.build(pairs, gold, tmp_path / "corpus.jsonl", "test pairs")
    assert report.failing_slices == ["travel"] and report.gold_agreement == pytest.approx(0.5)
    assert report.dropped_failing_slice == 1 and report.no_correct_sample == 1 and report.accepted == 1
    assert dict(report.invalid_outputs.counts) == {"invalid_json": 1}
    rows = [json.loads(line) for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["p1"] and rows[0]["label"] == "relevant"
    assert rows[0]["reasoning"].startswith("The query asks") and rows[0]["provenance"]["sample"] == 2
    stats = json.loads((tmp_path / "corpus.jsonl.stats.json").read_text())
    assert stats["accepted"] == 1 and stats["gold"]["failing_slices"] == ["travel"]


def test_relevance_corpus_command_on_the_cpu_backend(tmp_path: Path, cpu_backend: CPUBackend) -> None:
    queries, topics = simulator_queries(per_topic=1)
    pairs = tmp_path / "pairs.jsonl"
    with pairs.open("w") as handle:
        for i, (query, topic) in enumerate(zip(queries, topics, strict=True)):
            other = TOPICS[(i + 5) % len(TOPICS)].segment
            handle.write(
                json.dumps({"query": query, "ad": ad_creative(f"a{i}", topic), "relevant": True}) + "\n"
            )
            handle.write(
                json.dumps({"query": query, "ad": ad_creative(f"b{i}", other), "relevant": False}) + "\n"
            )
    out = tmp_path / "corpus.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "infra.cli",
            "features",
            "relevance-corpus",
            "--pairs",
            str(pairs),
            "--out",
            str(out),
            "--samples",
            "3",
        ],
        capture_output=True,
        text=True,
        env={**_env(tmp_path)},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "writes no reasoning" in result.stdout and "gold agreement" in result.stdout
    assert "3 samples per pair are taken as 1" in result.stderr  # (it said nothing of --samples)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    stats = json.loads(Path(f"{out}.stats.json").read_text())
    assert len(rows) == stats["accepted"] > 0.7 * 2 * len(queries)
    assert all(r["reasoning"] == "" and r["provenance"]["teacher"] == cpu_backend.generator for r in rows)


def _env(tmp_path: Path) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("ADREACH_")}
    env.update(
        {"ADREACH_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "200", "PYTHONPATH": str(Path.cwd())}
    )
    return env


# -- the command over a file and over Kafka


def test_queries_command_over_a_jsonl_file(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    lines = [
        {
            "type": "search",
            "event_id": f"s{i}",
            "event_time": "2026-01-05T10:00:00Z",
            "user_id": "u1",
            "query": q,
        }
        for i, q in enumerate(["Running Shoes", "running shoes", "cheap flights", "espresso machine"])
    ]
    lines.append(
        {
            "type": "click",
            "event_id": "c1",
            "event_time": "2026-01-05T10:00:00Z",
            "user_id": "u1",
            "ad_id": "a",
        }
    )
    events.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    command = [sys.executable, "-m", "infra.cli", "features", "queries", "--input", str(events)]
    first = subprocess.run(command, capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert first.returncode == 0, first.stderr
    assert "5 events, 4 searches, 3 distinct queries: 0 from the cache, 3 generated" in first.stdout
    assert "3 feature rows written" in first.stdout


def test_queries_over_the_kafka_stream(kafka: Settings, cpu_backend: CPUBackend) -> None:
    from features.cli import run_query_features
    from streams.producer import EventProducer

    settings = kafka.model_copy(
        update={"state_dir": kafka.state_dir / f"queries-{kafka.kafka.topics.events}"}
    )
    queries, _ = simulator_queries(per_topic=1)
    with EventProducer(settings) as producer:
        for i, query in enumerate(queries):
            producer.send_json(
                json.dumps(
                    {
                        "type": "search",
                        "event_id": f"s{i}",
                        "event_time": "2026-01-05T10:00:00Z",
                        "user_id": f"u{i % 7}",
                        "query": query,
                    }
                ).encode()
            )
    stats = run_query_features(settings, until_idle=2.0, max_seconds=120, group="test-queries")
    assert stats.searches == len(queries)
    assert stats.rows_written == len({normalize_query(q) for q in queries})


@pytest.mark.gpu
def test_vllm_backend_on_a_gpu() -> None:
    """Real vLLM run (GPU machines): set ADREACH_QUERIES__MODEL_PATH to a local instruct checkpoint."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    pytest.importorskip("vllm")
    settings = load_settings().queries
    if not settings.model_path:
        pytest.skip("ADREACH_QUERIES__MODEL_PATH is not set")
    queries, topics = simulator_queries(per_topic=4)
    backend = VLLMBackend(settings)
    batch = backend.generate([normalize_query(q) for q in queries])
    assert len(batch.records) >= 0.95 * len(queries), batch.rejections.describe()
    by_query = {r.query: r.category for r in batch.records}
    accuracy = np.mean([by_query.get(normalize_query(q)) == t for q, t in zip(queries, topics, strict=True)])
    assert accuracy >= 0.6
    gold = gold_pairs()
    verdicts = backend.judge([(p.query, p.ad) for p in gold], 1)
    agreement = np.mean(
        [
            isinstance(v[0], Judgement) and (v[0].label == "relevant") == p.relevant
            for v, p in zip(verdicts, gold, strict=True)
        ]
    )
    assert agreement >= 0.8
    assert all(v[0].reasoning for v in verdicts if isinstance(v[0], Judgement))


def test_search_events_are_read_by_the_stream_engines_rules(tmp_path: Path) -> None:
    """The query pipeline had its own lenient reader: a search from 1970, one without a zone
    and a blank query became query_features rows (keys and times query_popularity refuses)."""
    from features.queries.sources import QuerySourceError, read_file

    search = {"type": "search", "event_id": "s", "user_id": "u1"}
    lines = [
        {**search, "event_time": "2026-01-05T10:00:00.123456789z", "query": "Running  Shoes"},
        {**search, "event_time": "1970-01-01T00:00:00Z", "query": "from 1970"},
        {**search, "event_time": "2026-01-05T10:00:00", "query": "no zone"},
        {**search, "event_time": "2026-01-05T10:00:00Z", "query": " \u3000 "},
        {"type": "impression", "event_id": "i", "event_time": "2026-01-05T10:00:00Z", "user_id": "u1"},
    ]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")
    chunks = list(read_file(path))
    searches = pa.concat_tables([chunk[0] for chunk in chunks])
    assert searches.column("query").to_pylist() == ["Running  Shoes"]
    # Milliseconds, truncated: as the engines keep event times.
    assert searches.column("event_time")[0].as_py().isoformat() == "2026-01-05T10:00:00.123000+00:00"
    assert sum(chunk[1] for chunk in chunks) == 5 and sum(chunk[2] for chunk in chunks) == 3
    # The same events as a Parquet log with text times: the same answer, event by event (one
    # time without a zone made the whole file an error).
    columns = {name: [line.get(name) for line in lines] for name in ("type", "event_time", "query")}
    pq.write_table(pa.table(columns), tmp_path / "events.parquet")
    parquet = list(read_file(tmp_path / "events.parquet"))
    assert pa.concat_tables([chunk[0] for chunk in parquet]).equals(searches)
    assert sum(chunk[1] for chunk in parquet) == 5 and sum(chunk[2] for chunk in parquet) == 3
    # One JSON array (an export) is refused with the command that makes it JSON Lines.
    (tmp_path / "array.jsonl").write_text(json.dumps(lines, indent=1))
    with pytest.raises(QuerySourceError, match=r"one JSON array, not JSON Lines; convert it with jq -c"):
        list(read_file(tmp_path / "array.jsonl"))


def test_gzip_json_lines_are_read_and_a_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    from features.queries.sources import QuerySourceError, count_file_events, read_file

    at = "2026-01-05T10:00:00Z"
    lines = [
        {"type": "search", "event_id": f"s{i}", "user_id": "u1", "event_time": at, "query": f"tents {i}"}
        for i in range(300)
    ]
    data = gzip.compress("".join(json.dumps(line) + "\n" for line in lines).encode())
    path = tmp_path / "events.jsonl.gz"
    path.write_bytes(data)
    assert count_file_events(path) == 300
    chunks = list(read_file(path, chunk_rows=100))
    assert pa.concat_tables([chunk[0] for chunk in chunks]).column("query").to_pylist()[-1] == "tents 299"
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(QuerySourceError, match="damaged or truncated"):
        count_file_events(cut)
    with pytest.raises(QuerySourceError, match="damaged or truncated"):
        list(read_file(cut, chunk_rows=100))
    # A plain file that cannot be read is not called a damaged gzip file (a read of the
    # reading process's address 0 fails with EIO).
    unreadable = tmp_path / "unreadable.jsonl"
    unreadable.symlink_to("/proc/self/mem")
    with pytest.raises(QuerySourceError, match="cannot be read") as failure:
        count_file_events(unreadable)
    assert "gzip file" not in str(failure.value)
    with pytest.raises(QuerySourceError, match="cannot be read"):
        list(read_file(unreadable, chunk_rows=100))


def test_a_parquet_directory_is_read_with_every_parts_columns(tmp_path: Path) -> None:
    """Arrow takes a directory's schema from its first part: a first part of impressions only
    (no ``query`` column) made the whole directory "have no query column"."""
    from features.queries.sources import count_file_events, read_file

    at = pa.array([1_767_607_200_000] * 2, pa.timestamp("ms", "UTC"))
    impressions = pa.table({"type": ["impression"] * 2, "event_time": at, "user_id": ["u1", "u2"]})
    searches = pa.table({"type": ["search"] * 2, "event_time": at, "query": ["Running Shoes", "tents"]})
    directory = tmp_path / "events"
    directory.mkdir()
    pq.write_table(impressions, directory / "part-0.parquet")
    pq.write_table(searches, directory / "part-1.parquet")
    assert count_file_events(directory) == 4
    chunks = list(read_file(directory))
    assert sorted(pa.concat_tables([chunk[0] for chunk in chunks]).column("query").to_pylist()) == [
        "Running Shoes",
        "tents",
    ]
    assert sum(chunk[1] for chunk in chunks) == 4 and sum(chunk[2] for chunk in chunks) == 0


def test_labelled_pairs_are_typed_strictly(tmp_path: Path) -> None:
    """ "relevant": "false" was read as true (a non-empty string), flipping the known label."""
    from features.queries.factory import CorpusInputError, read_pairs

    path = tmp_path / "pairs.jsonl"
    good = {"query": "running shoes", "ad": "Trail runners, 20% off", "relevant": False}
    path.write_text(json.dumps(good) + "\n")
    assert [pair.relevant for pair in read_pairs(path)] == [False]
    for bad, reason in (
        ({**good, "relevant": "false"}, "must be true or false"),
        ({**good, "relevant": 0}, "must be true or false"),
        ({**good, "query": "  "}, "non-blank"),
    ):
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(CorpusInputError, match=reason):
            read_pairs(path)
    path.write_text("".join(json.dumps({**good, "id": "p1"}) + "\n" for _ in range(2)))
    with pytest.raises(CorpusInputError, match="appears twice"):
        read_pairs(path)
    path.write_text("\n")
    with pytest.raises(CorpusInputError, match="no labelled pairs"):
        read_pairs(path)  # an empty gold set printed "agreement nan% on 0 gold pairs"
