"""Attention kernels for long user histories.

:func:`sliding_window_attention` lets each event attend to itself and the ``window - 1``
events before it (causal, banded), as in Kunlun's sliding-window attention. It is
computed block-wise: the sequence is cut into blocks of ``window`` events and each block
attends to itself and the previous block, so time and memory grow as ``L * 2W`` rather
than ``L**2``; a 4,096-event history with W = 64 costs 32x less than full attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, padding: Tensor) -> Tensor:
    """Causal banded attention. ``q, k, v``: (B, H, L, D); ``padding``: (B, L), True = no event.

    Query ``i`` sees keys ``j`` with ``i - window < j <= i`` that are not padding. A query
    that sees no key (a padding slot) gets zeros.
    """
    batch, heads, length, dim = q.shape
    blocks = math.ceil(length / window)
    extra = blocks * window - length

    def blocked(x: Tensor) -> Tensor:
        return F.pad(x, (0, 0, 0, extra)).reshape(batch, heads, blocks, window, dim)

    qb, kb, vb = blocked(q), blocked(k), blocked(v)
    # Keys of block b: block b-1 then block b (2W keys).
    kk = torch.cat([F.pad(kb, (0, 0, 0, 0, 1, 0))[:, :, :-1], kb], dim=3)
    vv = torch.cat([F.pad(vb, (0, 0, 0, 0, 1, 0))[:, :, :-1], vb], dim=3)
    key_pad = F.pad(padding, (0, extra), value=True).reshape(batch, blocks, window)
    key_pad = torch.cat([F.pad(key_pad, (0, 0, 1, 0), value=True)[:, :-1], key_pad], dim=2)  # (B, nb, 2W)
    offset = (
        torch.arange(window, device=q.device)[:, None] + window - torch.arange(2 * window, device=q.device)
    )
    band = (offset >= 0) & (offset < window)  # (W, 2W): 0 <= query - key < window
    allowed = band[None, None] & ~key_pad[:, :, None, :]  # (B, nb, W, 2W)
    scores = torch.einsum("bhnqd,bhnkd->bhnqk", qb, kk) / math.sqrt(dim)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhnqk,bhnkd->bhnqd", weights, vv)
    return out.reshape(batch, heads, blocks * window, dim)[:, :, :length]


class SlidingWindowBlock(nn.Module):
    """Pre-norm transformer block with sliding-window self-attention."""

    def __init__(self, dim: int, heads: int, window: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be a multiple of heads {heads}")
        self.heads = heads
        self.window = window
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(batch, length, 3, self.heads, dim // self.heads).unbind(2)
        attended = sliding_window_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.window, padding
        )
        x = x + self.dropout(self.out(attended.transpose(1, 2).reshape(batch, length, dim)))
        out: Tensor = x + self.dropout(self.ffn(self.norm2(x)))
        return out


def masked_attention_pool(query: Tensor, keys: Tensor, values: Tensor, padding: Tensor) -> Tensor:
    """Each query (B, Q, D) pools ``values`` (B, L, D) by softmax(q . k); padding keys are skipped.

    A row with no valid key pools to zeros.
    """
    scores = torch.einsum("bqd,bld->bql", query, keys) / math.sqrt(query.shape[-1])
    scores = scores.masked_fill(padding[:, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    pooled: Tensor = torch.einsum("bql,bld->bqd", weights, values)
    return pooled
