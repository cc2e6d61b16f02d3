"""BYOL's two asymmetric view distributions T and T' (arXiv 2006.07733, Appendix B, Table 6).

Appendix B's list of ops, in its order, each a short function: random crop, flip, colour jittering,
colour dropping, Gaussian blur, solarization. Each runs on a whole uint8 batch on the training device,
its randomness drawn per image from torch's global RNG (checkpoints restore it) and applied through
masks: no Python loop over images, no host sync. Each op equals torchvision.transforms.v2's on the
same parameters (tests/test_augment.py); where DeepMind's code differs (brightness, contrast, saturation,
blur's padding): docs/recipe.md. Draw the two views: python tools/plots.py views.
"""
import math

import torch
import torch.nn.functional as F

from machinery import kernels
from machinery.kernels import constant, hcv_to_rgb, resized_crop, rgb_to_hcv

VIEWS = {  # Table 6: T (view 1) and T' (view 2) side by side; the crop's area and aspect from Appendix B
    "view1": dict(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=0.5, jitter=0.8, gray=0.2, blur=1.0,
                  solarize=0.0),
    "view2": dict(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=0.5, jitter=0.8, gray=0.2, blur=0.1,
                  solarize=0.2),
}
COINS = ("flip", "jitter", "gray", "blur", "solarize")  # the ops of VIEWS applied with a probability
JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)  # Table 6: max intensities
BLUR_SIGMA = (0.1, 2.0)  # Appendix B: sigma ~ U[0.1, 2.0]
# The (mean, std) each recipe normalises with: CIFAR-10's training set's (solo-learn rounds the std to 0.247,
# 0.243, 0.261); ImageNet's, as torchvision's models and Appendix B.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
STATS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def _bcast(v):  # (N,) -> (N,1,1,1), to scale or select a batch of images per image
    return v.view(-1, 1, 1, 1)


def _coin(n, p, device):  # (N,) bool, each True with probability p
    return torch.rand(n, device=device) < p


def _uniform(n, lo, hi, device):  # (N,) floats ~ U[lo, hi]
    return lo + (hi - lo) * torch.rand(n, device=device)


def to_float(images):
    """uint8 (N,3,H,W) -> float32 in [0,1]; float input is taken to be in [0,1] already."""
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def normalize(images, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """uint8 or [0,1] float (N,3,H,W) -> (x - mean) / std, float32 on the same device."""
    mean, std = (constant(tuple(v), images.device).view(1, 3, 1, 1) for v in (mean, std))
    return (to_float(images) - mean) / std


def sample_crop_boxes(n, height, width, scale=VIEWS["view1"]["crop_scale"], ratio=VIEWS["view1"]["crop_ratio"],
                      device="cpu", tries=10):
    """Random crop: (N,4) boxes (top, left, h, w) of area ~ U[scale] * H W and log aspect ~ U[log ratio],
    placed uniformly. As torchvision's RandomResizedCrop: the first of `tries` draws that fits, else a
    centre crop with the aspect clamped to ratio. All draws at once, per image."""
    area = torch.empty(n, tries, device=device).uniform_(*scale) * (height * width)
    log_r = torch.empty(n, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    w = torch.sqrt(area * torch.exp(log_r)).round().long()  # N x T
    h = torch.sqrt(area / torch.exp(log_r)).round().long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.int().argmax(1, keepdim=True)  # argmax returns the first maximal index
    h, w, ok = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0], ok.any(1)  # N
    top = (torch.rand(n, device=device) * (height - h + 1)).floor().long()
    left = (torch.rand(n, device=device) * (width - w + 1)).floor().long()
    fh, fw = min(height, round(width / min(ratio))), min(width, round(height * max(ratio)))  # the fallback
    fallback = ((height - fh) // 2, (width - fw) // 2, fh, fw)
    return torch.stack([torch.where(ok, v, f) for v, f in zip((top, left, h, w), fallback)], 1)


# ---- colour ops on float images in [0,1]; factors are (N,) tensors ---------------------------------

def luma(x):  # N x 1 x H x W: Appendix B's colour dropping, 0.2989 r + 0.5870 g + 0.1140 b
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b)[:, None]


def grayscale(x):  # Appendix B, colour dropping: each pixel its luma, on 3 channels
    return luma(x).expand_as(x)


def adjust_brightness(x, factor):  # as torchvision: x scaled by factor; DeepMind: x + delta
    return (x * _bcast(factor)).clamp(0, 1)


def adjust_contrast(x, factor):  # as torchvision: factor x + (1 - factor) mean(luma(x)); DeepMind: per channel
    return torch.lerp(luma(x).mean((1, 2, 3), keepdim=True), x, _bcast(factor)).clamp(0, 1)


def adjust_saturation(x, factor):  # as torchvision: factor x + (1 - factor) luma(x); DeepMind: HSV's S x factor
    return torch.lerp(grayscale(x), x, _bcast(factor)).clamp(0, 1)


def adjust_hue(x, factor):
    """Rotate each image's hue by factor (N,), a fraction of the circle in [-0.5, 0.5], as torchvision:
    RGB -> (hue H in [0, 6), chroma, value), H + 6 factor mod 6, back to RGB (machinery/kernels.py)."""
    h, c, v = rgb_to_hcv(x)
    return hcv_to_rgb((h + 6 * factor.view(-1, 1, 1)) % 6, c, v)


def color_jitter(x, p, brightness, contrast, saturation, hue):
    """Appendix B: with probability p, shift each image's brightness, contrast, saturation and hue by
    factors drawn per image, the four ops "in an order randomly selected for each patch". Augment runs
    kernels.color_jitter: the same draws and images (tests/test_kernels.py), with hue run once."""
    N, dev = len(x), x.device
    ops = [(adjust_brightness, _uniform(N, 1 - brightness, 1 + brightness, dev)),
           (adjust_contrast, _uniform(N, 1 - contrast, 1 + contrast, dev)),
           (adjust_saturation, _uniform(N, 1 - saturation, 1 + saturation, dev)),
           (adjust_hue, _uniform(N, -hue, hue, dev))]
    order = torch.rand(N, 4, device=dev).argsort(1)  # N x 4: the op each image applies at each step
    apply = _coin(N, p, dev)
    for step in range(4):
        for i, (op, factor) in enumerate(ops):
            x = torch.where(_bcast(apply & (order[:, step] == i)), op(x, factor), x)
    return x


def gaussian_blur(x, sigma, kernel_size):
    """Per-image sigma (N,), odd kernel_size; separable, reflect padding, as v2 gaussian_blur (DeepMind: zeros)."""
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


def solarize(x):  # Appendix B: x 1{x < 0.5} + (1 - x) 1{x >= 0.5}, that is min(x, 1 - x)
    return torch.minimum(x, 1 - x)


# ---- the two views ------------------------------------------------------------------------------

class Augment:
    """images uint8 (N,3,H,W) on any device -> (view1, view2), each normalised float32 (N,3,S,S)."""

    def __init__(self, image_size=32, blur=None, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                 scale=VIEWS["view1"]["crop_scale"], ratio=VIEWS["view1"]["crop_ratio"]):
        self.image_size, self.mean, self.std, self.scale, self.ratio = image_size, mean, std, scale, ratio
        # Blur is off at 32 px by default: public CIFAR recipes (e.g. solo-learn's cifar config) set its
        # probability to 0 there. Appendix B's kernel is 23 px at 224, i.e. ~10% of the side, made odd.
        self.blur = image_size > 32 if blur is None else blur
        self.kernel_size = int(0.1 * image_size) // 2 * 2 + 1
        self._recipes = {}

    def view(self, images, recipe, crop=True):
        """One view given a recipe of op probabilities: a VIEWS entry, or per-image (N,) tensors of
        them (as __call__ passes). crop=False: the images are crops already (the streaming path's
        workers take them), so the crop step keeps the whole image and only flips. Returns normalised
        float32."""
        x = to_float(images)
        N, _, H, W = x.shape
        coin = lambda op: _bcast(_coin(N, recipe[op], x.device))  # noqa: E731  (N,1,1,1) bool
        boxes = sample_crop_boxes(N, H, W, self.scale, self.ratio, x.device) if crop else \
            constant((0, 0, H, W), x.device).expand(N, 4)
        x = resized_crop(x, boxes, self.image_size, flip=_coin(N, recipe["flip"], x.device))  # crop, flip
        x = kernels.color_jitter(x, recipe["jitter"], **JITTER)  # = color_jitter, 3x faster: hue once
        x = torch.where(coin("gray"), grayscale(x), x)
        if self.blur and (torch.is_tensor(recipe["blur"]) or recipe["blur"] > 0):
            sigma = _uniform(N, *BLUR_SIGMA, x.device)
            x = torch.where(coin("blur"), gaussian_blur(x, sigma, self.kernel_size), x)
        x = torch.where(coin("solarize"), solarize(x), x)
        return normalize(x.clamp(0, 1), self.mean, self.std)

    def __call__(self, images):
        """Both views as one batch of 2N, each image with its view's probabilities: every op runs once
        for both views, not twice. images: a uint8 batch, or (crops for view 1, crops for view 2) as the
        streaming path's workers make them (data.StreamingFolder), which then skip the crop here."""
        crops = isinstance(images, (tuple, list))
        x = to_float(torch.cat(list(images) if crops else [images, images]))
        n = len(x) // 2
        key = (n, x.device)
        if key not in self._recipes:  # per-image probabilities, N of view 1 then N of view 2
            self._recipes[key] = {op: torch.tensor([VIEWS["view1"][op]] * n + [VIEWS["view2"][op]] * n,
                                                   device=x.device) for op in COINS}
        v = self.view(x, self._recipes[key], crop=not crops)
        return v[:n], v[n:]


def crop_flip(images, image_size, scale=VIEWS["view1"]["crop_scale"], mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """The linear-evaluation training augmentation (Appendix C.1): random resized crop + flip."""
    x = to_float(images)
    N, _, H, W = x.shape
    boxes = sample_crop_boxes(N, H, W, scale, device=x.device)
    return normalize(resized_crop(x, boxes, image_size, flip=_coin(N, 0.5, x.device)), mean, std)
