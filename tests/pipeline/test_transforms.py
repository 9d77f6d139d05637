"""Joint transforms of section 4.1: nearest-only labels, exact crops, paired flips, the scale set."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PAPER_TRAIN_SCALES,
    EvalTransform,
    TrainTransform,
    denormalize,
    nearest_indices,
    normalize_batch,
)

MEAN_COLOUR = [124, 116, 104]  # round(255 * IMAGENET_MEAN)


def _random_pair(rng: np.random.Generator, h: int, w: int, values: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    label = rng.choice(np.array(values, dtype=np.uint8), size=(h, w))
    return image, label


def test_labels_hold_only_input_values_or_ignore_after_any_transform() -> None:
    # Per-pixel noise between 3 and 17: any interpolation of the label (bilinear, area, ...)
    # at a non-unit scale would create values in between, e.g. 10.
    rng = np.random.default_rng(0)
    image, label = _random_pair(rng, 17, 23, (3, 17))
    transform = TrainTransform(crop_size=(24, 20))
    seen: set[int] = set()
    for _ in range(60):
        _, out = transform(image, label, rng)
        seen |= set(out.unique().tolist())
    assert seen <= {3, 17, 255}
    assert {3, 17, 255} <= seen  # the test exercised both classes and padding


@pytest.mark.parametrize("size", [(5, 7), (40, 60), (30, 10), (16, 24)])
def test_crop_size_is_exact_and_types_are_right(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    image, label = _random_pair(rng, *size, (0, 1, 2))
    transform = TrainTransform(crop_size=(16, 24))
    for _ in range(12):
        img, lab = transform(image, label, rng)
        assert img.shape == (16, 24, 3) and img.dtype == torch.uint8
        assert lab.shape == (16, 24) and lab.dtype == torch.uint8


def _observed_scale(transform: TrainTransform, rng: np.random.Generator) -> float:
    # An 8 x 8 image inside a 20 x 20 crop: even at scale 2 the whole scaled image fits,
    # so the count of non-ignored label pixels is (8 s)^2 and reveals s.
    image = np.full((8, 8, 3), 100, dtype=np.uint8)
    label = np.zeros((8, 8), dtype=np.uint8)
    _, lab = transform(image, label, rng)
    side = math.sqrt(int((lab != 255).sum()))
    assert side == int(side), "the scaled label is not a square"
    return side / 8


def test_scales_come_from_the_discrete_set_and_all_of_it() -> None:
    rng = np.random.default_rng(2)
    paper = TrainTransform(crop_size=(20, 20))
    observed = {_observed_scale(paper, rng) for _ in range(200)}
    assert observed == {0.75, 1.0, 1.25, 1.5, 1.75, 2.0} == set(PAPER_TRAIN_SCALES)

    two = TrainTransform(crop_size=(20, 20), scales=(0.75, 2.0))
    assert {_observed_scale(two, rng) for _ in range(50)} == {0.75, 2.0}


def test_flip_moves_image_and_label_together() -> None:
    # Asymmetric on purpose: column x has label x and grey level 30 x.
    h, w = 6, 8
    label = np.tile(np.arange(w, dtype=np.uint8), (h, 1))  # (6, 8)
    image = np.repeat((label * 30)[..., None], 3, axis=2).astype(np.uint8)  # (6, 8, 3)
    rng = np.random.default_rng(3)
    transform = TrainTransform(crop_size=(h, w), scales=(1.0,))
    flips = []
    for _ in range(40):
        img, lab = transform(image, label, rng)
        pixels = img.numpy()
        # Image and label agree pixel by pixel, whichever way the pair went.
        assert np.array_equal(pixels[..., 0].astype(np.int64), lab.numpy().astype(np.int64) * 30)
        if torch.equal(lab, torch.from_numpy(label)):
            flips.append(False)
        else:
            assert torch.equal(lab, torch.from_numpy(label[:, ::-1].copy()))
            flips.append(True)
    assert any(flips) and not all(flips)

    no_flip = TrainTransform(crop_size=(h, w), scales=(1.0,), flip=False)
    for _ in range(20):
        _, lab = no_flip(image, label, rng)
        assert torch.equal(lab, torch.from_numpy(label))


def test_image_and_label_stay_aligned_through_scale_crop_and_pad() -> None:
    # 4 x 4 blocks of 8 px; block label k is drawn in grey level 20 + 40 k.
    blocks = np.arange(16, dtype=np.uint8).reshape(4, 4) % 6
    label = np.kron(blocks, np.ones((8, 8), dtype=np.uint8))  # (32, 32)
    image = np.repeat((20 + 40 * label)[..., None], 3, axis=2).astype(np.uint8)  # (32, 32, 3)
    rng = np.random.default_rng(4)
    transform = TrainTransform(crop_size=(28, 36))
    for _ in range(30):
        img, lab = transform(image, label, rng)
        grey = img.numpy()[..., 1].astype(np.int64)
        lab_np = lab.numpy()
        # Away from block borders (5 x 5 neighbourhood of one label, no padding) the
        # bilinear image must show exactly the label's grey; borders may blur.
        windows = np.lib.stride_tricks.sliding_window_view(np.pad(lab_np, 2, constant_values=255), (5, 5))
        interior = (windows.min(axis=(2, 3)) == windows.max(axis=(2, 3))) & (lab_np != 255)
        assert interior.sum() >= 50
        assert np.all(np.abs(grey[interior] - (20 + 40 * lab_np[interior])) <= 1)
        assert np.all(img.numpy()[lab_np == 255] == MEAN_COLOUR)  # padding is the mean colour


def test_random_crop_offsets_vary() -> None:
    h, w = 12, 30
    label = np.tile(np.arange(w, dtype=np.uint8), (h, 1))  # column index as label
    image = np.zeros((h, w, 3), dtype=np.uint8)
    rng = np.random.default_rng(5)
    transform = TrainTransform(crop_size=(12, 10), scales=(1.0,), flip=False)
    starts = {int(transform(image, label, rng)[1][0, 0]) for _ in range(60)}
    assert len(starts) > 5 and starts <= set(range(0, w - 10 + 1))


def test_padding_uses_ignore_index_in_labels_and_mean_colour_in_images() -> None:
    rng = np.random.default_rng(6)
    image, label = _random_pair(rng, 5, 7, (0, 1, 2))
    transform = TrainTransform(crop_size=(9, 12), scales=(1.0,), flip=False)
    img, lab = transform(image, label, rng)
    assert torch.equal(lab[:5, :7], torch.from_numpy(label))
    assert int((lab == 255).sum()) == 9 * 12 - 5 * 7
    assert torch.all(lab[5:, :] == 255) and torch.all(lab[:, 7:] == 255)
    assert torch.equal(img[:5, :7], torch.from_numpy(image))
    padded = torch.from_numpy(lab.numpy() == 255)
    assert img[padded].tolist() == [MEAN_COLOUR] * (9 * 12 - 5 * 7)  # round(255 * mean)
    # ... which is 0 in normalised space up to uint8 rounding: |round(255 m) - 255 m| / 255 / s.
    normalised = normalize_batch(img[None])[0]  # (3, 9, 12)
    bound = max(abs(c - 255 * m) / 255 / s for c, m, s in zip(MEAN_COLOUR, IMAGENET_MEAN, IMAGENET_STD))
    assert bound <= 0.5 / 255 / min(IMAGENET_STD) and float(normalised[:, padded].abs().max()) <= bound + 1e-6

    other = TrainTransform(crop_size=(9, 12), scales=(1.0,), flip=False, ignore_index=250)
    _, lab = other(image, label, rng)
    assert int((lab == 250).sum()) == 9 * 12 - 5 * 7


def test_normalisation_maths_by_hand() -> None:
    image = np.array([[[255, 0, 128], [0, 255, 51]]], dtype=np.uint8)  # (1, 2, 3)
    label = np.array([[1, 2]], dtype=np.uint8)
    # (x / 255 - mean) / std with mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225):
    #   R 255 -> (1 - 0.485) / 0.229 = 2.248908...     R 0   -> -0.485 / 0.229 = -2.117904...
    #   G 0   -> -0.456 / 0.224      = -2.035714...    G 255 -> 0.544 / 0.224   =  2.428571...
    #   B 128 -> (0.501961 - 0.406) / 0.225 = 0.426492...   B 51 -> (0.2 - 0.406) / 0.225 = -0.915556...
    expected = torch.tensor(
        [[[2.248908, -2.117904]], [[-2.035714, 2.428571]], [[0.426492, -0.915556]]]
    )  # (3, 1, 2)
    img, lab = EvalTransform()(image, label)
    assert img.shape == (3, 1, 2) and img.dtype == torch.float32
    assert torch.allclose(img, expected, atol=1e-5)
    assert lab.dtype == torch.int64 and lab.tolist() == [[1, 2]]

    custom = EvalTransform(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(image, label)[0]
    assert custom[:, 0, 0].tolist() == pytest.approx([1.0, -1.0, 128 / 127.5 - 1.0], abs=1e-6)


def test_identity_train_transform_equals_eval_transform() -> None:
    rng = np.random.default_rng(7)
    image, label = _random_pair(rng, 10, 14, (0, 4, 9))
    train = TrainTransform(crop_size=(10, 14), scales=(1.0,), flip=False)
    img_t, lab_t = train(image, label, rng)
    img_e, lab_e = EvalTransform()(image, label)
    # The same float32 operations in the same order (x * scale + bias): equal, not close.
    assert torch.equal(normalize_batch(img_t[None])[0], img_e)
    assert torch.equal(lab_t.long(), lab_e)


def test_denormalize_inverts_the_normalisation() -> None:
    image = np.random.default_rng(8).integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    label = np.zeros((9, 11), dtype=np.uint8)
    assert (EvalTransform().mean, EvalTransform().std) == (IMAGENET_MEAN, IMAGENET_STD)  # the defaults
    back = denormalize(EvalTransform()(image, label)[0])
    assert back.dtype == np.uint8 and back.shape == (9, 11, 3)
    assert np.array_equal(back, image)
    custom = EvalTransform(mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))(image, label)[0]
    assert np.array_equal(denormalize(custom, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4)), image)


def test_same_seed_same_sample() -> None:
    image, label = _random_pair(np.random.default_rng(9), 20, 30, (0, 1))
    transform = TrainTransform(crop_size=(16, 16))
    a = transform(image, label, np.random.default_rng(42))
    b = transform(image, label, np.random.default_rng(42))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize(
    ("image", "label", "error", "match"),
    [
        (np.zeros((4, 5, 3), np.float32), np.zeros((4, 5), np.uint8), TypeError, "uint8"),
        (np.zeros((4, 5), np.uint8), np.zeros((4, 5), np.uint8), ValueError, r"\(H, W, 3\)"),
        (np.zeros((4, 5, 4), np.uint8), np.zeros((4, 5), np.uint8), ValueError, r"\(H, W, 3\)"),
        (np.zeros((4, 5, 3), np.uint8), np.zeros((4, 6), np.uint8), ValueError, "differ in size"),
        (np.zeros((4, 5, 3), np.uint8), np.zeros((4, 5), np.int64), TypeError, "uint8"),
        (np.zeros((4, 5, 3), np.uint8), np.zeros((4, 5, 1), np.uint8), ValueError, r"\(H, W\)"),
        ("not an array", np.zeros((4, 5), np.uint8), TypeError, "numpy array"),
    ],
)
def test_bad_inputs_fail_with_clear_messages(image, label, error, match) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(error, match=match):
        TrainTransform(crop_size=(4, 4))(image, label, rng)
    with pytest.raises(error, match=match):
        EvalTransform()(image, label)


def test_bad_configuration_is_rejected() -> None:
    with pytest.raises(ValueError, match="crop_size"):
        TrainTransform(crop_size=(0, 4))
    with pytest.raises(ValueError, match="crop_size"):
        TrainTransform(crop_size=(4,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scales"):
        TrainTransform(crop_size=(4, 4), scales=())
    with pytest.raises(ValueError, match="std"):
        TrainTransform(crop_size=(4, 4), std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="resize"):
        TrainTransform(crop_size=(4, 4), resize="both")
    with pytest.raises(ValueError, match="uint8"):
        TrainTransform(crop_size=(4, 4), ignore_index=300)


def test_normalize_batch_checks_its_input() -> None:
    with pytest.raises(ValueError, match=r"uint8 \(B, H, W, 3\)"):
        normalize_batch(torch.zeros((1, 3, 4, 4), dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"uint8 \(B, H, W, 3\)"):
        normalize_batch(torch.zeros((1, 4, 4, 3)))
    out = normalize_batch(torch.zeros((2, 4, 5, 3), dtype=torch.uint8))
    assert out.shape == (2, 3, 4, 5) and out.dtype == torch.float32 and out.is_contiguous()


# ----------------------------------------------------------------------------- resizing the window alone


def _ties(scaled_positions: np.ndarray, size: int, scaled: int) -> np.ndarray:
    """Scaled rows/columns whose NEAREST sample falls exactly on a source pixel border."""
    return (2 * scaled_positions + 1) * size % (2 * scaled) == 0


def test_nearest_indices_are_the_exact_rational_floor() -> None:
    # 4 -> 6 (scale 1.5): samples at (k + 0.5) * 4 / 6 = 1/3, 1, 5/3, 7/3, 3, 11/3.
    assert nearest_indices(0, 6, 4, 6).tolist() == [0, 1, 1, 2, 3, 3]
    # A window is a slice of the whole frame's indices, by construction.
    whole = nearest_indices(0, 700, 400, 700)
    assert np.array_equal(nearest_indices(123, 45, 400, 700), whole[123:168])
    assert whole.min() == 0 and whole.max() == 399


@pytest.mark.parametrize("scale", PAPER_TRAIN_SCALES)
def test_window_resize_gives_the_frame_resize_crops(scale: float) -> None:
    """The fast order (resize the window alone) against the reference order (resize the whole
    frame with Pillow, then cut), for the same draws: the same crops (scale, offsets, flips), the
    image within two grey levels (the same bilinear taps, but Pillow takes the box in float32, so a
    tap weight may move by ~1e-4 and each of its two uint8 passes round one level apart), the label exactly where Pillow's NEAREST has no tie to break, and every remaining
    difference on a row or column where the sample falls exactly on a pixel border (either pixel
    is the nearest there)."""
    rng = np.random.default_rng(10)
    h, w = 45, 70  # odd sizes: round(s * h) != s * h for some scales
    image, label = _random_pair(rng, h, w, tuple(range(19)))  # noise: the worst case for the image
    fast = TrainTransform(crop_size=(32, 48), scales=(scale,))
    reference = TrainTransform(crop_size=(32, 48), scales=(scale,), resize="frame")
    for seed in range(25):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        crop = fast.draw(h, w, np.random.default_rng(seed))
        assert crop == reference.draw(h, w, np.random.default_rng(seed))
        img_f, lab_f = fast(image, label, a)
        img_r, lab_r = reference(image, label, b)
        assert a.random() == b.random()  # both drew the same numbers, no more, no less
        diff = (img_f.int() - img_r.int()).abs()
        assert int(diff.max()) <= 2 and float(diff.float().mean()) < 0.5
        differ = lab_f.numpy() != lab_r.numpy()
        rows, cols = np.nonzero(differ)
        # Back to scaled-frame coordinates (undo the flip) to find the ties.
        ch, cw = fast.crop_size
        cols = (cw - 1 - cols) - (cw - crop.vw) if crop.flip else cols
        tie = _ties(crop.y0 + rows, h, crop.sh) | _ties(crop.x0 + cols, w, crop.sw)
        assert tie.all(), f"labels differ off a tie at {list(zip(rows[~tie], cols[~tie]))[:5]}"
        if scale in (1.0, 2.0):  # no ties at all: exactly Pillow's NEAREST
            assert not differ.any()
