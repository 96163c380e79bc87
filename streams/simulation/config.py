"""Simulation parameters: one frozen, validated object per run."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta

from infra.settings import SimulationSettings

_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)  # the SDK's event-time range
_LATEST = datetime(2100, 1, 1, tzinfo=UTC)


class SimulationConfigError(ValueError):
    """A simulation parameter is out of range; the message names it."""


@dataclass(frozen=True)
class Shift:
    """A scheduled change in the world, at a fraction of the simulated period.

    kinds: ``new_campaigns`` (held-back campaigns launch), ``interest_drift`` (topic
    tastes and popularity move), ``new_traffic_source`` (a burst of new users from a
    different country/device mix with different behaviour).
    """

    kind: str
    at: float

    KINDS = ("new_campaigns", "interest_drift", "new_traffic_source")


DEFAULT_SHIFTS = (
    Shift("new_campaigns", 0.4),
    Shift("interest_drift", 0.6),
    Shift("new_traffic_source", 0.75),
)


@dataclass(frozen=True)
class SimulationConfig:
    users: int = 100_000
    days: float = 7.0
    events: int = 1_000_000
    seed: int = 42
    start: datetime = datetime(2026, 1, 5, tzinfo=UTC)
    advertisers: int = 40
    campaigns: int = 200
    shifts: tuple[Shift, ...] = DEFAULT_SHIFTS
    chunk_minutes: int = 60
    late_fraction: float = 0.005
    very_late_fraction: float = 0.0002
    profile_update_rate_per_day: float = 0.01
    deletion_rate_per_day: float = 0.001
    new_source_user_fraction: float = 0.05
    held_back_campaign_fraction: float = 0.2
    providers: tuple[str, ...] = ("acme", "databridge", "segmentco")

    def __post_init__(self) -> None:
        checks = [
            (self.users >= 10, "users must be at least 10"),
            (self.days > 0, "days must be positive"),
            (self.days <= 3_650, "days must be at most 3,650 (ten years)"),
            (self.events >= 1, "events must be positive"),
            (self.advertisers >= 1, "advertisers must be at least 1"),
            (self.campaigns >= self.advertisers, "campaigns must be at least the number of advertisers"),
            (1 <= self.chunk_minutes <= 24 * 60, "chunk_minutes must be between 1 and 1440"),
            (0 <= self.late_fraction < 0.5, "late_fraction must be in [0, 0.5)"),
            (0 <= self.very_late_fraction < 0.5, "very_late_fraction must be in [0, 0.5)"),
            (0 <= self.deletion_rate_per_day < 1, "deletion_rate_per_day must be in [0, 1)"),
            (0 <= self.new_source_user_fraction <= 1, "new_source_user_fraction must be in [0, 1]"),
            (0 <= self.held_back_campaign_fraction < 1, "held_back_campaign_fraction must be in [0, 1)"),
            (len(self.providers) >= 1, "at least one data provider is needed"),
            (self.start.tzinfo is not None, "start must be timezone-aware (UTC)"),
        ]
        if self.start.tzinfo is not None and self.days == self.days and self.days <= 3_650:
            # Every event time must be one the SDK accepts (conversions come up to a day late).
            latest = self.start + timedelta(days=self.days + 1)
            checks.append(
                (
                    self.start >= _EARLIEST and latest <= _LATEST,
                    "start and days must keep every event inside 2000-01-01..2100-01-01 (the SDK's range)",
                )
            )
        for ok, message in checks:
            if not ok:
                raise SimulationConfigError(message)
        for shift in self.shifts:
            if shift.kind not in Shift.KINDS:
                raise SimulationConfigError(
                    f"unknown shift kind {shift.kind!r}; expected one of {Shift.KINDS}"
                )
            if not 0 <= shift.at <= 1:
                raise SimulationConfigError(f"shift {shift.kind} at {shift.at}: must be a fraction in [0, 1]")
        traffic_budget = self.events - self.users * (1 + self.new_source_fraction_active)
        if traffic_budget < 0.1 * self.events:
            raise SimulationConfigError(
                f"events={self.events:,} is too few for users={self.users:,}: every user emits a profile "
                f"snapshot first, so ask for at least {int(self.users * 1.3):,} events (or fewer users)"
            )

    @property
    def new_source_fraction_active(self) -> float:
        return (
            self.new_source_user_fraction if any(s.kind == "new_traffic_source" for s in self.shifts) else 0.0
        )

    @property
    def start_ms(self) -> int:
        return int(self.start.timestamp() * 1000)

    @property
    def end_ms(self) -> int:
        return self.start_ms + int(self.days * 86_400_000)

    def shift_ms(self, kind: str) -> int | None:
        for shift in self.shifts:
            if shift.kind == kind:
                return self.start_ms + int(shift.at * (self.end_ms - self.start_ms))
        return None

    @classmethod
    def from_settings(cls, settings: SimulationSettings, **overrides: object) -> SimulationConfig:
        """Defaults from ``settings.simulate``, with command-line overrides on top."""
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise SimulationConfigError(f"unknown simulation option(s): {', '.join(sorted(unknown))}")
        values: dict[str, object] = {
            "users": settings.users,
            "days": settings.days,
            "events": settings.events,
            "seed": settings.seed,
            "start": datetime.fromisoformat(settings.start.replace("Z", "+00:00")).astimezone(UTC),
            "advertisers": settings.advertisers,
            "campaigns": settings.campaigns,
            **overrides,
        }
        return cls(**values)  # type: ignore[arg-type]
