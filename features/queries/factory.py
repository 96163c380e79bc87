"""AdNanny's reasoning data factory for query–ad relevance training corpora.

Three stages turn labelled query–ad pairs into a training corpus whose every sample
carries reasoning that reaches the correct label:

1. **Gold validation.** The teacher judges a small expert-labelled gold set
   (``data/relevance_gold.jsonl`` by default). Its agreement is reported overall and per
   *slice* (the taxonomy category of the query); a slice whose agreement is below
   ``queries.gold_min_agreement`` (with at least ``min_gold_per_slice`` gold pairs) fails,
   and corpus samples from failing slices are dropped: the teacher is not trusted there.
2. **Reasoning generation.** The teacher writes ``queries.relevance_samples`` independent
   reasoning + label samples per pair (vLLM, temperature ``queries.relevance_temperature``).
3. **Reject sampling.** Only samples whose label equals the pair's known label are kept;
   the first such sample is the pair's corpus row. Pairs with none are dropped, and answers
   that were not valid JSON are counted by reason.

The CPU backend is a valid teacher (a calibrated similarity threshold) but writes no
reasoning: its corpus rows have an empty ``reasoning`` and the report says so.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from features.queries.backend import QueryFeatureBackend
from features.queries.cache import QueryCache
from features.queries.schema import Judgement, Rejection, RejectionLog
from features.queries.taxonomy import packaged_jsonl


class CorpusInputError(ValueError):
    """The labelled pairs or the gold set cannot be read; the message names the file and field."""


@dataclass(frozen=True)
class LabelledPair:
    id: str
    query: str
    ad: str
    relevant: bool


@dataclass
class SliceAgreement:
    gold: int = 0
    agreed: int = 0

    @property
    def agreement(self) -> float:
        return self.agreed / self.gold if self.gold else float("nan")


@dataclass
class FactoryReport:
    """Acceptance statistics of one corpus build (also written next to the corpus as JSON)."""

    teacher: str
    emits_reasoning: bool
    gold_pairs: int = 0
    gold_agreement: float = float("nan")
    slices: dict[str, SliceAgreement] = field(default_factory=dict)
    failing_slices: list[str] = field(default_factory=list)
    pairs_in: int = 0
    dropped_failing_slice: int = 0
    judged: int = 0
    samples_drawn: int = 0
    samples_correct: int = 0
    no_correct_sample: int = 0
    accepted: int = 0
    invalid_outputs: RejectionLog = field(default_factory=RejectionLog)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher,
            "reasoning": "written by the teacher"
            if self.emits_reasoning
            else "none (the cpu backend writes no reasoning)",
            "gold": {
                "pairs": self.gold_pairs,
                "agreement": round(self.gold_agreement, 4),
                "slices": {
                    name: {"gold": s.gold, "agreement": round(s.agreement, 4)}
                    for name, s in sorted(self.slices.items())
                },
                "failing_slices": self.failing_slices,
            },
            "pairs_in": self.pairs_in,
            "dropped_failing_slice": self.dropped_failing_slice,
            "judged": self.judged,
            "samples_drawn": self.samples_drawn,
            "samples_reaching_correct_label": self.samples_correct,
            "pairs_without_correct_sample": self.no_correct_sample,
            "accepted": self.accepted,
            "acceptance_rate": round(self.accepted / self.pairs_in, 4) if self.pairs_in else None,
            "invalid_outputs": dict(self.invalid_outputs.counts),
            "seconds": round(self.seconds, 2),
        }

    def describe(self) -> str:
        lines = [
            f"teacher {self.teacher}: gold agreement {self.gold_agreement:.1%} on {self.gold_pairs} "
            f"gold pairs; failing slices: {', '.join(self.failing_slices) or 'none'}",
            f"pairs: {self.pairs_in:,} in, {self.dropped_failing_slice:,} dropped (failing slice), "
            f"{self.no_correct_sample:,} without a sample reaching the correct label, "
            f"{self.accepted:,} accepted ({self.accepted / max(self.pairs_in, 1):.1%})",
            f"samples: {self.samples_correct:,} of {self.samples_drawn:,} reached the correct label; "
            f"invalid outputs: {self.invalid_outputs.describe()}",
        ]
        if not self.emits_reasoning:
            lines.append("note: the cpu backend writes no reasoning text; corpus rows carry labels only")
        return "\n".join(lines)


def read_pairs(path: Path) -> list[LabelledPair]:
    """Labelled pairs from JSON Lines: ``{"query", "ad", "relevant": bool[, "id"]}`` per line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CorpusInputError(f"{path}: {exc}") from None
    pairs = _pairs(((f"{path}:{i + 1}", line) for i, line in enumerate(lines) if line.strip()))
    if not pairs:
        raise CorpusInputError(f"{path}: no labelled pairs (one JSON object per line)")
    return pairs


def gold_pairs(path: Path | None = None) -> list[LabelledPair]:
    """The gold set at ``path``, else the packaged one."""
    if path is not None:
        return read_pairs(path)
    return _pairs(
        (f"relevance_gold.jsonl:{i + 1}", json.dumps(row))
        for i, row in enumerate(packaged_jsonl("relevance_gold.jsonl"))
    )


def _pairs(lines: Iterator[tuple[str, str]]) -> list[LabelledPair]:
    """Typed strictly: a label read loosely ("false" is a true value in Python) flips silently."""
    out: list[LabelledPair] = []
    seen: set[str] = set()
    for where, line in lines:
        try:
            row = json.loads(line)
            query, ad, relevant = row["query"], row["ad"], row["relevant"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CorpusInputError(f"{where}: expected {{'query', 'ad', 'relevant'}} ({exc!r})") from None
        if not isinstance(relevant, bool):
            raise CorpusInputError(f"{where}: 'relevant' must be true or false, not {relevant!r}")
        if not isinstance(query, str) or not query.strip() or not isinstance(ad, str) or not ad.strip():
            raise CorpusInputError(f"{where}: 'query' and 'ad' must be non-blank strings")
        pair_id = str(row.get("id", where))
        if pair_id in seen:
            raise CorpusInputError(f"{where}: id {pair_id!r} appears twice (ids name pairs in the corpus)")
        seen.add(pair_id)
        out.append(LabelledPair(pair_id, query, ad, relevant))
    return out


def ad_creative(ad_id: str, topic: str) -> str:
    """A deterministic text ad for a simulated ad (the simulator's ads have a topic, no text)."""
    from streams.simulation.topics import TOPICS

    spec = next((t for t in TOPICS if t.segment == topic), None)
    if spec is None:
        raise CorpusInputError(f"ad {ad_id}: unknown simulator topic {topic!r}")
    h = zlib.crc32(ad_id.encode())
    brand = spec.brands[h % len(spec.brands)].title()
    phrase = spec.phrases[(h >> 8) % len(spec.phrases)]
    tagline = _TAGLINES[(h >> 16) % len(_TAGLINES)]
    return f"{brand}: {phrase}. {tagline}"


_TAGLINES = (
    "Free delivery on every order.",
    "Compare and save today.",
    "Rated 4.8 by customers.",
    "Shop the new range.",
)


def pairs_from_simulation(truth_dir: Path, limit: int, seed: int = 0) -> list[LabelledPair]:
    """Labelled pairs from a simulation's ground truth: each sampled query against one ad of its
    own topic (relevant) and one of another topic (irrelevant)."""
    try:
        searches = pq.read_table(truth_dir / "searches.parquet", columns=["query", "topic"])
        ads = pq.read_table(truth_dir / "ads.parquet", columns=["ad_id", "topic"])
    except (OSError, KeyError) as exc:
        raise CorpusInputError(f"{truth_dir}: not a simulation ground-truth directory ({exc})") from None
    rng = np.random.default_rng(seed)
    distinct = searches.group_by(["query", "topic"]).aggregate([])
    queries = np.asarray(distinct.column("query").to_pylist(), dtype=object)
    topics = np.asarray(distinct.column("topic").to_pylist(), dtype=object)
    ad_ids = np.asarray(ads.column("ad_id").to_pylist(), dtype=object)
    ad_topics = np.asarray(ads.column("topic").to_pylist(), dtype=object)
    chosen = rng.permutation(len(queries))[: max(limit // 2, 1)]
    out: list[LabelledPair] = []
    for i in chosen.tolist():
        same = np.nonzero(ad_topics == topics[i])[0]
        other = np.nonzero(ad_topics != topics[i])[0]
        for relevant, pool in ((True, same), (False, other)):
            if len(pool) == 0:
                continue
            j = int(pool[rng.integers(len(pool))])
            ad_text = ad_creative(str(ad_ids[j]), str(ad_topics[j]))
            out.append(LabelledPair(f"{ad_ids[j]}|{queries[i]}", str(queries[i]), ad_text, relevant))
    return out[:limit]


class ReasoningDataFactory:
    """Runs the three stages with one teacher backend; see the module docstring."""

    def __init__(
        self,
        backend: QueryFeatureBackend,
        cache: QueryCache | None = None,
        *,
        samples: int = 4,
        min_agreement: float = 0.7,
        min_gold_per_slice: int = 2,
    ) -> None:
        self.backend = backend
        self.cache = cache
        self.samples = samples if backend.emits_reasoning else 1
        self.min_agreement = min_agreement
        self.min_gold_per_slice = min_gold_per_slice

    def slices(self, queries: Sequence[str]) -> dict[str, str]:
        """Each query's taxonomy category (through the cache when there is one)."""
        from features.definitions import normalize_query

        keys = {q: normalize_query(q) for q in queries}
        distinct = list(dict.fromkeys(keys.values()))
        category: dict[str, str] = {}
        if self.cache is not None:
            category = {r.query: r.category for r in self.cache.get(self.backend.generator, distinct).records}
        missing = [q for q in distinct if q not in category]
        if missing:
            batch = self.backend.generate(missing)
            if self.cache is not None:
                self.cache.put(self.backend.generator, batch)
            category.update({r.query: r.category for r in batch.records})
        return {q: category.get(k, "unclassified") for q, k in keys.items()}

    def validate(self, gold: Sequence[LabelledPair], report: FactoryReport) -> None:
        """Stage 1: teacher agreement with the gold set, overall and per slice."""
        slice_of = self.slices([p.query for p in gold])
        verdicts = self.backend.judge([(p.query, p.ad) for p in gold], 1)
        agreed = 0
        for pair, answers in zip(gold, verdicts, strict=True):
            answer = answers[0] if answers else None
            ok = isinstance(answer, Judgement) and (answer.label == "relevant") == pair.relevant
            if isinstance(answer, Rejection):
                report.invalid_outputs.add(answer)
            stats = report.slices.setdefault(slice_of[pair.query], SliceAgreement())
            stats.gold += 1
            stats.agreed += int(ok)
            agreed += int(ok)
        report.gold_pairs = len(gold)
        report.gold_agreement = agreed / len(gold) if gold else float("nan")
        report.failing_slices = sorted(
            name
            for name, s in report.slices.items()
            if s.gold >= self.min_gold_per_slice and s.agreement < self.min_agreement
        )

    def build(
        self, pairs: Sequence[LabelledPair], gold: Sequence[LabelledPair], out: Path, source: str
    ) -> FactoryReport:
        """Run all three stages and write ``out`` (JSONL) and ``out`` + ``.stats.json``."""
        started = time.perf_counter()
        report = FactoryReport(self.backend.generator, self.backend.emits_reasoning, pairs_in=len(pairs))
        self.validate(gold, report)
        failing = set(report.failing_slices)
        slice_of = self.slices([p.query for p in pairs])
        kept = [p for p in pairs if slice_of[p.query] not in failing]
        report.dropped_failing_slice = len(pairs) - len(kept)
        verdicts = self.backend.judge([(p.query, p.ad) for p in kept], self.samples)
        report.judged = len(kept)
        out.parent.mkdir(parents=True, exist_ok=True)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with out.open("w", encoding="utf-8") as handle:
            for pair, answers in zip(kept, verdicts, strict=True):
                report.samples_drawn += len(answers)
                correct = []
                for index, answer in enumerate(answers):
                    if isinstance(answer, Rejection):
                        report.invalid_outputs.add(answer)
                    elif (answer.label == "relevant") == pair.relevant:
                        correct.append((index, answer))
                report.samples_correct += len(correct)
                if not correct:
                    report.no_correct_sample += 1
                    continue
                index, answer = correct[0]
                row = {
                    "id": pair.id,
                    "query": pair.query,
                    "ad": pair.ad,
                    "label": "relevant" if pair.relevant else "irrelevant",
                    "reasoning": answer.reasoning,
                    "provenance": {
                        "teacher": self.backend.generator,
                        "source": source,
                        "slice": slice_of[pair.query],
                        "slice_gold_agreement": _round(report.slices.get(slice_of[pair.query])),
                        "sample": index,
                        "samples_drawn": len(answers),
                        "samples_correct": len(correct),
                        "teacher_probability": answer.probability,
                        "created_at": created,
                    },
                }
                handle.write(json.dumps(row) + "\n")
                report.accepted += 1
        report.seconds = time.perf_counter() - started
        stats_path = out.with_name(out.name + ".stats.json")
        stats_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        return report


def _round(stats: SliceAgreement | None) -> float | None:
    return None if stats is None or not stats.gold else round(stats.agreement, 4)
