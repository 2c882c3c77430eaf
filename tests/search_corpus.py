"""A tiny three-domain Parquet corpus and small configs for the search tests (importable helpers,
like ``shardgen``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DOMAINS = ("code", "prose", "markup")
WORDS = ["the", "data", "mixture", "model", "river", "stone", "light", "quiet", "garden", "paper"]


def _doc(domain: str, rng: np.random.Generator) -> str:
    n = int(rng.integers(4, 9))
    if domain == "code":
        return "".join(f"def f{rng.integers(100)}(x):\n    return x * {rng.integers(10)} + {rng.integers(10)}\n"
                       for _ in range(n))
    if domain == "prose":
        return " ".join(" ".join(rng.choice(WORDS, size=6)).capitalize() + "." for _ in range(n)) + "\n"
    return "".join(f'<item id="{rng.integers(1000)}"><v>{rng.integers(99)}</v></item>\n' for _ in range(n))


def write_tiny_corpus(root: Path, docs: int = 40, seed: int = 0) -> Path:
    """``root/{train,validation}/<domain>/part-00000.parquet`` (columns text, domain) and a
    ``root/planted/part-00000.parquet`` mixing the validation docs (code 60 %, prose 30 %, markup 10 %)."""
    rng = np.random.default_rng(seed)
    planted_texts, planted_dom = [], []
    for d in DOMAINS:
        for split, n in (("train", docs), ("validation", max(6, docs // 4))):
            texts = [_doc(d, rng) for _ in range(n)]
            out = root / split / d
            out.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"text": texts, "domain": [d] * n}), out / "part-00000.parquet")
            if split == "validation":
                k = {"code": 6, "prose": 3, "markup": 1}[d] * 2
                planted_texts += [texts[i % n] for i in range(k)]
                planted_dom += [d] * k
    (root / "planted").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": planted_texts, "domain": planted_dom}), root / "planted" / "part-00000.parquet")
    return root


def sources(root: Path) -> dict[str, str]:
    return {d: str(root / "train" / d) for d in DOMAINS}


def validation(root: Path) -> dict[str, str]:
    return {d: str(root / "validation" / d) for d in DOMAINS}


def tiny_train(**kw) -> dict:
    """The ``train`` section of a fast config: the tiny preset on 6 x 32-token micro-batches."""
    base = dict(proxy="tiny", batch_size=6, seq_len=32, lr_warmup_steps=2, lr=3e-3)
    base.update(kw)
    return base


def tiny_config(method: str = "fastmix", steps: int = 20, **sections) -> dict:
    """A config mapping for ``method`` with a budget of ``steps`` tiny micro-batches."""
    cfg = {"method": method, "max_tokens": 6 * 32 * steps, "train": tiny_train(), "target": {"max_seqs": 24},
           "output": {"progress": False, "plot": False}}
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg
