"""BYOL's networks (Grill et al. 2020, arXiv 2006.07733, Sec. 3.1 and 3.3)."""
import copy
from collections import OrderedDict

import torch
import torch.nn as nn
import torchvision

from loss import byol_loss

ARCHS = ("resnet18", "resnet50")
STEMS = ("cifar", "imagenet")


def resnet(arch="resnet18", image_size=32, stem=None):
    """The encoder f: a torchvision ResNet with fc = Identity, so f(x) is the pooled representation y.

    stem None picks by size: images of 64 px or less get the CIFAR stem used by every public CIFAR
    recipe (a 3x3 stride-1 conv1 and no max-pool), larger ones torchvision's ImageNet stem (7x7/2 conv
    and max-pool). stem="imagenet" at 32 px shrinks the image to 8 px before layer1: 8x fewer FLOPs,
    the CPU proxy of the README's laptop run (it then loads into a plain torchvision resnet18).
    Returns the network and the width of y (512 for ResNet-18, 2048 for ResNet-50, Sec. 3.3).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if stem not in (None, *STEMS):
        raise ValueError(f"unknown --stem {stem!r}; choose one of {', '.join(STEMS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    if stem == "cifar" or (stem is None and image_size <= 64):
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def mlp(in_dim, hidden_dim=4096, out_dim=256):
    """Sec. 3.3: the projector g and the predictor q are Linear(4096) - BN - ReLU - Linear(256)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


class BYOL(nn.Module):
    """Bootstrap Your Own Latent, https://arxiv.org/abs/2006.07733 (Sec. 3.1, Fig. 2).

    online    = (encoder f_theta, projector g_theta), followed by the predictor q_theta.
    target    = (encoder f_xi, projector g_xi): starts as a copy of online (Appendix J.5; docs/recipe.md),
                never receives gradients and moves only by the EMA in update_target().
    predictor = q_theta, online only. It and the slowly moving target together keep BYOL from collapsing
                (Sec. 3.2); without either it collapses (Table 5b). predictor=False: that ablation.
    Each view goes through each network on its own, as in DeepMind's code (byol_experiment.py), so
    BatchNorm never normalises one view with the other's statistics.
    """

    def __init__(self, arch="resnet18", image_size=32, hidden_dim=4096, proj_dim=256,
                 predictor=True, stem=None):
        super().__init__()
        encoder, dim = resnet(arch, image_size, stem)
        self.online = nn.Sequential(OrderedDict(
            encoder=encoder, projector=mlp(dim, hidden_dim, proj_dim)))
        self.predictor = mlp(proj_dim, hidden_dim, proj_dim) if predictor else nn.Identity()
        self.target = copy.deepcopy(self.online).requires_grad_(False)

    def forward(self, view1, view2):
        """Returns the loss L^BYOL (Sec. 3.1), and for the monitors the online representation y
        and projection z of view 1, both detached."""
        (y1, z1, q1), (_, _, q2) = self._online(view1), self._online(view2)
        with torch.no_grad():                                           # Algorithm 1's pairing: z'_1 is the
            z2_t = self.target(view1)                                   # target's view 2, z'_2 its view 1
            z1_t = self.target(view2)                                   # N x 256 each
        return byol_loss(q1, q2, z1_t, z2_t), y1.detach(), z1.detach()

    def _online(self, x):
        y = self.online.encoder(x)      # N x 512, the representation
        z = self.online.projector(y)    # N x 256, the projection
        return y, z, self.predictor(z)  # q: N x 256, the prediction

    @torch.no_grad()
    def update_target(self, tau):
        """Eq. 1: xi <- tau * xi + (1 - tau) * theta, over all target parameters in one foreach op.

        BatchNorm running statistics are buffers, not parameters, so they are not averaged: each
        network keeps the statistics of its own forward passes. Training uses batch statistics, so
        they never touch the loss; only the online encoder's are used, at evaluation. tau may be a
        0-dim tensor on the device (a CUDA graph reads it there); each tensor then takes the same lerp.
        """
        if not hasattr(self, "_ema_pairs"):
            self._ema_pairs = (list(self.target.parameters()), list(self.online.parameters()))
        if not torch.is_tensor(tau):
            return torch._foreach_lerp_(*self._ema_pairs, 1.0 - tau)
        weight = (1 - tau).float()  # tau in float64: 1 - tau keeps its digits as tau nears 1
        for xi, theta in zip(*self._ema_pairs):
            xi.lerp_(theta, weight)
