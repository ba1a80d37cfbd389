"""Click simulation: the training sampler and both evaluation protocols, with known answers."""

import numpy as np
import pytest
import torch

from fastsam3d import clicks as C


def ball(shape, centre, radius):
    grid = np.indices(shape)
    return ((grid - np.array(centre)[:, None, None, None]) ** 2).sum(0) <= radius**2


def rng(seed=0):
    return np.random.default_rng(seed)


def test_first_ritm_click_is_positive_and_in_the_deep_core():
    gt = ball((40, 40, 40), (20, 18, 22), 8)
    pred = np.zeros_like(gt)
    for seed in range(20):
        click = C.ritm_click(pred, gt, rng(seed))
        assert click.positive
        assert np.linalg.norm(np.subtract(click.point, (20, 18, 22))) <= 4.5


def test_ritm_picks_the_larger_error_map():
    gt = ball((40, 40, 40), (20, 20, 20), 6)
    pred = gt | ball((40, 40, 40), (8, 8, 8), 5)  # FP ball larger than any FN
    pred &= ~ball((40, 40, 40), (20, 20, 25), 1)  # tiny FN
    click = C.ritm_click(pred, gt, rng())
    assert not click.positive and np.linalg.norm(np.subtract(click.point, (8, 8, 8))) <= 3


def test_ritm_edt_counts_the_array_border_as_background():
    gt = np.zeros((20, 20, 20), bool)
    gt[:6, :6, :6] = True  # corner cube: 3 deep with a black border, 6 without
    assert C._edt_black_border(gt).max() == 3
    click = C.ritm_click(np.zeros_like(gt), gt, rng())
    assert click.positive and max(click.point) <= 4


def test_random_click_is_uniform_over_the_error():
    gt = np.zeros((10, 10, 10), bool)
    gt[2, 3, 4] = True
    pred = np.zeros_like(gt)
    pred[7, 7, 7] = True
    seen = {(C.random_click(pred, gt, rng(s)).point) for s in range(40)}
    assert seen == {(2, 3, 4), (7, 7, 7)}
    assert C.random_click(gt, gt, rng()) is None


def test_cvpr25_click_is_the_centre_of_the_largest_error_component():
    gt = ball((48, 48, 48), (30, 30, 30), 7)
    pred = np.zeros_like(gt)
    pred |= ball((48, 48, 48), (8, 8, 8), 3)  # smaller FP component
    click = C.cvpr25_click(pred, gt, rng())
    assert click.point == (30, 30, 30) and click.positive


def test_cvpr25_uses_26_connectivity():
    error = np.zeros((20, 20, 20), bool)
    # Two diagonal-touching cubes form one 26-connected component larger than the other blob.
    error[2:6, 2:6, 2:6] = True
    error[6:10, 6:10, 6:10] = True
    error[14:19, 14:19, 14:19] = True  # 125 voxels vs 128
    component = C.largest_component(error)
    assert component.sum() == 128


@pytest.mark.parametrize("protocol", C.PROTOCOLS)
def test_protocols_return_none_on_a_perfect_prediction(protocol):
    gt = ball((16, 16, 16), (8, 8, 8), 4)
    for index in range(4):
        assert C.protocol_click(protocol, index, gt.copy(), gt, rng()) is None


def test_fastsam3d_schedule_uses_ritm_then_random():
    gt = ball((40, 40, 40), (20, 20, 20), 10)
    pred = np.zeros_like(gt)
    cores = [C.protocol_click("fastsam3d", 1, pred, gt, rng(s)).point for s in range(30)]
    randoms = [C.protocol_click("fastsam3d", 2, pred, gt, rng(s)).point for s in range(30)]
    depth = C._edt_black_border(gt)
    assert min(depth[p] for p in cores) > depth.max() / 2
    assert min(depth[p] for p in randoms) < depth.max() / 2


def test_unknown_protocol_is_refused():
    with pytest.raises(ValueError):
        C.protocol_click("nope", 0, np.zeros((2, 2, 2), bool), np.ones((2, 2, 2), bool), rng())


def test_training_clicks_are_in_the_error_with_the_right_labels():
    target = torch.zeros((3, 1, 16, 16, 16), dtype=torch.bool)
    target[:, :, 4:12, 4:12, 4:12] = True
    pred = torch.zeros_like(target)
    pred[1] = target[1]
    pred[1, :, 0:2, 0:2, 0:2] = True  # only FP error
    pred[2] = target[2]  # perfect
    generator = torch.Generator().manual_seed(0)
    points, labels = C.sample_training_clicks(pred, target, generator, core=True)
    assert points.shape == (3, 1, 3) and labels.shape == (3, 1)
    assert labels[:, 0].tolist() == [1, 0, -1]
    x, y, z = points[0, 0].long().tolist()
    assert target[0, 0, x, y, z]
    x, y, z = points[1, 0].long().tolist()
    assert max(x, y, z) < 2
