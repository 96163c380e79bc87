"""Checks that a command's results can be written, made before the work that produces them.

Why: a model's training, an evaluation or a corpus takes minutes; a folder that cannot be
created or a ``--json`` path naming a folder must be a usage error (exit 2) up front,
not a traceback after the work is lost.
"""

from __future__ import annotations

import os
from pathlib import Path


def writable_folder(path: Path, what: str, *, named: Path | None = None) -> None:
    """Exit with a usage error unless ``path`` is (or can be made) a folder we can write in;
    the message names ``what`` and ``named`` (a file the folder is to hold) or ``path``."""
    from infra.cli import EXIT_USAGE, _fail

    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".adreach-write-check-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        where = f"{named}: cannot write in {path}" if named is not None else f"{path}: cannot write there"
        _fail(f"{what} {where} ({exc.strerror or exc})", EXIT_USAGE)


def writable_file(path: Path, what: str) -> None:
    """Exit with a usage error unless ``path`` can be written: not a folder, in a folder we
    can write in (made if missing, as the command would make it)."""
    from infra.cli import EXIT_USAGE, _fail

    if path.is_dir():
        _fail(f"{what} {path} is a folder; give a file name", EXIT_USAGE)
    writable_folder(path.parent, what, named=path)
