"""Shared tiny settings for tests that train."""
from __future__ import annotations

from exaggerate.config import Classifier, Explainer, Prepare
from exaggerate.datasets import open_dataset
from exaggerate.splits import make_splits

TINY_CLASSIFIER = Classifier(growth_rate=4, block_config=[1, 1], num_init_features=8, epochs=1, batch_size=32,
                             grid_images=4)
TINY_EXPLAINER = Explainer(generator_widths=[8, 16], discriminator_widths=[8, 16], n_critic=1, batch_size=8,
                           steps=4, checkpoint_every=2, log_every=2, image_every=2, grid_queries=2)


def dataset_and_splits(base):
    ds = open_dataset(base)
    ids = make_splits(ds, base, Prepare())
    return ds, {k: ds.index_of(v) for k, v in ids.items()}
