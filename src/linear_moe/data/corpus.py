"""Builtin corpus `builtin:python-docs`: English text that ships with CPython, no download needed.

Documents, in a fixed order: every topic of the language reference (`pydoc_data.topics.topics`, ~0.46 MB), then
one document per standard-library module holding its module, class and function docstrings (read with `ast`
from the source, nothing is imported). Together well over 1 MB of text.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("python-docs",)
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}


def _module_docstrings(path: Path) -> str:
    """All docstrings of one module (module, classes, functions), blank-line separated; "" if none or unparsable."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    docs = [d.strip() for d in (ast.get_docstring(n) for n in nodes) if d and d.strip()]
    return "\n\n".join(docs)


def python_docs() -> Iterator[str]:
    """Yield the documents of `builtin:python-docs` (deterministic for a given Python installation)."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        text = topics[key].strip()
        if text:
            yield text
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(stdlib).parts):
            continue
        text = _module_docstrings(path)
        if text:
            yield text


def builtin_documents(name: str) -> Iterator[str]:
    """Documents of the builtin corpus `name` (without the `builtin:` prefix)."""
    from .errors import DataError

    if name == "python-docs":
        return python_docs()
    raise DataError(
        f"unknown builtin corpus 'builtin:{name}'; valid: {', '.join(BUILTIN_PREFIX + b for b in BUILTINS)}"
    )
