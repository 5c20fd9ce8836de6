"""The regularised loss with nnU-Net's own Dice+CE deep-supervision loss and a real U-Net."""

import pytest
import torch
import torch.nn.functional as F
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_selfreg.losses import SelfRegRegularizer
from nnunet_selfreg.losses.selfreg_objective import RegularisedSegLoss
from nnunet_selfreg.taps import UNetFeatureTaps
from tests.nets import ARCHS, batch, build


def nnunet_loss(num_outputs: int) -> torch.nn.Module:
    loss = DC_and_CE_loss(
        {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
        {},
        weight_ce=1,
        weight_dice=1,
        ignore_label=None,
        dice_class=MemoryEfficientSoftDiceLoss,
    )
    weights = torch.tensor([1 / 2**i for i in range(num_outputs)])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, (weights / weights.sum()).tolist())


def targets_for(outputs, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    full = torch.randint(0, 3, (outputs[0].shape[0], 1, *outputs[0].shape[2:]), generator=g).float()
    return [F.interpolate(full, size=o.shape[2:], mode="nearest") for o in outputs]


def encoder_grads(arch: str, weight: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    net = build(arch).train()
    taps = UNetFeatureTaps()
    taps.attach(net)
    loss_fn = RegularisedSegLoss(
        nnunet_loss(ARCHS[arch][1]["n_stages"] - 1),
        taps,
        SelfRegRegularizer(),
        weight,
        torch.Generator().manual_seed(0),
    )
    out = net(batch(arch))
    loss = loss_fn(out, targets_for(out))
    loss.backward()
    return loss.detach(), first_stage_grad(net), loss_fn.epoch_stats.pop_means().means


def first_stage_grad(net: torch.nn.Module) -> torch.Tensor:
    """All gradients of the first encoder stage, flattened."""
    grads = [p.grad.flatten() for n, p in net.named_parameters() if n.startswith("encoder.stages.0.")]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    return torch.cat(grads)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_regularisers_reach_encoder_gradients(arch):
    loss0, grad0, _ = encoder_grads(arch, 0.0)
    loss1, grad1, means = encoder_grads(arch, 0.015)
    assert not torch.allclose(grad0, grad1), "lambda > 0 must change the gradient of the first encoder stage"
    assert loss1.item() == pytest.approx(
        loss0.item() + 0.015 * (means["scr"] + means["ifd_enc"] + means["ifd_dec"]), rel=1e-5
    )


def test_lambda_zero_gives_exactly_nnunets_gradient():
    arch = "plain2d"
    _, grad_reg0, _ = encoder_grads(arch, 0.0)
    net = build(arch).train()
    out = net(batch(arch))
    nnunet_loss(3)(out, targets_for(out)).backward()
    assert torch.equal(first_stage_grad(net), grad_reg0)


def test_validation_forward_gives_plain_segmentation_loss_and_no_stats():
    net = build("plain2d")
    taps = UNetFeatureTaps()
    taps.attach(net)
    loss_fn = RegularisedSegLoss(nnunet_loss(3), taps, SelfRegRegularizer(), 0.015)
    net.eval()
    with torch.no_grad():
        out = net(batch("plain2d"))
        tgt = targets_for(out)
        assert loss_fn(out, tgt).item() == pytest.approx(nnunet_loss(3)(out, tgt).item())
    assert loss_fn.epoch_stats.pop_means().steps == 0


def test_nonfinite_regulariser_is_skipped_and_counted():
    class Exploding(SelfRegRegularizer):
        def forward(self, enc, dec, generator=None):
            out = super().forward(enc, dec, generator)
            out["total"] = out["total"] * float("nan")
            return out

    net = build("plain2d").train()
    taps = UNetFeatureTaps()
    taps.attach(net)
    loss_fn = RegularisedSegLoss(nnunet_loss(3), taps, Exploding(), 0.015)
    out = net(batch("plain2d"))
    loss = loss_fn(out, targets_for(out))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    result = loss_fn.epoch_stats.pop_means()
    assert result.steps == 1 and result.nonfinite_steps == 1


def test_training_forward_with_a_stage_in_eval_mode_fails_loudly():
    # a subclass that puts one stage in evaluation mode would otherwise train with no regulariser
    from nnunet_selfreg.taps import IncompleteFeaturesError

    net = build("plain2d").train()
    taps = UNetFeatureTaps()
    taps.attach(net)
    loss_fn = RegularisedSegLoss(nnunet_loss(3), taps, SelfRegRegularizer(), 0.015)
    net.encoder.stages[1].eval()
    out = net(batch("plain2d"))
    with pytest.raises(IncompleteFeaturesError, match=r"missing encoder.stages \[1\].*evaluation mode"):
        loss_fn(out, targets_for(out))
    # calling the loss a second time for one training forward is refused too (no maps left)
    net.train()
    out = net(batch("plain2d"))
    loss_fn(out, targets_for(out))
    with pytest.raises(IncompleteFeaturesError, match="training mode"):
        loss_fn(out, targets_for(out))


def test_per_term_weights():
    net = build("plain2d").train()
    taps = UNetFeatureTaps()
    taps.attach(net)
    weights = {"scr": 0.02, "ifd_enc": 0.005, "ifd_dec": 0.005}
    loss_fn = RegularisedSegLoss(nnunet_loss(3), taps, SelfRegRegularizer(), weights)
    out = net(batch("plain2d"))
    tgt = targets_for(out)
    loss = loss_fn(out, tgt)
    means = loss_fn.epoch_stats.pop_means().means
    seg = nnunet_loss(3)(out, tgt)
    expected = seg + 0.02 * means["scr"] + 0.005 * (means["ifd_enc"] + means["ifd_dec"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert means["reg_weighted"] == pytest.approx((loss - seg).item(), rel=1e-5)
