"""The GPU backend: an instruction-tuned LLM run offline by vLLM, FP8 or bf16, JSON-guided.

Following AdNanny, one language model is the offline "reasoning hub": per query it picks
the ad-taxonomy category, scores commercial intent and proposes keyword expansions; per
query–ad pair it writes its reasoning and then a relevance label. Every request carries a
JSON Schema that vLLM's structured-output decoding enforces, and every answer is
validated again (:mod:`features.queries.schema`) before it is used.

``vllm`` is imported only inside :class:`VLLMRunner` (the ``[gpu]`` extra, installed on
GPU machines). Everything else here (prompts, requests, sampling and structured-output
configuration, engine arguments for FP8 and bf16, parsing) is plain Python, so it is
tested on machines without a GPU. Model weights are read from ``queries.model_path``
only; the Hub is switched off, so a wrong path fails instead of downloading.

The sentence embedding stored with each query is the MiniLM encoder's (a generative LLM
has no sentence embedding to offer), computed on the GPU when there is one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from features.queries.backend import QueryBatch, taxonomy_fingerprint
from features.queries.schema import (
    Judgement,
    QueryFeatureRecord,
    Rejection,
    RejectionLog,
    parse_query_output,
    parse_relevance_output,
    query_features_schema,
    relevance_schema,
)
from features.queries.taxonomy import Taxonomy, load_taxonomy
from infra.settings import QueryFeatureSettings

Precision = Literal["fp8", "bf16"]
FP8_MIN_CAPABILITY = (8, 9)  # W8A8 FP8 kernels: Ada Lovelace / Hopper and newer


class VLLMUnavailableError(RuntimeError):
    """vLLM, a GPU or the model checkpoint is missing; the message says which and what to do."""


@dataclass(frozen=True)
class ChatRequest:
    """One chat conversation to complete, with its sampling and output-schema settings."""

    key: str
    messages: tuple[dict[str, str], ...]
    schema: dict[str, Any]
    max_tokens: int
    temperature: float
    n: int
    seed: int

    def sampling_kwargs(self) -> dict[str, Any]:
        """``vllm.SamplingParams`` arguments, without the structured-output part (added at run time)."""
        kwargs: dict[str, Any] = {
            "n": self.n,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
        }
        if self.temperature > 0:
            kwargs["top_p"] = 0.95
        return kwargs

    def group_key(self) -> str:
        """Requests with equal keys can share one ``SamplingParams`` (one batched ``LLM.chat`` call)."""
        return json.dumps([self.sampling_kwargs(), self.schema], sort_keys=True)


def query_system_prompt(taxonomy: Taxonomy, max_keywords: int) -> str:
    lines = "\n".join(f"- {c.id}: {c.description}" for c in taxonomy.categories)
    return (
        "You label web search queries for an advertising platform.\n"
        "For the query, answer with one JSON object:\n"
        '- "category": the single best ad category id from this list:\n'
        f"{lines}\n"
        '- "commercial_intent": a number from 0 to 1, the probability that the searcher wants to buy, '
        "book, subscribe or compare offers now (0 for purely informational queries);\n"
        f'- "keywords": up to {max_keywords} related search keywords an advertiser could bid on, '
        "lower case, not repeating the query.\n"
        "Answer with the JSON object only."
    )


RELEVANCE_SYSTEM_PROMPT = (
    "You judge whether an ad is relevant to a web search query. An ad is relevant when a "
    "typical person typing the query would find the advertised product or service useful for "
    "what they are looking for; sharing a word is not enough.\n"
    'Answer with one JSON object: first "reasoning" (at most three sentences: what the query '
    'wants, what the ad offers, whether they match), then "label": "relevant" or "irrelevant".'
)


def query_requests(
    queries: Sequence[str], settings: QueryFeatureSettings, taxonomy: Taxonomy
) -> list[ChatRequest]:
    """One greedy request per query, all sharing the system prompt (prefix-cached by vLLM)."""
    system = query_system_prompt(taxonomy, settings.keyword_expansions)
    schema = query_features_schema(taxonomy, settings.keyword_expansions)
    return [
        ChatRequest(
            key=query,
            messages=({"role": "system", "content": system}, {"role": "user", "content": f"Query: {query}"}),
            schema=schema,
            max_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            n=1,
            seed=settings.seed,
        )
        for query in queries
    ]


def relevance_requests(
    pairs: Sequence[tuple[str, str]], settings: QueryFeatureSettings, samples: int
) -> list[ChatRequest]:
    """One request per pair asking for ``samples`` independent reasoning samples (reject sampling)."""
    schema = relevance_schema()
    return [
        ChatRequest(
            key=f"{query}\t{ad}",
            messages=(
                {"role": "system", "content": RELEVANCE_SYSTEM_PROMPT},
                {"role": "user", "content": f"Query: {query}\nAd: {ad}"},
            ),
            schema=schema,
            max_tokens=settings.max_new_tokens,
            temperature=settings.relevance_temperature if samples > 1 else settings.temperature,
            n=samples,
            seed=settings.seed,
        )
        for query, ad in pairs
    ]


def engine_kwargs(settings: QueryFeatureSettings, precision: Precision | None = None) -> dict[str, Any]:
    """``vllm.LLM`` arguments. FP8 is vLLM's dynamic W8A8 quantization of a bf16 checkpoint
    (weights per-tensor, activations per-token scaled); the KV cache stays bf16 so long
    reasoning prompts lose nothing. ``bf16`` is the unquantized reference.
    """
    if not settings.model_path:
        raise VLLMUnavailableError(
            "queries.backend = 'vllm' needs queries.model_path: a local directory with an "
            "instruction-tuned checkpoint (nothing is downloaded)"
        )
    kwargs: dict[str, Any] = {
        "model": settings.model_path,
        "dtype": "bfloat16",
        "max_model_len": settings.max_model_len,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "seed": settings.seed,
        "enable_prefix_caching": True,
    }
    if (precision or settings.quantization) == "fp8":
        kwargs["quantization"] = "fp8"
    return kwargs


def fp8_supported(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this CUDA compute capability runs W8A8 FP8 natively (H100/H200/L40S: yes)."""
    return capability >= FP8_MIN_CAPABILITY


def structured_output_kwargs(sampling_module: Any, schema: dict[str, Any]) -> dict[str, Any]:
    """The ``SamplingParams`` argument that makes vLLM decode JSON matching ``schema``.

    vLLM renamed the API (``guided_decoding=GuidedDecodingParams(json=...)`` up to 0.10,
    ``structured_outputs=StructuredOutputsParams(json=...)`` since); use whichever exists.
    """
    if hasattr(sampling_module, "StructuredOutputsParams"):
        return {"structured_outputs": sampling_module.StructuredOutputsParams(json=schema)}
    if hasattr(sampling_module, "GuidedDecodingParams"):
        return {"guided_decoding": sampling_module.GuidedDecodingParams(json=schema)}
    raise VLLMUnavailableError("this vLLM has neither StructuredOutputsParams nor GuidedDecodingParams")


Completer = Callable[[Sequence[ChatRequest]], list[list[str]]]
"""Completes chat requests: for each request, its ``n`` answer texts."""


class VLLMRunner:
    """Owns one ``vllm.LLM`` engine and completes requests in batched ``LLM.chat`` calls."""

    def __init__(self, settings: QueryFeatureSettings, precision: Precision | None = None) -> None:
        self.kwargs = engine_kwargs(settings, precision)
        if not Path(self.kwargs["model"]).exists():
            raise VLLMUnavailableError(
                f"queries.model_path {self.kwargs['model']} does not exist on this machine"
            )
        os.environ["HF_HUB_OFFLINE"] = "1"  # a local checkpoint only: never reach for the Hub
        try:
            import vllm
            import vllm.sampling_params as sampling
        except ImportError as exc:
            raise VLLMUnavailableError(
                "the vLLM backend needs the [gpu] extra on a CUDA machine: pip install -e '.[gpu]'"
            ) from exc
        self._vllm = vllm
        self._sampling = sampling
        self.llm = vllm.LLM(**self.kwargs)

    def __call__(self, requests: Sequence[ChatRequest]) -> list[list[str]]:
        results: list[list[str]] = [[] for _ in requests]
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(request.group_key(), []).append(i)
        for rows in groups.values():
            first = requests[rows[0]]
            params = self._vllm.SamplingParams(
                **first.sampling_kwargs(), **structured_output_kwargs(self._sampling, first.schema)
            )
            outputs = self.llm.chat([list(requests[i].messages) for i in rows], params, use_tqdm=False)
            for i, output in zip(rows, outputs, strict=True):
                results[i] = [choice.text for choice in output.outputs]
        return results


class VLLMBackend:
    """Query features and reasoned relevance judgements from an LLM (see the module docstring).

    ``complete`` defaults to a :class:`VLLMRunner`; anything with the same call signature
    (e.g. a remote endpoint, or canned answers in a test) can stand in for it.
    """

    name = "vllm"
    emits_reasoning = True

    def __init__(
        self,
        settings: QueryFeatureSettings,
        *,
        complete: Completer | None = None,
        taxonomy: Taxonomy | None = None,
        encoder: Any | None = None,
        precision: Precision | None = None,
    ) -> None:
        self.settings = settings
        self.taxonomy = taxonomy or load_taxonomy(settings.taxonomy_path)
        self.precision: Precision = precision or settings.quantization
        model = settings.model_path or "<unset>"
        self.generator = f"vllm/{model}/{self.precision}/{taxonomy_fingerprint(self.taxonomy)}"
        self.complete: Completer = complete or VLLMRunner(settings, self.precision)
        if encoder is None:
            from features.queries.cpu import open_encoder

            encoder = open_encoder(settings, device=_encoder_device())
        self.encoder = encoder

    def generate(self, queries: Sequence[str]) -> QueryBatch:
        rejections = RejectionLog()
        records: list[QueryFeatureRecord] = []
        answers = self.complete(query_requests(queries, self.settings, self.taxonomy))
        for query, texts in zip(queries, answers, strict=True):
            parsed = parse_query_output(
                query, texts[0] if texts else "", self.taxonomy, self.settings.keyword_expansions
            )
            if isinstance(parsed, Rejection):
                rejections.add(parsed)
            else:
                records.append(parsed)
        embeddings = self.encoder.encode([r.query for r in records])
        return QueryBatch(records, embeddings, rejections)

    def judge(self, pairs: Sequence[tuple[str, str]], samples: int = 1) -> list[list[Judgement | Rejection]]:
        answers = self.complete(relevance_requests(pairs, self.settings, samples))
        return [
            [parse_relevance_output(f"{query}\t{ad}", text) for text in texts]
            for (query, ad), texts in zip(pairs, answers, strict=True)
        ]

    def close(self) -> None:
        """Drop the engine (frees GPU memory when this was the last reference)."""
        self.complete = _closed


def _closed(requests: Sequence[ChatRequest]) -> list[list[str]]:
    raise VLLMUnavailableError("this VLLMBackend was closed")


def _encoder_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
