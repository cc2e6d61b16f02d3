"""budget.py: how many epochs --minutes plans from the measured step, check and save times."""
from budget import fit_epochs


def test_fit_epochs_fills_the_budget_with_checks_and_checkpoints():
    # 10 steps of 1 s per epoch: 6 epochs in a minute
    assert fit_epochs(1, 10, 0, 1.0, 0.0, 0.0) == (6, 60.0)
    # a 5 s check every 2 epochs and at the end, a 1 s checkpoint per epoch: 4 epochs = 44 + 2 checks
    assert fit_epochs(1, 10, 2, 1.0, 5.0, 1.0) == (4, 54.0)
    assert fit_epochs(1, 10, 2, 1.0, 5.0, 1.0)[0] < fit_epochs(2, 10, 2, 1.0, 5.0, 1.0)[0]
    assert fit_epochs(0.001, 10, 0, 1.0, 0.0, 0.0)[0] == 1  # never less than one epoch
