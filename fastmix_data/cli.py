"""The `fastmix-data` command: a thin layer over the library API."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

STREAM_KEYS = {"sources", "target", "seq_len", "batch_size", "seed_stream", "out", "method", "source_options",
               "method_options"}


def _load_config(path: str | None) -> dict:
    if not path:
        return {}
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def _kv_list(items: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"{what} must be NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def _add_search_flags(p: argparse.ArgumentParser) -> None:
    from fastmix_data.search.trainer import SearchConfig

    p.add_argument("--config", help="YAML or JSON file: sources, target, seq_len, batch_size, method and search options")
    p.add_argument("--source", action="append", metavar="NAME=PATH", help="a training source (repeatable)")
    p.add_argument("--target", help="target shards (path or glob)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--method", help="fastmix (default), mixmin, aioli, doremi, stratified, natural, grid "
                   "(non-fastmix methods read Parquet targets; their options go under 'method_options')")
    p.add_argument("--out", help="output directory (default search_out)")
    p.add_argument("--manifest-out", help="also write the manifest of the final mixture here")
    p.add_argument("--manifest-budget", default="1B_tokens", help="budget of that manifest, e.g. 10B_tokens")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists (fastmix)")
    p.add_argument("--publish", metavar="URI", help="publish every new mixture for following jobs: tcp://127.0.0.1:PORT "
                   "(port 0: any free port) or a directory / fsspec URL (docs/live.md)")
    p.add_argument("--publish-allow-remote", action="store_true",
                   help="let --publish listen on a non-loopback address (needs $FASTMIX_DATA_TOKEN)")
    p.add_argument("--publish-run-id", help="run id of the published updates (default: kept in OUT/publisher.json)")
    for f in dataclasses.fields(SearchConfig):
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, dest=f"cfg_{f.name}", default=None, metavar=f.name.upper(),
                       help=f"search option {f.name} (default {f.default!r})" if f.default is not dataclasses.MISSING else None)


def cmd_search(args: argparse.Namespace) -> int:
    from fastmix_data.search.targets import target_batches
    from fastmix_data.search.trainer import SearchConfig, run_search
    from fastmix_data.stream.mixture import MixtureStream

    cfg = _load_config(args.config)
    sources = dict(cfg.pop("sources", {}) or {})
    sources.update(_kv_list(args.source, "--source"))
    target = args.target or cfg.pop("target", None)
    cfg.pop("target", None)
    seq_len = int(args.seq_len or cfg.pop("seq_len", 128))
    batch_size = int(args.batch_size or cfg.pop("batch_size", 16))
    method = args.method or cfg.pop("method", "fastmix")
    out = Path(args.out or cfg.pop("out", "search_out"))
    source_options = cfg.pop("source_options", {}) or {}
    method_options = cfg.pop("method_options", {}) or {}
    for key in list(cfg):
        if key in STREAM_KEYS:
            cfg.pop(key)
    names = {f.name for f in dataclasses.fields(SearchConfig)}
    for name in names:
        v = getattr(args, f"cfg_{name}")
        if v is not None:
            cfg[name] = _parse_value(v)
    if not sources:
        raise SystemExit("no sources: give --source NAME=PATH or 'sources:' in --config")
    if target is None:
        raise SystemExit("no target: give --target PATH or 'target:' in --config")
    sink = _publisher(args, out)
    if method == "fastmix":
        config = SearchConfig.from_dict(cfg)
        seed = config.seed
        stream = MixtureStream(sources, {n: 1.0 for n in sources}, batch_size=batch_size, seq_len=seq_len,
                               seed=config.seed, **source_options)
        tgt = target_batches(target, seq_len, batch_size, seed=config.seed)
        weights = run_search(stream, tgt, config, out_dir=out, sink=sink, resume="auto" if args.resume else False).weights
    else:
        from fastmix_data.search.methods import run_method

        # Other methods share one config layout (fastmix_data.search.methods): the stream shape and
        # budget go to "train"; method-specific fields come from method_options.
        train = {"seq_len": seq_len, "batch_size": batch_size}
        for key in ("model", "seed", "max_tokens", "lr", "device"):
            if key in cfg:
                train[key] = cfg[key]
        seed = int(train.get("seed", 0))
        method_cfg = {"train": train, "progress": bool(cfg.get("progress", True)), **method_options}
        weights = run_method(method, sources, target, method_cfg, out_dir=out, sink=sink).weights
    if sink is not None:  # a search that crashes leaves its publisher silent: followers report it lost
        sink.close()
    print(json.dumps({"weights": weights, "out": str(out)}, indent=2))
    if args.manifest_out:
        from fastmix_data.export.manifest import build_manifest, write_manifest

        manifest = build_manifest(sources, weights, args.manifest_budget, root=_common_root(sources), seed=seed,
                                  seq_len=seq_len, weight_units="tokens")
        write_manifest(manifest, args.manifest_out)
        print(f"manifest written to {args.manifest_out}")
    return 0


def _publisher(args: argparse.Namespace, out: Path):
    """The `WeightPublisher` of ``--publish`` (None without it); its URI is printed and kept in
    OUT/publisher.json."""
    if not args.publish:
        return None
    from fastmix_data.live import WeightPublisher

    out.mkdir(parents=True, exist_ok=True)
    pub = WeightPublisher(args.publish, state_dir=out, run_id=args.publish_run_id,
                          allow_remote=args.publish_allow_remote)
    print(json.dumps({"publishing": pub.uri, "run_id": pub.run_id, "next_seq": pub.seq + 1}), flush=True)
    return pub


def _common_root(sources: dict[str, Any]) -> str:
    import os

    paths = [os.path.abspath(str(v).split("*")[0]) for v in sources.values()]
    return os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])


def _parse_value(v: str) -> Any:
    try:
        return json.loads(v)
    except ValueError:
        return v


def cmd_demo(args: argparse.Namespace) -> int:
    from fastmix_data.demo import print_summary, run_demo

    summary = run_demo(args.out, max_tokens=args.max_tokens, seed=args.seed, progress=not args.no_progress)
    print_summary(summary)
    return 0


def cmd_build_corpus(args: argparse.Namespace) -> int:
    from fastmix_data.corpus import build_corpus

    info = build_corpus(args.out, seed=args.seed)
    print(json.dumps({d: v.get("docs", v) if isinstance(v, dict) else v for d, v in info["domains"].items()}, indent=2,
                     default=str))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    """Index one source (listing, footers and entries in parallel) and write its index file."""
    from fastmix_data.sources import index_source
    from fastmix_data.storage import redact

    options: dict[str, Any] = {"verify": args.verify, "on_corrupt": args.on_corrupt}
    if args.format:
        options["format"] = args.format
    if args.text_field:
        options["text_field"] = None if args.text_field == "none" else args.text_field
    if args.ids_field:
        options["ids_field"] = None if args.ids_field == "none" else args.ids_field
    if args.cache_dir:
        options["cache_dir"] = args.cache_dir
    if args.engine == "ray":
        from fastmix_data.engine import RayEngine

        options["engine"] = RayEngine(args.ray_address)
    doc = index_source(args.name or "source", args.spec if len(args.spec) > 1 else args.spec[0], out=args.out, **options)
    rows = sum(s["rows"] for s in doc["shards"])
    size = sum(s["size"] for s in doc["shards"])
    print(f"{redact(args.out)}: {doc['source_format']} index of {len(doc['shards'])} shards, {rows:,} rows, "
          f"{size:,} bytes under {redact(doc['root'])} ({len(doc['skipped'])} skipped)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmix-data", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="build the stdlib corpus, run a FastMix search driving a live stream, export")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--max-tokens", type=int, default=1_500_000, help="search budget in proxy training tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("search", help="find a mixture for a target (FastMix and other methods)")
    _add_search_flags(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("build-corpus", help="build the multi-domain corpus from the Python stdlib")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_build_corpus)

    p = sub.add_parser(
        "index",
        help="index a source once (local or s3://, gs://, az://, hf://, http(s):// URLs) and write its index "
        "file, which jobs load with open_source(..., index_file=) instead of listing the store",
    )
    p.add_argument("spec", nargs="+", help="directory, glob, shard file or URL (object, prefix or glob); several allowed")
    p.add_argument("--out", required=True, help="index file to write: a local path or a URL (written atomically)")
    p.add_argument("--name", help="source name used in messages")
    p.add_argument("--format", choices=["parquet", "webdataset", "mds", "hf"])
    p.add_argument("--text-field", help="text column (default text; 'none' to disable)")
    p.add_argument("--ids-field", help="token-ids column (default input_ids; 'none' to disable)")
    p.add_argument("--verify", default="auto", choices=["auto", "sha256", "size"],
                   help="auto: sha256 of local shards, size + ETag/version of remote ones; sha256: hash every "
                   "shard (downloads remote ones whole); size: no hashing")
    p.add_argument("--on-corrupt", default="raise", choices=["raise", "skip"])
    p.add_argument("--cache-dir", help="node-local cache directory (index entries; remote shards under shards/)")
    from fastmix_data.export.cli_commands import add_engine_flags

    add_engine_flags(p)  # --engine ray: one Ray task per shard to index
    p.set_defaults(func=cmd_index)

    try:
        from fastmix_data.export.cli_commands import add_export_parsers
    except ImportError:
        pass
    else:
        add_export_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from fastmix_data.errors import FastMixDataError

    try:
        return int(args.func(args) or 0)
    except FastMixDataError as exc:
        print(f"fastmix-data: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
