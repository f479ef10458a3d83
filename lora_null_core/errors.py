"""Errors a user can act on: each message names the offending value and the fix."""


class LoraNullError(Exception):
    """Base class for every error lora-null raises on purpose."""


class CalibrationDataError(LoraNullError):
    """The calibration source is missing, empty, or has no usable text."""


class OwnTextUnavailableError(LoraNullError):
    """The model's own text cannot be drawn here (weights missing, or the model too large for the free GPU memory).
    `cause` is the reason without the fix, so a caller that draws it for its own purpose (a top-up) names its own."""

    def __init__(self, cause: str, fix: str):
        super().__init__(f"{cause}: {fix}")
        self.cause = cause


class InsufficientCalibrationError(LoraNullError):
    """Too few calibration tokens to estimate a layer's input covariance."""


class NonFiniteActivationsError(LoraNullError):
    """A layer's inputs contain NaN or Inf, so its covariance is meaningless."""


class InvalidRankError(LoraNullError):
    """The LoRA rank leaves no room for a null space in some layer."""


class NoTargetModulesError(LoraNullError):
    """No module of the model matches the requested target modules."""


class UnsupportedModelError(LoraNullError):
    """The model or adapter cannot be rewritten (quantized base, DoRA, unknown layer type)."""


class OutputExistsError(LoraNullError):
    """The output path is already there and overwriting was not asked for."""


class ExportError(LoraNullError):
    """A trained adapter does not match the initialization it claims to come from."""


class ConfigError(LoraNullError, ValueError):
    """A LoraNullConfig or LoraConfig field has a value outside what it accepts (a ValueError too, so framework
    validators such as pydantic report it as theirs)."""


class FunctionNotPreservedError(LoraNullError):
    """After initialization the model no longer computes what it did: nothing is saved."""
