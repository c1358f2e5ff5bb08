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


class TokenError(RWKVChatError, ValueError):
    """Token ids that are not integers inside the model's vocabulary."""


class SamplingError(RWKVChatError, ValueError):
    """Logits that cannot be sampled from (NaN or infinite values)."""
