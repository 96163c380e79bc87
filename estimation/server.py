"""The reach HTTP service (``adreach reach serve``): FastAPI over a :class:`ReachForecaster`.

* ``POST /v1/reach`` ``{"targeting": E, "horizon_days": D?, "allow_partial": false}``
  answers ``{"reach", "ci95", "sample_users", ...}`` (:meth:`ReachEstimate.to_json`);
* ``GET /v1/reach/fields``: the targetable fields, their values (with build-time counts)
  or ranges, and the operators each kind takes;
* ``GET /v1/reach/health``: shards and streaming-update counters;
* ``POST /v1/quality/user``, ``POST /v1/quality/aggregate``: assess a data provider
  (:mod:`estimation.quality`), optionally keeping the result for forecasts (``save``);
  ``GET /v1/quality/assessments``; ``POST /v1/quality/rank``: providers for a category;
  ``POST /v1/reach`` with ``true_category`` counts users truly in a category;
* OpenAPI docs at ``/docs``.

Errors are JSON ``{"detail": {"error": CODE, "message": TEXT, "path": WHERE}}``: 400 for
a targeting expression that does not fit the sample (unknown field, wrong value type,
malformed tree; ``path`` points into the expression) or a body that cannot be parsed at
all (``malformed_body``: empty, not JSON, not UTF-8, nested past the parser), 413
(``body_too_large``) for a query body over :data:`MAX_QUERY_BODY_BYTES`, 422 for JSON of
the wrong shape, 503 when a shard is down and no partial answer was allowed.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from estimation.forecaster import MAX_HORIZON_DAYS, ReachForecaster
from estimation.quality.aggregate import assess_aggregate
from estimation.quality.forecast import (
    QualityLookupError,
    QualityRegistry,
    rank_providers,
    true_category_reach,
)
from estimation.quality.inputs import QualityInputError, table_from_columns
from estimation.quality.report import QualityReport
from estimation.quality.user import assess_users
from estimation.sharding import ShardUnavailableError
from estimation.targeting import MalformedTargetingError, TargetingError, UnknownFieldError
from estimation.updates import ProfileFollower
from infra.settings import QualitySettings

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


class TrueCategory(BaseModel):
    """Count users truly in ``category`` of ``attribute`` by ``provider``'s assessment."""

    model_config = ConfigDict(extra="forbid")

    provider: str
    attribute: str
    category: str


class ReachRequest(BaseModel):
    """A reach question."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EXAMPLE]})

    targeting: Any = Field(
        ...,
        description='Targeting expression: {"and": [E...]}, {"or": [E...]}, {"not": E}, '
        '{"field": F, "eq": v}, {"field": F, "in": [v...]}, {"field": F, "between": [lo, hi]}, '
        '{"field": F, "has_any": [v...]}, {"field": F, "has_all": [v...]}; {"and": []} is everyone. '
        'Dates and timestamps are ISO 8601 text ("2024-01-31", "2024-01-31T12:00:00Z"); '
        "null leaves one end of a between open ([65, null]: 65 and over).",
    )
    horizon_days: float | None = Field(
        None,
        gt=0,
        le=MAX_HORIZON_DAYS,
        description="Forecast unique users active (and impressions) within this many days.",
    )
    allow_partial: bool | None = Field(
        None, description="When a shard is down, answer from the others (marked partial) instead of 503."
    )
    true_category: TrueCategory | None = Field(
        None,
        description="Answer with users *truly* in this category: the targeting must select the provider's "
        "segment (a has_any on the provider-labels field); reach and ci95 then combine the sample with the "
        "provider's estimated P(true category | label), and the interval widens by its uncertainty.",
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
    true_category: dict[str, Any] | None = None


Columns = dict[str, list[Any]]


class _AssessmentRequest(BaseModel):
    """What both kinds of assessment request share: whose segment it is, and whether to keep it."""

    model_config = ConfigDict(extra="forbid")

    provider: str | None = None
    attribute: str | None = None
    save: bool = Field(
        False, description="Keep the result for true_category queries (needs provider, attribute)."
    )


class UserQualityRequest(_AssessmentRequest):
    """User-level assessment: columns as JSON lists."""

    model_config = ConfigDict(extra="forbid")

    labels: Columns = Field(..., description='{"user_id": [...], "label": [...]}: the provider\'s labels.')
    truth: Columns = Field(..., description='{"user_id": [...], "truth": [...], "weight"?: [...]}: a panel.')
    reweight: bool = Field(True, description="Post-stratify the panel to the served reach sample's strata.")


class AggregateQualityRequest(_AssessmentRequest):
    """Aggregate assessment: per-campaign label mixes and vendor truth, columns as JSON lists."""

    model_config = ConfigDict(extra="forbid")

    mix: Columns = Field(..., description='{"campaign_id": [...], "label": [...], "share"|"count": [...]}')
    truth: Columns = Field(
        ..., description='{"campaign_id": [...], "category": [...], "share"|"count": [...]}'
    )
    bootstrap: int | None = Field(None, ge=20, le=10_000)
    seed: int | None = Field(None, ge=0)
    label_shares: dict[str, float] | None = Field(
        None, description="Label distribution for recall/accuracy (default: pooled over the campaigns)."
    )


class RankRequest(BaseModel):
    """Rank the assessed providers' segments for a category."""

    model_config = ConfigDict(extra="forbid")

    attribute: str
    category: str
    targeting: Any = Field(None, description="Restrict to users matching this targeting (default: everyone).")
    sort_by: Literal["precision", "true_reach"] = "precision"


def _error_code(exc: TargetingError) -> str:
    if isinstance(exc, UnknownFieldError):
        return "unknown_field"
    if isinstance(exc, MalformedTargetingError):
        return "malformed_targeting"
    return "invalid_value"


# Bodies of the requests that carry a targeting expression (``/v1/reach``, ``/v1/quality/rank``):
# MAX_VALUES values of ~100 characters fit; the quality assessments, which carry a panel's
# labels, are not limited.
MAX_QUERY_BODY_BYTES = 2 * 1024 * 1024


_FASTAPI_PARSE_ERROR = "There was an error parsing the body"


def _unparseable_body(cause: BaseException | None) -> str:
    """Why FastAPI could not read a body it reports only as "There was an error parsing the body"."""
    if isinstance(cause, UnicodeDecodeError):
        why = f"it is not UTF-8 text (byte {cause.start}: {cause.reason})"
    elif isinstance(cause, RecursionError):
        why = (
            "its JSON is nested more deeply than the parser allows (about 1,000 levels; "
            "a targeting expression may nest at most 32 levels)"
        )
    elif isinstance(cause, ValueError) and "digits" in str(cause):
        why = "it holds an integer with more digits than the parser allows (4,300)"
    else:
        why = f"{type(cause).__name__}: {cause}" if cause is not None else "the body could not be read"
    return f"the request body could not be parsed: {why}; send one JSON object (UTF-8)"


def _malformed_body(message: str) -> JSONResponse:
    return JSONResponse({"detail": {"error": "malformed_body", "message": message}}, status_code=400)


class QueryBodyLimit:
    """ASGI middleware: a 413 ``body_too_large`` (in the documented error shape) for a body
    over ``limit`` bytes sent to one of ``paths``, told by its Content-Length or, for a
    chunked body, as soon as the bytes read pass the limit.

    Why not FastAPI's ``max_body_size``: its 413 is a plain-text response sent from inside
    the route, past the app's exception handlers, so clients reading ``detail.error``
    would fail on it. The body is read here and handed on whole, as FastAPI reads it anyway.
    """

    def __init__(self, app: ASGIApp, *, paths: tuple[str, ...], limit: int) -> None:
        self.app, self.paths, self.limit = app, paths, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            await self._too_large(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        handed_on = False

        async def replay() -> Message:
            nonlocal handed_on
            if handed_on:
                return await receive()
            handed_on = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is over {self.limit:,} bytes"
        response = JSONResponse({"detail": {"error": "body_too_large", "message": message}}, status_code=413)
        await response(scope, receive, send)


def _bad_input(exc: Exception) -> HTTPException:
    code = "invalid_input" if isinstance(exc, QualityInputError) else "quality_unavailable"
    return HTTPException(400, {"error": code, "message": str(exc)})


def _targeting_error(exc: TargetingError) -> HTTPException:
    """A 400 naming what is wrong in the targeting expression, and where."""
    return HTTPException(400, {"error": _error_code(exc), "message": str(exc), "path": exc.path})


def create_app(
    forecaster: ReachForecaster,
    follower: ProfileFollower | None = None,
    *,
    quality: QualityRegistry | None = None,
    quality_settings: QualitySettings | None = None,
) -> FastAPI:
    """The FastAPI application answering from ``forecaster`` (which it does not close)."""
    registry = quality if quality is not None else QualityRegistry()
    qsettings = quality_settings or QualitySettings()
    app = FastAPI(
        title="adreach reach forecasting",
        version="1",
        description="How many unique users match a targeting expression, and how many a campaign can reach "
        "within a horizon, with a 95% interval.",
    )

    app.add_middleware(QueryBodyLimit, paths=("/v1/reach", "/v1/quality/rank"), limit=MAX_QUERY_BODY_BYTES)

    @app.exception_handler(StarletteHTTPException)
    async def structured_errors(request: Request, exc: StarletteHTTPException) -> Response:
        """FastAPI's own 400, for a body it cannot parse at all, in the documented shape,
        ``{"detail": {"error", "message"}}``.

        Why: it carries a bare string, and clients reading ``detail.error`` would fail on it;
        for a body it could not parse it does not even say what was wrong (bytes that are not
        UTF-8, JSON nested past the parser's recursion limit, an integer of thousands of digits).
        """
        if exc.status_code != 400 or not isinstance(exc.detail, str):
            return await http_exception_handler(request, exc)
        unparsed = exc.detail == _FASTAPI_PARSE_ERROR
        return _malformed_body(_unparseable_body(exc.__cause__) if unparsed else exc.detail)

    @app.exception_handler(RequestValidationError)
    async def unparseable_json(request: Request, exc: RequestValidationError) -> Response:
        """A body that is not JSON at all, or empty, is a 400 ``malformed_body`` (as documented);
        valid JSON of the wrong shape stays FastAPI's 422 with its per-field errors."""
        errors = exc.errors()
        for error in errors:
            where = tuple(error.get("loc", ()))
            if error.get("type") == "json_invalid":
                at = f" at character {where[1]}" if len(where) > 1 else ""
                reason = error.get("ctx", {}).get("error", "invalid JSON")
                return _malformed_body(f"the request body is not valid JSON: {reason}{at}")
            if error.get("type") == "missing" and where == ("body",):
                return _malformed_body("the request body is empty; send one JSON object")
        return await request_validation_exception_handler(request, exc)

    @app.post("/v1/reach", response_model=ReachResponse, response_model_exclude_none=True)
    def reach(request: ReachRequest) -> dict[str, Any]:
        true = None
        try:
            if request.true_category is None:
                answer = forecaster.estimate(
                    request.targeting, request.horizon_days, allow_partial=request.allow_partial
                )
            else:
                wanted = request.true_category
                answer, true = true_category_reach(
                    forecaster,
                    request.targeting,
                    registry.get(wanted.provider, wanted.attribute),
                    wanted.category,
                    horizon_days=request.horizon_days,
                    allow_partial=request.allow_partial,
                )
        except QualityLookupError as exc:
            raise _bad_input(exc) from None
        except TargetingError as exc:
            raise _targeting_error(exc) from None
        except ShardUnavailableError as exc:
            raise HTTPException(
                503, {"error": "shard_unavailable", "message": str(exc), "missing_shards": exc.missing}
            ) from None
        out = answer.to_json()
        if true is not None:
            out["true_category"] = true.to_json()
        return out

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

    def _keep(report: QualityReport, save: bool) -> dict[str, Any]:
        out = report.to_json()
        if save:
            try:
                registry.add(report)
            except QualityLookupError as exc:
                raise _bad_input(exc) from None
        out["saved"] = save
        return out

    @app.post("/v1/quality/user")
    def quality_user(request: UserQualityRequest) -> dict[str, Any]:
        try:
            report = assess_users(
                table_from_columns(request.labels, "labels"),
                table_from_columns(request.truth, "truth"),
                sample_dir=forecaster.meta.directory if request.reweight else None,
                provider=request.provider,
                attribute=request.attribute,
            )
        except QualityInputError as exc:
            raise _bad_input(exc) from None
        return _keep(report, request.save)

    @app.post("/v1/quality/aggregate")
    def quality_aggregate(request: AggregateQualityRequest) -> dict[str, Any]:
        try:
            report = assess_aggregate(
                table_from_columns(request.mix, "mix"),
                table_from_columns(request.truth, "truth"),
                bootstrap=request.bootstrap or qsettings.bootstrap_replicates,
                seed=qsettings.seed if request.seed is None else request.seed,
                max_condition=qsettings.max_condition_number,
                max_ci_width=qsettings.max_ci_width,
                tolerance=qsettings.share_tolerance,
                label_shares=request.label_shares,
                provider=request.provider,
                attribute=request.attribute,
            )
        except QualityInputError as exc:
            raise _bad_input(exc) from None
        return _keep(report, request.save)

    @app.get("/v1/quality/assessments")
    def quality_assessments() -> dict[str, Any]:
        return {"assessments": registry.summary()}

    @app.post("/v1/quality/rank")
    def quality_rank(request: RankRequest) -> dict[str, Any]:
        try:
            rows = rank_providers(
                registry,
                request.attribute,
                request.category,
                forecaster=forecaster,
                targeting=request.targeting,
                sort_by=request.sort_by,
            )
        except QualityLookupError as exc:
            raise _bad_input(exc) from None
        except TargetingError as exc:
            raise _targeting_error(exc) from None
        return {"attribute": request.attribute, "category": request.category, "providers": rows}

    return app
