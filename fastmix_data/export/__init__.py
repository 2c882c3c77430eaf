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

# Imported eagerly: a lazy ``__getattr__`` is shadowed as soon as anything imports the submodule of
# the same name (the import system then sets ``fastmix_data.export.resample`` to the module), and
# ``from fastmix_data.export import resample`` must always give the function (docs/manifest.md).
from fastmix_data.export.resample import resample  # noqa: E402  (after the modules it builds on)

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
