"""Data: real sample datasets from package registries, nnU-Net raw layout, I/O with exact geometry, preprocessing and patch sampling."""
