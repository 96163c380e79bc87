"""The published JSON Schema file, generated from the event structs.

The file under ``streams/schemas/`` is committed so that producers in other languages
can vendor it; a test fails when it drifts from the structs, and
``adreach schema --out streams/schemas/adreach-events-v1.schema.json`` regenerates it.
"""

from __future__ import annotations

import json
from pathlib import Path

from streams.events import SCHEMA_VERSION, json_schema

SCHEMA_PATH = Path(__file__).parent / "schemas" / f"adreach-events-v{SCHEMA_VERSION}.schema.json"


def render_schema() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
