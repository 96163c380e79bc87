"""The reach HTTP service (``adreach reach serve``): FastAPI over a :class:`ReachForecaster`.

* ``POST /v1/reach`` ``{"targeting": E, "horizon_days": D?, "allow_partial": false}``
  answers ``{"reach", "ci95", "sample_users", ...}`` (:meth:`ReachEstimate.to_json`);
* ``GET /v1/reach/fields``: the targetable fields, their values (with build-time counts)
  or ranges, and the operators each kind takes;
* ``GET /v1/reach/health``: shards and streaming-update counters;
* OpenAPI docs at ``/docs``.

Errors are JSON ``{"detail": {"error": CODE, "message": TEXT, "path": WHERE}}``: 400 for
a targeting expression that does not fit the sample (unknown field, wrong value type,
malformed tree; ``path`` points into the expression), 422 for a request body of the
wrong shape, 503 when a shard is down and no partial answer was allowed.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from estimation.forecaster import ReachForecaster
from estimation.sharding import ShardUnavailableError
from estimation.targeting import MalformedTargetingError, TargetingError, UnknownFieldError
from estimation.updates import ProfileFollower

EXAMPLE: dict[str, Any] = {
    "targeting": {
        "and": [
            {"field": "country", "in": ["US", "CA"]},
            {"field": "age", "between": [25, 34]},
            {"field": "interests", "has_any": ["travel"]},
        ]
    },
    "horizon_days": 7,
}


class ReachRequest(BaseModel):
    """A reach question."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EXAMPLE]})

    targeting: Any = Field(
        ...,
        description='Targeting expression: {"and": [E...]}, {"or": [E...]}, {"not": E}, '
        '{"field": F, "eq": v}, {"field": F, "in": [v...]}, {"field": F, "between": [lo, hi]}, '
        '{"field": F, "has_any": [v...]}, {"field": F, "has_all": [v...]}; {"and": []} is everyone.',
    )
    horizon_days: float | None = Field(
        None,
        gt=0,
        le=3650,
        description="Forecast unique users active (and impressions) within this many days.",
    )
    allow_partial: bool | None = Field(
        None, description="When a shard is down, answer from the others (marked partial) instead of 503."
    )


class ReachResponse(BaseModel):
    """The estimate; ``ci95`` is a 95% interval, ``sample_users`` the matching sampled users behind it."""

    reach: float
    ci95: tuple[float, float]
    sample_users: int
    population: int
    sample_size: int
    exact_users: int
    method: str
    std_error: float
    partial: bool
    warnings: list[str]
    horizon_days: float | None = None
    audience: float | None = None
    impressions: float | None = None
    impressions_ci95: tuple[float, float] | None = None
    missing_shards: list[int] | None = None
    coverage: float | None = None


def _error_code(exc: TargetingError) -> str:
    if isinstance(exc, UnknownFieldError):
        return "unknown_field"
    if isinstance(exc, MalformedTargetingError):
        return "malformed_targeting"
    return "invalid_value"


def create_app(forecaster: ReachForecaster, follower: ProfileFollower | None = None) -> FastAPI:
    """The FastAPI application answering from ``forecaster`` (which it does not close)."""
    app = FastAPI(
        title="adreach reach forecasting",
        version="1",
        description="How many unique users match a targeting expression, and how many a campaign can reach "
        "within a horizon, with a 95% interval.",
    )

    @app.post("/v1/reach", response_model=ReachResponse, response_model_exclude_none=True)
    def reach(request: ReachRequest) -> dict[str, Any]:
        try:
            answer = forecaster.estimate(
                request.targeting, request.horizon_days, allow_partial=request.allow_partial
            )
        except TargetingError as exc:
            raise HTTPException(
                400, {"error": _error_code(exc), "message": str(exc), "path": exc.path}
            ) from None
        except ShardUnavailableError as exc:
            raise HTTPException(
                503, {"error": "shard_unavailable", "message": str(exc), "missing_shards": exc.missing}
            ) from None
        return answer.to_json()

    @app.get("/v1/reach/fields")
    def fields() -> dict[str, Any]:
        return forecaster.fields()

    @app.get("/v1/reach/health")
    def health() -> JSONResponse:
        info = forecaster.info()
        if follower is not None:
            info["follower"] = follower.to_json()
        healthy = all(shard["ok"] for shard in info["shards"])
        return JSONResponse(info, status_code=200 if healthy else 503)

    return app
