"""Exception types for errors a user can cause. Messages say what to do."""


class FastSAM3DError(Exception):
    """Base class of every error this package raises on purpose."""


class CheckpointError(FastSAM3DError, ValueError):
    """A weights file is missing, unreadable, unsafe or does not fit the model."""


class InputError(FastSAM3DError, ValueError):
    """An image, a click or a prompt file cannot be used as given."""


class GeometryError(InputError):
    """A volume's shape or affine cannot be mapped to the model grid."""


class SessionError(FastSAM3DError, RuntimeError):
    """An interactive-session call came in the wrong order or state."""
