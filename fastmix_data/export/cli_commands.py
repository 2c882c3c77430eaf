"""The ``manifest``, ``resample`` and ``convert`` subcommands of ``fastmix-data``.

Wire them with ``add_export_parsers(subparsers)``; each subparser's ``func`` takes the parsed args
and returns an exit status. Examples::

    fastmix-data manifest --source code=data/code --source web='data/web/*.tar' --weights code=0.3,web=0.7 \\
        --budget 10B_tokens --seq-len 2048 --out manifest.json
    fastmix-data resample --manifest manifest.json --out resampled/ --format parquet --workers 4
    fastmix-data convert --manifest manifest.json --to megatron --prefix code=/megatron/code_text_document
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import yaml

from fastmix_data.errors import FastMixDataError


def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values or []:
        for part in item.split(",") if what == "weights" else [item]:
            if not part.strip():
                continue
            if "=" not in part:
                raise FastMixDataError(f"--{what} expects name=VALUE, got {part!r}")
            name, value = part.split("=", 1)
            out[name.strip()] = value.strip()
    return out


def parse_weights(spec: str, units: str | None = None) -> dict[str, float]:
    """``code=0.3,web=0.7`` or a JSON/YAML file with a mapping, ``{"weights": mapping}``, or a search's
    ``weights.json``: with ``units`` ("samples" or "tokens") its ``shares[units]`` -- the same mixture
    in those units -- is used, so a manifest in sample units gets sample shares."""
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            obj = yaml.safe_load(f)
        if isinstance(obj, dict) and units and isinstance(obj.get("shares"), dict):
            if not isinstance(obj["shares"].get(units), dict):
                raise FastMixDataError(f"weights file {spec} has no {units} shares (the sources had no index counts); "
                                       f"use --weight-units {obj.get('weight_units', 'tokens')}")
            obj = obj["shares"][units]
        elif isinstance(obj, dict) and isinstance(obj.get("weights"), dict):
            obj = obj["weights"]
        if not isinstance(obj, dict):
            raise FastMixDataError(f"weights file {spec} must hold a mapping source -> weight")
        from fastmix_data.plan.weights import weight_value

        return {str(k): weight_value(str(k), v, where=f"{spec}: weight of source") for k, v in obj.items()}
    try:
        return {k: float(v) for k, v in _pairs([spec], "weights").items()}
    except ValueError as exc:
        raise FastMixDataError(f"--weights {spec!r}: {exc}") from None


def _exhaustion(values: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in _pairs(values, "exhaustion").items():
        policy, _, max_epochs = value.partition(":")
        out[name] = {"policy": policy, "max_epochs": int(max_epochs) if max_epochs else None}
    return out


def _report(text: str) -> None:
    print(text, file=sys.stderr)


def _engine(args: argparse.Namespace) -> Any:
    from fastmix_data.engine import get_engine

    if args.engine == "local":
        return "local"
    return get_engine("ray", getattr(args, "workers", None), ray_address=args.ray_address)


def _stats_line(stats: dict) -> str:
    retried = ", ".join(f"{k}: {v}" for k, v in sorted(stats["retried_tasks"].items())[:5])
    return (
        f"{stats['tasks']} tasks ({stats['skipped']} already done) on {stats['engine']} with {stats['workers']} "
        f"worker(s) in {stats['seconds']:.1f} s; {stats['retries']} retried attempt(s){f' ({retried})' if retried else ''}; "
        f"read {stats['bytes_read'] / 1e6:,.1f} MB ({stats['read_mb_per_s']:,.1f} MB/s), "
        f"wrote {stats['bytes_written'] / 1e6:,.1f} MB ({stats['write_mb_per_s']:,.1f} MB/s)"
    )


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """``--engine local|ray`` and ``--ray-address`` (shared by index, manifest and resample)."""
    p.add_argument(
        "--engine", choices=("local", "ray"), default="local",
        help="run the work on this machine (default) or as Ray tasks on a cluster (pip install 'fastmix-data[ray]')",
    )  # fmt: skip
    p.add_argument(
        "--ray-address", default=None,
        help="Ray cluster to use with --engine ray (default: RAY_ADDRESS, else the cluster `ray start` "
        "started on this machine, else a new local one)",
    )  # fmt: skip


def cmd_manifest(args: argparse.Namespace) -> int:
    """Build a manifest offline from sources, weights and a budget; write it atomically."""
    from fastmix_data.export.manifest import build_manifest, summary, write_manifest

    sources = _pairs(args.sources, "source")
    if not sources:
        raise FastMixDataError("give at least one --source NAME=PATH_OR_GLOB")
    history = None
    if args.history:
        try:
            with open(args.history, encoding="utf-8") as f:
                obj = json.load(f)
        except (OSError, ValueError) as exc:
            raise FastMixDataError(f"--history {args.history}: cannot read it as JSON ({exc})") from None
        history = obj.get("history", obj) if isinstance(obj, dict) else obj
        if not isinstance(history, list):
            raise FastMixDataError(f"--history {args.history} must hold a list of {{position, weights}} entries")
    options = {
        k: v for k, v in (("text_field", args.text_field), ("ids_field", args.ids_field)) if v is not None
    }
    manifest = build_manifest(
        sources,
        parse_weights(args.weights, args.weight_units) if args.weights else None,
        args.budget if not args.budget.isdigit() else int(args.budget),
        root=args.root,
        seed=args.seed,
        seq_len=args.seq_len,
        weight_units=args.weight_units,
        exhaustion=_exhaustion(args.exhaustion),
        history=history,
        shuffle=not args.no_shuffle,
        engine=_engine(args),
        **options,
    )
    write_manifest(manifest, args.out)
    _report(summary(manifest))
    _report(f"wrote {args.out}")
    return 0


def cmd_resample(args: argparse.Namespace) -> int:
    """Materialise a manifest as resampled shards (RANK / WORLD_SIZE from the environment)."""
    from fastmix_data.export.resample import resample

    result = resample(
        args.manifest,
        args.out,
        format=args.format,
        shard_size=args.shard_size,
        workers=args.workers,
        shard_items=args.shard_items,
        verify=args.verify,
        root=args.root,
        progress=None,
        engine=_engine(args),
    )
    _report(_stats_line(result["stats"]))
    if result.get("complete"):
        comp = result["composition"]
        _report(
            f"wrote {len(result['shards'])} {args.format} shards ({result['bytes']:,} bytes) to {args.out}"
        )
        for name in result["sources"]:
            _report(
                f"  {name:<16} items {comp['items'][name]:>12,} (manifest {comp['manifest_items'][name]:,})  "
                f"token share {comp['token_share'][name]:.4f} (manifest {comp['manifest_token_share'][name]:.4f})"
            )
    else:
        _report(
            f"this process wrote its shards; {result.get('missing', '?')} shard(s) of other ranks are not finished yet"
        )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Render a manifest for another loader (Megatron, MosaicML Streaming, HF, OLMo, wids)."""
    from fastmix_data.export.converters import convert
    from fastmix_data.export.manifest import read_manifest

    manifest = read_manifest(args.manifest, verify="none" if args.no_verify else "size")
    options: dict[str, Any] = {"choose": args.choose, "per_shard": args.per_shard}
    if args.prefix:
        options["prefixes"] = _pairs(args.prefix, "prefix")
    if args.local:
        options["locals"] = _pairs(args.local, "local")
    if args.resampled:
        from fastmix_data.export.resample import read_index

        index = read_index(args.resampled)
        text = convert(index, args.to, args.out, out_dir=os.path.abspath(args.resampled), **options)
    else:
        text = convert(manifest, args.to, args.out, **options)
    if args.out is None:
        sys.stdout.write(text)
    else:
        _report(f"wrote {args.out}")
    return 0


def add_export_parsers(subparsers: Any) -> None:
    """Register ``manifest``, ``resample`` and ``convert`` on an argparse subparsers object."""
    p = subparsers.add_parser("manifest", help="build a shard-sampling manifest offline (no shard is read)")
    p.add_argument("--source", "--sources", dest="sources", nargs="+", action="extend", required=True,
                   metavar="NAME=PATH_OR_GLOB", help="a source (repeatable; --sources a=.. b=.. also works)")
    p.add_argument("--weights", help="FILE (JSON/YAML mapping, or a search's weights.json: its shares in "
                   "--weight-units are used) or name=w,name=w")
    p.add_argument("--history", help="JSON list of later changes {position, weights} (or a stream state)")
    p.add_argument("--budget", required=True, help="10B_tokens, 1M_samples, or an item count")
    p.add_argument("--seq-len", type=int, default=None, help="packing mode: sequences of seq_len + 1 tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight-units", choices=("samples", "tokens"), default="samples")
    p.add_argument("--exhaustion", nargs="+", action="extend", metavar="NAME=POLICY[:MAX_EPOCHS]")
    p.add_argument(
        "--root", default=None, help="directory containing every shard (default: their common directory)"
    )
    p.add_argument("--text-field", default=None)
    p.add_argument("--ids-field", default=None)
    p.add_argument("--no-shuffle", action="store_true")
    p.add_argument("--out", required=True)
    add_engine_flags(p)
    p.set_defaults(func=cmd_manifest)

    p = subparsers.add_parser("resample", help="materialise a manifest as new shards")
    p.add_argument("--manifest", required=True)
    p.add_argument(
        "--out", required=True, help="output directory (empty, new, or an unfinished run to resume)"
    )
    p.add_argument("--format", choices=("parquet", "webdataset", "mds"), default="parquet")
    p.add_argument("--shard-size", default="256MB")
    p.add_argument(
        "--shard-items", type=int, default=None, help="exact items per output shard (overrides --shard-size)"
    )
    p.add_argument(
        "--workers", type=int, default=None,
        help="local processes (default 1), or Ray tasks at once (default: the cluster's CPUs)",
    )  # fmt: skip
    p.add_argument("--verify", choices=("none", "size", "sha256"), default="size")
    p.add_argument(
        "--root", default=None, help="the input shards' root, if moved since the manifest was made"
    )
    add_engine_flags(p)
    p.set_defaults(func=cmd_resample)

    from fastmix_data.export.converters import TARGETS

    p = subparsers.add_parser(
        "convert", help="render a manifest for Megatron, MosaicML Streaming, HF, OLMo or wids"
    )
    p.add_argument("--manifest", required=True)
    p.add_argument("--to", required=True, choices=TARGETS)
    p.add_argument("--out", default=None, help="output file (default: stdout)")
    p.add_argument(
        "--prefix", nargs="+", action="extend", metavar="NAME=PREFIX", help="Megatron dataset prefixes"
    )
    p.add_argument("--per-shard", action="store_true", help="Megatron: one blend entry per shard")
    p.add_argument(
        "--local", nargs="+", action="extend", metavar="NAME=MDS_DIR", help="Streaming: MDS copies of sources"
    )
    p.add_argument("--choose", action="store_true", help="Streaming: absolute choose= instead of proportion=")
    p.add_argument("--resampled", default=None, help="wids: list the tars of this resample output directory")
    p.add_argument("--no-verify", action="store_true", help="do not check the shards' sizes")
    p.set_defaults(func=cmd_convert)
