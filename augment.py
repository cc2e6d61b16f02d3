"""BYOL's two asymmetric view distributions (arXiv 2006.07733, Appendix B, Table 6).

Every op runs on a whole uint8 batch on the training device, with its randomness drawn per image
from torch's global RNG (so checkpoints can restore it), applied through masks and torch.where:
no Python loop over images and no host sync. Each op matches torchvision.transforms.v2.functional
on the same parameters (tests/test_augment.py checks this).

    python augment.py --show [--data DIR]   # README.assets/views.png (needs matplotlib); speed: bench.py
"""
import math

import torch
import torch.nn.functional as F

VIEWS = {  # Appendix B, Table 6: the asymmetric pair, probabilities side by side
    "view1": dict(flip=0.5, jitter=0.8, gray=0.2, blur=1.0, solarize=0.0),
    "view2": dict(flip=0.5, jitter=0.8, gray=0.2, blur=0.1, solarize=0.2),
}
JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)  # Appendix B, Table 6
BLUR_SIGMA = (0.1, 2.0)  # Appendix B, Table 6: sigma ~ U[0.1, 2.0]
# CIFAR-10 train-set per-channel mean/std, as in the public CIFAR recipes (e.g. solo-learn, kuangliu).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _bcast(v):  # (N,) -> (N,1,1,1), to scale a batch of images per image
    return v.view(-1, 1, 1, 1)


def _select_(mask, y, x):  # per image, in place: x = y where mask (N,) is True, else x as it is
    # lerp with a 0/1 weight is an exact select, and 1.5x faster than a broadcast torch.where on a CPU
    return x.lerp_(y, _bcast(mask).to(x.dtype))


def _flag(a, b):  # float 1.0 where a == b, else 0.0: a lerp_ weight (6x faster than a per-pixel where)
    return torch.eq(a, b, out=torch.empty_like(a))


def _coin(n, p, device):  # (N,) bool, each True with probability p
    return torch.rand(n, device=device) < p


def _uniform(n, lo, hi, device):  # (N,) floats ~ U[lo, hi]
    return lo + (hi - lo) * torch.rand(n, device=device)


def to_float(images):
    """uint8 (N,3,H,W) -> float32 in [0,1]; float input is taken to be in [0,1] already."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


def normalize_(x, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """(x - mean) / std in place on a float32 (N,3,H,W) batch in [0,1]."""
    # built on the host and copied without a stream sync (as torchvision does for its lookup tables)
    mean = torch.tensor(mean).view(1, 3, 1, 1).to(x.device, non_blocking=True)
    std = torch.tensor(std).view(1, 3, 1, 1).to(x.device, non_blocking=True)
    return x.sub_(mean).div_(std)


def normalize(images, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """uint8 or [0,1] float (N,3,H,W) -> (x - mean) / std, a new float32 tensor on the same device."""
    x = to_float(images)
    return normalize_(x.clone() if x is images else x, mean, std)


# ---- random resized crop: torchvision RandomResizedCrop.get_params, batched -------------------

def sample_crop_boxes(n, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), device="cpu", tries=10):
    """(N,4) long boxes (top, left, h, w): area ~ U[scale] * H*W, log aspect ~ U[log ratio].

    As torchvision: the first of `tries` candidates that fits, else a centre crop with the aspect
    ratio clamped to `ratio`. All candidates are drawn at once, per image.
    """
    area = torch.empty(n, tries, device=device).uniform_(*scale) * (height * width)
    log_r = torch.empty(n, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    w = torch.sqrt(area * torch.exp(log_r)).round().long()  # NxT
    h = torch.sqrt(area / torch.exp(log_r)).round().long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.int().argmax(1, keepdim=True)  # argmax returns the first maximal index
    h, w, ok = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0], ok.any(1)  # N
    top = (torch.rand(n, device=device) * (height - h + 1)).floor().long()
    left = (torch.rand(n, device=device) * (width - w + 1)).floor().long()
    # fallback: centre crop, aspect ratio clamped (python ints, as in torchvision)
    fh, fw = height, width
    if width / height < min(ratio):
        fh = int(round(width / min(ratio)))
    elif width / height > max(ratio):
        fw = int(round(height * max(ratio)))
    fallback = ((height - fh) // 2, (width - fw) // 2, fh, fw)
    return torch.stack([torch.where(ok, v, f) for v, f in zip((top, left, h, w), fallback)], 1)


def resized_crop(x, boxes, size, flip=None):
    """Crop each image to its (top, left, h, w) box and resize to size x size, bilinear, no antialias;
    then mirror the images where flip (N,) is True, by reading each row of the grid backwards.

    One grid_sample; equals v2.functional.resized_crop(..., antialias=False) (like tf.image.resize in
    the paper's code). Output pixel i samples top + (i + 0.5) * h / size - 0.5, clamped inside the
    crop as F.interpolate clamps at the crop's edges.
    """
    N, _, H, W = x.shape
    top, left, h, w = boxes.to(x.device, torch.float32).unbind(1)  # N each
    i = torch.arange(size, device=x.device, dtype=torch.float32) + 0.5  # S
    ys = top[:, None] + i * (h / size)[:, None] - 0.5  # NxS, source pixel rows
    xs = left[:, None] + i * (w / size)[:, None] - 0.5
    ys = torch.minimum(torch.maximum(ys, top[:, None]), (top + h - 1)[:, None])
    xs = torch.minimum(torch.maximum(xs, left[:, None]), (left + w - 1)[:, None])
    gy, gx = (2 * ys + 1) / H - 1, (2 * xs + 1) / W - 1  # pixel -> grid_sample coords
    if flip is not None:
        gx = torch.where(flip[:, None], gx.flip(1), gx)
    grid = torch.stack([gx[:, None, :].expand(N, size, size), gy[:, :, None].expand(N, size, size)], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---- per-image ops on float images in [0,1]; factors are (N,) tensors --------------------------
# Each op returns a new tensor; Augment.view and color_jitter_ chain them in place on their own batch,
# since on a CPU a fresh full-batch allocation costs about as much as the arithmetic.

def _luma(x):  # N x 1 x H x W: ITU-R 601 luma, the weights and order of torchvision's rgb_to_grayscale
    r, g, b = x.unbind(1)
    return (0.2989 * r).add_(g, alpha=0.587).add_(b, alpha=0.114)[:, None]


def grayscale(x):  # 3 channels out, as torchvision's rgb_to_grayscale(x, 3)
    return _luma(x).expand_as(x)


def _blend(x, y, factor):  # torchvision _blend: factor * x + (1 - factor) * y, clamped
    f = _bcast(factor)
    return (f * x + (1 - f) * y).clamp(0, 1)


def adjust_brightness(x, factor):
    return (x * _bcast(factor)).clamp(0, 1)


def adjust_contrast(x, factor):
    return _blend(x, _luma(x).mean((1, 2, 3), keepdim=True), factor)


def adjust_saturation(x, factor):
    return _blend(x, grayscale(x), factor)


def adjust_hue(x, factor):
    """Shift each image's hue by factor (N,), a fraction of the circle in [-0.5, 0.5], as torchvision's
    RGB -> HSV -> RGB, in closed form. With v = max, chroma c = max - min and 6h from Pillow's formula,
    channel n (5, 3, 1 for R, G, B) becomes v - c clamp(min(k, 4 - k), 0, 1), k = (n + 6h') mod 6 and
    h' = h + factor. As min(k, 4 - k) = 2 - |k - 2|, that is v - c clamp(2 - d, 0, 1), d the distance
    from k - 2 to the nearest multiple of 6; for t = (6h' mod 6) + n - 2, in [-1, 9), d = ||t - 3| - 3|,
    so no per-channel mod is needed. Grey pixels (c = 0) keep their value."""
    r, g, b = x.unbind(1)
    v = x.amax(1)                                                   # N x H x W
    c = v - x.amin(1)
    # 6h c: (g - b) where r is the max, else (b - r) + 2c where g is, else (r - g) + 4c, as Pillow;
    # each lerp_ with a 0/1 weight is an exact select
    h6 = (r - g).add_(c, alpha=4).lerp_((b - r).add_(c, alpha=2), _flag(v, g)).lerp_(g - b, _flag(v, r))
    h6.div_(_flag(c, 0).add_(c)).add_(6 * factor.view(-1, 1, 1)).remainder_(6)  # 6h' mod 6, in [0, 6)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    d = (h6[:, None] + (n - 5)).abs_().sub_(3).abs_()               # N x 3 x H x W; t - 3 = h6 + n - 5
    return d.sub_(2).clamp_(-1, 0).mul_(c[:, None]).add_(v[:, None])  # v - c clamp(2 - d, 0, 1)


def color_jitter_(x, p, brightness, contrast, saturation, hue):
    """In place on float32 x: with probability p per image, the four jitter ops with per-image factors,
    in a per-image random order (as torchvision ColorJitter).

    Brightness, contrast and saturation are each a blend a x + b gray(x) + c mean(gray(x)), so the
    three steps around the costly hue op run as blends: those before hue, then hue once, then those
    after it. The result equals applying the ops one by one in each image's order.
    """
    N, dev = x.shape[0], x.device
    fb, fc, fs = (_uniform(N, 1 - s, 1 + s, dev) for s in (brightness, contrast, saturation))
    fh = _uniform(N, -hue, hue, dev)
    order = torch.rand(N, 4, device=dev).argsort(1)  # Nx4: op order[:, s] (0 b, 1 c, 2 s, 3 h) at step s
    apply = _coin(N, p, dev)
    hue_step = (order == 3).int().argmax(1)          # N, the step at which hue comes
    one, zero = torch.ones_like(fb), torch.zeros_like(fb)
    # y = a x + b gray(x) + c mean(gray(x)): row k holds op k's (a, b, c); op 3 (hue) is the identity here
    coef = torch.stack([torch.stack([fb, zero, zero], 1), torch.stack([fc, zero, 1 - fc], 1),
                        torch.stack([fs, 1 - fs, zero], 1), torch.stack([one, zero, zero], 1)], 1)  # Nx4x3
    rows = torch.arange(N, device=dev)

    def blend_step_(x, step, mask):  # in place; where mask is False: op 3, the identity
        a, b, c = (_bcast(t) for t in coef[rows, torch.where(mask, order[:, step], 3)].unbind(1))
        g = _luma(x)
        bias = c * g.mean((1, 2, 3), keepdim=True)
        g.mul_(b).add_(bias)                             # b gray + c mean(gray), N x 1 x H x W
        return x.mul_(a).add_(g).clamp_(0, 1)

    for step in range(3):
        blend_step_(x, step, apply & (step < hue_step))
    _select_(apply, adjust_hue(x, fh), x)
    for step in range(1, 4):
        blend_step_(x, step, apply & (step > hue_step))
    return x


def gaussian_blur(x, sigma, kernel_size):
    """Per-image sigma (N,), odd kernel_size; separable, reflect padding, as v2 gaussian_blur."""
    N, C, H, W = x.shape
    lim = (kernel_size - 1) / (2 * math.sqrt(2))  # torchvision's kernel: softmax(-(t / sigma)^2)
    t = torch.linspace(-lim, lim, kernel_size, device=x.device)
    k = torch.softmax(-(t[None] / sigma[:, None]) ** 2, dim=1)  # NxK
    k = k.repeat_interleave(C, 0)[:, None]  # (N*C)x1xK, one kernel per image-channel
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, N * C, H, W), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k[..., None], groups=N * C)  # vertical
    y = F.conv2d(y, k[:, :, None], groups=N * C)  # horizontal
    return y.view(N, C, H, W)


def solarize(x, threshold=0.5):
    """Invert the pixels at or above threshold; at the paper's 0.5 on [0, 1] that is min(x, 1 - x)
    = 0.5 - |x - 0.5|, with no per-pixel mask: 0.33 ms for 128 CIFAR images on one CPU thread, against
    1.07 ms for torch.minimum(x, 1 - x) and 3.1 ms for torch.where."""
    if threshold == 0.5:
        return (x - 0.5).abs_().neg_().add_(0.5)
    return torch.where(x >= threshold, 1 - x, x)


# ---- the two views ------------------------------------------------------------------------------

class Augment:
    """images uint8 (N,3,H,W) on any device -> (view1, view2), each normalised float32 (N,3,S,S)."""

    def __init__(self, image_size=32, blur=None, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.image_size, self.mean, self.std, self.scale, self.ratio = image_size, mean, std, scale, ratio
        # Blur is off at 32 px by default: public CIFAR recipes (e.g. solo-learn's cifar config) set its
        # probability to 0 there. The kernel is 23 px at 224, i.e. ~10% of the side, made odd.
        self.blur = image_size > 32 if blur is None else blur
        self.kernel_size = int(0.1 * image_size) // 2 * 2 + 1
        self._recipes = {}

    def view(self, images, recipe):
        """One view given a recipe of op probabilities: a VIEWS entry, or per-image (N,) tensors of
        them (as __call__ passes). Returns normalised float32."""
        x = to_float(images)
        N, _, H, W = x.shape
        boxes = sample_crop_boxes(N, H, W, self.scale, self.ratio, x.device)
        x = resized_crop(x, boxes, self.image_size, flip=_coin(N, recipe["flip"], x.device))  # crop, flip
        color_jitter_(x, recipe["jitter"], **JITTER)  # x is resized_crop's new batch: ops write into it
        _select_(_coin(N, recipe["gray"], x.device), grayscale(x), x)
        if self.blur and (torch.is_tensor(recipe["blur"]) or recipe["blur"] > 0):
            sigma = _uniform(N, *BLUR_SIGMA, x.device)
            _select_(_coin(N, recipe["blur"], x.device), gaussian_blur(x, sigma, self.kernel_size), x)
        _select_(_coin(N, recipe["solarize"], x.device), solarize(x), x)
        return normalize_(x.clamp_(0, 1), self.mean, self.std)

    def __call__(self, images):
        """Both views as one batch of 2N, each image with its view's probabilities: half the ops."""
        x = to_float(torch.cat([images, images]))  # convert once for both views
        n = len(images)
        key = (n, x.device)
        if key not in self._recipes:  # per-image probabilities, N of view 1 then N of view 2
            self._recipes[key] = {op: torch.tensor([VIEWS["view1"][op]] * n + [VIEWS["view2"][op]] * n,
                                                   device=x.device) for op in VIEWS["view1"]}
        v = self.view(x, self._recipes[key])
        return v[:n], v[n:]


def crop_flip(images, image_size, scale=(0.08, 1.0), mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """The linear-evaluation training augmentation (Appendix C.1): random resized crop + flip."""
    x = to_float(images)
    N, _, H, W = x.shape
    boxes = sample_crop_boxes(N, H, W, scale, device=x.device)
    return normalize_(resized_crop(x, boxes, image_size, flip=_coin(N, 0.5, x.device)), mean, std)


if __name__ == "__main__":  # python augment.py --show [--data DIR]: README.assets/views.png
    import argparse
    from pathlib import Path

    import data
    from runs import cache_dir

    ap = argparse.ArgumentParser(description="Draw 8 training images and their two views.")
    ap.add_argument("--show", action="store_true", help="save README.assets/views.png")
    ap.add_argument("--data", default=data.DEFAULT_ROOT, help="CIFAR-10 download folder or an ImageFolder")
    args = ap.parse_args()
    if args.show:  # three rows: 8 training images (fixed seed), their view1, their view2
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise SystemExit("error: --show needs matplotlib: pip install matplotlib")
        try:
            images, _ = data.load(args.data, "cifar10", "train", 32, subset=8, seed=0, cache=cache_dir())
        except data.DataError as e:
            raise SystemExit(f"error: {e}")
        torch.manual_seed(0)
        v1, v2 = Augment(32)(images)
        mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        rows = [to_float(images), v1 * std + mean, v2 * std + mean]
        fig, axes = plt.subplots(3, len(images), figsize=(len(images), 3.3))
        for r, (name, row) in enumerate(zip(["image", "view1", "view2"], rows)):
            axes[r, 0].set_ylabel(name)
            for c, img in enumerate(row):
                axes[r, c].imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
                axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
        Path("README.assets").mkdir(exist_ok=True)
        fig.savefig("README.assets/views.png", dpi=150, bbox_inches="tight")
        print("wrote README.assets/views.png")
