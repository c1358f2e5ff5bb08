"""The exceptions rwkv-chat raises for bad input. Each message names the file or value at fault."""


class RWKVChatError(Exception):
    """Base class of every error rwkv-chat raises on purpose."""


class ModelLoadError(RWKVChatError, ValueError):
    """A checkpoint or state file could not be used: missing, unreadable, malformed or unsupported."""


class StrategyError(RWKVChatError, ValueError):
    """A strategy string is malformed or asks for something this build cannot do."""


class DeviceUnavailableError(StrategyError):
    """A strategy segment names a device that is not present (no CUDA, no MPS, no DirectML)."""


class StateMismatchError(RWKVChatError, ValueError):
    """A recurrent state (or state file, or snapshot) belongs to a model of another shape."""


class SnapshotError(RWKVChatError, ValueError):
    """A saved conversation could not be read or written."""


class FileWriteError(RWKVChatError, OSError):
    """A file could not be written (read-only folder, full disk, no permission); the message names
    the file and the system's reason. An OSError too, so `except OSError` still catches it."""


class NotARegularFileError(ModelLoadError):
    """A path names a FIFO, device, socket or folder where a file was expected (opening it could
    block forever or read endless data)."""


class StoreError(RWKVChatError):
    """The conversation history could not be read or written (read-only folder, full disk,
    damaged or missing file)."""


class TokenError(RWKVChatError, ValueError):
    """Token ids that are not integers inside the model's vocabulary."""


class SamplingError(RWKVChatError, ValueError):
    """Sampling settings out of range, or logits that cannot be sampled from (NaN, +inf, all banned)."""


class TextEncodingError(TokenError, UnicodeEncodeError):
    """Text that cannot be encoded as UTF-8 (a lone surrogate). A UnicodeEncodeError too, as the
    `rwkv` package raises for it."""

    def __init__(self, error: UnicodeEncodeError) -> None:
        super().__init__(error.encoding, error.object, error.start, error.end, error.reason)
        self.message = (f"text cannot be encoded: {error.reason} "
                        f"({error.object[error.start:error.end]!r} at position {error.start})")

    def __str__(self) -> str:
        return self.message


class ModelPathError(ModelLoadError, TypeError):
    """A model or state file named by something that is not a path (None, a number): a TypeError
    too, as Python raises for an argument of the wrong type."""
