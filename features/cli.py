"""The ``adreach features`` command group (mounted by :mod:`infra.cli`).

Commands are defined next to the code they drive and registered here.
"""

from __future__ import annotations

import typer

from training.embeddings_cli import register as register_model_features

features_app = typer.Typer(help="Feature jobs that write into Feast.", no_args_is_help=True)
register_model_features(features_app)  # issue 7: fm-embeddings, backfill
