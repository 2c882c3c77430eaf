"""Live weights from beside the job: a search publishes, every rank's stream follows.

* :class:`WeightPublisher` (``publisher.py``): a search sink that publishes each new mixture.
* :class:`Follow` (``follower.py``): ``MixtureStream(..., follow=Follow(uri))`` (or ``follow=uri``)
  makes every rank and worker switch at one recorded global batch, with no call from the loop.
* ``wire.py``: the JSON documents; ``transport.py``: TCP store or file / fsspec URL;
  ``ledger.py``: how the job decides where a change applies; ``embedded.py``: the search inside the job.

See docs/live.md.
"""

from fastmix_data.live.follower import Follow
from fastmix_data.live.publisher import WeightPublisher

__all__ = ["Follow", "WeightPublisher"]
