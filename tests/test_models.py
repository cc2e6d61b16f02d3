"""models.py: the encoder and its stems, the online / target / predictor networks, the EMA, and
devices.prepare (where precision and memory format are decided)."""
import pytest
import torch
import torchvision

from models import resnet
from machinery.devices import prepare
from tests.conftest import small_byol


def test_target_gets_no_gradient_and_moves_only_by_ema():
    model = small_byol()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = [p.clone() for p in model.target.parameters()]
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss, y, z = model(x1, x2)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.target.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.target.parameters())), \
        "the optimizer step changed the target"
    online = [p.detach().clone() for p in model.online.parameters()]
    dist = sum((a - b).norm() for a, b in zip(before, online))
    tau = 0.9
    model.update_target(tau)
    for old, new, theta in zip(before, model.target.parameters(), online):
        torch.testing.assert_close(new, tau * old + (1 - tau) * theta)
    assert sum((a - b).norm() for a, b in zip(model.target.parameters(), online)) < dist
    model.update_target(0.0)  # tau = 0: the target becomes the online network
    assert all(torch.equal(a, b) for a, b in zip(model.target.parameters(), model.online.parameters()))


def test_forward_shapes_and_views_are_not_mixed_up():
    model = small_byol().train()
    loss, y, z = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert loss.ndim == 0 and 0 <= loss.item() <= 8
    assert y.shape == (4, 512) and z.shape == (4, 16) and not y.requires_grad


def test_forward_pairs_each_views_prediction_with_the_targets_projection_of_the_other_view():
    """Algorithm 1: q(z_1) of view 1 regresses z'_1 = g_xi(f_xi(view 2)), and q(z_2) regresses z'_2 of view 1."""
    from loss import regression_loss
    model = small_byol().train()
    view1, view2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss, _, _ = model(view1, view2)
    with torch.no_grad():
        q1, q2 = (model.predictor(model.online(v)) for v in (view1, view2))
        t1, t2 = model.target(view1), model.target(view2)
        torch.testing.assert_close(loss, (regression_loss(q1, t2) + regression_loss(q2, t1)).mean())
        assert not torch.allclose(loss, (regression_loss(q1, t1) + regression_loss(q2, t2)).mean())


def test_no_predictor_ablation_has_no_predictor_parameters():
    assert not list(small_byol(predictor=False).predictor.parameters())


def test_encoder_is_a_plain_torchvision_resnet():
    encoder, dim = resnet("resnet18", 32)
    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    net.fc = torch.nn.Identity()
    net.load_state_dict(encoder.state_dict(), strict=True)
    assert dim == 512 and net(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert resnet("resnet18", 96)[0].conv1.kernel_size == (7, 7)  # ImageNet stem above 64 px


def test_imagenet_stem_at_32px_is_plain_torchvision_resnet18():
    """--stem imagenet (the CPU proxy): a 32 px image goes through torchvision's own 7x7/2 conv and
    max-pool, so the encoder loads strictly into resnet18() with only fc replaced."""
    encoder, dim = resnet("resnet18", 32, stem="imagenet")
    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()
    net.load_state_dict(encoder.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    net.eval(), encoder.eval()
    torch.testing.assert_close(encoder(x), net(x))
    assert isinstance(encoder.maxpool, torch.nn.MaxPool2d) and encoder.conv1.stride == (2, 2)
    with pytest.raises(ValueError, match="stem"):
        resnet("resnet18", 32, stem="tiny")


def test_prepare_decides_precision_and_memory_format_once():
    """On the CPU the model runs as built (fp32, NCHW); forcing channels_last converts the weights and
    gives the same loss; forcing bf16 autocast changes the precision of the forward pass."""
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    model = small_byol().train()
    loss, y, _ = prepare(model, torch.device("cpu"))(x1, x2)
    assert y.dtype == torch.float32 and model.online.encoder.conv1.weight.is_contiguous()
    model = small_byol().train()
    loss_cl, y_cl, _ = prepare(model, torch.device("cpu"), channels_last=True)(x1, x2)
    assert model.online.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(loss_cl, loss, atol=1e-4, rtol=0)
    _, y_bf16, _ = prepare(small_byol().train(), torch.device("cpu"), bf16=True)(x1, x2)
    assert y_bf16.dtype == torch.bfloat16


def test_the_ema_takes_tau_as_a_device_tensor_and_gives_the_same_target():
    """tau as a float64 device tensor (a CUDA graph's, devices.StepGraph) moves the target exactly as the
    float does, also for tau close to 1, where 1 - tau in float32 would lose its digits."""
    for tau in (0.9, 0.99, 0.999999):
        a, b = small_byol(), small_byol()
        for m in (a, b):                                                  # online and target differ
            torch.manual_seed(1)
            torch.nn.init.normal_(m.online.projector[0].weight)
        a.update_target(tau)
        b.update_target(torch.tensor(tau, dtype=torch.float64))
        assert all(torch.equal(x, y) for x, y in zip(a.target.parameters(), b.target.parameters())), tau
