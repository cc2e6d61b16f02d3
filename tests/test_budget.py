"""budget.py: how many epochs --minutes plans from the measured step, check and save times."""
from machinery.budget import fit_epochs


def test_fit_epochs_fills_the_budget_with_checks_and_checkpoints():
    # 10 steps of 1 s per epoch: 6 epochs in a minute
    assert fit_epochs(1, 10, 0, 1.0, 0.0, 0.0) == (6, 60.0)
    # a 5 s check every 2 epochs and at the end, a 1 s checkpoint per epoch: 4 epochs = 44 + 2 checks
    assert fit_epochs(1, 10, 2, 1.0, 5.0, 1.0) == (4, 54.0)
    assert fit_epochs(1, 10, 2, 1.0, 5.0, 1.0)[0] < fit_epochs(2, 10, 2, 1.0, 5.0, 1.0)[0]
    assert fit_epochs(0.001, 10, 0, 1.0, 0.0, 0.0)[0] == 1  # never less than one epoch


def test_fit_epochs_plans_no_more_than_the_epochs_flag_allows():
    """A tiny set and a fast step used to plan more than --epochs' bound (10**6), so the run's own config was
    refused on --resume; a step timed at 0 s planned without end."""
    from machinery.flags import TYPES
    assert fit_epochs(60, 1, 0, 1e-9, 0.0, 0.0)[0] == 10**6
    assert fit_epochs(1, 1, 0, 0.0, 0.0, 0.0)[0] == 10**6
    assert TYPES["epochs"]("1000000") == 10**6             # the bound fit_epochs keeps to is the flag's


def test_the_time_trial_puts_every_tensor_back_in_place():
    """After the trial the model, optimizer and probe hold the very tensors they held before (a CUDA graph
    captured during the trial still reads them), with their old values; optimizer state the trial made is
    zero, which LARS and SGD read as no state at all; and the RNG is where it was."""
    import torch
    from machinery.budget import time_trial
    from optim import make_optimizer
    from tests.conftest import small_byol
    from train import DEFAULTS, byol_update
    model = small_byol()
    optimizer = make_optimizer(model, DEFAULTS)
    params, before = list(model.parameters()), {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()

    def step(x, labels, lr, tau):
        byol_update(model, model, optimizer, x, x.flip(-1), 0.5, 0.9)
    draw = lambda: (torch.randn(4, 3, 32, 32), None)  # noqa: E731
    seconds, check_s, save_s = time_trial(step, draw, None, None, [model, optimizer], torch.device("cpu"))
    assert seconds > 0 and check_s == save_s == 0
    assert all(p is q for p, q in zip(params, model.parameters()))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert optimizer.state and all(torch.count_nonzero(s["v"]) == 0 for s in optimizer.state.values())
    assert torch.equal(torch.get_rng_state(), rng)
