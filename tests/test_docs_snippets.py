"""Every ```python block of README.md and docs/*.md is checked against the code it documents.

Each block must parse as Python, every import in it is executed, and every imported name the block
calls must be callable (``from fastmix_data.export import resample`` once gave the submodule). The
blocks that run in seconds on a small corpus are run whole, in a temporary directory holding
``data/code`` (Parquet) and ``data/web`` (WebDataset tars and Parquet with ids); ``SCALE`` shrinks
their budgets to test size. The rest (an endless training loop, a stdlib-corpus build, a proxy
search) are listed in ``IMPORTS_ONLY`` with the reason.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
from shardgen import make_docs, write_parquet_source, write_wds_source

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

IMPORTS_ONLY = {
    "README.md#0": "its training loop runs forever (a repeating stream)",
    "docs/corpus.md#0": "builds the whole stdlib corpus (covered by tests/test_corpus.py)",
    "docs/methods.md#0": "runs a MixMin proxy search on the stdlib corpus (tests/test_search_methods_*.py)",
    "docs/search.md#0": "`sources={...}` is a placeholder; runs a FastMix search",
    "README.md#1": "reads s3://my-bucket (tests/test_remote_sources.py streams from a loopback S3 for real)",
    "README.md#2": "`sources`, `weights` are placeholders; follows a publisher that is not running",
    "docs/live.md#0": "`sources` is a placeholder; its training loop runs forever",
    "docs/live.md#1": "starts a search on the rank (tests/test_live_example.py runs the embedded mode)",
    "docs/live.md#2": "`model`, `opt` are the user's (tests/test_live_integrations.py trains with accelerate)",
    "docs/sources.md#1": "reads s3://my-bucket (tests/test_remote_sources.py streams from a loopback S3 for real)",
    "docs/manifest.md#1": "needs a Ray cluster and /shared data (tests/test_engine_ray.py makes these calls on a local one)",
    "docs/proxy.md#0": "registers a preset in the process-wide table (tests/test_search_model.py does it under monkeypatch)",
    "docs/proxy.md#1": "needs a tokenizers file and `sources` (tests/test_search_vocab.py trains a BPE and packs with it)",
}
SCALE = {"docs/manifest.md#0": {'"10B_tokens"': '"30k_tokens"'}}


def blocks() -> list[tuple[str, str]]:
    out = []
    for path in DOCS:
        for i, match in enumerate(FENCE.finditer(path.read_text(encoding="utf-8"))):
            out.append((f"{path.relative_to(ROOT).as_posix()}#{i}", match.group(1)))
    return out


BLOCKS = blocks()


def test_the_docs_have_python_blocks():
    assert len(BLOCKS) >= 7
    assert not set(IMPORTS_ONLY) - {key for key, _ in BLOCKS}, "IMPORTS_ONLY names a block that is gone"


def _imported(tree: ast.AST) -> dict[str, object]:
    """Execute every import of ``tree``; {bound name: object}."""
    names: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                module = importlib.import_module(alias.name)
                names[alias.asname or alias.name.split(".")[0]] = (
                    module if alias.asname else importlib.import_module(alias.name.split(".")[0])
                )
        elif isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name!r}"
                names[alias.asname or alias.name] = getattr(module, alias.name)
    return names


@pytest.mark.parametrize("key,code", BLOCKS, ids=[k for k, _ in BLOCKS])
def test_imports_run_and_called_names_are_callable(key, code):
    tree = ast.parse(code, filename=key)  # a signature or pseudo-code belongs in a ```text block
    names = _imported(tree)
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    for name in called & set(names):
        assert callable(names[name]), f"{key}: {name} is imported and called but is {names[name]!r}"


def test_export_resample_is_the_function_even_after_the_submodule_is_imported():
    importlib.import_module("fastmix_data.export.resample")  # what shadowed a lazy __getattr__
    from fastmix_data.export import resample

    assert callable(resample) and resample.__name__ == "resample"


@pytest.fixture(scope="module")
def docs_data(tmp_path_factory):
    """``data/code`` (Parquet text) and ``data/web`` (tars, and Parquet with ids) under one directory."""
    root = tmp_path_factory.mktemp("docs")
    write_parquet_source(root / "data" / "code", make_docs(150, seed=1, prefix="code " * 8), shards=3)
    write_wds_source(root / "data" / "web", make_docs(120, seed=2, prefix="web " * 8), shards=2)
    write_parquet_source(root / "data" / "web", make_docs(30, seed=3, prefix="w"), shards=2, ids_col="input_ids")
    return root


RUN = [(k, c) for k, c in BLOCKS if k not in IMPORTS_ONLY]


@pytest.mark.parametrize("key,code", RUN, ids=[k for k, _ in RUN])
def test_block_runs_on_a_small_corpus(key, code, docs_data, monkeypatch):
    for old, new in SCALE.get(key, {}).items():
        assert old in code, f"{key}: SCALE expects {old} in the block"
        code = code.replace(old, new)
    monkeypatch.chdir(docs_data)
    exec(compile(code, key, "exec"), {"__name__": "docs_snippet"})
