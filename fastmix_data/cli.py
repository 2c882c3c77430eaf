"""The `fastmix-data` command: a thin layer over the library API."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

SEARCH_CLI_KEYS = ("out",)  # keys of a search --config file that are not SearchConfig fields


def _load_config(path: str | None) -> dict:
    if not path:
        return {}
    from fastmix_data.errors import ConfigError

    try:
        text = Path(path).read_text()
        if path.endswith((".yaml", ".yml")):
            import yaml

            obj = yaml.safe_load(text) or {}
        else:
            obj = json.loads(text)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"config file {path} must hold a mapping of config fields, got {type(obj).__name__}")
    return obj


def default_threads() -> int:
    """Torch intra-op threads for a CLI run: half the usable cores (1 on a 2-core machine), at most 8.

    On a small shared machine extra intra-op threads spin against other processes: the cpu proxy ran
    ~6x slower with 2 threads than with 1 on a busy 2-core machine (docs/search.md, "CPU threads")."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // 2))


def set_threads(n: int | None) -> int | None:
    """Set torch's intra-op threads: ``n``, else :func:`default_threads` unless OMP_NUM_THREADS is set.
    Returns the count set (None: left alone)."""
    if n is None and os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    n = n or default_threads()
    torch.set_num_threads(n)
    return n


def _help(f) -> str:
    meta = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if default is None:
        shown = meta["auto"] or "none"
    elif meta["kind"] == "bool":
        shown = "on" if default else "off"
    else:
        shown = str(default)
    text = f"{meta['doc']} (default: {shown})"
    return text.replace("%", "%%")


def _add_search_flags(p: argparse.ArgumentParser) -> None:
    """The search command's options: a few of its own, then one flag per SearchConfig field,
    generated from the fields' docs (method sections prefixed: --mixmin-eta; FastMix's fields also
    without the prefix: --z-lr)."""
    from fastmix_data.search.config import SearchConfig
    from fastmix_data.search.config_fields import walk

    p.add_argument("--config", help="YAML or JSON file with SearchConfig fields (flags override it); may also "
                   "hold 'out'")
    p.add_argument("--out", help="output directory (default search_out)")
    p.add_argument("--resume", action="store_true", help="continue a FastMix search from OUT/checkpoint.pt")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: half the usable cores, at most 8; "
                   "OMP_NUM_THREADS wins when set)")
    p.add_argument("--manifest-out", help="also write the manifest of the found mixture here")
    p.add_argument("--manifest-budget", default="1B_tokens", help="budget of that manifest, e.g. 10B_tokens")
    p.add_argument("--publish", metavar="URI", help="publish every new mixture for following jobs: tcp://127.0.0.1:PORT "
                   "(port 0: any free port) or a directory / fsspec URL (docs/live.md)")
    p.add_argument("--publish-allow-remote", action="store_true",
                   help="let --publish listen on a non-loopback address (needs $FASTMIX_DATA_TOKEN)")
    p.add_argument("--publish-run-id", help="run id of the published updates (default: kept in OUT/publisher.json)")
    leaves = list(walk(SearchConfig))
    taken = {leaf.flag for leaf in leaves}
    for leaf in leaves:
        meta = leaf.field.metadata
        flags = [leaf.flag] + [f"--{a}" for a in meta["aliases"]]
        bare = "--" + leaf.field.name.replace("_", "-")
        if leaf.section_path == "fastmix" and bare not in taken:
            flags.append(bare)
            taken.add(bare)
        kw: dict[str, Any] = {"dest": "cfg:" + leaf.path, "default": argparse.SUPPRESS, "help": _help(leaf.field)}
        if meta["kind"] == "bool":
            flags += ["--no-" + f[2:] for f in flags]
            kw.update(action=_BoolFlag, nargs="?", metavar="BOOL")
        elif meta["kind"] in ("sources", "target"):
            kw.update(nargs="+", action="extend", metavar="NAME=PATH" if meta["kind"] == "sources" else "PATH")
        else:
            kw["metavar"] = leaf.field.name.upper()
        p.add_argument(*flags, **kw)


class _BoolFlag(argparse.Action):
    """``--x`` sets True, ``--no-x`` False, and ``--x VALUE`` takes true/false/yes/no/1/0 (older
    scripts wrote ``--progress false``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        value = not option_string.startswith("--no-")
        if values is not None:
            if option_string.startswith("--no-"):
                parser.error(f"{option_string} takes no value")
            word = str(values).strip().lower()
            if word not in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                parser.error(f"{option_string} takes true or false, got {values!r}")
            value = word in ("true", "yes", "1", "on")
        setattr(namespace, self.dest, value)


def _search_config(args: argparse.Namespace):
    """The SearchConfig from --config and the flags (flags win), and the output directory."""
    from fastmix_data.search.config import SearchConfig

    d = _load_config(args.config)
    out = args.out or d.pop("out", None) or "search_out"
    for key in SEARCH_CLI_KEYS:
        d.pop(key, None)
    for dest, value in vars(args).items():
        if not dest.startswith("cfg:"):
            continue
        path = dest[4:].split(".")
        node = d
        for part in path[:-1]:
            node = node.setdefault(part, {})
        if path[-1] == "sources":
            node["sources"] = {**dict(node.get("sources") or {}), **_kv_list(value, "--source")}
        elif path[-1] == "path":
            node["path"] = _target_value(value)
        else:
            node[path[-1]] = value
    return SearchConfig.from_dict(d).validate(), Path(out)


def _target_value(values: list[str]) -> Any:
    """One ``--target PATH``, several paths, or ``GROUP=PATH`` pairs (a group-averaged target)."""
    pairs = [v for v in values if "=" in v and "/" not in v.split("=", 1)[0]]
    if pairs and len(pairs) == len(values):
        return _kv_list(values, "--target")
    return values[0] if len(values) == 1 else list(values)


def _kv_list(items: list[str] | None, what: str) -> dict[str, str]:
    from fastmix_data.errors import ConfigError

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{what} must be NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def cmd_search(args: argparse.Namespace) -> int:
    from fastmix_data.search import run_method

    cfg, out = _search_config(args)
    threads = set_threads(args.threads)
    logging.getLogger(__name__).info("search: method %s, %s proxy tokens, %s torch threads", cfg.method,
                                     f"{cfg.max_tokens:,}", threads or os.environ.get("OMP_NUM_THREADS"))
    sink = _publisher(args, out)
    r = run_method(cfg, out_dir=out, sink=sink, resume="auto" if args.resume else False)
    if sink is not None:  # a search that crashes leaves its publisher silent: followers report it lost
        sink.close()
    print(json.dumps({"method": r.method, "weights": r.weights, "shares": r.shares, "out": str(out)}, indent=2))
    if args.manifest_out:
        from fastmix_data.export.manifest import build_manifest, write_manifest

        sources = dict(cfg.sources)
        manifest = build_manifest(sources, r.weights, args.manifest_budget, root=_common_root(sources),
                                  seed=cfg.train.stream_seed, seq_len=cfg.train.seq_len, weight_units="tokens")
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


def _count(v: str) -> int:
    from fastmix_data.search.config_fields import parse_count

    try:
        return parse_count(v, "--max-tokens")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _common_root(sources: dict[str, Any]) -> str:
    paths = [os.path.abspath(str(v).split("*")[0]) for v in sources.values()]
    return os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])


def cmd_demo(args: argparse.Namespace) -> int:
    from fastmix_data.demo import print_summary, run_demo

    set_threads(args.threads)
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
    p.add_argument("--max-tokens", type=_count, default=1_500_000,
                   help="search budget in proxy training tokens, e.g. 1.5M (default 1.5M)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: half the usable cores, at most 8)")
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
