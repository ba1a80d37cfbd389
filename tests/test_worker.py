"""The model thread without Qt: ordering, latest-click-wins, errors, cancellation, thread use."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest
from nifti_helpers import blob_volume, oblique_affine

from napari_fastsam3d._state import (
    Committed,
    Failure,
    MaskUpdate,
    ModelReady,
    Progress,
    Prompt,
    VolumeReady,
)
from napari_fastsam3d._worker import DecodeRequest, ModelWorker

CENTRE = (20, 18, 12)


class RecordingModel:
    """Wraps a model; records which thread runs each call and can hold a decode at a gate."""

    def __init__(self, model):
        self.model, self.config, self.signature = model, model.config, f"rec:{model.signature}"
        self.threads: list[str] = []
        self.gate: threading.Event | None = None
        self.fail_next = False

    def to(self, device):
        self.model.to(device)
        return self

    def parameters(self):
        return self.model.parameters()

    def encode(self, x):
        self.threads.append(threading.current_thread().name)
        return self.model.encode(x)

    def decode(self, embedding, points, labels, mask_input=None, multimask_output=False):
        self.threads.append(threading.current_thread().name)
        if self.gate is not None:
            self.gate.wait(30)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        return self.model.decode(embedding, points, labels, mask_input, multimask_output)


class Inbox:
    """Collects messages; ``hold(message)`` True blocks the model thread until ``release``."""

    def __init__(self, hold=lambda m: False):
        self.messages: queue.Queue = queue.Queue()
        self.hold, self.release = hold, threading.Event()

    def __call__(self, message):
        self.messages.put(message)
        if self.hold(message):
            self.release.wait(30)

    def next(self, kind, timeout=60.0, where=lambda m: True):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                message = self.messages.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(message, kind) and where(message):
                return message
        raise TimeoutError(f"no {kind.__name__} within {timeout} s")

    def drain(self, kind, wait=1.0) -> list:
        time.sleep(wait)
        found = []
        while not self.messages.empty():
            message = self.messages.get()
            if isinstance(message, kind):
                found.append(message)
        return found


def request(seq, index=CENTRE, positive=True, object_id=1):
    return DecodeRequest(seq, object_id, (Prompt(index, positive, (0.0, 0.0, 0.0)),), 0.0)


@pytest.fixture
def started():
    """A worker with a recording stand-in model and the blob volume open."""
    from fastsam3d.stand_in import ThresholdModel

    inbox = Inbox()
    worker = ModelWorker(inbox)
    model = RecordingModel(ThresholdModel())
    worker.load_model(model, "cpu")
    inbox.next(ModelReady)
    worker.set_volume(blob_volume(), oblique_affine(), "blob")
    assert inbox.next(VolumeReady).next_id == 1
    yield worker, inbox, model
    worker.shutdown()
    assert not worker.alive


def test_thick_slices_come_with_a_note_that_edges_are_not_snapped(started):
    worker, inbox, _ = started
    thick = oblique_affine() @ np.diag([1.0, 1.0, 4.0, 1.0])
    worker.set_volume(blob_volume(), thick, "thick")
    assert "not snapped to image edges" in inbox.next(VolumeReady).note
    worker.set_volume(blob_volume(), oblique_affine(), "blob again")
    assert inbox.next(VolumeReady).note == ""


def test_an_unknown_click_walker_mode_is_a_failure(started):
    worker, inbox, _ = started
    worker.set_click_walker("sometimes")
    failure = inbox.next(Failure)
    assert failure.task == "set_click_walker" and "click walker mode" in failure.message
    worker.set_click_walker("on")
    inbox.next(MaskUpdate, where=lambda m: m.resync)
    assert worker.engine.session.settings.refine.click_walker == "on"


def test_all_model_calls_run_on_the_model_thread(started):
    worker, inbox, model = started
    worker.decode(request(1))
    update = inbox.next(MaskUpdate)
    assert update.mask.any() and update.voxels == int(update.mask.sum())
    assert set(model.threads) == {"fastsam3d-model"}


def test_only_the_newest_waiting_click_runs(started):
    worker, inbox, model = started
    model.gate = threading.Event()
    worker.decode(request(1))
    time.sleep(0.3)  # seq 1 is running, held at the gate
    for seq in range(2, 6):
        worker.decode(request(seq, (20, 18, 11 + seq % 3)))
    assert worker.pending() == 1
    model.gate.set()
    seqs = [inbox.next(MaskUpdate).seq, inbox.next(MaskUpdate).seq]
    assert seqs == [1, 5]
    assert not inbox.drain(MaskUpdate)


def test_errors_become_failures_and_the_thread_lives_on(started):
    worker, inbox, model = started
    worker.decode(request(1, (99, 0, 0)))
    failure = inbox.next(Failure)
    assert failure.task == "decode" and "outside the volume" in failure.message
    assert inbox.next(MaskUpdate).resync
    model.fail_next = True
    worker.decode(request(2))
    assert inbox.next(Failure).message == "RuntimeError: boom"
    resync = inbox.next(MaskUpdate)
    assert resync.resync and resync.prompts == ()
    worker.decode(request(3))
    assert inbox.next(MaskUpdate, where=lambda m: m.seq == 3).mask.any()


def test_commit_then_stale_requests_are_ignored(started):
    worker, inbox, _ = started
    worker.decode(request(1))
    inbox.next(MaskUpdate)
    worker.commit()
    committed = inbox.next(Committed)
    assert (committed.object_id, committed.next_id) == (1, 2)
    assert (committed.labels == 1).sum() == committed.voxels > 0
    worker.decode(request(2, object_id=1))  # still addressed to the committed object
    assert not inbox.drain(MaskUpdate)


def test_missing_default_model_is_reported(monkeypatch, tmp_path):
    from fastsam3d import checkpoints

    monkeypatch.setattr(checkpoints, "BUNDLED_WEIGHTS", tmp_path / "removed.safetensors")
    inbox = Inbox()
    worker = ModelWorker(inbox)
    worker.load_model("default", "cpu")
    failure = inbox.next(Failure)
    assert failure.task == "load_model" and failure.expected
    assert "Local file" in failure.message
    worker.shutdown()


def test_download_progress_and_cancel(monkeypatch):
    import fastsam3d
    from fastsam3d.errors import CheckpointError
    from fastsam3d.stand_in import ThresholdModel

    def fake_load_model(source, device="cpu", progress=True):
        """Reports a download like checkpoints.fetch_weights does, then gives a model."""
        try:
            for done in range(0, 1001, 250):
                progress(done, 1000)
                time.sleep(0.05)
        except Exception as err:  # fetch_weights wraps every download error like this
            raise CheckpointError(f"could not download {source}") from err
        return ThresholdModel()

    monkeypatch.setattr(fastsam3d, "load_model", fake_load_model)
    inbox = Inbox()
    worker = ModelWorker(inbox)
    worker.load_model("fastsam3d", "cpu")
    steps = [inbox.next(Progress, where=lambda m: m.task == "download") for _ in range(5)]
    assert [(m.done, m.total) for m in steps] == [(d, 1000) for d in range(0, 1001, 250)]
    assert inbox.next(ModelReady).name == "fastsam3d"
    inbox.hold = lambda m: isinstance(m, Progress) and m.task == "download"
    worker.load_model("sam-med3d-turbo", "cpu")
    inbox.next(Progress, where=lambda m: m.task == "download")
    worker.cancel()
    inbox.hold = lambda m: False
    inbox.release.set()
    failure = inbox.next(Failure)
    assert failure.cancelled and failure.message == "download cancelled"
    worker.shutdown()


def test_encoding_can_be_cancelled(tiny_weights):
    inbox = Inbox(hold=lambda m: isinstance(m, Progress) and m.task == "encoding")
    worker = ModelWorker(inbox)
    worker.load_model(str(tiny_weights), "cpu")
    assert inbox.next(ModelReady).name == tiny_weights.name
    assert worker.engine.model.image_encoder.patch_embed.as_gemm  # prepare_inference() ran
    worker.set_volume(blob_volume(), oblique_affine(), "blob")
    inbox.next(VolumeReady)
    worker.decode(request(1))
    inbox.next(Progress, where=lambda m: m.task == "encoding" and not m.finished)
    worker.cancel()  # the model thread waits in the progress report until released
    inbox.hold = lambda m: False
    inbox.release.set()
    failure = inbox.next(Failure)
    assert failure.cancelled and "encoding" in failure.message
    assert inbox.next(MaskUpdate).prompts == ()
    worker.decode(request(2))
    update = inbox.next(MaskUpdate, where=lambda m: m.seq == 2)
    assert update.prompts[0].index == CENTRE
    worker.shutdown()


def test_encoder_precision_is_applied_and_a_refused_one_keeps_the_model(tiny_weights):
    from fastsam3d.modeling.quantized import Int8Linear
    from fastsam3d.stand_in import ThresholdModel

    class GpuOnlyPrecision(ThresholdModel):
        def prepare_inference(self, dtype=None):
            raise ValueError("dtype=torch.int8 is a CPU path; use bfloat16 on GPUs")

    inbox = Inbox()
    worker = ModelWorker(inbox)
    worker.load_model(str(tiny_weights), "cpu", "int8")
    assert inbox.next(ModelReady).precision == "int8"
    model = worker.engine.model
    assert any(isinstance(m, Int8Linear) for m in model.image_encoder.modules())
    worker.set_volume(blob_volume(), oblique_affine(), "blob")
    inbox.next(VolumeReady)
    worker.decode(request(1))
    assert inbox.next(MaskUpdate, where=lambda m: m.seq == 1).prompts[0].index == CENTRE
    for source, precision, reason in (
        (str(tiny_weights), "fp16", "unknown precision 'fp16'"),
        (GpuOnlyPrecision(), "int8", "int8 encoder on cpu: dtype=torch.int8 is a CPU path"),
    ):
        worker.load_model(source, "cpu", precision)
        assert reason in inbox.next(Failure).message
        assert worker.engine.model is model and worker.engine.session is not None
    worker.shutdown()


def test_shutdown_stops_the_thread():
    worker = ModelWorker(Inbox())
    worker.shutdown()
    assert not worker.alive
    np.testing.assert_equal(worker.pending(), 0)


def test_failures_are_classified():
    from fastsam3d.errors import CheckpointError
    from napari_fastsam3d._worker import Cancelled, _failure

    try:
        try:
            raise Cancelled("download")
        except Cancelled as inner:
            raise CheckpointError("could not download FastSAM3D.pth") from inner
    except CheckpointError as wrapped:
        failure = _failure("load_model", wrapped)
    assert failure.cancelled and failure.message == "download cancelled"
    assert _failure("commit", CheckpointError("no file")).expected
    unexpected = _failure("decode", ValueError("bad"))
    assert not unexpected.expected and unexpected.message == "ValueError: bad"


def test_bundled_default_model_loads():
    inbox = Inbox()
    worker = ModelWorker(inbox)
    worker.load_model("default", "cpu")
    ready = inbox.next(ModelReady)
    assert "default" in ready.name and ready.device == "cpu"
    worker.shutdown()


@pytest.mark.parametrize(("count", "expected"), [(1, ("cuda",)), (2, ("cuda:0", "cuda:1"))])
def test_devices_list_each_gpu_when_there_are_several(monkeypatch, count, expected):
    import torch

    from napari_fastsam3d._engine import Engine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert Engine(lambda *a: None, lambda: False).devices() == (*expected, "cpu")
