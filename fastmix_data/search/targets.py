"""Target batches for a search: held-out validation shards, a held-out domain, or Q/A pairs.

A target spec is one of:
  * a path / glob / list of shards (any supported format): text or ids rows, packed like training
    data (every token counts);
  * ``{"path": ..., "question_field": "question", "answer_field": "answer"}``: one sequence per
    pair, ``question + answer`` tokenized, and only the answer tokens count (``loss_mask``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fastmix_data.errors import SourceError
from fastmix_data.sources import open_source
from fastmix_data.stream.mixture import MixtureStream
from fastmix_data.stream.tokenize import as_tokenizer


def target_batches(
    spec: Any, seq_len: int, batch_size: int, *, seed: int = 0, max_batches: int = 64, tokenizer: Any = None
) -> list[dict]:
    """Up to ``max_batches`` target batches ``{"tokens": [B, L+1], "loss_mask": [B, L]}``.

    Plain shards are packed exactly as the training stream packs them (one pass, seeded order);
    Q/A specs give one sequence per pair (question then answer, padded at the end with the
    end-of-document id), the mask covering the answer tokens only.
    """
    if isinstance(spec, Mapping) and "answer_field" in spec:
        return _qa_batches(spec, seq_len, batch_size, max_batches, tokenizer)
    stream = MixtureStream({"target": spec}, {"target": 1.0}, batch_size=batch_size, seed=seed, seq_len=seq_len,
                           tokenizer=tokenizer, exhaustion={"target": "stop"}, world_size=1, rank=0)
    out = []
    for batch in stream:
        out.append({"tokens": batch["tokens"], "loss_mask": torch.ones(batch["tokens"].shape[0], seq_len, dtype=torch.bool)})
        if len(out) >= max_batches:
            break
    if not out:  # fewer tokens than one batch: take what there is, unbatched
        raise SourceError(
            f"target {spec!r} holds fewer than {batch_size} sequences of {seq_len + 1} tokens; "
            "give more target text or a smaller batch_size/seq_len"
        )
    return out


def _qa_batches(spec: Mapping, seq_len: int, batch_size: int, max_batches: int, tokenizer: Any) -> list[dict]:
    tok = as_tokenizer(tokenizer)
    qf, af = spec.get("question_field", "question"), spec["answer_field"]
    src = open_source("target", spec["path"], text_field=None, ids_field=None, extra_fields=[qf, af])
    width = seq_len + 1
    rows_t, rows_m = [], []
    for i in range(len(src.shards)):
        data = src.read_shard(i)
        for q, a in zip(data.extra[qf], data.extra[af]):
            qi, ai = tok.encode(str(q)), tok.encode(str(a))
            ids = np.concatenate([qi, ai, [tok.eos_id if tok.eos_id is not None else 0]])[:width]
            mask = np.zeros(width, dtype=bool)
            mask[len(qi) : len(qi) + len(ai) + 1] = True  # predicting answer tokens and the final eos
            pad = width - len(ids)
            rows_t.append(np.pad(ids, (0, pad), constant_values=tok.eos_id or 0))
            rows_m.append(np.pad(mask, (0, pad))[1:])  # mask aligned with targets tokens[1:]
    if not rows_t:
        raise SourceError(f"Q/A target {spec['path']!r} has no rows")
    out = []
    for s in range(0, len(rows_t), batch_size):
        out.append({"tokens": torch.from_numpy(np.stack(rows_t[s : s + batch_size]).astype(np.int64)),
                    "loss_mask": torch.from_numpy(np.stack(rows_m[s : s + batch_size]))})
        if len(out) >= max_batches:
            break
    return out
