"""Checkpoint forms, safe loading, registry downloads (from 127.0.0.1 only) and conversion."""

import argparse
import collections
import functools
import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fastsam3d
from fastsam3d import checkpoints
from fastsam3d.errors import CheckpointError

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def fixture():
    return torch.load(DATA / "official_parity_a.pt", weights_only=True)


@pytest.fixture(scope="module")
def student_state(fixture):
    return fixture["student"]["state_dict"]


def embed(model, fixture):
    with torch.inference_mode():
        return model.image_encoder(fixture["image"].float())


def assert_student(model, fixture):
    assert model.config.block_style == "fastsam3d"
    assert model.config.attention_free_blocks == 2 and model.config.num_heads == 2
    reference = fixture["student"]["embedding"]
    err = (embed(model, fixture) - reference).abs().max()
    assert err <= 1e-4 * reference.abs().max()


def training_checkpoint(state):
    """The layout of the released FastSAM3D.pth: weights, AdamW moments, args, scheduler."""
    return {
        "epoch": 99,
        "model_state_dict": collections.OrderedDict(state),
        "optimizer_state_dict": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3)}},
            "param_groups": [{"lr": 8e-5, "betas": (0.9, 0.999), "params": [0]}],
        },
        "lr_scheduler_state_dict": {"milestones": collections.Counter({60: 1, 90: 1})},
        "losses": [np.float64(0.3), 0.25],
        "best_dice": np.float32(0.8),
        "args": argparse.Namespace(model_type="vit_b_ori", device=torch.device("cpu")),
        "used_datas": ["a", "b"],
    }


@pytest.mark.parametrize("form", ["raw", "training", "module_prefix", "safetensors"])
def test_checkpoint_forms_load_and_match(tmp_path, fixture, student_state, form):
    path = tmp_path / ("model.safetensors" if form == "safetensors" else "model.pth")
    if form == "raw":
        torch.save(dict(student_state), path)
    elif form == "training":
        torch.save(training_checkpoint(student_state), path)
    elif form == "module_prefix":
        torch.save({"state_dict": {f"module.{k}": v for k, v in student_state.items()}}, path)
    else:
        save_file({k: v.contiguous() for k, v in student_state.items()}, str(path))
    assert_student(fastsam3d.load_model(path), fixture)


def test_encoder_only_distillation_output_is_completed(tmp_path, fixture, student_state):
    encoder = {k[len("image_encoder.") :]: v for k, v in student_state.items() if "image_enc" in k}
    torch.save({"model_state_dict": encoder, "epoch": 3}, tmp_path / "encoder.pth")
    torch.save({"model_state_dict": dict(student_state)}, tmp_path / "full.pth")
    model = fastsam3d.load_model(tmp_path / "encoder.pth", decoder=tmp_path / "full.pth")
    assert_student(model, fixture)
    decoder_key = "mask_decoder.iou_token.weight"
    assert torch.equal(model.state_dict()[decoder_key], student_state[decoder_key])


def test_teacher_wiring_is_inferred(tmp_path, fixture, student_state):
    state = dict(fixture["teacher"]["state_dict"])
    state.update({k: v for k, v in student_state.items() if "image_encoder" not in k})
    torch.save({"model_state_dict": state}, tmp_path / "teacher.pth")
    model = fastsam3d.load_model(tmp_path / "teacher.pth")
    assert model.config.block_style == "sam_med3d"
    assert model.config.window_size == 14 and model.config.global_attn_indexes == (2,)
    reference = fixture["teacher"]["embedding"]
    assert (embed(model, fixture) - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_block_style_override(tmp_path, student_state):
    torch.save(dict(student_state), tmp_path / "s.pth")
    model = fastsam3d.load_model(tmp_path / "s.pth", block_style="sam_med3d")
    assert model.config.block_style == "sam_med3d"


class _Payload:
    """Unpickling this would create a file: the loader must refuse before that."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_code_payload_is_refused_and_never_runs(tmp_path, student_state):
    marker = tmp_path / "pwned"
    torch.save(
        {"model_state_dict": dict(student_state), "evil": _Payload(marker)}, tmp_path / "x.pth"
    )
    with pytest.raises(CheckpointError, match="allow-list"):
        fastsam3d.load_model(tmp_path / "x.pth")
    assert not marker.exists()


def test_truncated_file_gives_a_clear_error(tmp_path, student_state):
    path = tmp_path / "t.pth"
    torch.save(dict(student_state), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        fastsam3d.load_model(path)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(CheckpointError, match="neither a registered model"):
        fastsam3d.load_model(tmp_path / "nope.pth")


def test_mismatched_keys_are_named(tmp_path, student_state):
    state = dict(student_state)
    del state["mask_decoder.iou_token.weight"]
    state["mask_decoder.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="iou_token") as err:
        fastsam3d.load_model(tmp_path / "bad.pth")
    assert "mask_decoder.extra.weight" in str(err.value)


def test_convert_writes_weights_only_safetensors(tmp_path, fixture, student_state):
    torch.save(training_checkpoint(student_state), tmp_path / "train.pth")
    out = checkpoints.convert_checkpoint(tmp_path / "train.pth", tmp_path / "model.safetensors")
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        config = json.loads(f.metadata()["config"])
        assert set(f.keys()) == set(student_state)
    assert config["attention_free_blocks"] == 2
    assert_student(fastsam3d.load_model(out), fixture)


# Downloads: served from a local HTTP server on 127.0.0.1.


@pytest.fixture
def local_server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def register(monkeypatch, tmp_path, url, sha256=None):
    monkeypatch.setenv(checkpoints.CACHE_ENV, str(tmp_path / "cache"))
    entry = checkpoints.WeightsEntry("local", url, "local.pth", 1, sha256, "test", "test")
    monkeypatch.setitem(checkpoints.REGISTRY, "local", entry)


def test_download_from_registry_with_progress(monkeypatch, tmp_path, local_server, student_state):
    root, base = local_server
    torch.save({"model_state_dict": dict(student_state)}, root / "w.pth")
    digest = hashlib.sha256((root / "w.pth").read_bytes()).hexdigest()
    register(monkeypatch, tmp_path, f"{base}/w.pth", sha256=digest)
    seen = []
    model = fastsam3d.load_model("local", progress=lambda done, total: seen.append((done, total)))
    cached = tmp_path / "cache" / "local.pth"
    assert cached.exists() and not (tmp_path / "cache" / "local.pth.part").exists()
    assert seen and seen[-1][0] == cached.stat().st_size
    assert model.config.name == "local"
    recorded = json.loads((tmp_path / "cache" / "sha256.json").read_text())
    assert recorded["local.pth"] == digest


def test_download_with_wrong_hash_is_rejected(monkeypatch, tmp_path, local_server):
    root, base = local_server
    (root / "w.pth").write_bytes(b"not the pinned file")
    register(monkeypatch, tmp_path, f"{base}/w.pth", sha256="0" * 64)
    with pytest.raises(CheckpointError, match="SHA-256"):
        checkpoints.fetch_weights("local", progress=False)
    assert list((tmp_path / "cache").glob("local.pth*")) == []


def test_offline_download_says_where_to_put_the_file(monkeypatch, tmp_path, local_server):
    _, base = local_server
    register(monkeypatch, tmp_path, f"{base}/missing.pth")
    with pytest.raises(CheckpointError) as err:
        checkpoints.fetch_weights("local", progress=False)
    assert str(tmp_path / "cache" / "local.pth") in str(err.value)


def test_config_stored_in_safetensors_metadata_is_honoured(tmp_path):
    """Fields the weights cannot show (wiring with attention-free blocks, sparse attention)."""
    config = fastsam3d.build_model("tiny").config.replace(
        name="mine", block_style="sam_med3d", sparse_attention=((64, 1), (512, 8))
    )
    model = fastsam3d.build_model(config)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "m.safetensors"), metadata={"config": config.to_json()})
    loaded = fastsam3d.load_model(tmp_path / "m.safetensors")
    assert loaded.config == config
    assert (
        fastsam3d.load_model(tmp_path / "m.safetensors", block_style="fastsam3d").config.block_style
        == "fastsam3d"
    )


def test_bundled_default_model_loads_offline(monkeypatch, tmp_path):
    monkeypatch.setenv(checkpoints.CACHE_ENV, str(tmp_path / "empty-cache"))
    model = fastsam3d.load_model("default")
    assert model.config.name == "fastsam3d-lite"
    assert not (tmp_path / "empty-cache").exists()
    with torch.inference_mode():
        emb = model.encode(torch.zeros(1, 1, 128, 128, 128))
    assert emb.shape == (1, 192, 8, 8, 8) and torch.isfinite(emb).all()


def test_missing_bundled_weights_say_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoints, "BUNDLED_WEIGHTS", tmp_path / "gone.safetensors")
    with pytest.raises(CheckpointError, match="bundled default weights are missing"):
        fastsam3d.load_model("default")
