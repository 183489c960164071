"""blkfs: a FUSE passthrough filesystem that records dirty blocks and write heat."""

__version__ = "0.1.0"
