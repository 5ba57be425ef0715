"""Griffe extension for the library's docstrings, used by ``mkdocs.yml``; changes only the site.

- A Google-style ``Example:`` section is read as ``Examples:``. The docstrings follow the Google
  style guide, which names the section ``Example:`` (as Sphinx's napoleon reads it); griffe
  recognises only ``Examples:`` and would render the doctests as prose, where an output such as
  ``[(2, 0.05), (4, 0.0)]`` reads as a broken cross-reference. The doctests run under
  ``pytest --doctest-modules`` whatever the section is called.
- The ``Method card:`` of a module docstring (rendered as an admonition) becomes a list, one item
  per ``Label: text`` entry (``What it does``, ``Suggested values``, ``When it hurts``, ...),
  instead of one run-on paragraph.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ENTRY = re.compile(r"^([A-Z][A-Za-z -]{1,40}): (.*)$")


def _card_as_list(text: str) -> str:
    """Turn each ``Label: text`` entry of a ``Method card:`` block into a list item."""
    lines = text.split("\n")
    out: list[str] = []
    indent: str | None = None  # the card block's indentation while inside it
    for line in lines:
        if indent is None:
            out.append(line)
            if line.strip() == "Method card:":
                indent = line[: len(line) - len(line.lstrip())] + "    "
            continue
        if not line.startswith(indent) or not line.strip():
            indent = None
            out.append(line)
            continue
        body = line[len(indent) :]
        entry = _ENTRY.match(body)
        out.append(f"{indent}- **{entry[1]}**: {entry[2]}" if entry else f"{indent}  {body}")
    return "\n".join(out)


class LibraryDocstrings(griffe.Extension):
    """Adjust docstrings before griffe parses them (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite the docstring of every object as it is loaded."""
        if obj.docstring is not None:
            value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _card_as_list(value)
