"""Pictures in and out: safe image loading and PNGs with metadata (``images``), the original apps'
resizing with OpenCV's kernels reproduced exactly (``resize``), and grids and charts (``charts``)."""
