"""FastSAM3D / SAM-Med3D interactive 3D segmentation core (torch + numpy, no Qt).

Public API: :func:`load_model`, :func:`build_model`, :class:`ModelConfig`, :class:`Volume`,
:class:`Session`. Names are resolved lazily so that ``import fastsam3d`` stays light.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "fastsam3d.checkpoints",
    "build_model": "fastsam3d.modeling.configs",
    "ModelConfig": "fastsam3d.modeling.configs",
    "Sam3D": "fastsam3d.modeling.sam3d",
    "Volume": "fastsam3d.geometry",
    "Session": "fastsam3d.session",
    "FastSAM3DError": "fastsam3d.errors",
    "CheckpointError": "fastsam3d.errors",
    "InputError": "fastsam3d.errors",
    "GeometryError": "fastsam3d.errors",
    "SessionError": "fastsam3d.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fastsam3d' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
