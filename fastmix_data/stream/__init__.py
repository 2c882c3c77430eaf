"""The runtime: the IterableDataset, partitioning, packing, the weight channel, state, telemetry."""

from fastmix_data.stream.tokenize import BYTE_EOS, BYTE_VOCAB_SIZE, ByteTokenizer

__all__ = ["MixtureStream", "TrackedLoader", "ByteTokenizer", "BYTE_EOS", "BYTE_VOCAB_SIZE"]


def __getattr__(name: str):
    # Lazy: planning and manifests use this package's items/tokenizers without importing torch.
    if name in ("MixtureStream", "TrackedLoader"):
        from fastmix_data.stream import mixture

        return getattr(mixture, name)
    raise AttributeError(name)
