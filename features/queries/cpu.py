"""The embedded CPU backend: all-MiniLM-L6-v2 sentence embeddings and light heads on them.

* **category**: cosine similarity of the query to each category's centroid (the mean of
  the embeddings of its description and keywords), highest wins; the score is that
  similarity;
* **commercial intent**: a logistic-regression head on the embedding, fitted at start-up
  on the labelled queries shipped in ``data/intent_examples.jsonl``;
* **keyword expansions**: the taxonomy keywords nearest to the query that it does not
  already contain;
* **query–ad relevance**: cosine similarity of query and ad text, turned into a
  probability by Platt scaling fitted on pairs built from the taxonomy (a keyword against
  its own category's description vs. another's); "relevant" when that probability is at
  least 0.5. It produces no reasoning text.

Everything is computed column-wise on NumPy matrices; the encoder is the only model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from features.queries.backend import F32Array, QueryBatch, taxonomy_fingerprint
from features.queries.encoder import MiniLMEncoder
from features.queries.heads import fit_logistic
from features.queries.schema import Judgement, QueryFeatureRecord, Rejection, RejectionLog
from features.queries.taxonomy import Taxonomy, load_taxonomy, packaged_jsonl
from infra.settings import QueryFeatureSettings

ENCODER_NAME = "all-MiniLM-L6-v2"


def _normalize_rows(matrix: F32Array) -> F32Array:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.asarray(matrix / np.maximum(norms, 1e-12), np.float32)


def encoder_dtype(settings: QueryFeatureSettings, device: str = "cpu") -> str:
    """The precision ``queries.encoder_dtype`` resolves to on ``device`` (``auto``: native bf16 or fp32)."""
    if settings.encoder_dtype != "auto":
        return settings.encoder_dtype
    if device != "cpu":
        return "bfloat16"
    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def open_encoder(settings: QueryFeatureSettings, device: str = "cpu") -> MiniLMEncoder:
    """The MiniLM encoder with the settings' precision and thread budget."""
    if settings.torch_threads is not None and device == "cpu":
        torch.set_num_threads(settings.torch_threads)
    dtype = torch.bfloat16 if encoder_dtype(settings, device) == "bfloat16" else torch.float32
    return MiniLMEncoder(settings.encoder_path, batch_size=settings.batch_size, device=device, dtype=dtype)


class CPUBackend:
    """Query features and relevance from the MiniLM encoder (see the module docstring)."""

    name = "cpu"
    emits_reasoning = False

    def __init__(
        self,
        settings: QueryFeatureSettings,
        *,
        encoder: MiniLMEncoder | None = None,
        taxonomy: Taxonomy | None = None,
    ) -> None:
        self.settings = settings
        self.taxonomy = taxonomy or load_taxonomy(settings.taxonomy_path)
        self.encoder = encoder or open_encoder(settings)
        precision = "bfloat16" if self.encoder.dtype == torch.bfloat16 else "float32"
        self.generator = f"cpu/{ENCODER_NAME}/{precision}/{taxonomy_fingerprint(self.taxonomy)}"
        self._fit()

    # -- start-up: everything derived from packaged data, encoded in one pass

    def _fit(self) -> None:
        categories = self.taxonomy.categories
        intent_rows = packaged_jsonl("intent_examples.jsonl")
        descriptions = [f"{c.name}: {c.description}" for c in categories]
        keyword_owner = [(k.lower(), i) for i, c in enumerate(categories) for k in c.keywords]
        keywords = sorted({k for k, _ in keyword_owner})
        intent_queries = [r["query"] for r in intent_rows]
        vectors = self.encoder.encode(descriptions + keywords + intent_queries)
        description_vectors = vectors[: len(descriptions)]
        keyword_vectors = vectors[len(descriptions) : len(descriptions) + len(keywords)]
        intent_vectors = vectors[len(descriptions) + len(keywords) :]
        position = {k: j for j, k in enumerate(keywords)}
        owner = np.asarray([i for _, i in keyword_owner], np.int64)
        owned = keyword_vectors[np.asarray([position[k] for k, _ in keyword_owner], np.int64)]

        # Category centroid: mean of the description's and the keywords' embeddings.
        sums = description_vectors.copy()
        np.add.at(sums, owner, owned)
        self.centroids = _normalize_rows(sums)
        self.keywords = np.asarray(keywords, dtype=object)
        self.keyword_vectors = keyword_vectors
        self.intent_head = fit_logistic(
            intent_vectors, np.asarray([float(r["commercial"]) for r in intent_rows], np.float32), l2=1e-3
        )
        # Relevance calibration: each keyword against its own category's description (relevant)
        # and against a spread of other categories' descriptions (irrelevant).
        other = (owner + 1 + np.arange(len(owner)) * 7) % len(categories)
        other = np.where(other == owner, (other + 1) % len(categories), other)
        similarity = np.concatenate(
            [
                np.einsum("ij,ij->i", owned, description_vectors[owner]),
                np.einsum("ij,ij->i", owned, description_vectors[other]),
            ]
        )
        labels = np.concatenate([np.ones(len(owner)), np.zeros(len(owner))]).astype(np.float32)
        self.relevance_head = fit_logistic(similarity[:, None].astype(np.float32), labels, l2=0.0)

    @property
    def relevance_threshold(self) -> float:
        """The cosine similarity at which P(relevant) crosses 0.5."""
        return float(-self.relevance_head.bias / self.relevance_head.weights[0])

    # -- the interface

    def embed(self, texts: Sequence[str]) -> F32Array:
        return self.encoder.encode(list(texts))

    def classify(self, embeddings: F32Array) -> tuple[npt.NDArray[np.int64], F32Array]:
        """Category index and cosine score of each embedding."""
        scores = embeddings @ self.centroids.T
        best = scores.argmax(axis=1)
        return best, scores[np.arange(len(best)), best]

    def expansions(self, queries: Sequence[str], embeddings: F32Array) -> list[tuple[str, ...]]:
        k = self.settings.keyword_expansions
        if k == 0 or len(self.keywords) == 0:
            return [() for _ in queries]
        similarity = embeddings @ self.keyword_vectors.T
        take = min(len(self.keywords), k + 3)  # a few spare for the ones the query already contains
        nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :take]
        out: list[tuple[str, ...]] = []
        for query, row in zip(queries, nearest, strict=True):
            words = set(query.split())
            picked = [w for w in self.keywords[row] if not set(w.split()) <= words]
            out.append(tuple(picked[:k]))
        return out

    def generate(self, queries: Sequence[str]) -> QueryBatch:
        if not queries:
            return QueryBatch([], np.empty((0, self.encoder.dim), np.float32))
        embeddings = self.embed(queries)
        best, scores = self.classify(embeddings)
        intent = self.intent_head.probability(embeddings)
        keywords = self.expansions(queries, embeddings)
        ids = self.taxonomy.ids
        records = [
            QueryFeatureRecord(q, ids[int(c)], float(s), float(p), kw)
            for q, c, s, p, kw in zip(queries, best, scores, intent, keywords, strict=True)
        ]
        return QueryBatch(records, embeddings, RejectionLog())

    def judge(self, pairs: Sequence[tuple[str, str]], samples: int = 1) -> list[list[Judgement | Rejection]]:
        """One deterministic judgement per pair (``samples`` is ignored: there is nothing to sample)."""
        if not pairs:
            return []
        queries = self.embed([q for q, _ in pairs])
        ads = self.embed([a for _, a in pairs])
        probability = self.relevance_head.probability(np.einsum("ij,ij->i", queries, ads)[:, None])
        return [
            [Judgement("relevant" if p >= 0.5 else "irrelevant", "", float(p))] for p in probability.tolist()
        ]

    def close(self) -> None:
        """Nothing to release; present for the interface."""
