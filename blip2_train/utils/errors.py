"""Errors that the CLI turns into one readable line instead of a stack trace."""


class Blip2TrainError(Exception):
    """Base class: the message alone tells the user what to fix."""


class ConfigError(Blip2TrainError):
    """A configuration key is unknown, missing, or of the wrong type."""


class DataError(Blip2TrainError):
    """Input data is unusable; the message names the file, the sample and the field."""


class CheckpointError(Blip2TrainError):
    """A checkpoint is missing, of the wrong kind, or does not match the model."""


class ResumeShapeError(ConfigError):
    """A mid-epoch resume whose data loader (world size, workers, batch size, sources) is not the checkpoint's."""
