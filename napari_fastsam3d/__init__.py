"""napari plugin for FastSAM3D interactive 3D segmentation (UI only; the engine is ``fastsam3d``).

Every contribution is wired through ``napari.yaml``; importing this package imports neither torch
nor Qt.
"""

__version__ = "0.1.0"
