"""A model registry folder: every trained model with the metadata needed to trust and reuse it.

Layout: ``<registry>/<name>/v<NNNN>/`` holding ``weights.pt`` (PyTorch state dicts,
loaded with ``weights_only=True``: no code is unpickled) and ``metadata.json`` (the model
config, training data time range and split, metrics, settings, when and by which
command it was made). Versions are never overwritten; "latest" is the highest number.
A version directory is written under a temporary name and renamed, so a reader never
sees half a model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_VERSION = re.compile(r"^v(\d{4,})$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.+-]*$")


class RegistryError(LookupError):
    """A model or version is not in the registry, or its files are unreadable."""


class NoModelError(RegistryError):
    """No version of the model was ever saved (as opposed to one that cannot be read)."""


@dataclass(frozen=True)
class SavedModel:
    name: str
    version: int
    path: Path
    metadata: dict[str, Any]
    weights: dict[str, dict[str, torch.Tensor]]


class ModelRegistry:
    def __init__(self, root: Path) -> None:
        self.root = root

    def versions(self, name: str) -> list[int]:
        directory = self.root / name
        if not directory.is_dir():
            return []
        # A save renames a complete staging folder into place, so a version folder without
        # its metadata (made by hand, or emptied) is not a model: it must not hide the others.
        found = (_VERSION.match(p.name) for p in directory.iterdir() if (p / "metadata.json").is_file())
        return sorted(int(m.group(1)) for m in found if m)

    def save(
        self, name: str, weights: dict[str, dict[str, torch.Tensor]], metadata: dict[str, Any]
    ) -> SavedModel:
        """Store ``weights`` (module name -> state dict) and ``metadata`` as the next version of ``name``."""
        if not _NAME.match(name):
            raise RegistryError(f"model name {name!r}: use lower-case letters, digits and . _ + -")
        directory = self.root / name
        directory.mkdir(parents=True, exist_ok=True)
        version = (self.versions(name) or [0])[-1] + 1
        staging = directory / f".v{version:04d}.{os.getpid()}"
        staging.mkdir()
        full = {
            **metadata,
            "name": name,
            "version": version,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        torch.save(
            {k: {p: t.detach().cpu() for p, t in sd.items()} for k, sd in weights.items()},
            staging / "weights.pt",
        )
        (staging / "metadata.json").write_text(json.dumps(full, indent=2, default=str) + "\n")
        final = directory / f"v{version:04d}"
        try:
            staging.rename(final)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return SavedModel(name, version, final, full, weights)

    def load(self, name: str, version: int | None = None) -> SavedModel:
        """A saved model: the given version, else the latest."""
        versions = self.versions(name)
        if not versions:
            command = (
                f"adreach train vm --variant {name[3:]}"
                if name.startswith("vm-")
                else f"adreach train {name}"
            )
            raise NoModelError(f"no model {name!r} in {self.root}; train it first ({command})")
        chosen = versions[-1] if version is None else version
        if chosen not in versions:
            raise RegistryError(f"model {name!r} has no version {version}; it has {versions}")
        path = self.root / name / f"v{chosen:04d}"
        try:
            metadata = json.loads((path / "metadata.json").read_text())
            weights = torch.load(path / "weights.pt", weights_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise RegistryError(f"{path}: unreadable model files ({exc})") from exc
        return SavedModel(name, chosen, path, metadata, weights)

    def metadata(self, name: str, version: int) -> dict[str, Any]:
        """One version's metadata alone (no weights read)."""
        path = self.root / name / f"v{version:04d}" / "metadata.json"
        try:
            metadata: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{path}: unreadable model metadata ({exc})") from exc
        return metadata

    def list(self) -> list[tuple[str, int]]:
        if not self.root.is_dir():
            return []
        return [(p.name, v) for p in sorted(self.root.iterdir()) if p.is_dir() for v in self.versions(p.name)]
