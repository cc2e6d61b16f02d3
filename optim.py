"""BYOL's optimisation (Grill et al. 2020, arXiv 2006.07733, Sec. 3.3 "Optimization" and Appendix C):
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
    """LARS (You et al. 2017) in its two BYOL forms. With u = g + wd * w and m the momentum:

    clip=True, solo-learn's CIFAR recipe (solo/utils/lars.py with clip_lars_lr, the default here):
        trust = eta * ||w|| / (||g|| + wd * ||w|| + eps),   v <- m * v + min(trust / lr, 1) * u,
        w <- w - lr * v,   so each tensor steps by min(trust, lr) times its update.
    clip=False, the paper's (Appendix C; DeepMind's byol/utils/optimizers.py), --no-lars-clip:
        trust = eta * ||w|| / ||u||,   v <- m * v + trust * u,   w <- w - lr * v.

    Where ||w|| or the gradient's norm is 0, the update is left unscaled (and, clipped, without weight
    decay, as solo-learn). Groups with lars=False skip the trust ratio: SGD with momentum, v <- m v + u
    (biases and BatchNorm parameters, Appendix C, with no weight decay; every group for --optimizer
    sgd). Every tensor of a group is updated at once with foreach ops, the per-tensor factors staying on
    the device. lr may be a float or a 0-dim device tensor (as a CUDA graph reads it: devices.StepGraph).
    """

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=1e-3, clip=True, eps=1e-8):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars=True,
                                      clip=clip, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            w = [p for p in group["params"] if p.grad is not None]
            if not w:
                continue
            for p in w:
                if "v" not in self.state[p]:
                    self.state[p]["v"] = torch.zeros_like(p)
            v, g = [self.state[p]["v"] for p in w], [p.grad for p in w]
            lr, wd, eta = group["lr"], group["weight_decay"], group["eta"]
            torch._foreach_mul_(v, group["momentum"])
            if not group["lars"]:
                torch._foreach_add_(v, torch._foreach_add(g, w, alpha=wd) if wd else g)   # v <- m v + u
            elif group["clip"]:
                w_norm, g_norm = torch.stack(torch._foreach_norm(w)), torch.stack(torch._foreach_norm(g))
                ok = (w_norm > 0) & (g_norm > 0)
                trust = eta * w_norm / (g_norm + wd * w_norm + group.get("eps", 1e-8))
                scale = torch.where(ok & (lr > 0), torch.clamp(trust / lr, max=1.0), 1.0)
                u = torch._foreach_add(g, torch._foreach_mul(w, list((wd * ok).unbind())))  # g + wd w where ok
                torch._foreach_addcmul_(v, u, list(scale.unbind()))     # v <- m v + min(trust / lr, 1) u
            else:
                u = torch._foreach_add(g, w, alpha=wd)
                w_norm, u_norm = torch.stack(torch._foreach_norm(w)), torch.stack(torch._foreach_norm(u))
                trust = torch.where((w_norm > 0) & (u_norm > 0), eta * w_norm / u_norm, 1.0)
                torch._foreach_addcmul_(v, u, list(trust.unbind()))     # v <- m v + trust u
            torch._foreach_sub_(w, torch._foreach_mul(v, lr))            # w <- w - lr v


def param_groups(model, weight_decay):
    """Appendix C: biases and BatchNorm parameters (every 1-D tensor) are excluded from weight decay
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
