"""Vertical models (VMs): compact CTR/CVR models over Feast features, in four variants.

* ``base``: an MLP over the stream features (normalized aggregates of the user, ad,
  campaign and advertiser) and small embeddings of the candidate and its context.
* ``kd`` (ExFM): an **auxiliary head** on the shared bottom learns the foundation
  model's predictions, so FM knowledge shapes the shared layers while the FM's bias
  stays out of the serving (main) head. The targets come through a
  :class:`StudentAdapter`, which learns on fresh labels how to correct the FM's stale
  predictions after a distribution shift.
* ``loopfm``: the user's last K historical FM embeddings (from the ``fm_embeddings``
  Feast view, point-in-time) scored against the candidate ad's topic through a frozen
  copy of the FM's topic-profile head (a (topics, E) table saved with the VM: the
  topics in user-embedding space): the FM's taste score of the candidate's topic, for
  the latest embedding and the mean of the last K. No FM inference at serving, only a
  feature read and a table lookup. The raw embeddings are not fed to the MLP by
  default (``VMConfig.fm_raw_inputs``): 16 floats per user act as a user fingerprint
  the VM memorizes (they lowered its AUC in ``benchmarks/loopfm.py``).
* ``kd+loopfm``: both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from models.fm import MAX_POSITION, FoundationModel
from training.events import Buckets

VARIANTS = ("base", "kd", "loopfm", "kd+loopfm")


class VariantError(ValueError):
    """An unknown vertical-model variant."""


def parse_variant(variant: str) -> tuple[bool, bool]:
    """(uses KD, uses LoopFM) for a variant name."""
    if variant not in VARIANTS:
        raise VariantError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    return "kd" in variant, "loopfm" in variant


@dataclass(frozen=True)
class VMConfig:
    variant: str
    dense_features: tuple[str, ...]
    buckets: Buckets = Buckets()
    embedding_dim: int = 16
    embedding_history: int = 4
    id_dim: int = 8
    hidden: tuple[int, ...] = (64, 32)
    fm_profile_topics: int = 0  # > 0: the FM's frozen topic-profile table (see load_fm_profile)
    fm_taste_dim: int = 0  # > 0: the FM's frozen wide taste term (see taste_scores)
    fm_raw_inputs: bool = False  # also the raw embeddings, target-attention pooled (opt-in, see above)
    fm_dropout: float = 0.5  # on the raw LoopFM inputs: without it they lowered the VM's AUC further
    dense_mean: tuple[float, ...] = field(default=())
    dense_std: tuple[float, ...] = field(default=())

    @property
    def kd(self) -> bool:
        return parse_variant(self.variant)[0]

    @property
    def loopfm(self) -> bool:
        return parse_variant(self.variant)[1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VMConfig:
        values = {**raw, "buckets": Buckets.from_dict(raw["buckets"])}
        values.setdefault("fm_raw_inputs", True)  # saved before the profile scores: raw inputs only
        for name in ("dense_features", "hidden", "dense_mean", "dense_std"):
            values[name] = tuple(values[name])
        return cls(**values)


class VerticalModel(nn.Module):
    def __init__(self, config: VMConfig) -> None:
        super().__init__()
        parse_variant(config.variant)
        self.config = config
        b, e = config.buckets, config.id_dim
        self.ids = nn.ModuleDict(
            {
                "ad": nn.Embedding(b.ads, e),
                "campaign": nn.Embedding(b.campaigns, e),
                "advertiser": nn.Embedding(b.advertisers, e),
                "topic": nn.Embedding(b.topics, e),
                "position": nn.Embedding(MAX_POSITION + 1, e),
                "placement": nn.Embedding(len(b.placements) + 1, e),
                "device": nn.Embedding(len(b.devices) + 1, e),
                "hour": nn.Embedding(24, e),
            }
        )
        for name in self.ids:
            table = self.ids[name]
            assert isinstance(table, nn.Embedding)
            nn.init.normal_(table.weight, std=0.05)  # small: rare ids must not swing the logit
        n_dense = len(config.dense_features)
        self.register_buffer("mean", torch.tensor(config.dense_mean or [0.0] * n_dense))
        self.register_buffer("std", torch.tensor(config.dense_std or [1.0] * n_dense))
        width = n_dense + len(self.ids) * e
        if config.loopfm and not (config.fm_raw_inputs or config.fm_profile_topics or config.fm_taste_dim):
            raise ValueError(
                "a LoopFM variant needs fm_profile_topics > 0, fm_taste_dim > 0 or fm_raw_inputs"
            )
        if config.loopfm and config.fm_profile_topics:
            self.register_buffer(
                "fm_profile_weight", torch.zeros(config.fm_profile_topics, config.embedding_dim)
            )
            self.register_buffer("fm_profile_bias", torch.zeros(config.fm_profile_topics))
            width += 2
        if config.loopfm and config.fm_taste_dim:
            k = config.fm_taste_dim
            self.register_buffer("fm_taste_weight", torch.zeros(k, config.embedding_dim))
            self.register_buffer("fm_taste_bias", torch.zeros(k))
            self.register_buffer("fm_topic_taste", torch.zeros(config.buckets.topics, k))
            width += 2
        if config.loopfm and config.fm_raw_inputs:
            d = config.embedding_dim
            self.query = nn.Linear(len(self.ids) * e, d)
            self.interact = nn.Linear(len(self.ids) * e, d)
            width += 3 * d + 1
            self.fm_dropout = nn.Dropout(config.fm_dropout)
        layers: list[nn.Module] = []
        for size in config.hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.bottom = nn.Sequential(*layers)
        self.main = nn.Linear(width, 2)
        self.aux = nn.Linear(width, 1) if config.kd else None

    def forward(
        self,
        dense: Tensor,
        candidate: dict[str, Tensor],
        fm_history: Tensor | None = None,
        fm_history_len: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """(main click/conversion logits (B, 2), auxiliary FM-distillation logit (B,) or None).

        ``fm_history``: (B, K, E) newest first; ``fm_history_len``: (B,) filled slots.
        """
        cand = torch.cat([self.ids[name](candidate[name]) for name in self.ids], dim=1)
        mean, std = self.get_buffer("mean"), self.get_buffer("std")
        # Clamped: stream counts drift past their training range over time (7-day windows fill up).
        parts = [((dense - mean) / std).clamp(-6.0, 6.0), cand]
        if self.config.loopfm:
            if fm_history is None or fm_history_len is None:
                raise ValueError("a LoopFM variant needs fm_history and fm_history_len")
            pair = latest_and_mean(fm_history, fm_history_len)  # shared by both scores
            if self.config.fm_profile_topics:
                parts.append(self.profile_scores(fm_history, fm_history_len, candidate["topic"], pair))
            if self.config.fm_taste_dim:
                parts.append(self.taste_scores(fm_history, fm_history_len, candidate["topic"], pair))
        if self.config.loopfm and self.config.fm_raw_inputs:
            assert fm_history is not None and fm_history_len is not None
            k = fm_history.shape[1]
            padding = torch.arange(k, device=dense.device)[None, :] >= fm_history_len[:, None]
            query = self.query(cand)
            scores = torch.einsum("bd,bkd->bk", query, fm_history) / math.sqrt(query.shape[-1])
            weights = torch.softmax(scores.masked_fill(padding, float("-inf")), dim=-1).nan_to_num(0.0)
            pooled = torch.einsum("bk,bkd->bd", weights, fm_history)
            latest = fm_history[:, 0]
            loop = self.fm_dropout(torch.cat([pooled, latest, pooled * self.interact(cand)], dim=1))
            parts += [loop, (fm_history_len > 0).float()[:, None]]
        hidden = self.bottom(torch.cat(parts, dim=1))
        aux = self.aux(hidden)[:, 0] if self.aux is not None else None
        return self.main(hidden), aux

    def profile_scores(
        self, history: Tensor, length: Tensor, topic: Tensor, pair: Tensor | None = None
    ) -> Tensor:
        """(B, 2): the FM's taste score of the candidate's topic, latest embedding and mean of the last K.

        The score is the log-probability the FM's profile head gives that topic (a softmax
        over topics, so a user's overall activity level does not leak in); 0 for users with
        no embedding yet. ``pair``: :func:`latest_and_mean` of ``history``, if already computed.
        """
        weight, bias = self.get_buffer("fm_profile_weight"), self.get_buffer("fm_profile_bias")
        has = (length > 0).float()[:, None]
        pair = latest_and_mean(history, length) if pair is None else pair
        log_p = torch.log_softmax(pair @ weight.T + bias, dim=-1)  # (B, 2, topics)
        lift = log_p + math.log(weight.shape[0])  # log of p / uniform: 0 is "no preference"
        return lift.gather(2, topic[:, None, None].expand(-1, 2, 1))[:, :, 0] * has

    def taste_scores(
        self, history: Tensor, length: Tensor, topic: Tensor, pair: Tensor | None = None
    ) -> Tensor:
        """(B, 2): the FM's wide taste term of the candidate's topic, latest embedding and mean of the last K.

        ``(W user + b) . topic_vector``: what the FM itself adds to its click logit for this
        user and topic (:class:`models.fm.WidePart`), learned from clicks where the profile
        head learned from the topics clicked or searched; 0 for users with no embedding yet.
        ``pair``: :func:`latest_and_mean` of ``history``, if already computed.
        """
        weight, bias = self.get_buffer("fm_taste_weight"), self.get_buffer("fm_taste_bias")
        pair = latest_and_mean(history, length) if pair is None else pair
        users = pair @ weight.T + bias  # (B, 2, k)
        topics = self.get_buffer("fm_topic_taste")[topic]  # (B, k)
        return (users * topics[:, None, :]).sum(-1) * (length > 0).float()[:, None]

    def load_fm_profile(self, fm: FoundationModel) -> None:
        """Copy the FM's topic-profile head and wide taste term: lookup tables at serving, no FM run."""
        if self.config.fm_profile_topics:
            if fm.topic_profile is None:
                raise ValueError(
                    "the FM has no topic-profile head: train it with models.fm_profile_weight > 0"
                )
            with torch.no_grad():
                self.get_buffer("fm_profile_weight").copy_(fm.topic_profile.weight)
                self.get_buffer("fm_profile_bias").copy_(fm.topic_profile.bias)
        if self.config.fm_taste_dim:
            if fm.wide is None:
                raise ValueError("the FM has no wide part: train it with models.fm_wide = true")
            with torch.no_grad():
                self.get_buffer("fm_taste_weight").copy_(fm.wide.user_taste.weight)
                self.get_buffer("fm_taste_bias").copy_(fm.wide.user_taste.bias)
                self.get_buffer("fm_topic_taste").copy_(fm.wide.topic_taste.weight)
        if not (self.config.fm_profile_topics or self.config.fm_taste_dim):
            raise ValueError("this VM reads no FM tables (VMConfig.fm_profile_topics and fm_taste_dim are 0)")


def latest_and_mean(history: Tensor, length: Tensor) -> Tensor:
    """(B, 2, E): each user's latest stored FM embedding and the mean of the ``length`` filled slots.

    ``history``: (B, K, E) newest first; a user with no embedding yet gets zeros.
    """
    filled = (torch.arange(history.shape[1], device=history.device)[None, :] < length[:, None]).float()
    mean = (history * filled[:, :, None]).sum(1) / filled.sum(1, keepdim=True).clamp(min=1.0)
    return torch.stack([history[:, 0], mean], dim=1)


class StudentAdapter(nn.Module):
    """ExFM's student adapter: corrects the (stale) FM click logit with fresh labels.

    ``corrected = a * fm_logit + b + f(context)``: a learned rescaling of the FM's logit
    plus a small correction by candidate topic, hour, device and position, which is
    where the simulator's shifts (new campaigns, interest drift, a new traffic source)
    move the FM's errors.
    """

    def __init__(self, buckets: Buckets, dim: int = 4) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(()))
        self.context = nn.ModuleDict(
            {
                "topic": nn.Embedding(buckets.topics, dim),
                "hour": nn.Embedding(24, dim),
                "device": nn.Embedding(len(buckets.devices) + 1, dim),
                "position": nn.Embedding(MAX_POSITION + 1, dim),
            }
        )
        self.correction = nn.Sequential(nn.Linear(4 * dim + 1, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, fm_logit: Tensor, candidate: dict[str, Tensor]) -> Tensor:
        context = torch.cat([table(candidate[name]) for name, table in self.context.items()], dim=1)
        features = torch.cat([context, fm_logit[:, None]], dim=1)
        corrected: Tensor = self.scale * fm_logit + self.bias + self.correction(features)[:, 0]
        return corrected
