"""morphset: offline data preparation for 3D face research (stages and math; no Dask here)."""

__version__ = "0.1.0"
