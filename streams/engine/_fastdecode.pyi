"""Types of the compiled decode fast path (streams/engine/_fastdecode.c)."""

Column = tuple[bytes | None, bytes, bytes | None, int]
Field = tuple[str, int, bool]

def decode(values: list[bytes], fields: tuple[Field, ...], /) -> tuple[list[Column], list[int]]: ...
