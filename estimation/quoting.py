"""How error messages and warnings quote a value a user gave: whole when short, cut when long."""

from __future__ import annotations

SHOWN_CHARS = 100


def quoted(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` of at most about ``limit`` characters: a message names a value, it does
    not echo a megabyte back."""
    text = str(value)
    if len(text) <= limit:
        return repr(value)
    return f"{text[: limit - 3] + '...'!r} ({len(text):,} characters)"
