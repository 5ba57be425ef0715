"""The documentation site covers the public API (the strict build itself runs in `make docs`).

`mkdocs build --strict` fails on broken links, anchors, includes and docstring cross-references,
but not on a public name that no page shows, nor on a member that mkdocstrings hides because it
has no docstring: these tests do.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch import Callback

import lightning_reg

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DIRECTIVE = re.compile(r"^::: (\S+)\n((?:    .*\n)*)", re.MULTILINE)
# names documented as text rather than by a `::: ` entry: they must appear in backticks in a page
ALIASES = {"SAM", "__version__"}


def _pages() -> dict[Path, str]:
    return {path: path.read_text() for path in sorted(DOCS.rglob("*.md"))}


def _resolve(path: str) -> Any:
    """Import `a.b.C` (a module, or an attribute of one)."""
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError:
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)


def _directives() -> list[tuple[str, str]]:
    return [(m[1], m[2]) for text in _pages().values() for m in DIRECTIVE.finditer(text)]


def _documented_objects() -> list[Any]:
    """Every object a `::: ` entry shows: it, and a module's `__all__` unless members are off."""
    objects = []
    for path, options in _directives():
        obj = _resolve(path)
        objects.append(obj)
        if inspect.ismodule(obj) and "members: false" not in options:
            objects.extend(getattr(obj, name) for name in getattr(obj, "__all__", ()))
    return objects


def _is_documented(obj: Any, documented: list[Any]) -> bool:
    return any(obj is other for other in documented)


def test_every_directive_resolves() -> None:
    for path, _ in _directives():
        assert path.startswith("lightning_reg"), path
        _resolve(path)  # raises if the page names something that does not exist


@pytest.mark.parametrize("name", sorted(set(lightning_reg.__all__) - ALIASES))
def test_public_name_has_docstring_and_page_entry(name: str) -> None:
    obj = getattr(lightning_reg, name)
    assert (obj.__doc__ or "").strip(), f"lightning_reg.{name} has no docstring"
    assert _is_documented(obj, _documented_objects()), (
        f"lightning_reg.{name} has no `::: ` entry under docs/ (a callback: its page under "
        "docs/callbacks/; anything else: docs/functional.md)"
    )


def test_aliases_are_named_in_the_docs() -> None:
    text = "".join(_pages().values())
    documented = _documented_objects()
    for name in ALIASES:
        assert name in lightning_reg.__all__
        assert f"`{name}`" in text or f"`lightning_reg.{name}`" in text, name
    assert _is_documented(lightning_reg.SAM, documented)  # the alias's target has its own page


def test_pytorch_lightning_names_are_documented() -> None:
    pytest.importorskip("pytorch_lightning")
    from lightning_reg import pytorch_lightning as pl_names

    documented = _documented_objects()
    for name in pl_names.__all__:
        obj = getattr(pl_names, name)
        assert (obj.__doc__ or "").strip(), f"lightning_reg.pytorch_lightning.{name}: no docstring"
        assert _is_documented(obj, documented) or (
            name in ALIASES and obj is getattr(lightning_reg, name)
        ), f"lightning_reg.pytorch_lightning.{name} has no `::: ` entry under docs/"


def _callback_classes() -> list[type]:
    found = [obj for obj in _documented_objects() if inspect.isclass(obj)]
    return [cls for cls in found if issubclass(cls, Callback) or cls.__name__ == "EarlyStopping"]


def test_callback_public_members_have_docstrings() -> None:
    """mkdocstrings hides a member without a docstring: every public one of ours needs one.

    Lightning's hooks (`on_fit_start`, `state_dict`, ...) are documented by Lightning and are
    exempt; everything else a callback adds (`regularization_settings`, properties such as
    `predictions`) is API of ours.
    """
    hooks = {name for name in vars(Callback) if not name.startswith("_")}
    classes = _callback_classes()
    assert len(classes) >= 13, [cls.__name__ for cls in classes]
    missing = []
    for cls in classes:
        for klass in cls.__mro__:
            if not klass.__module__.startswith("lightning_reg"):
                continue
            for name, member in vars(klass).items():
                if name.startswith("_") or name in hooks:
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if not (inspect.isfunction(member) or isinstance(member, property)):
                    continue
                if not (member.__doc__ or "").strip():
                    missing.append(f"{cls.__name__}.{name} (defined in {klass.__qualname__})")
    assert not missing, "public members without a docstring: " + ", ".join(sorted(set(missing)))


def test_every_callback_has_its_own_page() -> None:
    pages = {path.name: text for path, text in _pages().items() if path.parent.name == "callbacks"}
    for cls in _callback_classes():
        if cls.__module__ == "lightning_reg.pytorch_lightning":
            continue
        entry = f"::: lightning_reg.{cls.__name__}\n"
        owners = [name for name, text in pages.items() if entry in text]
        assert len(owners) == 1, (cls.__name__, owners)


def test_readme_links_into_existing_docs_pages() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)]*)?\)", readme)
    assert len(links) >= 10, links  # the README is a landing page that points into the docs
    for link in links:
        assert (ROOT / link).is_file(), f"README links to a missing file: {link}"


def test_committed_images_are_shown() -> None:
    """Screenshots under docs/images/ appear on a page (a missing one fails the strict build)."""
    text = "".join(_pages().values())
    images = sorted((DOCS / "images").glob("*.png")) if (DOCS / "images").is_dir() else []
    unused = [image.name for image in images if f"images/{image.name})" not in text]
    assert not unused, f"images under docs/images/ that no page shows: {unused}"
