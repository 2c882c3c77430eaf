"""A small, real, multi-domain text corpus built from the running Python installation.

Every CPython install ships megabytes of real text: library source, docstrings, a test suite, the
reference manual's topic pages (``pydoc_data.topics``) and assorted data/markup files. This module
turns them into a deterministic corpus of five domains, with no network, in a few seconds:

========== =================================================================================
domain     documents
========== =================================================================================
code       chunks of standard-library ``.py`` modules (comments/docstrings kept, tests excluded)
docstrings module/class/function docstrings extracted with :mod:`ast` from other stdlib modules
tests      chunks of the stdlib ``test/`` package (fallback: ``test_*.py`` files anywhere)
prose      ``pydoc_data.topics`` pages plus ``LICENSE``/``README``/``*.txt``/``*.rst``/``*.md`` files
markup     ``.html/.xml/.json/.toml/.cfg/.ini/.def/.csv/...`` files (stdlib first, then the base
           interpreter's site-packages)
========== =================================================================================

Output (see ``docs/corpus.md``)::

    DIR/corpus.json
    DIR/train/<domain>/part-00000.parquet ...        columns text: string, domain: string
    DIR/train_wds/<domain>/shard-00000.tar ...       members <key>.txt (same rows, same order)
    DIR/validation/<domain>/part-00000.parquet ...
    DIR/test/<domain>/part-00000.parquet ...

Everything is a pure function of (the files, the seed, the settings): candidate files are visited
in an order given by SHA-256 hashes, documents are assigned to splits by hashing their text, and
the writers are byte-deterministic (fixed tar mtime, no timestamps in ``corpus.json``).

:func:`build_planted_target` draws a held-out "mixed" set with known domain proportions from the
validation (or test) splits, to check that a mixture search recovers them.
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from fastmix_data.errors import SourceError, WeightsError
from fastmix_data.io import atomic_path

__all__ = [
    "CORPUS_FORMAT_VERSION",
    "DOMAINS",
    "SPLITS",
    "CorpusRoots",
    "CorpusWarning",
    "build_corpus",
    "build_planted_target",
    "largest_remainder_counts",
    "load_corpus_manifest",
    "read_split_texts",
    "split_document",
]

CORPUS_FORMAT_VERSION = 1
DOMAINS: tuple[str, ...] = ("code", "docstrings", "tests", "prose", "markup")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
TRAIN_FORMATS: tuple[str, ...] = ("parquet", "webdataset")

DEFAULT_MAX_DOCS_PER_DOMAIN = 2000
DEFAULT_MAX_BYTES_PER_DOMAIN = 2_000_000
DEFAULT_DOCS_PER_SHARD = 128
DEFAULT_SPLIT_FRACTIONS: tuple[float, float, float] = (0.90, 0.05, 0.05)

MAX_DOC_BYTES = 4096  # a document is at most this many UTF-8 bytes, cut at line boundaries
MAX_BYTES_PER_FILE = 64 * 1024  # at most this much text from any one file (a contiguous window)
SITE_MAX_BYTES_PER_FILE = 16 * 1024  # ... and from any one site-packages file
MIN_DOC_CHARS = 16  # documents with fewer non-blank characters than this are dropped
MIN_DOCS_PER_DOMAIN = 3  # fewer than this (one per split) and the domain is skipped
TAR_MTIME = 0  # fixed member mtime, so the tars are byte-reproducible
PLANTED_FILE = "part-00000.parquet"
PLANTED_SIDECAR = "target.json"

_PRUNE_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "lib-dynload"})
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_PROSE_EXTS = frozenset({".txt", ".rst", ".md"})
_PROSE_STEMS = ("LICENSE", "LICENCE", "COPYING", "README", "NEWS", "HISTORY", "CREDITS")
_MARKUP_EXTS = frozenset(
    {".html", ".htm", ".xhtml", ".xml", ".xsl", ".xslt", ".dtd", ".css", ".svg", ".json", ".toml",
     ".cfg", ".ini", ".def", ".csv", ".conf", ".plist"}
)
_CODEC_TABLE_MARKERS = ("### Decoding Table", "### Encoding table")


class CorpusWarning(UserWarning):
    """A domain was skipped or degraded (missing files on this Python installation)."""


# --------------------------------------------------------------------------------------------------
# Where the text comes from
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusRoots:
    """The directories the corpus is read from.

    Attributes:
        stdlib: the standard library directory (``sysconfig.get_paths()["stdlib"]``). Its
            ``site-packages``/``dist-packages``/``__pycache__``/``lib-dynload`` folders are ignored.
        base_prefix: ``sys.base_prefix``; its top-level licence/readme files and
            ``share/doc/python3.X/`` (Debian) are prose candidates.
        site_packages: the *base* interpreter's site-packages folders (never a virtualenv's):
            sysconfig's purelib for ``sys.base_prefix`` and, on Debian/Ubuntu,
            ``<base_prefix>/lib/python3/dist-packages``. Second-tier source of markup files.
    """

    stdlib: Path
    base_prefix: Path
    site_packages: tuple[Path, ...] = ()

    @classmethod
    def from_running_python(cls) -> CorpusRoots:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        base = Path(sys.base_prefix)
        found: list[Path] = []
        with contextlib.suppress(KeyError, ValueError):
            found.append(Path(sysconfig.get_paths(
                vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})["purelib"]))
        found.append(base / "lib" / "python3" / "dist-packages")
        site: list[Path] = []
        for p in found:
            if p.is_dir() and all(p.resolve() != q.resolve() for q in site):
                site.append(p)
        return cls(stdlib=stdlib, base_prefix=base, site_packages=tuple(site))


@dataclass(frozen=True)
class _Item:
    """One candidate source of documents: a file, or one pydoc topic."""

    key: str  # stable identifier, e.g. "stdlib/json/decoder.py"
    load: Callable[[], list[str]]  # returns the item's documents (already split, cleaned)
    group: str = ""  # items are interleaved round-robin across groups (e.g. one per package)
    max_bytes: int = MAX_BYTES_PER_FILE  # at most this much text from this item


@dataclass
class _DomainPlan:
    tiers: list[Callable[[], list[_Item]]]  # visited in order; items within a tier in hash order
    source: str  # human-readable description of what was used (recorded in corpus.json)


def _walk(root: Path) -> list[str]:
    """Sorted POSIX relative paths of the regular files under ``root`` (pruned folders skipped)."""
    out: list[str] = []
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _PRUNE_DIRS and not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            if name.endswith((".pyc", ".pyo", ".so", ".a", ".o")):
                continue
            out.append(name if rel_dir == "." else f"{rel_dir}/{name}")
    out.sort()
    return out


def _is_test_path(rel: str) -> bool:
    parts = rel.split("/")
    return any(p in _TEST_DIRS for p in parts[:-1]) or parts[-1].startswith("test_")


def _code_half(rel: str) -> int:
    """Seed-independent partition of non-test modules: 0 -> ``code``, 1 -> ``docstrings``."""
    return hashlib.sha256(rel.encode("utf-8", "surrogateescape")).digest()[0] & 1


def _ext(rel: str) -> str:
    return os.path.splitext(rel)[1].lower()


# --------------------------------------------------------------------------------------------------
# Text handling
# --------------------------------------------------------------------------------------------------


def _clean(text: str) -> str:
    """Valid UTF-8 (lone surrogates replaced), no BOM, ``\\n`` line ends."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_text(path: Path, *, reject_binary: bool = False) -> str | None:
    try:
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError):
        return None
    if reject_binary and b"\x00" in data[:8192]:
        return None
    return _clean(data.decode("utf-8", errors="replace"))


def _hard_split(line: str, max_bytes: int) -> list[str]:
    data = line.encode("utf-8")
    pieces: list[str] = []
    i = 0
    while i < len(data):
        j = min(i + max_bytes, len(data))
        while j < len(data) and (data[j] & 0xC0) == 0x80:  # never cut inside a character
            j -= 1
        pieces.append(data[i:j].decode("utf-8"))
        i = j
    return pieces


def split_document(text: str, max_bytes: int = MAX_DOC_BYTES, min_chars: int = MIN_DOC_CHARS) -> list[str]:
    """Split ``text`` into documents of at most ``max_bytes`` UTF-8 bytes at line boundaries.

    Lines are kept whole (a single line longer than ``max_bytes`` is cut at character boundaries).
    Documents with fewer than ``min_chars`` non-whitespace characters are dropped. Joining the
    returned documents gives back the (cleaned) text minus the dropped ones.
    """
    if max_bytes < 4:
        raise ValueError(f"max_bytes must be >= 4, got {max_bytes}")
    text = _clean(text)
    docs: list[str] = []
    cur: list[str] = []
    cur_bytes = 0

    def flush() -> None:
        nonlocal cur, cur_bytes
        if cur:
            docs.append("".join(cur))
        cur, cur_bytes = [], 0

    lines = text.split("\n")
    for i, line in enumerate(lines):
        if i < len(lines) - 1:
            line += "\n"
        elif not line:
            break
        n = len(line.encode("utf-8"))
        if n > max_bytes:
            flush()
            docs.extend(_hard_split(line, max_bytes))
            continue
        if cur_bytes + n > max_bytes:
            flush()
        cur.append(line)
        cur_bytes += n
    flush()
    return [d for d in docs if len("".join(d.split())) >= min_chars]


def _docstrings(source: str) -> list[str]:
    """Module, class and function docstrings of ``source`` in source order ([] if unparsable)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning for invalid escapes (3.12+)
            tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    found: list[tuple[int, int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                found.append((getattr(node, "lineno", 0), getattr(node, "col_offset", 0), doc))
    found.sort(key=lambda t: (t[0], t[1]))
    return [doc for _, _, doc in found]


def _pydoc_topics(stdlib: Path) -> dict[str, str]:
    """``pydoc_data.topics.topics`` read with ``ast.literal_eval`` (nothing is imported)."""
    path = stdlib / "pydoc_data" / "topics.py"
    text = _read_text(path)
    if text is None:
        return {}
    try:
        tree = ast.parse(text)
        for node in tree.body:
            if (
                isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets)
            ):
                value = ast.literal_eval(node.value)
                if isinstance(value, dict):
                    return {str(k): v for k, v in value.items() if isinstance(v, str)}
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        warnings.warn(f"corpus: could not parse {path}; prose will lack pydoc topics", CorpusWarning,
                      stacklevel=3)
    return {}


# --------------------------------------------------------------------------------------------------
# Domains
# --------------------------------------------------------------------------------------------------


def _file_items(
    root: Path,
    prefix: str,
    rels: list[str],
    loader: Callable[[Path], list[str]],
    *,
    grouped: bool = False,
    max_bytes: int = MAX_BYTES_PER_FILE,
) -> list[_Item]:
    return [
        _Item(
            key=f"{prefix}/{rel}",
            load=(lambda p=root / rel: loader(p)),
            group=rel.split("/", 1)[0] if grouped and "/" in rel else "",
            max_bytes=max_bytes,
        )
        for rel in rels
    ]


def _load_code(path: Path) -> list[str]:
    text = _read_text(path)
    if text is None or any(m in text for m in _CODEC_TABLE_MARKERS):
        return []
    return split_document(text)


def _load_docstrings(path: Path) -> list[str]:
    text = _read_text(path)
    if text is None:
        return []
    return [d for doc in _docstrings(text) for d in split_document(doc)]


def _load_textfile(path: Path) -> list[str]:
    text = _read_text(path, reject_binary=True)
    return [] if text is None else split_document(text)


def _is_prose_name(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    if "Grammar" in name:  # lib2to3 grammar files are not prose
        return False
    return _ext(rel) in _PROSE_EXTS or name.upper().startswith(_PROSE_STEMS)


def _is_markup_name(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    if _ext(rel) in _MARKUP_EXTS:
        return True
    top = rel.split("/", 1)[0]
    return top.startswith("config-") and (name == "Makefile" or name.startswith("Setup"))


def _plan_domains(roots: CorpusRoots, stdlib_files: list[str]) -> dict[str, _DomainPlan | str]:
    """Per domain, a plan, or a string saying why the domain is unavailable."""
    stdlib = roots.stdlib
    modules = [
        r for r in stdlib_files
        if r.endswith(".py") and not _is_test_path(r) and not r.startswith("pydoc_data/")
    ]
    plans: dict[str, _DomainPlan | str] = {}

    code = [r for r in modules if _code_half(r) == 0]
    plans["code"] = _DomainPlan(
        tiers=[lambda: _file_items(stdlib, "stdlib", code, _load_code)],
        source=f"{len(code)} non-test stdlib modules (hash half 0)",
    ) if code else "no non-test .py modules found in the standard library"

    doc_mods = [r for r in modules if _code_half(r) == 1]
    plans["docstrings"] = _DomainPlan(
        tiers=[lambda: _file_items(stdlib, "stdlib", doc_mods, _load_docstrings)],
        source=f"ast docstrings of {len(doc_mods)} non-test stdlib modules (hash half 1)",
    ) if doc_mods else "no non-test .py modules found in the standard library"

    tests = [r for r in stdlib_files if r.startswith("test/") and r.endswith(".py")]
    tests_source = "stdlib test/ package"
    if not tests:
        tests = [r for r in stdlib_files if r.rsplit("/", 1)[-1].startswith("test_") and r.endswith(".py")]
        tests_source = "test_*.py files anywhere in the stdlib (no test/ package)"
    plans["tests"] = _DomainPlan(
        tiers=[lambda: _file_items(stdlib, "stdlib", tests, _load_textfile)],
        source=f"{len(tests)} files: {tests_source}",
    ) if tests else "no stdlib test/ package and no test_*.py files in the standard library"

    plans["prose"] = _DomainPlan(
        tiers=[lambda: _prose_items(roots, stdlib_files)],
        source="pydoc_data.topics pages + LICENSE/README/*.txt/*.rst/*.md (stdlib, sys.base_prefix)",
    )

    markup = [r for r in stdlib_files if _is_markup_name(r)]

    plans["markup"] = _DomainPlan(
        tiers=[
            lambda: _file_items(stdlib, "stdlib", markup, _load_textfile, grouped=True),
            lambda: _site_markup_items(roots),
        ],
        source=f"{len(markup)} stdlib markup/config files, then those of "
        f"{len(roots.site_packages)} base site-packages folder(s)",
    )
    return plans


def _prose_items(roots: CorpusRoots, stdlib_files: list[str]) -> list[_Item]:
    """The prose domain's documents: pydoc topic pages, then prose files of the stdlib and of
    sys.base_prefix (and its share/doc/pythonX.Y, where a distribution puts them)."""
    stdlib = roots.stdlib
    topics = _pydoc_topics(stdlib)
    items = [
        _Item(key=f"pydoc_data.topics/{name}", load=(lambda t=text: split_document(t)))
        for name, text in sorted(topics.items())
    ]
    rels = [r for r in stdlib_files if _is_prose_name(r) and not _is_test_path(r)]
    items += _file_items(stdlib, "stdlib", rels, _load_textfile)
    base = roots.base_prefix
    if base.is_dir() and base.resolve() != stdlib.resolve():
        with contextlib.suppress(OSError):
            top = sorted(p.name for p in base.iterdir() if p.is_file() and _is_prose_name(p.name))
            items += _file_items(base, "prefix", top, _load_textfile)
        doc_dir = base / "share" / "doc" / stdlib.name  # e.g. /usr/share/doc/python3.11 (Debian)
        if stdlib.name.startswith("python") and doc_dir.is_dir():
            rels = [
                r for r in _walk(doc_dir)
                if _is_prose_name(r.removesuffix(".gz")) or r.removesuffix(".gz") == "copyright"
            ]
            items += _file_items(doc_dir, f"prefix/share/doc/{stdlib.name}", rels, _load_textfile)
    return items


def _site_markup_items(roots: CorpusRoots) -> list[_Item]:
    """The markup domain's second tier: markup/config files and entry points of the base site-packages."""
    items: list[_Item] = []
    for k, sp in enumerate(roots.site_packages):
        rels = [
            r for r in _walk(sp)
            if _ext(r) in _MARKUP_EXTS or (r.endswith("/entry_points.txt") and ".dist-info/" in r)
        ]
        items += _file_items(sp, f"site-packages{k}", rels, _load_textfile, grouped=True,
                             max_bytes=SITE_MAX_BYTES_PER_FILE)
    return items


# --------------------------------------------------------------------------------------------------
# Hashing helpers (everything random is a SHA-256 of the seed and a stable name)
# --------------------------------------------------------------------------------------------------


def _h(*parts: object) -> bytes:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8", "surrogateescape")).digest()


def _unit(*parts: object) -> float:
    return int.from_bytes(_h(*parts)[:8], "big") / 2.0**64


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _window(docs: list[str], max_bytes: int, *hash_parts: object) -> list[str]:
    """A contiguous (circular) run of ``docs`` of at most ``max_bytes``, starting at a hashed index."""
    sizes = [len(d.encode("utf-8")) for d in docs]
    if sum(sizes) <= max_bytes:
        return docs
    start = int.from_bytes(_h(*hash_parts)[:8], "big") % len(docs)
    out: list[str] = []
    total = 0
    for k in range(len(docs)):
        i = (start + k) % len(docs)
        if total + sizes[i] > max_bytes:
            break
        out.append(docs[i])
        total += sizes[i]
    return out


# --------------------------------------------------------------------------------------------------
# Selection and splitting
# --------------------------------------------------------------------------------------------------


def _interleave(items: list[_Item], seed: int, domain: str) -> list[_Item]:
    """Seeded hash order, round-robin across groups: every group's 1st item, then every 2nd, ..."""
    by_group: dict[str, list[_Item]] = {}
    for it in sorted(items, key=lambda it: _h(seed, domain, "file", it.key)):
        by_group.setdefault(it.group, []).append(it)
    keyed = [
        ((rank, _h(seed, domain, "group", group)), it)
        for group, members in by_group.items()
        for rank, it in enumerate(members)
    ]
    keyed.sort(key=lambda t: t[0])
    return [it for _, it in keyed]


@dataclass
class _Selected:
    docs: list[str]
    digests: list[str]
    candidates: int
    files_used: int


def _select(
    domain: str,
    plan: _DomainPlan,
    *,
    seed: int,
    max_docs: int | None,
    max_bytes: int | None,
    seen: set[str],
    progress: bool,
) -> _Selected:
    docs: list[str] = []
    digests: list[str] = []
    total = 0
    candidates = 0
    files_used = 0
    full = False
    with tqdm(total=max_bytes, unit="B", unit_scale=True, desc=f"corpus {domain}", disable=not progress,
              leave=False) as bar:
        for tier in plan.tiers:
            if full:
                break
            items = tier()
            candidates += len(items)
            items = _interleave(items, seed, domain)
            for item in items:
                if full:
                    break
                texts = _window(item.load(), item.max_bytes, seed, domain, "window", item.key)
                used = False
                for text in texts:
                    digest = _text_digest(text)
                    if digest in seen:
                        continue
                    n = len(text.encode("utf-8"))
                    if max_bytes is not None and total + n > max_bytes:
                        full = True
                        break
                    seen.add(digest)
                    docs.append(text)
                    digests.append(digest)
                    total += n
                    used = True
                    bar.update(n)
                    if max_docs is not None and len(docs) >= max_docs:
                        full = True
                        break
                files_used += used
    return _Selected(docs=docs, digests=digests, candidates=candidates, files_used=files_used)


def _assign_splits(
    digests: list[str], fractions: Sequence[float], seed: int
) -> dict[str, list[int]]:
    """Indices per split. A document's split depends only on (seed, its text): thresholds on a hash.

    A domain with at least ``MIN_DOCS_PER_DOMAIN`` documents gets at least one document in every
    split whose fraction is positive: if hashing left one empty, the training document(s) whose
    hash is closest to that split's range are moved into it.
    """
    bounds = [sum(fractions[: i + 1]) for i in range(len(SPLITS))]
    units = [_unit(seed, "split", d) for d in digests]
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, u in enumerate(units):
        for s, b in zip(SPLITS, bounds):
            if u < b or s == SPLITS[-1]:
                out[s].append(i)
                break
    if len(digests) >= MIN_DOCS_PER_DOMAIN:
        for s, frac in zip(SPLITS[1:], fractions[1:]):
            if frac > 0 and not out[s] and len(out["train"]) > 1:
                moved = max(out["train"], key=lambda i: units[i])
                out["train"].remove(moved)
                out[s].append(moved)
    for s in SPLITS:  # deterministic shuffle of each split
        out[s].sort(key=lambda i: _h(seed, "order", digests[i]))
    return out


# --------------------------------------------------------------------------------------------------
# Writers (atomic: fastmix_data.io.atomic_path, a temporary name in the same folder, then a rename)
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    with atomic_path(path) as tmp:
        yield Path(tmp)


def _write_parquet(path: Path, texts: list[str], domains: list[str] | str) -> None:
    dom = [domains] * len(texts) if isinstance(domains, str) else domains
    table = pa.table({"text": pa.array(texts, pa.string()), "domain": pa.array(dom, pa.string())})
    with _atomic(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def _write_tar(path: Path, keys: list[str], texts: list[str]) -> None:
    from webdataset import TarWriter

    with _atomic(path) as tmp:
        with open(tmp, "wb") as f:
            writer = TarWriter(f, mtime=TAR_MTIME)
            try:
                for key, text in zip(keys, texts):
                    writer.write({"__key__": key, "txt": text})
            finally:
                writer.close()


def _write_json(path: Path, obj: object) -> None:
    with _atomic(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _clear_previous(out: Path) -> None:
    """Remove a previous build's outputs (only this layout's file names) so no stale shard remains."""
    with contextlib.suppress(FileNotFoundError):
        (out / "corpus.json").unlink()
    for top, pattern in (("train", "part-*.parquet"), ("validation", "part-*.parquet"),
                         ("test", "part-*.parquet"), ("train_wds", "shard-*.tar")):
        top_dir = out / top
        if not top_dir.is_dir():
            continue
        for sub in sorted(p for p in top_dir.iterdir() if p.is_dir()):
            for f in sorted(sub.glob(pattern)):
                f.unlink()
            with contextlib.suppress(OSError):
                sub.rmdir()  # only succeeds when empty
        with contextlib.suppress(OSError):
            top_dir.rmdir()


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _check_cap(name: str, value: int | None) -> int | None:
    if value is None or value == 0:
        return None  # no cap
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int or None (no cap), got {value!r}")
    return value


def _check_build_args(max_docs_per_domain, max_bytes_per_domain, docs_per_shard, formats, split_fractions,
                      domains) -> tuple:
    """``build_corpus``'s arguments validated: (max_docs, max_bytes, formats, fractions, wanted domains)."""
    max_docs = _check_cap("max_docs_per_domain", max_docs_per_domain)
    max_bytes = _check_cap("max_bytes_per_domain", max_bytes_per_domain)
    if not isinstance(docs_per_shard, int) or docs_per_shard < 1:
        raise ValueError(f"docs_per_shard must be a positive int, got {docs_per_shard!r}")
    formats = tuple(dict.fromkeys(formats))
    bad = [f for f in formats if f not in TRAIN_FORMATS]
    if bad or not formats:
        raise ValueError(f"formats must be a non-empty subset of {TRAIN_FORMATS}, got {formats!r}")
    fractions = tuple(float(f) for f in split_fractions)
    if (
        len(fractions) != len(SPLITS)
        or any(not math.isfinite(f) or f < 0 for f in fractions)
        or abs(sum(fractions) - 1.0) > 1e-9
        or fractions[0] <= 0
    ):
        raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1 with train > 0, "
                         f"got {split_fractions!r}")
    wanted = list(DOMAINS) if domains is None else list(dict.fromkeys(domains))
    unknown = [d for d in wanted if d not in DOMAINS]
    if unknown or not wanted:
        raise ValueError(f"unknown or empty domains {unknown or wanted!r}; choose from {DOMAINS}")
    return max_docs, max_bytes, formats, fractions, wanted


def _select_domains(roots: CorpusRoots, wanted: list[str], *, seed: int, max_docs: int | None,
                    max_bytes: int | None, progress: bool) -> tuple[dict[str, _Selected], dict[str, str], dict[str, str]]:
    """The documents of each wanted domain (``selected``), why the others were skipped (``skipped``) and
    where each selected domain's documents come from (``sources``),
    deduplicated across domains in :data:`DOMAINS`' fixed order (so the dedup is deterministic)."""
    plans = _plan_domains(roots, _walk(roots.stdlib))
    seen: set[str] = set()  # corpus-wide dedup: a text appears in at most one domain
    selected: dict[str, _Selected] = {}
    skipped: dict[str, str] = {}
    sources: dict[str, str] = {}
    for domain in (d for d in DOMAINS if d in wanted):
        plan = plans[domain]
        if isinstance(plan, str):
            skipped[domain] = plan
            continue
        sel = _select(domain, plan, seed=seed, max_docs=max_docs, max_bytes=max_bytes, seen=seen,
                      progress=progress)
        if len(sel.docs) < MIN_DOCS_PER_DOMAIN:
            skipped[domain] = f"only {len(sel.docs)} documents found ({plan.source})"
            continue
        selected[domain] = sel
        sources[domain] = plan.source
    for domain, why in skipped.items():
        warnings.warn(f"corpus: domain {domain!r} skipped: {why}", CorpusWarning, stacklevel=3)
    if not selected:
        raise SourceError(f"no corpus domain could be built from {roots.stdlib}: {skipped}")
    return selected, skipped, sources


def _write_split(out: Path, domain: str, split: str, texts: list[str], digests: list[str],
                 formats: Sequence[str], docs_per_shard: int, bar) -> dict:
    """Write one split of one domain in shards of ``docs_per_shard`` rows; its corpus.json entry."""
    sha = hashlib.sha256()
    for d in digests:
        sha.update(d.encode("ascii"))
    entry: dict = {"docs": len(texts), "bytes": sum(len(t.encode("utf-8")) for t in texts),
                   "text_sha256": sha.hexdigest()}
    for fmt in ("parquet", "webdataset"):
        if fmt in formats:
            entry[fmt] = []
    for shard, start in enumerate(range(0, len(texts), docs_per_shard)):
        chunk = texts[start : start + docs_per_shard]
        if "parquet" in formats:
            rel = f"{split}/{domain}/part-{shard:05d}.parquet"
            _write_parquet(out / rel, chunk, domain)
            entry["parquet"].append(rel)
            bar.update(1)
        if "webdataset" in formats:
            rel = f"{split}_wds/{domain}/shard-{shard:05d}.tar"
            _write_tar(out / rel, [f"{domain}-{start + k:08d}" for k in range(len(chunk))], chunk)
            entry["webdataset"].append(rel)
            bar.update(1)
    return entry


def _corpus_manifest(*, seed: int, roots: CorpusRoots, max_docs: int | None, max_bytes: int | None,
                     docs_per_shard: int, fractions: tuple, formats: tuple, domains: dict,
                     skipped: dict, totals: dict) -> dict:
    """The content of corpus.json (format documented in docs/corpus.md)."""
    return {
        "format_version": CORPUS_FORMAT_VERSION,
        "seed": seed,
        "python": {
            "implementation": platform.python_implementation(),
            "version": platform.python_version(),
            "stdlib": str(roots.stdlib),
            "base_prefix": str(roots.base_prefix),
            "site_packages": [str(p) for p in roots.site_packages],
        },
        "settings": {
            "max_docs_per_domain": max_docs,
            "max_bytes_per_domain": max_bytes,
            "max_doc_bytes": MAX_DOC_BYTES,
            "max_bytes_per_file": MAX_BYTES_PER_FILE,
            "site_packages_max_bytes_per_file": SITE_MAX_BYTES_PER_FILE,
            "min_doc_chars": MIN_DOC_CHARS,
            "docs_per_shard": docs_per_shard,
            "split_fractions": dict(zip(SPLITS, fractions)),
            "train_formats": list(formats),
        },
        "columns": {"text": "string", "domain": "string"},
        "domains": domains,
        "skipped_domains": skipped,
        "totals": totals,
    }


def build_corpus(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    max_docs_per_domain: int | None = DEFAULT_MAX_DOCS_PER_DOMAIN,
    max_bytes_per_domain: int | None = DEFAULT_MAX_BYTES_PER_DOMAIN,
    docs_per_shard: int = DEFAULT_DOCS_PER_SHARD,
    formats: Sequence[str] = TRAIN_FORMATS,
    split_fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    domains: Sequence[str] | None = None,
    progress: bool = True,
    roots: CorpusRoots | None = None,
) -> dict:
    """Build the corpus under ``out_dir`` and return the content of ``out_dir/corpus.json``.

    Args:
        out_dir: output folder (created). A previous build's shards there are removed first.
        seed: drives file sampling, windows, split assignment and row order.
        max_docs_per_domain: cap on documents per domain (all splits); None or 0 = no cap.
        max_bytes_per_domain: cap on UTF-8 text bytes per domain (all splits); None or 0 = no cap.
        docs_per_shard: rows per Parquet file / tar shard.
        formats: training-split formats, any of "parquet" and "webdataset" (validation and test
            are always Parquet).
        split_fractions: (train, validation, test) fractions, summing to 1.
        domains: subset of :data:`DOMAINS` to build (default: all).
        progress: show tqdm progress bars.
        roots: where to read from (default: the running interpreter, see :class:`CorpusRoots`).

    Domains whose files are missing on this installation (or that yield fewer than 3 documents)
    are skipped with a :class:`CorpusWarning` and listed under ``skipped_domains``.
    """
    out = Path(out_dir)
    max_docs, max_bytes, formats, fractions, wanted = _check_build_args(
        max_docs_per_domain, max_bytes_per_domain, docs_per_shard, formats, split_fractions, domains)
    roots = roots or CorpusRoots.from_running_python()
    if not roots.stdlib.is_dir():
        raise SourceError(f"standard library folder {roots.stdlib} does not exist")
    selected, skipped, sources = _select_domains(roots, wanted, seed=seed, max_docs=max_docs, max_bytes=max_bytes,
                                        progress=progress)

    out.mkdir(parents=True, exist_ok=True)
    _clear_previous(out)
    manifest_domains: dict[str, dict] = {}
    totals = {s: {"docs": 0, "bytes": 0} for s in SPLITS}
    n_files = sum(
        math.ceil(len(sel.docs) / docs_per_shard) * (len(formats) + 1) for sel in selected.values()
    )
    with tqdm(total=n_files, unit="file", desc="corpus write", disable=not progress, leave=False) as bar:
        for domain, sel in selected.items():
            split_idx = _assign_splits(sel.digests, fractions, seed)
            info: dict = {"source": sources[domain], "candidates": sel.candidates,
                          "files_used": sel.files_used, "docs": len(sel.docs),
                          "bytes": sum(len(d.encode("utf-8")) for d in sel.docs), "splits": {}}
            for split in SPLITS:
                idx = split_idx[split]
                entry = _write_split(out, domain, split, [sel.docs[i] for i in idx], [sel.digests[i] for i in idx],
                                     formats if split == "train" else ("parquet",), docs_per_shard, bar)
                info["splits"][split] = entry
                totals[split]["docs"] += entry["docs"]
                totals[split]["bytes"] += entry["bytes"]
            manifest_domains[domain] = info

    manifest = _corpus_manifest(seed=seed, roots=roots, max_docs=max_docs, max_bytes=max_bytes,
                                docs_per_shard=docs_per_shard, fractions=fractions, formats=formats,
                                domains=manifest_domains, skipped=skipped, totals=totals)
    _write_json(out / "corpus.json", manifest)  # written last: its presence marks a complete build
    return manifest


def load_corpus_manifest(corpus_dir: str | os.PathLike[str]) -> dict:
    """Read ``corpus_dir/corpus.json``; raise :class:`SourceError` naming the file if unusable."""
    path = Path(corpus_dir) / "corpus.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path} not found: build the corpus first (tools/build_corpus.py)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise SourceError(f"{path} is unreadable: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != CORPUS_FORMAT_VERSION:
        raise SourceError(f"{path}: unsupported corpus format_version "
                          f"{manifest.get('format_version') if isinstance(manifest, dict) else None!r}")
    return manifest


def read_split_texts(corpus_dir: str | os.PathLike[str], split: str, domain: str) -> list[str]:
    """All texts of one domain's split, in stored order (Parquet shards in order)."""
    manifest = load_corpus_manifest(corpus_dir)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    info = manifest["domains"].get(domain)
    if info is None:
        raise SourceError(f"domain {domain!r} is not in {Path(corpus_dir) / 'corpus.json'} "
                          f"(domains: {sorted(manifest['domains'])})")
    rels = info["splits"][split].get("parquet")
    if rels is None:
        raise SourceError(f"{split} split of domain {domain!r} was not written as Parquet")
    texts: list[str] = []
    for rel in rels:
        path = Path(corpus_dir) / rel
        try:
            texts.extend(pq.read_table(path, columns=["text"]).column("text").to_pylist())
        except (OSError, pa.ArrowException) as e:
            raise SourceError(f"cannot read corpus shard {path}: {e}") from e
    return texts


def largest_remainder_counts(proportions: Mapping[str, float], n: int) -> dict[str, int]:
    """Integer counts summing to ``n`` proportional to ``proportions`` (Hamilton's method).

    Proportions are normalised to sum to 1 (exact rational arithmetic on the given floats, with
    denominators up to 1e12, so e.g. 0.29 * 100 gives exactly 29). Leftover units go to the
    largest fractional parts, ties to the earlier name in sorted order.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    fr: dict[str, Fraction] = {}
    for name in sorted(proportions):
        p = proportions[name]
        try:
            pf = float(p)
        except (TypeError, ValueError):
            raise WeightsError(f"proportion for {name!r} is not a number: {p!r}") from None
        if not math.isfinite(pf) or pf < 0:
            raise WeightsError(f"proportion for {name!r} must be finite and >= 0, got {p!r}")
        fr[name] = Fraction(pf).limit_denominator(10**12)
    total = sum(fr.values(), Fraction(0))
    if total <= 0:
        raise WeightsError(f"proportions must not all be zero: {dict(proportions)!r}")
    quotas = {k: v / total * n for k, v in fr.items()}
    counts = {k: math.floor(q) for k, q in quotas.items()}
    left = n - sum(counts.values())
    order = sorted(fr, key=lambda k: (-(quotas[k] - counts[k]), k))
    for k in order[:left]:
        counts[k] += 1
    return counts


def _draw_planted_rows(
    corpus_dir: str | os.PathLike[str], split: str, counts: Mapping[str, int], seed: int, allow_repeats: bool
) -> tuple[list[tuple[bytes, str, str]], dict[str, int]]:
    """``counts[d]`` documents of each domain's ``split``, each as (order key, domain, text), drawn
    without replacement in a seeded hash order and cycled again in a fresh order when the split is too
    small (``allow_repeats``); and per domain the number of repeated rows."""
    rows: list[tuple[bytes, str, str]] = []  # (order key, domain, text)
    repeats: dict[str, int] = {}
    for domain in sorted(counts):
        need = counts[domain]
        if need == 0:
            continue
        pool = read_split_texts(corpus_dir, split, domain)
        if not pool:
            raise WeightsError(f"domain {domain!r} has no documents in the {split} split of {corpus_dir}")
        if need > len(pool) and not allow_repeats:
            raise WeightsError(f"domain {domain!r} needs {need} documents but its {split} split has only "
                               f"{len(pool)}; lower n_docs, or pass allow_repeats=True")
        digests = [_text_digest(t) for t in pool]
        taken = 0
        rnd = 0
        while taken < need:
            order = sorted(range(len(pool)), key=lambda i, r=rnd: _h(seed, "planted", domain, r, i, digests[i]))
            for i in order[: need - taken]:
                rows.append((_h(seed, "planted-row", domain, taken), domain, pool[i]))
                taken += 1
            rnd += 1
        repeats[domain] = max(0, need - len(pool))
    return rows, repeats


def build_planted_target(
    out_dir: str | os.PathLike[str],
    corpus_dir: str | os.PathLike[str],
    proportions: Mapping[str, float],
    n_docs: int,
    seed: int = 0,
    *,
    split: str = "validation",
    allow_repeats: bool = True,
) -> dict:
    """Write a held-out "mixed" set with known domain proportions; return its sidecar JSON.

    Draws ``counts = largest_remainder_counts(proportions, n_docs)`` documents per domain from the
    corpus' ``split`` (validation by default; "test" keeps the validation split untouched), without
    replacement, in a seeded hash order. If a domain's split holds fewer documents than its count,
    it is cycled again in a fresh order (``allow_repeats``; the sidecar records how many rows are
    repeats) or a :class:`WeightsError` is raised. Rows are shuffled deterministically.

    Writes ``out_dir/part-00000.parquet`` (columns text, domain) and ``out_dir/target.json``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(n_docs, int) or isinstance(n_docs, bool) or n_docs < 1:
        raise ValueError(f"n_docs must be a positive int, got {n_docs!r}")
    manifest = load_corpus_manifest(corpus_dir)
    unknown = sorted(d for d in proportions if d not in manifest["domains"])
    if unknown:
        raise WeightsError(f"unknown domain(s) {unknown} in proportions; corpus {corpus_dir} has "
                           f"{sorted(manifest['domains'])}")
    counts = largest_remainder_counts(proportions, n_docs)
    total = sum(Fraction(float(p)).limit_denominator(10**12) for p in proportions.values())
    normalized = {
        d: float(Fraction(float(proportions[d])).limit_denominator(10**12) / total) for d in sorted(proportions)
    }

    rows, repeats = _draw_planted_rows(corpus_dir, split, counts, seed, allow_repeats)
    if any(repeats.values()):
        warnings.warn(
            f"planted target: {split} split too small, rows repeated per domain: "
            f"{ {d: r for d, r in repeats.items() if r} }; lower n_docs for a target without repeats",
            CorpusWarning, stacklevel=2,
        )
    rows.sort(key=lambda r: r[0])
    domain_bytes: dict[str, int] = {}
    for _, domain, text in rows:
        domain_bytes[domain] = domain_bytes.get(domain, 0) + len(text.encode("utf-8"))
    total_bytes = sum(domain_bytes.values())
    out = Path(out_dir)
    _write_parquet(out / PLANTED_FILE, [r[2] for r in rows], [r[1] for r in rows])
    sidecar = {
        "format_version": CORPUS_FORMAT_VERSION,
        "file": PLANTED_FILE,
        "n_docs": n_docs,
        "seed": seed,
        "split": split,
        "proportions": normalized,
        "requested_proportions": {d: float(proportions[d]) for d in sorted(proportions)},
        "counts": {d: counts[d] for d in sorted(counts)},
        "realized_proportions": {d: counts[d] / n_docs for d in sorted(counts)},
        "repeated_docs": repeats,
        "bytes": total_bytes,
        "byte_proportions": {d: (domain_bytes.get(d, 0) / total_bytes if total_bytes else 0.0)
                             for d in sorted(counts)},
        "corpus": {
            "seed": manifest["seed"],
            "python": manifest["python"],
            "split_text_sha256": {
                d: manifest["domains"][d]["splits"][split]["text_sha256"] for d in sorted(counts)
            },
        },
    }
    _write_json(out / PLANTED_SIDECAR, sidecar)
    return sidecar
