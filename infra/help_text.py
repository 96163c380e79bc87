"""Command help written as wrapped docstrings, shown as reflowed paragraphs.

Why: Typer joins the lines of a command's first help paragraph but keeps the line breaks
of the others, so a docstring wrapped at 90 columns prints, in an 80-column terminal, as
every other line broken after one word. :func:`reflow_help` gives each command the text
of its docstring with the lines of each paragraph joined; the terminal then wraps them.
Lines that start a list item (``-``, ``*``, ``1.``) or are indented (examples) keep
their own lines, as do paragraphs marked with click's ``\\b``.
"""

from __future__ import annotations

import inspect
import re

import typer

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
