"""Exporters: the shard-sampling manifest, converters to other loaders' formats, resampled shards.

Everything here is computed from the same pure plan (:mod:`fastmix_data.plan`) as the live stream,
so a manifest, a resampled dataset and a `MixtureStream` agree item for item. See docs/manifest.md.
"""

from fastmix_data.export.from_manifest import manifest_plan, manifest_sources, stream_from_manifest
from fastmix_data.export.manifest import (
    build_manifest,
    load_manifest,
    manifest_from_stream,
    plan_fingerprint,
    read_manifest,
    validate_manifest,
    write_manifest,
)

__all__ = [
    "build_manifest",
    "load_manifest",
    "manifest_from_stream",
    "manifest_plan",
    "manifest_sources",
    "plan_fingerprint",
    "read_manifest",
    "resample",
    "stream_from_manifest",
    "validate_manifest",
    "write_manifest",
]


def __getattr__(name: str):
    if name == "resample":
        from fastmix_data.export.resample import resample

        return resample
    raise AttributeError(name)
