"""The compact torch trainer (Liu et al. CVPR 2018 encoder-decoder) over the export stage's shards.

Modules: ``data`` (streaming IterableDataset), ``network`` (SphereFace-20 encoder, decoders),
``losses``, ``loop`` (phases I-III, checkpoints, resume), ``inference`` (export and
``load_encoder``), ``config`` (parameter merging), ``synthetic`` (small trainsets for tests).
torch is imported only by the submodules, so ``import pipeline.train`` stays cheap.
"""
