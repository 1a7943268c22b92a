"""Errors robuq_fx raises. Each message names the layer / file / key at fault and what was expected."""


class RobuQError(ValueError):
    """Base class: bad input to robuq_fx (a ValueError, so generic handlers still catch it)."""


class SpecError(RobuQError):
    """A layer spec or policy rule holds a value robuq_fx cannot use."""


class PolicyError(RobuQError):
    """A policy is malformed or does not fit the model."""


class CaptureError(RobuQError):
    """The model could not be captured as an FX graph."""


class LoweringError(RobuQError):
    """`lower()` was given something it cannot lower."""


class CheckpointError(RobuQError):
    """A packed checkpoint is corrupt, of an unknown version, or does not match the model."""


class BackendError(RobuQError):
    """The robuq torch.compile backend cannot quantize a layer the policy matches, or was configured wrongly."""
