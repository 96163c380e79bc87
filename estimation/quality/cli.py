"""``adreach quality user`` and ``adreach quality aggregate`` (mounted by :mod:`infra.cli`).

Both print a readable table (or ``--json``) to stdout and can save the assessment with
``--out FILE.json`` for ``adreach reach serve --quality FILE.json``. Exit codes: 0 done,
1 the aggregate data identify no row of the matrix (the report says why), 2 unusable
input (the message says what to fix).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import rich.markup
import typer

from infra.settings import QualitySettings, Settings

quality_app = typer.Typer(
    help="Data-source quality: score a provider's labels against user-level or aggregate ground truth.",
    no_args_is_help=True,
)

JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
OutOption = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Also save the assessment as JSON (for reach serve --quality)."),
]
ProviderOption = Annotated[str | None, typer.Option(help="Provider name (e.g. acme), kept in the output.")]
AttributeOption = Annotated[
    str | None, typer.Option(help="Attribute name (e.g. age_band), kept in the output.")
]


def _settings(ctx: typer.Context) -> QualitySettings:
    settings = ctx.obj
    assert isinstance(settings, Settings)
    return settings.quality


def _emit(report: Any, as_json: bool, out: Path | None) -> None:
    payload = report.to_json()
    text = json.dumps(payload, indent=2, allow_nan=False)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text if as_json else report.describe())


@quality_app.command("user")
def user(
    ctx: typer.Context,
    labels: Annotated[
        Path,
        typer.Option(
            "--labels", help="Table (Parquet, CSV or JSON Lines) with user_id, label (the provider's)."
        ),
    ],
    truth: Annotated[
        Path, typer.Option("--truth", help="Table with user_id, truth (a panel); optional weight column.")
    ],
    sample: Annotated[
        Path | None,
        typer.Option(
            "--sample", help="Reach sample directory (adreach reach build) to post-stratify the panel to."
        ),
    ] = None,
    provider: ProviderOption = None,
    attribute: AttributeOption = None,
    as_json: JsonOption = False,
    out: OutOption = None,
) -> None:
    """User-level ground truth: confusion matrix, precision, recall, accuracy with 95% intervals."""
    from estimation.quality.inputs import QualityInputError, read_table
    from estimation.quality.user import assess_users
    from estimation.store import SampleError
    from infra.cli import EXIT_USAGE, _fail

    try:
        report = assess_users(
            read_table(labels, "LABELS"),
            read_table(truth, "TRUTH"),
            sample_dir=sample,
            provider=provider,
            attribute=attribute,
        )
    except (QualityInputError, SampleError) as exc:
        _fail(str(exc), EXIT_USAGE)
    _emit(report, as_json, out)


@quality_app.command("aggregate")
def aggregate(
    ctx: typer.Context,
    mix: Annotated[
        Path,
        typer.Option(
            "--mix",
            help="Table (Parquet, CSV or JSON Lines): campaign_id, label, share (or count): labels reached.",
        ),
    ],
    truth: Annotated[
        Path,
        typer.Option("--truth", help="Table with campaign_id, category, share (or count): vendor truth."),
    ],
    bootstrap: Annotated[
        int | None, typer.Option(help="Bootstrap replicates (default: quality.bootstrap_replicates).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Bootstrap seed (default: quality.seed).")] = None,
    provider: ProviderOption = None,
    attribute: AttributeOption = None,
    as_json: JsonOption = False,
    out: OutOption = None,
) -> None:
    """Aggregate ground truth per campaign: P(true | label) jointly across campaigns, with intervals."""
    from estimation.quality.aggregate import assess_aggregate
    from estimation.quality.inputs import QualityInputError, read_table
    from infra.cli import EXIT_REJECTED, EXIT_USAGE, _fail
    from infra.progress import stderr

    settings = _settings(ctx)
    try:
        report = assess_aggregate(
            read_table(mix, "MIX"),
            read_table(truth, "TRUTH"),
            bootstrap=settings.bootstrap_replicates if bootstrap is None else bootstrap,
            seed=settings.seed if seed is None else seed,
            max_condition=settings.max_condition_number,
            max_ci_width=settings.max_ci_width,
            tolerance=settings.share_tolerance,
            provider=provider,
            attribute=attribute,
        )
    except QualityInputError as exc:
        _fail(str(exc), EXIT_USAGE)
    _emit(report, as_json, out)
    assert report.identifiability is not None
    if report.identifiability["status"] == "not_identified":
        stderr.print(
            "[bold red]not identified:[/] "
            + rich.markup.escape("; ".join(report.identifiability["reasons"])),
            highlight=False,
        )
        raise typer.Exit(EXIT_REJECTED)
