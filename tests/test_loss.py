import torch
import torch.nn.functional as F

from loss import byol_loss, regression_loss


def test_regression_loss_is_squared_distance_of_normalised_vectors():
    q, z = torch.randn(8, 16), torch.randn(8, 16)
    expected = ((F.normalize(q, dim=1) - F.normalize(z, dim=1)) ** 2).sum(1)
    torch.testing.assert_close(regression_loss(q, z), expected)
    # Scale-invariant, 0 for the same direction, 4 for opposite directions.
    torch.testing.assert_close(regression_loss(3 * q, 0.5 * z), expected)
    torch.testing.assert_close(regression_loss(q, 2 * q), torch.zeros(8), atol=1e-6, rtol=0)
    torch.testing.assert_close(regression_loss(q, -q), torch.full((8,), 4.0))


def test_no_gradient_reaches_the_target():
    q = torch.randn(8, 16, requires_grad=True)
    z = torch.randn(8, 16, requires_grad=True)
    regression_loss(q, z).sum().backward()
    assert z.grad is None, "stop-gradient missing: the target projection received a gradient"
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_symmetric_loss_pairs_each_prediction_with_the_other_views_target():
    q1, q2, z_of_view1, z_of_view2 = (torch.randn(8, 16) for _ in range(4))   # z: the target's projections
    expected = (regression_loss(q1, z_of_view2) + regression_loss(q2, z_of_view1)).mean()
    # Algorithm 1's names: z'_1 (paired with q1) is the target's projection of view 2, z'_2 of view 1.
    torch.testing.assert_close(byol_loss(q1, q2, z1_t=z_of_view2, z2_t=z_of_view1), expected)
    # Regressing each view's own target is a different (wrong) loss.
    assert not torch.allclose(byol_loss(q1, q2, z_of_view2, z_of_view1), byol_loss(q1, q2, z_of_view1, z_of_view2))
