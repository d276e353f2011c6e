"""Report: the package table, the size-vs-PSNR trade-off, markdown."""
