"""The kernels behind two of augment.py's ops, kept out of the reading path: "resize a crop bicubically"
(with the flip folded in) as two matrix products per image, and "convert to hue, chroma and value" and
back. Each equals torchvision's op on the same parameters (tests/test_kernels.py), and each runs on a
whole batch on the training device, with nothing copied from the host, so that a CUDA graph can capture
it (devices.StepGraph)."""
import functools

import torch


@functools.lru_cache(maxsize=None)
def constant(values, device):
    """A small table of numbers on the device, copied there once: a CUDA graph being captured may not copy
    from the host (devices.StepGraph), and the copy is never repeated."""
    return torch.tensor(values, device=device)


# ---- resize a crop bicubically --------------------------------------------------------------------

def cubic(t, a=-0.75):
    """(..., 4) weights of Keys' cubic convolution for the taps at -1, 0, 1, 2 around a sample at
    offset t in [0, 1): PyTorch's bicubic kernel (a = -0.75), which torchvision's resize uses."""
    d = torch.stack([1 + t, t, 1 - t, 2 - t], -1)                     # distances to the four taps
    near = ((a + 2) * d - (a + 3)) * d * d + 1                         # |d| <= 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a                    # 1 < |d| < 2
    return torch.where(d <= 1, near, far)


def resize_matrix(start, length, size, full):
    """(N, size, full): row i holds the weights with which output pixel i mixes the source pixels,
    as F.interpolate(align_corners=False) resizes the crop [start, start + length) of each image: it
    samples start + (i + 0.5) * length / size - 0.5, and taps past the crop's edge repeat its edge
    pixel, as F.interpolate does at an image's edge."""
    src = (torch.arange(size, device=start.device) + 0.5) * (length / size)[:, None] - 0.5  # N x S
    base, offsets = src.floor(), constant((-1.0, 0.0, 1.0, 2.0), src.device)
    weights = cubic(src - base)                                        # N x S x 4, bicubic
    taps = torch.minimum((base[..., None] + offsets).clamp(min=0), (length - 1)[:, None, None])
    index = (taps + start[:, None, None]).long()
    return torch.zeros(len(start), size, full, device=src.device).scatter_add_(2, index, weights)


def resized_crop(x, boxes, size, flip=None):
    """Crop each image of x (N,3,H,W, floats in [0, 1]) to its (top, left, h, w) box and resize it to
    size x size, bicubic without antialias (as DeepMind's tf.image.resize; solo-learn's torchvision on PIL
    images antialiases); then mirror the images where flip (N,) is True. Equals v2.functional.resized_crop(
    ..., antialias=False) with the overshoot of the bicubic kernel clamped to [0, 1].

    Resizing is separable, so each image is two matrix products: rows (S x H) @ image @ cols^T
    (W x S), whose weights come from resize_matrix; the flip reverses the order of cols' rows.
    """
    N, _, H, W = x.shape
    top, left, h, w = boxes.to(x.device, torch.float32).unbind(1)      # N each
    rows = resize_matrix(top, h, size, H)                               # N x S x H
    cols = resize_matrix(left, w, size, W)                              # N x S x W
    if flip is not None:
        cols = torch.where(flip[:, None, None], cols.flip(1), cols)
    out = rows[:, None] @ x @ cols[:, None].transpose(2, 3)            # N x C x S x S
    return out.clamp(0, 1)


# ---- convert to hue, chroma and value, and back -----------------------------------------------------

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


# ---- colour jittering with hue run once ------------------------------------------------------------

def color_jitter(x, p, brightness, contrast, saturation, hue):
    """augment.color_jitter, faster: the same draws from the RNG, the same images out (tests/test_kernels.py
    holds them equal), with hue, the costly op, run once for the batch instead of at each of the 4 steps.

    Brightness, contrast and saturation are each a blend a x + b gray(x) + c mean(gray(x)), so each
    image's ops before its hue run as three blend steps, then hue once for the whole batch, then the ops
    after it: equal to the four ops one by one in each image's order, with one hue op, not four.
    """
    N, dev = x.shape[0], x.device
    uniform = lambda lo, hi: lo + (hi - lo) * torch.rand(N, device=dev)  # noqa: E731  (N,) ~ U[lo, hi]
    fb, fc, fs = (uniform(1 - s, 1 + s) for s in (brightness, contrast, saturation))
    fh = uniform(-hue, hue)
    order = torch.rand(N, 4, device=dev).argsort(1)  # Nx4: op order[:, s] (0 b, 1 c, 2 s, 3 h) at step s
    apply = torch.rand(N, device=dev) < p
    hue_step = (order == 3).int().argmax(1)          # N, the step at which hue comes
    one, zero = torch.ones_like(fb), torch.zeros_like(fb)
    coef = torch.stack([torch.stack([fb, zero, zero], 1),     # brightness: fb x
                        torch.stack([fc, zero, 1 - fc], 1),   # contrast: fc x + (1 - fc) mean(gray)
                        torch.stack([fs, 1 - fs, zero], 1),   # saturation: fs x + (1 - fs) gray
                        torch.stack([one, zero, zero], 1)], 1)  # hue's row: the identity here; Nx4x3
    rows = torch.arange(N, device=dev)

    def blend_step(x, step, mask):  # each image's op at this step where mask, else the identity
        a, b, c = (t.view(-1, 1, 1, 1) for t in coef[rows, torch.where(mask, order[:, step], 3)].unbind(1))
        r, g_, b_ = x.unbind(1)
        g = (0.2989 * r + 0.587 * g_ + 0.114 * b_)[:, None]    # luma, as augment.luma
        return torch.addcmul(b * g + c * g.mean((1, 2, 3), keepdim=True), a, x).clamp_(0, 1)  # a x + ...

    for step in range(3):
        x = blend_step(x, step, apply & (step < hue_step))
    h, c, v = rgb_to_hcv(x)                          # hue once: as augment.adjust_hue
    x = torch.where(apply.view(-1, 1, 1, 1), hcv_to_rgb((h + 6 * fh.view(-1, 1, 1)) % 6, c, v), x)
    for step in range(1, 4):
        x = blend_step(x, step, apply & (step > hue_step))
    return x
