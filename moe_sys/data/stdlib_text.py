"""Where the embedded corpus's text comes from: files and tables every CPython install carries.

Three domains, chosen so a router has something real to tell apart and nothing needs a download:
  * ``code``  - the standard library's own ``.py`` sources.
  * ``prose`` - English documentation: the language-reference topics in ``pydoc_data/topics.py`` (what
                ``help("FOR")`` prints) and the docstrings of stdlib modules, classes and functions,
                pulled out with ``ast`` (no imports, so no side effects such as ``antigravity``).
  * ``data``  - structured records: the Unicode character database built into ``unicodedata`` as CSV
                pages, and stdlib lookup tables (HTML5 entities, locale and codec aliases, HTTP statuses)
                as JSON.
Test suites are skipped: slim and distro installs (Debian's ``libpython3-stdlib``) ship without most of
``test/``. So are machine-specific files (``_sysconfigdata*``, ``config-*``, symlinks into ``/etc``).

Each source is a ``Source(key, load)``: the key is stable across machines, the text is loaded only if
the corpus builder takes it (``corpus.py`` orders sources by a hash of the key and stops at a size cap).
"""

from __future__ import annotations

import ast
import csv
import importlib
import io
import json
import sysconfig
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DOMAINS = ("code", "prose", "data")
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_UNICODE_PAGE = 256  # code points per CSV document


@dataclass(frozen=True)
class Source:
    """One future document: ``key`` names it stably, ``load()`` produces its text."""

    key: str
    load: Callable[[], str]


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory (the base install's, inside a venv)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_python_files(root: Path) -> list[str]:
    """Sorted relative paths of the stdlib's ``.py`` files, minus tests and machine-specific files."""
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _SKIP_DIRS & set(rel.parts[:-1]) or rel.parts[0].startswith("config-"):
            continue
        if path.is_symlink() or rel.name.startswith("_sysconfigdata") or rel.name == "sitecustomize.py":
            continue
        found.append(rel.as_posix())
    return sorted(found)


def sources(domain: str, root: Path | None = None) -> list[Source]:
    """All candidate documents of ``domain`` (one of ``DOMAINS``), in no particular order."""
    root = root or stdlib_root()
    if domain == "code":
        return [Source(f"code:{rel}", _reader(root / rel)) for rel in stdlib_python_files(root)]
    if domain == "prose":
        docs = [Source(f"prose:doc:{rel}", _docstring_reader(root, rel)) for rel in stdlib_python_files(root)]
        return _pydoc_topics() + docs
    if domain == "data":
        return _unicode_pages() + _stdlib_tables()
    raise ValueError(f"unknown embedded domain {domain!r}; choose from {DOMAINS}")


def _reader(path: Path) -> Callable[[], str]:
    return lambda: path.read_text(encoding="utf-8", errors="replace")


def _pydoc_topics() -> list[Source]:
    try:  # present in CPython and Debian's stdlib package; tolerate exotic installs without it
        topics = importlib.import_module("pydoc_data.topics").topics
    except ImportError:
        return []
    return [Source(f"prose:topic:{name}", lambda t=text: t) for name, text in topics.items()]


def _docstring_reader(root: Path, rel: str) -> Callable[[], str]:
    module = rel[:-3].replace("/", ".").removesuffix(".__init__")
    return lambda: module_docstrings(module, (root / rel).read_bytes())


def module_docstrings(module: str, source: bytes) -> str:
    """The docstrings of a module, its functions, classes and methods as one markdown-ish document."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    parts: list[str] = []
    _add_docstring(parts, "#", module, tree)
    for node in tree.body:
        if isinstance(node, _FUNCS):
            _add_docstring(parts, "##", f"{module}.{node.name}", node)
        elif isinstance(node, ast.ClassDef):
            _add_docstring(parts, "##", f"{module}.{node.name}", node)
            for item in node.body:
                if isinstance(item, _FUNCS):
                    _add_docstring(parts, "###", f"{module}.{node.name}.{item.name}", item)
    return "\n\n".join(parts) + "\n" if parts else ""


_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)


def _add_docstring(parts: list[str], heading: str, name: str, node: ast.AST) -> None:
    doc = ast.get_docstring(node, clean=True)
    if doc:
        parts.append(f"{heading} {name}\n\n{doc}")


def _unicode_pages() -> list[Source]:
    """One CSV document per 256-code-point page that has hand-named characters."""
    pages = sorted({cp // _UNICODE_PAGE for cp in range(0x110000) if _ucd_name(cp)})
    return [Source(f"data:unicode:{page:04X}", lambda p=page: _unicode_csv(p)) for page in pages]


def _ucd_name(cp: int) -> str:
    # Skip algorithmically named ranges (CJK/Tangut ideographs "...-4E00", Hangul syllables):
    # tens of thousands of near-identical rows would swamp the domain.
    name = unicodedata.name(chr(cp), "")
    if name.endswith(f"-{cp:04X}") or name.startswith("HANGUL SYLLABLE "):
        return ""
    return name


def _unicode_csv(page: int) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["codepoint", "char", "name", "category", "bidi", "decomposition"])
    for cp in range(page * _UNICODE_PAGE, (page + 1) * _UNICODE_PAGE):
        name = _ucd_name(cp)
        if not name:
            continue
        char = chr(cp)
        category = unicodedata.category(char)
        shown = "" if category[0] in "CZ" and char != " " else char  # no raw controls or line breaks
        writer.writerow([f"U+{cp:04X}", shown, name, category, unicodedata.bidirectional(char),
                         unicodedata.decomposition(char)])
    return out.getvalue()


def _stdlib_tables() -> list[Source]:
    """Lookup tables from pure-Python stdlib modules, as JSON Lines in chunks of 64 records."""
    import encodings.aliases
    import html.entities
    import http
    import locale

    tables = {
        "html5_entities": [{"entity": k, "text": v} for k, v in sorted(html.entities.html5.items())],
        "locale_aliases": [{"alias": k, "locale": v} for k, v in sorted(locale.locale_alias.items())],
        "codec_aliases": [{"alias": k, "codec": v} for k, v in sorted(encodings.aliases.aliases.items())],
        "http_status": [{"code": s.value, "phrase": s.phrase, "description": s.description}
                        for s in http.HTTPStatus],
    }
    out = []
    for name, rows in tables.items():
        for start in range(0, len(rows), 64):
            chunk = rows[start:start + 64]
            out.append(Source(f"data:table:{name}:{start}", lambda c=chunk: _jsonl(c)))
    return out


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
