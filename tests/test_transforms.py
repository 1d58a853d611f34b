import dataclasses
import math
import re

import numpy as np
import pytest
import torch

from ferlab.transforms import (
    AUGMENT_PRESETS,
    TTA_MODES,
    AugmentConfig,
    Normalizer,
    augment,
    expand_offline,
    hflip,
    mix_batch,
    progressive_side,
    random_crop,
    random_erase,
    resize,
    shift,
    tta_mode,
    tta_views,
    zoom_rotate,
)


def batch(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 48, 48, generator=torch.Generator().manual_seed(seed))  # (B, 1, 48, 48) in [0, 1]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(AUGMENT_PRESETS))
def test_presets_keep_shape_and_range(name):
    x = batch()
    y = augment(x.clone(), AUGMENT_PRESETS[name], gen())
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_identity_config_changes_nothing():
    x = batch()
    assert torch.equal(augment(x.clone(), AugmentConfig(), gen()), x)
    # the affine path itself is an identity at zero magnitude up to float rounding
    cfg = AugmentConfig(rotation=1e-12)
    assert torch.allclose(augment(x.clone(), cfg, gen()), x, atol=1e-5)


def test_flip_twice_is_identity():
    x = batch()
    assert torch.equal(hflip(hflip(x)), x)
    assert not torch.equal(hflip(x), x)


def test_hflip_flips_about_half():
    x = batch(200)
    y = augment(x.clone(), AugmentConfig(hflip=True), gen(1))
    flipped = sum(torch.equal(y[i], hflip(x[i : i + 1])[0]) for i in range(200))
    kept = sum(torch.equal(y[i], x[i]) for i in range(200))
    assert flipped + kept == 200 and 70 < flipped < 130


def test_same_generator_same_result_and_different_seed_differs():
    x = batch()
    cfg = AUGMENT_PRESETS["keras"]
    a, b, c = (augment(x.clone(), cfg, gen(s)) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_crop_is_a_shift_of_the_padded_image():
    x = batch(8)
    y = random_crop(x, 4, gen())
    assert y.shape == x.shape
    assert torch.equal(random_crop(x, 0, gen()), x)
    # every crop's centre 40x40 region is a shifted window of x (zero padding outside)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(8):
        found = any(torch.equal(padded[i, :, dy : dy + 48, dx : dx + 48], y[i]) for dy in range(9) for dx in range(9))
        assert found


def test_random_erase_probability():
    x = torch.zeros(64, 1, 48, 48)
    assert torch.equal(random_erase(x.clone(), 0.0, gen()), x)
    y = random_erase(x.clone(), 1.0, gen())
    changed = (y != 0).flatten(1).any(1)
    assert changed.all()
    area = (y != 0).flatten(1).float().mean(1)
    assert float(area.max()) <= 0.21


def test_rotation_moves_pixels_but_keeps_centre_mass():
    x = torch.zeros(4, 1, 48, 48)
    x[:, :, 20:28, 20:28] = 1.0
    y = augment(x.clone(), AugmentConfig(rotation=30), gen())
    assert not torch.equal(x, y)
    assert torch.allclose(y.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=0.1)


def test_expand_offline_shapes():
    imgs = (np.random.default_rng(0).random((10, 48, 48)) * 255).astype(np.uint8)
    labels = np.arange(10) % 7
    xi, yi = expand_offline(imgs, labels, 3, AUGMENT_PRESETS["keras"], seed=0)
    assert xi.shape == (40, 48, 48) and xi.dtype == np.uint8
    assert np.array_equal(xi[:10], imgs) and np.array_equal(yi, np.tile(labels, 4))
    assert not np.array_equal(xi[10:20], imgs)


def test_normalizer_modes():
    x = batch(32)
    u8 = (x * 255).round().to(torch.uint8).squeeze(1).numpy()
    assert torch.allclose(Normalizer("none")(x), x * 255)
    assert torch.equal(Normalizer("unit")(x), x)
    z = Normalizer("image")(x)
    assert torch.allclose(z.mean((1, 2, 3)), torch.zeros(32), atol=1e-5)
    assert torch.allclose(z.std((1, 2, 3)), torch.ones(32), atol=1e-4)
    n = Normalizer.fit("dataset", u8)
    assert abs(n.mean - u8.mean() / 255) < 1e-6
    xd = n(torch.from_numpy(u8).float().unsqueeze(1) / 255)
    assert abs(float(xd.mean())) < 1e-4 and abs(float(xd.std()) - 1) < 1e-3
    with pytest.raises(ValueError, match="unknown normalisation"):
        Normalizer("zscore")


def test_unknown_augment_option_is_an_error():
    with pytest.raises(ValueError, match="unknown augmentation option"):
        AugmentConfig.from_dict({"rotate": 10})


@pytest.mark.parametrize("options, message", [
    ({"fill": "reflect"}, "fill must be 'nearest' or 'zeros', got 'reflect'"),
    ({"rotation": "10"}, "rotation must be a number"),
    ({"rotation": True}, "rotation must be a number"),
    ({"shear": -5}, "shear must be >= 0"),
    ({"zoom": 1.5}, "zoom is a fraction of the image"),
    ({"jpeg_p": 1.2}, "jpeg_p is a probability"),
    ({"crop_pad": -2}, "crop_pad must be a whole number of pixels >= 0"),
    ({"crop_pad": 2.5}, "crop_pad must be a whole number of pixels >= 0"),
    ({"hflip": "no"}, "hflip must be true or false"),
])
def test_augment_option_values_are_checked(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        AugmentConfig.from_dict(options)
    for preset in AUGMENT_PRESETS.values():  # every preset is valid
        AugmentConfig.from_dict(dataclasses.asdict(preset))


def test_mix_batch_off_is_the_identity_and_draws_nothing():
    x, g = batch(), gen()
    out, perm, lam = mix_batch(x, 0.0, 0.0, g)
    assert out is x and perm is None and lam == 1.0
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=gen()))


def test_mixup_is_the_convex_combination_with_the_partners():
    x = batch()
    out, perm, lam = mix_batch(x, 0.4, 0.0, gen(3))
    assert 0.0 <= lam <= 1.0
    assert sorted(perm.tolist()) == list(range(16))
    assert torch.allclose(out, lam * x + (1 - lam) * x[perm])


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_pastes_a_box_whose_area_is_one_minus_lam(seed):
    x = batch()
    out, perm, lam = mix_batch(x, 0.0, 1.0, gen(seed))
    from_partner = (out == x[perm]) & (out != x)  # (B, 1, H, W): pixels taken from the partner
    kept = out == x
    assert bool((from_partner | kept).all())
    moved = torch.tensor([i for i in range(16) if perm[i] != i])
    if len(moved):
        frac = from_partner[moved].float().mean().item()
        assert frac == pytest.approx(1 - lam, abs=1e-6)
        # one axis-aligned box, the same in every image
        assert torch.equal(from_partner[moved[0]], from_partner[moved].all(0))


def test_both_mixers_on_use_each_about_half_the_time():
    x, g = batch(8), gen(1)
    kinds = []
    for _ in range(200):
        out, perm, lam = mix_batch(x, 0.4, 1.0, g)
        kinds.append(bool(((out == x) | (out == x[perm])).all()))  # CutMix only copies pixels
    assert 60 < sum(kinds) < 140


def test_shift_moves_content_and_fills_black():
    x = batch(2)
    down = shift(x, 2, 0)
    assert torch.equal(down[..., 2:, :], x[..., :-2, :]) and not down[..., :2, :].any()
    left = shift(x, 0, -3)
    assert torch.equal(left[..., :, :-3], x[..., :, 3:]) and not left[..., :, -3:].any()
    assert torch.equal(shift(x, 0, 0), x)


def test_tta_views():
    x = batch(3)
    assert tta_mode(True) == "flip" and tta_mode(False) == tta_mode(None) == "none" and tta_mode("shift") == "shift"
    with pytest.raises(ValueError, match="unknown test-time augmentation 'crops'"):
        tta_mode("crops")
    assert [len(tta_views(x, m)) for m in ("none", "flip", "shift", "affine")] == [1, 2, 10, 18]
    views = tta_views(x, "affine")
    assert torch.equal(views[0], x) and torch.equal(views[1], hflip(x))  # the image itself first, then its mirror
    assert all(v.shape == x.shape for v in views)
    assert len({round(v.sum().item(), 3) for v in views[::2]}) == 9  # five positions, two zooms, two rotations
    # nested: each mode's views are the first views of the next (time_to_accuracy predicts the largest once)
    modes = list(TTA_MODES)
    for small, large in zip(modes, modes[1:], strict=False):
        a, b = tta_views(x, small), tta_views(x, large)
        assert all(torch.equal(u, v) for u, v in zip(a, b[: len(a)], strict=True)), (small, large)


def test_zoom_rotate():
    x = batch(2)
    assert torch.allclose(zoom_rotate(x), x, atol=1e-5)  # the identity
    dot = torch.zeros(1, 1, 48, 48)
    dot[..., 20:28, 20:28] = 1.0  # a centred square
    assert zoom_rotate(dot, scale=0.5).sum() > 3 * dot.sum()  # zoomed in 2x: about 4x the area
    turned = zoom_rotate(dot, degrees=90.0)
    assert torch.allclose(turned, dot, atol=1e-4)  # a centred square is symmetric under a quarter turn
    assert not torch.allclose(zoom_rotate(dot, degrees=30.0), dot, atol=1e-2)


def test_cli_tta_choices_are_the_modes():
    from ferlab.inference.options import tta_argument

    assert tuple(tta_argument()["choices"]) == tuple(TTA_MODES)


@pytest.mark.parametrize("mode", ["none", "flip", "shift", "affine"])
def test_predict_logits_averages_the_views(mode):
    """For a linear model the mean of the views' logits is W @ mean(normalised views) + b."""
    from ferlab.inference.predict import predict_logits

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48 * 48, 7))
    images = torch.randint(0, 256, (5, 1, 48, 48), dtype=torch.uint8)
    norm = Normalizer("dataset", mean=0.4, std=0.2)
    got = predict_logits(model, images, norm, precision="fp32", channels_last=False, tta=mode)  # (5, 7)
    mean_view = torch.stack([norm(v) for v in tta_views(images.double() / 255.0, mode)]).mean(0)  # (5, 1, 48, 48)
    want = model(mean_view.float())
    assert got.shape == (5, 7) and torch.allclose(got, want, atol=1e-4)


def test_progressive_side_grows_in_multiples_of_8_to_full():
    sides = [progressive_side(e, 48, 32, 24) for e in range(30)]
    assert sides == [32] * 12 + [40] * 12 + [48] * 6
    assert [progressive_side(e, 48, 0, 0) for e in range(3)] == [48] * 3  # off
    assert progressive_side(0, 48, 56, 5) == 48  # a start above full is full
    assert progressive_side(0, 48, 36, 10) == 36  # never below the start, even off the multiples


def test_resize_shape_constant_and_identity():
    x = batch(4)
    assert resize(x, 48) is x
    assert resize(x, 32).shape == (4, 1, 32, 32)
    grey = torch.full((2, 1, 48, 48), 0.25)
    assert torch.allclose(resize(grey, 40), torch.full((2, 1, 40, 40), 0.25))


def _photo_batch() -> torch.Tensor:
    return 0.25 + 0.5 * torch.rand(32, 1, 48, 48, generator=torch.Generator().manual_seed(5))  # away from 0 and 1


def test_brightness_shifts_each_image_by_one_constant():
    from ferlab.transforms import AugmentConfig, photometric

    x = _photo_batch()
    y = photometric(x, AugmentConfig(brightness=0.2), torch.Generator().manual_seed(0))
    d = (y - x).flatten(1)  # (32, H*W): one shift per image, within the bound
    assert torch.allclose(d, d[:, :1].expand_as(d), atol=1e-6)
    assert d[:, 0].abs().max() <= 0.2 + 1e-6 and d[:, 0].std() > 0.02


def test_contrast_keeps_the_mean_and_gamma_keeps_the_order():
    from ferlab.transforms import AugmentConfig, photometric

    x = _photo_batch()
    y = photometric(x, AugmentConfig(contrast=0.4), torch.Generator().manual_seed(0))
    assert torch.allclose(y.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-5)
    ratio = (y - y.mean((2, 3), keepdim=True)).std((1, 2, 3)) / (x - x.mean((2, 3), keepdim=True)).std((1, 2, 3))
    assert ratio.min() >= 0.6 - 1e-4 and ratio.max() <= 1.4 + 1e-4
    g = photometric(x, AugmentConfig(gamma=1.8), torch.Generator().manual_seed(0))
    flat_x, flat_g = x.flatten(1), g.flatten(1)
    in_x_order = flat_g.gather(1, flat_x.argsort(1))  # (32, H*W): each image's outputs in its inputs' order
    assert (in_x_order.diff(dim=1) >= -1e-6).all()  # a monotone tone curve per image
    assert (g - x).abs().mean() > 0.01


def test_blur_and_noise_are_seeded_and_bounded():
    from ferlab.transforms import AugmentConfig, augment

    cfg = AugmentConfig(blur_p=1.0, noise=0.05)
    assert not cfg.is_identity and cfg.has_photometric
    x = _photo_batch()
    a = augment(x, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a, augment(x, cfg, torch.Generator().manual_seed(1)))
    assert a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    blur_only = augment(x, AugmentConfig(blur_p=1.0), torch.Generator().manual_seed(1))
    assert blur_only.std() < x.std()  # blurring smooths the noise-like test images


def _smooth_faces(n: int = 16) -> np.ndarray:
    """Face-like uint8 images (n, 48, 48): blurred noise stretched to the full range."""
    import cv2

    noise = (np.random.default_rng(0).random((n, 48, 48)) * 255).astype(np.uint8)
    im = np.stack([cv2.GaussianBlur(a, (0, 0), 2) for a in noise]).astype(np.float64)
    return ((im - im.min()) / (im.max() - im.min()) * 255).astype(np.uint8)


@pytest.mark.parametrize("quality", [10, 30, 90])
def test_training_jpeg_is_what_an_encoder_writes(quality):
    """The DCT quantisation of :func:`jpeg` against OpenCV's libjpeg: far closer to it than to the original."""
    import cv2

    from ferlab.transforms import JPEG_LUMA, jpeg, jpeg_tables

    faces = _smooth_faces()
    ref = np.stack([cv2.imdecode(cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, quality])[1],
                                 cv2.IMREAD_GRAYSCALE) for f in faces]).astype(np.float64)
    ours = jpeg(torch.from_numpy(faces).float().unsqueeze(1) / 255, torch.full((len(faces),), quality))
    ours = (ours.squeeze(1).double() * 255).numpy()
    assert np.abs(ours - ref).mean() < 0.3 < np.abs(ref - faces).mean() / 3
    torch.testing.assert_close(jpeg_tables(torch.tensor([50, 100])), torch.stack([JPEG_LUMA, torch.ones(8, 8)]))


def test_motion_blur_kernels_are_lines_that_keep_the_mean():
    from ferlab.transforms import motion_blur, motion_kernels

    k = motion_kernels(torch.tensor([1.0, 5.0, 9.0]), torch.tensor([0.0, 0.0, math.pi / 2]), 11)  # (3, 11, 11)
    torch.testing.assert_close(k.sum((1, 2)), torch.ones(3))
    assert k[0, 5, 5] == 1  # one pixel long: the identity
    assert torch.equal(k[1].nonzero()[:, 0].unique(), torch.tensor([5]))  # horizontal: the centre row ...
    assert (k[1, 5] > 0).sum() == 5  # ... 5 pixels of it
    horizontal = motion_kernels(torch.tensor([9.0]), torch.tensor([0.0]), 11)[0]
    torch.testing.assert_close(k[2], horizontal.T, atol=1e-6, rtol=0)  # a quarter turn: the transpose
    flat = torch.full((2, 1, 48, 48), 0.4)
    torch.testing.assert_close(motion_blur(flat, torch.tensor([5.0, 9.0]), torch.tensor([0.3, 1.2])), flat)
    x = torch.zeros(1, 1, 48, 48)
    x[..., 24, 24] = 1.0  # an impulse becomes the kernel
    torch.testing.assert_close(motion_blur(x, torch.tensor([7.0]), torch.tensor([0.4]))[0, 0, 19:30, 19:30],
                               motion_kernels(torch.tensor([7.0]), torch.tensor([0.4]), 11)[0])


def test_low_resolution_is_a_small_face_upscaled():
    import cv2

    from ferlab.transforms import low_resolution

    faces = _smooth_faces(4)
    ref = np.stack([cv2.resize(cv2.resize(f, (24, 24), interpolation=cv2.INTER_AREA), (48, 48),
                               interpolation=cv2.INTER_LINEAR) for f in faces])
    ours = low_resolution(torch.from_numpy(faces).float().unsqueeze(1) / 255, torch.tensor([24, 24, 24, 24]))
    assert np.abs(ours.squeeze(1).numpy() * 255 - ref).mean() < 1.0  # an integer ratio: as OpenCV does it
    flat = torch.full((2, 1, 48, 48), 0.4)
    torch.testing.assert_close(low_resolution(flat, torch.tensor([12, 31])), flat)


def test_camera_changes_are_seeded_and_bounded():
    from ferlab.transforms import AugmentConfig, augment

    x = _photo_batch()
    for field in ("motion_blur_p", "lowres_p", "jpeg_p"):
        cfg = AugmentConfig(**{field: 1.0})
        assert cfg.has_photometric and not cfg.is_identity
        a = augment(x, cfg, torch.Generator().manual_seed(3))
        assert torch.equal(a, augment(x, cfg, torch.Generator().manual_seed(3)))
        assert a.shape == x.shape and 0 <= a.min() and a.max() <= 1 and not torch.allclose(a, x)
