"""Small trained heads on top of the encoder: logistic regression, fitted in milliseconds.

Used twice by the CPU backend: the commercial-intent head (384 embedding dimensions ->
P(commercial), trained on the labelled queries shipped in ``data/intent_examples.jsonl``)
and the relevance calibration (one cosine similarity -> P(relevant), Platt scaling). Both
are fitted at start-up from packaged data with full-batch L-BFGS, which is deterministic,
so every process derives the same head and no trained weights need to be shipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch


@dataclass(frozen=True)
class LogisticHead:
    weights: npt.NDArray[np.float32]
    bias: float

    def probability(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        logits = np.asarray(x, np.float32).reshape(len(x), -1) @ self.weights + self.bias
        return np.asarray(1.0 / (1.0 + np.exp(-logits)), np.float32)


def fit_logistic(
    x: npt.NDArray[np.float32], y: npt.NDArray[np.float32], *, l2: float = 1e-3, steps: int = 200
) -> LogisticHead:
    """Maximum-likelihood logistic regression with an L2 penalty on the weights (not the bias)."""
    features = torch.from_numpy(np.asarray(x, np.float32).reshape(len(x), -1))
    targets = torch.from_numpy(np.asarray(y, np.float32))
    weights = torch.zeros(features.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(features @ weights + bias, targets)
        value = value + l2 * (weights**2).sum()
        value.backward()  # type: ignore[no-untyped-call]
        return value

    with torch.enable_grad():
        optimizer.step(loss)  # type: ignore[no-untyped-call]
    return LogisticHead(weights.detach().numpy().astype(np.float32), float(bias.detach()))
