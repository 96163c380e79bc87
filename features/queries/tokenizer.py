"""BERT's uncased WordPiece tokenizer, written against the model's own ``vocab.txt``.

The CPU backend loads MiniLM's weights into a small PyTorch BERT of its own
(:mod:`features.queries.encoder`) instead of pulling in ``transformers`` and
``tokenizers`` (and, through them, a Hub client that could download at run time). The
tokenizer therefore lives here too. It follows BERT's published algorithm:

1. clean the text (drop control characters, map whitespace to a space), put spaces
   around CJK ideographs, lower-case and strip accents (NFD, drop combining marks);
2. split on whitespace, then split every punctuation character off as its own token;
3. cut each word greedily into the longest vocabulary pieces, continuation pieces
   prefixed ``##``; a word that cannot be cut (or is longer than 100 characters)
   becomes ``[UNK]``.

Search queries repeat a small vocabulary, so the pieces of each word are memoised:
after warm-up, tokenizing a query is a few dictionary lookups.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache
from pathlib import Path

MAX_WORD_CHARS = 100


class TokenizerError(ValueError):
    """The vocabulary file is missing or lacks BERT's special tokens."""


def _is_punctuation(char: str) -> bool:
    code = ord(char)
    # ASCII symbols count as punctuation in BERT even where Unicode says "symbol" ($, +, ^, `).
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(code: int) -> bool:
    return (
        0x4E00 <= code <= 0x9FFF
        or 0x3400 <= code <= 0x4DBF
        or 0x20000 <= code <= 0x2A6DF
        or 0x2A700 <= code <= 0x2B73F
        or 0x2B740 <= code <= 0x2B81F
        or 0x2B820 <= code <= 0x2CEAF
        or 0xF900 <= code <= 0xFAFF
        or 0x2F800 <= code <= 0x2FA1F
    )


def _clean(text: str) -> str:
    out: list[str] = []
    for char in text:
        code = ord(char)
        if code == 0 or code == 0xFFFD:
            continue
        category = unicodedata.category(char)
        if char in "\t\n\r" or category == "Zs":
            out.append(" ")
        elif category.startswith("C"):
            continue
        elif _is_cjk(code):
            out.append(f" {char} ")
        else:
            out.append(char)
    return "".join(out)


def _strip_accents(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


def _split_punctuation(word: str) -> list[str]:
    pieces: list[str] = []
    current: list[str] = []
    for char in word:
        if _is_punctuation(char):
            if current:
                pieces.append("".join(current))
                current = []
            pieces.append(char)
        else:
            current.append(char)
    if current:
        pieces.append("".join(current))
    return pieces


class WordPieceTokenizer:
    """Text to BERT input ids (``[CLS] ... [SEP]``), truncated to ``max_length`` tokens."""

    def __init__(self, vocab_file: Path, max_length: int = 128) -> None:
        if not vocab_file.is_file():
            raise TokenizerError(f"no vocabulary file at {vocab_file}")
        tokens = vocab_file.read_text(encoding="utf-8").splitlines()
        self.vocab: dict[str, int] = {token: i for i, token in enumerate(tokens)}
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in self.vocab]
        if missing:
            raise TokenizerError(f"{vocab_file} lacks the special tokens {missing}")
        self.pad_id = self.vocab["[PAD]"]
        self.unk_id = self.vocab["[UNK]"]
        self.cls_id = self.vocab["[CLS]"]
        self.sep_id = self.vocab["[SEP]"]
        self.max_length = max_length
        self._word_ids = lru_cache(maxsize=200_000)(self._word_pieces)

    def _word_pieces(self, word: str) -> tuple[int, ...]:
        if len(word) > MAX_WORD_CHARS:
            return (self.unk_id,)
        ids: list[int] = []
        start = 0
        while start < len(word):
            end = len(word)
            found = None
            while start < end:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                found = self.vocab.get(piece)
                if found is not None:
                    break
                end -= 1
            if found is None:
                return (self.unk_id,)
            ids.append(found)
            start = end
        return tuple(ids)

    def tokenize_ids(self, text: str) -> list[int]:
        """Word-piece ids of ``text`` without special tokens or truncation."""
        ids: list[int] = []
        for word in _strip_accents(_clean(text).lower()).split():
            for piece in _split_punctuation(word):
                ids.extend(self._word_ids(piece))
        return ids

    def encode(self, text: str) -> list[int]:
        """``[CLS] pieces [SEP]``, the pieces cut so the whole fits ``max_length``."""
        return [self.cls_id, *self.tokenize_ids(text)[: self.max_length - 2], self.sep_id]
