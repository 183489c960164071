"""blkfs: a FUSE passthrough filesystem that records dirty blocks and write heat."""

__version__ = "0.1.0"


def package_version() -> str:
    """The installed package's version (`--version` of both commands)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("blkfs-migrator")
    except PackageNotFoundError:  # (run from a checkout without pip install)
        return __version__
