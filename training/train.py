"""Training and inference loops for the foundation model, the student adapter and the VMs.

Minibatches are assembled from NumPy arrays on the fly (the FM's histories are gathered
per batch from the :class:`EventLog`), so memory stays at one batch of histories. Every
loop takes a ``progress(done)`` callback for the CLI's progress bars.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import Tensor, nn

from models.fm import FMConfig, FoundationModel
from models.vm import StudentAdapter, VerticalModel
from training.events import EventLog
from training.examples import Examples

Progress = Callable[[int], None]


@dataclass
class VMInputs:
    """Everything a vertical model reads for a set of examples (from Feast + the request)."""

    dense: NDArray[np.float32]  # (n, F)
    candidate: dict[str, NDArray[np.int64]]
    fm_history: NDArray[np.float32] | None  # (n, K, E)
    fm_history_len: NDArray[np.int64] | None
    click: NDArray[np.float32]
    conversion: NDArray[np.float32]

    def __len__(self) -> int:
        return len(self.click)


def _tensors(arrays: dict[str, NDArray[Any]], index: NDArray[Any]) -> dict[str, Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(values[index])) for name, values in arrays.items()}


def _batches(n: int, batch_size: int, rng: np.random.Generator | None) -> Iterator[NDArray[np.int64]]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def click_conversion_loss(logits: Tensor, click: Tensor, conversion: Tensor) -> Tensor:
    """BCE on clicks, plus BCE on conversions among the clicked (P(conversion | click))."""
    loss = F.binary_cross_entropy_with_logits(logits[:, 0], click)
    clicked = click > 0.5
    if bool(clicked.any()):
        loss = loss + F.binary_cross_entropy_with_logits(logits[clicked, 1], conversion[clicked])
    return loss


def fm_batch(
    log: EventLog, examples: Examples, index: NDArray[Any], config: FMConfig
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    history = _fm_history(log, examples.user[index], examples.time_ms[index], config)
    return _tensors(history, np.arange(len(index))), _tensors(examples.candidate(), index)


def _fm_history(
    log: EventLog, users: NDArray[np.int64], times_ms: NDArray[np.int64], config: FMConfig
) -> dict[str, NDArray[Any]]:
    """Each user's history strictly before each time as the FM reads it (training and embeddings alike)."""
    return log.history(users, times_ms, config.history_len, config.profile_attributes)


def _dense(dense: NDArray[np.float32] | None, index: NDArray[Any]) -> Tensor | None:
    return torch.from_numpy(np.ascontiguousarray(dense[index])) if dense is not None else None


def train_fm(
    model: FoundationModel,
    log: EventLog,
    examples: Examples,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    dense: NDArray[np.float32] | None = None,
    progress: Progress | None = None,
) -> list[float]:
    """Train ``model`` on ``examples`` (``dense``: their stream features, when the FM reads them)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    click, conversion = torch.from_numpy(examples.click), torch.from_numpy(examples.conversion)
    losses: list[float] = []
    model.train()
    for _ in range(epochs):
        total, batches = 0.0, 0
        for index in _batches(len(examples), batch_size, rng):
            history, candidate = fm_batch(log, examples, index, model.config)
            logits, user = model(history, candidate, _dense(dense, index))
            loss = click_conversion_loss(logits, click[index], conversion[index])
            if model.config.profile_weight > 0:
                loss = loss + model.config.profile_weight * model.profile_loss(user, history)
            total, batches = total + _step(optimizer, loss), batches + 1
            if progress is not None:
                progress(len(index))
        losses.append(total / max(batches, 1))
    model.eval()
    return losses


@torch.no_grad()
def fm_predict(
    model: FoundationModel,
    log: EventLog,
    examples: Examples,
    *,
    batch_size: int = 2_048,
    dense: NDArray[np.float32] | None = None,
    progress: Progress | None = None,
) -> NDArray[np.float32]:
    """(n, 2) logits: click, conversion-given-click (``dense``: stream features, if the FM reads them)."""
    model.eval()
    out = np.empty((len(examples), 2), np.float32)
    for index in _batches(len(examples), batch_size, None):
        history, candidate = fm_batch(log, examples, index, model.config)
        out[index] = model(history, candidate, _dense(dense, index))[0].numpy()
        if progress is not None:
            progress(len(index))
    return out


@torch.no_grad()
def fm_user_embeddings(
    model: FoundationModel,
    log: EventLog,
    users: NDArray[np.int64],
    times_ms: NDArray[np.int64],
    *,
    batch_size: int = 2_048,
) -> NDArray[np.float32]:
    """(n, E) user embeddings of ``users`` from their events strictly before ``times_ms``."""
    model.eval()
    out = np.empty((len(users), model.config.embedding_dim), np.float32)
    for start in range(0, len(users), batch_size):
        stop = start + batch_size
        history = _fm_history(log, users[start:stop], times_ms[start:stop], model.config)
        out[start:stop] = model.user_embedding(_tensors(history, np.arange(len(history["kind"])))).numpy()
    return out


def train_adapter(
    adapter: StudentAdapter,
    fm_click_logit: NDArray[np.float32],
    candidate: dict[str, NDArray[np.int64]],
    click: NDArray[np.float32],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> None:
    """Fit the student adapter on fresh labels (examples the FM has not been trained on)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(adapter.parameters(), lr=learning_rate)
    logits, labels = torch.from_numpy(fm_click_logit), torch.from_numpy(click)
    adapter.train()
    for _ in range(epochs):
        for index in _batches(len(click), batch_size, rng):
            loss = F.binary_cross_entropy_with_logits(
                adapter(logits[index], _tensors(candidate, index)), labels[index]
            )
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    adapter.eval()


@torch.no_grad()
def adapter_predict(
    adapter: StudentAdapter, fm_click_logit: NDArray[np.float32], candidate: dict[str, NDArray[np.int64]]
) -> NDArray[np.float32]:
    adapter.eval()
    logits = torch.from_numpy(fm_click_logit)
    corrected: NDArray[np.float32] = adapter(logits, _tensors(candidate, np.arange(len(logits)))).numpy()
    return corrected


def _vm_forward(model: VerticalModel, data: VMInputs, index: NDArray[Any]) -> tuple[Tensor, Tensor | None]:
    history = torch.from_numpy(data.fm_history[index]) if data.fm_history is not None else None
    length = torch.from_numpy(data.fm_history_len[index]) if data.fm_history_len is not None else None
    out: tuple[Tensor, Tensor | None] = model(
        torch.from_numpy(data.dense[index]), _tensors(data.candidate, index), history, length
    )
    return out


def train_vm(
    model: VerticalModel,
    data: VMInputs,
    *,
    teacher_logit: NDArray[np.float32] | None,
    kd_weight: float,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    progress: Progress | None = None,
) -> list[float]:
    """Train a VM; a KD variant also fits its auxiliary head to ``sigmoid(teacher_logit)``."""
    if model.config.kd and teacher_logit is None:
        raise ValueError("a KD variant needs the (adapted) FM logits of its training examples")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-3)
    click, conversion = torch.from_numpy(data.click), torch.from_numpy(data.conversion)
    soft = torch.sigmoid(torch.from_numpy(teacher_logit)) if teacher_logit is not None else None
    losses: list[float] = []
    model.train()
    for _ in range(epochs):
        total, batches = 0.0, 0
        for index in _batches(len(data), batch_size, rng):
            main, aux = _vm_forward(model, data, index)
            loss = click_conversion_loss(main, click[index], conversion[index])
            if aux is not None and soft is not None:
                loss = loss + kd_weight * F.binary_cross_entropy_with_logits(aux, soft[index])
            total, batches = total + _step(optimizer, loss), batches + 1
            if progress is not None:
                progress(len(index))
        losses.append(total / max(batches, 1))
    model.eval()
    return losses


@torch.no_grad()
def vm_predict(model: VerticalModel, data: VMInputs, *, batch_size: int = 8_192) -> NDArray[np.float32]:
    """(n, 2) main-head logits (the serving prediction)."""
    model.eval()
    out = np.empty((len(data), 2), np.float32)
    for index in _batches(len(data), batch_size, None):
        out[index] = _vm_forward(model, data, index)[0].numpy()
    return out


def sigmoid(x: NDArray[Any]) -> NDArray[np.float64]:
    return np.asarray(1.0 / (1.0 + np.exp(-np.asarray(x, np.float64))))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """One optimizer step on ``loss``; its value, for the epoch's mean loss."""
    optimizer.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()
    return float(loss.item())
