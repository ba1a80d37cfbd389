"""Model configurations: the only module that knows architectures and builds the module tree."""

import dataclasses
import json
from dataclasses import dataclass

from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D
from .sam3d import Sam3D
from .transformer import TwoWayTransformer3D


@dataclass(frozen=True)
class ModelConfig:
    """Every dimension of a :class:`Sam3D`.

    ``global_attn_indexes`` are absolute block indices; with ``window_size == 0`` every attention
    block is global. ``attention_free_blocks`` leading blocks have no attention (FastSAM3D).
    ``intensity_clip`` (low, high) clips intensities before z-normalisation (None: no clip).
    ``sparse_attention`` ((segment, dilation), ...) switches global blocks to the paper's
    sparse dilated attention (weights are shared with dense, so any checkpoint loads).
    """

    name: str = "custom"
    image_size: int = 128
    patch_size: int = 16
    in_chans: int = 1
    embed_dim: int = 768
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    attention_free_blocks: int = 2
    window_size: int = 0
    global_attn_indexes: tuple[int, ...] = ()
    block_style: str = "fastsam3d"
    prompt_dim: int = 384
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3
    intensity_clip: tuple[float, float] | None = None
    sparse_attention: tuple[tuple[int, int], ...] = ()

    @property
    def grid_size(self) -> int:
        """Token grid side (image_size // patch_size)."""
        return self.image_size // self.patch_size

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        """JSON text of every field (stored in the metadata of the safetensors we write)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        """Inverse of :meth:`to_json` (JSON lists become tuples again)."""
        return cls(**{k: _tuples(v) for k, v in json.loads(text).items()})


def _tuples(value):
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    return value


CONFIGS: dict[str, ModelConfig] = {
    # The released student (FastSAM3D.pth): ViT-B width, 6 blocks, 6 heads, 2 attention-free.
    "fastsam3d": ModelConfig(name="fastsam3d"),
    # The teacher (sam_med3d_turbo.pth): ViT-B, 12 heads, window 14, global blocks 2, 5, 8, 11.
    "sam-med3d-turbo": ModelConfig(
        name="sam-med3d-turbo",
        depth=12,
        num_heads=12,
        attention_free_blocks=0,
        window_size=14,
        global_attn_indexes=(2, 5, 8, 11),
        block_style="sam_med3d",
    ),
    # A narrower student for CPU-interactive use (the bundled default model's architecture).
    "fastsam3d-lite": ModelConfig(
        name="fastsam3d-lite",
        embed_dim=256,
        num_heads=4,
        prompt_dim=192,
        decoder_mlp_dim=1024,
    ),
    # Teacher for distilling fastsam3d-lite: the turbo teacher's structure (12 blocks, window
    # 14, global blocks 2, 5, 8, 11, SAM-Med3D wiring) at the lite width; same decoder shapes as
    # the lite student, so distillation copies it.
    "fastsam3d-lite-teacher": ModelConfig(
        name="fastsam3d-lite-teacher",
        embed_dim=256,
        depth=12,
        num_heads=4,
        attention_free_blocks=0,
        window_size=14,
        global_attn_indexes=(2, 5, 8, 11),
        block_style="sam_med3d",
        prompt_dim=192,
        decoder_mlp_dim=1024,
    ),
    # A small random-weight model for UI and engine tests.
    "tiny": ModelConfig(
        name="tiny",
        embed_dim=48,
        depth=2,
        num_heads=2,
        attention_free_blocks=1,
        prompt_dim=48,
        decoder_mlp_dim=96,
        iou_head_hidden_dim=32,
    ),
}


def get_config(name: str) -> ModelConfig:
    """The registered configuration called ``name``."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise KeyError(f"unknown model config {name!r}; known: {sorted(CONFIGS)}") from None


def build_model(config: ModelConfig | str) -> Sam3D:
    """Build a randomly initialised :class:`Sam3D` for ``config`` (or a registered name)."""
    if isinstance(config, str):
        config = get_config(config)
    grid = config.grid_size
    encoder = ImageEncoderViT3D(
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        out_chans=config.prompt_dim,
        attention_free_blocks=config.attention_free_blocks,
        window_size=config.window_size,
        global_attn_indexes=config.global_attn_indexes,
        block_style=config.block_style,
        sparse_attention=config.sparse_attention,
    )
    prompt_encoder = PromptEncoder3D(
        embed_dim=config.prompt_dim,
        image_embedding_size=(grid, grid, grid),
        input_image_size=(config.image_size,) * 3,
        mask_in_chans=config.mask_in_chans,
    )
    transformer = TwoWayTransformer3D(
        depth=config.decoder_depth,
        embedding_dim=config.prompt_dim,
        num_heads=config.decoder_heads,
        mlp_dim=config.decoder_mlp_dim,
    )
    decoder = MaskDecoder3D(
        transformer_dim=config.prompt_dim,
        transformer=transformer,
        num_multimask_outputs=config.num_multimask_outputs,
        iou_head_depth=config.iou_head_depth,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
    )
    return Sam3D(encoder, prompt_encoder, decoder, config=config)


def _count_indexed(state: dict, prefix: str) -> int:
    """1 + the largest N of keys ``{prefix}{N}.*`` (0 if none)."""
    indices = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def _infer_attention(state: dict, depth: int, embed_dim: int, grid: int) -> dict:
    """Attention-free prefix, heads and window layout from the blocks' tensors."""
    enc = "image_encoder.blocks."
    attention = [f"{enc}{i}.attn.qkv.weight" in state for i in range(depth)]
    free = attention.index(True) if any(attention) else depth
    if not all(attention[free:]):
        raise ValueError("attention-free blocks must all come before the attention blocks")
    lengths = {i: state[f"{enc}{i}.attn.rel_pos_d"].shape for i in range(free, depth)}
    heads = {embed_dim // shape[1] for shape in lengths.values()} or {1}
    if len(heads) != 1:
        raise ValueError(f"blocks disagree on the number of heads: {sorted(heads)}")
    windows = {i: (shape[0] + 1) // 2 for i, shape in lengths.items()}
    local = {w for w in windows.values() if w != grid}
    if len(local) > 1:
        raise ValueError(f"several window sizes in one encoder are not supported: {sorted(local)}")
    window = local.pop() if local else 0
    global_idx = tuple(i for i, w in windows.items() if w == grid) if window else ()
    return dict(
        attention_free_blocks=free,
        num_heads=heads.pop(),
        window_size=window,
        global_attn_indexes=global_idx,
    )


def infer_config(state: dict, block_style: str | None = None) -> ModelConfig:
    """The :class:`ModelConfig` whose module tree has exactly the shapes of ``state``.

    ``state`` uses the official full-model keys (``image_encoder.*``, ``prompt_encoder.*``,
    ``mask_decoder.*``). Heads are read from the rel-pos width, windows from the rel-pos
    length (2 * window - 1). ``block_style`` None means "fastsam3d" when any block is
    attention-free, else "sam_med3d". The decoder's head count is not stored in the weights;
    the official 8 is used. A registered config with the same shapes keeps its name.

    Raises:
        ValueError: tensors that no configuration produces.
    """
    pos = state["image_encoder.pos_embed"]
    patch = state["image_encoder.patch_embed.proj.weight"]
    grid, embed_dim = pos.shape[1], pos.shape[-1]
    depth = _count_indexed(state, "image_encoder.blocks.")
    layout = _infer_attention(state, depth, embed_dim, grid)
    if block_style is None:
        block_style = "fastsam3d" if layout["attention_free_blocks"] else "sam_med3d"
    dec = "mask_decoder."
    config = ModelConfig(
        image_size=grid * patch.shape[2],
        patch_size=patch.shape[2],
        in_chans=patch.shape[1],
        embed_dim=embed_dim,
        depth=depth,
        mlp_ratio=state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0] / embed_dim,
        block_style=block_style,
        prompt_dim=state["image_encoder.neck.0.weight"].shape[0],
        mask_in_chans=state["prompt_encoder.mask_downscaling.3.weight"].shape[0],
        decoder_depth=_count_indexed(state, f"{dec}transformer.layers."),
        decoder_mlp_dim=state[f"{dec}transformer.layers.0.mlp.lin1.weight"].shape[0],
        iou_head_depth=_count_indexed(state, f"{dec}iou_prediction_head.layers."),
        iou_head_hidden_dim=state[f"{dec}iou_prediction_head.layers.0.weight"].shape[0],
        num_multimask_outputs=state[f"{dec}mask_tokens.weight"].shape[0] - 1,
        **layout,
    )
    for registered in CONFIGS.values():
        if (
            config.replace(name=registered.name, intensity_clip=registered.intensity_clip)
            == registered
        ):
            return registered
    return config
