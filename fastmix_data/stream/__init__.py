"""The runtime: the IterableDataset, partitioning, packing, the weight channel, state, telemetry."""

from fastmix_data.stream.tokenize import BYTE_EOS, BYTE_VOCAB_SIZE, ByteTokenizer

__all__ = ["MixtureStream", "TrackedLoader", "ByteTokenizer", "BYTE_EOS", "BYTE_VOCAB_SIZE"]


def __getattr__(name: str):
    # Lazy: planning and manifests use this package's items/tokenizers without importing torch.
    if name == "MixtureStream":
        from fastmix_data.stream.mixture import MixtureStream

        return MixtureStream
    if name == "TrackedLoader":
        from fastmix_data.stream.loader import TrackedLoader

        return TrackedLoader
    raise AttributeError(name)
