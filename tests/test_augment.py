"""augment.py against torchvision.transforms.v2.functional, image by image, with per-image parameters."""
import warnings
from pathlib import Path

import pytest
import torch
import torchvision.transforms.v2.functional as TF

import augment as A
from machinery import kernels as K
from tests.conftest import CIFAR_JPG

DATA = Path(CIFAR_JPG) / "test"
N = 8


def _images(n=N, size=32):
    """uint8 (n,3,size,size): real CIFAR jpgs when present, plus smooth and random images always."""
    g = torch.Generator().manual_seed(0)
    out = []
    files = sorted(DATA.glob("*/000*.jpg"))[: n // 2] if DATA.is_dir() and size == 32 else []
    if files:
        from torchvision.io import decode_image
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders
            warnings.simplefilter("ignore", DeprecationWarning)
            out += [decode_image(str(f)) for f in files]
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    while len(out) < n:
        if len(out) % 2:  # smooth: a colour gradient with a random phase per channel
            ph = torch.rand(3, 1, 1, generator=g) * 6
            img = 0.5 + 0.5 * torch.sin(3 * xx + 2 * yy + ph)
            out.append((img * 255).round().to(torch.uint8))
        else:
            out.append(torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8))
    return torch.stack(out)


@pytest.fixture
def x():
    torch.manual_seed(0)
    return A.to_float(_images())


def _per_image(tv_op, x, factors):
    return torch.stack([tv_op(img, f) for img, f in zip(x, factors.tolist())])


@pytest.mark.parametrize("ours, tv_op, lo, hi", [
    (A.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
    (A.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
    (A.adjust_saturation, TF.adjust_saturation, 0.8, 1.2),
    (A.adjust_hue, TF.adjust_hue, -0.5, 0.5),
])
def test_color_ops_match_torchvision(x, ours, tv_op, lo, hi):
    f = lo + (hi - lo) * torch.rand(len(x))
    assert f.unique().numel() == len(x)
    torch.testing.assert_close(ours(x, f), _per_image(tv_op, x, f), atol=1e-5, rtol=0)


def test_hue_on_ties_grey_and_every_hue_sextant():
    """Pixels whose max is shared by two channels or all three (grey), and one pixel in each sextant
    of the hue circle, shifted by factors across [-0.5, 0.5]: every branch of rgb_to_hcv and hcv_to_rgb."""
    px = [(1, 1, 0), (0, 1, 1), (1, 0, 1), (0.5, 0.5, 0.5), (0, 0, 0), (1, 1, 1), (0.8, 0.8, 0.2),
          (0.9, 0.1, 0.2), (0.9, 0.6, 0.1), (0.5, 0.9, 0.2), (0.1, 0.9, 0.7), (0.2, 0.3, 0.9), (0.7, 0.1, 0.9)]
    x = torch.tensor(px).T.reshape(1, 3, 1, len(px)).expand(11, 3, 1, len(px))
    f = torch.linspace(-0.5, 0.5, 11)
    torch.testing.assert_close(A.adjust_hue(x, f), _per_image(TF.adjust_hue, x, f), atol=1e-5, rtol=0)


def test_grayscale_solarize_flip_match_torchvision(x):
    torch.testing.assert_close(A.grayscale(x), TF.rgb_to_grayscale(x, num_output_channels=3), atol=1e-6, rtol=0)
    torch.testing.assert_close(A.solarize(x), TF.solarize(x, 0.5))
    edge = torch.tensor([0.4999, 0.5, 0.5001]).view(1, 3, 1, 1)  # the threshold itself is inverted
    torch.testing.assert_close(A.solarize(edge), TF.solarize(edge, 0.5))
    mask = torch.arange(len(x)) % 2 == 0  # the flip lives in resized_crop's grid; a whole-image box
    ref = torch.stack([TF.horizontal_flip(img) if m else img for img, m in zip(x, mask)])
    whole = torch.tensor([[0, 0, x.shape[-2], x.shape[-1]]]).expand(len(x), 4)
    torch.testing.assert_close(K.resized_crop(x, whole, x.shape[-1], mask), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kernel_size", [3, 9])
def test_gaussian_blur_matches_torchvision(x, kernel_size):
    sigma = 0.1 + 1.9 * torch.rand(len(x))
    ref = torch.stack([TF.gaussian_blur(img, [kernel_size] * 2, [s, s]) for img, s in zip(x, sigma.tolist())])
    torch.testing.assert_close(A.gaussian_blur(x, sigma, kernel_size), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("height, width", [(32, 32), (24, 40)])
def test_sample_crop_boxes(height, width):
    torch.manual_seed(0)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    top, left, h, w = A.sample_crop_boxes(4096, height, width, scale, ratio).unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    full = (h == height) & (w == width)  # fallback crops (and lucky full-image draws)
    assert full.float().mean() < 0.05
    area, aspect = (h * w).float() / (height * width), w.float() / h
    # rounding w, h to whole pixels moves area and aspect a little off their ranges
    tol_a = 1 / min(h.min(), w.min()).item()
    assert (area[~full] >= scale[0] * (1 - 2 * tol_a)).all() and (area <= 1).all()
    assert (aspect[~full] >= ratio[0] * (1 - 2 * tol_a) - 0.1).all() and (aspect[~full] <= ratio[1] + 0.15).all()
    assert torch.stack([top, left, h, w], 1).unique(dim=0).shape[0] > 1000  # per-image draws
    for pos, size, side in ((top, h, height), (left, w, width)):  # position ~ U over the free range
        u = (pos + 0.5) / (side - size + 1)
        assert 0.2 < u[~full].std() < 0.4 and 0.4 < u[~full].mean() < 0.6
    assert ((top + h == height) & (h < height)).any() and ((left + w == width) & (w < width)).any()
    hist = torch.histc(area, bins=10, min=0.08, max=1.0) / len(area)
    assert hist.max() < 0.2 and hist[:6].min() > 0.02  # ~U[0.08, 1] (big crops may not fit), per image


def test_sample_crop_boxes_fallback_is_center_crop_with_clamped_ratio():
    torch.manual_seed(0)
    boxes = A.sample_crop_boxes(64, 10, 100, scale=(0.99, 1.0), ratio=(3 / 4, 4 / 3))  # never fits: fallback
    ref = torch.tensor([0, (100 - 13) // 2, 10, 13])  # torchvision: h = height, w = round(h * 4/3)
    assert (boxes == ref).all()
    boxes = A.sample_crop_boxes(64, 100, 10, scale=(0.99, 1.0), ratio=(3 / 4, 4 / 3))  # tall image
    assert (boxes == torch.tensor([(100 - 13) // 2, 0, 13, 10])).all()  # w = width, h = round(w / (3/4))


def test_color_jitter_equals_the_four_ops_in_each_images_own_order():
    """The fused jitter equals the individually checked ops applied one by one, in a per-image
    random order drawn from the same random stream (a shared order, a wrong blend or a skipped op
    would differ)."""
    x = A.to_float(_images(64)).repeat(4, 1, 1, 1)  # 256 images
    n, p = len(x), 0.8
    torch.manual_seed(3)
    y = A.color_jitter(x, p, **A.JITTER)
    torch.manual_seed(3)  # the draws, in color_jitter's order
    f = [A._uniform(n, 1 - s, 1 + s, "cpu") for s in (0.4, 0.4, 0.2)] + [A._uniform(n, -0.1, 0.1, "cpu")]
    order, apply = torch.rand(n, 4).argsort(1), A._coin(n, p, "cpu")
    assert len({tuple(o) for o in order.tolist()}) == 24  # every order occurs in the batch
    assert 0.7 < apply.float().mean() < 0.9
    ops = [A.adjust_brightness, A.adjust_contrast, A.adjust_saturation, A.adjust_hue]
    ref = x.clone()
    for i in range(n):
        if apply[i]:
            for k in order[i].tolist():
                ref[i:i + 1] = ops[k](ref[i:i + 1], f[k][i:i + 1])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=0)


def test_color_jitter_per_image_factors():
    # one grey-ish image, 4 identical copies with the same factors but different orders must differ
    torch.manual_seed(1)
    x = torch.rand(1, 3, 8, 8).expand(64, 3, 8, 8)
    y = A.color_jitter(x.clone(), 1.0, **A.JITTER)
    assert not torch.equal(y, x)
    assert y.unique(dim=0).shape[0] == 64  # per-image factors and orders
    assert torch.equal(A.color_jitter(x.clone(), 0.0, **A.JITTER), x)  # p=0: untouched


def test_augment_views():
    torch.manual_seed(0)
    images = _images(8)
    images[1] = images[0]  # two identical images in one batch
    before = images.clone()
    aug = A.Augment(32)
    v1, v2 = aug(images)
    assert torch.equal(images, before)  # input untouched
    for v in (v1, v2):
        assert v.dtype == torch.float32 and v.shape == (8, 3, 32, 32) and v.device == images.device
        assert v.isfinite().all()
    assert not torch.allclose(v1, v2)
    assert not torch.allclose(v1[0], v1[1]) and not torch.allclose(v2[0], v2[1])
    torch.manual_seed(0)
    w1, w2 = aug(images)
    assert torch.equal(v1, w1) and torch.equal(v2, w2)  # reproducible from the global RNG


def test_augment_other_sizes_and_blur_kernel():
    assert A.Augment(224).kernel_size == 23 and A.Augment(224).blur  # Appendix B: 23 px at 224
    assert A.Augment(96).kernel_size == 9 and not A.Augment(32).blur and A.Augment(32, blur=True).blur
    v1, v2 = A.Augment(48, blur=True)(_images(4))
    assert v1.shape == v2.shape == (4, 3, 48, 48)


def _view(aug, images, **recipe):
    base = dict(flip=0.0, jitter=0.0, gray=0.0, blur=0.0, solarize=0.0)
    torch.manual_seed(0)
    return aug.view(images, {**base, **recipe})


def test_recipe_probabilities_switch_ops():
    images = _images(8)
    aug = A.Augment(32, blur=True, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # full-image crop: identity
    plain = _view(aug, images)
    torch.testing.assert_close(plain, A.normalize(images))
    # solarize=1: every pixel >= 0.5 inverted (view2 draws it with p=0.2, view1 never)
    x = A.to_float(images)
    torch.testing.assert_close(_view(aug, images, solarize=1.0), A.normalize(A.solarize(x)))
    torch.testing.assert_close(_view(aug, images, gray=1.0), A.normalize(A.grayscale(x)))
    torch.testing.assert_close(_view(aug, images, flip=1.0), A.normalize(x.flip(-1)))
    blurred = _view(aug, images, blur=1.0)  # view1: always blurred
    assert not torch.allclose(blurred, plain) and blurred.std() < plain.std()
    # the asymmetry, over many images: solarized fraction ~0.2 in view2, 0 in view1
    many = torch.full((2000, 3, 8, 8), 200, dtype=torch.uint8)
    one_aug = A.Augment(8, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    rec = lambda v: {**A.VIEWS[v], "jitter": 0.0, "gray": 0.0}  # noqa: E731
    sol = lambda v: (one_aug.view(many, rec(v)) < 0).flatten(1).all(1).float().mean()  # noqa: E731
    assert sol("view1") == 0 and 0.15 < sol("view2") < 0.25


def test_normalize_and_crop_flip():
    images = _images(4)
    ref = TF.normalize(TF.to_dtype(images, torch.float32, scale=True), A.CIFAR10_MEAN, A.CIFAR10_STD)
    torch.testing.assert_close(A.normalize(images), ref)
    torch.manual_seed(0)
    out = A.crop_flip(images, 32)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    torch.manual_seed(0)
    assert torch.equal(A.crop_flip(images, 32), out)


def test_views_of_ready_crops_only_flip_in_the_crop_step():
    """The streaming path hands Augment two crops of each image: they keep their whole frame (no second
    crop), flipped or not, and each list gets its own view's recipe."""
    crops1, crops2 = _images(8), _images(8).flip(0)
    aug = A.Augment(32)
    no_ops = {op: 0.0 for op in A.VIEWS["view1"]}
    torch.testing.assert_close(aug.view(crops1, no_ops, crop=False), A.normalize(crops1))
    torch.testing.assert_close(aug.view(crops1, {**no_ops, "flip": 1.0}, crop=False),
                               A.normalize(crops1.flip(-1)))
    torch.manual_seed(0)
    view1, view2 = aug((crops1, crops2))
    assert view1.shape == view2.shape == (8, 3, 32, 32) and not torch.equal(view1, view2)


def test_crops_keep_the_minimum_scale_they_are_given():
    """--crop-min-scale: every crop of Augment(scale=(s, 1)) covers at least about s of the image."""
    for low in (0.08, 0.2, 0.5):
        boxes = A.sample_crop_boxes(4000, 32, 32, scale=(low, 1.0), device="cpu")
        area = (boxes[:, 2] * boxes[:, 3]).float() / (32 * 32)
        assert area.min() >= low * 0.85 and area.max() <= 1.0          # (rounding to whole pixels)
        assert (area < low * 1.5).any()                                    # and it reaches down to it
