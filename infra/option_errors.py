"""One-line messages for settings that command-line options overrode with invalid values.

Commands validate their options by building the settings table they override (pydantic),
whose errors name the setting over several lines. Users typed a flag, so each problem is
named by that flag where there is one (``--monitor -1.0: ... (flink.monitor_interval_s)``),
else by the setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pydantic


def option_errors(
    error: pydantic.ValidationError, given: Mapping[str, Any], table: str, flags: Mapping[str, str]
) -> str:
    """``invalid <table> settings: ...``, each problem on one line joined by ``; ``.

    ``given``: the overridden settings and their values; ``flags``: setting -> the option
    that sets it.
    """
    lines = []
    for problem in error.errors():
        name = str(problem["loc"][0]) if problem["loc"] else ""
        if name in given and name in flags:
            lines.append(f"{flags[name]} {given[name]!r}: {problem['msg']} ({table}.{name})")
        else:
            lines.append(f"{table}.{name}: {problem['msg']}" if name else str(problem["msg"]))
    return f"invalid {table} settings: " + "; ".join(lines)
