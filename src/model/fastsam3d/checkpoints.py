"""Weights: the registry of released files, downloads, safe loading, conversion.

Loading never executes pickled code: ``.pth`` files are read with ``torch.load(weights_only=True)``
and only the plain globals of :data:`ALLOWED_GLOBALS` are allow-listed; files this project writes
are safetensors. Architecture is inferred from tensor shapes (see :func:`infer_config`).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import platformdirs
import torch

from .errors import CheckpointError
from .modeling.configs import ModelConfig, build_model
from .modeling.sam3d import Sam3D

logger = logging.getLogger(__name__)

CACHE_ENV = "FASTSAM3D_CACHE"
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class WeightsEntry:
    """A released weights file: where it comes from and what it holds."""

    name: str
    url: str
    filename: str
    size_mb: int
    sha256: str | None
    licence: str
    origin: str


REGISTRY: dict[str, WeightsEntry] = {
    "fastsam3d": WeightsEntry(
        name="fastsam3d",
        url="https://huggingface.co/techlove/FastSAM3D/resolve/main/FastSAM3D.pth",
        filename="FastSAM3D.pth",
        size_mb=638,
        sha256=None,
        licence="Apache-2.0 (arcadelab/FastSAM3D)",
        origin="FastSAM3D (Shen et al., MICCAI 2024): 6-block distilled student (training file)",
    ),
    "sam-med3d-turbo": WeightsEntry(
        name="sam-med3d-turbo",
        url="https://huggingface.co/blueyo0/SAM-Med3D/resolve/main/sam_med3d_turbo.pth",
        filename="sam_med3d_turbo.pth",
        size_mb=402,
        sha256=None,
        licence="Apache-2.0 (uni-medical/SAM-Med3D)",
        origin="SAM-Med3D turbo (Wang et al.): 12-block ViT-B teacher",
    ),
}


def _numpy_globals() -> list:
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtypes = [type(np.dtype(t)) for t in (np.float32, np.float64, np.int64, np.int32, np.bool_)]
    return [scalar, np.dtype, *dtypes]


# Plain data types that training checkpoints hold besides tensors (FastSAM3D.pth: args,
# scheduler counters, device, numpy loss values). Nothing here runs code when unpickled.
ALLOWED_GLOBALS = [argparse.Namespace, collections.Counter, collections.OrderedDict, torch.device]


def cache_dir() -> Path:
    """Where downloaded weights live: ``$FASTSAM3D_CACHE`` or the user cache folder."""
    return Path(os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("fastsam3d"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _CallbackProgress:
    """The progress-bar protocol pooch expects, forwarded to ``callback(done, total)``."""

    def __init__(self, callback: ProgressCallback) -> None:
        self.callback, self.total, self.done = callback, 0, 0

    def update(self, n: int) -> None:
        self.done += n
        self.callback(self.done, self.total)

    def reset(self) -> None:
        self.done = 0

    def close(self) -> None:
        self.callback(self.done, self.total)


def _recorded_hashes_path() -> Path:
    return cache_dir() / "sha256.json"


def _record_hash(filename: str, digest: str) -> None:
    path = _recorded_hashes_path()
    hashes = json.loads(path.read_text()) if path.exists() else {}
    hashes[filename] = digest
    path.write_text(json.dumps(hashes, indent=1, sort_keys=True))


def fetch_weights(name: str, progress: ProgressCallback | bool = True) -> Path:
    """The local path of registered weights, downloading them into :func:`cache_dir` if needed.

    The download goes to ``<file>.part`` and is renamed once complete and verified (SHA-256
    when pinned; an unpinned file's hash is recorded in ``sha256.json`` beside it).

    Args:
        name: a key of :data:`REGISTRY`.
        progress: True for a console bar, False for none, or ``callback(done_bytes, total)``.

    Raises:
        CheckpointError: unknown name, or the download failed (the message says where to put
            the file by hand).
    """
    if name not in REGISTRY:
        raise CheckpointError(f"unknown weights {name!r}; registered: {sorted(REGISTRY)}")
    entry = REGISTRY[name]
    target = cache_dir() / entry.filename
    if target.exists():
        return target
    import pooch

    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    bar = _CallbackProgress(progress) if callable(progress) else progress
    logger.info("downloading %s (%d MB) from %s", entry.filename, entry.size_mb, entry.url)
    try:
        pooch.HTTPDownloader(progressbar=bar, timeout=60)(entry.url, str(part), None)
    except Exception as err:
        part.unlink(missing_ok=True)
        raise CheckpointError(
            f"could not download {entry.filename} from {entry.url} ({err}). Without internet, "
            f"download it elsewhere and copy it to {target} (or set ${CACHE_ENV} to the folder "
            "holding it), or load a local file by path."
        ) from err
    digest = _sha256(part)
    if entry.sha256 is not None and digest != entry.sha256:
        part.unlink()
        raise CheckpointError(
            f"{entry.filename} from {entry.url} has SHA-256 {digest}, expected {entry.sha256}; "
            "the download is corrupt or the file changed upstream. Try again."
        )
    os.replace(part, target)
    _record_hash(entry.filename, digest)
    return target


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint safely, without wrappers.

    Accepts ``.safetensors``, raw state dicts and training checkpoints
    (``{'model_state_dict': ...}`` with optimizer state, ``argparse.Namespace`` etc.).

    Raises:
        CheckpointError: missing, truncated, unsafe (pickled code) or tensor-free files.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from err
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS + _numpy_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refused to load {path}: it contains objects outside the allow-list of plain types "
            f"and loading them could run code. Details: {str(err).splitlines()[0]}"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(
            f"{path} is truncated or not a PyTorch checkpoint ({err}); download it again"
        ) from err
    return clean_state_dict(obj, source=str(path))


_WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")


def clean_state_dict(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Unwrap training checkpoints and strip ``module.`` / ``_orig_mod.`` prefixes."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise CheckpointError(f"{source} holds no model weights (keys: {sorted(obj)[:10]})")
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict")
    state = {}
    for key, value in obj.items():
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        if isinstance(value, torch.Tensor):
            state[key] = value
    return state


def is_encoder_only(state: dict[str, torch.Tensor]) -> bool:
    """True for distillation outputs whose keys lack the ``image_encoder.`` prefix."""
    return (
        "patch_embed.proj.weight" in state and "image_encoder.patch_embed.proj.weight" not in state
    )


DEFAULT_MODEL = "default"
BUNDLED_WEIGHTS = Path(__file__).parent / "weights" / "default.safetensors"


def _resolve_path(source: str | os.PathLike, progress: ProgressCallback | bool) -> Path:
    if source == DEFAULT_MODEL:
        if not BUNDLED_WEIGHTS.is_file():
            raise CheckpointError(
                f"the bundled default weights are missing from this installation "
                f"({BUNDLED_WEIGHTS}); reinstall the package or load a registered model / file"
            )
        return BUNDLED_WEIGHTS
    if isinstance(source, str) and source in REGISTRY:
        return fetch_weights(source, progress)
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"{source!r} is neither a registered model ({', '.join(sorted(REGISTRY))}), "
            f"the bundled {DEFAULT_MODEL!r} model, nor an existing file"
        )
    return path


def _complete_encoder_only(
    state: dict[str, torch.Tensor], decoder: str | os.PathLike | None, progress
) -> dict[str, torch.Tensor]:
    """Prefix an encoder-only state dict and add a prompt encoder / decoder from ``decoder``."""
    donor_source = decoder if decoder is not None else "fastsam3d"
    donor = read_checkpoint(_resolve_path(donor_source, progress))
    if is_encoder_only(donor):
        raise CheckpointError(f"{donor_source} holds no prompt encoder / mask decoder")
    full = {f"image_encoder.{k}": v for k, v in state.items()}
    full.update({k: v for k, v in donor.items() if not k.startswith("image_encoder.")})
    return full


def load_state(model: Sam3D, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that names every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{source} does not fit the model: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]}, shape mismatches {shapes[:8]}"
            + (" (lists truncated)" if max(len(missing), len(unexpected), len(shapes)) > 8 else "")
        )
    model.load_state_dict(state, strict=True)


def stored_config(path: Path) -> ModelConfig | None:
    """The config a safetensors file of ours carries in its metadata (None if absent)."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            text = (handle.metadata() or {}).get("config")
        return ModelConfig.from_json(text) if text else None
    except Exception as err:
        raise CheckpointError(f"{path} has an unreadable config in its metadata ({err})") from err


def _weights_id(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def load_model(
    source: str | os.PathLike,
    device: str | torch.device = "cpu",
    block_style: str | None = None,
    decoder: str | os.PathLike | None = None,
    progress: ProgressCallback | bool = True,
) -> Sam3D:
    """Build a :class:`Sam3D` whose architecture fits the weights, and load them.

    Args:
        source: ``"default"`` (the weights shipped in the package, see
            ``weights/MODEL_CARD.md``), a registry name (:data:`REGISTRY`, downloaded on first
            use) or a path to a ``.pth`` / ``.pt`` / ``.safetensors`` file (raw state dict,
            training checkpoint, or encoder-only distillation output).
        device: where the model goes.
        block_style: "fastsam3d" or "sam_med3d"; None takes the config stored in a
            safetensors file written by this project, else infers it (:func:`infer_config`).
        decoder: for encoder-only files, where the prompt encoder and decoder come from
            (registry name or path); default the released FastSAM3D.
        progress: download progress (see :func:`fetch_weights`).

    Returns:
        The model in eval mode on ``device``.

    Raises:
        CheckpointError: the file cannot be found, read safely, or fitted to a model.
    """
    from .modeling.configs import infer_config

    path = _resolve_path(source, progress)
    state = read_checkpoint(path)
    if is_encoder_only(state):
        state = _complete_encoder_only(state, decoder, progress)
    config = stored_config(path) if block_style is None else None
    try:
        config = config or infer_config(state, block_style)
    except (KeyError, ValueError, IndexError) as err:
        raise CheckpointError(f"{path} is not a FastSAM3D / SAM-Med3D checkpoint ({err})") from err
    if isinstance(source, str) and source in REGISTRY:
        config = config.replace(name=source)
    model = build_model(config)
    load_state(model, state, str(path))
    model.weights_id = _weights_id(path)
    return model.eval().to(device)


def convert_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, block_style: str | None = None
) -> Path:
    """Write any loadable checkpoint as a weights-only ``.safetensors`` file with its config."""
    from safetensors.torch import save_file

    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"the output must end in .safetensors, got {dst.name}")
    model = load_model(src, block_style=block_style, progress=False)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(dst), metadata={"config": model.config.to_json()})
    return dst
