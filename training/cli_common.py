"""Helpers the model commands share: settings with command-line overrides, data, progress."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import pydantic
import typer

from infra.option_errors import option_errors
from infra.settings import ModelSettings, Settings


def fail(message: str, code: int) -> NoReturn:
    from infra.cli import _fail

    _fail(message, code)


def exit_usage() -> int:
    from infra.cli import EXIT_USAGE

    return EXIT_USAGE


def exit_operational() -> int:
    from infra.cli import EXIT_OPERATIONAL

    return EXIT_OPERATIONAL


def model_settings(ctx: typer.Context, **overrides: Any) -> Settings:
    """The context's settings with ``models.*`` overridden by the options that were given."""
    settings = ctx.obj
    assert isinstance(settings, Settings)
    values = {key: value for key, value in overrides.items() if value is not None}
    try:
        models = ModelSettings.model_validate({**settings.models.model_dump(), **values})
    except pydantic.ValidationError as exc:
        fail(option_errors(exc, values, "models", _OPTIONS), exit_usage())
    return settings.model_copy(update={"models": models})


# The command-line options that override ``models.*`` settings, by setting.
_OPTIONS = {
    "epochs_fm": "--epochs",
    "epochs_vm": "--epochs",
    "seed": "--seed",
    "max_examples": "--max-examples",
    "vm_vertical": "--vertical",
    "embedding_every_s": "--every",
    "replay_flush_s": "--flush",
}


def load_data(events: Path, settings: Settings) -> Any:
    """The dataset behind ``--events``, with usage errors for missing or unreadable logs."""
    from training.events import Buckets, EventLogError
    from training.pipeline import load_dataset

    try:
        dataset = load_dataset(
            events,
            queries=settings.queries if settings.models.search_topics else None,
            buckets=Buckets.for_models(settings.models),
        )
    except EventLogError as exc:
        fail(str(exc), exit_usage())
    if not dataset.log.ad_topics:
        from infra.progress import stderr

        stderr.print(
            f"warning: no ad catalog at {events.parent / 'truth' / 'ads.parquet'} (columns ad_id, topic): "
            "every ad topic is unknown, so the FM's topic-profile head learns nothing",
            highlight=False,
            markup=False,
        )
    elif settings.models.search_topics:
        _warn_if_searches_get_no_topic(dataset, settings)
    return dataset


def _warn_if_searches_get_no_topic(dataset: Any, settings: Settings) -> None:
    """Searches take the topic of their query's category only where it is one of the catalog's
    topics: a catalog named in other words (its own labels, not the query taxonomy's ids)
    leaves every search without a topic, and nothing said so."""
    import numpy as np

    from features.queries.taxonomy import load_taxonomy
    from infra.progress import stderr
    from training.events import EVENT_TYPES

    log = dataset.log
    searches = log.kind == EVENT_TYPES.index("search") + 1
    if not searches.any() or (log.topic[searches] > 0).any():
        return
    categories = load_taxonomy(settings.queries.taxonomy_path).ids
    shown = ", ".join(sorted(set(log.ad_topics.values()))[:5])
    stderr.print(
        f"warning: none of the {int(np.sum(searches)):,} searches got a topic: their query categories "
        f"({', '.join(categories[:5])}, ...) are not the ad catalog's topics ({shown}, ...); name the "
        "catalog's topics with the query taxonomy's category ids for the FM's taste profile to link "
        "searches to ads",
        highlight=False,
        markup=False,
    )


@contextmanager
def progress_task(description: str, total: int | None, unit: str) -> Iterator[Callable[[int], None]]:
    from infra.progress import progress_bar

    with progress_bar() as bar:
        task = bar.add_task(description, total=total, unit=unit)
        yield lambda n: bar.advance(task, n)
