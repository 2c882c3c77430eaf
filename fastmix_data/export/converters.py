"""Turn a manifest into other loaders' mixture formats (one small function per target).

Every converter takes the manifest's *realised* composition (what the plan actually serves over the
budget), so another loader reproduces the proportions of the fastmix_data stream; which items it
draws and in what order is up to that loader. See docs/manifest.md ("Converters").
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import yaml

from fastmix_data.errors import ManifestError
from fastmix_data.export._util import join_inside

log = logging.getLogger(__name__)

TARGETS = (
    "megatron", "megatron-args", "streaming-yaml", "streaming-json", "streaming-py", "hf", "olmo", "wids",
)  # fmt: skip
HF_BUILDERS = {"parquet": "parquet", "hf": "arrow", "webdataset": "webdataset"}


def _checked(manifest: Any) -> None:
    """Refuse a manifest dict that is not valid field by field (its shards are not read): a
    converter must never turn an edited ``take`` into another loader's mixture."""
    from fastmix_data.export.manifest import validate_manifest

    validate_manifest(manifest, verify="none")


def _shares(manifest: Mapping[str, Any]) -> dict[str, float]:
    return {
        s["name"]: float(s["take"]) / max(int(manifest["budget"]["items"]), 1) for s in manifest["sources"]
    }


def _paths(manifest: Mapping[str, Any], src: Mapping[str, Any]) -> list[str]:
    resolved: dict[str, str] = {}  # each directory resolved once
    return [
        join_inside(manifest["root"], sh["path"], f"shard of source {src['name']!r}", resolved)
        for sh in src["shards"]
    ]


def _fmt(x: float) -> str:
    return f"{x:.12g}"


# ------------------------------------------------------------------------------------------ Megatron
def megatron_blend(
    manifest: Mapping[str, Any], prefixes: Mapping[str, str] | None = None, *, per_shard: bool = False
) -> str:
    """A Megatron-LM blend, ``"w1 prefix1 w2 prefix2 ..."`` (``--data-path`` / ``--data-args-path``).

    Weights are the realised item shares (samples, or packed sequences). Megatron reads its own
    indexed datasets (``prefix.bin`` / ``prefix.idx``): give each source's prefix in ``prefixes``
    (default ``<root>/<name>``). With ``per_shard``, one entry per shard: weight = its take over the
    budget, prefix = the shard path without its extension (for shards converted one to one).
    Sources (or shards) with nothing taken are left out.
    """
    _checked(manifest)
    prefixes = dict(prefixes or {})
    unknown = sorted(set(prefixes) - {s["name"] for s in manifest["sources"]})
    if unknown:
        raise ManifestError(f"prefixes name unknown sources {unknown}")
    n = max(int(manifest["budget"]["items"]), 1)
    parts: list[str] = []
    for s in manifest["sources"]:
        if per_shard:
            for sh, path in zip(s["shards"], _paths(manifest, s)):
                if sh["take"]:
                    parts += [_fmt(sh["take"] / n), os.path.splitext(path)[0]]
        elif s["take"]:
            prefix = prefixes.get(s["name"], os.path.join(manifest["root"], s["name"]))
            if any(c.isspace() for c in prefix):
                raise ManifestError(f"Megatron prefix {prefix!r} of source {s['name']!r} contains whitespace")
            parts += [_fmt(s["take"] / n), prefix]
    return " ".join(parts)


def megatron_args(manifest: Mapping[str, Any], data_args_path: str) -> list[str]:
    """Megatron-LM arguments that train on the blend written at ``data_args_path``."""
    _checked(manifest)
    args = [
        "--data-args-path",
        data_args_path,
        "--train-samples",
        str(manifest["budget"]["items"]),
        "--seed",
        str(manifest["seed"]),
    ]
    if manifest["mode"]["kind"] == "packing":
        args += ["--seq-length", str(manifest["mode"]["seq_len"])]
    return args


# ------------------------------------------------------------------------------------------ MosaicML Streaming
def _mds_dirs(manifest: Mapping[str, Any], src: Mapping[str, Any]) -> dict[str, int]:
    """MDS dataset directories of a source's shards -> items taken from each."""
    from fastmix_data.export.from_manifest import _mds_root
    from fastmix_data.sources.mds import mds_shard_locations

    cache: dict[str, str] = {}
    out: dict[str, int] = {}
    listed: set[str] = set()
    for sh, path in zip(src["shards"], _paths(manifest, src)):
        d = _mds_root(path, manifest["root"], cache)
        out[d] = out.get(d, 0) + int(sh["take"])
        listed.add(path)
    for d in out:
        extra = sorted(set(mds_shard_locations(d)) - listed)
        if extra:
            log.warning(
                "source %r: %s lists %d shard(s) the manifest leaves out (e.g. %s); Streaming reads them all",
                src["name"], os.path.join(d, "index.json"), len(extra), extra[0],
            )  # fmt: skip
    return out


def streaming_streams(
    manifest: Mapping[str, Any], locals: Mapping[str, str] | None = None, *, choose: bool = False
) -> dict:
    """MosaicML Streaming ``Stream`` definitions realising the manifest's composition.

    Args:
        locals: {source: MDS directory} for sources that are not MDS in the manifest (write them as
            MDS first, e.g. ``resample(one_source_manifest, dir, format="mds")``). MDS sources
            default to their own dataset directories (one Stream per index.json).
        choose: absolute samples per epoch (``choose`` = items taken) instead of ``proportion``.

    Returns:
        {"streams": {stream name: {"local", "remote", "proportion" | "choose"}}, "epoch_size",
        "shuffle_seed"}; pass ``epoch_size`` to StreamingDataset with proportions.
    """
    _checked(manifest)
    locals = dict(locals or {})
    n = max(int(manifest["budget"]["items"]), 1)
    streams: dict[str, dict] = {}
    for s in manifest["sources"]:
        if s["name"] in locals:
            dirs = {os.path.abspath(locals[s["name"]]): int(s["take"])}
        elif s["format"] == "mds":
            dirs = _mds_dirs(manifest, s)
        else:
            raise ManifestError(
                f"source {s['name']!r} is {s['format']}, but MosaicML Streaming reads MDS: write it as MDS "
                f"(resample a one-source manifest with format='mds') and pass locals={{{s['name']!r}: DIR}}"
            )
        for j, (d, take) in enumerate(sorted(dirs.items())):
            if not take:
                continue
            key = s["name"] if len(dirs) == 1 else f"{s['name']}/{j}"
            entry: dict[str, Any] = {"local": d, "remote": None}
            if choose:
                entry["choose"] = int(take)
            else:
                entry["proportion"] = take / n
            streams[key] = entry
    return {"streams": streams, "epoch_size": n, "shuffle_seed": int(manifest["seed"])}


def streaming_yaml(
    manifest: Mapping[str, Any], locals: Mapping[str, str] | None = None, *, choose: bool = False
) -> str:
    """:func:`streaming_streams` as YAML (the ``dataset:`` section of a Composer/LLM-Foundry config)."""
    return yaml.safe_dump(streaming_streams(manifest, locals, choose=choose), sort_keys=False)


def streaming_json(
    manifest: Mapping[str, Any], locals: Mapping[str, str] | None = None, *, choose: bool = False
) -> str:
    return json.dumps(streaming_streams(manifest, locals, choose=choose), indent=1) + "\n"


def streaming_python(
    manifest: Mapping[str, Any], locals: Mapping[str, str] | None = None, *, choose: bool = False
) -> str:
    """Python source that builds the Streams and a StreamingDataset (``streams``, ``dataset``)."""
    spec = streaming_streams(manifest, locals, choose=choose)
    lines = [
        f"# MosaicML Streaming mixture for fastmix_data manifest {manifest['fingerprint'][:16]}",
        "from streaming import Stream, StreamingDataset",
        "",
        "streams = [",
    ]
    for entry in spec["streams"].values():
        amount = f"choose={entry['choose']}" if choose else f"proportion={entry['proportion']!r}"
        lines.append(f"    Stream(local={entry['local']!r}, remote=None, {amount}),")
    lines.append("]")
    epoch = "" if choose else f", epoch_size={spec['epoch_size']}"
    lines += [
        "",
        "def make_dataset(batch_size, **kwargs):",
        f"    return StreamingDataset(streams=streams{epoch}, batch_size=batch_size, shuffle_seed={spec['shuffle_seed']}, **kwargs)",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ Hugging Face
def hf_interleave(manifest: Mapping[str, Any]) -> dict:
    """Arguments for ``datasets.interleave_datasets`` that realise the manifest's item shares.

    Returns:
        {"datasets": [{"name", "builder", "data_files", "repeat"}], "probabilities", "seed",
        "stopping_strategy": "all_exhausted", "num_samples"}: load each dataset with
        ``load_dataset(builder, data_files=data_files, split="train")``, ``.repeat(repeat)`` it
        (enough epochs for its share of the budget, with a 4-sigma margin for HF's i.i.d. draws),
        interleave with the probabilities, and take the first ``num_samples``. Sources with nothing
        taken are left out.
    """
    _checked(manifest)
    shares = _shares(manifest)
    datasets, probs = [], []
    for s in manifest["sources"]:
        if not s["take"]:
            continue
        builder = HF_BUILDERS.get(s["format"])
        if builder is None:
            raise ManifestError(
                f"source {s['name']!r} is {s['format']}, which Hugging Face datasets cannot load; resample it "
                "to parquet first"
            )
        need = s["take"] + 4 * s["take"] ** 0.5 + 1
        repeat = max(1, -(-int(need) // max(int(s["rows"]), 1)))
        datasets.append(
            {"name": s["name"], "builder": builder, "data_files": _paths(manifest, s), "repeat": repeat}
        )
        probs.append(shares[s["name"]])
    total = sum(probs)
    return {
        "datasets": datasets,
        "probabilities": [p / total for p in probs],
        "seed": int(manifest["seed"]),
        "stopping_strategy": "all_exhausted",
        "num_samples": int(manifest["budget"]["items"]),
    }


# ------------------------------------------------------------------------------------------ OLMo
def olmo_mixture(manifest: Mapping[str, Any], paths: Mapping[str, list[str]] | None = None) -> dict:
    """An OLMo-core style source mixture (``SourceMixtureDatasetConfig`` fields).

    ``target_ratio`` is the realised token share; ``max_repetition_ratio`` the tokens taken over the
    tokens held (at least 1.0), rounded up at the 4th decimal. OLMo reads pre-tokenized numpy files:
    pass their ``paths`` per source (default: the manifest's shard paths).
    """
    _checked(manifest)
    paths = dict(paths or {})
    configs = []
    tok_share = manifest["weights"]["realised_tokens"]
    for s in manifest["sources"]:
        if not s["take"]:
            continue
        held = max(int(s["tokens"]), 1)
        ratio = max(1.0, -(-int(s["take_tokens"]) * 10000 // held) / 10000)
        configs.append(
            {
                "source_name": s["name"],
                "target_ratio": float(tok_share[s["name"]]),
                "paths": list(paths.get(s["name"], _paths(manifest, s))),
                "max_repetition_ratio": ratio,
                "max_source_fraction": 1.0,
            }
        )
    out = {
        "max_tokens": int(manifest["budget"]["tokens"]),
        "seed": int(manifest["seed"]),
        "source_configs": configs,
    }
    if manifest["mode"]["kind"] == "packing":
        out["sequence_length"] = int(manifest["mode"]["seq_len"])
    return out


def olmo_yaml(manifest: Mapping[str, Any], paths: Mapping[str, list[str]] | None = None) -> str:
    return yaml.safe_dump(olmo_mixture(manifest, paths), sort_keys=False)


# ------------------------------------------------------------------------------------------ wids
def wids_index(
    index_or_manifest: Mapping[str, Any],
    base_dir: str,
    *,
    out_dir: str | None = None,
    name: str | None = None,
) -> dict:
    """A wids shard index (``wids-shard-index-v1``) of WebDataset tars, URLs relative to ``base_dir``.

    Args:
        index_or_manifest: a resample index of ``webdataset`` output (pass its ``out_dir``), or a
            manifest (its webdataset sources' shards are listed, each with its row count).
        base_dir: the directory the JSON file will be written to (wids resolves relative URLs
            against the JSON file's location).
    """
    shards: list[tuple[str, int]] = []
    if index_or_manifest.get("format") == "fastmix_data/resampled":
        if index_or_manifest.get("output_format") != "webdataset":
            raise ManifestError(
                f"wids reads WebDataset tars; this output is {index_or_manifest.get('output_format')!r}"
            )
        if out_dir is None:
            raise ManifestError("pass out_dir= (the resample output directory) with a resample index")
        shards = [(os.path.join(out_dir, sh["path"]), int(sh["rows"])) for sh in index_or_manifest["shards"]]
        name = name or f"fastmix-{index_or_manifest['manifest_fingerprint'][:12]}"
    else:
        _checked(index_or_manifest)
        for s in index_or_manifest["sources"]:
            if s["format"] != "webdataset":
                continue
            shards += [(p, int(sh["rows"])) for p, sh in zip(_paths(index_or_manifest, s), s["shards"])]
        if not shards:
            raise ManifestError(
                "the manifest has no webdataset sources; resample it with format='webdataset' first"
            )
        name = name or f"fastmix-{index_or_manifest['fingerprint'][:12]}"
    base = os.path.abspath(base_dir)
    return {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": name,
        "shardlist": [
            {"url": os.path.relpath(os.path.abspath(p), base).replace(os.sep, "/"), "nsamples": n}
            for p, n in shards
        ],
    }


def convert(manifest: Mapping[str, Any], target: str, out: str | None = None, **options: Any) -> str:
    """Render ``manifest`` for ``target`` (one of TARGETS) as text (written atomically to ``out`` if given)."""
    from fastmix_data.io import write_text_atomic

    if target == "megatron":
        text = (
            megatron_blend(manifest, options.get("prefixes"), per_shard=options.get("per_shard", False))
            + "\n"
        )
    elif target == "megatron-args":
        text = " ".join(megatron_args(manifest, options.get("data_args_path", "blend.txt"))) + "\n"
    elif target == "streaming-yaml":
        text = streaming_yaml(manifest, options.get("locals"), choose=options.get("choose", False))
    elif target == "streaming-json":
        text = streaming_json(manifest, options.get("locals"), choose=options.get("choose", False))
    elif target == "streaming-py":
        text = streaming_python(manifest, options.get("locals"), choose=options.get("choose", False))
    elif target == "hf":
        text = json.dumps(hf_interleave(manifest), indent=1) + "\n"
    elif target == "olmo":
        text = olmo_yaml(manifest, options.get("paths"))
    elif target == "wids":
        base = options.get("base_dir") or (os.path.dirname(os.path.abspath(out)) if out else os.getcwd())
        text = json.dumps(wids_index(manifest, base, out_dir=options.get("out_dir")), indent=1) + "\n"
    else:
        raise ManifestError(f"unknown conversion target {target!r}; use one of {TARGETS}")
    if out is not None:
        write_text_atomic(out, text)
    return text
