"""Stage ``crop``: the aligned 112x96 face crop of each image, made in the pixel pass."""
