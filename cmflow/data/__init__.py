"""Datasets: sources (sklearn digits, CIFAR-10 tarball, image folder, npz), image helpers, the artifact format.

- :mod:`cmflow.data.sources`: ``read_source(source, uri, options, resolution) -> RawDataset``.
- :mod:`cmflow.data.images`: uint8 <-> [-1, 1], resize, flips, ``dataset_digest``.
- :mod:`cmflow.data.shards`: ``write_dataset`` / ``read_dataset`` (``images.npy`` or shards, ``labels.npy``,
  ``dataset.json``).
- :mod:`cmflow.data.safe_pickle`: the restricted unpickler for CIFAR-10 batches.
"""
