"""Reading input that may be gzip-compressed, told by its first bytes rather than its name.

Why: event exports are usually gzipped (``adreach stream flink`` replays write
``partition-NNNN.jsonl.gz`` themselves), and a compressed file read as text turns into a
stream of "malformed JSON" rejections and dead letters instead of events.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"

# What a damaged or truncated compressed stream raises while it is read
# (gzip.BadGzipFile is an OSError).
READ_ERRORS = (EOFError, OSError, zlib.error)


def is_gzip(path: Path) -> bool:
    """Whether the file at ``path`` starts like a gzip stream."""
    with path.open("rb") as handle:
        return handle.read(len(GZIP_MAGIC)) == GZIP_MAGIC


def open_binary(path: Path) -> io.BufferedIOBase:
    """``path`` opened for reading bytes, decompressed on the fly if it is gzip."""
    if is_gzip(path):
        return gzip.open(path, "rb")  # also reads several gzip members back to back
    return path.open("rb")


def decompressed(stream: BinaryIO) -> BinaryIO | io.BufferedIOBase:
    """A binary stream (standard input) as is, or decompressed if its first bytes are gzip's.

    Peeks without consuming (a buffered stream's ``peek``), so nothing is lost from a plain
    stream; a stream that cannot peek is read as is.
    """
    peek = getattr(stream, "peek", None)
    if peek is not None and peek(len(GZIP_MAGIC))[: len(GZIP_MAGIC)] == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=stream, mode="rb")
    return stream


def damage_hint(stream: object) -> str:
    """What a read error on ``stream`` most likely means, for the user's message.

    A gzip stream that stops mid-way was truncated or damaged (an interrupted copy or
    download); a plain stream that fails to read has an I/O problem, not a compression one.
    """
    if isinstance(stream, gzip.GzipFile):
        return "a damaged or truncated gzip file?"
    return "a read error of the file or pipe"


def lines_until_damaged(lines: Iterable[bytes], damage: list[str]) -> Iterator[bytes]:
    """``lines``, stopping at a damaged or truncated stream and appending why to ``damage``.

    The lines read before the damage are still yielded, so they can be processed and reported
    like any others; the caller then says where reading stopped.
    """
    try:
        yield from lines
    except READ_ERRORS as exc:
        damage.append(f"{type(exc).__name__}: {exc}")


def starts_like_json_array(stream: object) -> bool:
    """Whether a buffered input's first character (after a byte order mark and blanks) is ``[``.

    Why: a JSON Lines file of events or users never starts that way (each line is an
    object), while an export written as one JSON array does, and read line by line every
    one of its lines would be rejected (``adreach produce`` would dead-letter them all).
    Peeks without consuming; an input that cannot peek is taken as not an array.
    """
    peek = getattr(stream, "peek", None)
    if peek is None:
        return False
    try:
        head: bytes = peek(4096)[:4096]
    except (OSError, EOFError):  # (the reader reports the damage, at the line it happens)
        return False
    return head.removeprefix(UTF8_BOM).lstrip()[:1] == b"["


def json_lines_command(file: str, gzipped: bool) -> str:
    """The shell command that turns the JSON array in ``file`` (``-``: standard input) into JSON
    Lines on its output: ``jq -c '.[]'``, after ``gunzip -c`` for a gzip file (jq reads no gzip)."""
    if file == "-":
        return "... | jq -c '.[]'"
    return f"gunzip -c {file} | jq -c '.[]'" if gzipped else f"jq -c '.[]' {file}"
