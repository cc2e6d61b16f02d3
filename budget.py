"""--minutes M: time this machine's training step, test-split check and checkpoint on the real model,
then fit the longest whole schedule (warm-up, cosine lr and tau) into M minutes of training."""
import copy
import time

import torch

from devices import same_everywhere, synchronize


def time_trial(step, draw, check, save, state, device):
    """Seconds per call of step(*draw()) (after three warm-up calls, so after compiling; at least three
    calls and a second), of check() and of save(), either of which may be None (0 s). step is the
    training loop's own step, passed in; every object in `state` (state_dict / load_state_dict) and
    the RNG are put back afterwards exactly as they were, so the trial leaves no trace."""
    saved = copy.deepcopy([s.state_dict() for s in state])
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)

    def seconds(fn):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - t0
    for _ in range(3):
        step(*draw())
    steps, elapsed = 0, 0.0
    while steps < 3 or elapsed < 1.0:
        elapsed, steps = elapsed + seconds(lambda: step(*draw())), steps + 1
    check_s, save_s = (seconds(fn) if fn else 0.0 for fn in (check, save))
    for s, state_dict in zip(state, saved):
        s.load_state_dict(state_dict)
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state(rng[1], device)
    return elapsed / steps, check_s, save_s


def fit_epochs(minutes, steps_per_epoch, knn_every, step_s, check_s, save_s):
    """The most epochs (at least 1) whose steps, checkpoints (one per epoch) and test-split checks
    (every knn_every epochs and at the end) fit in `minutes`. Returns (epochs, their planned seconds)."""
    def cost(epochs):
        checks = -(-epochs // knn_every) if knn_every and check_s else 0  # ceil: every knn_every, and the end
        return epochs * (steps_per_epoch * step_s + save_s) + checks * check_s
    low, high = 1, 2                               # cost rises with the epochs: double, then halve the gap
    while cost(high) <= 60 * minutes:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if cost(middle) <= 60 * minutes else (low, middle)
    return low, cost(low)


def plan_minutes(cfg, steps_per_epoch, times, world, device):
    """fit_epochs for --minutes, said aloud, the same on every process. Returns the epochs and records
    the planned minutes in cfg."""
    step_s, check_s, save_s = times
    epochs, planned = fit_epochs(cfg["minutes"], steps_per_epoch, cfg["knn_every"], step_s, check_s, save_s)
    print(f"--minutes {cfg['minutes']:g}: a step takes {step_s:.3g} s here, a test-split check {check_s:.3g} s "
          f"and a checkpoint {save_s:.3g} s, so {epochs} epochs ({epochs * steps_per_epoch} steps, warm-up and "
          f"cosine schedules included) are planned to take {planned / 60:.1f} min")
    cfg["planned_minutes"] = planned / 60
    return same_everywhere(epochs, world, device)
