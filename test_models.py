"""The test suite. Everything runs on the CPU with random backbone weights (pretrained=False) and data built here:
no download, no dataset on disk.
    python -m pytest -q test_models.py
"""
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision

from common import (FEM, IGNORE_INDEX, MAP_EPS, Backbone, IoUMeter, cosine_prior, intersection_and_union,
                    masked_average_pooling, seg_loss)


# ==========================================================================================================
# common.py: metrics, pooling and the prior against hand-computed values; FEM; frozen backbone
# ==========================================================================================================

# A 4x4 episode worked out by hand. Valid pixels (target != 255): 12.
# background: I = 5, U = 9; foreground: I = 3, U = 7; the two pixels with pred 1 under target 255 count nowhere.
PRED_4x4 = torch.tensor([[1, 1, 0, 0],
                         [1, 1, 0, 0],
                         [0, 0, 0, 0],
                         [1, 1, 1, 1]])
TARGET_4x4 = torch.tensor([[1, 1, 1, 0],
                           [1, 0, 0, 0],
                           [0, 0, 255, 255],
                           [255, 255, 0, 0]])


@pytest.fixture(scope="module")
def resnet50():
    return Backbone("resnet50", pretrained=False)


# ---------------------------------------------------------------- metrics

def test_intersection_and_union_by_hand():
    inter, union = intersection_and_union(PRED_4x4, TARGET_4x4)
    assert inter.dtype == union.dtype == torch.float64
    assert inter.tolist() == [[5.0, 3.0]] and union.tolist() == [[9.0, 7.0]]
    # batched: the second episode is all background, predicted all foreground
    pred = torch.stack([PRED_4x4, torch.ones(4, 4, dtype=torch.long)])
    target = torch.stack([TARGET_4x4, torch.zeros(4, 4, dtype=torch.long)])
    inter, union = intersection_and_union(pred, target)
    assert inter.tolist() == [[5.0, 3.0], [0.0, 0.0]] and union.tolist() == [[9.0, 7.0], [16.0, 16.0]]


def test_iou_meter_two_classes_by_hand():
    meter = IoUMeter(num_classes=5)
    assert math.isnan(meter.miou())
    meter.update(PRED_4x4, TARGET_4x4, torch.tensor([3]))  # class 3: fg I 3, U 7; bg I 5, U 9
    pred = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]])
    target = torch.tensor([[[1, 1], [0, 255]], [[0, 0], [0, 1]]])
    meter.update(pred, target, torch.tensor([5, 3]))  # class 5: fg 1/2, bg 1/2; class 3: fg 0/1, bg 3/4
    # class 3: 3 / 8, class 5: 1 / 2; FB: bg 9 / 15, fg 4 / 10
    ious = meter.class_iou()
    assert set(ious) == {3, 5}
    assert ious[3] == pytest.approx(3 / 8) and ious[5] == pytest.approx(1 / 2)
    assert meter.miou() == pytest.approx((3 / 8 + 1 / 2) / 2)
    assert meter.fbiou() == pytest.approx((9 / 15 + 4 / 10) / 2)
    assert meter.class_inter.dtype == torch.float64 and meter.class_count.tolist() == [0, 0, 0, 2, 0, 1]
    # an episode whose target is all 255 adds nothing to any I or U, whatever the prediction
    meter.update(torch.ones(1, 3, 3, dtype=torch.long), torch.full((1, 3, 3), IGNORE_INDEX), torch.tensor([5]))
    assert meter.class_iou()[5] == pytest.approx(1 / 2)
    assert meter.fbiou() == pytest.approx((9 / 15 + 4 / 10) / 2)


def test_iou_meter_all_reduce_single_rank(tmp_path, monkeypatch):
    meter = IoUMeter(num_classes=5)
    meter.update(PRED_4x4, TARGET_4x4, torch.tensor([3]))
    meter.all_reduce()  # not initialised: a no-op
    before = meter.miou(), meter.fbiou()
    reduced = []
    real_all_reduce = dist.all_reduce

    def spy(tensor, *args, **kwargs):
        reduced.append(tensor)
        return real_all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", spy)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        meter.all_reduce()
    finally:
        dist.destroy_process_group()
    state = [meter.class_inter, meter.class_union, meter.class_count, meter.inter, meter.union]
    assert len(reduced) == len(state) and all(any(t is r for r in reduced) for t in state)
    assert (meter.miou(), meter.fbiou()) == before


# ---------------------------------------------------------------- pooling and prior

def test_masked_average_pooling_direct():
    torch.manual_seed(0)
    f = torch.randn(2, 3, 4, 4)
    m = (torch.rand(2, 1, 4, 4) > 0.5).float()
    expected = torch.stack([torch.stack([(f[b, c] * m[b, 0]).sum() / (m[b, 0].sum() + MAP_EPS) for c in range(3)])
                            for b in range(2)])
    assert torch.allclose(masked_average_pooling(f, m), expected, atol=1e-6)
    assert torch.allclose(masked_average_pooling(f, m[:, 0]), expected, atol=1e-6)  # (B,H,W) form
    # 7x7 -> 4x4 bilinear with align_corners=True samples exactly the even rows and columns
    m7 = torch.zeros(2, 1, 7, 7)
    m7[:, :, ::2, ::2] = m
    assert torch.allclose(masked_average_pooling(f, m7), expected, atol=1e-6)
    zero = masked_average_pooling(f, torch.zeros(2, 4, 4))
    assert torch.equal(zero, torch.zeros(2, 3))


def test_cosine_prior_double_loop():
    torch.manual_seed(0)
    f_q, f_s = torch.rand(1, 3, 3, 3), torch.rand(1, 3, 3, 3)
    m_small = torch.tensor([[1, 0, 1], [255, 1, 0], [0, 0, 1]])  # 255 counts as background
    m_s = torch.zeros(1, 5, 5, dtype=torch.long)
    m_s[0, ::2, ::2] = m_small  # 5x5 -> 3x3 bilinear, align_corners=True: exactly these pixels
    m_s[0, 1::2, :] = 1  # the in-between pixels are never sampled
    fg = (m_small == 1).float()
    sim = torch.zeros(3, 3)
    for i in range(9):
        q = f_q[0, :, i // 3, i % 3]
        best = -1.0
        for j in range(9):
            s = f_s[0, :, j // 3, j % 3] * fg[j // 3, j % 3]
            best = max(best, (q @ s / (q.norm() * s.norm() + 1e-7)).item())
        sim[i // 3, i % 3] = best
    expected = (sim - sim.min()) / (sim.max() - sim.min() + 1e-7)
    prior = cosine_prior(f_q, f_s, m_s)
    assert prior.shape == (1, 1, 3, 3)
    assert torch.allclose(prior[0, 0], expected, atol=1e-5)
    assert prior.min() >= 0 and prior.max() <= 1


def test_cosine_prior_shots_and_empty_mask():
    torch.manual_seed(0)
    f_q, f_s = torch.rand(2, 8, 6, 6), torch.rand(2, 5, 8, 6, 6)
    m_s = (torch.rand(2, 5, 11, 11) > 0.5).long()
    prior = cosine_prior(f_q, f_s, m_s)
    one_shot = torch.stack([cosine_prior(f_q, f_s[:, k], m_s[:, k]) for k in range(5)])  # (5, B, 1, h, w)
    assert prior.shape == (2, 1, 6, 6)
    assert torch.allclose(prior, one_shot.mean(0), atol=1e-6)
    empty = cosine_prior(f_q, f_s[:, 0], torch.zeros(2, 11, 11, dtype=torch.long))
    assert torch.isfinite(empty).all() and torch.equal(empty, torch.zeros_like(empty))


# ---------------------------------------------------------------- FEM

def _fem_inputs(in_dim, hw, extra_dim=1, batch=2):
    return torch.rand(batch, in_dim, hw, hw), torch.rand(batch, in_dim), torch.rand(batch, extra_dim, hw, hw)


@pytest.mark.parametrize("hw, bins, sizes", [
    (60, (1.0, 0.5, 0.25, 0.125), [60, 30, 15, 8]),  # PFENet PASCAL at 473
    (60, (60, 30, 15, 8), [60, 30, 15, 8]),  # the same bins written as PFENet's absolute config
    (81, (1.0, 0.5, 0.25, 0.125), [81, 40, 20, 10]),  # PFENet COCO at 641
])
def test_fem_shapes(hw, bins, sizes):
    fem = FEM(in_dim=8, bins=bins)
    logits, aux = fem(*_fem_inputs(8, hw))
    assert logits.shape == (2, 2, hw, hw)
    assert [tuple(a.shape) for a in aux] == [(2, 2, s, s) for s in sizes]


def test_fem_structure_matches_pfenet():
    d, e, n, k = 256, 1, 4, 2  # PFENet: reduce_dim 256, the prior, 4 bins, 2 classes -> 10,030,602 parameters
    fem = FEM(in_dim=d, extra_dim=e, classes=k)
    conv3 = 9 * d * d
    expected = (n * (2 * d + e) * d  # init_merge
                + (n - 1) * 2 * d * d  # alpha_conv
                + n * 2 * conv3  # beta_conv
                + n * (conv3 + d * k + k)  # inner_cls
                + n * d * d + 2 * conv3  # res1, res2
                + conv3 + d * k + k)  # cls
    assert sum(p.numel() for p in fem.parameters()) == expected == 10_030_602
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fem.modules())
    convs_with_bias = [m for m in fem.modules() if isinstance(m, nn.Conv2d) and m.bias is not None]
    assert len(convs_with_bias) == n + 1 and all(m.kernel_size == (1, 1) and m.out_channels == k
                                                 for m in convs_with_bias)


def test_fem_forward_follows_pfenet_order():
    # PFENet.py:259-286 re-traced step by step with FEM's own layers (eval: dropout off)
    torch.manual_seed(0)
    fem = FEM(in_dim=8, bins=(12, 6, 3, 2)).eval()
    f_q, proto, prior = _fem_inputs(8, 12)

    def up(x, size):
        return nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)

    pyramid, outs = [], []
    for idx, b in enumerate((12, 6, 3, 2)):
        proto_bin = proto[:, :, None, None].expand(-1, -1, b, b)
        merge = torch.cat([nn.AdaptiveAvgPool2d(b)(f_q), proto_bin, up(prior, b)], 1)
        merge = fem.init_merge[idx](merge)
        if idx >= 1:
            merge = fem.alpha_conv[idx - 1](torch.cat([merge, up(pyramid[idx - 1], b)], 1)) + merge
        merge = fem.beta_conv[idx](merge) + merge
        outs.append(fem.inner_cls[idx](merge))
        pyramid.append(up(merge, 12))
    feat = fem.res1(torch.cat(pyramid, 1))
    feat = fem.res2(feat) + feat
    logits, aux = fem(f_q, proto, prior)
    assert torch.allclose(logits, fem.cls(feat), atol=1e-6)
    assert all(torch.allclose(a, o, atol=1e-6) for a, o in zip(aux, outs))


def test_fem_gradients_reach_every_parameter_with_wide_extra():
    torch.manual_seed(0)
    fem = FEM(in_dim=8, extra_dim=3).eval()  # eval: no dropout zeroing
    logits, aux = fem(*_fem_inputs(8, 16, extra_dim=3))
    assert logits.shape == (2, 2, 16, 16) and len(aux) == 4
    (logits.square().mean() + sum(a.square().mean() for a in aux)).backward()
    for name, p in fem.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- loss

def test_seg_loss_ignores_255_by_hand():
    ln3 = math.log(3)
    logits = torch.tensor([[[0.0, ln3], [0.0, 100.0]],  # channel 0 (background)
                           [[0.0, 0.0], [ln3, -100.0]]])[None]  # channel 1 (foreground)
    m_q = torch.tensor([[[1, 0], [0, IGNORE_INDEX]]])
    # CE: log 2 (equal logits), -log(3/4), -log(1/4); the 255 pixel (would be ~200 with label 1) is ignored
    expected = (math.log(2) + math.log(4 / 3) + math.log(4)) / 3
    assert seg_loss(logits, m_q).item() == pytest.approx(expected, rel=1e-5)


def test_seg_loss_upsamples_and_survives_all_ignored():
    logits = torch.zeros(1, 2, 2, 2)
    logits[:, 1] = math.log(3)  # p(fg) = 3/4 everywhere, also after bilinear upsampling
    m_q = torch.tensor([[[0, 1, 1, 255, 255]] * 5])  # (1, 5, 5): 5 background, 10 foreground, 10 ignored
    expected = (5 * math.log(4) + 10 * math.log(4 / 3)) / 15
    assert seg_loss(logits, m_q).item() == pytest.approx(expected, rel=1e-5)
    logits.requires_grad_(True)
    loss = seg_loss(logits, torch.full((1, 5, 5), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- backbone

def test_resnet50_output_stride_and_blocks(resnet50):
    x = torch.randn(1, 3, 65, 65, requires_grad=True)
    out = resnet50(x, blocks=True)
    assert tuple(out["layer1"].shape) == (1, 256, 17, 17)
    for name in ("layer2", "layer3", "layer4"):
        assert tuple(out[name].shape) == (1, resnet50.channels[name], 9, 9)  # output stride 8
        assert not out[name].requires_grad
    assert resnet50.channels == {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
    blocks = out["blocks"]
    assert [b.shape[1] for b in blocks] == [512] * 4 + [1024] * 6 + [2048] * 3
    assert blocks[3] is out["layer2"] and blocks[9] is out["layer3"] and blocks[-1] is out["layer4"]
    assert torch.equal(resnet50(x)["layer4"], out["layer4"])
    for name, d in (("layer3", 2), ("layer4", 4)):  # PFENet dilates every block, the first one too
        assert all(b.conv2.dilation == (d, d) and b.conv2.stride == (1, 1) for b in resnet50.stages[name])


def test_backbone_frozen_and_bn_stays_in_eval(resnet50):
    assert not any(p.requires_grad for p in resnet50.parameters())
    parent = nn.Sequential(resnet50).train()  # a model calling .train() must not wake the backbone's BN
    bns = [m for m in resnet50.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not resnet50.training and bns and not any(m.training for m in bns)
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    parent(torch.randn(2, 3, 33, 33) * 5 + 3)
    assert all(torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
               for m, (mean, var) in zip(bns, stats))


def test_resnet101_has_30_blocks():
    out = Backbone("resnet101", pretrained=False)(torch.randn(1, 3, 33, 33), blocks=True)
    assert len(out["blocks"]) == 30 and out["blocks"][-1] is out["layer4"]


def test_vgg16_bn_split():
    vgg = Backbone("vgg16_bn", pretrained=False)
    out = vgg(torch.randn(1, 3, 65, 65))
    assert vgg.channels == {"layer1": 128, "layer2": 256, "layer3": 512, "layer4": 512}
    assert tuple(out["layer1"].shape) == (1, 128, 17, 17)  # ceil-mode pooling as PFENet: 65 -> 33 -> 17
    for name in ("layer2", "layer3", "layer4"):
        assert tuple(out[name].shape) == (1, vgg.channels[name], 5, 5)  # layer2 (9x9) resized to layer3's 5x5
    with pytest.raises(ValueError):
        vgg(torch.randn(1, 3, 65, 65), blocks=True)


def test_backbone_unknown_name():
    with pytest.raises(ValueError, match="resnet50"):
        Backbone("resnet18", pretrained=False)


def test_backbone_download_failure_message(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(RuntimeError) as err:
        Backbone("resnet50", pretrained=True)
    message = str(err.value)
    assert "--no-pretrained" in message and "network is unreachable" in message
    assert "torchvision.models.resnet50(weights='IMAGENET1K_V1')" in message

