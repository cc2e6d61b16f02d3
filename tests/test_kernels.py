"""machinery/kernels.py against torchvision and against augment.py's readable ops: the bicubic crop
resize (with its flip), the hue-chroma-value round trip, and the colour jitter that runs hue once."""
import pytest
import torch
import torchvision.transforms.v2.functional as TF

import augment as A
from machinery import kernels as K
from tests.test_augment import _images


@pytest.fixture
def x():
    torch.manual_seed(0)
    return A.to_float(_images())


@pytest.mark.parametrize("size", [16, 32, 56])  # down-, mixed-, up-sampling of the crops
def test_resized_crop_matches_torchvision(x, size):
    boxes = A.sample_crop_boxes(len(x), 32, 32, device="cpu")
    boxes[0] = torch.tensor([0, 0, 32, 32])  # whole image
    boxes[1] = torch.tensor([5, 7, 3, 20])  # extreme aspect, touches no border
    ref = torch.stack([TF.resized_crop(img, *b, [size, size], interpolation=TF.InterpolationMode.BICUBIC,
                                       antialias=False)
                       for img, b in zip(x, boxes.tolist())])
    ref = ref.clamp(0, 1)  # the bicubic kernel overshoots; Augment's images stay in [0, 1]
    torch.testing.assert_close(K.resized_crop(x, boxes, size), ref, atol=1e-5, rtol=0)
    flip = torch.arange(len(x)) % 2 == 0  # mirrored inside the crop: the same as flipping its output
    flipped = torch.where(flip[:, None, None, None], ref.flip(-1), ref)
    torch.testing.assert_close(K.resized_crop(x, boxes, size, flip), flipped, atol=1e-5, rtol=0)


def test_hcv_round_trip_and_hue_shift_by_half_turns(x):
    """(H, c, v) -> RGB undoes RGB -> (H, c, v) (a wrong sextant or channel offset would not), and the
    hue is circular: shifting by +0.5 then by -0.5 gives the image back."""
    torch.testing.assert_close(K.hcv_to_rgb(*K.rgb_to_hcv(x)), x, atol=1e-5, rtol=0)
    half = torch.full((len(x),), 0.5)
    torch.testing.assert_close(A.adjust_hue(A.adjust_hue(x, half), -half), x, atol=1e-5, rtol=0)


def test_the_fast_color_jitter_equals_the_four_ops_in_each_images_order():
    """kernels.color_jitter (what Augment runs: hue once for the batch) against augment.color_jitter (the
    four ops one by one, in each image's own order, as Appendix B says): the same draws from the same
    seed give the same images, for every order (256 images cover all 24), at p = 0.8, 1 and 0."""
    x = A.to_float(_images(64)).repeat(4, 1, 1, 1)
    for p in (0.8, 1.0, 0.0):
        torch.manual_seed(7)
        fast = K.color_jitter(x, p, **A.JITTER)
        torch.manual_seed(7)
        readable = A.color_jitter(x, p, **A.JITTER)
        torch.testing.assert_close(fast, readable, atol=1e-5, rtol=0)
        assert torch.equal(fast, x) == (p == 0)
