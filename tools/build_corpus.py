#!/usr/bin/env python3
"""Build the multi-domain demo corpus from this Python installation (see docs/corpus.md).

    python tools/build_corpus.py --out out/corpus
    python tools/build_corpus.py --out out/corpus --planted out/planted \\
        --proportions code=0.4,prose=0.3,docstrings=0.2,markup=0.1 --planted-docs 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastmix_data.corpus import (  # noqa: E402
    DEFAULT_DOCS_PER_SHARD,
    DEFAULT_MAX_BYTES_PER_DOMAIN,
    DEFAULT_MAX_DOCS_PER_DOMAIN,
    DOMAINS,
    SPLITS,
    TRAIN_FORMATS,
    build_corpus,
    build_planted_target,
)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _proportions(value: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in _csv(value):
        name, sep, num = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected DOMAIN=P, got {part!r}")
        try:
            out[name.strip()] = float(num)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number in {part!r}") from None
    return out


def _fractions(value: str) -> tuple[float, float, float]:
    parts = _csv(value)
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected TRAIN,VALIDATION,TEST fractions, got {value!r}")
    return tuple(float(p) for p in parts)  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-docs-per-domain", type=int, default=DEFAULT_MAX_DOCS_PER_DOMAIN,
                    help="0 = no cap (default %(default)s)")
    ap.add_argument("--max-bytes-per-domain", type=int, default=DEFAULT_MAX_BYTES_PER_DOMAIN,
                    help="UTF-8 text bytes, 0 = no cap (default %(default)s)")
    ap.add_argument("--docs-per-shard", type=int, default=DEFAULT_DOCS_PER_SHARD)
    ap.add_argument("--formats", type=_csv, default=list(TRAIN_FORMATS),
                    help=f"training formats, comma-separated subset of {','.join(TRAIN_FORMATS)}")
    ap.add_argument("--domains", type=_csv, default=None,
                    help=f"comma-separated subset of {','.join(DOMAINS)} (default: all)")
    ap.add_argument("--split", type=_fractions, default=(0.9, 0.05, 0.05),
                    help="train,validation,test fractions (default 0.9,0.05,0.05)")
    ap.add_argument("--planted", default=None, help="also write a planted target set to this folder")
    ap.add_argument("--proportions", type=_proportions, default=None,
                    help="planted target proportions, e.g. code=0.5,prose=0.5 (default: uniform)")
    ap.add_argument("--planted-docs", type=int, default=200)
    ap.add_argument("--planted-split", choices=SPLITS, default="validation")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    manifest = build_corpus(
        args.out,
        seed=args.seed,
        max_docs_per_domain=args.max_docs_per_domain,
        max_bytes_per_domain=args.max_bytes_per_domain,
        docs_per_shard=args.docs_per_shard,
        formats=args.formats,
        split_fractions=args.split,
        domains=args.domains,
        progress=not args.no_progress,
    )
    elapsed = time.perf_counter() - t0
    for name, info in manifest["domains"].items():
        sp = info["splits"]
        print(f"{name:11s} docs={info['docs']:5d} bytes={info['bytes']:9d} "
              f"train/val/test={sp['train']['docs']}/{sp['validation']['docs']}/{sp['test']['docs']} "
              f"files={info['files_used']}/{info['candidates']}")
    for name, why in manifest["skipped_domains"].items():
        print(f"{name:11s} SKIPPED: {why}")
    print(f"wrote {Path(args.out) / 'corpus.json'} in {elapsed:.1f}s")

    if args.planted:
        props = args.proportions or {d: 1.0 for d in manifest["domains"]}
        sidecar = build_planted_target(args.planted, args.out, props, args.planted_docs, args.seed,
                                       split=args.planted_split)
        print(f"planted target {Path(args.planted)}: counts {json.dumps(sidecar['counts'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
