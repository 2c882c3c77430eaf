"""The runtime: the IterableDataset, partitioning, packing, the weight channel, state, telemetry."""

from fastmix_data.stream.mixture import MixtureStream, TrackedLoader
from fastmix_data.stream.tokenize import BYTE_EOS, BYTE_VOCAB_SIZE, ByteTokenizer

__all__ = ["MixtureStream", "TrackedLoader", "ByteTokenizer", "BYTE_EOS", "BYTE_VOCAB_SIZE"]
