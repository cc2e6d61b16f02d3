"""BYOL's two asymmetric view distributions (arXiv 2006.07733, Appendix B, Table 6).

Every op runs on a whole uint8 batch on the training device, with its randomness drawn per image
from torch's global RNG (so checkpoints can restore it), applied through masks and torch.where:
no Python loop over images and no host sync. Each op matches torchvision.transforms.v2.functional
on the same parameters (tests/test_augment.py checks this). The two views: python plots.py views.
"""
import functools
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
# The (mean, std) each recipe normalises with: CIFAR-10's above; ImageNet's, as torchvision's models.
STATS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def _bcast(v):  # (N,) -> (N,1,1,1), to scale or select a batch of images per image
    return v.view(-1, 1, 1, 1)


def _coin(n, p, device):  # (N,) bool, each True with probability p
    return torch.rand(n, device=device) < p


def _uniform(n, lo, hi, device):  # (N,) floats ~ U[lo, hi]
    return lo + (hi - lo) * torch.rand(n, device=device)


@functools.lru_cache(maxsize=None)
def constant(values, device):
    """A small table of numbers on the device, copied there once: a CUDA graph being captured may not copy
    from the host (devices.StepGraph), and the copy is never repeated."""
    return torch.tensor(values, device=device)


def to_float(images):
    """uint8 (N,3,H,W) -> float32 in [0,1]; float input is taken to be in [0,1] already."""
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


def normalize(images, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """uint8 or [0,1] float (N,3,H,W) -> (x - mean) / std, float32 on the same device."""
    mean, std = (constant(tuple(v), images.device).view(1, 3, 1, 1) for v in (mean, std))
    return (to_float(images) - mean) / std


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


def _cubic(t, a=-0.75):
    """(..., 4) weights of Keys' cubic convolution for the taps at -1, 0, 1, 2 around a sample at
    offset t in [0, 1): PyTorch's bicubic kernel (a = -0.75), which torchvision's resize uses."""
    d = torch.stack([1 + t, t, 1 - t, 2 - t], -1)                     # distances to the four taps
    near = ((a + 2) * d - (a + 3)) * d * d + 1                         # |d| <= 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a                    # 1 < |d| < 2
    return torch.where(d <= 1, near, far)


def _resize_matrix(start, length, size, full):
    """(N, size, full): row i holds the weights with which output pixel i mixes the source pixels,
    as F.interpolate(align_corners=False) resizes the crop [start, start + length) of each image: it
    samples start + (i + 0.5) * length / size - 0.5, and taps past the crop's edge repeat its edge
    pixel, as F.interpolate does at an image's edge."""
    src = (torch.arange(size, device=start.device) + 0.5) * (length / size)[:, None] - 0.5  # N x S
    base, offsets = src.floor(), constant((-1.0, 0.0, 1.0, 2.0), src.device)
    weights = _cubic(src - base)                                       # N x S x 4, bicubic
    taps = torch.minimum((base[..., None] + offsets).clamp(min=0), (length - 1)[:, None, None])
    index = (taps + start[:, None, None]).long()
    return torch.zeros(len(start), size, full, device=src.device).scatter_add_(2, index, weights)


def resized_crop(x, boxes, size, flip=None):
    """Crop each image to its (top, left, h, w) box and resize it to size x size, bicubic without
    antialias (DeepMind's and solo-learn's pipelines); then mirror the images where flip (N,) is True. Equals v2.functional.resized_crop(..., antialias=False) with the overshoot of the
    bicubic kernel clamped to [0, 1].

    Resizing is separable, so each image is two matrix products: rows (S x H) @ image @ cols^T
    (W x S), whose weights come from _resize_matrix; the flip reverses the order of cols' rows.
    """
    N, _, H, W = x.shape
    top, left, h, w = boxes.to(x.device, torch.float32).unbind(1)      # N each
    rows = _resize_matrix(top, h, size, H)                              # N x S x H
    cols = _resize_matrix(left, w, size, W)                             # N x S x W
    if flip is not None:
        cols = torch.where(flip[:, None, None], cols.flip(1), cols)
    out = rows[:, None] @ x @ cols[:, None].transpose(2, 3)            # N x C x S x S
    return out.clamp(0, 1)


# ---- per-image ops on float images in [0,1]; factors are (N,) tensors --------------------------

def _luma(x):  # N x 1 x H x W: ITU-R 601 luma, the weights and order of torchvision's rgb_to_grayscale
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b)[:, None]


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


def rgb_to_hcv(x):
    """(N,3,H,W) RGB -> (hue H in [0, 6), chroma c, value v), each N x H x W: HSV with s v = c. As
    torchvision and Pillow: v = max, c = max - min, and H = (g - b) / c where r is the max, else
    2 + (b - r) / c where g is, else 4 + (r - g) / c; grey pixels (c = 0) get H = 0."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    c = v - x.amin(1)
    is_r = v == r                                   # the channel that holds the max (r first, then g)
    is_g = (v == g) & ~is_r
    is_b = ~(is_r | is_g)
    hc = is_r * (g - b) + is_g * (b - r + 2 * c) + is_b * (r - g + 4 * c)   # H * c, without a per-pixel where
    return hc / c.clamp(min=1e-12) % 6, c, v                                  # grey: hc = 0


def hcv_to_rgb(h, c, v):
    """The inverse: channel n = 5, 3, 1 (R, G, B) is v - c clamp(min(k, 4 - k), 0, 1) with
    k = (n + H) mod 6 (Wikipedia, "HSV to RGB alternative", where s v = c)."""
    k = constant((5.0, 3.0, 1.0), h.device).view(1, 3, 1, 1) + h[:, None]  # N x 3 x H x W, in [1, 11)
    k = k - 6 * (k >= 6)                                                               # mod 6
    return v[:, None] - c[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def adjust_hue(x, factor):
    """Rotate each image's hue by factor (N,), a fraction of the circle in [-0.5, 0.5], as torchvision:
    RGB -> (H, c, v), H + 6 factor mod 6, back to RGB."""
    h, c, v = rgb_to_hcv(x)
    return hcv_to_rgb((h + 6 * factor.view(-1, 1, 1)) % 6, c, v)


def color_jitter(x, p, brightness, contrast, saturation, hue):
    """With probability p per image, torchvision's ColorJitter: the four ops with per-image factors,
    in a per-image random order.

    Brightness, contrast and saturation are each a blend a x + b gray(x) + c mean(gray(x)), so each
    image's ops before hue run as three blend steps, then hue once for the whole batch, then the ops
    after it: equal to the four ops one by one in each image's order, with one hue op, not four.
    """
    N, dev = x.shape[0], x.device
    fb, fc, fs = (_uniform(N, 1 - s, 1 + s, dev) for s in (brightness, contrast, saturation))
    fh = _uniform(N, -hue, hue, dev)
    order = torch.rand(N, 4, device=dev).argsort(1)  # Nx4: op order[:, s] (0 b, 1 c, 2 s, 3 h) at step s
    apply = _coin(N, p, dev)
    hue_step = (order == 3).int().argmax(1)          # N, the step at which hue comes
    one, zero = torch.ones_like(fb), torch.zeros_like(fb)
    coef = torch.stack([torch.stack([fb, zero, zero], 1),     # brightness: fb x
                        torch.stack([fc, zero, 1 - fc], 1),   # contrast: fc x + (1 - fc) mean(gray)
                        torch.stack([fs, 1 - fs, zero], 1),   # saturation: fs x + (1 - fs) gray
                        torch.stack([one, zero, zero], 1)], 1)  # hue's row: the identity here; Nx4x3
    rows = torch.arange(N, device=dev)

    def blend_step(x, step, mask):  # each image's op at this step where mask, else the identity
        a, b, c = (_bcast(t) for t in coef[rows, torch.where(mask, order[:, step], 3)].unbind(1))
        g = _luma(x)
        return torch.addcmul(b * g + c * g.mean((1, 2, 3), keepdim=True), a, x).clamp_(0, 1)  # a x + ...

    for step in range(3):
        x = blend_step(x, step, apply & (step < hue_step))
    x = torch.where(_bcast(apply), adjust_hue(x, fh), x)
    for step in range(1, 4):
        x = blend_step(x, step, apply & (step > hue_step))
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


def solarize(x):  # invert the pixels at or above Table 6's threshold 0.5: that is min(x, 1 - x)
    return torch.minimum(x, 1 - x)


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
        x = color_jitter(x, recipe["jitter"], **JITTER)
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
                                                   device=x.device) for op in VIEWS["view1"]}
        v = self.view(x, self._recipes[key], crop=not crops)
        return v[:n], v[n:]


def crop_flip(images, image_size, scale=(0.08, 1.0), mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """The linear-evaluation training augmentation (Appendix C.1): random resized crop + flip."""
    x = to_float(images)
    N, _, H, W = x.shape
    boxes = sample_crop_boxes(N, H, W, scale, device=x.device)
    return normalize(resized_crop(x, boxes, image_size, flip=_coin(N, 0.5, x.device)), mean, std)
