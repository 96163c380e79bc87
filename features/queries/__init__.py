"""Query features from a language model, following AdNanny (one model as an offline reasoning hub).

* :mod:`~features.queries.backend`: the one interface, :class:`QueryFeatureBackend`;
* :mod:`~features.queries.cpu`: the embedded default (all-MiniLM-L6-v2 on CPU);
* :mod:`~features.queries.vllm_backend`: an instruction-tuned LLM under vLLM, FP8 or bf16;
* :mod:`~features.queries.pipeline`: search events -> normalized, de-duplicated, cached
  queries -> the Feast view ``query_features``;
* :mod:`~features.queries.factory`: the reasoning data factory for relevance corpora.

Nothing in this package imports vLLM at module level, and nothing downloads anything.
"""
