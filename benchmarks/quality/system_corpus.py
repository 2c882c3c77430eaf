"""The quality benchmark's second corpus: real text on this machine that is NOT in the standard library.

The demo corpus (:mod:`fastmix_data.corpus`) is built from the Python standard library, the text the
project's defaults were first tried on. To keep the defaults honest, the benchmark also runs on text
the project has never seen:

==========  =====================================================================================
domain      documents
==========  =====================================================================================
pycode      ``.py`` sources of the installed third-party packages (the running interpreter's
            site-packages: numpy, torch, pyarrow, matplotlib, ...; fastmix_data itself excluded)
manpages    English manual pages (``/usr/share/man/man*/*.gz``, roff source)
changelogs  Debian package changelogs and NEWS files (``/usr/share/doc/*/changelog*``, ``NEWS*``)
pymeta      package descriptions (``*.dist-info/METADATA``: README text in Markdown/reST)
licenses    copyright and licence files (``/usr/share/doc/*/copyright``, ``/usr/share/common-licenses``)
==========  =====================================================================================

Same layout and ``corpus.json`` format as :func:`fastmix_data.corpus.build_corpus` (so
:func:`~fastmix_data.corpus.build_planted_target` and ``read_split_texts`` work on it): files are
visited in a seeded SHA-256 order of their paths, at most 64 KiB of text per file, documents of at
most 4 KiB cut at line boundaries, deduplicated across the corpus, assigned to train / validation /
test (``split_fractions``, 90/5/5 by default) by a hash of their text. What is found depends on the machine (which packages are
installed); ``corpus.json`` records the counts and digests, and a domain with fewer than
``MIN_DOCS`` documents is skipped with a warning.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import site
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fastmix_data.corpus import CORPUS_FORMAT_VERSION, split_document

DOMAINS = ("pycode", "manpages", "changelogs", "pymeta", "licenses")
SPLITS = ("train", "validation", "test")
MAX_FILE_BYTES = 64 * 1024
MAX_DOC_BYTES = 4096
MIN_DOCS = 30
DOCS_PER_SHARD = 128


def _site_packages() -> list[Path]:
    out = []
    for p in site.getsitepackages() + [site.getusersitepackages()]:
        q = Path(p)
        if q.is_dir() and q not in out:
            out.append(q)
    return out


def _files(domain: str) -> Iterator[Path]:
    doc = Path("/usr/share/doc")
    if domain == "pycode":
        for sp in _site_packages():
            for p in sp.rglob("*.py"):
                parts = set(p.relative_to(sp).parts)
                if not parts & {"fastmix_data", "__pycache__"} and "fastmix_data" not in p.name:
                    yield p
    elif domain == "manpages":
        yield from Path("/usr/share/man").glob("man[1-8]/*")
    elif domain == "changelogs" and doc.is_dir():
        yield from doc.glob("*/changelog*")
        yield from doc.glob("*/NEWS*")
    elif domain == "pymeta":
        for sp in _site_packages():
            yield from sp.glob("*.dist-info/METADATA")
    elif domain == "licenses":
        if doc.is_dir():
            yield from doc.glob("*/copyright")
        yield from Path("/usr/share/common-licenses").glob("*")


def _read(path: Path) -> str | None:
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if b"\x00" in raw[:4096]:
        return None
    text = raw[:MAX_FILE_BYTES].decode("utf-8", errors="replace")
    return text if text.count("\ufffd") < 20 else None


def _h(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def _collect(domain: str, seed: int, max_docs: int, max_bytes: int, seen: set[str]) -> tuple[list[str], int, int]:
    files = sorted({p for p in _files(domain) if p.is_file()}, key=lambda p: _h(seed, domain, p))
    docs, nbytes, used = [], 0, 0
    for p in files:
        text = _read(p)
        if not text:
            continue
        took = False
        for d in split_document(text, max_bytes=MAX_DOC_BYTES):
            key = _h(d)
            if key in seen:
                continue
            seen.add(key)
            docs.append(d)
            nbytes += len(d.encode("utf-8"))
            took = True
            if len(docs) >= max_docs or nbytes >= max_bytes:
                break
        used += took
        if len(docs) >= max_docs or nbytes >= max_bytes:
            break
    return docs, len(files), used


def _split_of(text: str, seed: int, fractions: tuple[float, ...]) -> str:
    u = int(_h(seed, "split", text)[:12], 16) / 16**12
    acc = 0.0
    for name, frac in zip(SPLITS, fractions):
        acc += frac
        if u < acc:
            return name
    return SPLITS[-1]


def build_system_corpus(out_dir: str | Path, *, seed: int = 0, max_docs_per_domain: int = 2000,
                        max_bytes_per_domain: int = 2_000_000, split_fractions: tuple[float, ...] = (0.9, 0.05, 0.05),
                        log: Callable[[str], None] = print) -> dict:
    """Build the corpus under ``out_dir`` (see the module docstring); returns ``corpus.json``'s content."""
    out = Path(out_dir)
    seen: set[str] = set()
    domains, skipped = {}, {}
    for domain in DOMAINS:
        docs, candidates, used = _collect(domain, seed, max_docs_per_domain, max_bytes_per_domain, seen)
        if len(docs) < MIN_DOCS:
            skipped[domain] = f"only {len(docs)} documents from {candidates} candidate files"
            warnings.warn(f"system corpus: domain {domain!r} skipped: {skipped[domain]}", stacklevel=2)
            continue
        by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
        for d in docs:
            by_split[_split_of(d, seed, split_fractions)].append(d)
        info = {"candidates": candidates, "files_used": used, "docs": len(docs),
                "bytes": sum(len(d.encode()) for d in docs), "splits": {}}
        for split, texts in by_split.items():
            rels = []
            for i in range(0, max(1, len(texts)), DOCS_PER_SHARD):
                rel = f"{split}/{domain}/part-{i // DOCS_PER_SHARD:05d}.parquet"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                chunk = texts[i : i + DOCS_PER_SHARD]
                pq.write_table(pa.table({"text": chunk, "domain": [domain] * len(chunk)}), out / rel)
                rels.append(rel)
            info["splits"][split] = {"docs": len(texts), "bytes": sum(len(t.encode()) for t in texts),
                                     "text_sha256": _h(*sorted(_h(t) for t in texts)), "parquet": rels}
        domains[domain] = info
        log(f"system corpus: {domain}: {len(docs)} docs, {info['bytes']:,} bytes from {used} of {candidates} files")
    manifest = {"format_version": CORPUS_FORMAT_VERSION, "kind": "system", "seed": seed,
                "python": {"version": sys.version.split()[0], "site_packages": [str(p) for p in _site_packages()]},
                "settings": {"max_docs_per_domain": max_docs_per_domain, "max_bytes_per_domain": max_bytes_per_domain,
                             "split_fractions": list(split_fractions),
                             "max_file_bytes": MAX_FILE_BYTES, "max_doc_bytes": MAX_DOC_BYTES},
                "columns": {"text": "string", "domain": "string"}, "domains": domains, "skipped_domains": skipped}
    (out / "corpus.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


if __name__ == "__main__":
    build_system_corpus(sys.argv[1] if len(sys.argv) > 1 else "out/system_corpus")
