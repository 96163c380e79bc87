"""Command help: docstrings shown as reflowed paragraphs, settings' defaults shown with their values.

Why: Typer joins the lines of a command's first help paragraph but keeps the line breaks
of the others, so a docstring wrapped at 90 columns prints, in an 80-column terminal, as
every other line broken after one word. :func:`reflow_help` gives each command the text
of its docstring with the lines of each paragraph joined; the terminal then wraps them.
Lines that start a list item (``-``, ``*``, ``1.``) or are indented (examples) keep
their own lines, as do paragraphs marked with click's ``\\b``.

Options whose default is a setting say so as ``(default: reach.sample_rate)``;
:func:`show_setting_defaults` adds the setting's built-in value, so ``--help`` tells
both where to change the default and what it is unless changed.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import typer

from infra.settings import builtin_default

_KEEPS_ITS_LINE = re.compile(r"(\s|[-*] |\d+\. )")


def reflow(doc: str) -> str:
    """``doc`` (a docstring) with each paragraph's wrapped lines joined into one."""
    paragraphs = []
    for paragraph in inspect.cleandoc(doc).split("\n\n"):
        lines = paragraph.split("\n")
        if lines[0].startswith("\b"):  # click's "do not rewrap this paragraph"
            paragraphs.append(paragraph)
            continue
        joined = [lines[0]]
        for line in lines[1:]:
            if _KEEPS_ITS_LINE.match(line):
                joined.append(line)
            else:
                joined[-1] = f"{joined[-1]} {line}"
        paragraphs.append("\n".join(joined))
    return "\n\n".join(paragraphs)


def reflow_help(app: typer.Typer) -> None:
    """Give every command of ``app`` and its sub-apps its docstring's reflowed text as help.

    Help given explicitly (``help=...``) is reflowed too; call once all commands are added.
    """
    for command in app.registered_commands:
        doc = command.help or (command.callback.__doc__ if command.callback else None)
        if doc:
            command.help = reflow(doc)
    for group in app.registered_groups:
        if group.help:
            group.help = reflow(group.help)
        if group.typer_instance is not None:
            instance_help = group.typer_instance.info.help
            if isinstance(instance_help, str):
                group.typer_instance.info.help = reflow(instance_help)
            reflow_help(group.typer_instance)


_SETTING_DEFAULT = re.compile(r"\(default: ([a-z_]+(?:\.[a-z_]+)+)\)")


def show_setting_defaults(command: Any) -> None:
    """Rewrite each option help's ``(default: section.name)`` under ``command`` (a click
    command, as ``typer.main.get_command`` builds it) as ``(default: section.name = value)``,
    the setting's built-in value (a config file or an ``ADREACH_*`` variable may change it).

    Done on the built commands: Typer re-creates its option objects from the annotations
    when it builds them, so they cannot be changed beforehand. (Typer ships its own copy of
    click, hence the duck typing: ``params``, and ``commands`` for a group.)
    """
    for param in command.params:
        help_text = getattr(param, "help", None)
        if isinstance(help_text, str):
            param.help = _SETTING_DEFAULT.sub(_with_value, help_text)
    for sub in getattr(command, "commands", {}).values():
        show_setting_defaults(sub)


def _with_value(match: re.Match[str]) -> str:
    path = match.group(1)
    try:
        value = builtin_default(path)
    except LookupError:
        return match.group(0)
    if value is None:
        return match.group(0)  # (derived when unset, e.g. from the state directory)
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    return f"(default: {path} = {shown})"
