"""Datasets: sources (sklearn digits, CIFAR-10 tarball, image folder, npz), image helpers, the artifact format.

- :mod:`cmflow.data.sources`: ``open_source(source, uri, options, resolution) -> Source``, split into items
  that decode independently (``prepare_data`` spreads them over Ray Data tasks).
- :mod:`cmflow.data.images`: resize, flips, ``dataset_digest``, sample grids.
- :mod:`cmflow.data.shards`: the sharded dataset artifact (``ShardWriter``, ``read_shard``, ``read_rows``,
  ``read_dataset``, ``dataset.json``).
- :mod:`cmflow.data.safe_pickle`: the restricted unpickler for CIFAR-10 batches.
"""
