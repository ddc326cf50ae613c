"""The test suite: the shared blocks (common.py), the episodic data (data.py) and the harness (train.py).

Everything runs on the CPU with random backbone weights (pretrained=False) and data built here (the synthetic
set, or tiny PASCAL/COCO trees in a temp folder): no download, no dataset on disk.
    python -m pytest -q test_models.py
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision
from PIL import Image
from torch.utils.data import DataLoader

import common
import data
import train
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
    with pytest.raises(common.WeightsUnavailableError) as err:
        Backbone("resnet50", pretrained=True)
    message = str(err.value)
    assert "--no-pretrained" in message and "network is unreachable" in message
    assert "torchvision.models.resnet50(weights='IMAGENET1K_V1')" in message


# ==========================================================================================================
# data.py: folds, synthetic episodes, PASCAL and COCO on tiny trees, transforms, determinism
# ==========================================================================================================

# ----------------------------------------------------------------------------- helpers

def _label(*boxes, shape=(80, 80), ignore_rows=None):
    """Label map with (class, top, left, height, width) boxes and optionally a band of 255 rows."""
    label = np.zeros(shape, np.uint8)
    for c, top, left, h, w in boxes:
        label[top:top + h, left:left + w] = c
    if ignore_rows:
        label[ignore_rows[0]:ignore_rows[1], :] = 255
    return label


def _save_jpeg(path, shape):
    rgb = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


_PASCAL_LABELS = {
    "a_voc": _label((6, 0, 0, 50, 50)),
    "b_sbd": _label((7, 10, 10, 50, 50), ignore_rows=(70, 72)),
    "c_small": _label((6, 0, 0, 40, 40)),  # 1600 < 2048 pixels: never listed
    "d_mixed": _label((6, 0, 0, 50, 50), (2, 60, 60, 5, 5)),  # a few pixels of class 2
    "e_dup": _label((1, 0, 0, 50, 50)),  # in VOC train, SBD train and VOC val: a val image
    "f_multi": _label((6, 0, 0, 46, 46), (7, 46, 0, 34, 80)),
    "g_extra": _label((8, 0, 0, 50, 50)),  # a label in no list
    "v1": _label((1, 10, 10, 50, 50), (3, 70, 70, 8, 8), ignore_rows=(64, 66)),
    "v2": _label((1, 0, 0, 50, 50), (6, 50, 0, 30, 80)),
    "v3": _label((2, 0, 0, 50, 50)),
    "v4": _label((2, 0, 0, 50, 50), (1, 60, 60, 10, 10)),  # class 1 present but under the threshold
}


def _write_pascal(root, sbd=True):
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, label in _PASCAL_LABELS.items():
        _save_jpeg(root / "JPEGImages" / f"{name}.jpg", label.shape)
        Image.fromarray(label).save(root / "SegmentationClassAug" / f"{name}.png")
    sets = root / "ImageSets" / "Segmentation"
    (sets / "train.txt").write_text("a_voc\ne_dup\n")
    (sets / "val.txt").write_text("e_dup\nv1\nv2\nv3\nv4\n")
    if sbd:
        (sets / "sbd_train.txt").write_text("b_sbd\nc_small\nd_mixed\ne_dup\nf_multi\n")
    return root


def _rle_runs(mask):
    """Reference COCO encoder, step 1: run lengths in column-major order, starting with a run of 0s."""
    flat = mask.T.ravel().astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0] + runs if flat[0] == 1 else runs


def _rle_string(runs):
    """Reference COCO encoder, step 2 (pycocotools rleToString)."""
    out = []
    for i, x in enumerate(runs):
        x = x - runs[i - 2] if i > 2 else x
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def _write_coco(root):
    """Two annotated images and one without annotations, for train2014 and val2014 alike."""
    crowd = np.zeros((80, 90), bool)
    crowd[:60, :60] = True
    for split in ("train", "val"):
        (root / f"{split}2014").mkdir(parents=True)
        (root / "annotations").mkdir(exist_ok=True)
        names = [f"COCO_{split}2014_{i:012d}.jpg" for i in (1, 2, 3)]
        images = [{"id": 10, "file_name": names[0], "height": 80, "width": 80},
                  {"id": 20, "file_name": names[1], "height": 80, "width": 90},
                  {"id": 30, "file_name": names[2], "height": 50, "width": 50}]
        for im in images:
            _save_jpeg(root / f"{split}2014" / im["file_name"], (im["height"], im["width"]))
        annotations = [
            {"id": 1, "image_id": 10, "category_id": 3, "iscrowd": 0,
             "segmentation": [[10, 10, 60, 10, 60, 60, 10, 60]]},
            {"id": 2, "image_id": 20, "category_id": 90, "iscrowd": 1,
             "segmentation": {"counts": _rle_runs(crowd), "size": [80, 90]}},
            {"id": 3, "image_id": 20, "category_id": 1, "iscrowd": 0,  # later: overwrites the crowd region
             "segmentation": [[30, 30, 89, 30, 89, 79, 30, 79]]}]
        categories = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
        (root / "annotations" / f"instances_{split}2014.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


def _assert_episode(ep, shot, size, test):
    assert ep["img_q"].shape == (3, size, size) and ep["img_q"].dtype == torch.float32
    assert ep["img_s"].shape == (shot, 3, size, size) and ep["img_s"].dtype == torch.float32
    assert ep["m_q"].shape == (size, size) and ep["m_q"].dtype == torch.int64
    assert ep["m_s"].shape == (shot, size, size) and ep["m_s"].dtype == torch.int64
    for m in (ep["m_q"], ep["m_s"]):
        assert set(m.unique().tolist()) <= {0, 1, 255}
    assert all((m == 1).any() for m in ep["m_s"]), "a support without foreground"
    assert isinstance(ep["class_id"], int)
    assert ("m_q_orig" in ep) == test and ("index" in ep) == test


# ----------------------------------------------------------------------------- folds

@pytest.mark.parametrize("dataset,split,n", [("pascal", "interleaved", 20), ("synthetic", "interleaved", 20),
                                             ("coco", "interleaved", 80), ("coco", "contiguous", 80)])
def test_fold_classes_partition(dataset, split, n):
    folds = [data.fold_classes(dataset, f, split) for f in range(4)]
    assert sorted(c for fold in folds for c in fold) == list(range(1, n + 1))  # disjoint and complete
    for f, test in enumerate(folds):
        base = [c for c in range(1, n + 1) if c not in test]
        assert len(test) == n // 4 and not set(base) & set(test)
        if dataset == "synthetic":
            ds = data.build_dataset(dataset, "train", f, img_size=32)
            assert ds.classes == base and data.build_dataset(dataset, "test", f, img_size=32).classes == test


def test_fold_classes_values():
    assert data.fold_classes("pascal", 2) == [11, 12, 13, 14, 15]
    assert data.fold_classes("coco", 0) == list(range(1, 78, 4))
    assert data.fold_classes("coco", 3)[:3] == [4, 8, 12]
    assert data.fold_classes("coco", 1, "contiguous") == list(range(21, 41))
    with pytest.raises(ValueError):
        data.fold_classes("pascal", 4)


# ----------------------------------------------------------------------------- synthetic

@pytest.mark.parametrize("shot,size", [(1, 64), (5, 64), (1, 96), (5, 96)])
def test_synthetic_episode_shapes_and_determinism(shot, size):
    ds = data.build_dataset("synthetic", "test", 1, shot=shot, img_size=size, episodes=10)
    assert len(ds) == 10 and ds.num_classes == 20 and len(ds.class_names) == 20
    ep = ds[3]
    _assert_episode(ep, shot, size, test=True)
    assert ep["class_id"] in data.fold_classes("synthetic", 1) and ep["index"] == 3
    assert torch.equal(ep["m_q_orig"], ep["m_q"])
    again, other = ds[3], ds[4]
    for key in ("img_q", "m_q", "img_s", "m_s"):
        assert torch.equal(ep[key], again[key])
    assert not torch.equal(ep["img_q"], other["img_q"])
    assert torch.equal(ep["img_q"], ds[(0, 3)]["img_q"])  # a plain index is stream (test seed) 0
    assert not torch.equal(ep["img_q"], ds[(1, 3)]["img_q"])  # another test seed, another episode
    ds.seed = 1
    assert not torch.equal(ds[(0, 3)]["img_q"], ep["img_q"])


def test_class_names_need_no_files():
    pascal, coco, synthetic = (data.class_names(name) for name in ("pascal", "coco", "synthetic"))
    assert list(pascal) == list(range(1, 21)) and pascal[1] == "aeroplane" and pascal[20] == "tvmonitor"
    assert list(coco) == list(range(1, 81)) and coco[1] == "person" and coco[80] == "toothbrush"
    assert len(set(synthetic.values())) == 20  # every synthetic class has its own name


@pytest.mark.parametrize("fold", range(4))
def test_synthetic_train_never_shows_test_classes(fold):
    ds = data.build_dataset("synthetic", "train", fold, shot=2, img_size=48, train_length=30)
    test = set(data.fold_classes("synthetic", fold))
    seen = set()
    for index in range(30):
        class_id, pairs = ds.render_episode(index)
        assert class_id in ds.classes
        for _, label in pairs:
            classes = set(label.unique().tolist()) - {0}
            assert class_id in classes and not classes & test
            seen |= classes
    assert len(seen - {class_id}) > 3, "distractors of other base classes should appear"
    first = ds[0]["img_q"]
    assert not torch.equal(first, ds[(1, 0)]["img_q"])  # epoch 1 draws other episodes
    assert torch.equal(first, ds[(0, 0)]["img_q"])


# ----------------------------------------------------------------------------- PASCAL

def test_pascal_split_and_filters(tmp_path):
    root = _write_pascal(tmp_path / "voc")
    train = data.build_dataset("pascal", "train", 0, img_size=64, root=root)
    assert sorted(train.files) == ["a_voc", "b_sbd", "c_small", "d_mixed", "f_multi"]  # VOC+SBD train - val
    assert train.images == ["a_voc", "b_sbd", "f_multi"]  # c_small too small, d_mixed has class-2 pixels
    assert train.class_files[6] == ["a_voc", "f_multi"] and train.class_files[7] == ["b_sbd", "f_multi"]
    assert len(train) == 3
    fold3 = data.build_dataset("pascal", "train", 3, img_size=64, root=root)
    assert fold3.images == ["a_voc", "b_sbd", "d_mixed", "f_multi"]  # class 2 is a base class in fold 3
    test = data.build_dataset("pascal", "test", 0, img_size=64, root=root, episodes=7)
    assert sorted(test.files) == ["e_dup", "v1", "v2", "v3", "v4"] and len(test) == 7
    assert test.class_files[1] == ["e_dup", "v1", "v2"] and test.class_files[3] == []
    assert test.class_names[1] == "aeroplane" and test.class_names[20] == "tvmonitor"
    for index in range(3):
        ep = train[index]
        _assert_episode(ep, 1, 64, test=False)
        assert ep["class_id"] in (6, 7)


def test_pascal_masks_keep_ignore_and_zero_other_classes(tmp_path):
    root = _write_pascal(tmp_path / "voc")
    ds = data.build_dataset("pascal", "test", 0, shot=2, img_size=64, root=root)
    ep = ds[1]  # query v1: class 1 (class 3 is present but has no support list)
    _assert_episode(ep, 2, 64, test=True)
    expected = torch.from_numpy(_PASCAL_LABELS["v1"]).long()
    expected = torch.where(expected == 1, 1, torch.where(expected == 255, 255, 0))  # class 3 -> 0
    assert ep["class_id"] == 1 and torch.equal(ep["m_q_orig"], expected)
    assert (ep["m_q"] == 255).any() and (ep["m_q"] == 1).any()
    # PFENet's query rule: a class present in the query counts even under the threshold (v4: class 1)
    picked = set()
    for seed in range(12):
        ds.seed = seed
        picked.add(ds[4]["class_id"])
    assert picked == {1, 2}


def test_draw_supports_excludes_query_and_repeats_only_when_needed():
    rng = np.random.default_rng(0)
    assert sorted(data._draw_supports(rng, ["a", "b", "c"], "a", 2)) == ["b", "c"]
    assert data._draw_supports(rng, ["a", "b"], "a", 3) == ["b", "b", "b"]
    assert data._draw_supports(rng, ["a"], "a", 1) == ["a"]


def test_pascal_cache_written_reused_and_rebuilt(tmp_path, monkeypatch):
    root = _write_pascal(tmp_path / "voc")
    monkeypatch.setattr(data, "PARALLEL_MIN_FILES", 1)  # exercise the process pool once
    first = data.build_dataset("pascal", "train", 0, img_size=64, root=root)
    assert (root / ".fss_cache" / "pascal_train_counts.json").is_file()

    def fail(path):
        raise AssertionError("rescanned although cached")
    monkeypatch.setattr(data, "_label_counts", fail)
    monkeypatch.setattr(data, "PARALLEL_MIN_FILES", 10 ** 6)
    again = data.build_dataset("pascal", "train", 0, img_size=64, root=root)
    assert again.counts == first.counts and again.images == first.images
    with (root / "ImageSets/Segmentation/sbd_train.txt").open("a") as f:
        f.write("g_extra\n")  # a changed list must rebuild the cache
    with pytest.raises(AssertionError, match="rescanned"):
        data.build_dataset("pascal", "train", 0, img_size=64, root=root)


def test_pascal_without_sbd_list_warns_and_uses_all_labels(tmp_path, capsys):
    root = _write_pascal(tmp_path / "voc", sbd=False)
    ds = data.build_dataset("pascal", "train", 0, img_size=64, root=root)
    assert "WARNING" in capsys.readouterr().err
    assert sorted(ds.files) == ["a_voc", "b_sbd", "c_small", "d_mixed", "f_multi", "g_extra"]


def test_missing_root_error_names_layout(tmp_path):
    for root in (None, tmp_path / "nope"):
        with pytest.raises(data.DatasetNotFoundError, match="SegmentationClassAug") as err:
            data.build_dataset("pascal", "test", 0, root=root)
        assert "JPEGImages" in str(err.value) and "sbd_train.txt" in str(err.value)
    (tmp_path / "voc" / "JPEGImages").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="val.txt"):
        data.build_dataset("pascal", "test", 0, root=tmp_path / "voc")
    (tmp_path / "coco").mkdir()
    with pytest.raises(data.DatasetNotFoundError, match="instances_train2014.json"):
        data.build_dataset("coco", "train", 0, root=tmp_path / "coco")


def test_corrupt_files_raise_naming_the_file(tmp_path):
    root = _write_pascal(tmp_path / "voc")
    jpeg = root / "JPEGImages" / "v1.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:200])  # truncated
    ds = data.build_dataset("pascal", "test", 0, img_size=64, root=root)
    with pytest.raises(OSError, match="v1.jpg"):
        ds[1]
    rgb_label = tmp_path / "rgb.png"
    Image.new("RGB", (8, 8)).save(rgb_label)
    with pytest.raises(OSError, match="rgb.png"):
        data.load_mask(rgb_label)


# ----------------------------------------------------------------------------- COCO

def test_rle_decode_known_and_random_masks():
    assert data.rle_string_to_counts("11110") == [1, 1, 1, 2, 1]  # hand-encoded
    assert data.rle_decode("11110", 3, 2).tolist() == [[False, True], [True, True], [False, False]]
    rng = np.random.default_rng(0)
    for h, w in ((13, 17), (40, 31)):
        mask = rng.random((h, w)) < 0.3
        mask[:, : w // 2] = mask[:, : w // 2] | (rng.random((h, 1)) < 0.5)  # long runs too
        runs = _rle_runs(mask)
        assert np.array_equal(data.rle_decode(runs, h, w), mask)
        assert np.array_equal(data.rle_decode(_rle_string(runs), h, w), mask)
    runs = [5, 1000, 3, 70000, 2, 40]  # multi-character values and negative differences
    assert data.rle_string_to_counts(_rle_string(runs)) == runs


def test_coco_labels_category_map_and_folds(tmp_path, monkeypatch):
    root = _write_coco(tmp_path / "coco")
    train = data.build_dataset("coco", "train", 3, img_size=64, root=root)  # fold 3 tests 4, 8, ...
    names = [f"COCO_train2014_{i:012d}" for i in (1, 2)]
    assert train.class_names == {1: "person", 2: "car", 3: "toothbrush"}  # ids 1, 3, 90 -> 1, 2, 3
    assert train.images == names  # the image without annotations is not listed
    assert train.class_files[1] == [names[1]] and train.class_files[2] == [names[0]]
    assert train.class_files[3] == [names[1]]
    assert not (root / "labels" / "train2014" / "COCO_train2014_000000000003.png").exists()
    label1 = np.array(Image.open(root / "labels" / "train2014" / f"{names[0]}.png"))
    assert (label1[11:60, 11:60] == 2).all() and 2500 <= (label1 == 2).sum() <= 2601 and label1[0, 0] == 0
    label2 = np.array(Image.open(root / "labels" / "train2014" / f"{names[1]}.png"))
    assert label2.shape == (80, 90) and (label2[:30, :30] == 3).all()  # crowd RLE
    assert (label2[35:55, 35:55] == 1).all() and (label2[70:, 70:] == 1).all()  # the later polygon wins
    assert (label2[65:, :20] == 0).all()
    _assert_episode(train[0], 1, 64, test=False)

    val_names = [f"COCO_val2014_{i:012d}" for i in (1, 2)]
    assert data.build_dataset("coco", "test", 0, img_size=64, root=root).images == [val_names[1]]  # class 1
    monkeypatch.setattr(data, "_coco_label_counts", lambda job: 1 / 0)  # val2014 is cached now
    assert data.build_dataset("coco", "test", 1, img_size=64, root=root).images == [val_names[0]]  # class 2
    contiguous = data.build_dataset("coco", "test", 0, img_size=64, root=root, coco_split="contiguous")
    assert contiguous.images == val_names and contiguous.classes == list(range(1, 21))
    ep = contiguous[1]
    _assert_episode(ep, 1, 64, test=True)
    assert ep["m_q_orig"].shape == (80, 90)


# ----------------------------------------------------------------------------- transforms and geometry

def _colour_coded(mask):
    """Image that is red where mask == 1 and blue elsewhere, uint8 (3,H,W)."""
    img = torch.zeros(3, *mask.shape, dtype=torch.uint8)
    img[0][mask == 1] = 255
    img[2][mask != 1] = 255
    return img


def _erode(mask, r=3):
    """True where every pixel within a (2r+1)^2 window is True (away from any boundary)."""
    pooled = -torch.nn.functional.max_pool2d(-mask[None, None].float(), 2 * r + 1, 1, r)
    return pooled[0, 0] > 0.5


def test_train_transform_keeps_image_and_mask_aligned():
    mask = torch.zeros(90, 70, dtype=torch.long)
    mask[20:60, 15:50] = 1
    mean = torch.tensor(data.MEAN) * 255
    for seed in range(12):
        img, m = data.train_transform(_colour_coded(mask), mask, np.random.default_rng(seed), 128, (0.8, 1.25))
        assert img.shape == (3, 128, 128) and m.shape == (128, 128) and m.dtype == torch.int64
        rgb = data.denormalize(img).float()
        fg, bg, pad = _erode(m == 1), _erode(m == 0), _erode(m == 255)
        assert fg.any() and bg.any() and pad.any()  # 90x70 is always padded up to 128
        assert (rgb[0][fg] > 180).all() and (rgb[2][fg] < 75).all()
        assert (rgb[2][bg] > 180).all() and (rgb[0][bg] < 75).all()
        assert ((rgb[:, pad] - mean[:, None]).abs() < 3).all()  # padding and rotated-in corners: mean colour


def test_train_crop_keeps_foreground():
    for seed in range(10):
        rng = np.random.default_rng(seed)
        mask = torch.zeros(200, 200, dtype=torch.long)
        top, left = rng.integers(0, 160, 2)
        mask[top:top + 40, left:left + 40] = 1
        _, m = data.train_transform(_colour_coded(mask), mask, rng, 96, (1.0, 1.0))
        assert (m == 1).sum() >= 0.8 * 1600


def test_test_geometry_round_trip():
    assert data.test_content_size(375, 500, 473) == (355, 473)
    assert data.test_content_size(500, 375, 473) == (473, 355)
    assert data.test_content_size(100, 100, 473) == (473, 473)  # small images are upscaled
    mask = torch.zeros(75, 130, dtype=torch.long)
    mask[10:60, 20:70] = 1
    mask[30:70, 90:125] = 1
    mask[0:3, :] = 255
    img, m = data.test_transform(_colour_coded(mask), mask, size=96)
    h, w = data.test_content_size(75, 130, 96)
    assert img.shape == (3, 96, 96) and m.shape == (96, 96) and (h, w) == (55, 96)
    assert (m[h:] == 255).all() and (img[:, h:] == 0).all()  # padding: ignore label, mean colour
    assert (m[:h] != 255).float().mean() > 0.9
    logits = torch.stack([(m != 1).float(), (m == 1).float()])  # (2,96,96) one-hot
    back = data.logits_to_original(logits, (75, 130))
    assert back.shape == (2, 75, 130)
    valid = mask != 255
    agreement = (back.argmax(0) == mask)[valid].float().mean()
    assert agreement > 0.97
    assert data.logits_to_original(logits[None], (75, 130)).shape == (1, 2, 75, 130)
    # a horizontal ramp maps pixel centres to pixel centres (align_corners=False): x0 = (x + 0.5) * w / 130 - 0.5
    ramp = torch.arange(96.0).expand(2, 96, 96)
    x = torch.arange(2, 128)
    expected = (x + 0.5) * w / 130 - 0.5
    assert torch.allclose(data.logits_to_original(ramp, (75, 130))[1, 40, 2:128], expected, atol=1e-4)


def test_eval_episodes_identical_for_any_worker_count():
    ds = data.build_dataset("synthetic", "test", 2, shot=2, img_size=48, episodes=6)
    runs = []
    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=data.collate_episodes)
        runs.append(list(loader))
    for a, b in zip(*runs):
        assert a["class_id"].dtype == torch.long and a["class_id"].shape == (2,)
        assert a["img_s"].shape == (2, 2, 3, 48, 48) and isinstance(a["m_q_orig"], list)
        assert torch.equal(a["class_id"], b["class_id"]) and torch.equal(a["index"], b["index"])
        for key in ("img_q", "m_q", "img_s", "m_s"):
            assert torch.equal(a[key], b[key])
        assert all(torch.equal(x, y) for x, y in zip(a["m_q_orig"], b["m_q_orig"]))


# ==========================================================================================================
# train.py: the harness end to end on synthetic data, with a tiny model file written to a temp folder
# ==========================================================================================================

REPO = Path(__file__).resolve().parent

TINY_MODEL = '''
"""A tiny model with the repository's model interface, for testing the harness quickly."""
import dataclasses
import torch
import torch.nn as nn
import torch.nn.functional as F
import common

DEFAULTS = {"synthetic": dict(lr=0.05, batch_size=4, epochs=2, img_size=48)}


@dataclasses.dataclass
class Config:
    shot: int = 1
    width: int = 16
    nan_after: int = 0  # test hook: the loss becomes NaN after this many training steps (0: never)
    crash_after: int = 0  # test hook: raise after this many training steps (0: never)


def add_args(parser):
    parser.add_argument("--nan-after", type=int, default=None)
    parser.add_argument("--crash-after", type=int, default=None)


def stage_hello(args):
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stage.txt").write_text(f"fold {args.fold}")


STAGES = {"hello": stage_hello}


class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.encoder = nn.Sequential(nn.Conv2d(3, w, 3, 2, 1), nn.ReLU(), nn.Conv2d(w, w, 3, 2, 1), nn.ReLU(),
                                     nn.Dropout2d(0.1))
        self.head = nn.Conv2d(2 * w + 1, 2, 1)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, img_q, img_s, m_s, class_ids=None):
        B, S = img_s.shape[:2]
        f_q = self.encoder(img_q)
        f_s = self.encoder(img_s.flatten(0, 1))
        proto = common.masked_average_pooling(f_s, (m_s.flatten(0, 1) == 1).float()).view(B, S, -1).mean(1)
        cos = F.cosine_similarity(f_q, proto[:, :, None, None], dim=1)[:, None]
        x = torch.cat([f_q, proto[:, :, None, None].expand_as(f_q), cos], 1)
        return {"logits": F.interpolate(self.head(x), img_q.shape[-2:], mode="bilinear", align_corners=True)}

    def loss(self, out, m_q, m_s):
        total = common.seg_loss(out["logits"], m_q)
        if self.training:
            self.steps += 1
            if self.cfg.crash_after and self.steps > self.cfg.crash_after:
                raise RuntimeError("simulated crash")
            if self.cfg.nan_after and self.steps > self.cfg.nan_after:
                total = total * float("nan")
        return total, {"main": total}
'''


@pytest.fixture()
def tiny(tmp_path):
    path = tmp_path / "tinynet.py"
    path.write_text(TINY_MODEL)
    return path


def tiny_args(tiny, out, *extra):
    return ["--model", str(tiny), "--dataset", "synthetic", "--fold", "1", "--train-length", "16",
            "--test-episodes", "12", "--test-seeds", "2", "--workers", "0", "--out", str(out), *extra]


def run_cli(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=300, **kw)


def result_line(text):
    lines = [l for l in text.splitlines() if l.startswith("RESULT ")]
    assert lines, text[-3000:]
    return dict(kv.split("=") for kv in lines[-1].split()[1:])


def test_cli_trains_and_evaluates_end_to_end(tiny, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(["train.py", *tiny_args(tiny, out, "--epochs", "3", "--log-every", "2", "--workers", "2")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = result_line(proc.stdout)
    assert res["model"] == "tinynet" and res["dataset"] == "synthetic" and res["fold"] == "1"
    assert 0 <= float(res["miou"]) <= 100 and 0 <= float(res["fbiou"]) <= 100
    assert "episodes/s" in proc.stdout and "ETA" in proc.stdout and "test seed 1" in proc.stdout
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "start" and records[-1]["event"] == "result"
    assert set(records[-1]["per_class"]) == {"6", "7", "8", "9", "10"}  # fold 1's test classes
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["epoch"] == 3 and state["args"]["model"] == str(tiny)


def test_training_lowers_the_loss(tiny, tmp_path):
    train.main(tiny_args(tiny, tmp_path, "--epochs", "6", "--train-length", "32", "--log-every", "8",
                         "--test-episodes", "4", "--test-seeds", "1"))
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "train"]
    assert len(losses) == 6 and sum(losses[-2:]) < 0.9 * sum(losses[:2]), losses


def test_resume_after_a_crash_gives_the_same_weights(tiny, tmp_path):
    common_args = ["--epochs", "3", "--workers", "2", "--test-episodes", "2", "--test-seeds", "1"]
    train.main(tiny_args(tiny, tmp_path / "a", *common_args))
    with pytest.raises(RuntimeError, match="simulated crash"):  # 4 steps per epoch: dies inside epoch 2
        train.main(tiny_args(tiny, tmp_path / "b", *common_args, "--crash-after", "6"))
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=False)["epoch"] == 1
    train.main(tiny_args(tiny, tmp_path / "b", *common_args, "--resume"))
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert b["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["optimizer"]["state"][0]["momentum_buffer"], b["optimizer"]["state"][0]["momentum_buffer"])


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(tiny_args(tiny, tmp_path, "--epochs", "3", "--nan-after", "5", "--log-every", "1"))
    assert stop.value.code == train.EXIT_NONFINITE
    assert "loss became nan" in capsys.readouterr().out
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["epoch"] == 1  # 4 steps per epoch: epoch 1 was good, epoch 2 went bad
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_evaluation_is_reproducible_and_matches_across_processes(tiny, tmp_path):
    train.main(tiny_args(tiny, tmp_path / "t", "--epochs", "1", "--test-episodes", "2", "--test-seeds", "1"))
    ckpt = str(tmp_path / "t" / "last.pt")
    evals = ["--eval-only", "--checkpoint", ckpt, "--batch-size", "2"]
    first = train.main(tiny_args(tiny, tmp_path / "e1", *evals))
    second = train.main(tiny_args(tiny, tmp_path / "e2", *evals, "--workers", "2"))
    assert first == second
    # 2 processes (gloo on CPU): each rank takes every second episode, the meters are summed across ranks
    proc = run_cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    "train.py", *tiny_args(tiny, tmp_path / "ddp", *evals)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = result_line(proc.stdout)
    assert float(res["miou"]) == pytest.approx(100 * first[0], abs=0.006)
    assert float(res["fbiou"]) == pytest.approx(100 * first[1], abs=0.006)


def test_ddp_training_on_cpu(tiny, tmp_path):
    proc = run_cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
                    "train.py", *tiny_args(tiny, tmp_path, "--epochs", "2", "--test-episodes", "4")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("RESULT ") == 1  # rank 0 alone reports
    assert "2 process(es)" in proc.stdout
    assert torch.load(tmp_path / "last.pt", weights_only=False)["epoch"] == 2


def test_baseline_segments_a_colour_coded_episode_exactly():
    """On pixel features, a red square on blue is found exactly by the fg/bg prototype rule."""
    baseline = train.PrototypeBaseline(train.BaselineConfig(baseline_features="image"))
    img_s, img_q = torch.zeros(1, 2, 3, 16, 16), torch.zeros(1, 3, 16, 16)
    img_s[:, :, 2], img_q[:, 2] = 1.0, 1.0  # blue everywhere
    m_s = torch.zeros(1, 2, 16, 16, dtype=torch.long)
    m_s[0, 0, 2:8, 2:8], m_s[0, 1, 8:14, 1:5], m_s[0, 1, 0, :] = 1, 1, 255
    for k, (top, left, h, w) in enumerate([(2, 2, 6, 6), (8, 1, 6, 4)]):
        img_s[0, k, :, top:top + h, left:left + w] = torch.tensor([1.0, 0, 0])[:, None, None]  # red object
    img_q[0, :, 9:15, 5:12] = torch.tensor([1.0, 0, 0])[:, None, None]
    logits = baseline(img_q, img_s, m_s)["logits"]
    assert logits.shape == (1, 2, 16, 16) and not any(p.requires_grad for p in baseline.parameters())
    expected = torch.zeros(16, 16, dtype=torch.long)
    expected[9:15, 5:12] = 1
    assert torch.equal(logits[0].argmax(0), expected)


def test_baseline_evaluates_without_training(tmp_path, capsys):
    miou, fbiou = train.main(["--model", "baseline", "--dataset", "synthetic", "--no-pretrained", "--workers", "0",
                              "--img-size", "64", "--test-episodes", "6", "--test-seeds", "1",
                              "--out", str(tmp_path)])
    assert 0 < miou < 1 and 0 < fbiou < 1
    assert "training:" not in capsys.readouterr().out


def test_stage_vis_predict_and_bench(tiny, tmp_path, capsys):
    train.main(tiny_args(tiny, tmp_path, "--stage", "hello"))
    assert (tmp_path / "stage.txt").read_text() == "fold 1"
    with pytest.raises(SystemExit, match="offers"):
        train.main(tiny_args(tiny, tmp_path, "--stage", "nosuch"))

    train.main(tiny_args(tiny, tmp_path, "--epochs", "1", "--vis", "3", "--test-episodes", "4", "--test-seeds", "1"))
    pngs = sorted((tmp_path / "vis").glob("*.png"))
    assert len(pngs) == 3
    from PIL import Image
    assert Image.open(pngs[0]).size == (3 * 48, 48)  # 1 support | ground truth | prediction

    import numpy as np
    img = np.zeros((30, 50, 3), np.uint8)
    img[5:25, 10:30] = 200
    mask = np.zeros((30, 50), np.uint8)
    mask[5:25, 10:30] = 255  # a white-on-black mask, as people draw them
    Image.fromarray(img).save(tmp_path / "s.jpg")
    Image.fromarray(mask).save(tmp_path / "s.png")
    Image.fromarray(img[:, ::-1].copy()).save(tmp_path / "q.jpg")
    pred_out = tmp_path / "pred"
    train.main(["--predict", "--checkpoint", str(tmp_path / "last.pt"), "--support", str(tmp_path / "s.jpg"),
                "--support-mask", str(tmp_path / "s.png"), "--query", str(tmp_path / "q.jpg"),
                "--out", str(pred_out), "--workers", "0"])
    pred = np.array(Image.open(pred_out / "q_mask.png"))
    assert pred.shape == (30, 50) and set(np.unique(pred)) <= {0, 255}
    assert Image.open(pred_out / "q_overlay.png").size == (50, 30)

    capsys.readouterr()
    train.main(tiny_args(tiny, tmp_path, "--bench", "--bench-steps", "2", "--batch-size", "2"))
    text = capsys.readouterr().out
    assert "ms/step" in text and "ms/episode" in text and "learnable" in text


@pytest.mark.parametrize("argv, message", [
    (["--fold", "7"], "invalid choice"),
    (["--shot", "0"], "--shot must be at least 1"),
    (["--model", "nosuchnet"], "choose one of"),
    (["--model", "missing.py"], "no such file"),
    (["--dataset", "pascal", "--data-root", "/nonexistent/voc", "--model", "baseline", "--no-pretrained"],
     "JPEGImages"),
])
def test_bad_arguments_get_clear_messages(argv, message, tmp_path):
    proc = run_cli(["train.py", *argv, "--workers", "0", "--out", str(tmp_path)])
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_offline_pretrained_run_stops_with_instructions(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(SystemExit) as stop:
        train.main(["--model", "baseline", "--dataset", "synthetic", "--workers", "0", "--out", str(tmp_path)])
    assert str(stop.value).startswith("error: could not load the ImageNet weights")
    assert "--no-pretrained" in str(stop.value)


def test_eval_only_without_checkpoint_is_refused(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(tiny_args(tiny, tmp_path, "--eval-only"))
    assert "--eval-only needs --checkpoint" in capsys.readouterr().err
