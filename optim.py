"""BYOL's optimisation (Grill et al. 2020, arXiv 2006.07733, Sec. 3.3 "Optimization" and Appendix J.1):
the lr and tau schedules as pure functions of the step, LARS, and the parameters it adapts."""
import math

import torch


def lr_at(step, total_steps, warmup_steps, peak_lr):
    """Sec. 3.3: linear warm-up to peak_lr over warmup_steps, then cosine decay to 0:
    lr_k = peak_lr * k / W for k < W, else peak_lr * (1 + cos(pi (k - W) / (K - W))) / 2."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def tau_at(step, total_steps, tau_base, schedule="cosine"):
    """Sec. 3.3: tau_k = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2, from tau_base at k = 0 to 1 at K.
    tau_base = 1 keeps the target at its random initialisation (Table 5a, 18.8%). schedule="constant"
    keeps tau_base throughout: with 0, the target is the online network at every step (Table 5a, 0.3%)."""
    if schedule == "constant":
        return tau_base
    return 1 - (1 - tau_base) * (math.cos(math.pi * step / total_steps) + 1) / 2


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017), tensor by tensor, in its two BYOL forms. With u = g + wd w, momentum m:

    clip=True, solo-learn's CIFAR recipe (its solo/utils/lars.py with clip_lr; the default here):
        trust = eta ||w|| / (||g|| + wd ||w|| + eps),   v <- m v + min(trust / lr, 1) u,   w <- w - lr v
    clip=False, DeepMind's byol code (byol/utils/optimizers.py; the paper names LARS only), --no-lars-clip:
        trust = eta ||w|| / ||u||,   v <- m v + trust u,   w <- w - lr v
    Where ||w|| or the gradient's norm is 0, u is left unscaled (and, clipped, without weight decay, as
    solo-learn). Groups with lars=False are SGD with momentum, v <- m v + u: biases and BatchNorm (no
    weight decay either), and every group for --optimizer sgd. lr may be a float or a 0-dim device
    tensor (a CUDA graph reads it there: devices.StepGraph), so no branch reads a tensor's value.
    """

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=1e-3, clip=True, eps=1e-8):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars=True,
                                      clip=clip, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd, eta = group["lr"], group["weight_decay"], group["eta"]
            for w in [p for p in group["params"] if p.grad is not None]:
                if "v" not in self.state[w]:
                    self.state[w]["v"] = torch.zeros_like(w)                 # the momentum buffer
                g, v = w.grad, self.state[w]["v"]
                u = g + wd * w                                               # the update, weight decay in
                if group["lars"] and group["clip"]:                          # solo-learn's
                    w_norm, g_norm = w.norm(), g.norm()
                    ok = (w_norm > 0) & (g_norm > 0)
                    trust = eta * w_norm / (g_norm + wd * w_norm + group["eps"])
                    u = torch.where(ok, u, g) * torch.where(ok & (lr > 0), torch.clamp(trust / lr, max=1.0), 1.0)
                elif group["lars"]:                                          # DeepMind's
                    w_norm, u_norm = w.norm(), u.norm()
                    u = u * torch.where((w_norm > 0) & (u_norm > 0), eta * w_norm / u_norm, 1.0)
                v.mul_(group["momentum"]).add_(u)                       # v <- m v + u
                w.sub_(lr * v)                                          # w <- w - lr v


def param_groups(model, weight_decay):
    """Sec. 3.3: biases and BatchNorm parameters (every 1-D tensor) are excluded from weight decay
    and from LARS adaptation."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [dict(params=[p for p in params if p.ndim > 1], weight_decay=weight_decay, lars=True),
            dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0, lars=False)]


def make_optimizer(model, cfg):
    """The optimizer of theta (online and predictor): the recipe's LARS, or SGD with momentum (--optimizer
    sgd: the same class with the trust ratio off); its lr is set at every step (lr_at)."""
    groups = param_groups(model, cfg["weight_decay"])
    if cfg["optimizer"] == "sgd":
        groups = [{**group, "lars": False} for group in groups]
    return LARS(groups, lr=0.0, momentum=cfg["momentum"], eta=cfg["eta"], clip=cfg["lars_clip"])
