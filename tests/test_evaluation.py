"""fastsam3d eval: crops, Dice, perfect predictions, both protocols, the JSON, baselines."""

import argparse
import json
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from fastsam3d import evaluation as E
from fastsam3d.baselines import RandomWalkerSegmenter
from fastsam3d.modeling.configs import build_model
from fastsam3d.refine import RefineSettings
from fastsam3d.training_runtime import save_model
from fastsam3d.walker import random_walker


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two 1.5 mm cases: a box (1) and a ball (4); image = 100 * label + 50."""
    root = tmp_path_factory.mktemp("eval")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    grid = np.indices((60, 56, 50))
    for index in range(2):
        labels = np.zeros((60, 56, 50), np.uint8)
        labels[10:30, 12:34, 8:26] = 1
        labels[((grid - np.array([44, 38, 34 - index])[:, None, None, None]) ** 2).sum(0) < 49] = 4
        affine = np.diag([1.5, 1.5, 1.5, 1.0])
        nib.save(nib.Nifti1Image(labels, affine), str(root / "labels" / f"c{index}.nii.gz"))
        image = labels.astype(np.float32) * 100 + 50
        nib.save(nib.Nifti1Image(image, affine), str(root / "images" / f"c{index}_0000.nii.gz"))
    return root


def test_dice_score():
    a = np.zeros((4, 4, 4), bool)
    b = a.copy()
    assert E.dice_score(a, b) == 1.0
    a[0, 0, :2] = True
    b[0, 0, 1:3] = True
    assert E.dice_score(a, b) == pytest.approx(0.5)


def test_crop_is_centred_on_the_bounding_box_and_padded():
    mask = np.zeros((50, 60, 40), bool)
    mask[10:20, 30:41, 0:5] = True
    start, stop = E.crop_box(mask, size=16)
    assert ((start + stop) // 2).tolist() == [15, 35, 2]
    crop = E.extract(mask.astype(np.int8), start, stop, fill=-1)
    assert crop.shape == (16, 16, 16) and (crop == -1).any()
    assert (
        crop.sum(where=crop > 0) == mask[start[0] : stop[0], start[1] : stop[1], 0 : stop[2]].sum()
    )


class Oracle:
    """Predicts the ground truth after the first click (a perfect segmenter)."""

    name = "oracle"

    def __init__(self):
        self.calls = 0

    def start(self, raw, normalised):
        self.gt = None

    def predict(self, points, labels):
        self.calls += 1
        return torch.from_numpy(self.gt)


@pytest.mark.parametrize("protocol", ["fastsam3d", "cvpr25"])
def test_perfect_predictions_stop_clicking_without_crashing(protocol):
    gt = np.zeros((32, 32, 32), bool)
    gt[8:20, 10:22, 6:18] = True
    oracle = Oracle()
    oracle.start = lambda raw, normalised: setattr(oracle, "gt", gt)
    image = gt.astype(np.float32) + 1
    dices, _, clicks = E.evaluate_structure(
        oracle, image, gt, 5, protocol, np.random.default_rng(0)
    )
    assert dices == [1.0] * 5 and oracle.calls == 1 and len(clicks) == 1


def test_random_walker_separates_two_regions():
    image = torch.zeros((24, 24, 24))
    image[6:18, 6:18, 6:18] = 1.0
    seeds = torch.full((24, 24, 24), -1, dtype=torch.int8)
    seeds[12, 12, 12] = 1
    seeds[0], seeds[-1] = 0, 0
    prob = random_walker(image, seeds)
    assert prob[8, 8, 8] > 0.5 and prob[2, 12, 12] < 0.5


def _args(dataset, tmp_path, model, protocol, **extra):
    parser = argparse.ArgumentParser()
    E.add_parser(parser.add_subparsers())
    argv = [
        "eval",
        "--model",
        str(model),
        "--images",
        str(dataset / "images"),
        "--labels",
        str(dataset / "labels"),
        "--clicks",
        "3",
        "--protocol",
        protocol,
        "--json",
        str(tmp_path / "out.json"),
        "--table",
        str(tmp_path / "out.md"),
        "--device",
        "cpu",
    ]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    return parser.parse_args(argv)


@pytest.mark.parametrize("protocol", ["fastsam3d", "cvpr25"])
def test_cli_eval_writes_per_click_dice_for_every_structure(dataset, tmp_path, protocol):
    weights = tmp_path / "tiny.safetensors"
    save_model(weights, build_model("tiny"))
    args = _args(dataset, tmp_path, weights, protocol)
    assert args.func(args).startswith("| method | protocol |")
    report = json.loads((tmp_path / "out.json").read_text())
    keys = {(r["case"], r["structure"]) for r in report["results"]}
    assert keys == {("c0", 1), ("c0", 4), ("c1", 1), ("c1", 4)}
    for result in report["results"]:
        assert len(result["dice"]) == 3 and all(0 <= d <= 1 for d in result["dice"])
        assert isinstance(result["case"], str) and isinstance(result["structure"], int)
    assert "| 1 click | 2 clicks | 3 clicks |" in (tmp_path / "out.md").read_text()


class SoftBall:
    """A fake model: logits of a ball 6 mm larger than the crop's bright ball, soft edged."""

    config = SimpleNamespace(name="soft-ball", intensity_clip=None)
    device = torch.device("cpu")

    def eval(self):
        return self

    def encode(self, view):
        return view

    def decode(self, embedding, points, labels, mask_input=None, return_mask=True):
        lattice = torch.arange(32, dtype=torch.float32) * 4 + 1.5  # cell centres in voxels
        grid = torch.stack(torch.meshgrid(lattice, lattice, lattice, indexing="ij"))
        distance = (grid - 64).square().sum(0).sqrt()
        return (16.0 - distance)[None, None] / 3, None, None


def test_refinement_in_eval_snaps_to_the_crop_edges(dataset, tmp_path):
    axes = torch.arange(128, dtype=torch.float32)
    distance = (torch.stack(torch.meshgrid(axes, axes, axes, indexing="ij")) - 64).square()
    gt = (distance.sum(0).sqrt() < 12).numpy()
    image = gt.astype(np.float32) * 100 + 50
    dice = {}
    for refine in (None, RefineSettings()):
        segmenter = E.SamSegmenter(SoftBall(), newest_only=False, refine=refine)
        rng = np.random.default_rng(0)
        dice[refine is not None] = E.evaluate_structure(segmenter, image, gt, 2, "cvpr25", rng)[0]
    assert max(dice[False]) < 0.8 and min(dice[True]) > 0.95
    weights = tmp_path / "tiny.safetensors"
    save_model(weights, build_model("tiny"))
    args = _args(dataset, tmp_path, weights, "cvpr25")
    args.refine = True
    args.func(args)
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["refine"] is True and report["click_walker"] == "ct"
    with pytest.raises(E.InputError, match="--refine"):
        E.build_segmenter("random-walker", "cvpr25", "cpu", refine=True)


class CoreBall(SoftBall):
    """A fake model whose confident mask is a 12 mm ball in the middle of the crop."""

    def decode(self, embedding, points, labels, mask_input=None, return_mask=True):
        low, _, _ = super().decode(embedding, points, labels, mask_input, return_mask)
        return (low * 3 - 8) * 4, None, None


def test_click_walker_in_eval_runs_on_ct_cases():
    """An organ of 45 voxels' radius in air: the model's core alone scores low; on a CT case
    (lowest value below -500) the click walker adds the organ, elsewhere it stays off."""
    axes = torch.arange(128, dtype=torch.float32)
    distance = (torch.stack(torch.meshgrid(axes, axes, axes, indexing="ij")) - 64).square()
    gt = (distance.sum(0).sqrt() < 45).numpy()
    image = np.where(gt, 40.0, -1000.0).astype(np.float32)
    dice = {}
    for minimum in (-1000.0, 0.0):
        segmenter = E.SamSegmenter(CoreBall(), newest_only=False, refine=RefineSettings())
        segmenter.volume_minimum = minimum
        rng = np.random.default_rng(0)
        dice[minimum] = E.evaluate_structure(segmenter, image, gt, 1, "cvpr25", rng)[0][0]
    assert dice[0.0] < 0.3 and dice[-1000.0] > 0.9


def test_random_walker_baseline_on_the_same_clicks_scores_well(dataset, tmp_path):
    args = _args(dataset, tmp_path, "random-walker", "fastsam3d", scoring="volume", structures=4)
    args.clicks = 2
    assert "random-walker" in args.func(args)
    report = json.loads((tmp_path / "out.json").read_text())
    assert [r["structure"] for r in report["results"]] == [4, 4]
    assert report["summary"]["mean_max_dice"] > 0.7
    assert isinstance(RandomWalkerSegmenter().name, str)


@pytest.mark.parametrize(
    ("protocol", "points", "newest"),
    [
        ("fastsam3d", None, True),
        ("cvpr25", None, False),
        ("fastsam3d", "all", False),
        ("cvpr25", "newest", True),
    ],
)
def test_point_policy_follows_the_protocol_unless_chosen(tmp_path, protocol, points, newest):
    weights = tmp_path / "tiny.safetensors"
    save_model(weights, build_model("tiny"))
    segmenter = E.build_segmenter(str(weights), protocol, "cpu", points)
    assert segmenter.newest_only is newest


@pytest.mark.parametrize("model", ["litemedsam", "litemedsam-gtbox"])
def test_litemedsam_baseline_writes_the_usual_report(dataset, tmp_path, monkeypatch, model):
    from fastsam3d import slicewise
    from fastsam3d.modeling.lite_medsam import build_lite_medsam

    monkeypatch.setattr(slicewise, "build_lite_medsam", lambda: build_lite_medsam(tiny=True))
    weights = tmp_path / "lite.pth"
    torch.manual_seed(0)
    torch.save(build_lite_medsam(tiny=True).state_dict(), weights)
    args = _args(dataset, tmp_path, model, "cvpr25", structures=4, weights=weights)
    table = args.func(args)
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["model"] == model and report["oracle"] is (model == "litemedsam-gtbox")
    assert ("oracle" in table) is report["oracle"]
    assert [(r["case"], r["structure"]) for r in report["results"]] == [("c0", 4), ("c1", 4)]
    for result in report["results"]:
        assert len(result["dice"]) == 3 and all(0 <= d <= 1 for d in result["dice"])
    assert set(report["summary"]) == {"structures", "mean_dice_per_click", "mean_max_dice"}


class _ViewModel:
    """Encodes the view as is; decodes "view > 0.5" at the low-res stride (no prompts used)."""

    mask_threshold = 0.0
    device = torch.device("cpu")
    config = argparse.Namespace(name="view")

    def __init__(self) -> None:
        self.views, self.decoded_points = [], []

    def eval(self):
        return self

    def encode(self, x):
        self.views.append(tuple(x.shape))
        return x

    def decode(self, embedding, points, labels, mask_input=None, return_mask=True):
        self.decoded_points.append(points.shape[1])
        return torch.nn.functional.avg_pool3d(embedding, 4) - 0.5, None, None


def _ball(radius: float) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*[torch.arange(128.0)] * 3, indexing="ij"))
    return (((grid - 63.5) ** 2).sum(0).sqrt() < radius).float()


def test_fine_spacing_keeps_small_structures_fine_and_zooms_out_for_large_ones():
    small, large = _ball(12), _ball(40)
    model = _ViewModel()
    segmenter = E.SamSegmenter(model, newest_only=False, fine_spacing=0.75)
    segmenter.start(small, small)
    mask = segmenter.predict([[64, 64, 64]], [1])
    assert model.views == [(1, 1, 128, 128, 128)] and segmenter.side == 64
    assert E.dice_score(mask.numpy(), small.bool().numpy()) > 0.95
    # too large for the 64^3 fine view: back to the whole crop, both clicks decoded again
    segmenter.start(large, large)
    model.decoded_points.clear()
    segmenter.predict([[64, 64, 64], [70, 64, 64]], [1, 1])
    assert len(model.views) == 3 and segmenter.side == 128
    assert model.decoded_points == [2, 1, 2]
    plain = E.SamSegmenter(_ViewModel(), newest_only=False)
    plain.start(large, large)
    expected = plain.predict([[64, 64, 64], [70, 64, 64]], [1, 1])
    assert torch.equal(segmenter.predict([[64, 64, 64], [70, 64, 64]], [1, 1]), expected)


def test_fine_spacing_is_refused_for_baselines_and_out_of_range():
    with pytest.raises(E.InputError, match="fine-spacing"):
        E.build_segmenter("random-walker", "cvpr25", "cpu", fine_spacing=0.75)
    with pytest.raises(E.InputError, match="fine_spacing"):
        E.SamSegmenter(_ViewModel(), newest_only=True, fine_spacing=1.5)


def test_paired_difference_pairs_sequences_by_case_structure_and_seed():
    base = [
        {"case": "a", "structure": 1, "seed": 1, "dice": [0.5, 0.6]},
        {"case": "a", "structure": 1, "seed": 2, "dice": [0.4, 0.9]},
        {"case": "a", "structure": 2, "seed": 1, "dice": [0.7, 0.7]},
        {"case": "b", "structure": 1, "seed": 1, "dice": [0.0, 0.0]},  # no partner: left out
    ]
    # listed in another order; the seed-2 sequence falls by 0.3 at the second click
    other = [
        {"case": "a", "structure": 2, "seed": 1, "dice": [0.7, 0.95]},
        {"case": "a", "structure": 1, "seed": 2, "dice": [0.4, 0.6]},
        {"case": "a", "structure": 1, "seed": 1, "dice": [0.5, 0.7]},
    ]
    report = E.paired_difference(base, other)
    assert report["sequences"] == 3
    second = np.array([0.1, -0.3, 0.25])
    assert report["mean"][0] == 0.0 and report["p_value"][0] is None
    assert report["mean"][1] == pytest.approx(second.mean())
    assert report["standard_error"][1] == pytest.approx(second.std(ddof=1) / np.sqrt(3))
    assert 0 < report["p_value"][1] < 1
    assert (report["better"], report["worse"]) == ([0, 1], [0, 1])


def test_paired_difference_refuses_reports_without_common_sequences_or_equal_lengths():
    base = [{"structure": 1, "dice": [0.5, 0.6]}]
    with pytest.raises(E.InputError, match="share no"):
        E.paired_difference(base, [{"structure": 2, "dice": [0.5, 0.6]}])
    with pytest.raises(E.InputError, match="numbers of clicks"):
        E.paired_difference(base, [{"structure": 1, "dice": [0.5]}])


def test_compare_dice_script_prints_one_row_per_click(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_dice.py"
    rng = np.random.default_rng(0)
    # eighths: each difference is exactly 0.5, so no spread and no t-test
    base = [
        {"structure": s, "seed": 7, "dice": (rng.integers(0, 4, 3) / 8).tolist()}
        for s in range(1, 9)
    ]
    other = [{**r, "dice": [v + 0.5 for v in r["dice"]]} for r in base]
    paths = []
    for name, results in (("base", base), ("other", other)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps({"results": results}))
    done = subprocess.run(
        [sys.executable, str(script), *map(str, paths), "--large", "0.4"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "8 paired sequences"
    assert "better by > 0.4" in lines[2]
    assert lines[4:] == [f"| {c} | +0.500 | 0.000 | - | 8 | 0 |" for c in (1, 2, 3)]
