"""Session: ROI choice and embedding cache, prompts fed to the decoder, large objects,
undo/redo/commit/reset, prompts JSON, precompute, bad clicks, the real CT and the tiny model."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import fastsam3d
from fastsam3d import InputError, Session, SessionError, Volume, walker_field, zoom
from fastsam3d.cache import EmbeddingCache
from fastsam3d.predictor import resolve_device
from fastsam3d.refine import RefineSettings, click_seeds
from fastsam3d.roi import tile_origins
from fastsam3d.session import SessionSettings
from fastsam3d.stand_in import ThresholdModel
from fastsam3d.state import Click
from fastsam3d.walker_field import solve_walker_field

DATA = Path(__file__).parent / "data"


class Recorder(ThresholdModel):
    """The stand-in, keeping each decode's inputs and low-res output and each encoder input."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.decodes: list[dict] = []
        self.inputs: list[tuple] = []

    def encode(self, x):
        self.inputs.append(tuple(x.shape))
        return super().encode(x)

    def decode(self, embedding, points, labels, mask_input=None, multimask_output=False):
        out = super().decode(embedding, points, labels, mask_input, multimask_output)
        self.decodes.append(
            {
                "points": points[0].cpu().numpy().copy(),
                "labels": labels[0].cpu().numpy().copy(),
                "mask_input": None if mask_input is None else mask_input[0, 0].cpu().numpy() + 0,
                "low": out[0][0, 0].cpu().numpy().copy(),
            }
        )
        return out


def _balls(shape=(70, 64, 60), spacing=(2.0, 2.0, 2.0), balls=((30, 30, 28, 9),)):
    """A volume with bright balls (voxel centre i, j, k and radius in voxels) on 0."""
    grid = np.indices(shape, dtype=np.float32)
    array = np.zeros(shape, np.int16)
    truths = []
    for *centre, radius in balls:
        dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
        truths.append(dist < radius)
        array[truths[-1]] = 100
    return Volume(array, np.diag([*spacing, 1.0])), truths


def _session(volume, model=None, device="cpu", **settings):
    """A session on the coarse grid only, unless the test asks for ``fine_spacing``."""
    settings.setdefault("fine_spacing", None)
    return Session(
        model or Recorder(),
        volume,
        device,
        cache=EmbeddingCache(),
        settings=SessionSettings(**settings),
    )


def _dice(a, b) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _encodes(model) -> int:
    return sum(1 for name, _ in model.calls if name == "encode")


# ---------------------------------------------------------------- clicks, ROI, cache


def test_first_click_centres_roi_and_returns_mask():
    volume, (truth,) = _balls()
    model = Recorder()
    session = _session(volume, model)
    mask = session.add_point((30, 30, 28))
    assert mask.dtype == bool and mask.shape == volume.shape
    assert _dice(mask, truth) > 0.95
    grid_point = volume.model_grid().source_to_grid([30, 30, 28])
    assert np.all(np.abs(session.roi.centre - grid_point) <= 2)
    first = model.decodes[0]
    assert first["mask_input"] is None  # the official first click: zero mask
    assert model.inputs == [(1, 1, 128, 128, 128)]


def test_encoder_runs_once_per_roi_and_previous_logits_are_fed_back():
    volume, _ = _balls()
    model = Recorder()
    session = _session(volume, model)
    session.add_point((30, 30, 28))
    roi = session.roi
    update = session.add_point_result((33, 29, 27))
    assert session.roi == roi and update.encoded == 0 and _encodes(model) == 1
    np.testing.assert_array_equal(model.decodes[1]["mask_input"], model.decodes[0]["low"])
    # another session on the same volume and model reuses the cache
    other = _session(volume, model)
    other._predictor.cache = session._predictor.cache
    assert other.add_point_result((30, 30, 28)).encoded == 0


def test_roi_moves_for_clicks_outside_or_near_its_border():
    volume, _ = _balls(shape=(160, 70, 60), balls=((30, 30, 28, 9), (130, 35, 30, 8)))
    model = Recorder()
    session = _session(volume, model, max_extra_rois=0)
    session.add_point((30, 30, 28))
    roi = session.roi
    # 10 voxels (1.5 mm grid) inside the upper x border: stays
    grid = volume.model_grid()
    inner = grid.grid_to_source([roi.origin[0] + 127 - 10, *grid.source_to_grid([0, 30, 28])[1:]])
    session.add_point(tuple(inner))
    assert session.roi == roi
    # 5 voxels from the border: moves (and re-centres)
    near = grid.grid_to_source([roi.origin[0] + 127 - 5, *grid.source_to_grid([0, 30, 28])[1:]])
    session.add_point(tuple(near), positive=False)
    assert session.roi != roi
    assert np.all(np.abs(session.roi.centre - grid.source_to_grid(near)) <= 2)
    # far outside: moves again
    session.add_point((130, 35, 30))
    assert session.roi.contains(grid.source_to_grid([130, 35, 30]))
    assert _encodes(model) == 3


@pytest.mark.parametrize("policy,expected", [("newest", [1, 1, 1]), ("all", [1, 2, 3])])
def test_point_policy(policy, expected):
    volume, _ = _balls()
    model = Recorder()
    session = _session(volume, model, point_policy=policy)
    for point, positive in [((30, 30, 28), True), ((31, 30, 28), False), ((29, 31, 27), True)]:
        session.add_point(point, positive)
    assert [len(d["points"]) for d in model.decodes] == expected
    assert model.decodes[-1]["labels"].tolist() == ([1] if policy == "newest" else [1, 0, 1])
    assert model.decodes[-1]["points"].dtype == np.float32


def test_update_box_holds_every_change_and_labels_are_untouched():
    volume, _ = _balls(shape=(150, 80, 60), balls=((30, 30, 28, 9), (120, 40, 30, 8)))
    session = _session(volume, max_extra_rois=0)
    session.add_point((30, 30, 28))
    before = session.mask.copy()
    update = session.add_point_result((120, 40, 30))
    changed = np.argwhere(before != session.mask)
    assert len(changed)
    lo = np.array([s.start for s in update.box])
    hi = np.array([s.stop for s in update.box])
    assert np.all(changed >= lo) and np.all(changed < hi)
    np.testing.assert_array_equal(update.mask, session.mask[update.box])
    assert not update.labels_changed and not session.labels.any()


# ---------------------------------------------------------------- objects larger than one ROI


def _tube():
    """A 400 mm long tube (like an aorta) in a 2 x 2 x 3 mm volume: about 2 ROIs long."""
    shape, spacing = (50, 50, 150), (2.0, 2.0, 3.0)
    i, j, k = np.indices(shape)
    truth = ((i - 25) ** 2 + (j - 22) ** 2 < 36) & (k > 8) & (k < 141)
    return Volume(np.where(truth, 100, 0).astype(np.int16), np.diag([*spacing, 1])), truth


def test_large_object_continues_into_neighbouring_rois():
    volume, truth = _tube()
    single = _session(volume, max_extra_rois=0)
    partial = single.add_point((25, 22, 75))
    assert _dice(partial, truth) < 0.8
    session = _session(volume)
    update = session.add_point_result((25, 22, 75))
    assert len(update.rois) >= 3 and update.encoded == len(update.rois)
    assert _dice(session.mask, truth) > 0.95
    ks = np.nonzero(session.mask.any(axis=(0, 1)))[0]
    assert ks[0] == 9 and ks[-1] == 140


def test_continuation_is_bounded_and_seeded_with_the_mask():
    volume, truth = _tube()
    model = Recorder()
    session = _session(volume, model, max_extra_rois=1)
    update = session.add_point_result((25, 22, 75))
    assert len(update.rois) == 2
    seeded = model.decodes[1]
    assert seeded["mask_input"] is not None and (seeded["mask_input"] > 0).any()
    assert seeded["labels"].tolist() == [1]


def test_liver_from_real_labels_comes_out_whole():
    """The real TotalSegmentator liver (195 x 186 x 90 mm) through geometry + continuation."""
    seg = nib.load(DATA / "example_seg.nii.gz")
    liver = np.asarray(seg.dataobj) == 5
    volume = Volume(np.where(liver, 100, 0).astype(np.int16), seg.affine)
    session = _session(volume)
    click = tuple(int(v) for v in np.argwhere(liver)[len(np.argwhere(liver)) // 2])
    update = session.add_point_result(click)
    assert len(update.rois) >= 2
    assert _dice(session.mask, liver) > 0.9


# ---------------------------------------------------------------- undo, redo, reset, commit


def test_undo_redo_many_levels():
    volume, (a, b) = _balls(balls=((20, 20, 20, 6), (45, 40, 38, 6)))
    session = _session(volume)
    states = [session.mask.copy()]
    for point, positive in [((20, 20, 20), True), ((45, 40, 38), True), ((20, 20, 20), False)]:
        states.append(session.add_point(point, positive))
    assert states[2].sum() > states[1].sum() > 0 and states[3].sum() < states[2].sum()
    np.testing.assert_array_equal(session.undo(), states[2])
    np.testing.assert_array_equal(session.undo(), states[1])
    np.testing.assert_array_equal(session.undo(), states[0])
    with pytest.raises(SessionError, match="nothing to undo"):
        session.undo()
    np.testing.assert_array_equal(session.redo(), states[1])
    np.testing.assert_array_equal(session.redo(), states[2])
    assert len(session.clicks) == 2
    session.add_point((45, 40, 38), positive=False)
    with pytest.raises(SessionError, match="nothing to redo"):
        session.redo()


def test_undo_redo_of_clicks_that_span_several_rois():
    volume, _ = _tube()
    session = _session(volume)
    first = session.add_point((25, 22, 75))
    assert len(session.last_update.rois) >= 3
    second = session.add_point((25, 22, 20), positive=False)
    assert second.sum() < first.sum()
    np.testing.assert_array_equal(session.undo(), first)
    np.testing.assert_array_equal(session.undo(), np.zeros_like(first))
    np.testing.assert_array_equal(session.redo(), first)
    np.testing.assert_array_equal(session.redo(), second)
    np.testing.assert_array_equal(session.undo(), first)
    third = session.add_point((25, 22, 75))  # same state and ROIs: same result
    np.testing.assert_array_equal(third, first)


def test_commit_keeps_objects_and_preserves_them_unless_asked():
    volume, (a, b) = _balls(balls=((20, 20, 20, 6), (45, 40, 38, 6)))
    session = _session(volume)
    session.add_point((20, 20, 20))
    assert session.commit() == 1
    assert not session.mask.any() and not session.clicks
    assert session.last_update.labels_changed and session.last_update.label == 1
    session.add_point((45, 40, 38))
    assert session.commit() == 2
    labels = session.labels
    assert labels.dtype == np.uint16 and labels.shape == volume.shape
    assert _dice(labels == 1, a) > 0.85 and _dice(labels == 2, b) > 0.85
    # an object covering both: earlier objects are preserved unless overwrite=True
    every_part = SessionSettings(refine=RefineSettings(clicked_parts_only=False))
    merged = Session(
        Recorder(connected=False),
        volume,
        cache=EmbeddingCache(),
        labels=labels,
        settings=every_part,
    )
    before = labels.copy()
    mask = merged.add_point((20, 20, 20))
    assert (mask & (before == 1)).any() and (mask & (before == 2)).any()
    assert merged.commit() == 3
    np.testing.assert_array_equal(labels[before != 0], before[before != 0])
    assert np.all(labels[mask & (before == 0)] == 3)
    before = labels.copy()
    mask = merged.add_point((20, 20, 20))
    assert merged.commit(overwrite=True) == 4
    assert np.all(labels[mask] == 4)
    np.testing.assert_array_equal(labels[~mask], before[~mask])
    with pytest.raises(SessionError, match="empty"):
        merged.commit()


def test_reset_clears_current_object_only():
    volume, _ = _balls(balls=((20, 20, 20, 6), (45, 40, 38, 6)))
    session = _session(volume)
    session.add_point((20, 20, 20))
    session.commit()
    session.add_point((45, 40, 38))
    update = session.reset()
    assert not session.mask.any() and not session.clicks and not update.empty
    assert session.labels.any()
    with pytest.raises(SessionError):
        session.undo()


def test_labels_passed_in_are_written_in_place():
    volume, _ = _balls()
    labels = np.zeros(volume.shape, np.int32)
    labels[0, 0, 0] = 7
    session = Session(Recorder(), volume, cache=EmbeddingCache(), labels=labels)
    session.add_point((30, 30, 28))
    assert session.commit() == 8 and (labels == 8).any()
    with pytest.raises(InputError):
        Session(Recorder(), volume, labels=np.zeros((3, 3, 3), np.int32))


# ---------------------------------------------------------------- prompts JSON


def _annotate(session):
    session.add_point((20, 20, 20))
    session.add_point((28, 20, 20), positive=False)
    session.commit()
    session.add_point((45, 40, 38))
    session.add_point((20, 20, 20))
    session.undo()  # undone clicks are not part of the annotation


def test_prompts_json_round_trip(tmp_path):
    volume, _ = _balls(balls=((20, 20, 20, 6), (45, 40, 38, 6)))
    model = Recorder()
    session = _session(volume, model, point_policy="all")
    _annotate(session)
    text = session.prompts_to_json(tmp_path / "p.json")
    doc = json.loads(text)
    assert doc["format"] == "fastsam3d-prompts" and len(doc["objects"]) == 2
    assert doc["settings"]["point_policy"] == "all"
    for source in (text, tmp_path / "p.json", doc):
        replayed = Session.from_json(source, model, volume, cache=EmbeddingCache())
        np.testing.assert_array_equal(replayed.labels, session.labels)
        np.testing.assert_array_equal(replayed.mask, session.mask)
        assert replayed.clicks == session.clicks and replayed.settings == session.settings
    fresh = _session(volume, model)
    assert fresh.from_json(text) is fresh
    np.testing.assert_array_equal(fresh.mask, session.mask)
    assert json.loads(fresh.prompts_to_json()) == doc


# ---------------------------------------------------------------- fine-to-coarse zoom


def test_small_object_stays_on_the_fine_grid():
    volume, (truth,) = _balls(spacing=(1.0, 1.0, 1.0), balls=((30, 30, 28, 10),))
    model = Recorder()
    session = Session(model, volume, cache=EmbeddingCache())
    assert session.settings.fine_spacing == 0.75
    mask = session.add_point((30, 30, 28))
    assert session.object_spacing == 0.75 and _encodes(model) == 1
    assert _dice(mask, truth) > 0.9
    # the fine ROI is 96 mm: the encoder saw the ball at twice the size of the 1.5 mm grid
    fine = volume.model_grid(0.75).source_to_grid([30, 30, 28])
    assert np.all(np.abs(session.roi.centre - fine) <= 2)
    # a volume of 2 mm voxels has no detail for the fine grid: objects start coarse
    coarse_volume, _ = _balls(balls=((30, 30, 28, 5),))
    assert Session(Recorder(), coarse_volume, cache=EmbeddingCache()).object_spacing == 1.5


def test_object_larger_than_the_fine_roi_moves_to_the_coarse_grid():
    # radius 52 voxels of 1 mm: 104 mm across, more than the 96 mm fine ROI
    volume, (truth,) = _balls(
        shape=(160, 160, 150), spacing=(1.0, 1.0, 1.0), balls=((80, 80, 75, 52),)
    )
    session = Session(Recorder(), volume, cache=EmbeddingCache())
    coarse = _session(volume)
    update = session.add_point_result((80, 80, 75))
    expected = coarse.add_point((80, 80, 75))
    assert session.object_spacing == 1.5 and update.encoded == 2  # fine, then coarse
    np.testing.assert_array_equal(session.mask, expected)
    assert _dice(session.mask, truth) > 0.95
    # later clicks stay on the coarse grid and match a coarse-only session
    session.add_point((120, 80, 75), positive=False)
    np.testing.assert_array_equal(session.mask, coarse.add_point((120, 80, 75), positive=False))
    session.undo()
    session.undo()  # takes back the zoom-out: fine grid, nothing segmented
    assert session.object_spacing == 0.75 and not session.mask.any() and not session.clicks
    session.redo()
    assert session.object_spacing == 1.5
    np.testing.assert_array_equal(session.mask, expected)
    session.reset()
    assert session.object_spacing == 0.75


def test_prompts_json_replays_the_zoom_out_and_old_files():
    volume, _ = _balls(
        shape=(180, 160, 150), spacing=(1.0, 1.0, 1.0), balls=((80, 80, 75, 52), (160, 20, 20, 8))
    )
    session = Session(Recorder(), volume, cache=EmbeddingCache())
    session.add_point((80, 80, 75))
    session.commit()
    session.add_point((160, 20, 20))
    doc = json.loads(session.prompts_to_json())
    spacings = [c["spacing"] for obj in doc["objects"] for c in obj["clicks"]]
    assert spacings == [1.5, 0.75]
    replayed = Session.from_json(doc, Recorder(), volume, cache=EmbeddingCache())
    np.testing.assert_array_equal(replayed.labels, session.labels)
    np.testing.assert_array_equal(replayed.mask, session.mask)
    assert replayed.object_spacing == 0.75
    # a file written before the fine grid: its clicks were decoded on the coarse grid
    coarse = _session(volume)
    coarse.add_point((160, 20, 20))
    old = json.loads(coarse.prompts_to_json())
    del old["settings"]["fine_spacing"]
    for obj in old["objects"]:
        for click in obj["clicks"]:
            del click["spacing"]
    replayed = Session.from_json(old, Recorder(), volume, cache=EmbeddingCache())
    np.testing.assert_array_equal(replayed.mask, coarse.mask)
    assert replayed.object_spacing == 1.5
    # a fine click for a session that keeps this volume on the coarse grid is refused
    no_fine = Session(
        Recorder(), volume, cache=EmbeddingCache(), settings=SessionSettings(fine_spacing=None)
    )
    coarse_click, fine_click = (Click.from_dict(o["clicks"][0]) for o in doc["objects"])
    no_fine._apply(coarse_click)
    with pytest.raises(InputError, match="0.75 mm grid"):
        no_fine._apply(fine_click)
    assert no_fine.clicks == (coarse_click,) and no_fine.object_spacing == 1.5


def test_fine_spacing_must_be_finer_than_spacing():
    with pytest.raises(InputError, match="fine_spacing"):
        SessionSettings(fine_spacing=1.5)
    with pytest.raises(InputError, match="fine_spacing"):
        SessionSettings(fine_spacing=0)
    volume, _ = _balls()
    session = Session(Recorder(), volume, cache=EmbeddingCache())
    with pytest.raises(SessionError, match="fine_spacing"):
        session.settings = session.settings.replace(fine_spacing=None)


def test_reaches_border_counts_only_faces_inside_the_volume():
    low = np.full((32, 32, 32), -1.0, np.float32)
    low[10:20, 10:20, 10:20] = 1.0
    assert not zoom.reaches_border(low)
    low[0, 15, 15] = 1.0
    assert zoom.reaches_border(low)
    inner = [(False, True), (True, True), (True, True)]  # the low x face is the volume's edge
    assert not zoom.reaches_border(low, inner)
    low[15, 15, 31] = 1.0
    assert zoom.reaches_border(low, inner)


def test_prompts_json_errors():
    volume, _ = _balls(balls=((20, 20, 20, 6), (45, 40, 38, 6)))
    session = _session(volume)
    _annotate(session)
    text = session.prompts_to_json()
    with pytest.raises(SessionError, match="fresh Session"):
        session.from_json(text)
    other, _ = _balls(shape=(40, 40, 40))
    with pytest.raises(InputError, match="shape"):
        _session(other).from_json(text)
    with pytest.raises(InputError):
        _session(volume).from_json('{"format": "something-else"}')
    with pytest.raises(InputError):
        _session(volume).from_json("{not json")


# ---------------------------------------------------------------- precompute


def test_precompute_encodes_every_tile_then_clicks_only_decode():
    volume, _ = _balls(shape=(140, 64, 60))
    model = Recorder()
    session = _session(volume, model)
    seen = []
    job = session.precompute(progress=lambda done, total: seen.append((done, total)))
    assert job.wait(60) and job.completed == job.total == len(
        tile_origins(volume.model_grid().shape)
    )
    assert seen[-1] == (job.total, job.total) and _encodes(model) == job.total
    update = session.add_point_result((30, 30, 28))
    assert update.encoded == 0 and _encodes(model) == job.total


def test_precompute_can_be_cancelled():
    volume, _ = _balls(shape=(200, 64, 60))
    model = Recorder()
    session = _session(volume, model)
    jobs, calls = [], []
    gate = threading.Event()

    def progress(done, total):
        calls.append(done)
        gate.wait(10)
        jobs[0].cancel()

    jobs.append(session.precompute(progress=progress))
    gate.set()
    assert jobs[0].wait(30) and jobs[0].cancelled
    assert calls == [1] and jobs[0].completed == 1 < jobs[0].total


# ---------------------------------------------------------------- bad input, devices, memory


@pytest.mark.parametrize(
    "point", [(-1, 5, 5), (5, 5, 60), (70, 0, 0), (1, 2), (1, 2, 3, 4), (np.nan, 1, 1), "abc"]
)
def test_bad_clicks_raise_input_error(point):
    volume, _ = _balls()
    with pytest.raises(InputError):
        _session(volume).add_point(point)


def test_settings_and_devices_are_checked():
    with pytest.raises(InputError, match="point_policy"):
        SessionSettings(point_policy="some")
    best = "cuda" if torch.cuda.is_available() else "cpu"  # CI machines have no MPS
    assert resolve_device(None) == torch.device(best)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            resolve_device("cuda")
    volume, _ = _balls()
    with pytest.raises(InputError, match="Volume"):
        Session(Recorder(), volume.array)


def test_a_gpu_index_beyond_the_machines_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(InputError, match="no GPU 'cuda:2': torch sees 2"):
        resolve_device("cuda:2")


def test_huge_volumes_are_sampled_per_roi(monkeypatch):
    """Above the size limit no whole-volume copy is made; the model input stays 128^3."""
    volume, truth = _tube()
    reference = _session(volume).add_point((25, 22, 75))
    monkeypatch.setattr(fastsam3d.geometry, "MAX_RESAMPLED_VOXELS", 1000)
    fresh = Volume(np.asarray(volume.array), volume.affine)
    model = Recorder()
    mask = _session(fresh, model).add_point((25, 22, 75))
    assert fresh.resampled() is None and not fresh._resampled
    assert set(model.inputs) == {(1, 1, 128, 128, 128)}
    np.testing.assert_array_equal(mask, reference)


@dataclass
class DuckModel:
    """Only encode/decode as in the contract: no nn.Module, no config, no signature, unhashable."""

    inner: ThresholdModel

    def encode(self, x):
        return self.inner.encode(x)

    def decode(self, emb, points, labels, mask_input=None, multimask_output=False):
        return self.inner.decode(emb, points, labels, mask_input, multimask_output)


def test_any_object_with_the_contract_works():
    volume, (truth,) = _balls()
    session = Session(DuckModel(ThresholdModel()), volume, cache=EmbeddingCache())
    assert _dice(session.add_point((30, 30, 28)), truth) > 0.95
    assert session.commit() == 1


# ---------------------------------------------------------------- real CT with the tiny model


def test_real_ct_with_tiny_model():
    from fastsam3d.modeling.configs import get_config

    volume = Volume.from_file(DATA / "example_ct_sm.nii.gz")
    model = fastsam3d.build_model(get_config("tiny")).eval()
    session = Session(
        model, volume, "cpu", cache=EmbeddingCache(), settings=SessionSettings(max_extra_rois=0)
    )
    assert session.device == torch.device("cpu")
    mask = session.add_point((60, 50, 15))
    update = session.add_point_result((62, 48, 14), positive=False)
    assert mask.shape == volume.shape and update.encoded == 0
    assert update.iou is not None and np.isfinite(update.iou)
    np.testing.assert_array_equal(update.mask, session.mask[update.box])
    assert session.undo().shape == volume.shape


# ---------------------------------------------------------------- refinement


class Dilated(Recorder):
    """The stand-in with its logits raised: masks overshoot the ball by a few mm, softly."""

    def decode(self, embedding, points, labels, mask_input=None, multimask_output=False):
        low, iou, mask = super().decode(embedding, points, labels, mask_input, multimask_output)
        return low / 2 + 2, iou, mask


def test_refinement_snaps_an_overshooting_mask_to_the_image_edge():
    volume, (truth,) = _balls(spacing=(1.0, 1.0, 2.0), balls=((34, 32, 30, 10),))
    plain = _session(volume, Dilated(), refine=None).add_point((34, 32, 30))
    refined_session = _session(volume, Dilated())
    refined = refined_session.add_point((34, 32, 30))
    assert _dice(plain, truth) < 0.8
    assert _dice(refined, truth) > 0.9
    update = refined_session.last_update
    box_mask = np.zeros_like(refined)
    box_mask[update.box] = True
    assert not (refined & ~box_mask).any()  # the update box holds the whole object
    assert refined_session.undo().sum() == 0
    np.testing.assert_array_equal(refined_session.redo(), refined)


class Shrunk(Recorder):
    """The stand-in with its logits lowered by 8 voxels: confident masks of the core only."""

    def decode(self, embedding, points, labels, mask_input=None, multimask_output=False):
        low, iou, mask = super().decode(embedding, points, labels, mask_input, multimask_output)
        return low - 8, iou, mask


def _ct(volume):
    """The volume in Hounsfield-like units: air (-1000) around soft tissue (40)."""
    return Volume(np.where(volume.array > 0, 40, -1000).astype(np.int16), volume.affine)


def test_the_click_walker_gets_a_uniform_ball_the_model_under_segments():
    mr, (truth,) = _balls(shape=(110, 110, 60), balls=((55, 52, 30, 12),))
    volume = _ct(mr)
    off = RefineSettings(click_walker="off")
    alone = _session(volume, Shrunk(), refine=off).add_point((55, 52, 30))
    session = _session(volume, Shrunk())
    merged = session.add_point((55, 52, 30))
    assert _dice(alone, truth) < 0.6 and _dice(merged, truth) > 0.9
    box_mask = np.zeros_like(merged)
    box_mask[session.last_update.box] = True
    assert not (merged & ~box_mask).any()
    assert session.undo().sum() == 0
    np.testing.assert_array_equal(session.redo(), merged)
    # a negative click inside the ball takes its side of the ball away again
    cut = session.add_point((55, 52, 40), positive=False)
    assert cut[55, 52, 39:].sum() == 0 and cut[55, 52, 30] and cut.sum() < merged.sum()
    # by default only CT volumes get the walker; "on" runs it on any volume
    assert np.array_equal(_session(mr, Shrunk()).add_point((55, 52, 30)), alone)
    everywhere = RefineSettings(click_walker="on")
    assert _dice(_session(mr, Shrunk(), refine=everywhere).add_point((55, 52, 30)), truth) > 0.9


def test_the_refined_ct_mask_keeps_only_the_parts_holding_a_positive_click():
    mr, (first, second) = _balls(shape=(110, 110, 60), balls=((40, 55, 30, 8), (70, 55, 30, 8)))
    volume = _ct(mr)
    everything = Recorder(connected=False)  # thresholds the whole ROI: both balls
    session = _session(volume, everything)
    mask = session.add_point((40, 55, 30))
    assert _dice(mask, first) > 0.9 and not (mask & second).any()
    both = session.add_point((70, 55, 30))
    assert _dice(both, first | second) > 0.9
    assert session.undo().sum() == mask.sum()
    keep_all = RefineSettings(clicked_parts_only=False)
    unfiltered = _session(volume, Recorder(connected=False), refine=keep_all)
    assert _dice(unfiltered.add_point((40, 55, 30)), first | second) > 0.9
    # the same balls in MR units: no click walker, every part stays
    assert (
        _dice(_session(mr, Recorder(connected=False)).add_point((40, 55, 30)), first | second) > 0.9
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_session_with_the_click_walker_agrees_with_cpu():
    mr, (truth,) = _balls(shape=(110, 110, 60), balls=((55, 52, 30, 12),))
    volume = _ct(mr)
    cpu = _session(volume, ThresholdModel()).add_point((55, 52, 30))
    cuda = _session(volume, ThresholdModel(), device="cuda").add_point((55, 52, 30))
    assert _dice(cuda, cpu) > 0.99 and _dice(cuda, truth) > 0.9


def test_a_volume_inside_the_click_walker_cube_needs_a_negative_click():
    """No face of the cube lies inside a 120 mm volume: a single positive click has no
    background, so the walker waits for a negative click."""
    volume, (truth,) = _balls(shape=(60, 60, 60), balls=((30, 30, 30, 12),))
    volume = _ct(volume)
    alone = _session(volume, Shrunk(), refine=RefineSettings(click_walker="off"))
    session = _session(volume, Shrunk())
    np.testing.assert_array_equal(session.add_point((30, 30, 30)), alone.add_point((30, 30, 30)))
    grown = session.add_point((5, 5, 5), positive=False)
    assert _dice(grown, truth) > 0.9 > _dice(alone.add_point((5, 5, 5), positive=False), truth)


def test_walker_field_samples_its_cube_and_bounds_its_support():
    volume, (truth,) = _balls(shape=(160, 60, 60), balls=((30, 30, 30, 10),))
    field = solve_walker_field(volume, [(30, 30, 30)], [True], RefineSettings())
    everything = tuple(slice(0, n) for n in volume.shape)
    prob = field.sample(everything)
    assert _dice(prob > 0.5, truth) > 0.9
    # the 192 mm cube spans x < 126 voxels of 2 mm around the click: nothing beyond it
    assert prob[130:].max() == 0 and prob[:90].max() > 0.5
    reach = field.source_box(0.5, volume.shape)
    inside = np.zeros(volume.shape, dtype=bool)
    inside[reach] = True
    assert not ((prob > 0.5) & ~inside).any() and inside.sum() < truth.size / 4
    assert solve_walker_field(volume, [(30, 30, 30)], [False], RefineSettings()) is None


def test_the_click_walker_seeds_smaller_balls_once_an_object_has_two_clicks(monkeypatch):
    volume, _ = _balls(shape=(160, 60, 60), balls=((30, 30, 30, 10),))
    radii, positive = [], []

    def seeds_only(image, points, labels, closed_faces=None, radius=1.0):
        radii.append(radius)
        positive.append(int((click_seeds(image.shape, points, labels, radius) == 1).sum()))
        return torch.zeros(image.shape)

    monkeypatch.setattr(walker_field, "click_walker", seeds_only)
    one, two = ([(30, 30, 30)], [True]), ([(30, 30, 30), (60, 30, 30)], [True, False])
    solve_walker_field(volume, *one, RefineSettings())
    solve_walker_field(volume, *two, RefineSettings())
    solve_walker_field(volume, *two, RefineSettings(walker_later_seed_mm=4.5))
    # the walker's cells are 3 mm: balls of 1.5 and 1 cells
    assert radii == pytest.approx([1.5, 1.0, 1.5]) and positive[0] > positive[1] > 0
    assert positive[2] == positive[0]
    with pytest.raises(InputError, match="walker_seed_mm"):
        RefineSettings(walker_later_seed_mm=-1.0)


def test_thick_slices_are_not_refined():
    volume, _ = _balls(shape=(70, 64, 16), spacing=(1.0, 1.0, 5.0), balls=((34, 32, 8, 10),))
    plain = _session(volume, Dilated(), refine=None).add_point((34, 32, 8))
    default = _session(volume, Dilated()).add_point((34, 32, 8))
    np.testing.assert_array_equal(default, plain)
    thick = RefineSettings(max_spacing_mm=6.0)
    assert not np.array_equal(
        _session(volume, Dilated(), refine=thick).add_point((34, 32, 8)), plain
    )


def test_refine_settings_round_trip_and_old_files_replay_without_it():
    settings = SessionSettings(refine=RefineSettings(beta=20.0))
    assert SessionSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    assert SessionSettings.from_dict({"refine": None}).refine is None
    old = SessionSettings().to_dict()
    del old["refine"]
    assert SessionSettings.from_dict(old).refine is None
    before_walker = SessionSettings().to_dict()
    del before_walker["refine"]["click_walker"]
    assert SessionSettings.from_dict(before_walker).refine.click_walker == "off"
    assert SessionSettings.from_dict(SessionSettings().to_dict()).refine.click_walker == "ct"
    before_parts = SessionSettings().to_dict()
    del before_parts["refine"]["clicked_parts_only"]
    assert not SessionSettings.from_dict(before_parts).refine.clicked_parts_only
    assert SessionSettings.from_dict(SessionSettings().to_dict()).refine.clicked_parts_only
    before_seeds = SessionSettings().to_dict()
    del before_seeds["refine"]["walker_later_seed_mm"]
    assert SessionSettings.from_dict(before_seeds).refine.walker_later_seed_mm == 4.5
    assert SessionSettings.from_dict(SessionSettings().to_dict()).refine.walker_later_seed_mm == 3
    with pytest.raises(InputError, match="refine"):
        SessionSettings(refine={"beta": 1.0})
