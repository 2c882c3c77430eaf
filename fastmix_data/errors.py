"""Exceptions raised by fastmix_data. Every message names the offending file, source or value."""


class FastMixDataError(Exception):
    """Base class of all errors raised by this package."""


class SourceError(FastMixDataError):
    """A source or one of its shards cannot be read (missing, corrupt, empty, schema mismatch)."""


class WeightsError(FastMixDataError, ValueError):
    """Mixture weights are invalid (NaN, negative, all zero, unknown or missing source)."""


class StateError(FastMixDataError):
    """A saved stream state cannot be loaded (wrong version, fingerprint mismatch)."""


class ManifestError(FastMixDataError):
    """A manifest is invalid (wrong version, missing fields, changed shards, path escapes)."""


class UnsafeInputError(FastMixDataError):
    """Input would need pickle, a `pipe:` URL or code execution; opting in is explicit."""


class ConfigError(FastMixDataError, ValueError):
    """A configuration value is invalid (the search config, a stream argument); the message names the
    field (a search config field by its dotted path, ``fastmix.z_lr``, and its flag) and the value."""


class CoordinationError(FastMixDataError):
    """The ranks of a job cannot agree (no store to reach them, or they disagree on the stream)."""


class PublishError(FastMixDataError):
    """A weight publisher or a follower is misconfigured (bad URI, remote address without a token)."""


class TokenizerError(FastMixDataError, ValueError):
    """A tokenizer file or a token-ids column cannot serve as the proxy's vocabulary (missing or
    unreadable file, unknown special token, ids outside the vocabulary)."""
