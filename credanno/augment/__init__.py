"""The one home of augmentation and its randomness.

- :mod:`credanno.augment.rng`: counter-based random numbers (every draw a hash of seed,
  epoch or view, image index, crop or draw) and :func:`~credanno.augment.rng.forked_seed`
  for code that only draws from torch's global generator.
- :mod:`credanno.augment.views`: label-preserving geometric views (flip, quarter turns,
  small shifts) used by ``credanno embed --views`` and the end-to-end supervised baseline.

DINO's multi-crop (:mod:`credanno.pretrain.multicrop`) keeps its crops with pretraining but
draws from :mod:`credanno.augment.rng` too, so every augmented result is reproducible the
same way.
"""

from credanno.augment.rng import epoch_permutation, forked_seed
from credanno.augment.views import ViewAugmentation

__all__ = ["ViewAugmentation", "epoch_permutation", "forked_seed"]
