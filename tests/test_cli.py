"""The ``fastsam3d`` command: segment (round trip of affine and header), info, errors."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fastsam3d import Session, Volume, cli
from fastsam3d.cache import EmbeddingCache
from fastsam3d.session import SessionSettings
from fastsam3d.stand_in import ThresholdModel

DATA = Path(__file__).parent / "data"
CT = DATA / "example_ct_sm.nii.gz"
SPINE, RIB = (58, 24, 11), (103, 33, 22)  # bone voxels of the CT (309 and 401 HU)


def _model() -> ThresholdModel:
    """Segments bone of the CT (z-score > 1 over voxels > 0 HU), ball in synthetic volumes."""
    return ThresholdModel(threshold=1.0)


@pytest.fixture
def stand_in(monkeypatch):
    """``--model`` loads the thresholding stand-in (no weights needed)."""
    loaded = []

    def load(source, device, precision="fp32"):
        loaded.append((source, str(device), precision))
        return _model()

    monkeypatch.setattr(cli, "_load_model", load)
    return loaded


@pytest.fixture
def ct(tmp_path):
    path = tmp_path / "ct.nii.gz"
    shutil.copy(CT, path)
    return path


def _oblique_image(tmp_path) -> Path:
    """A ball in an oblique volume whose qform and sform differ (both coded), with units set."""
    shape = (64, 60, 24)
    i, j, k = np.indices(shape)
    data = np.where((i - 32) ** 2 + (j - 30) ** 2 + ((k - 12) * 3.2) ** 2 < 400, 300, -50)
    sform = np.array(
        [[0.9, -0.2, 0.3, -40.0], [0.2, 0.95, -0.1, 12.0], [-0.25, 0.1, 2.9, 7.5], [0, 0, 0, 1]]
    )
    qform = sform.copy()
    qform[:3, 3] += [1.0, -2.0, 0.5]
    image = nib.Nifti1Image(data.astype(np.int16), sform)
    image.set_sform(sform, code=1)
    image.set_qform(qform, code=2)
    image.header.set_xyzt_units("mm", "sec")
    image.header["descrip"] = b"oblique test volume"
    path = tmp_path / "oblique.nii"
    nib.save(image, str(path))
    return path


def test_segment_round_trip_keeps_affine_and_header(ct, tmp_path, stand_in, capsys):
    out = tmp_path / "labels.nii.gz"
    argv = ["segment", str(ct), "--point", "58,24,11", "--point", "60,50,15:-", "-o", str(out)]
    options = ["--model", "my-weights", "--device", "cpu", "--max-extra-rois", "2"]
    assert cli.main([*argv, *options]) == 0
    assert stand_in == [("my-weights", "cpu", "fp32")]
    assert "wrote" in capsys.readouterr().out
    source, written = nib.load(str(ct)), nib.load(str(out))
    assert written.shape == source.shape
    np.testing.assert_array_equal(written.affine, source.affine)
    for key in ("sform_code", "qform_code", "pixdim", "xyzt_units", "dim_info"):
        np.testing.assert_array_equal(written.header[key], source.header[key])
    labels = np.asarray(written.dataobj)
    assert labels.dtype == np.uint16 and set(np.unique(labels)) == {0, 1}
    # the same clicks through the Python API give the same labels
    settings = SessionSettings(max_extra_rois=2)
    session = Session(_model(), Volume.from_file(ct), cache=EmbeddingCache(), settings=settings)
    session.add_point(SPINE)
    session.add_point((60, 50, 15), positive=False)
    session.commit()
    np.testing.assert_array_equal(labels, session.labels)


def _ball_model(monkeypatch):
    monkeypatch.setattr(cli, "_load_model", lambda source, device, precision: ThresholdModel())


def test_oblique_qform_and_sform_survive(tmp_path, monkeypatch):
    _ball_model(monkeypatch)
    path = _oblique_image(tmp_path)
    out = tmp_path / "out.nii"
    assert cli.main(["segment", str(path), "--point", "32,30,12", "-o", str(out)]) == 0
    source, written = nib.load(str(path)), nib.load(str(out))
    for getter in ("get_sform", "get_qform"):
        a, a_code = getattr(source.header, getter)(coded=True)
        b, b_code = getattr(written.header, getter)(coded=True)
        np.testing.assert_allclose(b, a, atol=1e-6)
        assert a_code == b_code
    assert written.header["descrip"] == source.header["descrip"]
    assert written.header.get_xyzt_units() == ("mm", "sec")
    labels = np.asarray(written.dataobj)
    ball = np.asarray(source.dataobj) > 0
    assert 2 * (ball & (labels == 1)).sum() / (ball.sum() + (labels == 1).sum()) > 0.9


def test_mgh_input_gives_nifti_with_same_affine(tmp_path, monkeypatch):
    _ball_model(monkeypatch)
    shape = (40, 36, 30)
    i, j, k = np.indices(shape)
    data = np.where((i - 20) ** 2 + (j - 18) ** 2 + (k - 15) ** 2 < 64, 200, 10).astype(np.float32)
    affine = np.array([[-1.2, 0, 0, 30], [0, 0, 1.3, -20], [0, -1.1, 0, 25], [0, 0, 0, 1.0]])
    path = tmp_path / "ball.mgz"
    nib.save(nib.MGHImage(data, affine), str(path))
    out = tmp_path / "ball_labels.nii.gz"
    assert cli.main(["segment", str(path), "--point", "20,18,15", "-o", str(out)]) == 0
    written = nib.load(str(out))
    np.testing.assert_allclose(written.affine, nib.load(str(path)).affine, atol=1e-5)
    assert written.header.get_sform(coded=True)[1] == 1
    assert (np.asarray(written.dataobj)[20, 18, 15]) == 1


def test_trailing_singleton_axis_is_kept(tmp_path, monkeypatch):
    _ball_model(monkeypatch)
    i, j, k = np.indices((40, 36, 30))
    data = np.where((i - 20) ** 2 + (j - 18) ** 2 + (k - 15) ** 2 < 100, 200, 0).astype(np.int16)
    path = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(data[..., None], np.diag([1.5, 1.5, 2.0, 1.0])), str(path))
    out = tmp_path / "four_d_labels.nii.gz"
    assert cli.main(["segment", str(path), "--point", "20,18,15", "-o", str(out)]) == 0
    written = nib.load(str(out))
    assert written.shape == (40, 36, 30, 1) and written.get_fdata()[20, 18, 15, 0] == 1


def test_prompts_file_replays_and_save_prompts(ct, tmp_path, stand_in):
    session = Session(_model(), Volume.from_file(ct), cache=EmbeddingCache())
    session.add_point(SPINE)
    session.commit()
    session.add_point(RIB)
    prompts = tmp_path / "prompts.json"
    session.prompts_to_json(prompts)
    out, saved = tmp_path / "replayed.nii.gz", tmp_path / "saved.json"
    argv = ["segment", str(ct), "--prompts", str(prompts), "-o", str(out)]
    assert cli.main([*argv, "--save-prompts", str(saved)]) == 0
    session.commit()
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), session.labels)
    doc = json.loads(saved.read_text())
    assert [o["committed"] for o in doc["objects"]] == [True, True]


def _saved_prompts(ct, tmp_path, *flag: str) -> dict[bool, dict]:
    """The prompt files of one click on the rib, without and with ``flag``."""
    saved = {}
    for flags in ([], list(flag)):
        prompts = tmp_path / f"p{len(flags)}.json"
        argv = ["segment", str(ct), "--point", ",".join(map(str, RIB)), "-o"]
        argv += [str(tmp_path / f"o{len(flags)}.nii.gz"), "--save-prompts", str(prompts), *flags]
        assert cli.main(argv) == 0
        saved[bool(flags)] = json.loads(prompts.read_text())
    return saved


def test_no_fine_grid_keeps_every_object_on_the_coarse_grid(ct, tmp_path, stand_in):
    saved = _saved_prompts(ct, tmp_path, "--no-fine-grid")
    assert saved[True]["settings"]["fine_spacing"] is None
    assert saved[True]["objects"][0]["clicks"][0]["spacing"] == 1.5
    assert saved[False]["settings"]["fine_spacing"] == 0.75


def test_no_refine_is_saved_with_the_prompts(ct, tmp_path, stand_in):
    saved = _saved_prompts(ct, tmp_path, "--no-refine")
    assert saved[True]["settings"]["refine"] is None
    assert saved[False]["settings"]["refine"]["beta"] > 0


def test_click_walker_mode_is_saved_with_the_prompts(ct, tmp_path, stand_in):
    from fastsam3d.refine import CLICK_WALKER_MODES

    saved = _saved_prompts(ct, tmp_path, "--click-walker", "off")
    assert saved[True]["settings"]["refine"]["click_walker"] == "off"
    assert saved[False]["settings"]["refine"]["click_walker"] == "ct"
    parser = cli.build_parser()
    segment = next(
        a
        for a in parser._subparsers._group_actions[0].choices["segment"]._actions
        if a.dest == "click_walker"
    )
    assert tuple(segment.choices) == CLICK_WALKER_MODES


def test_keep_unclicked_parts_is_saved_with_the_prompts(ct, tmp_path, stand_in):
    saved = _saved_prompts(ct, tmp_path, "--keep-unclicked-parts")
    assert not saved[True]["settings"]["refine"]["clicked_parts_only"]
    assert saved[True]["settings"]["refine"]["click_walker"] == "ct"
    assert saved[False]["settings"]["refine"]["clicked_parts_only"]


def test_refuses_to_overwrite_the_input(ct, stand_in, capsys):
    digest = hashlib.sha256(ct.read_bytes()).hexdigest()
    assert cli.main(["segment", str(ct), "--point", "60,50,15", "-o", str(ct)]) == 2
    assert "overwrite the input" in capsys.readouterr().err
    link = ct.parent / "link.nii.gz"
    link.symlink_to(ct)
    assert cli.main(["segment", str(ct), "--point", "60,50,15", "-o", str(link)]) == 2
    assert hashlib.sha256(ct.read_bytes()).hexdigest() == digest
    assert stand_in == []  # refused before any model was loaded


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--point", "500,50,15"], "outside the volume"),
        ([], "nothing to segment"),
        (["--point", "60,50,15", "--prompts", "missing.json"], "prompt file"),
    ],
)
def test_user_errors_exit_2_with_a_message(ct, tmp_path, stand_in, capsys, extra, words):
    out = tmp_path / "o.nii.gz"
    assert cli.main(["segment", str(ct), *extra, "-o", str(out)]) == 2
    assert words in capsys.readouterr().err and not out.exists()


def test_bad_output_suffix_point_syntax_and_missing_weights(ct, tmp_path, capsys):
    assert cli.main(["segment", str(ct), "--point", "1,2,3", "-o", str(tmp_path / "o.png")]) == 2
    assert ".nii" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["segment", str(ct), "--point", "1,2", "-o", str(tmp_path / "o.nii")])
    assert exc.value.code == 2 and "I,J,K" in capsys.readouterr().err
    argv = ["segment", str(ct), "--point", "60,50,15", "-o", str(tmp_path / "o.nii.gz")]
    assert cli.main([*argv, "--model", str(tmp_path / "none.pth"), "--device", "cpu"]) == 2
    assert "none.pth" in capsys.readouterr().err


def test_parse_point():
    assert cli.parse_point("1,2,3") == ((1.0, 2.0, 3.0), True)
    assert cli.parse_point(" 4, 5.5 ,6:+") == ((4.0, 5.5, 6.0), True)
    assert cli.parse_point("7,8,9:neg") == ((7.0, 8.0, 9.0), False)


def test_info_matches_nibabel(capsys):
    assert cli.main(["info", str(CT), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    image = nib.load(str(CT))
    assert info["shape"] == list(image.shape) and info["orientation"] == "RAS"
    np.testing.assert_allclose(info["affine"], image.affine, atol=1e-5)
    np.testing.assert_allclose(info["voxel_size_mm"], image.header.get_zooms(), atol=1e-5)
    assert info["model_grid"]["shape"] == [244, 202, 60]
    assert cli.main(["info", str(CT)]) == 0
    text = capsys.readouterr().out
    assert "(122, 101, 30)" in text and "3 x 3 x 3 mm" in text


def test_info_on_bad_file_and_entry_point(tmp_path):
    bad = tmp_path / "bad.nii"
    bad.write_text("nope")
    assert cli.main(["info", str(bad)]) == 2
    run = subprocess.run(
        [sys.executable, "-m", "fastsam3d.cli", "info", str(CT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and "orientation:  RAS" in run.stdout


def test_convert_and_every_subcommand_is_registered(tmp_path, capsys):
    import torch

    import fastsam3d
    from fastsam3d.modeling.configs import get_config

    model = fastsam3d.build_model(get_config("tiny"))
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    out = tmp_path / "tiny.safetensors"
    assert cli.main(["convert", str(tmp_path / "tiny.pth"), str(out)]) == 0
    loaded = fastsam3d.load_model(out)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for name in ("segment", "info", "convert", *cli.EXTERNAL_COMMANDS):
        assert name in text


def test_int8_precision_segments_like_fp32_with_the_default_model(ct, tmp_path):
    """``--precision int8`` (opt-in CPU encoder) gives the fp32 mask up to a few voxels."""
    masks = {}
    for precision in ("fp32", "int8"):
        out = tmp_path / f"{precision}.nii.gz"
        argv = ["segment", str(ct), "--point", "58,24,11", "-o", str(out), "--device", "cpu"]
        assert cli.main([*argv, "--precision", precision, "--max-extra-rois", "0"]) == 0
        masks[precision] = np.asarray(nib.load(str(out)).dataobj) > 0
    fp32, int8 = masks["fp32"], masks["int8"]
    assert fp32.sum() > 50
    assert 2 * (fp32 & int8).sum() / (fp32.sum() + int8.sum()) > 0.95


def test_a_precision_the_device_cannot_run_is_a_user_error(monkeypatch, capsys, ct, tmp_path):
    class GpuOnly:
        def prepare_inference(self, dtype=None):
            raise ValueError("dtype=torch.int8 is a CPU path; use bfloat16 on GPUs")

    monkeypatch.setattr("fastsam3d.checkpoints.load_model", lambda source, device: GpuOnly())
    argv = ["segment", str(ct), "--point", "58,24,11", "-o", str(tmp_path / "x.nii.gz")]
    assert cli.main([*argv, "--precision", "int8", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--precision int8" in err and "CPU path" in err
    assert not (tmp_path / "x.nii.gz").exists()


def test_precision_choices_are_the_encoder_precisions():
    from fastsam3d.modeling.sam3d import ENCODER_PRECISIONS

    assert cli.PRECISIONS == tuple(ENCODER_PRECISIONS)
