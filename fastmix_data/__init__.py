"""fastmix_data: weighted dataset streams for large-model training, with live mixture weights."""

__all__ = ["MixtureStream"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `fastmix_data.plan` (pure numpy) imports without torch.
    if name == "MixtureStream":
        from fastmix_data.stream.mixture import MixtureStream

        return MixtureStream
    raise AttributeError(name)
