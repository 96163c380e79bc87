"""The ad taxonomy queries are classified into, and the labelled data shipped with the package.

The default taxonomy (``data/taxonomy.json``) has one category per ad vertical the
simulator knows, plus ``general`` for queries without one; a deployment points
``queries.taxonomy_path`` at its own file of the same shape. Each category carries a
natural-language description (what the CPU backend compares queries against, and what
the LLM prompt lists) and a few keywords (the CPU backend's keyword-expansion vocabulary).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

DATA_PACKAGE = "features.queries.data"


class TaxonomyError(ValueError):
    """The taxonomy file is missing, not JSON, or has duplicate or empty categories."""


@dataclass(frozen=True)
class Category:
    id: str
    name: str
    description: str
    keywords: tuple[str, ...]


@dataclass(frozen=True)
class Taxonomy:
    name: str
    categories: tuple[Category, ...]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(c.id for c in self.categories)

    def index(self, category_id: str) -> int:
        return self.ids.index(category_id)

    def __contains__(self, category_id: object) -> bool:
        return category_id in self.ids

    @classmethod
    def from_json(cls, raw: Any, source: str) -> Taxonomy:
        try:
            categories = tuple(
                Category(
                    id=str(c["id"]),
                    name=str(c.get("name", c["id"])),
                    description=str(c["description"]),
                    keywords=tuple(str(k) for k in c.get("keywords", ())),
                )
                for c in raw["categories"]
            )
        except (KeyError, TypeError) as exc:
            raise TaxonomyError(
                f"{source}: expected {{'categories': [{{'id', 'description', ...}}]}} ({exc!r})"
            ) from None
        ids = [c.id for c in categories]
        if not ids or len(set(ids)) != len(ids):
            raise TaxonomyError(f"{source}: category ids must be present and unique")
        return cls(name=str(raw.get("name", source)), categories=categories)


def load_taxonomy(path: Path | None = None) -> Taxonomy:
    """The taxonomy at ``path``, else the packaged default."""
    if path is None:
        text = files(DATA_PACKAGE).joinpath("taxonomy.json").read_text(encoding="utf-8")
        return Taxonomy.from_json(json.loads(text), "packaged taxonomy")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TaxonomyError(f"queries.taxonomy_path {path}: {exc}") from None
    return Taxonomy.from_json(raw, str(path))


def packaged_jsonl(name: str) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file shipped in ``features/queries/data``."""
    text = files(DATA_PACKAGE).joinpath(name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
