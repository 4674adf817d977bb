"""The error every checkpoint reader raises (the TensorFlow bundle reader, the model loaders,
training checkpoints): one class, so callers and launch.py's user errors catch them all."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (missing, corrupt, truncated, of an unsupported kind) or
    does not fit the model."""
