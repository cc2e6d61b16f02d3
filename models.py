"""BYOL's networks (Grill et al. 2020, arXiv 2006.07733, Sec. 3.1 and 3.3)."""
import copy
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from torch.nn.parallel import DistributedDataParallel

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
    target    = (encoder f_xi, projector g_xi): a copy of online that never receives gradients and
                moves only by the EMA in update_target().
    predictor = q_theta, online only. The asymmetry it creates is what prevents collapse (Table 5);
                predictor=False removes it, for that ablation.
    Each view goes through each network on its own, as in the paper, so BatchNorm never normalises
    one view with the other's statistics.
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
        with torch.no_grad():
            z1_t, z2_t = self.target(view1), self.target(view2)        # N x 256 each
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
        they never touch the loss; only the online encoder's are used, at evaluation.
        """
        if not hasattr(self, "_ema_pairs"):
            self._ema_pairs = (list(self.target.parameters()), list(self.online.parameters()))
        torch._foreach_lerp_(*self._ema_pairs, 1.0 - tau)


# ---- how the networks run: decided once, where the model is built ------------------------------------

def autocast(device):
    """bf16 autocast on CUDA (the paper trains in bfloat16 on TPUs, Appendix C), off elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def prepare(model, device, compile=False, channels_last=None, bf16=None, distributed=False):
    """Returns forward(view1, view2) running `model` as it should run on `device`: on CUDA with
    channels_last weights and views and bf16 autocast (each can be forced on or off, as bench.py
    does), optionally torch.compile'd; with distributed=True (torchrun), wrapped in PyTorch's
    DistributedDataParallel, which averages the gradients of every process before the optimizer
    step. Algorithm 1's update (train.byol_update) just calls it."""
    cuda = device.type == "cuda"
    fmt = torch.channels_last if (cuda if channels_last is None else channels_last) else torch.contiguous_format
    model.to(memory_format=fmt)
    net = model
    if distributed:
        net = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    net = torch.compile(net) if compile else net
    precision = autocast(device) if bf16 is None else torch.autocast(device.type, torch.bfloat16, enabled=bf16)

    def forward(view1, view2):
        with precision:
            return net(view1.contiguous(memory_format=fmt), view2.contiguous(memory_format=fmt))
    return forward


def sync_batchnorm(model, device):
    """BatchNorm over the global batch of all processes, as the paper computes BN statistics over its
    whole batch of 4096 across TPU cores (Appendix C): PyTorch's nn.SyncBatchNorm on GPUs, and on the
    CPU, where nn.SyncBatchNorm does not run, GlobalBatchNorm, the same computation over gloo."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            bn = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine)
            bn.weight, bn.bias = child.weight, child.bias   # the same tensors: the target's stay frozen
            bn.running_mean, bn.running_var = child.running_mean, child.running_var
            bn.num_batches_tracked = child.num_batches_tracked
            setattr(model, name, bn)
        else:
            sync_batchnorm(child, device)
    return model


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BN whose training statistics are the mean and (biased) variance over every process's batch. The
    sums go through AllReduceSum, whose backward all-reduces the gradient, so the gradients are those
    of one BN over the whole global batch. Running statistics as nn.BatchNorm's (unbiased variance);
    evaluation uses them and talks to no other process."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected a batch of at least 2-D inputs, got {x.dim()}-D")

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        n = x.numel() // x.shape[1] * dist.get_world_size()             # values per channel, all processes
        mean = AllReduceSum.apply(x.sum(dims)) / n
        centred = x - mean.view(shape)
        var = AllReduceSum.apply((centred * centred).sum(dims)) / n
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        return centred * torch.rsqrt(var + self.eps).view(shape) * self.weight.view(shape) + self.bias.view(shape)


class AllReduceSum(torch.autograd.Function):
    """The sum of a tensor over all processes; its gradient is likewise summed over all processes, since
    every process's loss depends on the sum."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad
