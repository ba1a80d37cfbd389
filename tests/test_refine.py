"""The random walker with a prior (fastsam3d.walker) and the mask refinement (fastsam3d.refine)."""

import functools

import numpy as np
import pytest
import torch

from fastsam3d import walker
from fastsam3d.errors import InputError
from fastsam3d.refine import (
    RefineSettings,
    block_mean,
    click_seeds,
    click_walker,
    clicked_parts,
    coarsening,
    refine_mask,
)
from fastsam3d.refine import _band_box as band_box
from fastsam3d.walker import random_walker


def _ball(shape, centre, radius):
    grid = torch.stack(
        torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    )
    return (grid - torch.tensor(centre, dtype=torch.float32)[:, None, None, None]).square().sum(
        0
    ).sqrt() - radius


def _dice(a, b) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_edge_weights_equal_the_unclamped_formula_to_the_bit():
    """Strong edges drive the exponent far below ``EXP_FLOOR``: the clamp changes nothing."""
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(12, 10, 8, generator=generator)
    image[4:] += 1000.0  # one edge thousands of times the mean squared difference
    weights = walker.edge_weights(image, beta=90.0, spacing=(1.0, 1.0, 2.0))
    diffs = [image.diff(dim=axis).square() for axis in range(3)]
    scale = torch.cat([d.flatten() for d in diffs]).mean()
    for axis, (w, d) in enumerate(zip(weights, diffs, strict=True)):
        exponent = -90.0 * d / scale
        expected = (torch.exp(exponent) + 1e-6) * (1.0 / (1.0, 1.0, 2.0)[axis]) ** 2
        assert torch.equal(w, expected)
    assert (-90.0 * diffs[0] / scale).min() < walker.EXP_FLOOR


@pytest.mark.parametrize("shape", [(5, 4, 3), (1, 6, 7), (6, 1, 1), (4, 5, 1)])
def test_the_flat_laplacian_is_the_graph_laplacian(shape):
    """Each voxel couples to its six face neighbours only: the flat index offsets must not
    wrap from one row or plane into the next."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(shape, generator=generator)
    x = torch.randn(shape, generator=generator)
    weights = walker.edge_weights(image, beta=5.0)
    expected = torch.zeros(shape, dtype=torch.float64)
    degree = torch.zeros(shape, dtype=torch.float64)
    for axis, w in enumerate(weights):
        n = shape[axis]
        w, x64 = w.double(), x.double()
        step = x64.narrow(axis, 0, n - 1) - x64.narrow(axis, 1, n - 1)
        expected.narrow(axis, 0, n - 1).add_(w * step)
        expected.narrow(axis, 1, n - 1).sub_(w * step)
        degree.narrow(axis, 0, n - 1).add_(w)
        degree.narrow(axis, 1, n - 1).add_(w)
    edges = walker.flat_edges(weights, shape)
    torch.testing.assert_close(walker.laplacian(x, edges).double(), expected)
    torch.testing.assert_close(walker.degree(edges, shape).double(), degree)


@pytest.mark.parametrize("shape", [(5, 4, 3), (1, 6, 7), (6, 1, 1)])
def test_the_scaled_product_is_the_scaled_laplacian(shape):
    """``unit_diagonal_product`` with ``scaled_edges`` is ``S A S x``, ``A`` the Laplacian
    with ``diagonal`` as its diagonal and ``S = diag(unknown / sqrt(diagonal))``: a unit
    diagonal on the unknowns, zero on the seeds."""
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(shape, generator=generator)
    edges = walker.flat_edges(walker.edge_weights(image, beta=5.0), shape)
    diagonal = walker.degree(edges, shape) + 0.3
    unknown = (torch.rand(shape, generator=generator) > 0.3).float()
    scale = unknown / diagonal.sqrt()
    x = torch.randn(shape, generator=generator) * unknown
    product = walker.unit_diagonal_product(x, walker.scaled_edges(edges, scale))
    expected = walker.laplacian(x * scale, edges, diagonal) * scale
    torch.testing.assert_close(product, expected, rtol=1e-5, atol=1e-6)


def test_the_walker_takes_permuted_inputs():
    """Arrays in another memory order (a transposed volume) give the same solution."""
    image = torch.rand(6, 7, 8, generator=torch.Generator().manual_seed(1))
    seeds = torch.full(image.shape, -1, dtype=torch.int8)
    seeds[1, 1, 1], seeds[4, 5, 6] = 1, 0
    prior = torch.full(image.shape, 0.3)
    solve = functools.partial(random_walker, beta=5.0, gamma=0.1, iterations=500, tol=1e-6)
    expected = solve(image, seeds, prior=prior)
    permuted = [t.permute(2, 0, 1).contiguous().permute(1, 2, 0) for t in (image, seeds, prior)]
    assert not permuted[0].is_contiguous()
    torch.testing.assert_close(solve(permuted[0], permuted[1], prior=permuted[2]), expected)


def test_a_strong_prior_is_returned_and_no_prior_is_the_plain_walker():
    image = torch.rand(12, 12, 12)
    prior = torch.rand(12, 12, 12)
    seeds = torch.full((12, 12, 12), -1, dtype=torch.int8)
    strong = random_walker(image, seeds, prior=prior, gamma=1e6, tol=1e-8)
    assert torch.allclose(strong, prior, atol=1e-4)
    seeds[0], seeds[-1] = 0, 1
    plain = random_walker(image, seeds, tol=1e-8)
    ignored = random_walker(image, seeds, prior=prior, gamma=0.0, tol=1e-8)
    assert torch.equal(plain, ignored)
    # linear potential between the two seeded faces on a uniform image
    flat = random_walker(
        torch.zeros(12, 4, 4), torch.where(seeds[:, :4, :4] >= 0, seeds[:, :4, :4], -1), tol=1e-10
    )
    assert torch.allclose(flat[:, 0, 0], torch.linspace(0, 1, 12), atol=1e-4)


def test_refinement_moves_a_blurred_boundary_onto_the_image_edge():
    """Logits of a ball 3 voxels too large with a soft edge (what 6 mm logits look like) snap
    back to the bright ball in the image."""
    shape, centre = (48, 48, 48), (24, 23, 25)
    truth = _ball(shape, centre, 10) < 0
    image = truth.float() * 100 + torch.randn(shape) * 3
    logits = -_ball(shape, centre, 13) / 2
    before = _dice(logits > 0, truth)
    after = refine_mask(image, logits, [centre], [1])
    assert before < 0.7 and _dice(after, truth) > 0.95


def test_confident_logits_without_a_band_are_thresholded():
    logits = torch.full((16, 16, 16), -20.0)
    logits[4:10, 4:10, 4:10] = 20.0
    out = refine_mask(torch.rand(16, 16, 16), logits, [(6, 6, 6)], [1])
    assert torch.equal(out, logits > 0)


def test_a_negative_click_is_a_background_seed():
    shape = (32, 32, 32)
    logits = -_ball(shape, (16, 16, 16), 8) / 4
    image = torch.zeros(shape)
    out = refine_mask(image, logits, [(16, 16, 16), (16, 16, 22)], [1, 0])
    assert out[16, 16, 16] and not out[16, 16, 22]


def test_parts_without_a_positive_click_are_dropped():
    mask = torch.zeros(20, 20, 20, dtype=torch.bool)
    mask[2:6, 2:6, 2:6] = True  # clicked
    mask[10:14, 10:14, 10:14] = True  # touches the first only through nothing
    mask[6, 6, 6] = True  # diagonal neighbour of the first: the same part (26-connected)
    mask[16:19, 2:5, 2:5] = True  # a negative click does not keep a part
    kept = clicked_parts(mask, [(3, 3, 3), (17, 3, 3)], [1, 0])
    expected = torch.zeros_like(mask)
    expected[2:6, 2:6, 2:6] = True
    expected[6, 6, 6] = True
    assert torch.equal(kept, expected)
    both = clicked_parts(mask, [(3.2, 2.9, 3), (12, 12, 12)], [1, 1])
    expected[10:14, 10:14, 10:14] = True
    assert torch.equal(both, expected)
    # no positive click inside the mask: nothing to go by, nothing dropped
    assert torch.equal(clicked_parts(mask, [(0, 19, 19), (40, 3, 3)], [1, 1]), mask)


def test_refinement_keeps_the_clicked_parts_where_the_click_walker_ran():
    logits = torch.full((24, 24, 24), -20.0)
    logits[2:8, 2:8, 2:8] = 20.0
    logits[14:20, 14:20, 14:20] = 20.0
    image, walker = torch.rand(24, 24, 24), torch.zeros(24, 24, 24)
    kept = refine_mask(image, logits, [(4, 4, 4)], [1], walker=walker)
    assert kept[4, 4, 4] and not kept[16, 16, 16]
    every = RefineSettings(clicked_parts_only=False)
    assert torch.equal(
        refine_mask(image, logits, [(4, 4, 4)], [1], settings=every, walker=walker), logits > 0
    )
    # without the walker (MR by default) every part stays
    assert torch.equal(refine_mask(image, logits, [(4, 4, 4)], [1]), logits > 0)


def test_large_boxes_are_solved_coarser_and_agree():
    shape, centre = (64, 64, 40), (30, 33, 20)
    truth = _ball(shape, centre, 12) < 0
    image = truth.float() * 100
    logits = -_ball(shape, centre, 14) / 2
    spacing = (0.8, 0.8, 1.5)
    full = refine_mask(image, logits, [centre], [1], spacing)
    small = RefineSettings(max_voxels=20**3)
    coarse = refine_mask(image, logits, [centre], [1], spacing, small)
    assert _dice(full, truth) > 0.95 and _dice(coarse, full) > 0.9


@pytest.mark.parametrize(
    ("shape", "factors"), [((7, 5, 4), (2, 2, 3)), ((12, 6, 5), (3, 1, 2)), ((1, 4, 4), (2, 2, 2))]
)
def test_block_means_are_the_padded_blocks_means_whatever_the_threads(shape, factors):
    """Block means equal the means of the blocks of the volume padded with copies of its last
    planes, and the slabs the first axis is cut into (one per thread) change no bit."""
    volume = torch.rand(shape, generator=torch.Generator().manual_seed(3))
    padded = np.pad(
        volume.numpy(), [(0, -n % f) for n, f in zip(shape, factors, strict=True)], mode="edge"
    )
    blocks = padded.reshape(
        [m for n, f in zip(padded.shape, factors, strict=True) for m in (n // f, f)]
    ).mean(axis=(1, 3, 5))
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(block_mean(volume, factors))
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(results[0].numpy(), blocks, rtol=1e-6)
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_the_band_box_is_the_bounding_box_grown_by_the_margin():
    """The refinement's solve box: the band's bounding box, grown by the margin in mm per axis
    and cut at the volume; None for an empty band."""
    rng = np.random.default_rng(5)
    for density in (0.002, 0.05):
        band = rng.random((19, 23, 17)) < density
        band[3, 4, 5] = True
        box = band_box(torch.from_numpy(band), (1.0, 2.0, 0.5), margin_mm=2.0)
        hits = np.nonzero(band)
        grow = (2, 1, 4)
        expected = tuple(
            slice(max(int(h.min()) - g, 0), min(int(h.max()) + 1 + g, n))
            for h, g, n in zip(hits, grow, band.shape, strict=True)
        )
        assert box == expected
    assert band_box(torch.zeros(4, 5, 6, dtype=torch.bool), (1.0, 1.0, 1.0), 2.0) is None


def test_coarsening_takes_the_finest_axes_first():
    assert coarsening((40, 40, 40), (1.0, 1.0, 1.0), 128**3) == [1, 1, 1]
    thin = coarsening((512, 512, 40), (0.7, 0.7, 5.0), 128**3)
    assert thin[0] > 1 and thin[1] > 1 and thin[2] == 1
    factors = coarsening((300, 200, 100), (1.0, 1.0, 1.0), 50**3)
    assert np.prod([np.ceil(n / f) for n, f in zip((300, 200, 100), factors, strict=True)]) <= 50**3


@pytest.mark.parametrize(
    "bad",
    [
        {"beta": -1},
        {"prior_weight": 0},
        {"band": 0.5},
        {"max_voxels": 0},
        {"click_walker": True},
        {"walker_side": 1},
    ],
)
def test_settings_are_checked(bad):
    with pytest.raises(InputError):
        RefineSettings(**bad)


def test_shapes_must_match():
    with pytest.raises(InputError, match="differ"):
        refine_mask(torch.zeros(4, 4, 4), torch.zeros(4, 4, 5), [], [])


def test_click_seeds_fix_balls_over_the_closed_faces():
    closed = [[True, False], [False, False], [False, True]]
    seeds = click_seeds((10, 10, 10), [(5, 5, 5), (2.2, 2, 2)], [1, 0], 1.0, closed)
    assert seeds[5, 5, 5] == 1 and seeds[4, 5, 5] == 1 and seeds[4, 4, 5] == -1
    assert seeds[2, 2, 2] == 0 and seeds[3, 2, 2] == 0 and seeds[1, 2, 2] == -1
    assert (seeds[0] == 0).all() and (seeds[:, :, -1] == 0).all()
    assert (seeds[-1, :, :-1] == -1).all() and (seeds[1:, 0, 3] == -1).all()
    # a radius below one voxel still fixes the nearest voxel; clicks outside are ignored
    tiny = click_seeds((10, 10, 10), [(5.2, 4.9, 5.0), (30, 5, 5)], [1, 1], 0.1, closed)
    assert int((tiny == 1).sum()) == 1 and tiny[5, 5, 5] == 1


def test_click_walker_fills_a_uniform_region_from_one_click():
    shape, centre = (48, 48, 48), (24, 22, 25)
    truth = _ball(shape, centre, 14) < 0
    image = truth.float() * 100 + torch.randn(shape, generator=torch.Generator().manual_seed(0))
    prob = click_walker(image, [centre], [1])
    assert _dice(prob > 0.5, truth) > 0.95
    # coarse to fine agrees with one long solve from zero
    seeds = click_seeds(shape, [centre], [1], 1.5)
    plain = random_walker(image, seeds, beta=90.0, tol=1e-8, iterations=3000)
    assert _dice(prob > 0.5, plain > 0.5) > 0.99


def test_the_click_walker_runs_on_ct_by_default():
    assert RefineSettings().walks_clicks(-1024.0) and not RefineSettings().walks_clicks(0.0)
    assert RefineSettings(click_walker="on").walks_clicks(0.0)
    assert not RefineSettings(click_walker="off").walks_clicks(-1024.0)


def test_click_walker_needs_a_positive_click_and_background():
    image = torch.rand(20, 20, 20)
    open_faces = np.zeros((3, 2), dtype=bool)
    assert click_walker(image, [(10, 10, 10)], [0]) is None
    assert click_walker(image, [(10, 10, 10)], [1], open_faces) is None
    both = click_walker(image, [(10, 10, 10), (3, 3, 3)], [1, 0], open_faces)
    assert both is not None and both[10, 10, 10] == 1 and both[3, 3, 3] == 0


def test_the_click_walker_grows_a_mask_the_model_left_small():
    """The model's confident mask covers a third of a uniform ball: its noisy OR with the
    click walker gets the ball; the model alone keeps the small mask."""
    shape, centre = (48, 48, 48), (24, 24, 24)
    truth = _ball(shape, centre, 15) < 0
    image = truth.float() * 100
    logits = -_ball(shape, centre, 5) * 4
    alone = refine_mask(image, logits, [centre], [1])
    walker = click_walker(image, [centre], [1])
    merged = refine_mask(image, logits, [centre], [1], walker=walker)
    assert _dice(alone, truth) < 0.2 and _dice(merged, truth) > 0.95
    with pytest.raises(InputError, match="walker"):
        refine_mask(image, logits, [centre], [1], walker=walker[1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_click_walker_agrees_with_cpu():
    shape, centre = (64, 64, 64), (30, 33, 20)
    truth = _ball(shape, centre, 12) < 0
    image = truth.float() * 100 + torch.randn(shape) * 3
    cpu = click_walker(image, [centre], [1])
    cuda = click_walker(image.cuda(), [centre], [1])
    assert cuda.is_cuda and _dice(cuda.cpu() > 0.5, cpu > 0.5) > 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_refinement_agrees_with_cpu():
    shape, centre = (64, 64, 40), (30, 33, 20)
    truth = _ball(shape, centre, 12) < 0
    image = truth.float() * 100 + torch.randn(shape) * 3
    logits = -_ball(shape, centre, 15) / 2
    cpu = refine_mask(image, logits, [centre], [1], (0.8, 0.8, 1.5))
    cuda = refine_mask(image.cuda(), logits.cuda(), [centre], [1], (0.8, 0.8, 1.5))
    assert cuda.is_cuda and _dice(cuda.cpu(), cpu) > 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("iterations", [200, 30])
def test_cuda_graph_steps_equal_eager_steps(monkeypatch, iterations):
    shape, centre = (40, 36, 20), (20, 18, 10)
    image = (_ball(shape, centre, 9) < 0).float() * 100 + torch.randn(shape) * 3
    seeds = torch.full(shape, -1, dtype=torch.int8)
    seeds[20, 18, 10], seeds[0] = 1, 0
    prior = torch.sigmoid(-_ball(shape, centre, 11))
    args = (image.cuda(), seeds.cuda())
    kwargs = {"prior": prior.cuda(), "gamma": 0.01, "iterations": iterations, "tol": 1e-6}
    monkeypatch.setattr(walker, "GRAPH_STEPS", False)
    eager = random_walker(*args, **kwargs)
    monkeypatch.setattr(walker, "GRAPH_STEPS", True)
    graphed = random_walker(*args, **kwargs)
    assert torch.equal(graphed, eager)
    assert not torch.equal(eager, random_walker(*args, **{**kwargs, "iterations": 8}))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_graph_steps_on_the_second_gpu():
    shape, centre = (40, 36, 20), (20, 18, 10)
    image = (_ball(shape, centre, 9) < 0).float() * 100 + torch.randn(shape) * 3
    seeds = torch.full(shape, -1, dtype=torch.int8)
    seeds[20, 18, 10], seeds[0] = 1, 0
    first, second = (
        random_walker(image.to(device), seeds.to(device), iterations=200, tol=1e-6).cpu()
        for device in ("cuda:0", "cuda:1")
    )
    assert torch.equal(first, second)
