"""Data sharding: raw Cityscapes / VOC 2012 + SBD layouts -> WebDataset shards + Parquet manifest.

Imports only numpy, Pillow, pyarrow, scipy, cityscapesscripts, lz4 and tqdm (no torch, Ray,
MLflow or webdataset), so sharding runs on any data-preparation machine. This package
file imports nothing, so worker processes load only the modules they use.

- :mod:`sharding.cityscapes`, :mod:`sharding.voc`: read the layouts users download.
- :mod:`sharding.classes`: class names, colours, ignore index.
- :mod:`sharding.samples`: one sample from its files to shard members and a manifest row.
- :mod:`sharding.pixels`: decoded pixels as ``npy.lz4`` members (``--image-encoding lz4``).
- :mod:`sharding.pack`: write one shard atomically, with its sidecar index.
- :mod:`sharding.write`: shard whole splits in parallel, resumably; the summary table.
- :mod:`sharding.manifest`: the Parquet manifest, the contract with ``pipeline/data.py``.
- :mod:`sharding.verify`: re-read every shard against its manifest.
- :mod:`sharding.storage`: shard folders and checkpoint storage at ``https://``, ``s3://``,
  ``gs://`` locations (fsspec, imported when a URL is read) as well as local paths; its
  WebDataset stage imports ``webdataset`` when ``pipeline/`` builds a loader.
- :mod:`sharding.synthetic`: a small learnable dataset in the real layouts.
- :mod:`sharding.marker`: the file in which a synthetic dataset declares its image counts.
- :mod:`sharding.text`: ``HxW`` sizes and aligned text tables, for every command line
  (standard library only: the lowest layer, so pipeline, ``run.py`` and the benchmarks share it).
"""
