"""Griffe extension for the library's docstrings, used by ``mkdocs.yml``; changes only the site.

- A Google-style ``Example:`` section is read as ``Examples:``. The docstrings follow the Google
  style guide, which names the section ``Example:`` (as Sphinx's napoleon reads it); griffe
  recognises only ``Examples:`` and would render the doctests as prose, where an output such as
  ``[(2, 0.05), (4, 0.0)]`` reads as a broken cross-reference. The doctests run under
  ``pytest --doctest-modules`` whatever the section is called.
- Sphinx roles (``:func:`~lightning_reg.mixing.mix_inputs```, ``:class:`EarlyStopping```) become
  links to the object's entry on the site when it has one, and code when the object exists but is
  not documented (private helpers, modules); a name that exists nowhere in the package becomes a
  cross-reference anyway, so the strict build fails on it. A name without dots is looked up beside
  the docstring's object (itself, its class, module, package). Python's and torch's objects stay
  code.
- The ``Method card:`` of a module docstring (rendered as an admonition) becomes a list, one item
  per ``Label: text`` entry (``What it does``, ``Suggested values``, ``When it hurts``, ...),
  instead of one run-on paragraph.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|obj|exc):`(~?)([\w.]+)`")
_ENTRY = re.compile(r"^([A-Z][A-Za-z -]{1,40}): (.*)$")
# modules whose `__all__` the site documents (docs/functional.md, the callback pages)
_DOCUMENTED_MODULES = ("lightning_reg", "lightning_reg.drop_path")
_DOCUMENTED_EXTRA = ("lightning_reg.pytorch_lightning.EarlyStopping",)


def _card_as_list(text: str) -> str:
    """Turn each ``Label: text`` entry of a ``Method card:`` block into a list item."""
    out: list[str] = []
    indent: str | None = None  # the card block's indentation while inside it
    for line in text.split("\n"):
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


def _final(obj: griffe.Object | griffe.Alias) -> griffe.Object | None:
    try:
        return obj.final_target if isinstance(obj, griffe.Alias) else obj
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _lookup(package: griffe.Module, path: str) -> griffe.Object | None:
    """The object at a dotted path inside the package, aliases followed; None if there is none."""
    parts = path.split(".")[1:]
    try:
        found = package[".".join(parts)] if parts else package
    except (KeyError, ValueError):
        return None
    return _final(found)


def _documented(package: griffe.Module) -> set[str]:
    """Canonical paths of the objects the site shows: public exports and their members."""
    paths: set[str] = set()

    def add(obj: griffe.Object | None, depth: int) -> None:
        if obj is None or obj.path in paths:
            return
        paths.add(obj.path)
        if depth and obj.is_class:
            for name, member in obj.members.items():
                # mkdocs.yml: private members and members without a docstring are not shown
                if not name.startswith("_") and member.docstring is not None:
                    add(_final(member), depth - 1)

    for module_path in _DOCUMENTED_MODULES:
        module = _lookup(package, module_path)
        for name in getattr(module, "exports", None) or ():
            add(_lookup(package, f"{module_path}.{name}"), 1)
    for path in _DOCUMENTED_EXTRA:
        add(_lookup(package, path), 1)
    return paths


def _scopes(obj: griffe.Object) -> list[griffe.Object]:
    scopes = [obj]
    while scopes[-1].parent is not None:
        scopes.append(scopes[-1].parent)
    return scopes


def _crossrefs(text: str, obj: griffe.Object, package: griffe.Module, shown: set[str]) -> str:
    """Turn Sphinx roles into ``[`title`][identifier]`` cross-references or code."""

    def replace(match: re.Match[str]) -> str:
        short, name = match[1] == "~", match[2]
        title = name.rpartition(".")[2] if short else name
        if name.startswith("lightning_reg"):
            path = name
        elif "." in name and name.split(".")[0] not in {s.name for s in _scopes(obj)}:
            return f"`{title}`"  # torch.nn.Module, lightning.pytorch...: not ours
        else:
            first = name.split(".")[0]
            owner = next((s for s in _scopes(obj) if first in s.members), None)
            path = f"{owner.path}.{name}" if owner is not None else f"lightning_reg.{name}"
        target = _lookup(package, path)
        if target is None:
            return f"[`{title}`][{path}]"  # exists nowhere: left for the strict build to report
        return f"[`{title}`][{target.path}]" if target.path in shown else f"`{title}`"

    return _ROLE.sub(replace, text)


def _walk(obj: griffe.Object) -> list[griffe.Object]:
    found = [obj]
    for member in obj.members.values():
        if not isinstance(member, griffe.Alias):
            found.extend(_walk(member))
    return found


class LibraryDocstrings(griffe.Extension):
    """Adjust the package's docstrings before griffe parses them (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Rewrite every docstring of the package once it is fully loaded."""
        if pkg.name != "lightning_reg":
            return
        shown = _documented(pkg)
        for obj in _walk(pkg):
            if obj.docstring is not None:
                value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
                obj.docstring.value = _card_as_list(_crossrefs(value, obj, pkg, shown))
