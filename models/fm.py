"""The foundation model (FM): a sequence model over each user's full event history.

Every event of the user's last L (ads seen, clicked, converted on, searches) becomes a
token: the sum of embeddings of its type, ad, campaign, advertiser, ad topic, query and
the log-bucketed time since it happened. A learned "now" token closes the sequence.
Sliding-window attention blocks (:mod:`models.attention`) encode it in ``O(L * W)``; a
few learned seed queries pool the encoded events into the **user embedding** (a
candidate-independent vector, after Kunlun's seed pooling), which is what LoopFM stores
in Feast. The candidate ad and its context (position, placement, device, hour) are
embedded the same way; the click and conversion logits come from an MLP over the user
embedding, the candidate, their element-wise product, and a target attention of the
candidate over the encoded events. Optionally (``FMConfig.dense_features``) the heads
also read the vertical models' stream features, so the FM sees a superset of their
inputs; the user embedding stays a function of the history alone either way.

A **wide part** (``FMConfig.wide``, after Wide & Deep) adds to both logits a learned bias
per candidate id (ad, campaign, advertiser, topic, position, placement, device, hour) and
to the click logit a low-rank taste term, ``(W user) . topic_vector(candidate topic)``.
The MLP alone had to rebuild these additive effects from summed embeddings, and the FM
scored below a plain logistic model of the same ids; with them its click AUC rose by
0.011-0.015 on ``benchmarks/loopfm.py``'s data (two seeds) and its NE fell by about 0.03.

Heads: ``click`` is P(click | impression); ``conversion`` is P(conversion | click).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from models.attention import SlidingWindowBlock, masked_attention_pool
from training.events import ATTRIBUTE_PREFIX, EVENT_TYPES, GAP_BUCKETS, Buckets

HISTORY_FIELDS = ("kind", "ad", "campaign", "advertiser", "topic", "query", "gap")
CANDIDATE_FIELDS = ("ad", "campaign", "advertiser", "topic", "position", "placement", "device", "hour")
MAX_POSITION = 5


@dataclass(frozen=True)
class FMConfig:
    buckets: Buckets = Buckets()
    history_len: int = 64
    window: int = 16
    dim: int = 32
    layers: int = 2
    heads: int = 2
    embedding_dim: int = 16
    seeds: int = 4
    dropout: float = 0.0
    profile_weight: float = 0.0
    dense_features: tuple[str, ...] = field(default=())
    dense_mean: tuple[float, ...] = field(default=())
    dense_std: tuple[float, ...] = field(default=())
    wide: bool = True
    taste_dim: int = 8
    profile_attributes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FMConfig:
        values = {**raw, "buckets": Buckets.from_dict(raw["buckets"])}
        values.setdefault("wide", False)  # saved before the wide part existed
        for name in ("dense_features", "dense_mean", "dense_std", "profile_attributes"):
            values[name] = tuple(values.get(name, ()))
        return cls(**values)


def candidate_sizes(buckets: Buckets) -> dict[str, int]:
    """Rows of each candidate field's embedding table (:data:`CANDIDATE_FIELDS`)."""
    return {
        "ad": buckets.ads,
        "campaign": buckets.campaigns,
        "advertiser": buckets.advertisers,
        "topic": buckets.topics,
        "position": MAX_POSITION + 1,
        "placement": len(buckets.placements) + 1,
        "device": len(buckets.devices) + 1,
        "hour": 24,
    }


class CandidateEmbedding(nn.Module):
    """The candidate ad and its request context, summed into one ``dim`` vector."""

    def __init__(self, buckets: Buckets, dim: int) -> None:
        super().__init__()
        self.tables = nn.ModuleDict(
            {name: nn.Embedding(size, dim) for name, size in candidate_sizes(buckets).items()}
        )

    def forward(self, candidate: dict[str, Tensor]) -> Tensor:
        return sum((table(candidate[name]) for name, table in self.tables.items()), torch.zeros(()))


class FoundationModel(nn.Module):
    def __init__(self, config: FMConfig) -> None:
        super().__init__()
        self.config = config
        b, d = config.buckets, config.dim
        self.token_tables = nn.ModuleDict(
            {
                "kind": nn.Embedding(len(EVENT_TYPES) + 1, d, padding_idx=0),
                "ad": nn.Embedding(b.ads, d, padding_idx=0),
                "campaign": nn.Embedding(b.campaigns, d, padding_idx=0),
                "advertiser": nn.Embedding(b.advertisers, d, padding_idx=0),
                "topic": nn.Embedding(b.topics, d, padding_idx=0),
                "query": nn.Embedding(b.queries, d, padding_idx=0),
                "gap": nn.Embedding(GAP_BUCKETS, d, padding_idx=0),
            }
        )
        self.candidate = CandidateEmbedding(b, d)
        for module in [*self.token_tables.values(), *self.candidate.tables.values()]:
            assert isinstance(module, nn.Embedding)
            # Small (PyTorch's default is N(0, 1)): summed, unnormalized candidate ids would
            # otherwise dominate the head and let it memorize ads seen in training.
            nn.init.normal_(module.weight, std=0.05)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])
        self.now_token = nn.Parameter(torch.randn(d) * 0.02)
        self.blocks = nn.ModuleList(
            SlidingWindowBlock(d, config.heads, config.window, config.dropout) for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(d)
        self.seeds = nn.Parameter(torch.randn(config.seeds, d) * 0.1)
        self.to_user = nn.Linear(config.seeds * d, config.embedding_dim)
        self.user_to_dim = nn.Linear(config.embedding_dim, d)
        n_dense = len(config.dense_features)
        self.register_buffer("dense_mean", torch.tensor(config.dense_mean or [0.0] * n_dense))
        self.register_buffer("dense_std", torch.tensor(config.dense_std or [1.0] * n_dense))
        self.head = nn.Sequential(
            nn.Linear(config.embedding_dim + 4 * d + n_dense, 2 * d),
            nn.GELU(),
            nn.Linear(2 * d, d),
            nn.GELU(),
            nn.Linear(d, 2),
        )
        self.wide = WidePart(b, config) if config.wide else None
        # The user embedding's taste profile (logits over ad topics); see profile_loss.
        self.topic_profile = nn.Linear(config.embedding_dim, b.topics) if config.profile_weight > 0 else None
        # The user's profile attributes: one table each (by position: attribute names are free
        # text), summed into the "now" token and, directly, into the user embedding.
        self.attribute_tables = nn.ModuleList(
            nn.Embedding(b.profile_values, d, padding_idx=0) for _ in config.profile_attributes
        )
        for table in self.attribute_tables:
            assert isinstance(table, nn.Embedding)
            nn.init.normal_(table.weight, std=0.05)
            nn.init.zeros_(table.weight[0])
        self.profile_to_user = nn.Linear(d, config.embedding_dim) if config.profile_attributes else None

    def profile_loss(self, user: Tensor, history: dict[str, Tensor]) -> Tensor:
        """Cross-entropy of the topics clicked or searched in ``history``, predicted from ``user``.

        Clicks are sparse (a few per user), so the click heads alone never teach the
        candidate-independent user embedding which topics a user likes; this makes it a
        taste profile, the part of the FM's knowledge the vertical models cannot rebuild.
        """
        if self.topic_profile is None:
            raise ValueError("this FM has no topic-profile head (FMConfig.profile_weight is 0)")
        kind = history["kind"]
        signal = (kind == EVENT_TYPES.index("click") + 1) | (kind == EVENT_TYPES.index("search") + 1)
        signal = signal & (history["topic"] > 0)
        counts = torch.zeros(user.shape[0], self.config.buckets.topics, device=user.device)
        counts.scatter_add_(1, history["topic"], signal.float())
        total = counts.sum(1)
        has = total > 0
        if not bool(has.any()):
            return user.sum() * 0.0
        log_p = torch.log_softmax(self.topic_profile(user[has]), dim=1)
        return -((counts[has] / total[has, None]) * log_p).sum(1).mean()

    def encode(self, history: dict[str, Tensor], profile: Tensor | None) -> tuple[Tensor, Tensor]:
        """Encoded events (B, L+1, d) with the "now" token (+ ``profile``) last, and the padding mask."""
        tokens = sum(
            (table(history[name]) for name, table in self.token_tables.items()),
            torch.zeros(()),
        )
        batch = tokens.shape[0]
        now = self.now_token.expand(batch, -1)
        if profile is not None:
            now = now + profile
        tokens = torch.cat([tokens, now[:, None, :]], dim=1)
        padding = torch.cat(
            [history["kind"] == 0, torch.zeros(batch, 1, dtype=torch.bool, device=tokens.device)], dim=1
        )
        for block in self.blocks:
            tokens = block(tokens, padding)
        return self.norm(tokens), padding

    def profile(self, history: dict[str, Tensor]) -> Tensor | None:
        """(B, d) the sum of the user's profile-attribute embeddings (None: the FM reads no attributes)."""
        if not self.config.profile_attributes:
            return None
        missing = [n for n in self.config.profile_attributes if ATTRIBUTE_PREFIX + n not in history]
        if missing:
            raise ValueError(
                f"this FM reads the profile attributes {list(self.config.profile_attributes)}: build the "
                f"history with them (EventLog.history(..., attributes=...)); missing {missing}"
            )
        return sum(
            (
                table(history[ATTRIBUTE_PREFIX + name])
                for name, table in zip(self.config.profile_attributes, self.attribute_tables, strict=True)
            ),
            torch.zeros(()),
        )

    def pool_user(self, encoded: Tensor, padding: Tensor, profile: Tensor | None = None) -> Tensor:
        """The user embedding (B, embedding_dim): seed queries pooled over the encoded events, + profile."""
        seeds = self.seeds.expand(encoded.shape[0], -1, -1)
        pooled = masked_attention_pool(seeds, encoded, encoded, padding)
        z = self.to_user(pooled.flatten(1))
        if profile is not None and self.profile_to_user is not None:
            z = z + self.profile_to_user(profile)
        return torch.tanh(z)

    def user_embedding(self, history: dict[str, Tensor]) -> Tensor:
        """What LoopFM materializes: depends only on the user's history, not on a candidate."""
        profile = self.profile(history)
        encoded, padding = self.encode(history, profile)
        return self.pool_user(encoded, padding, profile)

    def forward(
        self, history: dict[str, Tensor], candidate: dict[str, Tensor], dense: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(click and conversion logits (B, 2), user embedding (B, embedding_dim)).

        ``dense``: (B, F) the stream features the vertical models read (raw, as
        :func:`training.datasets.vm_inputs` builds them), when the config names any.
        """
        profile = self.profile(history)
        encoded, padding = self.encode(history, profile)
        user = self.pool_user(encoded, padding, profile)
        cand = self.candidate(candidate)
        target = masked_attention_pool(cand[:, None, :], encoded, encoded, padding)[:, 0]
        user_d = self.user_to_dim(user)
        parts = [user, cand, user_d * cand, target * cand, target]
        if self.config.dense_features:
            if dense is None:
                raise ValueError("this FM reads stream features: pass dense (B, F) to forward")
            mean, std = self.get_buffer("dense_mean"), self.get_buffer("dense_std")
            parts.append(((dense - mean) / std).clamp(-6.0, 6.0))
        features = torch.cat(parts, dim=1)
        logits = self.head(features)
        if self.wide is not None:
            logits = logits + self.wide(user, candidate)
        return logits, user


class WidePart(nn.Module):
    """Per-id biases of the candidate (click and conversion) plus a user x topic taste term (click)."""

    def __init__(self, buckets: Buckets, config: FMConfig) -> None:
        super().__init__()
        self.bias = nn.ModuleDict(
            {name: nn.Embedding(size, 2) for name, size in candidate_sizes(buckets).items()}
        )
        for table in self.bias.values():
            assert isinstance(table, nn.Embedding)
            nn.init.zeros_(table.weight)  # starts as the deep part alone
        self.user_taste = nn.Linear(config.embedding_dim, config.taste_dim)
        self.topic_taste = nn.Embedding(buckets.topics, config.taste_dim)
        nn.init.normal_(self.topic_taste.weight, std=0.05)

    def forward(self, user: Tensor, candidate: dict[str, Tensor]) -> Tensor:
        """(B, 2) additions to the click and conversion logits."""
        bias = sum((table(candidate[name]) for name, table in self.bias.items()), torch.zeros(()))
        taste = (self.user_taste(user) * self.topic_taste(candidate["topic"])).sum(1)
        return bias + torch.stack([taste, torch.zeros_like(taste)], dim=1)
