"""BYOL's loss (Grill et al. 2020, arXiv 2006.07733, Sec. 3.1)."""
import torch.nn.functional as F


def regression_loss(q, z):
    """Eq. 2: L = ||q_bar - z_bar||^2 = 2 - 2 * <q, z> / (||q|| ||z||), one value per image.

    q: NxD online prediction q_theta(z_theta). z: NxD target projection z'_xi.
    sg(z'): the loss is minimised over theta only, never xi (Sec. 3.1, Fig. 2), so the stop-gradient is
    applied here, where the loss is defined, not left to the caller. Alone it does not prevent collapse
    (predictor, sg(theta) as target: 5.5%, Table 19); the predictor and the slowly moving target do (Sec. 3.2).
    """
    q = F.normalize(q.float(), dim=-1)           # NxD, q_bar
    z = F.normalize(z.detach().float(), dim=-1)  # NxD, z_bar = sg(z') / ||z'||
    return 2 - 2 * (q * z).sum(dim=-1)           # N


def byol_loss(q1, q2, z1_t, z2_t):
    """Sec. 3.1: L^BYOL = L + L~, the loss symmetrised over the two views, averaged over the batch.

    As Algorithm 1 names them: q1 = q(z_1), the prediction of view 1, regresses z1_t = z'_1, the target's
    projection of view 2; q2, of view 2, regresses z2_t = z'_2, the target's projection of view 1.
    """
    return (regression_loss(q1, z1_t) + regression_loss(q2, z2_t)).mean()
