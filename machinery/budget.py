"""--minutes M: time this machine's training step, test-split check and checkpoint on the real model,
then fit the longest whole schedule (warm-up, cosine lr and tau) into M minutes of training."""
import time

import torch

from machinery.devices import same_everywhere, synchronize


def time_trial(step, draw, check, save, state, device):
    """Seconds per call of step(x, labels, lr, tau) on (x, labels) = draw(), at lr 0 and tau 1 (after three
    warm-up calls, so after compiling or capturing a CUDA graph; at least three calls and a second), of
    check() and of save(), either of which may be None (0 s). step is the training loop's own step. Every tensor of `state` (state_tensors)
    is then put back in place, exactly as it was, and so is the RNG: the trial leaves no trace, and a
    graph captured during it still holds the very tensors the loop uses."""
    before = {id(t): t.detach().clone() for t in state_tensors(*state)}
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)

    def seconds(fn):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - t0
    for _ in range(3):
        step(*draw(), 0.0, 1.0)
    steps, elapsed = 0, 0.0
    while steps < 3 or elapsed < 1.0:
        elapsed, steps = elapsed + seconds(lambda: step(*draw(), 0.0, 1.0)), steps + 1
    check_s, save_s = (seconds(fn) if fn else 0.0 for fn in (check, save))
    with torch.no_grad():
        for t in state_tensors(*state):
            if id(t) in before:
                t.copy_(before[id(t)])
            else:                        # state made during the trial (momentum): zero, as if never made
                t.zero_()
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state(rng[1], device)
    return elapsed / steps, check_s, save_s


def state_tensors(*objects):
    """Every tensor of the objects' state that a training step may change: a module's parameters and
    buffers, an optimizer's state, a tensor, or what an object lists as its state_tensors() (the
    monitor: its probe, the probe's optimizer and its sums)."""
    out = []
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            out += [*obj.parameters(), *obj.buffers()]
        elif isinstance(obj, torch.optim.Optimizer):
            out += [t for state in obj.state.values() for t in state.values() if torch.is_tensor(t)]
        elif torch.is_tensor(obj):
            out.append(obj)
        elif obj is not None:
            out += state_tensors(*obj.state_tensors())
    return out


def fit_epochs(minutes, steps_per_epoch, knn_every, step_s, check_s, save_s, save_minutes=0, most=10**6):
    """The most epochs (at least 1, at most `most`: --epochs' own bound, so that the run's config passes the
    flag's checks on --resume) whose steps, checkpoints (at the end of an epoch once save_minutes have passed,
    or of every epoch for 0, and at the end) and test-split checks (every knn_every epochs and at the end)
    fit in `minutes`. Returns (epochs, their planned seconds)."""
    def cost(epochs):
        checks = -(-epochs // knn_every) if knn_every and check_s else 0  # ceil: every knn_every, and the end
        steps = epochs * steps_per_epoch * step_s
        saves = min(epochs, 1 + int(steps // (60 * save_minutes))) if save_minutes else epochs
        return steps + saves * save_s + checks * check_s
    low, high = 1, 2                               # cost rises with the epochs: double, then halve the gap
    while cost(high) <= 60 * minutes and high <= most:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if cost(middle) <= 60 * minutes else (low, middle)
    low = min(low, most)
    return low, cost(low)


def plan_minutes(cfg, steps_per_epoch, times, world, device):
    """fit_epochs for --minutes, said aloud, the same on every process. Returns the epochs and records
    the planned minutes in cfg."""
    step_s, check_s, save_s = times
    epochs, planned = fit_epochs(cfg["minutes"], steps_per_epoch, cfg["knn_every"], step_s, check_s, save_s,
                                 cfg["save_minutes"])
    print(f"--minutes {cfg['minutes']:g}: a step takes {step_s:.3g} s here, a test-split check {check_s:.3g} s "
          f"and a checkpoint {save_s:.3g} s, so {epochs} epochs ({epochs * steps_per_epoch} steps, warm-up and "
          f"cosine schedules included) are planned to take {planned / 60:.1f} min")
    cfg["planned_minutes"] = planned / 60
    return same_everywhere(epochs, world, device)
