"""FastMix: the mixture optimiser on the logits (``optimizer.py``) and the search loop (``loop.py``)."""

from .loop import FastMixLoop, LoopState, loss_weights
from .optimizer import SIGNALS, FastMix, StepInfo

__all__ = ["SIGNALS", "FastMix", "FastMixLoop", "LoopState", "StepInfo", "loss_weights"]
