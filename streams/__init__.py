"""Events in: typed ad events, the producer SDK, topics and the embedded broker."""

from streams.events import (
    Click,
    Conversion,
    Event,
    Impression,
    InvalidEventError,
    MalformedJSONError,
    SchemaViolationError,
    Search,
    UnknownEventTypeError,
    UserProfile,
    validate,
    validate_json,
)
from streams.producer import DeliveryError, EventProducer, ProducerError, ProducerStats

__all__ = [
    "Click",
    "Conversion",
    "DeliveryError",
    "Event",
    "EventProducer",
    "Impression",
    "InvalidEventError",
    "MalformedJSONError",
    "ProducerError",
    "ProducerStats",
    "SchemaViolationError",
    "Search",
    "UnknownEventTypeError",
    "UserProfile",
    "validate",
    "validate_json",
]
