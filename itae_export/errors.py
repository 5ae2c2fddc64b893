"""Typed errors. The library raises these; the CLI turns them into one-line messages."""


class ITAEError(Exception):
    """Base class of every error this package raises on purpose."""


class UnknownModelError(ITAEError, KeyError):
    """A model name that the registry does not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(ITAEError):
    """A checkpoint that cannot be read, or whose keys or shapes do not fit the model."""


class DownloadError(ITAEError):
    """Official weights could not be fetched (offline, or the hub refused)."""


class ToleranceError(ITAEError):
    """An exported or optimized graph disagrees with the PyTorch reference."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


class InputError(ITAEError):
    """Bad user input: an option value, a folder, an image set."""


class OptionError(InputError):
    """A bad option value or combination (``--flag: ...``): the CLI exits with the usage code, 2."""


class OutputError(ITAEError):
    """An output that cannot be written: a full disk, a read-only filesystem, a path under a file."""


class MissingDependencyError(ITAEError):
    """An optional extra (pyarrow, faiss, ray) that the asked-for feature needs is not installed."""
