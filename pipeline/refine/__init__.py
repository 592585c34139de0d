"""Labels from pixels: the photometric refinement of the landmark fit (docs/refine.md)."""
