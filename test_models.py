"""The test suite: one class per file, in this order (`pytest test_models.py::TestData`, or `-k "TestTrain and
resume"`), after one section of the fixtures and helpers they share.

TestCommon     common.py: the IoU metrics, masked average pooling and PFENet's prior against hand-computed values; the
               FEM against PFENet's order of operations; the loss (255 ignored, PFENet's upsampling); the frozen
               backbone (BatchNorm in eval, output stride 8, calibrated statistics), PFENet's deep-stem ResNet and
               weight files of either layout.
TestData       data.py: the folds; synthetic episodes; PASCAL and COCO on tiny trees: splits, filters, caches (trusted
               while their files are unchanged), bad files (missing ones too) in one message, read-only places;
               COCO's polygon (pycocotools' rule) and RLE decoding; image and mask alignment under augmentation,
               the rotation and the blur against cv2's formulas, the test geometry; episodes that depend on no worker
               count and each test seed's query order; box supports; the folder dataset and its error messages;
               FSS-1000 on a fake tree: its split, episodes, masks, defects and scores through train.py.
TestTrain      train.py: the harness end to end with a tiny model file: training (the loss falling on the poly
               schedule; fit, the loop of every run and stage: its schedule, means, logs, the NaN stop under DDP too),
               scoring at the original size by hand, exact --resume, --select-best, --compile, DDP; the baseline,
               --stage, --vis, --predict, --bench (FLOPs by hand, host syncs), --bench-data; --set and --region-recall;
               clear messages for bad arguments; the recipes and the protocol's spread; run folders that lose no run,
               --fold all; the folder dataset through the harness.
The models, in the order of the files, each: its shapes at 1 and 5 shots, finite losses with every term, gradients
in every learnable parameter (none in a frozen backbone), empty masks without NaN, how its K shots combine, 255 as
background, a short training, and its key equations against direct computations, with layers set to identity
or scripted where that pins down which tensor feeds which equation:
TestOCNet      the CAM and the general object mask, GOMM (Eq. 3-5), multi-frequency pooling (Eq. 6), the CCM (Eq.
               7-15), Sinkhorn's marginals and the allocation target (both problems as one batch), the loss terms (Eq.
               16); evaluation computes nothing only the loss reads; bf16, channels_last; each ablation of §5.3
               (Tables 3-5): its parameters, its replacement by hand, its --set.
TestQGNet      SLIC and Felzenszwalb's segmentation; InfoNCE (Eq. 1-3), the queues, the momentum encoder and shuffled
               BN; the stage-1 file, named by its values; the prior region map (Eq. 9-12), FEM's inputs, the loss and
               the region maps of Table 7; both stages through train.py; Tables 5 and 6 as --set rows.
TestCRCNet     the cross-reference, the local conditional module (Eq. 1-3; fp32 logits under bf16), the refinement
               (equal to its plain concatenation), the loss (Eq. 4-5), the fine-tuning (§4.6) that restores every
               weight, fusion, multi-scale inference, pairs and their masks; every ablation switch (Tables 1-4, 6, 7)
               and CRCNet on PFENet (GC, CR, FT: Tables 5, 8, 11, 12), parameters counted by hand.
TestSymNet     SPM, APA (Eq. 6-8), the prototypes (Eq. 4, 5, 7, 9), TDC's input, the co-triplet loss (Eq. 10-12), the
               loss with BAM's ensemble; the word vectors and the base learner, their files and checkpoints; every
               ablation row of Tables 3-6 from its command line, the parameters and computation each switch removes.
TestQPENet     what evaluation computes; PPG and DPE (Eq. 1-8) with a scripted Convs, GBC, the cross attention, FFA's
               inputs and keys (Eq. 12-16), L_bm per image, the parameter counts; the ablations of Tables III-V (each
               row's inputs, its parameters by hand, its command line).
TestAllModels  a training step on PFENet's deep-stem ResNet, a training step that never waits for the device, and
               torch.compile's training step equal to the eager one.

Everything runs on the CPU with random backbone weights (pretrained=False) and data built here (the synthetic
set, or tiny PASCAL/COCO/folder trees in a temp folder): no download, no dataset on disk.
    python -m pytest -q test_models.py
"""
import argparse
import contextlib
import copy
import dataclasses
import errno
import functools
import json
import math
import os
import pickle
import re
import shutil
import shlex
import signal
import struct
import subprocess
import sys
import time
import types
import typing
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.flop_counter
import torchvision
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

import common
import crcnet
import data
import ocnet
import qgnet
import qpenet
import symnet
import train
from common import (FEM, IGNORE_INDEX, MAP_EPS, Backbone, IoUMeter, cosine_prior, intersection_and_union,
                    masked_average_pooling, seg_loss)


# ==========================================================================================================
# Fixtures and helpers: the episodes, tiny datasets, model files and runs that the test classes below share
# ==========================================================================================================


# The episodes of the model tests, which several sections draw. Every builder returns forward's inputs in forward's
# order, then the query's label: img_q, img_s, m_s, m_q.

def episode(B, S, size, q_box=(5, 20, 8, 25), s_box=(3, 18, 10, 28), shot_step=2, seed=0):
    """B episodes of S shots of random images img_q (B,3,size,size), img_s (B,S,3,size,size), drawn from `seed`,
    with rectangular masks: the query's foreground q_box = (top, bottom, left, right), its first 2 rows 255;
    support k's foreground s_box moved down k * shot_step rows, its last 2 rows 255 (the default boxes suit 33 px).
    -> img_q, img_s, m_s (B,S,size,size), m_q (B,size,size)."""
    g = torch.Generator().manual_seed(seed)
    img_q, img_s = torch.randn(B, 3, size, size, generator=g), torch.randn(B, S, 3, size, size, generator=g)
    m_q = torch.zeros(B, size, size, dtype=torch.long)
    top, bottom, left, right = q_box
    m_q[:, top:bottom, left:right] = 1
    m_q[:, :2] = IGNORE_INDEX
    m_s = torch.zeros(B, S, size, size, dtype=torch.long)
    top, bottom, left, right = s_box
    for k in range(S):
        m_s[:, k, top + k * shot_step:bottom + k * shot_step, left:right] = 1
    m_s[:, :, -2:] = IGNORE_INDEX
    return img_q, img_s, m_s, m_q


def synthetic_episode(B, S, size, seed=0):
    """B rendered training episodes of S shots of the synthetic set (fold 0, its `seed`), with their class ids
    (Sym-Net's text branch reads them). -> img_q, img_s, m_s, m_q, class_ids (B,)."""
    ds = data.build_dataset("synthetic", "train", 0, shot=S, img_size=size, seed=seed, train_length=B)
    batch = data.collate_episodes([ds[i] for i in range(B)])
    return batch["img_q"], batch["img_s"], batch["m_s"], batch["m_q"], batch["class_id"]


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


# ---------------- FEM -------------------------------------------------------------------------------------

def _fem_inputs(in_dim, hw, extra_dim=1, batch=2):
    return torch.rand(batch, in_dim, hw, hw), torch.rand(batch, in_dim), torch.rand(batch, extra_dim, hw, hw)


# ---------------- deep-stem ResNet (PFENet's) and weight files --------------------------------------------

def bottleneck_params(c_in, planes, downsample):
    """One bottleneck's parameters by hand: 1x1 c_in->p, 3x3 p->p, 1x1 p->4p (no biases), a BatchNorm (weight
    and bias) after each, and on a stage's first block the 1x1 c_in->4p + BatchNorm downsample."""
    params = c_in * planes + 9 * planes * planes + planes * 4 * planes + 2 * (planes + planes + 4 * planes)
    return params + (c_in * 4 * planes + 2 * 4 * planes if downsample else 0)


def pfenet_resnet_params(layers):
    """Feature parameters (no fc) of PFENet's ResNet, model/resnet.py with deep_base=True, from its layers: three
    3x3 convs 3->64, 64->64, 64->128 with BatchNorms, then the stages from 128 channels, each opening with a
    downsample block (PFENet's _make_layer: stride 2, or 128 != 4 * 64 for layer1)."""
    total, c_in = 9 * (3 * 64 + 64 * 64 + 64 * 128) + 2 * (64 + 64 + 128), 128
    for planes, blocks in zip((64, 128, 256, 512), layers):
        total += bottleneck_params(c_in, planes, True) + (blocks - 1) * bottleneck_params(4 * planes, planes, False)
        c_in = 4 * planes
    return total


def pfenet_resnet_keys(layers):
    """The state_dict keys of PFENet's ResNet (deep_base=True): the names in resnet50_v2.pth / resnet101_v2.pth."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def conv_bn(prefix, i):
        return [f"{prefix}conv{i}.weight", *(f"{prefix}bn{i}.{s}" for s in bn)]
    keys = [k for i in (1, 2, 3) for k in conv_bn("", i)]
    for stage, blocks in enumerate(layers, 1):
        for b in range(blocks):
            keys += [k for i in (1, 2, 3) for k in conv_bn(f"layer{stage}.{b}.", i)]
            if b == 0:
                keys += [f"layer{stage}.0.downsample.0.weight", *(f"layer{stage}.0.downsample.1.{s}" for s in bn)]
    return keys + ["fc.weight", "fc.bias"]


def assert_backbone_holds(net, ref):
    """Every tensor of common.Backbone `net` equals the one of the same name in the torchvision-layout net `ref`
    (torchvision's ResNet or PFENet's), and every feature tensor of `ref` is there: only fc is left out."""
    stem = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3", "7": "bn3"}  # layer0's indices
    ref_state = ref.state_dict()
    state = net.stages.state_dict()
    for key, value in state.items():
        stage, index, rest = key.split(".", 2)
        name = f"{stem[index]}.{rest}" if stage == "layer0" else key
        assert torch.equal(value, ref_state[name]), key
    assert len(state) == len(ref_state) - 2  # fc.weight, fc.bias


def randomise_batchnorm(net, seed):
    """Non-trivial BatchNorm statistics and affine parameters, so that one left at its initial values shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t, (low, high) in ((m.weight, (0.5, 1.5)), (m.bias, (-0.2, 0.2)), (m.running_mean, (-0.5, 0.5)),
                                       (m.running_var, (0.5, 2.0))):
                    t.copy_(torch.rand(t.shape, generator=g) * (high - low) + low)
    return net


@pytest.fixture(scope="module")
def deep50():
    return Backbone("resnet50_deep", pretrained=False)


@pytest.fixture(scope="module")
def pfenet_file(tmp_path_factory):
    """A weight file in the layout of PFENet's resnet50_v2.pth, of a random DeepStemResNet (names untouched), in
    the legacy serialisation of torch < 1.6 and without num_batches_tracked, as older files are -> (path, net)."""
    torch.manual_seed(0)
    ref = randomise_batchnorm(common.DeepStemResNet((3, 4, 6, 3)), seed=1).eval()
    path = tmp_path_factory.mktemp("initmodel") / "resnet50_v2.pth"
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return path, ref


@pytest.fixture(scope="module")
def torchvision_net():
    """A random torchvision ResNet-50 with non-trivial BatchNorms: its state_dict is a torchvision .pth's."""
    torch.manual_seed(2)
    return randomise_batchnorm(torchvision.models.resnet50(), seed=3)


# ---------------- helpers: tiny datasets written in a temp folder -----------------------------------------

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
        (sets / "sbd_train_noval.txt").write_text(  # PFENet's sbd_data.txt lines, or bare ids as VOC's lists
            "JPEGImages/b_sbd.jpg SegmentationClassAug/b_sbd.png\nc_small\nd_mixed\ne_dup\nf_multi\n")
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


def _full_disk(path):
    """A writer on a full disk: a few bytes reach the file, then ENOSPC."""
    Path(path).write_bytes(b"0123456789")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _count_decodes(monkeypatch):
    """Counts the scan's full decodes of an image (data._decoded_size) in this process: a list of the paths."""
    decoded, decode = [], data._decoded_size
    monkeypatch.setattr(data, "_decoded_size", lambda path: decoded.append(Path(path).name) or decode(path))
    return decoded


def _edited_later(path):
    """Move a file's modification time a second on, as an edit made later than the scan would have (the test edits
    it within one tick of a coarse file-system clock)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))


def _rewritten_at_its_size_and_time(path, write):
    """write(path) rewrites a file at its size; then its modification time is put back, as cp -p, rsync -a, tar and
    unzip leave a file that they overwrite."""
    stat = path.stat()
    write(path)
    assert path.stat().st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _cache_trusts_the_files_as_they_are(cache, root, files):
    """Re-key a scan cache of root's `files` {name: (image, label)} to their stats now (_fingerprint): a file damaged
    after the scan, unseen by the cache, as by a disk that fails during a run."""
    written = json.loads(cache.read_text())
    digest = data._fingerprint(root, [path for pair in files.values() for path in pair])[0]
    cache.write_text(json.dumps({**written, "key": [*written["key"][:-1], digest]}))


def _unlistable(monkeypatch, *folders):
    """These folders cannot be listed (os.scandir: PermissionError), as after chmod 000 (which the tests, may be
    run as root, cannot rely on)."""
    scandir = os.scandir

    def refuse(path="."):
        if Path(path) in folders:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", refuse)


def _read_only(monkeypatch, *folders):
    """Nothing can be made or written inside these folders, as for a user without write permission there (chmod
    alone would not do: the tests may run as root). An existing folder passes mkdir(exist_ok=True), as it does."""
    def inside(path):
        return any(Path(path) == f or f in Path(path).parents for f in folders)
    mkdir, access = Path.mkdir, os.access

    def no_mkdir(self, *args, **kwargs):
        if not inside(self):
            return mkdir(self, *args, **kwargs)
        if not (self.is_dir() and kwargs.get("exist_ok")):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
    monkeypatch.setattr(Path, "mkdir", no_mkdir)
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: not (inside(path) and mode & os.W_OK)
                        and access(path, mode, **kw))


def _write_pascal_val(root, n):
    """A PASCAL tree whose n val images (60x60) each hold a 48x48 object of class 1..5 (fold 0), train one image."""
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    names = [f"v{i:03d}" for i in range(n)] + ["t000"]
    for i, name in enumerate(names):
        _save_jpeg(root / "JPEGImages" / f"{name}.jpg", (60, 60))
        Image.fromarray(_label((1 + i % 5 if name[0] == "v" else 6, 6, 6, 48, 48), shape=(60, 60))).save(
            root / "SegmentationClassAug" / f"{name}.png")
    sets = root / "ImageSets" / "Segmentation"
    (sets / "train.txt").write_text("t000\n")
    (sets / "val.txt").write_text("\n".join(names[:n]) + "\n")
    return root


def _polygon_mask(polygon, height, width):
    return data.segmentation_to_mask([polygon], height, width).astype(int)


# ---------------- transforms and geometry -----------------------------------------------------------------

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


# ---------------- 8-bit images, compact episodes and to_device --------------------------------------------

def _float_train_transform(img, mask, rng, size, scale_range, recipe):
    """The augmentation as data.py had it before images were rounded to 8 bits: every step in [0,1] floats on the
    whole image (torchvision v2 ops) -> image (3,size,size) in [0,1], not normalised, and the mask."""
    steps = data.AUGMENTATIONS[recipe]
    image, label = img.float() / 255, mask
    if steps["scale"]:
        factor = rng.uniform(*scale_range)
        hw = [max(1, round(s * factor)) for s in mask.shape]
        image, label = TF.resize(image, hw, antialias=True), TF.resize(tv_tensors.Mask(mask[None]), hw)[0]
    if steps["rotate"] and rng.random() < data.ROTATE_P:
        image, label = data.rotate(image, label, rng.uniform(-data.ROTATE_DEGREES, data.ROTATE_DEGREES))
    if steps["blur"] and rng.random() < data.BLUR_P:
        image = data.gaussian_blur(image)
    image, label = tv_tensors.Image(image), tv_tensors.Mask(label[None])
    if steps["flip"] and rng.random() < data.FLIP_P:
        image, label = TF.horizontal_flip(image), TF.horizontal_flip(label)
    pad_h, pad_w = max(size - label.shape[-2], 0), max(size - label.shape[-1], 0)
    if pad_h or pad_w:
        padding = [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2]
        image, label = TF.pad(image, padding, fill=list(data.MEAN)), TF.pad(label, padding, fill=IGNORE_INDEX)
    top, left = data._draw_crop(label[0] == 1, size, rng)
    image, label = TF.crop(image, top, left, size, size), TF.crop(label, top, left, size, size)
    return image.as_subclass(torch.Tensor), label[0].as_subclass(torch.Tensor)


def _photo(h, w, seed):
    """A smooth random uint8 image (3,h,w) and a mask (h,w) int64 with an object of 1 and a band of 255."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // 8 + 2, w // 8 + 2, generator=g)
    img = F.interpolate(coarse, (h, w), mode="bilinear", align_corners=False)[0]
    img = img + 0.05 * torch.rand(3, h, w, generator=g)
    mask = torch.zeros(h, w, dtype=torch.long)
    top, left = int(torch.randint(0, h // 2, (1,), generator=g)), int(torch.randint(0, w // 2, (1,), generator=g))
    mask[top:top + h // 3, left:left + w // 3] = 1
    mask[h - 3:h - 1] = 255
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), mask


def _old_normalise(image):
    return (image - torch.tensor(data.MEAN)[:, None, None]) / torch.tensor(data.STD)[:, None, None]


# ---------------- folder (your own data) ------------------------------------------------------------------

FOLDER_NAMES = ("cat", "dog", "cup", "car", "tree", "lamp")  # class ids 1..6


FOLDER_FOLDS = "1 4\n2 5\n3\n6\n"  # fold 1 tests dog and tree


def _write_folder(root, classes_txt=True, folds_txt=FOLDER_FOLDS):
    """A tiny folder dataset: for class c = 1..6 the 80x80 images NAME_0..NAME_3 with a 50x50 box of c (2500
    pixels); NAME_3 also holds a 10x10 patch (100 pixels, under the 2048 filter) of class c % 6 + 1. The lamps
    are PNGs, the others JPEGs."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for c, name in enumerate(FOLDER_NAMES, 1):
        for k in range(4):
            label = _label((c, 5 * k, 5 * k, 50, 50), *([(c % 6 + 1, 65, 65, 10, 10)] if k == 3 else []))
            _save_jpeg(root / "images" / f"{name}_{k}.{'png' if name == 'lamp' else 'jpg'}", label.shape)
            Image.fromarray(label).save(root / "labels" / f"{name}_{k}.png")
    if classes_txt:
        (root / "classes.txt").write_text("\n".join(FOLDER_NAMES) + "\n")
    if folds_txt:
        (root / "folds.txt").write_text(folds_txt)
    return root


def _stems(*names, k=range(4)):
    return sorted(f"{name}_{i}" for name in names for i in k)


def _folder_eval(root, out, *flags):
    """The parameter-free baseline on the pixels evaluated on a folder dataset through train.main."""
    return train.main(["--model", "baseline", "--baseline-features", "image", "--dataset", "folder", "--data-root",
                       str(root), "--img-size", "48", "--test-episodes", "4", "--test-seeds", "1", "--workers", "0",
                       "--out", str(out), *flags])


# ---------------- FSS-1000 ------------------------------------------------------------------------------------

FSS_TEST, FSS_VAL = ("t_bus", "t_cat", "t_cup"), ("v_one", "v_two")  # the fake tree's lists: ids 1-3, 4-5
FSS_TRAIN = ("a_train", "b_train", "c_train", "d_train")  # the other folders: ids 6-9
FSS_SIZE = 40


@pytest.fixture
def fss_lists(monkeypatch):
    """FSS-1000's class lists cut to the fake tree's: 3 test and 2 validation classes, and 4 training folders."""
    monkeypatch.setattr(data, "FSS_TEST_CLASSES", FSS_TEST)
    monkeypatch.setattr(data, "FSS_VAL_CLASSES", FSS_VAL)
    monkeypatch.setattr(data, "FSS_TRAIN_CLASSES", len(FSS_TRAIN))


def _fss_mask(c, k):
    """The mask of image k (1..4) of class id c of the fake tree: 255 on a box of a size of its own, 0 elsewhere."""
    mask = np.zeros((FSS_SIZE, FSS_SIZE), np.uint8)
    mask[2 * k:7 * k + 12, c:4 * c + 6] = 255
    return mask


def _write_fss(root):
    """A fake FSS-1000 tree in the real layout: a folder a class (FSS_TEST, FSS_VAL, FSS_TRAIN), its images
    1.jpg..4.jpg (40x40) with their masks 1.png..4.png (_fss_mask)."""
    for c, name in enumerate(FSS_TEST + FSS_VAL + FSS_TRAIN, 1):
        (root / name).mkdir(parents=True)
        for k in range(1, 5):
            _save_jpeg(root / name / f"{k}.jpg", (FSS_SIZE, FSS_SIZE))
            Image.fromarray(_fss_mask(c, k)).save(root / name / f"{k}.png")
    return root


ALL_FOREGROUND_MODEL = '''
"""A model without parameters that calls every pixel foreground: its scores are the masks' object fractions."""
import dataclasses
import torch
import torch.nn as nn


@dataclasses.dataclass
class Config:
    pass


class Model(nn.Module):
    def __init__(self, cfg, setting):
        super().__init__()

    def forward(self, img_q, img_s, m_s, class_ids=None):
        logits = torch.zeros(img_q.shape[0], 2, *img_q.shape[-2:])
        logits[:, 1] = 1.0
        return {"logits": logits}
'''


REPO = Path(__file__).resolve().parent


TINY_MODEL = '''
"""A tiny model with the repository's model interface, for testing the harness quickly."""
import dataclasses
from pathlib import Path
import torch
import torch.nn as nn
import torch.nn.functional as F
import common

DEFAULTS = {"synthetic": dict(lr=0.05, batch_size=4, epochs=2, img_size=48)}
EVALUATION_FLAGS = ("nan_after", "crash_after", "invert", "crash_fold")  # test hooks: --resume lets them change


@dataclasses.dataclass
class Config:
    width: int = 16
    nan_after: int = 0  # test hook: the loss becomes NaN after this many training steps (0: never)
    crash_after: int = 0  # test hook: raise after this many training steps (0: never)
    invert: int = 0  # test hook: swap the two logits (an evaluation-time model flag)
    crash_fold: int = -1  # test hook: crash_after applies in this fold only (-1: in every fold)


def add_args(parser):
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--nan-after", type=int, default=None)
    parser.add_argument("--crash-after", type=int, default=None)
    parser.add_argument("--invert", type=int, default=None)
    parser.add_argument("--crash-fold", type=int, default=None)


def stage_hello(run, schedule, options):
    schedule.out.mkdir(parents=True, exist_ok=True)
    (schedule.out / "stage.txt").write_text(f"fold {run.fold}")


def stage_nan(run, schedule, options):  # a stage whose loss is NaN from the first step, through the shared loop
    w = nn.Parameter(torch.zeros(()))
    schedule.fit(lambda batch: (w * float("nan"), {}), torch.optim.SGD([w], 0.1, 0.9, fused=True), lambda epoch: [0],
                 lambda it: 0.1, 1, 1, log_every=1)


def count_file(setting, options):
    return Path(common.RUNS_DIR) / f"tiny-count-fold{setting.fold}" / "count.pt"


def stage_count(setting, schedule, options):
    """A stage like the models' own: it saves its file after every epoch and continues it with --resume."""
    path = count_file(setting, options)
    w = nn.Parameter(torch.zeros(()))
    optimizer, start = torch.optim.SGD([w], 0.1, 0.9, fused=True), 0
    if schedule.resume:
        state = common.read_torch_file(path, str(path))
        w.data.fill_(float(state["w"]))
        optimizer.load_state_dict(state["optimizer"])
        start = state["epoch"]

    def end_epoch(epoch):
        common.save_atomic({"w": w.detach(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                            "target": options.get("target")}, path)

    schedule.fit(lambda batch: ((w - 1) ** 2, {}), optimizer, lambda epoch: [0, 0], lambda it: 0.1, schedule.epochs,
                 2, start_epoch=start, log_every=2, tag="[count] ", end_epoch=end_epoch)


@dataclasses.dataclass
class CountConfig:  # the fields --set takes with --stage count
    target: float = 1.0


STAGES = {"hello": stage_hello, "nan": stage_nan, "count": stage_count}
STAGE_FILES = {"count": count_file}
STAGE_CONFIGS = {"count": CountConfig}


class Model(nn.Module):
    def __init__(self, cfg, setting):
        super().__init__()
        self.cfg, self.setting = cfg, setting
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
        logits = self.head(x).flip(1) if self.cfg.invert else self.head(x)
        return {"logits": F.interpolate(logits, img_q.shape[-2:], mode="bilinear", align_corners=True),
                "region_maps": {"cosine": (cos + 1) / 2}}

    def loss(self, out, m_q, m_s):
        total = common.seg_loss(out["logits"], m_q)
        if self.training:
            self.steps += 1
            crashing = self.cfg.crash_after and self.cfg.crash_fold in (-1, self.setting.fold)
            if crashing and self.steps > self.cfg.crash_after:
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


def read_metrics(out, name="metrics.jsonl"):
    """The records of a run's log out/name, one dict a line."""
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


# ---------------- the recipes, and the protocol's scores --------------------------------------------------

RECIPES = {  # model -> dataset -> (lr, batch, epochs, crop, augmentation): the run behind each paper's table
    "ocnet": {"pascal": (0.025, 4, 200, 473, "pfenet"), "coco": (0.025, 4, 75, 641, "pfenet")},
    "qpenet": {"pascal": (0.025, 4, 100, 473, "pfenet"), "coco": (0.025, 4, 50, 473, "pfenet")},
    "crcnet": {"pascal": (0.0025, 4, 200, 321, "crop-scale-flip"), "coco": (0.0025, 8, 50, 321, "crop-scale-flip")},
    "symnet": {"pascal": (0.05, 32, 200, 473, "pfenet"), "coco": (0.05, 32, 50, 641, "pfenet")},
    "qgnet": {"pascal": (0.025, 4, 200, 473, "pfenet"), "coco": (0.05, 8, 50, 473, "pfenet")},
    "baseline": {"pascal": (0.025, 4, 200, 473, "pfenet"), "coco": (0.05, 8, 50, 641, "pfenet")},
}


def _stop_while_training(argv, sig, until, cwd=REPO):
    """Run train.py with argv in cwd, send `sig` once until() is true, -> (returncode, stdout, stderr). The child
    starts with SIGINT's default action, as a terminal's foreground job: a shell that runs the tests in the
    background ignores SIGINT, and a child would inherit that."""
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for _ in range(1200):
            if until() or proc.poll() is not None:
                break
            time.sleep(0.1)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, out, err


OCNET_SIZE = 49  # ResNet: 7x7 features (output stride 8); VGG: 4x4 (stride 16). Not 33: dilated convs crawl there


@pytest.fixture(scope="module")
def ocnet_models():
    torch.manual_seed(0)
    return {b: ocnet.Model(ocnet.Config(backbone=b, pretrained=False)) for b in ("resnet50", "vgg16_bn")}


@pytest.fixture(scope="module")
def ocnet_resnet():
    # ResNet-50 only: the VGG model's 124M-parameter classifier would cost seconds to build
    torch.manual_seed(0)
    return ocnet.Model(ocnet.Config(backbone="resnet50", pretrained=False)).eval()




@pytest.fixture(scope="module")
def qgnet_model():
    torch.manual_seed(0)
    return qgnet.build(qgnet.Config(pretrained=False, untrained_prior=True), common.Setting(pretrained=False))


SYMNET_SIZE = 41  # -> 6x6 features at output stride 8; the episodes are synthetic_episode's (class ids for the text)


def symnet_run(fold=0, **kw):
    """The common.Setting of a synthetic-data Sym-Net with random backbone weights (its 20 classes, as
    train.setting_of fills them)."""
    return common.Setting(dataset="synthetic", fold=fold, pretrained=False, num_classes=20, **kw)


def make_symnet(where, fold=0, **kw):
    """A synthetic-data Sym-Net from symnet.build (Config fields kw), built in the folder `where`, so that no
    runs/ base learner is found by chance."""
    where.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), contextlib.chdir(where):
        warnings.simplefilter("ignore")
        return symnet.build(symnet.Config(pretrained=False, **kw), symnet_run(fold))


@pytest.fixture(scope="module")
def word_vectors(tmp_path_factory):
    """A .pt word-vector file covering the synthetic class names (random unit vectors)."""
    path = tmp_path_factory.mktemp("w2v") / "vectors.pt"
    g = torch.Generator().manual_seed(0)
    names = data.class_names("synthetic").values()
    torch.save({n: F.normalize(torch.randn(symnet.TEXT_DIM, generator=g), dim=0) for n in names}, path)
    return path


@pytest.fixture(scope="module")
def symnet_model(word_vectors, tmp_path_factory):
    torch.manual_seed(0)
    return make_symnet(tmp_path_factory.mktemp("m"), word_vectors=str(word_vectors))


QPENET_SIZE = 33  # output stride 8 -> 5 x 5 features; episode's default boxes


@pytest.fixture(scope="module")
def qpenet_model():
    torch.manual_seed(0)
    return qpenet.Model(qpenet.Config(pretrained=False))


def deep_stem_model(name, where):
    """`name`'s model on the deep-stem ResNet-50 with random weights, built small where the file's tests do."""
    if name == "symnet":
        return make_symnet(where, backbone="resnet50_deep")  # pretrained=False
    cfg = dict(backbone="resnet50_deep", pretrained=False)
    if name == "crcnet":
        return crcnet.Model(crcnet.Config(dim=32, cr_reduction=4, **cfg))
    if name == "qgnet":
        return qgnet.Model(qgnet.Config(untrained_prior=True, **cfg))  # a random prior extractor: no stage 1 file
    module = {"ocnet": ocnet, "qpenet": qpenet}[name]
    return module.Model(module.Config(**cfg))


# ==========================================================================================================
# common.py: the IoU metrics, pooling and the prior by hand; the FEM against PFENet's order of operations; the
# loss; the frozen backbone, PFENet's deep-stem ResNet and weight files; the training loop fit
# ==========================================================================================================

class TestCommon:
    # ---------------- metrics ---------------------------------------------------------------------------------

    def test_intersection_and_union_by_hand(self):
        inter, union = intersection_and_union(PRED_4x4, TARGET_4x4)
        assert inter.dtype == union.dtype == torch.float64
        assert inter.tolist() == [[5.0, 3.0]] and union.tolist() == [[9.0, 7.0]]
        # batched: the second episode is all background, predicted all foreground
        pred = torch.stack([PRED_4x4, torch.ones(4, 4, dtype=torch.long)])
        target = torch.stack([TARGET_4x4, torch.zeros(4, 4, dtype=torch.long)])
        inter, union = intersection_and_union(pred, target)
        assert inter.tolist() == [[5.0, 3.0], [0.0, 0.0]] and union.tolist() == [[9.0, 7.0], [16.0, 16.0]]

    def test_iou_meter_two_classes_by_hand(self):
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
        assert meter.seen() == [3, 5] and meter.class_iou([3, 4, 5])[4] == 0  # the fold's class 4 had no episode
        assert meter.miou([3, 4, 5]) == pytest.approx((3 / 8 + 0 + 1 / 2) / 3)  # PFENet divides by every fold class
        # an episode whose target is all 255 adds nothing to any I or U, whatever the prediction
        meter.update(torch.ones(1, 3, 3, dtype=torch.long), torch.full((1, 3, 3), IGNORE_INDEX), torch.tensor([5]))
        assert meter.class_iou()[5] == pytest.approx(1 / 2)
        assert meter.fbiou() == pytest.approx((9 / 15 + 4 / 10) / 2)

    def test_iou_meter_mean_probability_by_true_label(self):
        meter = IoUMeter(num_classes=5)
        assert all(math.isnan(p) for p in meter.mean_probability())
        target = torch.tensor([[[1, 1], [0, 255]], [[0, 0], [0, 1]]])
        prob = torch.tensor([[[0.4, 0.2], [0.1, 0.9]], [[0.0, 0.3], [0.2, 0.3]]])  # the 255 pixel's 0.9 counts nowhere
        meter.update((prob > 0.5).long(), target, torch.tensor([5, 3]), prob)
        bg, fg = meter.mean_probability()
        assert bg == pytest.approx((0.1 + 0.0 + 0.3 + 0.2) / 4) and fg == pytest.approx((0.4 + 0.2 + 0.3) / 3)
        assert meter.miou() == 0  # under 0.5 everywhere on the objects: 0 mIoU, though fg > bg on average
        meter.update(PRED_4x4, TARGET_4x4, torch.tensor([3]))  # without prob: IoU counts, the means do not move
        assert meter.mean_probability() == pytest.approx([bg, fg])

    def test_iou_meter_all_reduce_single_rank(self, tmp_path, monkeypatch):
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
        state = [meter.class_inter, meter.class_union, meter.class_count, meter.inter, meter.union, meter.prob_sum,
                 meter.pixels]
        assert len(reduced) == len(state) and all(any(t is r for r in reduced) for t in state)
        assert (meter.miou(), meter.fbiou()) == before

    # ---------------- pooling and prior -----------------------------------------------------------------------

    def test_masked_average_pooling_direct(self):
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

    def test_cosine_prior_double_loop(self):
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

    def test_cosine_prior_shots_and_empty_mask(self):
        torch.manual_seed(0)
        f_q, f_s = torch.rand(2, 8, 6, 6), torch.rand(2, 5, 8, 6, 6)
        m_s = (torch.rand(2, 5, 11, 11) > 0.5).long()
        prior = cosine_prior(f_q, f_s, m_s)
        one_shot = torch.stack([cosine_prior(f_q, f_s[:, k], m_s[:, k]) for k in range(5)])  # (5, B, 1, h, w)
        assert prior.shape == (2, 1, 6, 6)
        assert torch.allclose(prior, one_shot.mean(0), atol=1e-6)
        empty = cosine_prior(f_q, f_s[:, 0], torch.zeros(2, 11, 11, dtype=torch.long))
        assert torch.isfinite(empty).all() and torch.equal(empty, torch.zeros_like(empty))
        # min-max per image, not over the batch: each image's prior spans [0, 1] on its own
        one = cosine_prior(f_q * torch.tensor([1.0, 5.0])[:, None, None, None], f_s[:, 0], m_s[:, 0])
        assert torch.allclose(one.amax((1, 2, 3)), torch.ones(2), atol=1e-5) and (one.amin((1, 2, 3)) == 0).all()
        alone = torch.cat([cosine_prior(f_q[b:b + 1], f_s[b:b + 1, 0], m_s[b:b + 1, 0]) for b in range(2)])
        assert torch.allclose(one, alone, atol=1e-6)  # and the batch items do not interact

    @pytest.mark.parametrize("hw, bins, sizes", [
        (60, (1.0, 0.5, 0.25, 0.125), [60, 30, 15, 8]),  # PFENet PASCAL at 473
        (60, (60, 30, 15, 8), [60, 30, 15, 8]),  # the same bins written as PFENet's absolute config
        (81, (1.0, 0.5, 0.25, 0.125), [81, 40, 20, 10]),  # PFENet COCO at 641
    ])
    def test_fem_shapes(self, hw, bins, sizes):
        fem = FEM(in_dim=8, bins=bins)
        logits, aux = fem(*_fem_inputs(8, hw))
        assert logits.shape == (2, 2, hw, hw)
        assert [tuple(a.shape) for a in aux] == [(2, 2, s, s) for s in sizes]

    def test_fem_structure_matches_pfenet(self):
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
        for head in [fem.cls, *fem.inner_cls]:  # 3x3, ReLU, Dropout2d(0.1), 1x1 (PFENet.py:101-106, 144-149)
            assert [type(m) for m in head] == [nn.Conv2d, nn.ReLU, nn.Dropout2d, nn.Conv2d] and head[2].p == 0.1

    def test_fem_forward_follows_pfenet_order(self):
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

    def test_fem_gradients_reach_every_parameter_with_wide_extra(self):
        torch.manual_seed(0)
        fem = FEM(in_dim=8, extra_dim=3).eval()  # eval: no dropout zeroing
        logits, aux = fem(*_fem_inputs(8, 16, extra_dim=3))
        assert logits.shape == (2, 2, 16, 16) and len(aux) == 4
        (logits.square().mean() + sum(a.square().mean() for a in aux)).backward()
        for name, p in fem.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name

    # ---------------- loss ------------------------------------------------------------------------------------

    def test_seg_loss_ignores_255_by_hand(self):
        ln3 = math.log(3)
        logits = torch.tensor([[[0.0, ln3], [0.0, 100.0]],  # channel 0 (background)
                               [[0.0, 0.0], [ln3, -100.0]]])[None]  # channel 1 (foreground)
        m_q = torch.tensor([[[1, 0], [0, IGNORE_INDEX]]])
        # CE: log 2 (equal logits), -log(3/4), -log(1/4); the 255 pixel (would be ~200 with label 1) is ignored
        expected = (math.log(2) + math.log(4 / 3) + math.log(4)) / 3
        assert seg_loss(logits, m_q).item() == pytest.approx(expected, rel=1e-5)

    def test_seg_loss_upsamples_and_survives_all_ignored(self):
        logits = torch.zeros(1, 2, 2, 2)
        logits[:, 1] = math.log(3)  # p(fg) = 3/4 everywhere, also after bilinear upsampling
        m_q = torch.tensor([[[0, 1, 1, 255, 255]] * 5])  # (1, 5, 5): 5 background, 10 foreground, 10 ignored
        expected = (5 * math.log(4) + 10 * math.log(4 / 3)) / 15
        assert seg_loss(logits, m_q).item() == pytest.approx(expected, rel=1e-5)
        # the upsampling is bilinear with align_corners=True (PFENet): 2x2 -> 3x3 puts the mean of the four in the
        # centre and the corners unchanged; nearest or align_corners=False would not
        corners = torch.zeros(1, 2, 2, 2)
        corners[0, 1] = torch.tensor([[0.0, 4.0], [8.0, 12.0]])  # foreground logit; background 0
        target = torch.full((1, 3, 3), IGNORE_INDEX)
        target[0, 1, 1] = 1  # only the centre is labelled: the loss is -log sigmoid(6)
        assert seg_loss(corners, target).item() == pytest.approx(F.softplus(torch.tensor(-6.0)).item(), rel=1e-4)
        target[0, 1, 1], target[0, 0, 2] = IGNORE_INDEX, 0  # the top-right corner alone: -log(1 - sigmoid(4))
        assert seg_loss(corners, target).item() == pytest.approx(F.softplus(torch.tensor(4.0)).item(), rel=1e-4)
        logits.requires_grad_(True)
        loss = seg_loss(logits, torch.full((1, 5, 5), IGNORE_INDEX))
        loss.backward()
        assert loss.item() == 0 and torch.isfinite(logits.grad).all()

    # ---------------- backbone --------------------------------------------------------------------------------

    def test_resnet50_output_stride_and_blocks(self, resnet50):
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

    def test_backbone_frozen_and_bn_stays_in_eval(self, resnet50):
        assert not any(p.requires_grad for p in resnet50.parameters())
        parent = nn.Sequential(resnet50).train()  # a model calling .train() must not wake the backbone's BN
        bns = [m for m in resnet50.modules() if isinstance(m, nn.BatchNorm2d)]
        assert not resnet50.training and bns and not any(m.training for m in bns)
        stats = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
        parent(torch.randn(2, 3, 33, 33) * 5 + 3)
        assert all(torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
                   for m, (mean, var) in zip(bns, stats))

    def test_random_backbone_calibration_sets_batchnorm_statistics(self):
        torch.manual_seed(0)
        net = Backbone("resnet50", pretrained=False)
        images = torch.rand(6, 3, 41, 41) * 4 - 2
        before = net(images)["layer4"].abs().mean().item()
        net.calibrate(images, batch_size=3)
        conv = net.stages["layer0"][0](images)  # (6,64,21,21): the stem's BatchNorm sees this, in two batches
        mean = (conv[:3].mean((0, 2, 3)) + conv[3:].mean((0, 2, 3))) / 2
        var = (conv[:3].var((0, 2, 3)) + conv[3:].var((0, 2, 3))) / 2  # unbiased per batch, as BatchNorm stores it
        stem = net.stages["layer0"][1]
        assert torch.allclose(stem.running_mean, mean, atol=1e-5) and torch.allclose(stem.running_var, var, rtol=1e-4)
        after = net(images)["layer4"].abs().mean().item()
        assert before > 4 and 0.1 < after < 2, (before, after)  # random BN statistics let activations grow with depth
        bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        assert not net.training and not any(m.training for m in bns) and all(m.momentum == 0.1 for m in bns)
        assert not any(p.requires_grad for p in net.parameters())

    def test_backbone_episode_equals_separate_calls(self, resnet50):
        g = torch.Generator().manual_seed(3)
        img_q, img_s = torch.randn(2, 3, 33, 33, generator=g), torch.randn(2, 3, 3, 33, 33, generator=g)
        feats_q, feats_s = resnet50.episode(img_q, img_s, blocks=True)
        alone_q, alone_s = resnet50(img_q, blocks=True), resnet50(img_s.flatten(0, 1), blocks=True)
        assert set(feats_q) == set(feats_s) == set(alone_q)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            assert feats_q[name].shape[0] == 2 and feats_s[name].shape[0] == 6  # B and B*S
            torch.testing.assert_close(feats_q[name], alone_q[name], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(feats_s[name], alone_s[name], rtol=1e-4, atol=1e-4)
        assert len(feats_q["blocks"]) == len(feats_s["blocks"]) == 13
        for q, s, a_q, a_s in zip(feats_q["blocks"], feats_s["blocks"], alone_q["blocks"], alone_s["blocks"]):
            torch.testing.assert_close(q, a_q, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(s, a_s, rtol=1e-4, atol=1e-4)
        # with the support masks: PFENet's support layer4, of the masked layer3 (PFENet.py:209-210); the rest as is
        m_s = torch.zeros(2, 3, 33, 33, dtype=torch.long)
        m_s[:, :, 5:20, 8:30], m_s[:, :, 0] = 1, IGNORE_INDEX
        masked_q, masked_s = resnet50.episode(img_q, img_s, m_s=m_s)
        m = F.interpolate((m_s.flatten(0, 1) == 1).float()[:, None], alone_s["layer3"].shape[-2:], mode="bilinear",
                          align_corners=True)
        torch.testing.assert_close(masked_s["layer4"], resnet50.stages["layer4"](alone_s["layer3"] * m), rtol=1e-4,
                                   atol=1e-4)
        assert not torch.allclose(masked_s["layer4"], alone_s["layer4"], atol=1e-2)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            torch.testing.assert_close(masked_q[name], alone_q[name], rtol=1e-4, atol=1e-4)  # the query: unmasked
        torch.testing.assert_close(masked_s["layer3"], alone_s["layer3"], rtol=1e-4, atol=1e-4)

    def test_backbone_runs_only_up_to_the_last_stage_a_model_reads(self, resnet50):
        """QPENet reads layer2 and layer3: its backbone neither builds nor runs layer4, and its features and outputs
        are those of the whole backbone with the same weights. VGG's layer2 keeps layer3's size without it."""
        x = torch.randn(2, 3, 33, 33, generator=torch.Generator().manual_seed(1))
        short = Backbone("resnet50", pretrained=False, last="layer3")
        short.load_state_dict({k: v for k, v in resnet50.state_dict().items() if ".layer4." not in k})
        assert "layer4" not in short.stages and not any(".layer4." in k for k in short.state_dict())
        full, cut = resnet50(x, blocks=True), short(x, blocks=True)
        assert set(cut) == {"layer1", "layer2", "layer3", "blocks"} and len(cut["blocks"]) == 4 + 6
        for name in ("layer1", "layer2", "layer3"):
            assert torch.equal(cut[name], full[name])
        with pytest.raises(ValueError, match="stops at layer3"):
            short(x, mask=torch.ones(2, 33, 33, dtype=torch.long))
        torch.manual_seed(0)
        model = qpenet.Model(qpenet.Config(pretrained=False)).eval()
        ran = []
        for block in model.modules():
            if isinstance(block, torchvision.models.resnet.Bottleneck):
                block.register_forward_hook(lambda *a: ran.append(1))
        img_q, img_s, m_s, _ = episode(1, 2, 33)
        with torch.no_grad():
            out = model(img_q, img_s, m_s)["logits"]
            assert len(ran) == 3 + 4 + 6  # layer1-layer3 once, for the query and the supports as one batch
            whole = Backbone("resnet50", pretrained=False)
            whole.load_state_dict({**whole.state_dict(), **model.backbone.state_dict()})
            model.backbone = whole
            assert torch.equal(model(img_q, img_s, m_s)["logits"], out)
        vgg = Backbone("vgg16_bn", pretrained=False)
        vgg2 = Backbone("vgg16_bn", pretrained=False, last="layer2")
        vgg2.load_state_dict({k: v for k, v in vgg.state_dict().items() if k in vgg2.state_dict()})
        assert torch.equal(vgg2(x)["layer2"], vgg(x)["layer2"]) and "layer3" not in vgg2(x)

    def test_resnet101_has_30_blocks(self):
        out = Backbone("resnet101", pretrained=False)(torch.randn(1, 3, 33, 33), blocks=True)
        assert len(out["blocks"]) == 30 and out["blocks"][-1] is out["layer4"]

    def test_vgg16_bn_split(self):
        vgg = Backbone("vgg16_bn", pretrained=False)
        out = vgg(torch.randn(1, 3, 65, 65))
        assert vgg.channels == {"layer1": 128, "layer2": 256, "layer3": 512, "layer4": 512}
        assert tuple(out["layer1"].shape) == (1, 128, 17, 17)  # ceil-mode pooling as PFENet: 65 -> 33 -> 17
        for name in ("layer2", "layer3", "layer4"):
            assert tuple(out[name].shape) == (1, vgg.channels[name], 5, 5)  # layer2 (9x9) resized to layer3's 5x5
        with pytest.raises(ValueError):
            vgg(torch.randn(1, 3, 65, 65), blocks=True)

    def test_backbone_unknown_name(self):
        with pytest.raises(ValueError, match="resnet50"):
            Backbone("resnet18", pretrained=False)

    def test_backbone_download_failure_message(self, monkeypatch):
        def offline(*args, **kwargs):
            raise OSError("network is unreachable")

        monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
        with pytest.raises(common.WeightsUnavailableError) as err:
            Backbone("resnet50", pretrained=True)
        message = str(err.value)
        assert "--no-pretrained" in message and "network is unreachable" in message
        assert "torchvision.models.resnet50(weights='IMAGENET1K_V1')" in message

    def test_deep_stem_resnet_is_pfenets_network(self):
        net = common.DeepStemResNet((3, 4, 6, 3))
        keys = list(net.state_dict())
        assert len(keys) == len(set(keys)) and set(keys) == set(pfenet_resnet_keys((3, 4, 6, 3)))
        stem = [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.bias)
                for c in (net.conv1, net.conv2, net.conv3)]
        assert stem == [(3, 64, (3, 3), (2, 2), (1, 1), None), (64, 64, (3, 3), (1, 1), (1, 1), None),
                        (64, 128, (3, 3), (1, 1), (1, 1), None)]
        assert (net.maxpool.kernel_size, net.maxpool.stride, net.maxpool.padding) == (3, 2, 1)
        first = net.layer1[0]
        assert first.conv1.in_channels == first.downsample[0].in_channels == 128 and first.conv3.out_channels == 256
        block = net.layer2[0]  # the stride sits on the 3x3 conv2 (PFENet resnet.py:66-67) and the downsample conv
        assert (block.conv1.stride, block.conv2.stride, block.downsample[0].stride) == ((1, 1), (2, 2), (2, 2))
        assert block.downsample[0].kernel_size == (1, 1) and isinstance(block.downsample[1], nn.BatchNorm2d)
        bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(bns) == 3 + 3 * 16 + 4 and all((m.eps, m.momentum) == (1e-5, 0.1) for m in bns)
        assert bottleneck_params(128, 64, True) == 8192 + 36864 + 16384 + 768 + 32768 + 512  # by hand
        assert sum(p.numel() for p in net.parameters()) == pfenet_resnet_params((3, 4, 6, 3)) + 2048 * 1000 + 1000
        assert pfenet_resnet_params((3, 4, 6, 3)) == 23_631_808  # torchvision's 7x7-stem ResNet-50: 23_508_032
        logits = net.eval()(torch.randn(1, 3, 64, 64))  # its forward runs the deep stem, as PFENet's
        assert logits.shape == (1, 1000)

    @pytest.mark.parametrize("name,layers,blocks", [("resnet50_deep", (3, 4, 6, 3), 13),
                                                    ("resnet101_deep", (3, 4, 23, 3), 30)])
    def test_deep_stem_backbone_shapes_dilation_and_size(self, deep50, name, layers, blocks):
        net = deep50 if name == "resnet50_deep" else Backbone(name, pretrained=False)
        x = torch.randn(1, 3, 41, 41)
        assert tuple(net.stages["layer0"](x).shape) == (1, 128, 11, 11)  # 128 channels at stride 4: 41 -> 21 -> 11
        out = net(x, blocks=True)
        assert tuple(out["layer1"].shape) == (1, 256, 11, 11)
        assert net.channels == {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
        for stage in ("layer2", "layer3", "layer4"):
            assert tuple(out[stage].shape) == (1, net.channels[stage], 6, 6)  # output stride 8
        assert len(out["blocks"]) == blocks and out["blocks"][-1] is out["layer4"]
        for stage, d in (("layer3", 2), ("layer4", 4)):  # every block dilated, the first one too; no stride left
            assert all(b.conv2.dilation == (d, d) and b.conv2.padding == (d, d) and b.conv2.stride == (1, 1)
                       for b in net.stages[stage])
            assert net.stages[stage][0].downsample[0].stride == (1, 1)
        assert sum(p.numel() for p in net.parameters()) == pfenet_resnet_params(layers)
        assert not any(p.requires_grad for p in net.parameters()) and not net.training and net.head is None

    def test_deep_stem_backbone_mask_and_episode_as_torchvisions(self, deep50):
        g = torch.Generator().manual_seed(5)
        img_q, img_s = torch.randn(1, 3, 33, 33, generator=g), torch.randn(1, 2, 3, 33, 33, generator=g)
        m_s = torch.zeros(1, 2, 33, 33, dtype=torch.long)
        m_s[:, :, 5:25, 3:20], m_s[:, :, 0] = 1, IGNORE_INDEX
        feats_q, feats_s = deep50.episode(img_q, img_s, blocks=True, m_s=m_s)
        alone_s = deep50(img_s.flatten(0, 1))
        m = F.interpolate((m_s.flatten(0, 1) == 1).float()[:, None], alone_s["layer3"].shape[-2:], mode="bilinear",
                          align_corners=True)  # PFENet.py:209-210: the support's layer4 is of its masked layer3
        torch.testing.assert_close(feats_s["layer4"], deep50.stages["layer4"](alone_s["layer3"] * m), rtol=1e-4,
                                   atol=1e-4)
        torch.testing.assert_close(feats_s["layer3"], alone_s["layer3"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(feats_q["layer4"], deep50(img_q)["layer4"], rtol=1e-4, atol=1e-4)
        assert len(feats_q["blocks"]) == len(feats_s["blocks"]) == 13

    def test_pfenet_layout_weight_file_gives_the_nets_own_features(self, pfenet_file):
        path, ref = pfenet_file
        assert set(torch.load(path, weights_only=True)) == {k for k in pfenet_resnet_keys((3, 4, 6, 3))
                                                              if not k.endswith("num_batches_tracked")}
        net = Backbone("resnet50_deep", pretrained=path)
        assert net.pretrained == path  # not random: train.py estimates no BatchNorm statistics for it
        assert_backbone_holds(net, ref)
        # the file's own net, dilated as PFENet dilates it after loading (PFENet.py:84-93), runs by hand
        dilated = copy.deepcopy(ref)
        for stage, d in (("layer3", 2), ("layer4", 4)):
            for block in getattr(dilated, stage):
                block.conv2.dilation, block.conv2.padding, block.conv2.stride = (d, d), (d, d), (1, 1)
                if block.downsample is not None:
                    block.downsample[0].stride = (1, 1)
        x = torch.randn(2, 3, 41, 41)
        with torch.no_grad():
            f = dilated.relu(dilated.bn1(dilated.conv1(x)))
            f = dilated.relu(dilated.bn2(dilated.conv2(f)))
            f = dilated.maxpool(dilated.relu(dilated.bn3(dilated.conv3(f))))
            expected = {}
            for stage in ("layer1", "layer2", "layer3", "layer4"):
                f = expected[stage] = getattr(dilated, stage)(f)
        feats = net(x)
        for stage in expected:
            torch.testing.assert_close(feats[stage], expected[stage])
        assert feats["layer4"].shape[-2:] == (6, 6)  # output stride 8
        # the file's classifier: kept, frozen, outside the module tree
        assert torch.equal(net.head.weight, ref.fc.weight) and torch.equal(net.head.bias, ref.fc.bias)
        assert not net.head.weight.requires_grad and not any(k.startswith("head") for k in net.state_dict())
        assert sum(p.numel() for p in net.parameters()) == pfenet_resnet_params((3, 4, 6, 3))

    @pytest.mark.parametrize("wrap", ["plain, no fc", "state_dict, module.", "model"])
    def test_torchvision_layout_weight_file_loads_plain_or_wrapped(self, tmp_path, torchvision_net, wrap):
        state = torchvision_net.state_dict()
        if wrap == "plain, no fc":  # a features-only file: no classifier kept, nothing else missing
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        elif wrap == "state_dict, module.":  # a training checkpoint of a model in nn.DataParallel
            state = {"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3, "best_miou": 0.5}
        else:
            state = {"model": state, "optimizer": {"state": {}, "param_groups": []}}
        path = tmp_path / "weights.pth"
        torch.save(state, path)
        net = Backbone("resnet50", pretrained=path)
        assert_backbone_holds(net, torchvision_net)
        if wrap == "plain, no fc":
            assert net.head is None
        else:
            assert torch.equal(net.head.weight, torchvision_net.fc.weight)
            assert torch.equal(net.head.bias, torchvision_net.fc.bias)

    @pytest.mark.parametrize("fault", ["missing", "unexpected", "mis-shaped"])
    def test_weight_file_that_does_not_fit_names_the_key(self, tmp_path, torchvision_net, fault):
        state = torchvision_net.state_dict()
        if fault == "missing":
            key, shown = "layer2.1.bn2.running_var", "layer2.1.bn2.running_var"
            del state[key]
        elif fault == "unexpected":
            key, shown = "layer5.0.conv1.weight", "layer5.0.conv1.weight"
            state[key] = torch.zeros(3)
        else:
            key, shown = "layer4.0.conv1.weight", "layer4.0.conv1.weight (512, 1024, 3, 3) instead of (512, 1024, 1, 1)"
            state[key] = torch.zeros(512, 1024, 3, 3)
        path = tmp_path / "broken.pth"
        torch.save(state, path)
        with pytest.raises(common.WeightsFileError) as err:
            Backbone("resnet50", pretrained=path)
        message = str(err.value)
        assert isinstance(err.value, common.WeightsUnavailableError)  # train.py prints it as one error line
        assert f"1 {fault} key ({shown})" in message and str(path) in message and "\n" not in message

    def test_weight_file_of_the_other_stem_names_its_keys_and_the_backbone(self, tmp_path, pfenet_file,
                                                                           torchvision_net):
        pfenet_path, _ = pfenet_file
        with pytest.raises(common.WeightsFileError) as err:
            Backbone("resnet50", pretrained=pfenet_path)
        message = str(err.value)
        # conv2, conv3 and their BatchNorms (5 tensors each, num_batches_tracked absent in this file: 4)
        assert "10 unexpected keys (conv2.weight, bn2.weight, bn2.bias, ...)" in message
        assert ("3 mis-shaped keys (conv1.weight (64, 3, 3, 3) instead of (64, 3, 7, 7), layer1.0.conv1.weight"
                in message)
        assert "--backbone resnet50_deep" in message and "missing" not in message
        path = tmp_path / "resnet50-torchvision.pth"
        torch.save(torchvision_net.state_dict(), path)
        with pytest.raises(common.WeightsFileError, match=r"10 missing keys \(conv2.weight, .*--backbone resnet50$"):
            Backbone("resnet50_deep", pretrained=path)
        with pytest.raises(common.WeightsFileError, match="does not exist"):
            Backbone("resnet50", pretrained=tmp_path / "absent.pth")
        torch.save([1, 2, 3], tmp_path / "list.pth")
        with pytest.raises(common.WeightsFileError, match="holds no state dict"):
            Backbone("resnet50", pretrained=tmp_path / "list.pth")
        torch.save({0: torch.ones(1), "fc.weight": torch.ones(1)}, tmp_path / "int-keys.pth")  # no key has .startswith
        with pytest.raises(common.WeightsFileError, match=r"holds no state dict .*found \['0', 'fc.weight'\]$"):
            Backbone("resnet50", pretrained=tmp_path / "int-keys.pth")
        (tmp_path / "text.pth").write_text("not a torch file")
        with pytest.raises(common.WeightsFileError, match="cannot read the weight file"):
            Backbone("resnet50", pretrained=str(tmp_path / "text.pth"))

    def test_deep_stem_without_a_weight_file_says_where_pfenets_are(self, monkeypatch):
        def offline(*args, **kwargs):
            raise AssertionError("no download may be tried: torchvision has no such weights")

        monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
        for name, file in (("resnet50_deep", "resnet50_v2.pth"), ("resnet101_deep", "resnet101_v2.pth")):
            with pytest.raises(common.WeightsUnavailableError) as err:
                Backbone(name, pretrained=True)
            message = str(err.value)
            assert "torchvision does not ship" in message and file in message and "initmodel" in message
            # PFENet README
            assert "https://drive.google.com/drive/folders/1Hrz1wOxOZm4nIIS7UMJeL79AQrdvpj6v" in message
            assert "--backbone-weights PATH" in message and "--no-pretrained" in message
        with pytest.raises(common.WeightsUnavailableError, match="torchvision does not ship"):
            ocnet.ImageNetCAM("resnet50_deep", pretrained=True)  # the classifier alone is never silently random

    # ---------------- the training loop (fit) -----------------------------------------------------------------

# ==========================================================================================================
# data.py: folds, synthetic episodes, PASCAL and COCO on tiny trees (splits, filters, caches, bad files), COCO's
# polygons and RLE, augmentation and geometry, each test seed's order, box supports, the folder dataset, FSS-1000
# ==========================================================================================================

class TestData:
    # ---------------- folds -----------------------------------------------------------------------------------

    @pytest.mark.parametrize("dataset,split,n", [("pascal", "interleaved", 20), ("synthetic", "interleaved", 20),
                                                 ("coco", "interleaved", 80), ("coco", "contiguous", 80)])
    def test_fold_classes_partition(self, dataset, split, n):
        folds = [data.fold_classes(dataset, f, split) for f in range(4)]
        assert sorted(c for fold in folds for c in fold) == list(range(1, n + 1))  # disjoint and complete
        for f, test in enumerate(folds):
            base = [c for c in range(1, n + 1) if c not in test]
            assert len(test) == n // 4 and not set(base) & set(test)
            if dataset == "synthetic":
                ds = data.build_dataset(dataset, "train", f, img_size=32)
                assert ds.classes == base and data.build_dataset(dataset, "test", f, img_size=32).classes == test

    def test_fold_classes_values(self):
        assert data.fold_classes("pascal", 2) == [11, 12, 13, 14, 15]
        assert data.fold_classes("coco", 0) == list(range(1, 78, 4))
        assert data.fold_classes("coco", 3)[:3] == [4, 8, 12]
        assert data.fold_classes("coco", 1, "contiguous") == list(range(21, 41))
        with pytest.raises(ValueError):
            data.fold_classes("pascal", 4)

    # ---------------- synthetic -------------------------------------------------------------------------------

    @pytest.mark.parametrize("shot,size", [(1, 64), (5, 64), (1, 96), (5, 96)])
    def test_synthetic_episode_shapes_and_determinism(self, shot, size):
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

    def test_class_names_need_no_files(self):
        pascal, coco, synthetic = (data.class_names(name) for name in ("pascal", "coco", "synthetic"))
        assert list(pascal) == list(range(1, 21)) and pascal[1] == "aeroplane" and pascal[20] == "tvmonitor"
        assert list(coco) == list(range(1, 81)) and coco[1] == "person" and coco[80] == "toothbrush"
        assert len(set(synthetic.values())) == 20  # every synthetic class has its own name

    @pytest.mark.parametrize("fold", range(4))
    def test_synthetic_train_never_shows_test_classes(self, fold):
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

    # ---------------- PASCAL ----------------------------------------------------------------------------------

    def test_pascal_split_and_filters(self, tmp_path, capsys):
        root = _write_pascal(tmp_path / "voc")
        train = data.build_dataset("pascal", "train", 0, img_size=64, root=root)
        assert sorted(train.files) == ["a_voc", "b_sbd", "c_small", "d_mixed", "f_multi"]  # VOC+SBD train - val
        assert "5 PASCAL training images from train.txt and sbd_train_noval.txt; PFENet's list has 5953" in \
            capsys.readouterr().err
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

    def test_pascal_masks_keep_ignore_and_zero_other_classes(self, tmp_path):
        root = _write_pascal(tmp_path / "voc")
        ds = data.build_dataset("pascal", "test", 0, shot=2, img_size=64, root=root)
        def index_of(query):  # the episode of test seed 0 whose query is `query`
            return next(i for i in range(len(ds.images)) if ds._query(i, 0) == query)

        ep = ds[index_of("v1")]  # query v1: class 1 (class 3 is present but has no support list)
        _assert_episode(ep, 2, 64, test=True)
        expected = torch.from_numpy(_PASCAL_LABELS["v1"]).long()
        expected = torch.where(expected == 1, 1, torch.where(expected == 255, 255, 0))  # class 3 -> 0
        assert ep["class_id"] == 1 and torch.equal(ep["m_q_orig"], expected)
        assert (ep["m_q"] == 255).any() and (ep["m_q"] == 1).any()
        # PFENet's query rule: a class present in the query counts even under the threshold (v4: class 1)
        picked = set()
        for seed in range(12):
            ds.seed = seed
            picked.add(ds[index_of("v4")]["class_id"])
        assert picked == {1, 2}

    def test_draw_supports_excludes_query_and_repeats_only_when_needed(self):
        rng = np.random.default_rng(0)
        assert sorted(data._draw_supports(rng, ["a", "b", "c"], "a", 2)) == ["b", "c"]
        assert data._draw_supports(rng, ["a", "b"], "a", 3) == ["b", "b", "b"]
        assert data._draw_supports(rng, ["a"], "a", 1) == ["a"]

    def test_pascal_cache_written_reused_and_rebuilt(self, tmp_path, monkeypatch):
        root = _write_pascal(tmp_path / "voc")
        monkeypatch.setattr(data, "PARALLEL_MIN_FILES", 1)  # exercise the process pool once
        first = data.build_dataset("pascal", "train", 0, img_size=64, root=root)
        assert (root / ".fss_cache" / "pascal_train_counts.json").is_file()

        def fail(pair, max_id=None):
            raise AssertionError("rescanned although cached")
        monkeypatch.setattr(data, "_scan_pair", fail)
        monkeypatch.setattr(data, "PARALLEL_MIN_FILES", 10 ** 6)
        again = data.build_dataset("pascal", "train", 0, img_size=64, root=root)
        assert again.counts == first.counts and again.images == first.images
        with (root / "ImageSets/Segmentation/sbd_train_noval.txt").open("a") as f:
            f.write("g_extra\n")  # a changed list must rebuild the cache
        with pytest.raises(AssertionError, match="rescanned"):
            data.build_dataset("pascal", "train", 0, img_size=64, root=root)

    def test_pascal_without_sbd_list_warns_and_uses_all_labels(self, tmp_path, capsys):
        root = _write_pascal(tmp_path / "voc", sbd=False)
        ds = data.build_dataset("pascal", "train", 0, img_size=64, root=root)
        assert "WARNING" in capsys.readouterr().err
        assert sorted(ds.files) == ["a_voc", "b_sbd", "c_small", "d_mixed", "f_multi", "g_extra"]

    def test_missing_root_error_names_layout(self, tmp_path):
        for root, first in ((None, "no data root given for pascal: pass --data-root DIR"),
                            (tmp_path / "nope", f"pascal data root {tmp_path / 'nope'} is not a directory")):
            with pytest.raises(data.DatasetNotFoundError, match="SegmentationClassAug") as err:
                data.build_dataset("pascal", "test", 0, root=root)
            assert str(err.value).splitlines()[0] == first
            assert "JPEGImages" in str(err.value) and "sbd_train_noval.txt" in str(err.value)
        (tmp_path / "voc" / "JPEGImages").mkdir(parents=True)
        with pytest.raises(FileNotFoundError, match="val.txt"):
            data.build_dataset("pascal", "test", 0, root=tmp_path / "voc")
        (tmp_path / "coco").mkdir()
        with pytest.raises(data.DatasetNotFoundError, match="instances_train2014.json"):
            data.build_dataset("coco", "train", 0, root=tmp_path / "coco")

    def test_bad_files_are_all_reported_by_the_first_scan_one_line_each(self, tmp_path):
        root = _write_pascal(tmp_path / "voc")
        (root / "JPEGImages" / "v1.jpg").write_bytes(b"not a jpeg")  # unreadable header
        Image.new("RGB", (80, 80)).save(root / "SegmentationClassAug" / "v2.png")  # a colour image, not a label
        Image.fromarray(_label((2, 0, 0, 50, 50), shape=(80, 70))).save(root / "SegmentationClassAug" / "v3.png")
        with pytest.raises(data.DatasetFileError) as err:
            data.build_dataset("pascal", "test", 0, img_size=64, root=root)
        lines = str(err.value).splitlines()
        assert lines[0].startswith("3 bad file(s) in the PASCAL test list") and len(lines) == 4
        assert "v1.jpg: not a readable image" in lines[1] and "v2.png" in lines[2] and "mode RGB" in lines[2]
        assert "v3.png: 70x80 pixels, its image" in lines[3] and "80x80" in lines[3]
        # nothing cached: the next run checks again
        assert not (root / ".fss_cache" / "pascal_test_counts.json").exists()

    def test_class_ids_the_dataset_does_not_have_are_named(self, tmp_path):
        root = _write_pascal(tmp_path / "voc")
        labels = root / "SegmentationClassAug"
        Image.fromarray(_label((1, 0, 0, 50, 50), (21, 60, 60, 5, 5))).save(labels / "v2.png")  # VOC has 1..20
        Image.fromarray(_label((2, 0, 0, 50, 50), (254, 60, 60, 5, 5), (30, 70, 0, 2, 2))).save(labels / "v3.png")
        with pytest.raises(data.DatasetFileError) as err:
            data.build_dataset("pascal", "test", 0, img_size=64, root=root)
        assert str(err.value).splitlines() == [
            f"2 bad file(s) in the PASCAL test list of {root}; fix or remove them (and their list entries):",
            f"  {labels / 'v2.png'}: class id 21; ids are 1..20 (0 background, 255 ignore)",
            f"  {labels / 'v3.png'}: class ids 30, 254; ids are 1..20 (0 background, 255 ignore)"]
        Image.fromarray(_label((3, 0, 0, 50, 50), (20, 60, 60, 5, 5), ignore_rows=(75, 80))).save(labels / "v2.png")
        Image.fromarray(_label((2, 0, 0, 50, 50))).save(labels / "v3.png")
        assert data.build_dataset("pascal", "test", 0, img_size=64, root=root).counts["v2"] == {3: 2500, 20: 25}
        # COCO: the labels written here hold 1..(its categories: 3 in this tree); one found with another id is named
        coco = _write_coco(tmp_path / "coco")
        label_dir = coco / "labels" / "val2014"
        label_dir.mkdir(parents=True)
        (label_dir / data.COCO_LABEL_STAMP).write_text(f"{data.COCO_LABEL_VERSION}\n")  # current: kept as it is
        Image.fromarray(_label((4, 0, 0, 50, 50))).save(label_dir / "COCO_val2014_000000000001.png")
        with pytest.raises(data.DatasetFileError, match=rf"\n  {label_dir / 'COCO_val2014_000000000001.png'}: class id "
                           r"4; ids are 1\.\.3 \(0 background, 255 ignore\)$"):
            data.build_dataset("coco", "test", 0, img_size=64, root=coco)

    def test_a_cache_that_cannot_be_written_stops_nothing_and_leaves_no_temporary(self, tmp_path, monkeypatch, capsys):
        root = _write_pascal(tmp_path / "voc")
        expected = data.build_dataset("pascal", "test", 0, img_size=64, root=tmp_path / "voc").counts
        (root / ".fss_cache" / "pascal_test_counts.json").unlink()
        capsys.readouterr()
        monkeypatch.setattr(Path, "write_text", lambda self, *args, **kwargs: _full_disk(self))
        ds = data.build_dataset("pascal", "test", 0, img_size=64, root=root)
        assert ds.counts == expected and ds[0]["img_q"].shape == (3, 64, 64)  # the counts in memory serve the run
        cache = root / ".fss_cache" / "pascal_test_counts.json"
        assert list((root / ".fss_cache").iterdir()) == []  # no temporary, no cache
        assert capsys.readouterr().err.splitlines() == [
            f"[data] note: could not cache the scan in {cache} (No space left on device): the scan runs again "
            "next time"]
        monkeypatch.undo()
        decoded = _count_decodes(monkeypatch)
        data.build_dataset("pascal", "test", 0, img_size=64, root=root)
        assert len(decoded) == 5 and cache.is_file()  # scanned again, and cached now

    def test_a_scan_cache_is_trusted_only_while_its_files_are_unchanged(self, tmp_path, monkeypatch):
        """Issue 33: after one clean scan, a label changed to hold class id 50, a JPEG cut short or a file removed
        is found by the next run, not trained on: PASCAL's and COCO's caches hold every file's size, modification
        and status-change time and inode, as the folder dataset's does; a label rewritten at its size with its
        modification time put back (cp -p, rsync -a, tar, unzip) is scanned again too."""
        root = _write_pascal(tmp_path / "voc")
        label = root / "SegmentationClassAug" / "v2.png"
        Image.fromarray(_PASCAL_LABELS["v2"]).save(label, compress_level=0)  # stored: its size is its pixel count's
        data.build_dataset("pascal", "test", 0, img_size=64, root=root)  # a clean scan, cached
        decoded = _count_decodes(monkeypatch)
        data.build_dataset("pascal", "test", 0, img_size=64, root=root)
        assert decoded == []  # nothing changed: the cache serves
        bad = _label((1, 0, 0, 50, 50), (50, 60, 60, 5, 5))
        _rewritten_at_its_size_and_time(label, lambda path: Image.fromarray(bad).save(path, compress_level=0))
        with pytest.raises(data.DatasetFileError) as err:
            data.build_dataset("pascal", "test", 0, img_size=64, root=root)
        assert str(err.value).splitlines()[1:] == [f"  {label}: class id 50; ids are 1..20 (0 background, 255 ignore)"]
        Image.fromarray(_PASCAL_LABELS["v2"]).save(label)
        data.build_dataset("pascal", "test", 0, img_size=64, root=root)  # fixed: scanned and cached again
        jpeg = root / "JPEGImages" / "v3.jpg"
        jpeg.write_bytes(jpeg.read_bytes()[:3000])
        with pytest.raises(data.DatasetFileError, match=rf"\n  {jpeg}: not a readable image \(image file is truncated"):
            data.build_dataset("pascal", "test", 0, img_size=64, root=root)
        _save_jpeg(jpeg, (80, 80))
        data.build_dataset("pascal", "test", 0, img_size=64, root=root)
        jpeg.unlink()
        with pytest.raises(data.DatasetFileError, match=rf"\n  {jpeg}: no such file \(its list names it\)$"):
            data.build_dataset("pascal", "test", 0, img_size=64, root=root)
        # COCO's counts: its labels and its images
        coco = _write_coco(tmp_path / "coco")
        data.build_dataset("coco", "test", 0, img_size=64, root=coco)
        label = coco / "labels" / "val2014" / "COCO_val2014_000000000001.png"
        Image.fromarray(_label((50, 10, 10, 50, 50))).save(label)
        _edited_later(label)
        with pytest.raises(data.DatasetFileError, match=rf"\n  {label}: class id 50; ids are 1\.\.3 "):
            data.build_dataset("coco", "test", 0, img_size=64, root=coco)
        label.unlink()  # written again from the annotations
        data.build_dataset("coco", "test", 0, img_size=64, root=coco)
        jpeg = coco / "val2014" / "COCO_val2014_000000000002.jpg"
        jpeg.write_bytes(jpeg.read_bytes()[:3000])
        with pytest.raises(data.DatasetFileError, match=rf"\n  {jpeg}: not a readable image \(image file is truncated"):
            data.build_dataset("coco", "test", 0, img_size=64, root=coco)

    def test_missing_and_damaged_files_are_named_in_one_message(self, tmp_path):
        """Issue 33: a missing listed file is one more bad file of the scan, not an error of its own before it (which
        left the damaged files for a second round); the whole check names the bad files of both lists at once."""
        root = _write_pascal(tmp_path / "voc")
        images, labels = root / "JPEGImages", root / "SegmentationClassAug"
        (images / "v1.jpg").unlink()
        (labels / "v3.png").unlink()
        (images / "v2.jpg").write_bytes((images / "v2.jpg").read_bytes()[:3000])
        Image.fromarray(_label((2, 0, 0, 50, 50), (50, 60, 60, 5, 5))).save(labels / "v4.png")
        Image.fromarray(_label((1, 0, 0, 50, 50), shape=(80, 70))).save(labels / "e_dup.png")
        with pytest.raises(data.DatasetFileError) as err:
            data.build_dataset("pascal", "test", 0, img_size=64, root=root)
        lines = str(err.value).splitlines()
        assert lines[0] == f"5 bad file(s) in the PASCAL test list of {root}; fix or remove them (and their list " \
                           "entries):"
        assert lines[1] == f"  {labels / 'e_dup.png'}: 70x80 pixels, its image {images / 'e_dup.jpg'} 80x80"
        assert lines[2] == f"  {images / 'v1.jpg'}: no such file (its list names it)"
        assert lines[3].startswith(f"  {images / 'v2.jpg'}: not a readable image (image file is truncated")
        assert lines[4:] == [f"  {labels / 'v3.png'}: no such file (its list names it)",
                             f"  {labels / 'v4.png'}: class id 50; ids are 1..20 (0 background, 255 ignore)"]
        (images / "a_voc.jpg").unlink()  # and a training file: train.py's check names both lists' in one message
        args, _ = train.parse_args(["--model", "baseline", "--data-root", str(root), "--out", str(tmp_path / "run")])
        with pytest.raises(data.DatasetFileError) as err:
            train.check_data(args, ("train", "test"))
        lines = str(err.value).splitlines()
        assert lines[0].startswith("1 bad file(s) in the PASCAL train list") and len(lines) == 8
        assert lines[1] == f"  {images / 'a_voc.jpg'}: no such file (its list names it)"
        assert lines[2].startswith("5 bad file(s) in the PASCAL test list")

    def test_no_writable_cache_place_is_one_note_and_the_run_goes_on(self, tmp_path, monkeypatch, capsys):
        """Issue 33: a read-only data root and a read-only home stopped the run with a 27-line OSError traceback; a
        cache that cannot be written stops nothing (one note, every run scans again). COCO's labels, which training
        needs, stop it in one line naming both places, unless they were written there before."""
        root, home = _write_pascal(tmp_path / "voc"), tmp_path / "home"
        home.mkdir()
        monkeypatch.setattr(Path, "home", lambda: home)
        coco = _write_coco(tmp_path / "coco")
        data.build_dataset("coco", "train", 0, img_size=64, root=coco)  # its labels written while it could be
        shutil.rmtree(coco / ".fss_cache")
        _read_only(monkeypatch, root, coco, home)
        decoded = _count_decodes(monkeypatch)
        capsys.readouterr()
        for split in ("test", "train", "test"):
            ds = data.build_dataset("pascal", split, 0, img_size=64, root=root)
            assert ds[0]["img_q"].shape == (3, 64, 64)
        assert len(decoded) == 5 + 5 + 5  # nothing cached: each build scans (5 test, 5 training images)
        places, captured = data._cache_places(root), capsys.readouterr()
        assert [line for line in captured.err.splitlines() if "cache" in line] == [  # once a process
            f"[data] note: neither {places[0]} nor {places[1]} can be written: the files are checked again on every "
            "run (nothing is cached)"]
        assert captured.out.splitlines()[0] == "[data] checking and scanning PASCAL test files: 5 files"  # not cached
        assert not places[0].exists() and not places[1].exists()
        # COCO: the labels written before are read where they are; with none there, one line names both places
        ds = data.build_dataset("coco", "train", 0, img_size=64, root=coco)
        stem = "COCO_train2014_000000000002"
        assert ds.files[stem] == (coco / "train2014" / f"{stem}.jpg", coco / "labels" / "train2014" / f"{stem}.png")
        shutil.rmtree(coco / "labels" / "val2014", ignore_errors=True)
        labels, home_labels = coco / "labels" / "val2014", data._cache_places(coco)[1] / "labels" / "val2014"
        with pytest.raises(data.DatasetFileError) as err:
            data.build_dataset("coco", "test", 0, img_size=64, root=coco)
        assert str(err.value) == (f"cannot write the COCO val2014 labels: neither {labels} nor {home_labels} can be "
                                  "written (they are needed: make one of them writable, and run again)")

    def test_coco_labels_that_cannot_be_written_stop_the_run_with_one_line(self, tmp_path, monkeypatch):
        root = _write_coco(tmp_path / "coco")
        monkeypatch.setattr(data, "PARALLEL_MIN_FILES", 1)  # the error comes back from the process pool
        monkeypatch.setattr(Image.Image, "save", lambda self, fp, *args, **kwargs: _full_disk(fp))
        label_dir = root / "labels" / "train2014"
        with pytest.raises(data.DatasetFileError) as err:
            data.build_dataset("coco", "train", 0, img_size=64, root=root)
        assert str(err.value) == (f"cannot write the COCO train2014 labels in {label_dir}: No space left on device "
                                  "(they are needed: free space there, or make it writable, and run again)")
        assert sorted(p.name for p in label_dir.iterdir()) == [data.COCO_LABEL_STAMP]  # no temporary, no label
        assert not list(root.rglob("*.tmp*"))

    def test_the_scan_decodes_every_image_once_and_names_a_truncated_one(self, tmp_path, monkeypatch):
        decoded = _count_decodes(monkeypatch)
        root = _write_pascal(tmp_path / "voc")
        data.build_dataset("pascal", "test", 0, img_size=64, root=root)  # an intact tree passes
        assert sorted(decoded) == ["e_dup.jpg", "v1.jpg", "v2.jpg", "v3.jpg", "v4.jpg"]
        data.build_dataset("pascal", "test", 0, img_size=64, root=root)  # cached: no image is decoded again
        assert len(decoded) == 5
        cache = root / ".fss_cache" / "pascal_test_counts.json"
        written = json.loads(cache.read_text())
        cache.write_text(json.dumps({**written, "key": [2, *written["key"][1:]]}))  # a cache of the header-only rule
        data.build_dataset("pascal", "test", 0, img_size=64, root=root)
        assert len(decoded) == 10  # scanned again
        for jpeg in (root / "JPEGImages" / "v2.jpg", root / "JPEGImages" / "v4.jpg"):  # real JPEGs, header intact
            assert len(jpeg.read_bytes()) > 4000
            jpeg.write_bytes(jpeg.read_bytes()[:3000])
        cache.unlink()
        with pytest.raises(data.DatasetFileError) as err:  # at the dataset's build, before any training
            data.build_dataset("pascal", "test", 0, img_size=64, root=root)
        lines = str(err.value).splitlines()
        assert lines[0].startswith("2 bad file(s) in the PASCAL test list") and len(lines) == 3
        for line, name in zip(lines[1:], ("v2.jpg", "v4.jpg")):
            assert line.startswith(f"  {root / 'JPEGImages' / name}: not a readable image (image file is truncated")
        assert not cache.exists()
        folder = _write_folder(tmp_path / "mine")  # the folder dataset's scan likewise
        jpeg = folder / "images" / "cup_1.jpg"
        jpeg.write_bytes(jpeg.read_bytes()[:3000])
        with pytest.raises(data.DatasetFileError, match=rf"^1 bad file\(s\) in the folder dataset .*\n  {jpeg}: not a "
                           r"readable image \(image file is truncated"):
            data.build_dataset("folder", "train", 1, img_size=48, root=folder)

    def test_a_file_that_fails_to_decode_later_is_named(self, tmp_path):
        root = _write_pascal(tmp_path / "voc")
        ds = data.build_dataset("pascal", "test", 0, img_size=64, root=root)  # scanned whole, and cached
        jpeg = root / "JPEGImages" / "v1.jpg"
        jpeg.write_bytes(jpeg.read_bytes()[:2000])  # cut after the scan: the header is intact, the pixels are cut off
        index = next(i for i in range(len(ds.images)) if ds._query(i, 0) == "v1")
        with pytest.raises(data.DatasetFileError, match="cannot read image .*v1.jpg"):
            ds[index]
        rgb_label = tmp_path / "rgb.png"
        Image.new("RGB", (8, 8)).save(rgb_label)
        with pytest.raises(data.DatasetFileError, match="rgb.png"):
            data.load_mask(rgb_label)

    def test_each_test_seed_visits_every_image_in_its_own_order(self, tmp_path, capsys):
        ds = data.build_dataset("pascal", "test", 0, img_size=32, root=_write_pascal_val(tmp_path, 20), episodes=30)
        n = len(ds.images)
        assert n == 20
        orders = [[ds._query(i, seed) for i in range(n)] for seed in (0, 1)]
        assert sorted(orders[0]) == sorted(orders[1]) == ds.images  # one pass: every image once
        assert orders[0] != orders[1] and orders[0] != ds.images  # not the sorted list, and not shared by the seeds
        assert len(set(orders[0][:5]) | set(orders[1][:5])) > 5  # two seeds of 5 episodes see more than one seed
        assert [ds._query(n + i, 0) for i in range(n)] != orders[0]  # the second pass has its own order
        assert ds[(1, 3)]["m_q_orig"].sum() > 0 and ds._query(3, 1) == orders[1][3]

        def episodes(workers, batch):
            sampler = data.EpisodeSampler(len(ds))
            sampler.set_stream(1)
            loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                                collate_fn=data.collate_episodes)
            return [(int(i), int(c), m.tolist()) for b in loader for i, c, m in
                    zip(b["index"], b["class_id"], b["m_q_orig"])]

        assert episodes(0, 1) == episodes(2, 4)  # a function of (seed, index): no worker or batch dependence
        train_ds = data.build_dataset("pascal", "train", 0, img_size=32, root=tmp_path)
        assert train_ds._query(0, 5) == train_ds.images[0]  # training: the sampler shuffles, the index names it

    # ---------------- COCO ------------------------------------------------------------------------------------

    def test_rle_decode_known_and_random_masks(self):
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

    # pycocotools' rule (data.polygon_to_mask): vertices snap to a 1/5-pixel ("fine") grid, X = int(5x + 0.5); edges
    # are walked on it; the walk cuts column c where it steps from fine x 5c+2 to 5c+3, at the upper fine y V of the
    # two, and a cut toggles rows r >= ceil((V - 2) / 5). Every mask below worked out by hand was also checked against
    # pycocotools 2.0.11 (its wheel in a scratch venv outside this repository), which gives the same.

    def test_polygon_rectangles_by_hand(self):
        # x 1.25..4.5, y 0.5..3.75 -> fine x 6..23 (int(6.75), int(23.0)), y 3..19 (int(3.0), int(19.25)). Only the
        # horizontal edges cut: columns with 6 <= 5c+2 and 5c+3 <= 23 (c = 1..4), at V = 3 (rows >= 1 on) and V = 19
        # (rows >= 4 off): rows 1..3. The top edge runs through row 0's centres (y 0.5) and leaves them out, the right
        # edge through column 4's (x 4.5) and keeps them.
        expected = np.zeros((5, 6), int)
        expected[1:4, 1:5] = 1
        rectangle = [1.25, 0.5, 4.5, 0.5, 4.5, 3.75, 1.25, 3.75]
        assert np.array_equal(_polygon_mask(rectangle, 5, 6), expected)  # Pillow's fill: 16 pixels, not 12
        reversed_order = [1.25, 3.75, 4.5, 3.75, 4.5, 0.5, 1.25, 0.5]  # the other direction, another first vertex
        assert np.array_equal(_polygon_mask(reversed_order, 5, 6), expected)
        # integer corners (on pixel boundaries, between centres): exactly the rectangle's 3 x 2 pixels
        expected = np.zeros((5, 6), int)
        expected[1:3, 1:4] = 1
        assert np.array_equal(_polygon_mask([1, 1, 4, 1, 4, 3, 1, 3], 5, 6), expected)

    def test_polygon_thin_triangle_by_hand(self):
        # (1,1), (7.2,2), (1,1.6): exact area 1.86. Fine (5,5), (36,10), (5,8). Upper edge: fine y = int(5 + 5t/31 +
        # 0.5) at fine x 5+t; lower edge, walked from its left end (5,8): int(8 + 2t/31 + 0.5); the vertical edge cuts
        # nothing. Columns 1..6 (fine x 7|8 ... 32|33): upper cuts V = 5 6 7 8 9 9, lower cuts 8 8 9 9 9 10. Row 1's
        # centre (fine 7.5) lies between the two in columns 1..3 only; row 0's (2.5) is above both, row 2's (12.5)
        # below.
        expected = np.zeros((3, 8), int)
        expected[1, 1:4] = 1
        assert np.array_equal(_polygon_mask([1, 1, 7.2, 2, 1, 1.6], 3, 8), expected)  # Pillow's fill: 12 pixels

    def test_polygon_at_and_across_the_image_border(self):
        # (-1.25,-1.25), (5.75,-1.25), (-1.25,5.75) -> fine (-5,-5) (C's cast: int(-5.75) = -5), (29,-5), (-5,29). The
        # top edge cuts every column above the image (V = -5): toggles from row 0. The hypotenuse, walked from (-5,29)
        # with slope -1: fine y = int(29.5 - (x + 5)) = 24 - x, so column c is cut at V = 24 - (5c+3) = 21 - 5c and
        # rows >= ceil((19 - 5c) / 5) = 4 - c are off again: column c holds rows 0..3-c.
        expected = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
        assert np.array_equal(_polygon_mask([-1.25, -1.25, 5.75, -1.25, -1.25, 5.75], 4, 5), expected)
        touching = np.zeros((4, 5), int)
        touching[0, 3:] = 1  # x 3..5, y 0..1: the top and right borders
        touching[3, 0] = 1  # x 0..1, y 3..4: the left and bottom borders
        touching[3, 1] = 1  # x 1..2, y 2.5..10: row 2's centres on the top edge are out, the cut at fine y 50 is below
        assert np.array_equal(data.segmentation_to_mask(
            [[3, 0, 5, 0, 5, 1, 3, 1], [0, 3, 1, 3, 1, 4, 0, 4], [1, 2.5, 2, 2.5, 2, 10, 1, 10]], 4, 5), touching)
        assert not data.segmentation_to_mask([[-3, -3, -1, -3, -1, -1], [6, 1, 9, 1, 9, 3]], 4, 5).any()  # outside
        # pycocotools' mask of a triangle over three borders: -0.2 snaps to fine 0 (int(-0.5)); rounding down to -1
        # would lose pixel (row 3, column 3). Sampling the exact triangle at pixel centres would give (0,3), not (3,3).
        reference = np.array([[0, 0, 0, 0, 1, 1, 1],
                              [1, 1, 1, 1, 1, 1, 0],
                              [1, 1, 1, 1, 1, 0, 0],
                              [1, 1, 1, 1, 0, 0, 0],
                              [1, 1, 0, 0, 0, 0, 0]])
        assert np.array_equal(_polygon_mask([-0.2, 6.5, 7.7, -0.1, -1.4, 1.1], 5, 7), reference)

    def test_polygon_self_intersecting_and_united_parts(self):
        # pycocotools' mask of a bow tie whose edges run through pixel centres (even-odd rule; the crossing at
        # (3.5,2.5))
        reference = np.array([[0, 0, 0, 0, 0, 0, 0],
                              [0, 1, 0, 0, 0, 1, 1],
                              [0, 1, 1, 1, 1, 1, 1],
                              [0, 1, 0, 0, 0, 1, 1],
                              [0, 0, 0, 0, 0, 0, 0]])
        assert np.array_equal(_polygon_mask([0.5, 0.5, 6.5, 4.5, 6.5, 0.5, 0.5, 4.5], 5, 7), reference)
        # the parts of one annotation are united (frPyObjects + merge), overlap included; < 3 points enclose nothing
        parts = [[0, 0, 3, 0, 3, 2, 0, 2], [2, 1, 5, 1, 5, 3, 2, 3], [1, 1, 4, 3], [0, 0, 5, 4, 2]]
        expected = np.zeros((4, 6), int)
        expected[0:2, 0:3] = 1
        expected[1:3, 2:5] = 1
        assert np.array_equal(data.segmentation_to_mask(parts, 4, 6).astype(int), expected)

    def test_polygon_area_unbiased_on_random_convex_polygons(self):
        """Rasterised minus exact (shoelace) area over 100 random convex polygons (perimeter ~46 px): one polygon's
        error has an sd of ~2 px, so their mean one of ~0.2 px. Pillow's fill, outline included, adds ~16 px on
        average, to every one of them."""
        rng = np.random.default_rng(0)
        errors = []
        for _ in range(100):
            angles = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 12)))
            xy = rng.uniform(16, 24, 2) + rng.uniform(2, 14) * np.stack([np.cos(angles), np.sin(angles)], 1)  # (k,2)
            x, y = xy.T
            area = 0.5 * abs(x @ np.roll(y, -1) - y @ np.roll(x, -1))
            errors.append(data.segmentation_to_mask([xy.ravel().tolist()], 40, 40).sum() - area)
        errors = np.array(errors)
        assert abs(errors.mean()) < 1.0
        assert 0.3 < (errors > 0).mean() < 0.7  # errors of both signs

    def test_coco_labels_of_an_older_rule_or_annotation_file_are_rewritten_once(self, tmp_path, capsys):
        root = _write_coco(tmp_path / "coco")
        labels, name = root / "labels" / "train2014", "COCO_train2014_000000000001"
        stamp, ann = labels / data.COCO_LABEL_STAMP, root / "annotations" / "instances_train2014.json"
        assert data.build_dataset("coco", "train", 3, img_size=64, root=root).counts[name] == {2: 2500}
        assert "rewriting" not in capsys.readouterr().err
        assert stamp.read_text() == f"{data.COCO_LABEL_VERSION}\n{ann.stat().st_size} {ann.stat().st_mtime_ns}\n"
        # the folder as the Pillow fill left it: no stamp, a fat 51 x 51 label, its counts cached under the old key
        fat = np.zeros((80, 80), np.uint8)
        fat[10:61, 10:61] = 2
        Image.fromarray(fat).save(labels / f"{name}.png")
        stamp.unlink()
        cache = root / ".fss_cache" / "coco_train_counts.json"
        payload = json.loads(cache.read_text())["payload"]
        payload["counts"][name] = {"2": 2601}
        old_key = [data.CACHE_VERSION, (root / "annotations" / "instances_train2014.json").stat().st_size, str(labels)]
        cache.write_text(json.dumps({"key": old_key, "payload": payload}))
        assert data.build_dataset("coco", "train", 3, img_size=64, root=root).counts[name] == {2: 2500}
        notes = [line for line in capsys.readouterr().err.splitlines() if "rewriting" in line]
        assert len(notes) == 1 and "train2014" in notes[0] and f"version 1, now {data.COCO_LABEL_VERSION}" in notes[0]
        assert (np.array(Image.open(labels / f"{name}.png")) == 2).sum() == 2500
        assert stamp.read_text().splitlines()[0] == str(data.COCO_LABEL_VERSION)
        # stamped: a label present is kept as it is (written once), even when the counts are scanned again; a stamp
        # of the version alone (written before the stamp recorded the annotation file) is current, and completed
        Image.fromarray(fat).save(labels / f"{name}.png")
        cache.unlink()
        stamp.write_text(f"{data.COCO_LABEL_VERSION}\n")
        assert data.build_dataset("coco", "train", 3, img_size=64, root=root).counts[name] == {2: 2601}
        assert "rewriting" not in capsys.readouterr().err and len(stamp.read_text().splitlines()) == 2
        # the annotation file edited (the square 10 pixels to the right, the file's size unchanged): rewritten once
        coco = json.loads(ann.read_text())
        coco["annotations"][0]["segmentation"] = [[20, 10, 70, 10, 70, 60, 20, 60]]
        ann.write_text(json.dumps(coco))
        _edited_later(ann)
        for _ in range(2):
            assert data.build_dataset("coco", "train", 3, img_size=64, root=root).counts[name] == {2: 2500}
        notes = [line for line in capsys.readouterr().err.splitlines() if "rewriting" in line]
        assert notes == [f"[data] note: rewriting the COCO train2014 labels in {labels}: instances_train2014.json has "
                         "changed since they were rasterised from it (its size or modification time)"]
        assert (np.array(Image.open(labels / f"{name}.png"))[10:60, 20:70] == 2).all()

    def test_coco_labels_current_in_a_read_only_root_are_read_there(self, tmp_path, monkeypatch):
        """A read-only COCO root whose labels are current (their stamp: this label version, this annotation file) is
        read where it is, though the home folder could take new labels: COCO's ~120k are not rasterised again there.
        Labels of an annotation file since changed are written under the home folder."""
        root, home = _write_coco(tmp_path / "coco"), tmp_path / "home"
        home.mkdir()
        monkeypatch.setattr(Path, "home", lambda: home)
        data.build_dataset("coco", "train", 0, img_size=64, root=root)
        stem, ann = "COCO_train2014_000000000001", root / "annotations" / "instances_train2014.json"
        _read_only(monkeypatch, root)
        rasterise = data.segmentation_to_mask
        monkeypatch.setattr(data, "segmentation_to_mask", lambda *args: 1 / 0)  # nothing is rasterised
        ds = data.build_dataset("coco", "train", 0, img_size=64, root=root)
        assert ds.files[stem][1] == root / "labels" / "train2014" / f"{stem}.png" and ds.counts[stem] == {2: 2500}
        home_labels = data._cache_places(root)[1] / "labels" / "train2014"
        assert not home_labels.exists()
        monkeypatch.setattr(data, "segmentation_to_mask", rasterise)
        _edited_later(ann)  # as an edit: the labels of the root are stale now
        ds = data.build_dataset("coco", "train", 0, img_size=64, root=root)
        assert ds.files[stem][1] == home_labels / f"{stem}.png" and ds.counts[stem] == {2: 2500}
        assert (home_labels / f"{stem}.png").is_file()

    def test_damaged_annotations_list_and_cache_files_are_one_line_or_rescanned(self, tmp_path):
        # a cut-short COCO annotation file and a list file that is not UTF-8: one line each, not a traceback;
        # a cache file that is JSON of another shape is scanned again
        root = _write_coco(tmp_path / "coco")
        ann = root / "annotations" / "instances_train2014.json"
        ann.write_bytes(ann.read_bytes()[:50])
        with pytest.raises(data.DatasetFileError, match=r"instances_train2014.json: not a whole COCO annotation"):
            data.build_dataset("coco", "train", 0, img_size=64, root=root)
        voc = _write_pascal(tmp_path / "voc")
        lists = voc / "ImageSets" / "Segmentation"
        data.build_dataset("pascal", "train", 0, img_size=64, root=voc)
        for cache in (voc / ".fss_cache").iterdir():
            cache.write_text("[]")  # JSON, not a cache
        assert len(data.build_dataset("pascal", "train", 0, img_size=64, root=voc)) > 0
        (lists / "val.txt").write_bytes(b"\xff\xfe2007_000001\n")
        with pytest.raises(data.DatasetFileError, match=r"\ufffd\ufffd2007_000001.jpg: no such file \(its list names"):
            data.build_dataset("pascal", "test", 0, img_size=64, root=voc)  # the bytes shown, the line named

    def test_coco_labels_category_map_and_folds(self, tmp_path, monkeypatch):
        root = _write_coco(tmp_path / "coco")
        train = data.build_dataset("coco", "train", 3, img_size=64, root=root)  # fold 3 tests 4, 8, ...
        names = [f"COCO_train2014_{i:012d}" for i in (1, 2)]
        assert train.class_names == {1: "person", 2: "car", 3: "toothbrush"}  # ids 1, 3, 90 -> 1, 2, 3
        assert train.images == names  # the image without annotations is not listed
        assert train.class_files[1] == [names[1]] and train.class_files[2] == [names[0]]
        assert train.class_files[3] == [names[1]]
        assert not (root / "labels" / "train2014" / "COCO_train2014_000000000003.png").exists()
        label1 = np.array(Image.open(root / "labels" / "train2014" / f"{names[0]}.png"))
        assert (label1[10:60, 10:60] == 2).all() and (label1 == 2).sum() == 2500  # integer corners: exactly 50 x 50
        label2 = np.array(Image.open(root / "labels" / "train2014" / f"{names[1]}.png"))
        assert label2.shape == (80, 90) and (label2[:30, :30] == 3).all()  # crowd RLE
        assert (label2[30:79, 30:89] == 1).all() and (label2 == 1).sum() == 49 * 59  # the later polygon wins
        assert (label2[79] == 0).all() and (label2[:, 89] == 0).all() and (label2[65:, :20] == 0).all()
        _assert_episode(train[0], 1, 64, test=False)

        val_names = [f"COCO_val2014_{i:012d}" for i in (1, 2)]
        assert data.build_dataset("coco", "test", 0, img_size=64, root=root).images == [val_names[1]]  # class 1
        monkeypatch.setattr(data, "_write_and_scan_coco_label", lambda job: 1 / 0)  # val2014 is cached now
        assert data.build_dataset("coco", "test", 1, img_size=64, root=root).images == [val_names[0]]  # class 2
        contiguous = data.build_dataset("coco", "test", 0, img_size=64, root=root, coco_split="contiguous")
        assert contiguous.images == val_names and contiguous.classes == list(range(1, 21))
        ep = contiguous[1]
        _assert_episode(ep, 1, 64, test=True)
        assert ep["m_q_orig"].shape == (80, 90)

    def test_train_transform_keeps_image_and_mask_aligned(self):
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

    def test_gaussian_blur_is_cv2s_5x5_with_sigma_0(self):
        assert [16 * t for t in data.BLUR_TAPS] == [1, 4, 6, 4, 1]  # cv2.getGaussianKernel(5, 0), its fixed table
        torch.manual_seed(0)
        taps = torch.tensor(data.BLUR_TAPS)
        for shape in [(3, 41, 57), (3, 5, 6)]:  # 5x6: reflect padding reaches across the whole image
            img = torch.rand(*shape)
            padded = F.pad(img[None], [2, 2, 2, 2], mode="reflect")  # cv2's BORDER_REFLECT_101: e.g. row -1 = row 1
            reference = F.conv2d(padded, torch.outer(taps, taps).expand(3, 1, 5, 5), groups=3)[0]  # one 5x5 pass
            assert torch.allclose(data.gaussian_blur(img), reference, atol=1e-6)
        img = torch.zeros(1, 9, 9)
        img[0, 4, 4] = 1  # an impulse gives the 5x5 kernel back around it: (6/16)^2 at the centre, (1/16)^2 at corners
        out = data.gaussian_blur(img)[0]
        assert out[4, 4] == pytest.approx(36 / 256) and out[2, 2] == pytest.approx(1 / 256)
        assert out[2, 4] == pytest.approx(6 / 256) and out[1].abs().max() == 0
        flat = torch.full((3, 9, 9), 0.25)
        assert torch.allclose(data.gaussian_blur(flat), flat)  # the kernel sums to 1

    def test_rotate_quarter_turn_identity_and_corners(self):
        g = torch.Generator().manual_seed(0)
        img, label = torch.rand(3, 6, 6, generator=g), torch.randint(0, 3, (6, 6), generator=g)
        out, out_label = data.rotate(img, label, 90.0)  # counter-clockwise, as cv2 and torchvision
        assert torch.allclose(out, torch.rot90(img, 1, (-2, -1)), atol=1e-6)
        assert torch.equal(out_label, torch.rot90(label, 1, (-2, -1)))
        out, out_label = data.rotate(img, label, 0.0)
        assert torch.allclose(out, img, atol=1e-6) and torch.equal(out_label, label)
        out, out_label = data.rotate(img, label, 45.0)  # the corners come from outside the image
        assert torch.allclose(out[:, 0, 0], torch.tensor(data.MEAN)) and out_label[0, 0] == IGNORE_INDEX

    def test_rotate_matches_torchvision_and_blends_the_border_as_cv2(self):
        g = torch.Generator().manual_seed(1)
        img, label = torch.rand(3, 41, 57, generator=g), torch.randint(0, 3, (41, 57), generator=g)
        fill = torch.tensor(data.MEAN)[:, None, None]
        for angle in (7.3, -9.6):
            out, out_label = data.rotate(img, label, angle)
            # sum_inside(w x) + (1 - sum_inside w) fill: torchvision's rotate without fill, of x - fill, plus fill
            shifted = TF.rotate(tv_tensors.Image(img - fill), angle,
                                InterpolationMode.BILINEAR).as_subclass(torch.Tensor)
            assert torch.allclose(out, shifted + fill, atol=1e-4)
            reference = TF.rotate(tv_tensors.Mask(label[None]), angle, fill=IGNORE_INDEX)[0].as_subclass(torch.Tensor)
            assert (out_label != reference).float().mean() < 0.002  # ties at exactly half a pixel may round apart
            inside = TF.rotate(tv_tensors.Image(torch.ones(1, 41, 57)), angle, InterpolationMode.BILINEAR)[0] > 1 - 1e-6
            with_fill = TF.rotate(tv_tensors.Image(img), angle, InterpolationMode.BILINEAR, fill=data.MEAN)
            assert torch.allclose(out[:, inside], with_fill[:, inside], atol=1e-4)  # the interior is torchvision's

    def test_train_crop_keeps_foreground(self):
        for seed in range(10):
            rng = np.random.default_rng(seed)
            mask = torch.zeros(200, 200, dtype=torch.long)
            top, left = rng.integers(0, 160, 2)
            mask[top:top + 40, left:left + 40] = 1
            _, m = data.train_transform(_colour_coded(mask), mask, rng, 96, (1.0, 1.0))
            assert (m == 1).sum() >= 0.8 * 1600

    def test_test_geometry_round_trip(self):
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
        # padding: ignore label, the mean colour rounded to 8 bits (124, 116, 104), normalised: ~0, not 0
        pad = (torch.tensor([124.0, 116.0, 104.0]) / 255 - torch.tensor(data.MEAN)) / torch.tensor(data.STD)
        assert (m[h:] == 255).all() and torch.allclose(img[:, h:], pad[:, None, None].expand(3, 96 - h, 96), atol=1e-6)
        assert pad.abs().max() < 0.5 / 255 / min(data.STD)
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

    def test_eval_episodes_identical_for_any_worker_count(self):
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

    def test_augmentation_rounds_to_8_bits_once_and_equals_the_float_steps(self):
        """train_transform = the float steps, rounded to 8 bits, normalised: to the bit, compact or not, with the same
        random draws (its crop window alone is rounded, mirrored and pasted); within 0.5/255/std of the float image.
        The sizes pad both sides, pad one and crop the other, crop both, or either; 48 seeds draw every step."""
        half_level = 0.5 / 255 / torch.tensor(data.STD)[:, None, None] + 1e-6
        for seed in range(48):
            (h, w), size = [((90, 70), 96), ((60, 120), 80), ((130, 150), 64), ((75, 75), 75)][seed % 4]
            recipe = ("pfenet", "crop-scale-flip")[seed % 5 == 4]
            img, mask = _photo(h, w, seed)
            draws = [np.random.default_rng(seed) for _ in range(3)]
            image, label = _float_train_transform(img, mask, draws[0], size, (0.8, 1.25), recipe)
            rounded = (image * 255).round().clamp(0, 255).to(torch.uint8)
            out, m = data.train_transform(img, mask, draws[1], size, (0.8, 1.25), recipe)
            small, small_m = data.train_transform(img, mask.to(torch.uint8), draws[2], size, (0.8, 1.25), recipe,
                                                  compact=True)
            assert small.dtype == small_m.dtype == torch.uint8 and out.dtype == torch.float32 and m.dtype == torch.int64
            assert torch.equal(small, rounded) and torch.equal(small_m, label.to(torch.uint8))
            assert torch.equal(out, data.normalize(rounded)) and torch.equal(m, label)
            assert ((out - _old_normalise(image)).abs() <= half_level).all()
            assert len({rng.random() for rng in draws}) == 1  # the same number of draws

    def test_test_transform_rounds_to_8_bits_and_pads_with_the_rounded_mean(self):
        half_level = 0.5 / 255 / torch.tensor(data.STD)[:, None, None] + 1e-6
        for (h0, w0), size in (((75, 130), 96), ((130, 75), 64), ((40, 50), 96)):
            img, mask = _photo(h0, w0, h0)
            h, w = data.test_content_size(h0, w0, size)
            image = TF.resize(img.float() / 255, [h, w], antialias=True)  # (3,h,w): the float resize
            expected = torch.tensor([124, 116, 104], dtype=torch.uint8)[:, None, None].repeat(1, size, size)
            expected[:, :h, :w] = (image * 255).round().clamp(0, 255).to(torch.uint8)
            label = TF.pad(TF.resize(tv_tensors.Mask(mask[None]), [h, w]), [0, 0, size - w, size - h], fill=255)[0]
            out, m = data.test_transform(img, mask, size)
            small, small_m = data.test_transform(img, mask, size, compact=True)
            assert torch.equal(small, expected) and torch.equal(small_m, label.to(torch.uint8))
            assert torch.equal(out, data.normalize(expected)) and torch.equal(m, label) and m.dtype == torch.int64
            old = F.pad(_old_normalise(image), [0, size - w, 0, size - h])  # the float image, padded with 0
            assert ((out - old).abs() <= half_level).all()
            assert data.test_transform(img, None, size)[1] is None

    def test_normalize_is_a_float32_multiply_and_add_and_to_device_makes_the_default_batch(self):
        levels = torch.arange(256, dtype=torch.uint8).repeat(2, 3, 2, 1)  # (2,3,2,256): every level in every channel
        mean, std = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in (data.MEAN, data.STD))
        out = data.normalize(levels)
        scale, shift = (t.float() for t in (1 / (255 * std), -mean / std))  # float64, rounded once
        assert out.dtype == torch.float32 and torch.equal(out, levels.float() * scale + shift)
        assert (out.double() - (levels.double() / 255 - mean) / std).abs().max() < 1e-6
        g = torch.Generator().manual_seed(0)
        compact = {"img_q": torch.randint(0, 256, (2, 3, 4, 5), generator=g).to(torch.uint8),
                   "img_s": torch.randint(0, 256, (2, 2, 3, 4, 5), generator=g).to(torch.uint8),
                   "m_q": torch.tensor([0, 1, 255]).repeat(2, 4, 2)[..., :5].to(torch.uint8),
                   "m_s": torch.full((2, 2, 4, 5), 255, dtype=torch.uint8), "class_id": torch.tensor([3, 7]),
                   "m_q_orig": [torch.ones(3, 2, dtype=torch.uint8), torch.zeros(4, 6, dtype=torch.uint8)], "name": "x"}
        batch = data.to_device(compact, torch.device("cpu"))
        assert torch.equal(batch["img_q"], data.normalize(compact["img_q"])) and batch["img_s"].shape == (2, 2, 3, 4, 5)
        assert torch.equal(batch["img_s"][1, 0], data.normalize(compact["img_s"][1, 0]))
        for key in ("m_q", "m_s"):
            assert batch[key].dtype == torch.int64 and torch.equal(batch[key], compact[key].long())
        assert [m.dtype for m in batch["m_q_orig"]] == [torch.int64] * 2 and batch["m_q_orig"][1].shape == (4, 6)
        assert torch.equal(batch["class_id"], compact["class_id"]) and batch["name"] == "x"
        again = data.to_device(batch, torch.device("cpu"))  # a default batch stays as it is
        assert all(torch.equal(again[k], batch[k]) for k in ("img_q", "img_s", "m_q", "m_s", "class_id"))

    def test_compact_batches_from_workers_are_the_in_process_episodes(self, tmp_path):
        """What the models receive: compact batches from 2 DataLoader workers (data.make_loader, no pinning on the
        CPU) through data.to_device equal the default episodes made in this process, for PASCAL train (padding and
        crops) and test episodes and synthetic ones; the batches cross as uint8, a fifth of the default's bytes."""
        root = _write_pascal(tmp_path / "voc")
        for ds in (data.build_dataset("pascal", "train", 0, shot=2, img_size=76, root=root, train_length=8),
                   data.build_dataset("pascal", "test", 0, img_size=64, root=root, episodes=6),
                   data.build_dataset("synthetic", "train", 1, shot=2, img_size=48, train_length=6),
                   data.build_dataset("synthetic", "test", 1, img_size=48, episodes=4)):
            expected = [data.collate_episodes([ds[(3, i)] for i in range(b, min(b + 2, len(ds)))])
                        for b in range(0, len(ds), 2)]
            sampler = data.EpisodeSampler(len(ds))
            sampler.set_stream(3)
            loader = data.make_loader(ds, sampler, 2, 2, torch.device("cpu"), drop_last=False,
                                      worker_init_fn=train.ignore_stop_signals)  # as train.py's
            assert ds.compact and not loader.pin_memory and loader.num_workers == 2
            batches = list(loader)
            assert len(batches) == len(expected)
            for batch, want in zip(batches, expected):
                assert batch["img_q"].dtype == batch["img_s"].dtype == batch["m_q"].dtype == torch.uint8
                size = sum(t.nbytes for k in ("img_q", "img_s", "m_q", "m_s") for t in [batch[k]])
                assert 5 * size == sum(want[k].nbytes for k in ("img_q", "img_s", "m_q", "m_s"))
                got = data.to_device(batch, torch.device("cpu"))
                assert got.keys() == want.keys()
                for key, value in want.items():
                    if key == "m_q_orig":
                        assert all(torch.equal(a, b) and a.dtype == torch.int64 for a, b in zip(got[key], value))
                    else:
                        assert torch.equal(got[key], value) and got[key].dtype == value.dtype, key

    # ---------------- box supports (weak supervision, CRCNet's Table 5) ---------------------------------------

    def test_mask_to_boxes_by_hand(self):
        mask = torch.zeros(8, 10, dtype=torch.long)
        mask[1, 1:4] = 1  # an L-shaped object ...
        mask[2:4, 1] = 1
        mask[4, 2] = 1  # ... with a diagonal neighbour (8-connected, same object)
        mask[6, 6:9] = 1  # a second object
        mask[7, 8] = 1
        mask[2, 2] = 255  # inside the first box: becomes 1
        mask[0, 9] = 255  # outside every box: stays 255
        expected = torch.zeros(8, 10, dtype=torch.long)
        expected[1:5, 1:4] = 1  # rows 1-4, columns 1-3
        expected[6:8, 6:9] = 1
        expected[0, 9] = 255
        assert torch.equal(data.mask_to_boxes(mask), expected)
        assert mask[2, 2] == 255  # the input is not modified
        empty = torch.full((4, 4), 255)
        empty[:2] = 0
        assert torch.equal(data.mask_to_boxes(empty), empty)

    def test_mask_to_boxes_covers_every_object_with_its_box(self):
        g = torch.Generator().manual_seed(0)
        mask = (torch.rand(40, 50, generator=g) < 0.05).long()
        mask[5:15, 5:30] = 1
        mask[30:35, 40:48] = 255
        boxes = data.mask_to_boxes(mask)
        assert ((boxes == 1) | (mask != 1)).all()  # every foreground pixel is inside a box
        assert torch.equal(boxes[boxes != 1], mask[boxes != 1])  # outside the boxes nothing changed
        # a box never grows beyond its object: a single object's box is its exact extent
        single = torch.zeros(20, 20, dtype=torch.long)
        single[3:9, 4:5] = 1
        single[8, 4:15] = 1
        assert data.mask_to_boxes(single).nonzero().amin(0).tolist() == [3, 4]
        assert data.mask_to_boxes(single).nonzero().amax(0).tolist() == [8, 14]
        assert int(data.mask_to_boxes(single).sum()) == 6 * 11

    def test_support_boxes_option_touches_supports_only(self):
        args = dict(name="synthetic", split="test", fold=0, shot=2, img_size=64, episodes=3)
        plain, boxed = data.build_dataset(**args), data.build_dataset(**args, support_boxes=True)
        assert not plain.support_boxes and boxed.support_boxes
        for i in range(3):
            a, b = plain[i], boxed[i]
            assert torch.equal(a["img_q"], b["img_q"]) and torch.equal(a["img_s"], b["img_s"])
            assert torch.equal(a["m_q"], b["m_q"]) and torch.equal(a["m_q_orig"], b["m_q_orig"])
            for k in range(2):
                assert torch.equal(b["m_s"][k], data.mask_to_boxes(a["m_s"][k]))
                assert ((b["m_s"][k] == 1) | (a["m_s"][k] != 1)).all()
            assert (b["m_s"] == 1).sum() >= (a["m_s"] == 1).sum()
        train_set = data.build_dataset("synthetic", "train", 0, img_size=64, train_length=2, support_boxes=True)
        assert train_set.support_boxes and train_set[0]["m_s"].shape == (1, 64, 64)

    def test_folder_dataset_folds_splits_and_bams_filter(self, tmp_path):
        root = _write_folder(tmp_path / "mine")
        (root / "images" / "._cat_0.jpg").write_bytes(b"macOS metadata")  # hidden files are no images
        (root / "labels" / "notes.txt").write_text("nor are other files")
        names = dict(enumerate(FOLDER_NAMES, 1))
        assert data.dataset_classes("folder", 1, root) == (6, names, [2, 5])  # folds.txt, line 2
        assert data.class_names("folder", root) == names
        assert symnet.base_classes(common.Setting(dataset="folder", fold=1, data_root=root)) == [1, 3, 4, 6]
        train_set = data.build_dataset("folder", "train", 1, img_size=48, root=root, augment="crop-scale-flip")
        test_set = data.build_dataset("folder", "test", 1, shot=3, img_size=48, root=root, episodes=5)
        # test: every image with a pixel of dog or tree, so cat_3 and car_3 for their 100-pixel patches too ...
        assert sorted(test_set.files) == sorted(_stems("dog", "tree") + ["cat_3", "car_3"])
        # ... but only those over the 2048-pixel filter are queries and supports, as in PASCAL-5i
        assert test_set.images == _stems("dog", "tree")
        assert test_set.class_files == {2: _stems("dog"), 5: _stems("tree")}
        # train: the others, none with a novel pixel (BAM's rule), each over the filter for its base class
        train_stems = sorted(_stems("cat", "car", k=range(3)) + _stems("cup", "lamp"))
        assert sorted(train_set.files) == train_set.images == train_stems and len(train_set) == 14
        for _, label_path in train_set.files.values():
            assert not set(np.unique(np.array(Image.open(label_path))).tolist()) & {2, 5}
        assert train_set.classes == [1, 3, 4, 6] and test_set.classes == [2, 5] and len(test_set) == 5
        assert train_set.num_classes == test_set.num_classes == 6 and test_set.class_names == names
        # PASCAL's pipeline: its episodes, scale range and the run's augmentation recipe
        assert type(train_set) is type(test_set) is data.ImageEpisodes
        assert train_set.scale_range == data.SCALE_RANGE["pascal"] and train_set.augment == "crop-scale-flip"
        _assert_episode(train_set[0], 1, 48, test=False)
        ep = test_set[0]
        _assert_episode(ep, 3, 48, test=True)
        assert ep["class_id"] in (2, 5) and ep["m_q_orig"].shape == (80, 80)
        # --test-classes replace the fold (whatever fold is passed)
        assert data.dataset_classes("folder", 1, root, test_classes=[6, 3]).novel == [3, 6]
        assert data.build_dataset("folder", "test", 1, img_size=48, root=root, test_classes=(6, 3)).classes == [3, 6]
        assert data.build_dataset("folder", "train", 1, img_size=48, root=root,
                                  test_classes=(3, 6)).classes == [1, 2, 4, 5]
        assert symnet.base_classes(common.Setting(dataset="folder", data_root=root,
                                                  test_classes=(3, 6))) == [1, 2, 4, 5]
        with pytest.raises(ValueError, match="folder dataset's novel classes"):
            data.dataset_classes("pascal", 0, test_classes=[3])

    def test_folder_without_classes_and_folds_numbers_its_ids_and_says_the_default_folds_once(self, tmp_path, capsys):
        root = _write_folder(tmp_path / "plain", classes_txt=False, folds_txt=None)
        assert data.dataset_classes("folder", 0, root) == (6, {c: str(c) for c in range(1, 7)}, [1, 2])
        assert [data.dataset_classes("folder", k, root).novel for k in range(4)] == [[1, 2], [3, 4], [5], [6]]
        data.build_dataset("folder", "test", 3, img_size=48, root=root)
        notes = [line for line in capsys.readouterr().err.splitlines() if "no folds.txt" in line]
        assert notes == [f"[data] note: {root} has no folds.txt: fold K tests the K-th of four contiguous quarters of "
                         "the class ids (PASCAL-5i's rule): fold 0 = 1..2, fold 1 = 3..4, fold 2 = 5, fold 3 = 6"]

    def test_folder_train_and_val_lists_split_as_pascals_and_feed_the_base_learner(self, tmp_path, monkeypatch):
        root = _write_folder(tmp_path / "listed")
        (root / "train.txt").write_text("cat_0\ncat_3\ncup_0\ndog_0\ndog_1\n")  # dog_1 is in val.txt too: a test image
        (root / "val.txt").write_text("dog_1\ndog_2\ndog_3\ntree_0\ntree_1\ntree_2.jpg\n")
        train_set = data.build_dataset("folder", "train", 1, img_size=48, root=root)
        assert sorted(train_set.files) == ["cat_0", "cat_3", "cup_0", "dog_0"]
        assert train_set.images == ["cat_0", "cup_0"]  # cat_3 (a dog patch) and dog_0 hold novel pixels: BAM drops them
        test_set = data.build_dataset("folder", "test", 1, shot=2, img_size=48, root=root)
        assert sorted(test_set.files) == ["dog_1", "dog_2", "dog_3", "tree_0", "tree_1", "tree_2"]
        assert test_set.class_files == {2: ["dog_1", "dog_2", "dog_3"], 5: ["tree_0", "tree_1", "tree_2"]}
        # the whole training list, novel pixels -> background
        images = symnet.BaseClassImages(common.Setting(dataset="folder", fold=1, img_size=80, data_root=root))
        assert images.classes == [1, 3, 4, 6] and images.names == ["cat_0", "cat_3", "cup_0", "dog_0"]
        monkeypatch.setattr(data, "train_transform", lambda img, label, *a: (img, label))  # the labels as read
        _, label = images[(0, images.names.index("cat_3"))]
        raw = torch.from_numpy(_label((1, 15, 15, 50, 50), (2, 65, 65, 10, 10))).long()
        assert torch.equal(label, torch.where(raw == 1, 1, 0))  # cat -> channel 1, the dog patch (novel) -> 0
        (root / "val.txt").write_text("dog_1\nnosuch\n")  # a missing file, named with the scan's bad files
        (root / "images" / "cup_1.jpg").write_bytes(b"not a jpeg")
        with pytest.raises(data.DatasetFileError) as err:
            data.build_dataset("folder", "test", 1, img_size=48, root=root)
        assert str(err.value).splitlines()[1:] == [f"  {root / 'images' / 'cup_1.jpg'}: not a readable image (cannot "
                                                   f"identify image file '{root / 'images' / 'cup_1.jpg'}')",
                                                   f"  {root / 'val.txt'}: nosuch has no image and no label"]

    def test_folder_scan_is_cached_and_done_again_when_a_label_changes(self, tmp_path, monkeypatch, capsys):
        root = _write_folder(tmp_path / "cached")
        first = data.build_dataset("folder", "train", 1, img_size=48, root=root)
        assert (root / ".fss_cache" / "folder_counts.json").is_file()
        assert "checking and scanning the files of" in capsys.readouterr().out

        def fail(pair, max_id=None):
            raise AssertionError("rescanned although cached")
        monkeypatch.setattr(data, "_scan_pair", fail)
        again = data.build_dataset("folder", "train", 1, img_size=48, root=root)
        assert again.counts == first.counts and again.images == first.images
        data.build_dataset("folder", "test", 1, img_size=48, root=root)  # one scan serves both splits and every fold
        data.build_dataset("folder", "train", 2, img_size=48, root=root)
        label = root / "labels" / "cat_0.png"
        Image.fromarray(_label((1, 0, 0, 60, 60))).save(label)  # the same name, edited
        os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10 ** 9))
        with pytest.raises(AssertionError, match="rescanned"):
            data.build_dataset("folder", "train", 1, img_size=48, root=root)
        monkeypatch.undo()
        assert data.build_dataset("folder", "train", 1, img_size=48, root=root).counts["cat_0"] == {1: 3600}

    @pytest.mark.parametrize("case", ["image without label", "label without image", "label of another size",
                                      "two images of one name", "id not in classes.txt", "folds.txt of 2 lines",
                                      "folds.txt with an unknown id",
                                      "test class in no image", "test class not an id", "too few for the shots",
                                      "0/255 masks", "16-bit id over 255", "empty folder", "no images folder",
                                      "train.txt alone"])
    def test_folder_bad_input_gets_one_clear_line(self, case, tmp_path, capsys):
        root = _write_folder(tmp_path / "bad")
        images, labels = root / "images", root / "labels"

        def rewrite_labels(fn):
            for path in labels.iterdir():
                Image.fromarray(fn(np.array(Image.open(path)))).save(path)

        bad = f"1 bad file(s) in the folder dataset {root}; fix or remove them (and their list entries):\n  "
        cases = {  # what is done to the folder, the flags, the message
            "image without label": (lambda: (labels / "cup_1.png").unlink(), [],
                                    f"{bad}{images / 'cup_1.jpg'}: no label {labels / 'cup_1.png'}"),
            "label without image": (lambda: (images / "cup_1.jpg").unlink(), [],
                                    f"{bad}{labels / 'cup_1.png'}: no image {images / 'cup_1'}.jpg (or .jpeg, .png)"),
            "two images of one name": (lambda: _save_jpeg(images / "cup_1.png", (80, 80)), [],
                                       f"{bad}{images / 'cup_1.png'}: a second image named cup_1 (with cup_1.jpg): "
                                       "keep one"),
            "label of another size": (
                lambda: Image.fromarray(_label((3, 0, 0, 50, 50), shape=(80, 70))).save(labels / "cup_1.png"), [],
                f"{bad}{labels / 'cup_1.png'}: 70x80 pixels, its image {images / 'cup_1.jpg'} 80x80"),
            "id not in classes.txt": (
                lambda: Image.fromarray(_label((3, 0, 0, 50, 50), (7, 60, 0, 20, 20))).save(labels / "cup_2.png"), [],
                f"the labels of {root} hold class id(s) [7], which {root / 'classes.txt'} does not name (it names 6 "
                f"classes, ids 1..6): e.g. {labels / 'cup_2.png'} holds 7"),
            "folds.txt of 2 lines": (lambda: (root / "folds.txt").write_text("1 2\n3\n"), [],
                                     f"{root / 'folds.txt'} has 2 line(s); it needs 4, line K the test class ids of "
                                     "fold K (1..6, separated by spaces or commas)"),
            "folds.txt with an unknown id": (lambda: (root / "folds.txt").write_text("1 4\n2, 9\n3\n6\n"), [],
                                             f"{root / 'folds.txt'} line 2 '2, 9': not class ids of {root} (1..6, "
                                             "separated by spaces or commas)"),
            "test class in no image": (
                lambda: (root / "classes.txt").write_text("\n".join(FOLDER_NAMES + ("bird",))),
                ["--test-classes", "2,7"],
                f"--test-classes 2,7: no label in {labels} holds test class 7 (bird): there is no image to test it on"),
            "test class not an id": (lambda: None, ["--test-classes", "3,9"],
                                     f"--test-classes 3,9: [9] are not class ids of {root} (1..6)"),
            "too few for the shots": (lambda: None, ["--fold", "1", "--shot", "4"],
                                      f"too few test images in {root} for 4-shot episodes, which need 5 images with >= "
                                      "2048 pixels of the class (the query and 4 other images as supports): class 2 "
                                      "(dog) has 4; class 5 (tree) has 4. Add images, lower --shot, or choose other "
                                      "test classes"),
            "0/255 masks": (lambda: rewrite_labels(lambda a: np.where(a > 0, 255, 0).astype(np.uint8)), [],
                            f"no label in {labels} holds a class id (1..254): every pixel is 0 or 255, and 255 means "
                            "'ignore' (write an object mask as 0/1, not 0/255)"),
            "16-bit id over 255": (  # would be dropped by the 1..254 count: named instead
                lambda: Image.fromarray(_label((3, 0, 0, 50, 50)).astype(np.uint16) * 100).save(labels / "cup_2.png"),
                [],
                f"{bad}{labels / 'cup_2.png'}: class id 300; ids are 1..254 (0 background, 255 ignore)"),
            "empty folder": (lambda: [p.unlink() for d in (images, labels) for p in d.iterdir()], [],
                             f"folder data root {root} holds no image: {images} has no .jpg, .jpeg, .png file and "
                             f"{labels} no .png\n{data.FOLDER_LAYOUT}"),
            "no images folder": (lambda: [p.unlink() for p in images.iterdir()] and images.rmdir(), [],
                                 f"folder data root {root} is missing {images}\n{data.FOLDER_LAYOUT}"),
            "train.txt alone": (lambda: (root / "train.txt").write_text("cat_0\n"), [],
                                f"{root / 'train.txt'} without {root / 'val.txt'}: give both lists, or neither\n"
                                f"{data.FOLDER_LAYOUT}"),
        }
        change, flags, message = cases[case]
        change()
        with pytest.raises(SystemExit) as err:
            _folder_eval(root, tmp_path / "run", *flags)
        assert str(err.value.code) == f"error: {message}"  # train.main's one line, no traceback
        assert "Traceback" not in capsys.readouterr().err

    # ---------------- FSS-1000 (CRCNet Tables 14, 15) ----------------------------------------------------------

    def test_fss_class_lists_are_hsnets_and_one_split(self):
        test, val = data.FSS_TEST_CLASSES, data.FSS_VAL_CLASSES
        assert len(set(test)) == len(test) == 240 and len(set(val)) == len(val) == 240 and not set(test) & set(val)
        assert list(test) == sorted(test) and list(val) == sorted(val)
        assert (test[:3], test[-1], val[:2], val[-1]) == (("abe's_flyingfish", "accordion", "american_alligator"),
                                                          "wooden_spoon", ("ab_wheel", "abacus"), "yonex_icon")
        assert {"bus", "peregine_falcon", "bamboo_slip", "banana_boat", "wandering_albatross"} <= set(test)
        names = data.class_names("fss1000")  # without a root: the training classes by their ids
        assert (len(names), names[1], names[240], names[241], names[480], names[481]) == (
            1000, "abe's_flyingfish", "wooden_spoon", "ab_wheel", "yonex_icon", "481")
        assert data.dataset_classes("fss1000").novel == data.fold_classes("fss1000", 0) == list(range(1, 241))
        assert data.split_name("fss1000", 0) == "fss1000" and data.TEST_EPISODES["fss1000"] is None
        with pytest.raises(ValueError, match="^FSS-1000 has one class split, no folds: fold 0 only"):
            data.fold_classes("fss1000", 1)

    def test_fss_splits_and_episodes_on_a_fake_tree(self, tmp_path, fss_lists, capsys):
        root = _write_fss(tmp_path / "FSS-1000")
        (root / ".fss_cache").mkdir()  # hidden folders are no class
        assert data.dataset_classes("fss1000", 0, root) == (9, dict(enumerate(FSS_TEST + FSS_VAL + FSS_TRAIN, 1)),
                                                            [1, 2, 3])
        for split, ids in (("test", [1, 2, 3]), ("val", [4, 5]), ("train", [6, 7, 8, 9])):
            ds = data.build_dataset("fss1000", split, 0, shot=3, img_size=32, root=root, seed=5)
            assert type(ds) is data.FSSEpisodes and ds.classes == ids and len(ds) == len(ds.images) == 4 * len(ids)
            loaded, load = [], ds._load
            ds._load = lambda name: loaded.append(name) or load(name)
            for stream in (0, 1):
                queries = []
                for i in range(len(ds)):
                    loaded.clear()
                    ep = ds[(stream, i)]
                    query, supports, folder = loaded[0], loaded[1:], loaded[0].split("/")[0]
                    c = (FSS_TEST + FSS_VAL + FSS_TRAIN).index(folder) + 1
                    assert ep["class_id"] == c  # the supports: the 3 other images of the query's class
                    assert sorted([query, *supports]) == [n for n in ds.images if n.split("/")[0] == folder]
                    _assert_episode(ep, 3, 32, test=split != "train")
                    if split != "train":  # scored at the original size, against the mask as HSNet reads it
                        k = int(query[-1])
                        assert torch.equal(ep["m_q_orig"], torch.from_numpy(_fss_mask(c, k) >= 128).long())
                    queries.append(query)
                assert sorted(queries) == ds.images  # each image the query once: one pass a seed (an epoch)
                assert (queries == ds.images) == (split == "train")  # test: each seed in its own order
        assert "note" not in capsys.readouterr().err
        (root / "e_train").mkdir()
        data.dataset_classes("fss1000", 0, root)
        assert capsys.readouterr().err.splitlines() == [
            f"[data] note: {root} holds 5 class folders outside the test and validation lists, the training "
            "classes; FSS-1000 has 4"]
        with pytest.raises(data.DatasetNotFoundError) as err:  # the folder above the tree: named
            data.build_dataset("fss1000", "test", 0, root=tmp_path)
        assert str(err.value).splitlines()[0] == (f"FSS-1000 root {tmp_path} holds no class folder of the test or "
                                                  f"validation list (e.g. {tmp_path / 't_bus'}): give {root}")
        for name in (*FSS_TRAIN, "e_train"):  # the test set alone (and the validation classes): tested, not trained
            shutil.rmtree(root / name)
        assert len(data.build_dataset("fss1000", "test", 0, img_size=32, root=root)) == 12
        with pytest.raises(data.DatasetNotFoundError) as err:
            data.build_dataset("fss1000", "train", 0, img_size=32, root=root)
        assert str(err.value).splitlines()[:2] == [
            f"FSS-1000 root {root} holds no training class folder: training needs the 4 class folders outside the test "
            "and validation lists (the full FSS-1000 tree; its test classes alone can be tested on)",
            "expected FSS-1000 layout (github.com/HKUSTCV/FSS-1000's fewshot_data, or HSNet's FSS-1000 folder):"]

    def test_fss_masks_read_as_hsnet_and_the_distributions_defects_left_out_in_one_note(self, tmp_path, fss_lists,
                                                                                          monkeypatch, capsys):
        root = _write_fss(tmp_path / "fss")
        cat, cup, a_train, b_train = root / "t_cat", root / "t_cup", root / "a_train", root / "b_train"
        Image.fromarray(np.stack([_fss_mask(2, 2)] * 3, -1)).save(cat / "2.png")  # a 3-channel mask
        soft = _fss_mask(2, 3) // 255 * 200  # anti-aliased: 200 inside, edges of 127 and 128
        soft[0], soft[1] = 127, 128
        Image.fromarray(soft).save(cat / "3.png")
        Image.new("L", (50, 30), 255).save(cup / "4.png")  # a mask of another size (FSS-1000 issue #23's)
        _save_jpeg(cup / "1.jpeg", (FSS_SIZE, FSS_SIZE))  # a stray .jpeg beside 1.jpg
        Image.new("L", (FSS_SIZE, FSS_SIZE), 90).save(a_train / "4.png")  # no pixel >= 128
        (b_train / "2.jpg").rename(b_train / "2.jpeg")  # N.jpeg pairs where there is no N.jpg
        (b_train / "Thumbs.db").write_text("x")
        assert torch.equal(data.load_fss_mask(cat / "2.png"), torch.from_numpy(_fss_mask(2, 2) > 0))
        assert torch.equal(data.load_fss_mask(cat / "3.png"), torch.from_numpy(soft >= 128))
        test = data.build_dataset("fss1000", "test", 0, img_size=32, root=root)
        train_ds = data.build_dataset("fss1000", "train", 0, img_size=32, root=root)
        assert sorted(test.files) == [f"{name}/{k}" for name in FSS_TEST for k in range(1, 5)][:-1]
        assert test.counts["t_cat/3"] == {2: int((soft >= 128).sum())}
        assert test.counts["t_bus/1"] == {1: int((_fss_mask(1, 1) > 0).sum())}
        assert "a_train/4" not in train_ds.files and train_ds.files["b_train/2"][0].name == "2.jpeg"
        notes = [line for line in capsys.readouterr().err.splitlines() if "note" in line]
        assert notes == [
            f"[data] note: {root}, FSS-1000 test classes: left out t_cup/4.png (50x30, its image 40x40), t_cup/1.jpeg "
            "(beside 1.jpg)",
            f"[data] note: {root}, FSS-1000 train classes: left out a_train/4.png (no pixel >= 128), b_train/Thumbs.db "
            "(not an image N.jpg or a mask N.png)"]
        monkeypatch.setattr(data, "_scan_fss_pair", lambda pair: 1 / 0)
        again = data.build_dataset("fss1000", "test", 0, img_size=32, root=root)  # cached: nothing decoded again
        assert again.counts == test.counts
        Image.fromarray(_fss_mask(2, 4)[:, ::-1].copy()).save(cat / "4.png")  # a file changed: scanned again
        _edited_later(cat / "4.png")
        with pytest.raises(ZeroDivisionError):
            data.build_dataset("fss1000", "test", 0, img_size=32, root=root)

    def test_fss_training_crops_show_the_object_at_its_test_scale(self, tmp_path, fss_lists):
        """FSS-1000's 224 x 224 images are resized to the 473 crop for testing; training resizes them to it too
        before the random scale, so that a training query's object covers about what its test episode's does, not a
        fifth of it inside padding. Here 40 x 40 images and an 84 crop (473 / 224's ratio), every training query."""
        ds = data.build_dataset("fss1000", "train", 0, img_size=84, root=_write_fss(tmp_path / "fss"))
        train_fg, test_fg, ignored = [], [], []
        for i in range(len(ds)):
            ep = ds[(0, i)]
            mask = data.binary_mask(ds._load(ds._query(i, 0))[1], ep["class_id"])
            _, test_mask = data.test_transform(torch.zeros(3, *mask.shape, dtype=torch.uint8), mask, 84)
            train_fg.append((ep["m_q"] == 1).double().mean())
            test_fg.append((test_mask == 1).double().mean())
            ignored.append((ep["m_q"] == IGNORE_INDEX).double().mean())
        assert 0.8 < np.mean(train_fg) / np.mean(test_fg) < 1.25  # without the resize: 0.23 (1 / 2.1^2)
        assert np.mean(ignored) < 0.1  # rotated corners and a scale under 1; without the resize: 0.77

    def test_fss_damaged_files_and_missing_classes_of_both_splits_in_one_message(self, tmp_path, fss_lists):
        root = _write_fss(tmp_path / "fss")
        jpeg = root / "t_bus" / "2.jpg"
        jpeg.write_bytes(jpeg.read_bytes()[:1500])
        (root / "a_train" / "1.png").write_bytes(b"not a png")
        for mask in (root / "c_train").glob("*.png"):
            mask.unlink()
        shutil.rmtree(root / "t_cup")
        args, _ = train.parse_args(["--model", "baseline", "--dataset", "fss1000", "--data-root", str(root), "--out",
                                    str(tmp_path / "run")])
        with pytest.raises(data.DatasetFileError) as err:
            train.check_data(args, ("train", "test"))
        lines = str(err.value).splitlines()
        assert lines[0] == (f"2 bad file(s) in the FSS-1000 train classes of {root}; fix or remove them (and their "
                            "list entries):")
        assert lines[1].startswith(f"  {root / 'a_train' / '1.png'}: cannot identify image file")
        assert lines[2] == f"  {root / 'c_train'}: no image N.jpg with its mask N.png"
        assert lines[3].startswith("2 bad file(s) in the FSS-1000 test classes")
        assert lines[4].startswith(f"  {jpeg}: not a readable image (image file is truncated")
        assert lines[5:] == [f"  {root / 't_cup'}: no such class folder (FSS-1000's test list names it)"]

    def test_fss_unreadable_folders_are_named_in_one_message(self, tmp_path, fss_lists, monkeypatch):
        """A class folder that cannot be listed is one more line of the scan's message; the root, or a folder
        dataset's images/ or labels/, a DatasetNotFoundError with the layout; no traceback."""
        root = _write_fss(tmp_path / "fss")
        _unlistable(monkeypatch, root / "t_cat", root / "t_cup")
        with pytest.raises(data.DatasetFileError) as err:
            data.build_dataset("fss1000", "test", 0, img_size=32, root=root)
        assert str(err.value).splitlines()[1:] == [f"  {root / name}: cannot be read (Permission denied)"
                                                   for name in ("t_cat", "t_cup")]
        folder = _write_folder(tmp_path / "mine")
        for unreadable, build in ((root, ("fss1000", "test", 0)), (folder / "labels", ("folder", "train", 1))):
            _unlistable(monkeypatch, unreadable)
            with pytest.raises(data.DatasetNotFoundError) as err:
                data.build_dataset(*build, img_size=32, root=unreadable if build[0] == "fss1000" else folder)
            lines = str(err.value).splitlines()
            assert lines[0] == f"{unreadable} cannot be read (Permission denied): its files are needed"
            assert lines[1].startswith(f"expected {'FSS-1000' if build[0] == 'fss1000' else 'folder'} layout")

    def test_fss_scores_through_train_py_by_hand(self, tmp_path, fss_lists, monkeypatch, capsys, tiny):
        """Every pixel called foreground: class IoU = its test masks' object pixels / their pixels, counted over one
        pass (each test image once), in the mean over the test classes; FB-IoU = (0 + the same over all) / 2."""
        root = _write_fss(tmp_path / "fss")
        (tmp_path / "allfg.py").write_text(ALL_FOREGROUND_MODEL)
        monkeypatch.chdir(tmp_path)
        argv = ["--model", "allfg.py", "--dataset", "fss1000", "--data-root", str(root), "--img-size", "32",
                "--test-seeds", "2", "--workers", "0"]
        args, _ = train.parse_args(argv)
        assert (args.out, args.fold, args.test_episodes) == (Path("runs/allfg-fss1000-1shot-img_size=32"), 0, None)
        assert (args.lr, args.batch_size, args.epochs, args.augment) == (0.025, 4, 200, "pfenet")  # PASCAL's recipe
        miou, fbiou = train.main(argv)
        objects = {c: sum(int((_fss_mask(c, k) > 0).sum()) for k in range(1, 5)) for c in (1, 2, 3)}
        expected = {c: n / (4 * FSS_SIZE ** 2) for c, n in objects.items()}
        assert miou == pytest.approx(np.mean(list(expected.values())), abs=1e-9)
        assert fbiou == pytest.approx(sum(objects.values()) / (12 * FSS_SIZE ** 2) / 2, abs=1e-9)
        record = read_metrics(args.out)[-1]
        assert record["per_class"] == pytest.approx({str(c): v for c, v in expected.items()})
        assert record["miou_std"] == 0  # every seed: the same pass over the test images
        out = capsys.readouterr().out
        assert "over 2 test seeds of 12 episodes" in out
        assert "RESULT model=allfg dataset=fss1000 fold=0 shot=1 " in out
        # --select-best validates on the validation classes (HSNet's model selection), not on the test classes
        splits, real = [], train.episodes
        monkeypatch.setattr(train, "episodes", lambda args, split: splits.append(split) or real(args, split))
        train.main(tiny_args(tiny, tmp_path / "best", "--dataset", "fss1000", "--data-root", str(root), "--fold", "0",
                             "--epochs", "1", "--select-best", "--val-every", "1", "--img-size", "32", "--test-seeds",
                             "1", "--train-length", "8", "--test-episodes", "3"))
        assert splits.count("val") == 2 and splits[-1] == "test"  # checked before training, then the validation
        assert [r["event"] for r in read_metrics(tmp_path / "best")].count("val") == 1
        assert (tmp_path / "best" / "best.pt").exists()
        assert "evaluating best.pt (chosen on the validation classes)" in capsys.readouterr().out
        with pytest.raises(SystemExit, match="FSS-1000 does not have; Sym-Net runs there as the meta learner alone"):
            train.main(["--model", "symnet", "--stage", "base", "--dataset", "fss1000", "--data-root", str(root),
                        "--no-pretrained", "--set", "base_learner=" + str(tmp_path / "base.pt")])
        for fold in ("1", "all"):
            with pytest.raises(SystemExit) as err:
                train.main(["--model", "baseline", "--dataset", "fss1000", "--data-root", str(root), "--fold", fold])
            assert err.value.code == 2 and capsys.readouterr().err == (
                f"error: FSS-1000 has one class split, no folds: drop --fold {fold} (its test classes are fold 0) "
                "(--help lists the flags)\n")

    def test_fss_support_boxes(self, tmp_path, fss_lists):
        root = _write_fss(tmp_path / "fss")
        two = _fss_mask(1, 2)
        two[24:26, 10:30] = 255  # an L-shaped object: its box covers the corner it leaves out
        for k in range(1, 5):
            Image.fromarray(two).save(root / "t_bus" / f"{k}.png")
        args, _ = train.parse_args(["--model", "baseline", "--dataset", "fss1000", "--data-root", str(root),
                                    "--support-boxes", "--shot", "2", "--img-size", str(FSS_SIZE)])
        ds = train.episodes(args, "test")
        assert ds.support_boxes
        boxes = data.mask_to_boxes(torch.from_numpy(two > 0).long())
        i = next(i for i in range(len(ds)) if ds._query(i, 0).startswith("t_bus/"))
        ep = ds[(0, i)]
        for m in ep["m_s"]:  # at the tree's size the test geometry is the identity
            assert torch.equal(m, boxes) and not torch.equal(m, torch.from_numpy(two > 0).long())
        assert torch.equal(ep["m_q"], torch.from_numpy(two > 0).long())  # the query keeps its mask


# ==========================================================================================================
# train.py: the harness end to end on synthetic data, with a tiny model file written to a temp folder
# ==========================================================================================================

class TestTrain:
    # ---------------- training, evaluation, --resume, --select-best, --compile, NaN stop, DDP -----------------

    def test_cli_trains_and_evaluates_end_to_end(self, tiny, tmp_path):
        out = tmp_path / "run"
        proc = run_cli(["train.py", *tiny_args(tiny, out, "--epochs", "3", "--log-every", "2", "--workers", "2")])
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = result_line(proc.stdout)
        assert res["model"] == "tinynet" and res["dataset"] == "synthetic" and res["fold"] == "1"
        assert 0 <= float(res["miou"]) <= 100 and 0 <= float(res["fbiou"]) <= 100
        assert "episodes/s" in proc.stdout and "ETA" in proc.stdout and "test seed 1" in proc.stdout
        records = read_metrics(out)
        assert records[0]["event"] == "start" and records[-1]["event"] == "result"
        assert set(records[-1]["per_class"]) == {"6", "7", "8", "9", "10"}  # fold 1's test classes
        state = torch.load(out / "last.pt", weights_only=False)
        assert state["epoch"] == 3 and state["args"]["model"] == str(tiny)

    def test_training_lowers_the_loss(self, tiny, tmp_path):
        train.main(tiny_args(tiny, tmp_path, "--epochs", "6", "--train-length", "32", "--log-every", "8",
                             "--test-episodes", "4", "--test-seeds", "1"))
        losses = [r["loss"] for r in read_metrics(tmp_path) if r["event"] == "train"]
        assert len(losses) == 6 and sum(losses[-2:]) < 0.9 * sum(losses[:2]), losses
        # the poly schedule per step: 32 episodes / batch 4 = 8 steps an epoch, 48 in all, logged at each 8th
        lrs = [r["lr"] for r in read_metrics(tmp_path) if r["event"] == "train"]
        assert lrs == pytest.approx([0.05 * (1 - (8 * e + 7) / 48) ** 0.9 for e in range(6)])

    def test_evaluation_scores_at_original_resolution_by_hand(self, tmp_path):
        """A model that calls every pixel foreground, on PASCAL-sized (500x375) images tested at 64 px: per class,
        I = its object pixels and U = every labelled pixel of the ORIGINAL label (not the resized, padded one)."""
        class AllForeground(nn.Module):
            def forward(self, img_q, img_s, m_s, class_ids=None):
                logits = torch.zeros(img_q.shape[0], 2, *img_q.shape[-2:])
                logits[:, 1] = 10.0  # p(fg) = sigmoid(10) everywhere
                return {"logits": logits}

        root = tmp_path / "voc"
        train.write_pascal_like(root, 30)
        args = train.parse_args(["--model", "baseline", "--dataset", "pascal", "--data-root", str(root), "--img-size",
                                 "64", "--test-episodes", "5", "--test-seeds", "1", "--workers", "0"])[0]
        dataset = train.episodes(args, "test")
        loader = data.make_loader(dataset, data.EpisodeSampler(len(dataset)), 2, args.workers, torch.device("cpu"),
                                  False)
        meter = train.evaluate(AllForeground(), loader, dataset, torch.device("cpu"), args, seed=0)
        inter, union = {}, {}
        for i in range(len(dataset)):
            episode = dataset[(0, i)]
            target, c = episode["m_q_orig"], episode["class_id"]
            assert target.shape == (375, 500)
            inter[c] = inter.get(c, 0) + (target == 1).sum().item()
            union[c] = union.get(c, 0) + (target != IGNORE_INDEX).sum().item()
        assert meter.class_iou() == pytest.approx({c: inter[c] / union[c] for c in inter}, rel=1e-9)
        assert meter.fbiou() == pytest.approx(sum(inter.values()) / sum(union.values()) / 2, rel=1e-9)  # bg IoU 0
        assert meter.mean_probability() == pytest.approx([torch.sigmoid(torch.tensor(10.0)).item()] * 2)

    def test_episode_sampler_streams_ranks_and_test_split(self):
        def keys(sampler, stream):
            sampler.set_stream(stream)
            return list(sampler)

        ranks = [data.EpisodeSampler(10, rank, 2, shuffle=True, seed=3, batch_size=2) for rank in (0, 1)]
        epoch0 = [keys(s, 0) for s in ranks]
        assert all(len(k) == len(s) == 4 for k, s in zip(epoch0, ranks))  # 10 // (2 ranks x 2) x 2: whole batches
        assert all(stream == 0 for k in epoch0 for stream, _ in k)  # the key carries the epoch to the workers
        assert not {i for _, i in epoch0[0]} & {i for _, i in epoch0[1]}  # the ranks see different episodes
        assert keys(ranks[0], 0) == epoch0[0] and [i for _, i in keys(ranks[0], 1)] != [i for _, i in epoch0[0]]
        test = [data.EpisodeSampler(7, rank, 2) for rank in (0, 1)]
        assert [i for _, i in keys(test[0], 4)] == [0, 2, 4, 6] and [i for _, i in keys(test[1], 4)] == [1, 3, 5]

    def test_resume_after_a_crash_gives_the_same_weights(self, tiny, tmp_path):
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

    def test_select_best_validates_keeps_the_best_and_evaluates_it(self, tiny, tmp_path, capsys):
        train.main(tiny_args(tiny, tmp_path, "--epochs", "3", "--select-best", "--val-every", "1",
                             "--test-episodes", "4", "--test-seeds", "1"))
        text = capsys.readouterr().out
        records = read_metrics(tmp_path)
        vals = [r["miou"] for r in records if r["event"] == "val"]
        assert len(vals) == 3 and "evaluating best.pt" in text and "optimistic" in text
        best = torch.load(tmp_path / "best.pt", weights_only=False)
        assert best["best"] == max(vals) and best["epoch"] == 1 + vals.index(max(vals))
        assert records[-1]["miou"] == pytest.approx(max(vals))  # the final evaluation is best.pt's

    def test_compile_trains_as_eager_and_saves_plain_weights(self, tiny, tmp_path):
        """--compile (torch.compile; inductor's C++ backend on a CPU) gives eager's losses, and the checkpoint has the
        module's own keys, so that it loads without --compile."""
        losses = {}
        for name, extra in (("eager", ()), ("compiled", ("--compile",))):
            out = tmp_path / name
            proc = run_cli(["train.py", *tiny_args(tiny, out, "--epochs", "1", "--log-every", "1", "--test-seeds", "1",
                                                   *extra)])
            assert proc.returncode == 0, proc.stderr[-3000:]
            losses[name] = [r["loss"] for r in read_metrics(out) if r["event"] == "train"]
        assert len(losses["eager"]) == 4 and losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)
        keys = torch.load(tmp_path / "compiled" / "last.pt", weights_only=False)["model"]
        assert keys.keys() == torch.load(tmp_path / "eager" / "last.pt", weights_only=False)["model"].keys()

    def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(self, tiny, tmp_path, capsys):
        argv = tiny_args(tiny, tmp_path / "run", "--epochs", "3", "--nan-after", "5", "--log-every", "1")
        with pytest.raises(SystemExit) as stop:
            train.main(argv)
        assert stop.value.code == train.EXIT_NONFINITE
        again = [a for a in argv if a != str(tmp_path / "run")]
        again = " ".join(again[:again.index("--out")] + again[again.index("--out") + 1:])
        assert (f"error: the loss became nan in epoch 2 at step 2; stopping. the last good checkpoint is "
                f"{tmp_path / 'run' / 'last.pt'}; try a lower learning rate (a new run: a run keeps its recipe), e.g. "
                f"python train.py {again} --lr 0.025 --out {tmp_path / 'run'}-lr0.025\n") in capsys.readouterr().out
        tmp_path = tmp_path / "run"
        state = torch.load(tmp_path / "last.pt", weights_only=False)
        assert state["epoch"] == 1  # 4 steps per epoch: epoch 1 was good, epoch 2 went bad
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())

    def test_evaluation_is_reproducible_and_matches_across_processes(self, tiny, tmp_path):
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

    def test_ddp_training_on_cpu(self, tiny, tmp_path):
        proc = run_cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
                        "train.py", *tiny_args(tiny, tmp_path, "--epochs", "2", "--test-episodes", "4")])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("RESULT ") == 1  # rank 0 alone reports
        assert "2 process(es)" in proc.stdout
        assert torch.load(tmp_path / "last.pt", weights_only=False)["epoch"] == 2

    # ---------------- the baseline; --stage, --vis, --predict, --bench ----------------------------------------

    def test_baseline_segments_a_colour_coded_episode_exactly(self):
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

    def test_baseline_evaluates_without_training(self, tmp_path, capsys):
        miou, fbiou = train.main(["--model", "baseline", "--dataset", "synthetic", "--no-pretrained", "--workers", "0",
                                  "--img-size", "64", "--test-episodes", "2", "--test-seeds", "1",
                                  "--out", str(tmp_path)])
        assert 0 <= miou < 1 and 0 < fbiou < 1  # 2 episodes at 64 px: the floor may find nothing
        out = capsys.readouterr().out
        assert "training:" not in out and "BatchNorm statistics estimated on 64 training images" in out
        # 2 episodes cannot cover fold 0's 5 classes: the others count 0, as in PFENet's mIoU, and the user is told
        result = read_metrics(tmp_path)[-1]
        assert sorted(map(int, result["per_class"])) == list(data.fold_classes("synthetic", 0))
        assert miou == pytest.approx(sum(result["per_class"].values()) / 5)
        assert "WARNING: test seed 0 has no episode of" in out and "IoU 0 in the mIoU" in out

    def test_stage_vis_predict_and_bench(self, tiny, tmp_path, capsys):
        train.main(tiny_args(tiny, tmp_path, "--stage", "hello"))
        assert (tmp_path / "stage.txt").read_text() == "fold 1"
        with pytest.raises(SystemExit, match="offers"):
            train.main(tiny_args(tiny, tmp_path, "--stage", "nosuch"))
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:  # a stage's NaN loss stops as training's does
            train.main(tiny_args(tiny, tmp_path, "--stage", "nan"))
        assert stop.value.code == train.EXIT_NONFINITE
        assert ("the loss became nan in epoch 1 at step 1 in --stage nan; stopping. nothing was saved; run the stage "
                "again with a lower learning rate and --overwrite") in capsys.readouterr().out

        train.main(tiny_args(tiny, tmp_path, "--epochs", "1", "--vis", "3", "--test-episodes", "4",
                             "--test-seeds", "1"))
        pngs = sorted((tmp_path / "vis").glob("*.png"))
        assert len(pngs) == 3
        assert Image.open(pngs[0]).size == (3 * 48, 48)  # 1 support | ground truth | prediction

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
        Image.fromarray(mask.T.copy()).save(tmp_path / "turned.png")  # 30x50 image, 50x30 mask: would be stretched
        with pytest.raises(SystemExit, match="is 30x50 pixels but its image .* is 50x30"):
            train.main(["--predict", "--checkpoint", str(tmp_path / "last.pt"), "--support", str(tmp_path / "s.jpg"),
                        "--support-mask", str(tmp_path / "turned.png"), "--query", str(tmp_path / "q.jpg"),
                        "--out", str(pred_out), "--workers", "0"])

        capsys.readouterr()
        train.main(tiny_args(tiny, tmp_path, "--bench", "--bench-steps", "2", "--batch-size", "2"))
        text = capsys.readouterr().out
        assert "ms/step" in text and "ms/episode" in text and "learnable" in text and "TFLOP/step" in text
        peak = float(text.split("peak process memory: ")[1].split(" GiB")[0])  # on the CPU: the resident peak
        assert 0.1 < peak < 64
        fields = dict(kv.split("=") for kv in text.split("BENCH ")[1].split())  # the line for scripts
        assert fields["shot"] == "1" and fields["batch"] == "2" and float(fields["peak_gib"]) == pytest.approx(peak)
        assert float(fields["episodes_per_s"]) == pytest.approx(2000 / float(fields["train_ms"]), rel=0.1)  # rounded
        assert fields["host_syncs"] == "0" and "host syncs: 0 per training step" in text

    def test_user_masks_of_any_mode_and_missing_files(self, tmp_path):
        grey = np.zeros((4, 5), np.uint8)
        grey[1:3, 2:4] = 200
        rgb = np.zeros((4, 5, 3), np.uint8)
        rgb[1:3, 2:4, 2] = 1  # a faint blue object: nonzero in one channel only
        Image.fromarray(grey).save(tmp_path / "grey.png")
        Image.fromarray(rgb).save(tmp_path / "rgb.png")
        Image.fromarray(np.dstack([rgb, np.full((4, 5), 255, np.uint8)])).save(tmp_path / "rgba.png")
        expected = torch.from_numpy((grey > 0).astype(np.int64))
        for name in ("grey.png", "rgb.png", "rgba.png"):
            assert torch.equal(train.read_user_mask(tmp_path / name), expected), name
        with pytest.raises(SystemExit, match="cannot read mask"):
            train.read_user_mask(tmp_path / "absent.png")
        # a phone photo stored landscape with EXIF orientation 6 (shown turned 90 degrees clockwise): --predict
        # reads it upright, as the user sees it and drew its mask; the datasets' images are read as stored
        photo = np.zeros((4, 6, 3), np.uint8)
        photo[0, 0] = 255  # top-left as stored -> top-right as shown
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(photo).save(tmp_path / "phone.png", exif=exif)
        stored, upright = data.load_image(tmp_path / "phone.png"), data.load_image(tmp_path / "phone.png", upright=True)
        assert stored.shape == (3, 4, 6) and upright.shape == (3, 6, 4)
        assert stored[0, 0, 0] == 255 and upright[0, 0, -1] == 255

    def test_count_flops_by_hand_and_backbone_share(self):
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.backbone = Backbone("resnet50", pretrained=False)
                self.head = nn.Conv2d(2048, 2, 1)

            def forward(self, x):
                return self.head(self.backbone(x)["layer4"])  # (1,2,5,5)

        torch.manual_seed(0)
        net, x = Net(), torch.randn(1, 3, 33, 33)
        with torch.utils.flop_counter.FlopCounterMode(display=False) as reference:
            net.backbone(x)
        head = 2 * 2048 * 2 * 5 * 5  # 2 flops per multiply-add, 2048 -> 2 channels at 5x5
        counted = train.count_step(lambda: net(x).sum().backward(), net)
        total, backbone = counted["flops"], counted["backbone"]
        assert backbone == reference.get_total_flops() > 0
        assert total == backbone + head + head  # the head's forward and its weight gradient (x needs none)
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())  # hooks removed

    def test_bf16_peak_matches_whole_gpu_names(self, monkeypatch):
        args, cuda = argparse.Namespace(peak_tflops=None), torch.device("cuda")
        for name, peak in (("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 NVL", 835.5),
                           ("NVIDIA L40", 181.0), ("NVIDIA L40S", 362.1), ("NVIDIA L4", 121.0), ("NVIDIA A10G", None),
                           ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA H200", 989.4)):
            monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
            assert train.bf16_peak_tflops(cuda, args) == peak, name
        assert train.bf16_peak_tflops(cuda, argparse.Namespace(peak_tflops=500.0)) == 500.0  # --peak-tflops wins

    def test_bench_data_on_generated_pascal_jpegs(self, tmp_path, monkeypatch, capsys):
        monkeypatch.setattr(train, "BENCH_DATA_IMAGES", 20)
        monkeypatch.setattr(train, "BENCH_DATA_SECONDS", 0.5)
        train.main(["--bench-data", "--model", "baseline", "--workers", "1", "--img-size", "64", "--batch-size", "2"])
        text = capsys.readouterr().out
        assert "writing 20 PASCAL-sized JPEGs" in text
        lines = [line for line in text.splitlines() if line.strip().endswith("per image)")]
        rates = [float(line.split()[2]) for line in lines]
        assert len(rates) == 2 and all(r > 0 for r in rates)  # 0 and 1 workers
        # a compact batch of 2 1-shot episodes at 64 px: 4 images of 3 x 64 x 64 bytes, 4 masks, 2 class ids of 8 bytes
        assert all(f"{(4 * 4 * 64 * 64 + 2 * 8) / 2 ** 20:.1f} MiB a batch" in line for line in lines)
        root = tmp_path / "voc"
        train.write_pascal_like(root, 5)
        img = Image.open(root / "JPEGImages" / "000004.jpg")
        label = np.array(Image.open(root / "SegmentationClassAug" / "000004.png"))
        assert img.size == (500, 375) and label.shape == (375, 500) and 5 in np.unique(label)  # class 1 + 4 % 20
        assert (root / "ImageSets" / "Segmentation" / "val.txt").read_text() == "000004\n"

    # ---------------- arguments, and checkpoints given with flags ---------------------------------------------

    @pytest.mark.parametrize("argv, message", [
        (["--fold", "7"], "argument --fold: must be 0, 1, 2, 3 or all, got '7'"),
        (["--fold", "all", "--bench"], "--fold all trains and evaluates"),
        (["--backbone-weights", "w.pth", "--no-pretrained"], "--backbone-weights and --no-pretrained exclude"),
        (["--resume", "--overwrite"], "--resume excludes --eval-only and --overwrite"),
        *[([flag, value], f"argument {flag}: must be at least {low}, got {value}")
          for flag, value, low in (("--shot", "0", 1), ("--log-every", "0", 1), ("--test-episodes", "0", 1),
                                   ("--workers", "-1", 0), ("--seed", "-1", 0))],
        (["--batch-size", "two"], "argument --batch-size: invalid positive_int value"),
        *[(["--lr", lr], f"argument --lr: must be a number above 0 and at most 10, got '{lr}'")
          for lr in ("-1", "1e300", "nan", "inf")],
        (["--model", "nosuchnet"], "choose one of"),
        (["--model", "missing.py"], "no such file"),
        (["--img-size", "31"], "argument --img-size: must be at least 32 (a 4x4 feature grid at the backbones' output "
                               "stride 8), got 31"),
        (["--model", "symnet", "--dataset", "synthetic", "--no-pretrained", "--set", "spm=false"],
         "error: symnet: APA reads SPM's prior (Eq. 5, 7; Table 3's note): spm=false needs apa=false"),
        (["--dataset", "pascal", "--data-root", "/nonexistent/voc", "--model", "baseline", "--no-pretrained"],
         "JPEGImages"),
    ])
    def test_bad_arguments_get_clear_messages(self, argv, message, tmp_path):
        proc = run_cli(["train.py", *argv, "--workers", "0", "--out", str(tmp_path)])
        assert proc.returncode != 0
        assert message in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr

    def test_set_values_are_typed_by_the_config_field_and_bad_ones_refused(self):
        @dataclasses.dataclass
        class Config:
            on: bool = True
            n: int = 3
            x: float = 0.5
            path: str = None
            mode: typing.Literal["a", "b"] = "a"
            scales: tuple = (0.75, 1.0)
            levels: tuple = ("layer3", "layer4")
            windows: tuple = ((5, 5), (7, 1))
        field = {f.name: f for f in dataclasses.fields(Config)}
        for name, text, value in (("on", "false", False), ("on", "Yes", True), ("on", "0", False), ("n", "-4", -4),
                                  ("x", "2", 2.0), ("path", "none", None), ("path", "w.pt", "w.pt"), ("mode", "b", "b"),
                                  ("scales", "1", (1.0,)), ("scales", "0.5,1,2", (0.5, 1.0, 2.0)),
                                  ("levels", "layer4", ("layer4",)), ("levels", "layer2,layer4", ("layer2", "layer4")),
                                  ("windows", "((3,3),)", ((3, 3),))):
            got = train.field_value(field[name], text)
            assert got == value and type(got) is type(value), (name, text, got)
            assert train.field_value(field[name], train.format_value(value)) == value  # as folder names write it
        for name, text, message in (("on", "maybe", "true or false"), ("n", "2.5", "an integer"),
                                    ("x", "nan", "a finite number"), ("mode", "c", "one of a, b"),
                                    ("scales", "1,x", "a finite number")):
            with pytest.raises(ValueError, match=message):
                train.field_value(field[name], text)

    @pytest.mark.parametrize("argv, message", [
        (["--set", "depth=3"], "--set depth=3: tinynet's Config has no field 'depth' (FIELD=VALUE; its fields: "
                               "width, "),
        (["--set", "width"], "--set width: tinynet's Config has no field 'width'"),
        (["--set", "width=wide"], "--set width=wide: width takes an integer, not 'wide'"),
        (["--set", "width=8", "--width", "8"], "--set width=8 and --width both set width: give one"),
        (["--set", "backbone=resnet101"], "--set backbone=resnet101: the backbone has flags of its own: --backbone"),
    ])
    def test_bad_set_values_get_one_line_and_exit_2(self, tiny, tmp_path, argv, message):
        proc = run_cli(["train.py", "--model", str(tiny), "--dataset", "synthetic", *argv, "--out", str(tmp_path)])
        assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith(f"error: {message}"), proc.stderr

    def test_set_is_saved_resumed_shown_and_names_the_default_folder(self, tiny, tmp_path, capsys, monkeypatch):
        monkeypatch.chdir(tmp_path)
        args, _ = train.parse_args(["--model", str(tiny), "--dataset", "synthetic", "--set", "width=8", "invert=0"])
        assert args.set == {"width": 8, "invert": 0}
        assert args.out == Path("runs") / "tinynet-synthetic-fold0-1shot-invert=0-width=8"
        args, _ = train.parse_args(["--model", str(tiny), "--dataset", "synthetic", "--backbone", "resnet101"])
        assert args.out == Path("runs") / "tinynet-synthetic-fold0-1shot-resnet101"
        args, _ = train.parse_args(["--model", str(tiny), "--dataset", "synthetic", "--lr", "0.01", "--width", "8",
                                    "--invert", "1", "--backbone-weights", "/w/resnet50_v2.pth", "--workers", "0"])
        # the recipe flags given (a file by its name) name it too; an evaluation flag (invert) or --workers does not
        assert args.out == Path("runs") / "tinynet-synthetic-fold0-1shot-backbone_weights=resnet50_v2-lr=0.01-width=8"
        with pytest.raises(RuntimeError, match="simulated crash"):  # 4 steps an epoch: dies in epoch 2
            train.main(tiny_args(tiny, tmp_path / "cut", "--epochs", "2", "--set", "width=8", "crash_after=5"))
        state = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
        assert state["args"]["set"] == {"width": 8, "crash_after": 5} and state["config"]["width"] == 8
        bare = ["--model", str(tiny), "--dataset", "synthetic", "--fold", "1", "--out", str(tmp_path / "cut")]
        with pytest.raises(SystemExit) as err:
            train.main([*bare, "--resume", "--set", "width=16"])
        assert "was trained with --set crash_after=5 width=8 (now width=16)" not in str(err.value.code)
        assert "was trained with --set width=8 (now width=16)" in str(err.value.code)  # crash_after: evaluation's
        capsys.readouterr()
        train.main([*bare, "--resume", "--test-episodes", "4", "--test-seeds", "1"])  # the crash hook is not kept
        out = capsys.readouterr().out
        assert out.startswith("tinynet --set width=8 on synthetic fold 1") and "resumed from" in out
        state = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
        assert state["epoch"] == 2 and state["args"]["set"] == {"width": 8} and state["config"]["width"] == 8
        assert read_metrics(tmp_path / "cut")[-1]["set"] == {"width": 8}

    def test_fold_all_never_reports_the_folds_of_another_recipe(self, tiny, tmp_path, capsys, monkeypatch):
        """The issue's case: --fold all, then --fold all with another backbone, reported the first run's folds."""
        monkeypatch.chdir(tmp_path)
        base = ["--model", str(tiny), "--dataset", "synthetic", "--train-length", "8", "--epochs", "1",
                "--test-episodes", "2", "--test-seeds", "1", "--workers", "0", "--fold", "all"]
        first = train.main(base)
        capsys.readouterr()
        other = train.main([*base, "--backbone", "resnet101"])  # its own folders: all four folds train
        out = capsys.readouterr().out
        assert out.count("training:") == 4 and "taken from metrics.jsonl" not in out
        given = "epochs=1-train_length=8"  # the recipe flags the command line gives
        assert all((Path("runs") / f"tinynet-synthetic-fold{k}-1shot-resnet101-{given}" / "last.pt").exists()
                   for k in range(4))
        assert [r["backbone"] for r in other] == ["resnet101"] * 4
        assert [r["backbone"] for r in first] == ["resnet50"] * 4
        train.main([*base, "--out", "runs/x"])
        with pytest.raises(SystemExit) as err:  # one folder, another recipe: refused, naming the difference
            train.main([*base, "--out", "runs/x", "--lr", "0.01"])
        assert str(err.value.code) == (f"error: fold 0: {Path('runs/x/fold0')} holds a run trained with --lr 0.05 (now "
                                       "0.01): not the run asked for; give another --out, or --overwrite to train it "
                                       "again")

    def test_region_recall_counts_the_map_above_each_threshold_inside_the_mask(self, tiny, tmp_path, capsys):
        """QGNet's Table 7 (Eq. 16): |{V > t} & mask| / |mask| over every episode; 255 is not mask."""
        meter = common.RecallMeter()
        v = torch.tensor([[[[0.05, 0.35], [0.65, 0.95]]], [[[0.5, 0.5], [0.5, 0.5]]]])  # (2,1,2,2)
        meter.update({"a": v, "b": 1 - v}, torch.tensor([[[1, 1], [1, 255]], [[0, 0], [0, 1]]]))
        by_hand = lambda values: [sum(x > t for x in values) / 4 for t in meter.THRESHOLDS]  # noqa: E731
        assert meter.all_reduce().recall() == {"a": pytest.approx(by_hand([0.05, 0.35, 0.65, 0.5])),
                                               "b": pytest.approx(by_hand([0.95, 0.65, 0.35, 0.5]))}
        train.main(tiny_args(tiny, tmp_path / "run", "--epochs", "1", "--test-seeds", "1", "--region-recall"))
        out = capsys.readouterr().out
        assert "recall of the region maps against the query mask" in out
        record = read_metrics(tmp_path / "run")[-1]
        row = next(line.split() for line in out.splitlines() if line.strip().startswith("cosine"))
        assert row[1:] == [f"{100 * r:.1f}" for r in record["recall"]["cosine"]] and len(row) == 10
        assert record["recall"]["cosine"] == sorted(record["recall"]["cosine"], reverse=True)  # falls with t
        with pytest.raises(SystemExit) as err:  # a model without region maps: one line
            train.main(["--model", "baseline", "--dataset", "synthetic", "--baseline-features", "image",
                        "--no-pretrained", "--test-episodes", "2", "--test-seeds", "1", "--workers", "0",
                        "--region-recall", "--out", str(tmp_path / "base")])
        assert str(err.value.code).startswith("error: --region-recall: baseline returns no region maps")

    @pytest.mark.parametrize("text, message", [
        ("class Config:\n    x = (1,\n", "line 2: SyntaxError: '(' was never closed"),
        ("import torch\nimport nosuchmodule\n", "line 2: ModuleNotFoundError: No module named 'nosuchmodule'"),
        ("x = 1\nraise ValueError('two\\nlines')\n", "line 2: ValueError: two lines"),
        ("x = 1\n", "the module defines no `Config` (see train.py's docstring)")])
    def test_a_model_file_that_does_not_load_gets_one_line(self, tmp_path, text, message):
        (tmp_path / "mine.py").write_text(text)
        proc = run_cli(["train.py", "--model", str(tmp_path / "mine.py"), "--dataset", "synthetic"])
        assert proc.returncode == 1 and proc.stderr == f"error: --model {tmp_path / 'mine.py'}: {message}\n"

    def test_every_table_of_the_papers_has_a_line_in_readme_and_every_command_there_runs(self, monkeypatch, tmp_path):
        """README's "Reproducing the papers": each of the five papers' 38 results tables is named in its model's list,
        and every command there (`python train.py --model MODEL --data-root DIR` and the flags shown, with the shell
        variables the list sets) is one that train.py takes: its flags exist, its values (--set's fields included)
        are accepted, its recipe resolves; and a command that evaluates a --checkpoint names, for every fold, the
        last.pt of a run that a training command of the list makes."""
        text = (REPO / "README.md").read_text()
        start = text.index("## Reproducing the papers")
        section = text[start:text.index("\n## ", start)]
        blocks = dict(re.findall(r"\*\*[\w-]+\*\* \(`--model (\w+)`\)[^\n]*\n(.*?)(?=\n\*\*|\Z)", section, re.S))
        tables = {"ocnet": range(1, 6), "qgnet": range(1, 8), "crcnet": range(1, 16), "symnet": range(1, 7),
                  "qpenet": ["I", "II", "III", "IV", "V"]}
        assert sorted(blocks) == sorted(tables)
        monkeypatch.chdir(tmp_path)
        trained, evaluations = {}, []  # last.pt of each run a training command makes -> its saved arguments
        for model, block in blocks.items():
            named = set()
            for spec in re.findall(r"Tables? ((?:\d+|[IV]+)(?:(?:, |-)(?:\d+|[IV]+))*)", block):
                for part in spec.split(", "):
                    low, _, high = part.partition("-")
                    named |= {str(t) for t in range(int(low), int(high) + 1)} if high else {low}
            assert named == {str(t) for t in tables[model]}, model
            variables = dict(re.findall(r"`(\w+)='([^']*)'`", block))
            for command in re.findall(r"`(--[^`]*)`", block):
                for name, value in variables.items():
                    command = command.replace(f'"${name}"', f"'{value}'")
                argv = ["--model", model, "--data-root", str(tmp_path), *shlex.split(" ".join(command.split()))]
                if "--checkpoint" in argv:
                    evaluations.append((model, argv))
                    continue
                args, _ = train.parse_args(argv)  # a flag or value it does not take: SystemExit
                assert args.model == model and args.lr and args.epochs, command
                for run in getattr(args, "folds", None) or [args]:
                    trained[str(run.out / "last.pt")] = train.saved_args(run)
        assert len(trained) >= 300 and len(evaluations) >= 11

        def read_checkpoint(path):
            assert str(path) in trained, f"{path}: no command of README's list trains it"
            return {"args": trained[str(path)]}

        monkeypatch.setattr(train, "read_checkpoint", read_checkpoint)
        for model, argv in evaluations:
            args, _ = train.parse_args(argv)
            pattern = argv[argv.index("--checkpoint") + 1]
            for fold in range(data.NUM_FOLDS) if args.fold == "all" else [args.fold]:
                read_checkpoint(pattern.replace("{fold}", str(fold)))
            assert args.model == model and args.eval_only, argv

    def test_help_lists_the_models_own_flags(self):
        proc = run_cli(["train.py", "--model", "crcnet", "--help"])
        assert proc.returncode == 0 and "crcnet options" in proc.stdout and "--kshot" in proc.stdout

    def test_offline_pretrained_run_stops_with_instructions(self, tmp_path, monkeypatch):
        def offline(*args, **kwargs):
            raise OSError("network is unreachable")

        monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
        with pytest.raises(SystemExit) as stop:
            train.main(["--model", "baseline", "--dataset", "synthetic", "--workers", "0", "--out", str(tmp_path)])
        assert str(stop.value).startswith("error: could not load the ImageNet weights")
        assert "--no-pretrained" in str(stop.value)

    def test_model_flags_given_with_a_checkpoint_apply(self, tiny, tmp_path):
        train.main(tiny_args(tiny, tmp_path / "run", "--epochs", "1", "--test-episodes", "4", "--test-seeds", "1"))
        flags = ["--eval-only", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--dataset", "synthetic",
                 "--fold", "1", "--workers", "0", "--test-episodes", "4", "--test-seeds", "1"]
        plain = train.main([*flags, "--out", str(tmp_path / "a")])
        inverted = train.main([*flags, "--invert", "1", "--out", str(tmp_path / "b")])
        assert plain == train.main([*flags, "--out", str(tmp_path / "c")])  # evaluation is deterministic
        assert inverted != plain  # --invert, a model flag not in the checkpoint's config, took effect

    def test_a_checkpoint_is_tested_on_its_own_fold_unless_told_otherwise(self, tiny, tmp_path, capsys):
        train.main(tiny_args(tiny, tmp_path / "run", "--epochs", "1", "--test-episodes", "4", "--test-seeds", "1"))
        flags = ["--eval-only", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--workers", "0",
                 "--test-episodes", "4", "--test-seeds", "1"]
        capsys.readouterr()
        train.main([*flags, "--out", str(tmp_path / "a")])  # trained on synthetic fold 1; neither flag given
        out, err = capsys.readouterr()
        assert result_line(out)["dataset"] == "synthetic" and result_line(out)["fold"] == "1" and "WARNING" not in err
        train.main([*flags, "--fold", "2", "--out", str(tmp_path / "b")])  # allowed, but its classes were trained on
        out, err = capsys.readouterr()
        assert result_line(out)["fold"] == "2" and "was trained on synthetic fold 1" in err
        # --model=X is --model X: it overrides the checkpoint's model, as the spaced form does
        assert train.parse_args(["--model=baseline", "--checkpoint", flags[2]])[0].model == "baseline"
        # files that are not train.py checkpoints: a message naming the file, not a traceback
        (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
        torch.save({"model": {}, "classes": [1]}, tmp_path / "stage.pt")  # a stage's file, e.g. a base learner
        for name, message in (("junk.pt", "cannot read checkpoint"), ("stage.pt", "is not a checkpoint of train.py")):
            with pytest.raises(SystemExit, match=message):
                train.main(["--eval-only", "--checkpoint", str(tmp_path / name)])

    def test_an_evaluation_of_a_checkpoint_is_kept_beside_it_never_in_a_training_runs_folder(self, tiny, tmp_path,
                                                                                             monkeypatch, capsys):
        monkeypatch.chdir(tmp_path)
        recipe = ["--model", str(tiny), "--dataset", "synthetic", "--fold", "1", "--epochs", "1",
                  "--train-length", "16", "--test-episodes", "4", "--test-seeds", "1", "--workers", "0"]
        train.main(recipe)  # A, 1-shot
        train.main([*recipe, "--shot", "2"])  # B, 2-shot
        a, b = (Path("runs") / f"tinynet-synthetic-fold1-{k}shot-epochs=1-train_length=16" for k in (1, 2))
        capsys.readouterr()
        # A's recipe, evaluated 2-shot: the folder B trained in by name, but the evaluation is kept beside A
        train.main([*recipe, "--shot", "2", "--eval-only", "--checkpoint", str(a / "last.pt")])
        evaluation = a / "eval-last-synthetic-fold1-2shot-epochs=1-train_length=16"
        assert f"run folder {evaluation}\n" in capsys.readouterr().out
        with pytest.raises(SystemExit) as err:  # nor with --out naming B's folder
            train.main([*recipe, "--shot", "2", "--eval-only", "--checkpoint", str(a / "last.pt"), "--out", str(b)])
        assert str(err.value.code) == (f"error: {b} holds a training run: an evaluation of another checkpoint is not "
                                       "written into its log; give another --out")
        results = [r for r in common.read_jsonl(b / "metrics.jsonl") if r["event"] == "result"]
        assert len(results) == 1 and results[0] == train.read_result(b)  # B's result is still its own
        train.main([*recipe, "--shot", "2", "--eval-only", "--checkpoint", str(b / "last.pt"), "--out", str(b)])
        assert len([r for r in common.read_jsonl(b / "metrics.jsonl") if r["event"] == "result"]) == 2  # its own

    def test_eval_only_without_checkpoint_is_refused(self, tiny, tmp_path, capsys):
        with pytest.raises(SystemExit):
            train.main(tiny_args(tiny, tmp_path, "--eval-only"))
        assert "--eval-only needs --checkpoint" in capsys.readouterr().err

    @pytest.mark.parametrize("dataset", ["pascal", "coco"])
    @pytest.mark.parametrize("model", sorted(RECIPES))
    def test_default_recipe_is_the_run_behind_each_papers_table(self, model, dataset):
        args, _ = train.parse_args(["--model", model, "--dataset", dataset])
        assert (args.lr, args.batch_size, args.epochs, args.img_size, args.augment) == RECIPES[model][dataset]
        assert (args.test_episodes, args.test_seeds) == ({"pascal": 1000, "coco": 5000}[dataset], 5)
        given, _ = train.parse_args(["--model", model, "--dataset", dataset, "--lr", "0.1", "--augment", "pfenet",
                                     "--test-episodes", "7"])  # the command line wins over every recipe
        assert (given.lr, given.augment, given.test_episodes, given.batch_size) == (0.1, "pfenet", 7, args.batch_size)

    def test_qpenet_epochs_follow_the_official_config_of_each_fold_and_backbone(self):
        """config/pascal/pascal_split{0-3}_resnet50.yaml: 100, 100, 100, 50 epochs; resnet101: 150 (its deep stem too);
        --fold all resolves each fold's own; the command line wins."""
        epochs = lambda *flags: train.parse_args(["--model", "qpenet", *flags])[0]  # noqa: E731
        assert [epochs("--fold", str(k)).epochs for k in range(4)] == [100, 100, 100, 50]
        assert [one.epochs for one in epochs("--fold", "all").folds] == [100, 100, 100, 50]
        assert epochs("--backbone", "resnet101", "--fold", "3").epochs == 150
        assert (epochs("--backbone", "resnet101_deep").epochs == 150
                and epochs("--backbone", "resnet50_deep").epochs == 100)
        assert epochs("--backbone", "vgg16_bn").epochs == 100  # a backbone the configs do not name: ResNet-50's
        assert (epochs("--fold", "3", "--epochs", "7").epochs == 7
                and epochs("--dataset", "coco", "--fold", "3").epochs == 50)

    def test_a_recipe_value_may_depend_on_a_set_value_the_fold_and_the_backbone(self):
        value = {"width=8": {"resnet101": 1, "resnet50": {0: 2, 3: 3}}, "width=16": 4}
        run = lambda fold, backbone, values: argparse.Namespace(fold=fold, backbone=backbone, set=values)  # noqa: E731
        assert train.recipe_value(value, run(0, "resnet50", {"width": 16})) == 4
        assert train.recipe_value(value, run(0, "resnet101", {"width": 8})) == 1
        assert train.recipe_value(value, run(3, "resnet50_deep", {})) == 3  # no --set: the first entry, the default's
        assert train.recipe_value(value, run("all", "vgg16_bn", {"width": 4})) == 1  # no such entry: the first one

    @pytest.mark.parametrize("dataset, end_to_end, scales", [("pascal", True, (0.75, 1.0, 1.25)),
                                                             ("coco", True, (0.75, 1.0, 1.25)),
                                                             ("synthetic", True, (1.0,)),
                                                             ("fss1000", True, (0.75, 1.0, 1.25))])
    def test_crcnet_recipe_trains_end_to_end_and_tests_at_three_scales(self, dataset, end_to_end, scales):
        args, module = train.parse_args(["--model", "crcnet", "--dataset", dataset])
        if dataset == "fss1000":  # Tables 14, 15: §5.1's one recipe, PASCAL's
            assert (args.lr, args.batch_size, args.epochs, args.img_size, args.augment) == RECIPES["crcnet"]["pascal"]
        cfg = train.make_config(module, args)  # §5.1 end to end; the synthetic quick start tests at one scale
        assert (cfg.train_encoder, tuple(cfg.test_scales)) == (end_to_end, scales)
        args, module = train.parse_args(["--model", "crcnet", "--dataset", dataset, "--freeze-encoder",
                                         "--test-scales", "1", "1.5"])
        assert (train.make_config(module, args).train_encoder, train.make_config(module, args).test_scales) == \
            (False, [1.0, 1.5])

    def test_a_recipe_value_that_names_no_flag_is_refused(self, tmp_path):
        path = tmp_path / "badrecipe.py"
        path.write_text(TINY_MODEL.replace('dict(lr=0.05, batch_size=4', 'dict(no_such_flag=3, lr=0.05, batch_size=4'))
        with pytest.raises(SystemExit, match="recipe value no_such_flag=3 names no flag"):
            train.parse_args(["--model", str(path), "--dataset", "synthetic"])

    def test_result_reports_the_mean_and_spread_over_the_test_seeds(self, tiny, tmp_path, capsys):
        train.main(tiny_args(tiny, tmp_path, "--epochs", "1", "--test-episodes", "6", "--test-seeds", "3"))
        out = capsys.readouterr().out
        record = read_metrics(tmp_path)[-1]
        printed = [float(line.split("mIoU ")[1].split()[0]) for line in out.splitlines()
                   if line.startswith("test seed")]
        assert printed == pytest.approx([100 * v for v in record["seed_miou"]], abs=0.006) and len(printed) == 3
        assert record["miou"] == pytest.approx(np.mean(record["seed_miou"]))
        assert record["miou_std"] == pytest.approx(np.std(record["seed_miou"], ddof=1))
        assert record["fbiou_std"] == pytest.approx(np.std(record["seed_fbiou"], ddof=1))
        res = result_line(out)
        assert float(res["miou_std"]) == pytest.approx(100 * record["miou_std"], abs=0.006)
        assert float(res["fbiou"]) == pytest.approx(100 * record["fbiou"], abs=0.006)
        assert f"+- {100 * record['miou_std']:.2f}" in out
        assert train.spread([0.5])[0] == 0.5 and math.isnan(train.spread([0.5])[1])  # one seed: no spread

    def test_training_and_evaluation_are_fp32_unless_bf16_is_asked(self, tiny, tmp_path, monkeypatch):
        real, calls = train.autocast, []

        def recording(device, bf16):
            calls.append((sys._getframe(1).f_code.co_name, bf16))
            return real(device, bf16)

        monkeypatch.setattr(train, "autocast", recording)
        for flags, expected in [((), {("loss_of", False), ("evaluate", False)}),  # train's loss_of and evaluate
                                (("--bf16", "--bf16-eval"), {("loss_of", True), ("evaluate", True)})]:
            calls.clear()
            train.main(tiny_args(tiny, tmp_path / str(len(flags)), "--epochs", "1", "--test-episodes", "2",
                                 "--test-seeds", "1", *flags))
            assert set(calls) == expected
        with warnings.catch_warnings():  # torch warns that CUDA is absent here; only the context's kind matters
            warnings.simplefilter("ignore")
            assert isinstance(real(torch.device("cuda"), False), contextlib.nullcontext)
            assert isinstance(real(torch.device("cuda"), True), torch.autocast)
        assert isinstance(real(torch.device("cpu"), True), contextlib.nullcontext)

    # ---------------- no run is ever lost; bad input gets one line --------------------------------------------

    def test_a_new_run_does_not_replace_the_run_in_its_folder(self, tiny, tmp_path):
        flags = ["--epochs", "1", "--test-episodes", "2", "--test-seeds", "1"]
        train.main(tiny_args(tiny, tmp_path, *flags))
        before = (tmp_path / "last.pt").read_bytes()
        with pytest.raises(SystemExit) as err:
            train.main(tiny_args(tiny, tmp_path, *flags, "--seed", "5"))
        assert str(err.value.code) == (f"error: {tmp_path} holds a run already (tinynet on synthetic fold 1, 1-shot, "
                                       "resnet50, epoch 1 of 1): continue it with --resume, replace it with "
                                       "--overwrite, or give another --out")
        # start, train, result
        assert (tmp_path / "last.pt").read_bytes() == before and len(read_metrics(tmp_path)) == 3
        train.main(tiny_args(tiny, tmp_path, *flags, "--seed", "5", "--overwrite"))
        assert (tmp_path / "last.pt").read_bytes() != before
        assert [r["event"] for r in read_metrics(tmp_path)] == ["start", "train", "result"]  # one run's log
        assert read_metrics(tmp_path)[0]["args"]["seed"] == 5

    def test_a_second_run_on_a_folder_in_use_is_refused_with_the_first_ones_pid(self, tiny, tmp_path):
        holder = subprocess.Popen([sys.executable, "-c", (
            "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.lockf(f, fcntl.LOCK_EX); "
            "f.write(f'{os.getpid()}\\n'); f.flush(); print('held', flush=True); time.sleep(60)"),
            str(tmp_path / ".lock")],
            stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            with pytest.raises(SystemExit) as err:
                train.main(tiny_args(tiny, tmp_path, "--epochs", "1"))
            assert str(err.value.code) == (f"error: the run folder {tmp_path} is in use by another run (process "
                                           f"{holder.pid}); wait for it to end or give another --out")
            assert not (tmp_path / "metrics.jsonl").exists()
        finally:
            holder.kill()
            holder.wait()
        train.main(tiny_args(tiny, tmp_path, "--epochs", "1", "--test-episodes", "2", "--test-seeds", "1"))  # free now

    def test_resume_cleans_a_stale_temporary_and_its_log_reads_as_one_run(self, tiny, tmp_path, capsys):
        flags = ["--epochs", "3", "--log-every", "1", "--test-episodes", "2", "--test-seeds", "1"]
        train.main(tiny_args(tiny, tmp_path / "whole", *flags))
        with pytest.raises(RuntimeError, match="simulated crash"):  # 4 steps an epoch: dies in epoch 2 after 2 steps
            train.main(tiny_args(tiny, tmp_path / "cut", *flags, "--crash-after", "6"))
        (tmp_path / "cut" / ".last.pt.k2j4x.tmp").write_bytes(b"half a checkpoint")  # a save that SIGKILL cut short
        train.main(tiny_args(tiny, tmp_path / "cut", *flags, "--resume"))
        assert f"removed {tmp_path / 'cut' / '.last.pt.k2j4x.tmp'}" in capsys.readouterr().out
        assert not list((tmp_path / "cut").glob("*.tmp"))
        steps = lambda out: [(r["epoch"], r["step"], round(r["loss"], 6)) for r in read_metrics(out)
                             if r["event"] == "train"]
        assert steps(tmp_path / "cut") == steps(tmp_path / "whole")  # epoch 2's first records are not there twice
        assert [r["event"] for r in read_metrics(tmp_path / "cut")].count("resume") == 1

    def test_resume_or_evaluate_with_another_runs_checkpoint_says_what_it_is(self, tiny, tmp_path):
        train.main(tiny_args(tiny, tmp_path / "a", "--epochs", "1", "--test-episodes", "2", "--test-seeds", "1"))
        with pytest.raises(SystemExit) as err:
            train.main([*tiny_args(tiny, tmp_path / "a", "--epochs", "2", "--resume"), "--fold", "2"])
        assert str(err.value.code) == (f"error: --resume: {tmp_path / 'a' / 'last.pt'} is a checkpoint of tinynet on "
                                       "synthetic fold 1, 1-shot, resnet50, not of tinynet on synthetic fold 2, "
                                       "1-shot, resnet50 (fold differ): give the flags it was trained with, or "
                                       "another --out")
        other = tmp_path / "othernet.py"
        other.write_text(TINY_MODEL.replace("self.head = nn.Conv2d(", "self.head2 = nn.Conv2d(")
                         .replace("self.head(x)", "self.head2(x)"))
        with pytest.raises(SystemExit) as err:
            train.main(["--model", str(other), "--eval-only", "--checkpoint", str(tmp_path / "a" / "last.pt"),
                        "--out", str(tmp_path / "b"), "--workers", "0"])
        message = str(err.value.code)
        assert message.startswith(f"error: the weights in {tmp_path / 'a' / 'last.pt'} do not fit this model (tinynet "
                                  "on synthetic fold 1") and "head2.weight" in message and "\n" not in message

    def test_a_failed_save_keeps_the_last_checkpoint_and_leaves_no_temporary(self, tiny, tmp_path, monkeypatch):
        real_save, saves = torch.save, []

        def full_disk(obj, f, *a, **kw):
            saves.append(f)
            if len(saves) == 2:  # epoch 2's checkpoint: part of it is written, then the disk is full
                f.write(b"\0" * 1000)
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0\nmore")
            return real_save(obj, f, *a, **kw)

        monkeypatch.setattr(torch, "save", full_disk)
        argv = tiny_args(tiny, tmp_path, "--epochs", "3")
        with pytest.raises(SystemExit) as err:
            train.main(argv)
        last = tmp_path / "last.pt"
        assert str(err.value.code) == (f"error: could not write {last} ([enforce fail at inline_container.cc:672] . "
                                       f"unexpected pos 64 vs 0; is the disk full?): {last} is left as it was; free "
                                       f"space there (or give another --out), then continue with: python train.py "
                                       f"{' '.join(argv)} --resume")
        assert torch.load(last, weights_only=False)["epoch"] == 1 and not list(tmp_path.glob("*.tmp"))
        monkeypatch.setattr(torch, "save", real_save)  # space again: the command it gave continues the run
        train.main([*argv, "--resume"])
        assert torch.load(last, weights_only=False)["epoch"] == 3

    def test_an_unwritable_run_folder_is_refused_before_anything_runs(self, tiny, tmp_path, capsys):
        (tmp_path / "file").write_text("not a folder")
        with pytest.raises(SystemExit) as err:
            train.main(tiny_args(tiny, tmp_path / "file" / "run", "--epochs", "1"))
        assert str(err.value.code).startswith(f"error: cannot write to the run folder {tmp_path / 'file' / 'run'}: ")
        assert "training:" not in capsys.readouterr().out

    def test_ctrl_c_prints_one_line_that_says_how_to_resume_and_exits_130(self, tiny, tmp_path):
        argv = tiny_args(tiny, tmp_path, "--epochs", "400", "--log-every", "1")
        code, out, err = _stop_while_training(argv, signal.SIGINT, (tmp_path / "last.pt").exists)  # at a checkpoint
        assert code == 130, err[-2000:]
        assert "Traceback" not in err and err.strip().count("\n") == 0
        assert err.strip() == (f"interrupted: {tmp_path / 'last.pt'} holds the last finished epoch; continue with: "
                               f"python train.py {' '.join(argv)} --resume")

    def test_a_run_stopped_before_its_first_checkpoint_is_started_again_by_the_command_it_gives(self, tiny, tmp_path):
        argv = tiny_args(tiny, tmp_path, "--epochs", "400", "--train-length", "4000", "--log-every", "1")
        log = tmp_path / "metrics.jsonl"
        started = lambda: log.exists() and '"train"' in log.read_text()  # noqa: E731
        code, out, err = _stop_while_training(argv, signal.SIGTERM, started)
        assert code == train.EXIT_TERMINATED and not (tmp_path / "last.pt").exists(), err[-2000:]
        command = f"python train.py {' '.join(argv)} --resume"
        assert err.strip() == (f"stopped by SIGTERM before the first epoch was saved: nothing was kept; start it again "
                               f"with: {command}")
        # that command is taken (the folder holds the stopped run's log): --resume starts the run afresh (here
        # shortened, which a run without a checkpoint allows)
        train.main([*command.split()[2:], "--epochs", "1", "--train-length", "8"])
        assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1

    def test_fold_all_table_equals_the_four_single_fold_runs_and_is_collected_again(self, tiny, tmp_path, capsys):
        flags = ["--epochs", "1", "--test-episodes", "6", "--test-seeds", "2"]
        singles = [train.main(tiny_args(tiny, tmp_path / f"fold{k}", *flags, "--fold", str(k))) for k in range(4)]
        capsys.readouterr()
        records = train.main(tiny_args(tiny, tmp_path / "all", *flags, "--fold", "all"))
        out = capsys.readouterr().out
        assert [(r["fold"], r["miou"], r["fbiou"]) for r in records] == [(k, *s) for k, s in enumerate(singles)]
        per_seed = np.array([r["seed_miou"] for r in records]).mean(0)  # the mean's spread: of the per-seed means
        res = result_line(out)
        assert res["fold"] == "all" and float(res["miou"]) == pytest.approx(100 * np.mean(singles, 0)[0], abs=0.006)
        assert float(res["miou_std"]) == pytest.approx(100 * np.std(per_seed, ddof=1), abs=0.006)
        table = out[out.index("four folds"):]
        rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:7]}
        for k, r in enumerate(records):
            assert rows[str(k)] == [f"{100 * r['miou']:.2f}", "+-", f"{100 * r['miou_std']:.2f}",
                                    f"{100 * r['fbiou']:.2f}", "+-", f"{100 * r['fbiou_std']:.2f}"]
        assert rows["mean"][:3] == [res["miou"], "+-", res["miou_std"]]
        assert "| model | shot | fold 0 | fold 1 | fold 2 | fold 3 | mean mIoU | mean FB-IoU |" in table
        assert f"| tinynet | 1 | {100 * records[0]['miou']:.1f} ± {100 * records[0]['miou_std']:.1f} |" in table
        # run again: every fold is complete, so nothing trains and the table is collected from the folds' logs
        again = train.main(tiny_args(tiny, tmp_path / "all", *flags, "--fold", "all"))
        out = capsys.readouterr().out
        assert out.count("its result taken from metrics.jsonl") == 4 and "training:" not in out
        assert result_line(out) == res and [r["miou"] for r in again] == [r["miou"] for r in records]
        # --eval-only over the four checkpoints gives the same table
        evaluated = train.main(tiny_args(tiny, tmp_path / "all", *flags, "--fold", "all", "--eval-only"))
        assert [r["miou"] for r in evaluated] == [r["miou"] for r in records]
        assert result_line(capsys.readouterr().out) == res

    def test_fold_all_resumes_where_it_stopped(self, tiny, tmp_path, capsys):
        flags = ["--epochs", "2", "--test-episodes", "4", "--test-seeds", "1"]
        with pytest.raises(RuntimeError, match="simulated crash"):  # fold 0 completes, fold 1 dies in its 2nd epoch
            train.main(tiny_args(tiny, tmp_path / "all", *flags, "--fold", "all", "--crash-after", "6",
                                 "--crash-fold", "1"))
        assert train.read_result(tmp_path / "all" / "fold0") is not None and not (tmp_path / "all" / "fold2").exists()
        assert torch.load(tmp_path / "all" / "fold1" / "last.pt", weights_only=False)["epoch"] == 1
        capsys.readouterr()
        records = train.main(tiny_args(tiny, tmp_path / "all", *flags, "--fold", "all"))
        out = capsys.readouterr().out
        assert ("fold 0: complete" in out
                and f"resumed from {tmp_path / 'all' / 'fold1' / 'last.pt'} after epoch 1" in out)
        assert out.count("training:") == 3  # folds 1 (resumed), 2 and 3
        whole = train.main(tiny_args(tiny, tmp_path / "one", *flags, "--fold", "1"))
        assert (records[1]["miou"], records[1]["fbiou"]) == whole  # as if it had never stopped

    def test_bad_dataset_files_stop_the_run_with_one_message(self, tiny, tmp_path):
        root = _write_pascal(tmp_path / "voc")
        flags = ["--model", str(tiny), "--dataset", "pascal", "--data-root", str(root), "--img-size", "32",
                 "--batch-size", "2", "--epochs", "1", "--test-episodes", "2", "--test-seeds", "1"]
        # a training image that decodes badly inside a DataLoader worker: one line naming it, not the worker's traceback
        # (damaged after the scan, which decodes every image, has passed it and cached its counts: the cache trusts it)
        files = data.build_dataset("pascal", "train", 0, img_size=32, root=root).files
        jpeg = root / "JPEGImages" / "a_voc.jpg"
        jpeg.write_bytes(jpeg.read_bytes()[:2000] + b"\xff" * (jpeg.stat().st_size - 2000))
        _cache_trusts_the_files_as_they_are(root / ".fss_cache" / "pascal_train_counts.json", root, files)
        with pytest.raises(SystemExit) as err:
            train.main([*flags, "--workers", "1", "--out", str(tmp_path / "a")])
        assert str(err.value.code).startswith(f"error: cannot read image {jpeg}: ") and "\n" not in str(err.value.code)
        # no test image holds a class of fold 3 (16-20) with 2048 pixels
        with pytest.raises(SystemExit) as err:
            train.main([*flags, "--workers", "0", "--fold", "3", "--eval-only", "--model", "baseline",
                        "--baseline-features", "image", "--out", str(tmp_path / "b")])
        assert str(err.value.code).startswith("error: no pascal test image has a class of [16, 17, 18, 19, 20] with "
                                              ">= 2048 pixels")
        proc = run_cli(["train.py", "--model", "baseline", "--dataset", "pascal", "--out", str(tmp_path / "c")])
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert proc.stderr.startswith("error: no data root given for pascal: pass --data-root DIR")

    def test_bad_files_of_the_training_and_the_test_list_come_in_one_message(self, tiny, tmp_path):
        """Every listed file is decoded once before anything else (check_data), and the bad files of both lists are
        named together: one round of fixing, not one per list."""
        root = _write_pascal(tmp_path / "voc")
        for name in ("a_voc", "v1"):  # a_voc is a training image, v1 a test image
            jpeg = root / "JPEGImages" / f"{name}.jpg"
            jpeg.write_bytes(jpeg.read_bytes()[:2000])
        with pytest.raises(SystemExit) as err:
            train.main(["--model", str(tiny), "--dataset", "pascal", "--data-root", str(root), "--img-size", "32",
                        "--epochs", "1", "--workers", "0", "--out", str(tmp_path / "run")])
        message = str(err.value.code)
        assert "PASCAL train list" in message and "PASCAL test list" in message
        assert str(root / "JPEGImages" / "a_voc.jpg") in message and str(root / "JPEGImages" / "v1.jpg") in message
        assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing ran

    def test_a_rewrite_that_fails_leaves_the_file_and_no_temporary(self, tmp_path, monkeypatch):
        log = tmp_path / "metrics.jsonl"
        log.write_text('{"event": "start"}\n{"event": "train", "epoch": 2}\n')

        def full(fd):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(common.SaveError, match="is the disk full.*is left as it was"):
            common.cut_log(log, 1)  # what --resume does to the log: its rewrite fails
        assert (log.read_text() == '{"event": "start"}\n{"event": "train", "epoch": 2}\n'
                and not list(tmp_path.glob(".*")))

    # ---------------- resume keeps the recipe; logs, NaN, signals, locks and flags that lose nothing ----------

    def test_resume_takes_the_recipe_of_its_checkpoint_and_refuses_another(self, tiny, tmp_path, capsys):
        """`--resume` alone continues the run as it was trained (epochs, batch, lr, seed, the model's flags), a flag
        given with another value is refused with both, and one that may change (workers, evaluation) is taken."""
        recipe = ["--epochs", "3", "--batch-size", "2", "--lr", "0.01", "--seed", "4", "--width", "8"]
        whole = train.main(tiny_args(tiny, tmp_path / "whole", *recipe, "--train-length", "8"))
        with pytest.raises(RuntimeError, match="simulated crash"):  # 4 steps an epoch: dies in epoch 2
            train.main(tiny_args(tiny, tmp_path / "cut", *recipe, "--train-length", "8", "--crash-after", "5"))
        bare = ["--model", str(tiny), "--dataset", "synthetic", "--fold", "1", "--out", str(tmp_path / "cut")]
        for flag, value, saved in (("--lr", "0.02", "0.01"), ("--epochs", "6", "3"), ("--batch-size", "4", "2"),
                                   ("--seed", "0", "4"), ("--train-length", "16", "8"), ("--width", "16", "8")):
            with pytest.raises(SystemExit) as err:
                train.main([*bare, "--resume", flag, value])
            message = str(err.value.code)
            assert message.startswith(f"error: --resume: {tmp_path / 'cut' / 'last.pt'} was trained with "
                                      f"{flag} {saved}")
            assert f"(now {value})" in message.replace("'", "") and "--lr, " in message and "\n" not in message
        capsys.readouterr()
        resumed = train.main([*bare, "--resume", "--workers", "0", "--test-episodes", "12", "--test-seeds", "2"])
        out = capsys.readouterr().out
        assert "training: 8 episodes/epoch, 4 steps of 2, 3 epochs, lr 0.01" in out and resumed == whole
        state = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
        assert state["epoch"] == 3 and state["args"]["lr"] == 0.01 and state["args"]["width"] == 8  # the model's flag
        assert state["args"]["crash_after"] is None  # a flag that may change on resume (EVALUATION_FLAGS) is not kept

    def test_resume_of_a_folder_that_holds_no_run_is_refused(self, tiny, tmp_path):
        # a default folder is named by the flags given: --resume without them names another folder, where it would
        # train a new run from the start with the default recipe
        with pytest.raises(SystemExit) as err:
            train.main(["--model", str(tiny), "--dataset", "synthetic", "--out", str(tmp_path / "empty"), "--resume"])
        assert str(err.value.code) == (f"error: --resume: {tmp_path / 'empty'} holds no run to continue: give the "
                                       "flags the run was started with, or its --out")
        assert not list(tmp_path.rglob("*.pt"))

    def test_resume_keeps_the_recipes_set_fields_and_takes_an_evaluation_field_given_now(self, tiny, tmp_path):
        """--resume --set: a field of the recipe stays as trained, one of EVALUATION_FLAGS (invert) is taken as
        given now, into the arguments and the Config alike."""
        run = ["--model", str(tiny), "--dataset", "synthetic", "--fold", "1", "--out", str(tmp_path / "run"),
               "--epochs", "1", "--train-length", "8", "--test-episodes", "2", "--test-seeds", "1", "--workers", "0"]
        train.main([*run, "--set", "width=8"])
        args, module = train.parse_args([*run, "--resume", "--set", "invert=1"])
        assert args.set == {"width": 8, "invert": 1}
        assert (train.make_config(module, args).width, train.make_config(module, args).invert) == (8, 1)
        with pytest.raises(SystemExit, match=r"was trained with --set width=8 \(now width=16\)"):
            train.parse_args([*run, "--resume", "--set", "invert=1", "width=16"])

    def test_resume_before_the_first_checkpoint_starts_the_run(self, tiny, tmp_path, capsys):
        """A run killed before its first checkpoint leaves a log: a plain rerun points to --resume, which starts it."""
        flags = ["--epochs", "1", "--test-episodes", "2", "--test-seeds", "1"]
        with pytest.raises(RuntimeError, match="simulated crash"):
            train.main(tiny_args(tiny, tmp_path, *flags, "--crash-after", "1"))
        assert not (tmp_path / "last.pt").exists() and (tmp_path / "metrics.jsonl").exists()
        with pytest.raises(SystemExit, match="continue it with --resume"):
            train.main(tiny_args(tiny, tmp_path, *flags))
        train.main(tiny_args(tiny, tmp_path, *flags, "--resume"))
        assert "has no checkpoint yet: the run starts from its first epoch" in capsys.readouterr().out
        assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
        assert [r["event"] for r in read_metrics(tmp_path)] == ["start", "resume", "start", "train", "result"]

    def test_checkpoints_hold_plain_values_and_files_that_would_run_code_are_refused(self, tiny, tmp_path, capsys):
        """Every file train.py writes loads with weights_only=True; a last.pt crafted to run a command when unpickled
        is refused with one line by every entry point, and its command never runs."""
        flags = ["--epochs", "1", "--test-episodes", "2", "--test-seeds", "1"]
        train.main(tiny_args(tiny, tmp_path / "good", *flags))
        state = torch.load(tmp_path / "good" / "last.pt", weights_only=True)  # raises on anything but plain values
        assert state["epoch"] == 1 and isinstance(state["args"]["out"], str)
        marker = tmp_path / "ran"

        class Payload:  # unpickling calls os.system(...): what a malicious checkpoint would do
            def __reduce__(self):
                return os.system, (f"touch {marker}",)

        bad = tmp_path / "bad"
        bad.mkdir()
        torch.save({**state, "epoch": Payload()}, bad / "last.pt")
        img = np.zeros((20, 20, 3), np.uint8)
        Image.fromarray(img).save(tmp_path / "q.jpg")
        Image.fromarray(np.full((20, 20), 255, np.uint8)).save(tmp_path / "m.png")
        calls = [
            tiny_args(tiny, bad, *flags, "--resume"),  # --resume
            ["--eval-only", "--checkpoint", str(bad / "last.pt"), "--out", str(tmp_path / "e")],  # --eval-only
            ["--predict", "--checkpoint", str(bad / "last.pt"), "--support", str(tmp_path / "q.jpg"), "--support-mask",
             str(tmp_path / "m.png"), "--query", str(tmp_path / "q.jpg")],  # --predict
            ["--eval-only", "--vis", "1", "--checkpoint", str(bad / "last.pt"), "--out", str(tmp_path / "v")],  # --vis
            ["--model", str(tiny), "--eval-only", "--fold", "all", "--checkpoint",
             str(tmp_path / "fold{fold}" / "last.pt")],  # --fold all
        ]
        (tmp_path / "fold0").mkdir()
        (tmp_path / "fold0" / "last.pt").write_bytes((bad / "last.pt").read_bytes())
        for argv in calls:
            with pytest.raises(SystemExit) as err:
                train.main(argv)
            message = str(err.value.code)
            assert "cannot read checkpoint" in message and "\n" not in message, argv
            assert message.endswith("holds objects other than tensors and plain values (Trying to load unsupported "
                                    "GLOBAL posix.system whose module posix is blocked), and loading them could run "
                                    "code: refused") and "weights_only" not in message, message  # never the way around
        with open(tmp_path / "plain.pkl", "wb") as f:  # a plain pickle, a text file: not torch.save's, in one line
            pickle.dump({"epoch": Payload()}, f, protocol=4)
        (tmp_path / "text.pt").write_text("not a checkpoint\n")
        for name, reason in (("plain.pkl", "Unsupported operand 149"), ("text.pt", "Unsupported operand 110")):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # and without torch's warning first
                with pytest.raises(SystemExit) as err:
                    train.main(["--eval-only", "--checkpoint", str(tmp_path / name), "--out", str(tmp_path / "p")])
            assert str(err.value.code) == (f"error: cannot read checkpoint {tmp_path / name}: not a whole file of "
                                           f"torch.save (UnpicklingError: {reason})")
        with pytest.raises(SystemExit, match="holds a run already .*cannot be read"):  # a new run into its folder
            train.main(tiny_args(tiny, bad, *flags))
        torch.save({"model": {}, "classes": [1], "backbone": Payload()}, tmp_path / "base.pt")  # a stage's file
        with pytest.raises(common.WeightsUnavailableError, match="cannot read"):
            symnet.read_base_learner(symnet.Config(base_learner=str(tmp_path / "base.pt")), common.Setting())
        with pytest.raises(common.WeightsUnavailableError, match="cannot read") as err:
            qgnet.read_stage1_file(tmp_path / "base.pt", hint=". Make it with: python train.py --stage prior")
        assert "Make it" not in str(err.value)  # a crafted file is refused, not offered to be made again
        assert not marker.exists()

    def test_evaluation_scores_do_not_depend_on_the_evaluation_batch(self, tiny, tmp_path):
        train.main(tiny_args(tiny, tmp_path / "t", "--epochs", "1", "--test-episodes", "2", "--test-seeds", "1"))
        evals = ["--eval-only", "--checkpoint", str(tmp_path / "t" / "last.pt"), "--test-episodes", "7"]
        scores = {b: train.main(tiny_args(tiny, tmp_path / f"e{b}", *evals, "--eval-batch-size", str(b)))
                  for b in (1, 3, 7)}
        assert scores[1] == pytest.approx(scores[3], abs=1e-12) and scores[1] == pytest.approx(scores[7], abs=1e-12)
        assert train.parse_args(tiny_args(tiny, tmp_path))[0].eval_batch_size == 1  # the official codes' one

    def test_update_never_steps_on_a_nonfinite_loss_or_gradient(self):
        w = nn.Parameter(torch.tensor([1.0, 2.0]))
        optimizer = torch.optim.SGD([w], 0.1, 0.9, weight_decay=1e-4, fused=True)

        def update(loss):  # fit's step
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            train.step_if_finite(optimizer, [w], loss)

        update((w ** 2).sum())  # a finite step: w <- w - 0.1 * (2w + 1e-4 w)
        expected = torch.tensor([1.0, 2.0]) * (1 - 0.1 * (2 + 1e-4))
        assert torch.allclose(w.detach(), expected)
        momentum = optimizer.state[w]["momentum_buffer"].clone()
        for loss in ((w ** 2).sum() * float("nan"), (w ** 2).sum() * float("inf"), (w * torch.tensor([1e38, 1e38])
                                                                                    ).pow(2).sum() * 0):
            before = w.detach().clone()
            update(loss)  # NaN, inf, and a NaN loss (inf * 0) whose gradient is finite (0)
            assert torch.equal(w.detach(), before) and torch.equal(optimizer.state[w]["momentum_buffer"], momentum)
        before = w.detach().clone()
        update((w * 1e10).pow(2).sum())  # gradients of 2e20 w: finite, though their L2 norm overflows to inf
        assert torch.isfinite(w).all() and not torch.equal(w.detach(), before)
        assert train.count_step(lambda: update((w ** 2).sum()))["syncs"] == []  # decided on the device
        with pytest.raises(ValueError, match=r"needs torch.optim.SGD\(..., fused=True\)"):
            train.fit(lambda batch: ((w ** 2).sum(), {}), torch.optim.SGD([w], lr=0.1), lambda epoch: [0],
                      lambda it: 0.1, 1, 1)

    def test_fit_schedules_averages_logs_and_stops_on_a_nonfinite_loss(self, tmp_path):
        """train.fit, the loop of every run and extra stage (QGNet's prior, Sym-Net's base learner), on loss = w^2
        with plain SGD (w <- w - lr * 2w)."""
        w = nn.Parameter(torch.tensor(2.0))
        optimizer = torch.optim.SGD([w], 0.0, fused=True)
        lrs, lines, ends, log_file = [], [], [], tmp_path / "log.jsonl"

        def step(x):
            lrs.append(optimizer.param_groups[0]["lr"])
            loss = (w * x) ** 2
            return loss, {"double": 2 * loss}

        train.fit(step, optimizer, lambda epoch: [torch.tensor(1.0)] * 3, lambda it: 0.1 / (it + 1), 2, 3,
                  log_every=2, per_step=4, unit="images", tag="[t] ", log=lines.append, log_file=log_file,
                  event="t", end_epoch=ends.append)
        assert lrs == pytest.approx([0.1 / (it + 1) for it in range(6)]) and ends == [0, 1]
        records = [json.loads(line) for line in log_file.read_text().splitlines()]
        assert [(r["event"], r["epoch"], r["step"]) for r in records] == [("t", 1, 2), ("t", 1, 3), ("t", 2, 2),
                                                                           ("t", 2, 3)]
        # steps 1 and 2: w = 2, then 2 - 0.1 * 4 = 1.6; the mean loss of the interval is (4 + 2.56) / 2
        assert records[0]["loss"] == pytest.approx(3.28) and records[0]["double"] == pytest.approx(6.56)
        assert records[1]["loss"] == pytest.approx((1.6 - 0.05 * 3.2) ** 2)  # step 3 alone: w = 1.44
        assert lines[0].startswith("[t] epoch 1/2 step 2/3 loss 3.2800 (double 6.5600) lr 5.00e-02 ")
        assert "images/s ETA 0:00:" in lines[0] and "images_per_s" in records[0]
        with pytest.raises(train.NonFiniteLossError, match="became nan in epoch 1 at step 2"):
            train.fit(lambda x: (w * float("nan"), {}), optimizer, lambda epoch: [0] * 3, lambda it: 0.1, 1, 3,
                      log_every=2, log=lines.append)

    def test_fit_under_ddp_logs_and_stops_on_the_mean_over_ranks(self, monkeypatch):
        # another rank's loss went NaN: this rank's own is finite, and it must stop too (or it waits forever)
        other_rank = {"loss": float("nan")}

        def all_reduce(t, op=None):  # a 2-process SUM in which the other rank holds other_rank's mean loss
            if op == dist.ReduceOp.MAX:  # step_if_finite's skip flag: the other rank's is 0 (its loss is finite)
                return
            t += torch.tensor([other_rank["loss"], 0.0])

        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(dist, "all_reduce", all_reduce)
        w = nn.Parameter(torch.tensor(1.0))
        optimizer, lines = torch.optim.SGD([w], 0.0, fused=True), []
        step = (lambda x: ((w * x) ** 2, {"zero": torch.tensor(0.0)}))
        with pytest.raises(train.NonFiniteLossError, match="became nan in epoch 1 at step 1"):
            train.fit(step, optimizer, lambda epoch: [torch.tensor(1.0)], lambda it: 0.0, 1, 1, log=lines.append)
        other_rank["loss"] = 3.0
        train.fit(step, optimizer, lambda epoch: [torch.tensor(1.0)], lambda it: 0.0, 1, 1, log=lines.append)
        assert lines[-1].startswith("epoch 1/1 step 1/1 loss 2.0000")  # (1 + 3) / 2: the mean over the ranks

    def test_a_checkpoint_is_never_written_from_nonfinite_weights(self, tiny, tmp_path, monkeypatch, capsys):
        real, steps = train.step_if_finite, []

        def poison(optimizer, params, loss):  # epoch 2's last step makes the weights infinite: its loss was finite
            real(optimizer, params, loss)
            steps.append(1)
            if len(steps) == 8:
                with torch.no_grad():
                    optimizer.param_groups[0]["params"][0].fill_(float("inf"))

        monkeypatch.setattr(train, "step_if_finite", poison)
        with pytest.raises(SystemExit) as stop:
            train.main(tiny_args(tiny, tmp_path, "--epochs", "2", "--test-episodes", "2", "--test-seeds", "1"))
        assert stop.value.code == train.EXIT_NONFINITE
        assert (f"error: the weights are no longer finite; stopping. the last good checkpoint is {tmp_path / 'last.pt'}"
                in capsys.readouterr().out)
        assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1

    def test_a_log_that_cannot_be_appended_stops_in_one_line_and_a_torn_line_is_dropped(self, tiny, tmp_path,
                                                                                        monkeypatch, capsys):
        flags = ["--epochs", "2", "--log-every", "1", "--test-episodes", "2", "--test-seeds", "1"]
        real_open, writes = open, []

        class FullDisk:  # the 6th record written to metrics.jsonl: part of it reaches the file, then ENOSPC
            def __init__(self, f):
                self.f = f

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def write(self, line):
                writes.append(line)
                if len(writes) == 6:
                    self.f.write(line[:7])
                    raise OSError(28, "No space left on device")
                return self.f.write(line)

        def opening(path, mode="r", *a, **kw):
            f = real_open(path, mode, *a, **kw)
            return FullDisk(f) if str(path).endswith("metrics.jsonl") and "a" in mode else f

        monkeypatch.setattr("builtins.open", opening)
        argv = tiny_args(tiny, tmp_path, *flags)
        with pytest.raises(SystemExit) as err:
            train.main(argv)
        monkeypatch.undo()
        assert str(err.value.code) == (f"error: could not append to {tmp_path / 'metrics.jsonl'} (No space left on "
                                       "device; is the disk full?): the records before it are kept; free space there "
                                       f"(or give another --out), then continue with: python train.py {' '.join(argv)} "
                                       "--resume")
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 5 and all(json.loads(line) for line in lines)  # no torn line
        # a torn last line (a crash in the middle of a write) is dropped on resume, with a note
        with open(tmp_path / "metrics.jsonl", "a") as f:
            f.write('{"event": "tra')
        capsys.readouterr()
        train.main(tiny_args(tiny, tmp_path, *flags, "--resume"))
        assert "dropped the last line of" in capsys.readouterr().err
        assert read_metrics(tmp_path)[-1]["event"] == "result"
        # a damaged record in the middle (by hand, or by the disk): one line that says how to mend it
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        (tmp_path / "metrics.jsonl").write_text("\n".join([*lines[:2], lines[2][:9], *lines[3:]]) + "\n")
        with pytest.raises(SystemExit) as err:
            train.main(tiny_args(tiny, tmp_path, *flags, "--resume"))
        assert str(err.value.code) == (f"error: {tmp_path / 'metrics.jsonl'} line 3 is not a JSON record "
                                       f"({lines[2][:9]!r}): repair or delete that line (the other records and the "
                                       "checkpoints are intact)")

    def test_a_signal_during_a_checkpoint_write_waits_for_the_file_to_be_whole(self, tmp_path, monkeypatch):
        real_save = torch.save

        def interrupted_save(obj, f, *a, **kw):  # Ctrl-C arrives in the middle of the write
            os.kill(os.getpid(), signal.SIGINT)
            return real_save(obj, f, *a, **kw)

        monkeypatch.setattr(torch, "save", interrupted_save)
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's, whatever the shell left
        try:
            with pytest.raises(KeyboardInterrupt):
                common.save_atomic({"w": torch.ones(3)}, tmp_path / "last.pt")
        finally:
            signal.signal(signal.SIGINT, previous)
        assert torch.equal(torch.load(tmp_path / "last.pt", weights_only=True)["w"], torch.ones(3))
        assert not list(tmp_path.glob("*.tmp"))
        with pytest.raises(TypeError, match="is not a plain value"):  # nothing but plain values is ever saved
            common.save_atomic({"w": object()}, tmp_path / "other.pt")

    def test_sigterm_stops_like_ctrl_c_with_a_whole_checkpoint_and_the_command_that_continues(self, tiny, tmp_path):
        argv = tiny_args(tiny, tmp_path, "--epochs", "400", "--log-every", "1", "--workers", "2")
        code, out, err = _stop_while_training(argv, signal.SIGTERM, (tmp_path / "last.pt").exists)
        assert code == train.EXIT_TERMINATED, err[-2000:]
        assert "Traceback" not in err and err.strip().count("\n") == 0
        assert err.strip() == (f"stopped by SIGTERM: {tmp_path / 'last.pt'} holds the last finished epoch; continue "
                               f"with: python train.py {' '.join(argv)} --resume")
        assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] >= 1

    def test_sigterm_to_the_whole_process_group_stops_cleanly_and_a_stuck_worker_is_ended(self, tiny, tmp_path):
        """A scheduler signals the process group: the workers outlive the main process's stop (WORKER_GRACE), so
        it ends with its line, not with a worker's death. A worker that does not end when the DataLoader tells it
        (here: one stuck in its episode) ends by the DataLoader's SIGTERM: the run does not wait for ever."""
        argv = tiny_args(tiny, tmp_path, "--epochs", "400", "--log-every", "1", "--workers", "2")
        proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            for _ in range(1200):
                if (tmp_path / "last.pt").exists() or proc.poll() is not None:
                    break
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGTERM)
            out, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == train.EXIT_TERMINATED and err.startswith("\nstopped by SIGTERM"), err[-2000:]
        stuck = (f"import sys, time, torch; sys.path.insert(0, {str(REPO)!r}); import train\n"
                 "class Stuck(torch.utils.data.Dataset):\n"
                 "    def __len__(self): return 4\n"
                 "    def __getitem__(self, i): time.sleep(0 if i == 0 else 1000); return i\n"
                 "loader = iter(torch.utils.data.DataLoader(Stuck(), num_workers=1, prefetch_factor=2,\n"
                 "                                          worker_init_fn=train.ignore_stop_signals))\n"
                 "print(next(loader).item(), flush=True)\n"
                 "del loader  # shutdown: the worker, stuck, does not end when told; the DataLoader's SIGTERM ends it\n"
                 "print('done')\n")
        proc = subprocess.run([sys.executable, "-c", stuck], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.split() == ["0", "done"], proc.stderr[-2000:]

    @pytest.mark.parametrize("with_out", [False, True])
    def test_ctrl_c_inside_fold_all_names_the_fold_and_what_it_kept(self, tiny, tmp_path, with_out):
        tiny.write_text(TINY_MODEL.replace("epochs=2,", "epochs={0: 1, 1: 400, 2: 400, 3: 400},"))  # by fold
        base = ["--model", str(tiny), "--dataset", "synthetic", "--train-length", "16", "--test-episodes", "2",
                "--test-seeds", "1", "--workers", "0"]
        folder = (lambda k: tmp_path / "all" / f"fold{k}") if with_out else (
            lambda k: Path("runs") / f"tinynet-synthetic-fold{k}-1shot-train_length=16")  # relative to the working dir
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), *base, "--fold", "0", "--out",
                               str(tmp_path / folder(0))], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]  # fold 0 is complete: --fold all takes it as it is
        argv = [*base, *(["--out", str(tmp_path / "all")] if with_out else []), "--fold", "all", "--log-every", "1"]
        code, out, err = _stop_while_training(argv, signal.SIGINT, (tmp_path / folder(1) / "last.pt").exists, tmp_path)
        assert code == 130 and "Traceback" not in err, err[-2000:]
        assert err.strip() == (f"interrupted in fold 1 of --fold all: {folder(1) / 'last.pt'} holds the last finished "
                               f"epoch; continue with: python train.py {' '.join(argv)}")

    def test_the_run_folder_lock_is_the_run_process_alone(self, tmp_path):
        """DataLoader workers are forked with the lock file open: when the run is killed, a worker that lingers must
        not hold the folder (a requeued job would be refused, naming a dead process)."""
        script = (f"import os, sys, time, argparse; sys.path.insert(0, {str(REPO)!r}); import train; "
                  "from pathlib import Path; args = argparse.Namespace(out=Path(sys.argv[1]), resume=False, "
                  "overwrite=False); "
                  "held = train.hold_run_folder(args, False, ()); held.__enter__(); child = os.fork(); "
                  "(time.sleep(60), os._exit(0)) if child == 0 else None; print(child, flush=True); time.sleep(60)")
        run = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        child = int(run.stdout.readline())
        try:
            args = argparse.Namespace(out=tmp_path, resume=False, overwrite=False)
            with pytest.raises(SystemExit, match=f"in use by another run \\(process {run.pid}\\)"):
                with train.hold_run_folder(args, False, ()):
                    pass
            run.kill()  # SIGKILL: its forked child still has the lock file open
            run.wait()
            os.kill(child, 0)  # still alive
            with train.hold_run_folder(args, False, ()):  # the folder is free at once
                assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
        finally:
            run.kill()
            os.kill(child, signal.SIGKILL)

    def test_checkpoint_paths_and_files_of_other_tools_get_one_line(self, tmp_path):
        with pytest.raises(SystemExit, match="does not exist"):  # braces other than {fold} are part of the name
            train.main(["--eval-only", "--checkpoint", str(tmp_path / "{x}" / "last.pt")])
        for name, state in (("a.pt", {"model": {"w": torch.ones(1)}, "config": [1], "args": {"model": "m"}}),
                            ("b.pt", {"model": "weights", "config": {}, "args": {}, "epoch": 1}),
                            ("c.pt", {"model": {"w": torch.ones(1)}, "config": {}, "args": {"lr": 1}, "epoch": 1})):
            torch.save(state, tmp_path / name)
            with pytest.raises(SystemExit, match="is not a checkpoint of train.py"):
                train.main(["--eval-only", "--checkpoint", str(tmp_path / name)])

    def test_predict_names_each_query_apart_and_an_unwritable_folder_in_one_line(self, tiny, tmp_path):
        train.main(tiny_args(tiny, tmp_path / "run", "--epochs", "1", "--test-episodes", "2", "--test-seeds", "1"))
        img = np.zeros((30, 40, 3), np.uint8)
        img[5:25, 10:30] = 200
        for sub in ("a", "b"):
            (tmp_path / sub).mkdir()
            Image.fromarray(img).save(tmp_path / sub / "photo.jpg")
        Image.fromarray((img[..., 0] > 0).astype(np.uint8) * 255).save(tmp_path / "m.png")
        predict = ["--predict", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--support",
                   str(tmp_path / "a" / "photo.jpg"), "--support-mask", str(tmp_path / "m.png"), "--query",
                   str(tmp_path / "a" / "photo.jpg"), "--query", str(tmp_path / "b" / "photo.jpg"), "--workers", "0"]
        train.main(predict)  # default folder: the checkpoint's folder/predict
        assert sorted(p.name for p in (tmp_path / "run" / "predict").iterdir()) == [
            "photo-2_mask.png", "photo-2_overlay.png", "photo_mask.png", "photo_overlay.png"]
        (tmp_path / "file").write_text("")
        with pytest.raises(SystemExit) as err:
            train.main([*predict, "--out", str(tmp_path / "file" / "pred")])
        assert str(err.value.code).startswith(f"error: cannot write the predictions to {tmp_path / 'file' / 'pred'}")

    def test_a_stage_is_a_run_locked_never_replaced_resumable_and_cleaned(self, tiny, tmp_path, monkeypatch, capsys):
        monkeypatch.setattr(common, "RUNS_DIR", str(tmp_path / "runs"))
        path = tmp_path / "runs" / "tiny-count-fold1" / "count.pt"
        flags = tiny_args(tiny, tmp_path / "ignored", "--stage", "count")
        train.main([*flags, "--epochs", "2"])
        assert torch.load(path, weights_only=True)["epoch"] == 2
        before = path.read_bytes()
        with pytest.raises(SystemExit) as err:  # run again: the file is not replaced
            train.main([*flags, "--epochs", "2"])
        assert str(err.value.code).startswith(f"error: {path.parent} holds a run already (count.pt, epoch 2)")
        assert path.read_bytes() == before
        (path.parent / ".count.pt.x1y2.tmp").write_bytes(b"half")  # a save that SIGKILL cut short
        capsys.readouterr()
        train.main([*flags, "--epochs", "4", "--resume"])
        out = capsys.readouterr().out
        assert f"removed {path.parent / '.count.pt.x1y2.tmp'}" in out and "[count] epoch 3/4" in out
        assert "[count] epoch 1/4" not in out and torch.load(path, weights_only=True)["epoch"] == 4
        path.write_bytes(path.read_bytes()[:100])  # truncated
        with pytest.raises(SystemExit) as err:
            train.main([*flags, "--epochs", "5", "--resume"])
        assert str(err.value.code).startswith(f"error: cannot read {path}") and "\n" not in str(err.value.code)
        train.main([*flags, "--epochs", "1", "--overwrite", "--set", "target=3"])  # --set: the stage's own fields
        assert torch.load(path, weights_only=True)["epoch"] == 1 and torch.load(path)["target"] == 3.0
        with pytest.raises(SystemExit) as err:
            train.main([*flags, "--set", "width=8"])
        assert err.value.code == 2 and "tinynet's CountConfig has no field 'width' (FIELD=VALUE; its fields: " \
            "target)" in capsys.readouterr().err

    # ---------------- the folder dataset through the harness --------------------------------------------------

    def test_folder_dataset_trains_evaluates_visualises_and_predicts_through_the_harness(self, tiny, tmp_path, capsys):
        root, out = _write_folder(tmp_path / "mine"), tmp_path / "run"
        train.main(["--model", str(tiny), "--dataset", "folder", "--data-root", str(root), "--fold", "1", "--img-size",
                    "48", "--epochs", "1", "--batch-size", "2", "--test-episodes", "6", "--test-seeds", "1",
                    "--workers", "0", "--vis", "2", "--out", str(out)])
        text = capsys.readouterr().out
        assert "training: 14 episodes/epoch, 7 steps of 2" in text  # the 14 training images of fold 1
        result = read_metrics(out)[-1]
        assert (result["event"] == "result" and result["dataset"] == "folder"
                and sorted(result["per_class"]) == ["2", "5"])
        assert "dog" in text and "tree" in text  # the class table names them from classes.txt
        vis = sorted(p.name for p in (out / "vis").glob("*.png"))
        assert len(vis) == 2 and all(name.endswith(("_dog.png", "_tree.png")) for name in vis)
        state = torch.load(out / "last.pt", weights_only=False)
        assert state["args"]["dataset"] == "folder" and state["args"]["augment"] == "pfenet"
        train.main(["--predict", "--checkpoint", str(out / "last.pt"), "--support", str(root / "images" / "dog_0.jpg"),
                    "--support-mask", str(root / "labels" / "dog_0.png"), "--query", str(root / "images" / "dog_1.jpg"),
                    "--out", str(tmp_path / "pred"), "--workers", "0"])
        pred = np.array(Image.open(tmp_path / "pred" / "dog_1_mask.png"))
        assert pred.shape == (80, 80) and set(np.unique(pred)) <= {0, 255}

    def test_folder_baseline_fold_all_test_classes_and_run_folders(self, tmp_path, capsys, monkeypatch):
        monkeypatch.setattr(common, "RUNS_DIR", str(tmp_path / "runs"))
        root = _write_folder(tmp_path / "mine")
        flags = ["--model", "baseline", "--baseline-features", "image", "--dataset", "folder", "--data-root", str(root),
                 "--img-size", "48", "--test-episodes", "4", "--test-seeds", "1", "--workers", "0"]
        records = train.main([*flags, "--fold", "all"])
        assert [sorted(map(int, r["per_class"])) for r in records] == [[1, 4], [2, 5], [3], [6]]  # folds.txt
        assert "| baseline | 1 |" in capsys.readouterr().out  # the four-fold table
        folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
        digest = folders[0].split("-")[3]  # the root's name, then a hash of its path
        assert len(digest) == 6 and set(digest) <= set("0123456789abcdef")
        tag = f"folder-mine-{digest}"
        given = "baseline_features=image-img_size=48"  # the recipe flags given name the folder too
        assert folders == [f"baseline-{tag}-fold{k}-1shot-{given}" for k in range(4)]
        train.main([*flags, "--test-classes", "6,3"])
        assert (read_metrics(tmp_path / "runs" / f"baseline-{tag}-classes3-6-1shot-{given}")[-1]["per_class"].keys()
                == {"3", "6"})
        # two roots of one name, two sets of test classes: four run folders
        other = _write_folder(tmp_path / "elsewhere" / "mine")
        outs = {train.parse_args([*flags, "--data-root", str(r), *extra])[0].out
                for r in (root, other) for extra in (["--test-classes", "3"], ["--test-classes", "3,6"])}
        assert len(outs) == 4
        capsys.readouterr()
        for extra, message in (
                (["--fold", "all", "--test-classes", "3"],
                 "--test-classes names the novel classes itself: drop --fold all"),
                (["--fold", "1", "--test-classes", "3"],
                 "drop --fold 1 (--fold K and --fold all take a folder dataset's folds from its folds.txt)"),
                (["--test-classes", "3,x"], "must be class ids >= 1 separated by commas (e.g. 3,7,9), got '3,x'"),
                (["--test-classes", "3", "--dataset", "pascal"],
                 "--test-classes chooses the novel classes of --dataset folder; pascal's are its folds (--fold)")):
            with pytest.raises(SystemExit):
                train.parse_args([*flags, *extra])
            assert message in capsys.readouterr().err

    @pytest.mark.parametrize("model", ["tiny", "baseline", "ocnet", "qgnet", "crcnet", "symnet", "qpenet"])
    def test_folder_runs_take_the_harness_recipe_where_a_model_has_none(self, model, tiny, tmp_path):
        name = str(tiny) if model == "tiny" else model
        module = train.load_model_module(name)
        assert "folder" not in getattr(module, "DEFAULTS", {})  # no model file has a folder recipe: the harness's
        args = train.parse_args(["--model", name, "--dataset", "folder", "--data-root", str(tmp_path)])[0]
        got = {k: getattr(args, k) for k in ("lr", "batch_size", "epochs", "img_size", "augment", "test_episodes",
                                             "test_seeds")}
        assert got == dict(lr=0.025, batch_size=4, epochs=200, img_size=473, augment="pfenet", test_episodes=1000,
                           test_seeds=5)  # PASCAL-5i's harness recipe and protocol
        assert train.HARNESS_DEFAULTS["folder"] == train.HARNESS_DEFAULTS["pascal"]

    # ---------------- host syncs: what --bench counts and the GPU relies on, on the CPU -----------------------

    def test_host_syncs_finds_each_kind_of_wait_and_nothing_else(self):
        x = torch.randn(6, requires_grad=True)
        m = x.detach() > 0

        def waits(fn):
            return train.count_step(fn)["syncs"]

        assert waits(lambda: x.sum().item()) == ["_local_scalar_dense"]
        assert waits(lambda: bool(x.sum() > 0)) == ["_local_scalar_dense"]  # `if t:` and float(t) too
        assert waits(lambda: torch.where(m)) == ["nonzero"]
        assert waits(lambda: x[m].sum().backward()) == ["index (boolean mask)", "index_put (boolean mask)"]
        assert waits(lambda: torch.unique(m)) == ["_unique2"]
        assert waits(lambda: x.detach().masked_select(m)) == ["masked_select"]
        assert waits(lambda: torch.equal(x, x)) == ["equal"] and waits(lambda: torch.bincount(m.long())) == ["bincount"]
        assert waits(lambda: x.repeat_interleave(torch.tensor([1, 2, 1, 1, 1, 1]))) == ["repeat_interleave"]
        assert waits(lambda: x.repeat_interleave(3)) == []  # an int says the size: nothing to wait for
        assert waits(lambda: (x.masked_fill(m, 0) * 2).sum().backward()) == []  # masks used arithmetically are fine
        assert waits(lambda: x[torch.tensor([0, 2])]) == []  # integer indexing knows its size
        with FakeTensorMode():  # device tensors without a device: only their place matters here
            on_gpu, on_cpu = torch.empty(3, device="cuda"), torch.empty(3)
        assert train.sync_op(torch.ops.aten._to_copy.default, (on_gpu,), {"device": torch.device("cpu")})
        assert not train.sync_op(torch.ops.aten._to_copy.default, (on_cpu,), {"device": torch.device("cuda")})
        assert not train.sync_op(torch.ops.aten._to_copy.default, (on_gpu,), {"dtype": torch.float16})
        assert train.sync_op(torch.ops.aten.copy_.default, (on_cpu, on_gpu), {})
        assert not train.sync_op(torch.ops.aten.copy_.default, (on_gpu, on_cpu), {})  # host to device: queued


# ==========================================================================================================
# ocnet.py: OCNet (GOMM, CCM with DCT pooling and Sinkhorn), in the paper's order: the whole network at 1 and 5
# shots; the CAM and M_g, GOMM, MFP, the selection, Sinkhorn's target, CCM, the loss against direct computations
# (one episode through the whole model among them); K shots; every ablation row of §5.3
# ==========================================================================================================

OCNET_EPISODE = dict(size=OCNET_SIZE, q_box=(8, 30, 12, 38), s_box=(15, 42, 5, 28), shot_step=0)  # episode(B, S, **)


def _cos(a, b):
    """Cosine of two vectors, written out."""
    return (a * b).sum() / (a.norm() * b.norm())


def _set_identity(*linears):
    with torch.no_grad():
        for lin in linears:
            lin.weight.copy_(torch.eye(lin.weight.shape[0]))
            lin.bias.zero_()


def _capture_inputs(module):
    """Forward pre-hook that records the positional inputs of module's next calls."""
    seen = []
    handle = module.register_forward_pre_hook(lambda mod, args: seen.append([a.detach().clone() for a in args]))
    return seen, handle


def _slot_prototypes(cost, f_q, p_s):
    """The index into p_s (1,L,C) of the prototype behind each cost channel, found by matching 1 - cos(F_q, p)."""
    ids = []
    for c in range(cost.shape[1]):
        errs = [(cost[0, c] - (1 - F.cosine_similarity(f_q[0], p_s[0, l, :, None, None], dim=0))).abs().max().item()
                for l in range(p_s.shape[1])]
        l = min(range(len(errs)), key=errs.__getitem__)
        assert errs[l] < 1e-5, (c, errs)
        ids.append(l)
    return ids


# ---------------- one 2-shot episode through the whole model, by hand -------------------------------------

# One 2-shot episode, run once with hooks and shared by the tests below (a forward of the whole model is the
# costly part of each test)

def ocnet_two_shot_episode(seed=0):
    """episode(1, 2, **OCNET_EPISODE) with shot 1's mask replaced: another box, and a wide band of 255 across it.
    -> img_q, img_s, m_s, m_q."""
    img_q, img_s, m_s, m_q = episode(1, 2, seed=seed, **OCNET_EPISODE)
    m_s[:, 1] = 0
    m_s[:, 1, 20:44, 10:40] = 1  # shot 1: another box than shot 0
    m_s[:, 1, 32:] = IGNORE_INDEX  # a wide ignored band over the lower part of shot 1 and of its object
    return img_q, img_s, m_s, m_q


@contextlib.contextmanager
def ocnet_training_without_dropout(model):
    """model in training mode, so that forward also returns what only the loss reads (M_g, M̂_g, M̂_pa, the costs),
    with every dropout at p = 0: deterministic outputs, the logits those of evaluation. Mode and rates restored."""
    drops = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    rates, mode = [m.p for m in drops], model.training
    for m in drops:
        m.p = 0.0
    try:
        yield model.train()
    finally:
        for m, p in zip(drops, rates):
            m.p = p
        model.train(mode)


@pytest.fixture(scope="module")
def ocnet_run(ocnet_resnet):
    """The 2-shot episode through the model (training mode, dropout off: ocnet_training_without_dropout), with the
    inputs of the CCM and of the query generalization, the GOMM's F_g and the backbone's layer4 recorded."""
    model = ocnet_resnet
    img_q, img_s, m_s, m_q = ocnet_two_shot_episode()
    ccm_in, h1 = _capture_inputs(model.ccm)
    gen_in, h2 = _capture_inputs(model.generalize)
    seen = {}

    def record(name, value):  # a forward hook must return None, or its value replaces the module's output
        seen[name] = value.detach().clone()

    h3 = model.gomm.register_forward_hook(lambda mod, args, out: record("f_g", out[0]))
    h4 = model.backbone.register_forward_hook(lambda mod, args, out: record("layer4", out["layer4"]))
    try:
        with torch.no_grad(), ocnet_training_without_dropout(model):
            out = model(img_q, img_s, m_s)
    finally:
        h1.remove(), h2.remove(), h3.remove(), h4.remove()
    return dict(episode=(img_q, img_s, m_s, m_q), out=out, ccm_in=ccm_in[0], gen_in=gen_in[0][0], **seen)


# §5.3's ablations: each row's Config fields, the learnable and the frozen parameters it removes (written out for
# ResNet-50 and C = 256, N_g = 16), the default model's modules those are, and the loss terms it keeps
_C, _N_G = 256, 16
_ATTEN = 4 * _C * _C + 4 * _C  # nn.MultiheadAttention: in_proj (3C x C + 3C), out_proj (C x C + C)
_GOMM = _N_G * _C + 2 * _C * _C + 9 * _C * _C + 2 * _C + 2 + _ATTEN  # P_g, fuse 1x1, head 3x3 + 1x1 (no/with bias)
_CCM = 4 * (_C * _C + _C)  # the four "LN" of Eq. (13-14)
_CAM = 1000 * 2048 + 1000  # ResNet-50's ImageNet fc, frozen
_ALL_TERMS = {"target", "general", "allocation"}
OCNET_ABLATIONS = {  # row -> (fields, learnable removed, frozen removed, the default's modules removed, loss terms)
    "gomm=false": (dict(gomm=False), _GOMM, _CAM, ("gomm", "cam"), {"target", "allocation"}),
    "ccm=false": (dict(ccm=False), _CCM, 0, ("ccm",), {"target", "general"}),
    "gomm=false ccm=false": (dict(gomm=False, ccm=False), _GOMM + _CCM, _CAM, ("gomm", "cam", "ccm"), {"target"}),
    "cam=false": (dict(cam=False), 0, _CAM, ("cam",), _ALL_TERMS),
    "mask=false": (dict(mask=False), 0, 0, (), _ALL_TERMS),
    "atten=false": (dict(atten=False), _ATTEN, 0, ("gomm.attention",), _ALL_TERMS),
    "mask=false atten=false": (dict(mask=False, atten=False), _ATTEN, 0, ("gomm.attention",), _ALL_TERMS),
    # Mean: no "LN", and the decoder's 1x1 stem (no bias) reads 3C channels instead of 2C
    "allocation=mean": (dict(allocation="mean"), _CCM - _C * _C, 0, ("ccm",), {"target", "general"}),
    "allocation=cosine": (dict(allocation="cosine"), 0, 0, (), {"target", "general"}),
    "allocation=fore": (dict(allocation="fore"), 0, 0, (), _ALL_TERMS),
}


def ocnet_prior_and_cam(model, img_q, img_s, m_s):
    """The prior mask of Eq. (1) and the CAM (None without one) from model's backbone, recomputed here: F_s^h is
    layer4 of the masked layer3 (PFENet.py:209-210). -> prior, cam (B,1,h,w)."""
    B, S = img_s.shape[:2]
    with torch.no_grad():
        f_q4 = model.backbone(img_q)["layer4"]
        f_s3 = model.backbone(img_s.flatten(0, 1))["layer3"]
        m = F.interpolate((m_s.flatten(0, 1) == 1).float()[:, None], f_s3.shape[-2:], mode="bilinear",
                          align_corners=True)
        f_s4 = model.backbone.stages["layer4"](f_s3 * m).view(B, S, *f_q4.shape[1:])
        return common.cosine_prior(f_q4, f_s4, m_s), None if model.cam is None else model.cam(f_q4)


class TestOCNet:
    # ---------------- Fig. 2: 1 and 5 shots, evaluation's outputs, channels_last, empty masks, the Config -----

    @pytest.mark.parametrize("backbone,feat", [("resnet50", 7), ("vgg16_bn", 4)])
    def test_ocnet_forward_shapes_one_and_five_shot(self, ocnet_models, backbone, feat):
        # training: the logits and what the loss reads; evaluation: the logits alone
        model = ocnet_models[backbone]
        n2 = 2 * model.cfg.num_select
        for batch, shot in ((2, 1), (1, 5)):
            img_q, img_s, m_s, _ = episode(batch, shot, **OCNET_EPISODE)
            with torch.no_grad():
                logits = model.eval()(img_q, img_s, m_s)
                out = model.train()(img_q, img_s, m_s)
            model.eval()
            assert set(logits) == {"logits"} and logits["logits"].shape == (batch, 2, OCNET_SIZE, OCNET_SIZE)
            assert set(out) == {"logits", "logits_g", "m_g", "logits_pa", "cost_pa"}
            assert out["logits"].shape == (batch, 2, OCNET_SIZE, OCNET_SIZE)
            assert out["logits_g"].shape == (batch, 2, feat, feat) and out["m_g"].shape == (batch, feat, feat)
            assert out["logits_pa"].shape == out["cost_pa"].shape == (batch, n2, feat, feat)
            assert set(out["m_g"].unique().tolist()) <= {0, 1} and out["m_g"].dtype == torch.long
            assert all(torch.isfinite(v.float()).all() for v in out.values())
            assert (out["cost_pa"] >= -1e-5).all() and (out["cost_pa"] <= 2 + 1e-5).all()  # 1 - cosine

    def test_ocnet_evaluation_computes_nothing_only_the_loss_reads(self, ocnet_resnet, ocnet_run, monkeypatch):
        # M_g (so the CAM's Grad-CAM), M̂_g (GOMM's head), the transport costs and P_s before dropout are the loss's
        # alone: evaluation computes none of them, and its logits are those of training without dropout
        model = ocnet_resnet.eval()
        img_q, img_s, m_s, _ = ocnet_run["episode"]
        calls, pooled = {"cam": 0, "head": 0}, []
        hooks = [model.cam.register_forward_hook(lambda *_: calls.update(cam=calls["cam"] + 1)),
                 model.gomm.head.register_forward_hook(lambda *_: calls.update(head=calls["head"] + 1))]
        ccm_out = []
        hooks.append(model.ccm.register_forward_hook(lambda mod, args, out: ccm_out.append(out)))
        mfp = ocnet.multi_frequency_pooling
        monkeypatch.setattr(ocnet, "multi_frequency_pooling", lambda f, m, n: pooled.append(len(f)) or mfp(f, m, n))
        try:
            with torch.no_grad():
                out = model(img_q, img_s, m_s)
        finally:
            for hook in hooks:
                hook.remove()
        assert set(out) == {"logits"} and calls == {"cam": 0, "head": 0}
        (_, logits_pa, cost), = ccm_out
        assert logits_pa is None and cost is None
        assert pooled == [2]  # P_s of the 2 shots once, not of the shots before and after dropout (4)
        assert torch.equal(out["logits"], ocnet_run["out"]["logits"])

    def test_ocnet_channels_last_gives_the_same_outputs(self, ocnet_models):
        # train.py converts the model to channels_last on CUDA: reshapes must not assume contiguous features
        model = copy.deepcopy(ocnet_models["resnet50"]).eval()
        img_q, img_s, m_s, _ = episode(2, 2, **OCNET_EPISODE)
        with torch.no_grad(), ocnet_training_without_dropout(model):  # every output, the loss's too
            ref = model(img_q, img_s, m_s)
            out = model.to(memory_format=torch.channels_last)(img_q, img_s, m_s)
        assert len(ref) == 5 and all(torch.allclose(ref[k].float(), out[k].float(), atol=1e-4) for k in ref)

    def test_ocnet_empty_support_or_query_mask_gives_no_nan(self, ocnet_models):
        model = ocnet_models["resnet50"].train()
        img_q, img_s, m_s, m_q = episode(4, 1, **OCNET_EPISODE)
        m_s[0] = 0  # empty support mask
        m_q[1], m_q[2], m_q[3] = 0, 255, 1  # query: no foreground, nothing labelled, no background
        model.zero_grad(set_to_none=True)
        out = model(img_q, img_s, m_s)
        total, terms = model.loss(out, m_q, m_s)
        total.backward()
        assert torch.isfinite(total) and all(torch.isfinite(t) for t in terms.values())
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), sum(g is None for g in grads)
        assert torch.isfinite(model(img_q[:1], img_s[:1], torch.zeros_like(m_s[:1]))["logits"]).all()

    def test_ocnet_config_cam_switch_and_bad_values(self):
        model = ocnet.Model(ocnet.Config(pretrained=False, cam=False))
        assert model.cam is None
        with pytest.raises(ValueError, match="allocation must be one of fore\\+back, mean, cosine, fore, not 'back'"):
            ocnet.Model(ocnet.Config(pretrained=False, allocation="back"))
        with pytest.raises(ValueError, match="needs the CAM or the Mask"):
            ocnet.Model(ocnet.Config(pretrained=False, cam=False, mask=False))

    def test_ocnet_config_values_that_build_no_network_are_value_errors(self):
        # --set values that would raise deep inside the build or the forward (IndexError, nn.MultiheadAttention's
        # AssertionError), divide by zero, or build another network than asked (fpn_levels=0 gives 1 level): a
        # ValueError each from Model.__init__, before the backbone is built. More selected prototypes than L = 49:
        # 2 N_s where ID_l is selected too (OCNet, "Cosine"), N_s where ID_t alone is ("Fore", "Mean")
        cases = [*[({name: 0}, f"{name} must be >= 1, got 0")
                   for name in ("reduce_dim", "num_select", "num_general", "fpn_levels", "dct_size", "sinkhorn_iters")],
                 (dict(ot_eps=0.0), "ot_eps must be > 0 (Sinkhorn divides the costs by it), got 0.0"),
                 *[(dict(attn_heads=k), f"attn_heads must divide reduce_dim = 256 (Atten's heads split C), got {k}")
                   for k in (3, 0, -8)],
                 *[(dict(num_select=25, allocation=a), f"2 * num_select = 50 exceeds the dct_size ** 2 = 49 prototypes "
                                                       f"(allocation={a})") for a in ("fore+back", "cosine")],
                 *[(dict(num_select=50, allocation=a), f"num_select = 50 exceeds the dct_size ** 2 = 49 prototypes "
                                                       f"(allocation={a})") for a in ("fore", "mean")],
                 (dict(dct_size=2, num_select=3), "2 * num_select = 6 exceeds the dct_size ** 2 = 4 prototypes "
                                                  "(allocation=fore+back)")]
        for fields, message in cases:
            with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
                ocnet.Model(ocnet.Config(pretrained=False, **fields))
        limits = (dict(num_select=24), dict(num_select=49, allocation="fore"), dict(num_select=49, allocation="mean"),
                  dict(attn_heads=4), dict(fpn_levels=1), dict(dct_size=1, num_select=1, allocation="fore"))
        for fields in limits:
            ocnet.check_config(ocnet.Config(pretrained=False, **fields))  # the limits themselves are accepted
        ccm = ocnet.CCM(8, num_select=49, pa_scale=10.0, allocation="fore")  # "Fore" selects N_s = L: it runs
        g = torch.Generator().manual_seed(0)
        f_s, m = torch.randn(1, 1, 8, 7, 7, generator=g), (torch.rand(1, 1, 7, 7, generator=g) > 0.5).float()
        p_s = ocnet.multi_frequency_pooling(f_s[:, 0], m[:, 0], 7)
        f_c, logits_pa, cost = ccm(f_s[:, 0], f_s[:, 0], f_s, m, p_s, p_s)
        assert logits_pa.shape == cost.shape == (1, 49, 7, 7) and f_c.shape == (1, 16, 7, 7)

    def test_ocnet_config_fields_a_switch_leaves_unread_are_refused(self):
        # a field changed beside the switch that removes its module would change nothing: gomm=false reads none of
        # GOMM's (its M_g, CAM, Mask, Atten), atten=false no heads, ccm=false none of CCM's, "Mean" and "Cosine" no
        # Sinkhorn and no L_p. The switches alone (every ablation row), and with fields they read, are accepted
        cases = [(dict(gomm=False, cam=False, mask=False), "cam, mask: no part of gomm=false"),
                 (dict(gomm=False, atten=False), "atten: no part of gomm=false"),
                 (dict(gomm=False, tau=0.5, num_general=8, attn_heads=4), "tau, num_general, attn_heads: no part of "
                                                                           "gomm=false"),
                 (dict(atten=False, attn_heads=4), "attn_heads: no part of atten=false"),
                 (dict(ccm=False, allocation="fore"), "allocation: no part of ccm=false"),
                 (dict(ccm=False, dct_size=5, num_select=0), "dct_size, num_select: no part of ccm=false"),
                 (dict(ccm=False, ot_eps=0.1, sinkhorn_iters=50, pa_scale=20.0), "ot_eps, sinkhorn_iters, pa_scale: "
                                                                                 "no part of ccm=false"),
                 (dict(allocation="mean", ot_eps=0.1), "ot_eps: no part of allocation=mean"),
                 (dict(allocation="cosine", pa_scale=20.0), "pa_scale: no part of allocation=cosine")]
        for fields, message in cases:
            with pytest.raises(ValueError, match=f"^{re.escape(message)} \\(it would change nothing\\)$"):
                ocnet.Model(ocnet.Config(pretrained=False, **fields))
        read = (dict(gomm=False, ccm=False, fpn_levels=3), dict(atten=False, mask=False, tau=0.5, num_general=8),
                dict(allocation="fore", ot_eps=0.1), dict(allocation="mean", num_select=4, dct_size=5),
                dict(ccm=False, attn_heads=4))
        for fields in (*(fields for fields, *_ in OCNET_ABLATIONS.values()), *read):
            ocnet.check_config(ocnet.Config(pretrained=False, **fields))


    # ---------------- §4.2, Eq. (1-2): the ImageNet CAM and the general object mask M_g -----------------------

    def test_ocnet_cam_takes_the_weight_files_own_classifier(self, pfenet_file, tmp_path):
        path, ref = pfenet_file
        torch.manual_seed(0)
        model = ocnet.Model(ocnet.Config(backbone="resnet50_deep", pretrained=str(path)))
        fc = model.cam.classifier[-1]
        assert fc is model.backbone.head and torch.equal(fc.weight, ref.fc.weight) and torch.equal(fc.bias, ref.fc.bias)
        assert not any(p.requires_grad for p in model.cam.parameters())
        state = model.state_dict()  # the classifier is saved once, as the CAM's, as for the torchvision backbones
        assert "cam.classifier.2.weight" in state and not any(k.startswith("backbone.head") for k in state)
        f_h = torch.rand(2, 2048, 4, 5)
        top = ref.fc(f_h.mean((2, 3))).argmax(1)  # CAM [65] of the file's top class
        expected = ocnet.minmax(F.relu(torch.einsum("bc,bchw->bhw", ref.fc.weight[top], f_h))[:, None])
        torch.testing.assert_close(model.cam(f_h), expected, atol=1e-5, rtol=1e-4)
        # a file without a classifier: a clear error, and cam=false needs none
        bare = tmp_path / "no_fc.pth"
        torch.save({k: v for k, v in torch.load(path, weights_only=True).items() if not k.startswith("fc.")}, bare)
        with pytest.raises(common.WeightsFileError, match="no ImageNet classifier.*--set cam=false"):
            ocnet.Model(ocnet.Config(backbone="resnet50_deep", pretrained=str(bare)))
        assert ocnet.Model(ocnet.Config(backbone="resnet50_deep", pretrained=str(bare), cam=False)).cam is None

    def test_ocnet_cam_of_torchvision_backbones_unchanged(self):
        torch.manual_seed(7)
        cam = ocnet.ImageNetCAM("resnet50", pretrained=False)
        torch.manual_seed(7)
        fc = torchvision.models.resnet50(weights=None).fc  # as ImageNetCAM built it before weight files existed
        assert torch.equal(cam.classifier[-1].weight, fc.weight) and torch.equal(cam.classifier[-1].bias, fc.bias)
        assert [type(m) for m in cam.classifier] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]
        deep = ocnet.ImageNetCAM("resnet50_deep", pretrained=False)  # random, like its backbone (checkpoints fill it)
        assert deep.classifier[-1].weight.shape == (1000, 2048)

    def test_ocnet_gradcam_is_cam_for_resnet_and_runs_under_no_grad(self):
        torch.manual_seed(0)
        cam = ocnet.ImageNetCAM("resnet50", pretrained=False)
        f_h = torch.rand(2, 2048, 5, 6)
        with torch.no_grad():  # as where the tests run a training forward (ocnet_training_without_dropout)
            out = cam(f_h)
        fc = cam.classifier[-1]
        top = fc(f_h.mean((2, 3))).argmax(1)  # (2,)
        expected = F.relu(torch.einsum("bc,bchw->bhw", fc.weight[top], f_h))[:, None]  # CAM [65] of the top class
        expected = ocnet.minmax(expected)
        assert out.shape == (2, 1, 5, 6) and torch.allclose(out, expected, atol=1e-5)
        assert out.amax((2, 3)).allclose(torch.ones(2, 1), atol=1e-5) and out.min() >= 0

    @pytest.mark.parametrize("backbone", ["resnet50", "vgg16_bn"])
    def test_ocnet_general_object_mask_is_thresholded_max_of_prior_and_cam(self, ocnet_models, backbone):
        model = ocnet_models[backbone].eval()
        img_q, img_s, m_s, _ = episode(2, 2, **OCNET_EPISODE)
        with torch.no_grad(), ocnet_training_without_dropout(model):  # M_g is made in training
            out = model(img_q, img_s, m_s)
        prior, cam = ocnet_prior_and_cam(model, img_q, img_s, m_s)  # PFENet.py:209-210: layer4 of masked layer3
        assert cam.shape == prior.shape and cam.min() >= 0 and cam.max() <= 1
        assert torch.equal(out["m_g"], (torch.maximum(prior, cam)[:, 0] >= 0.6).long())
        assert out["m_g"].flatten(1).sum(1).min() >= 1  # the prior's maximum is 1 >= tau in each image


    # ---------------- §4.2, Eq. (3-5): GOMM -------------------------------------------------------------------

    def test_ocnet_gomm_allocation_residual_and_attention_by_hand(self):
        # Identity projections make every step of Eq. (3-5) computable by hand: Conv1x1 = [I, I] (then ReLU), so
        # F_ig = ReLU(Alloc(P_g, Argmax cos(F_q, P_g)) + F_q); attention with identity in/out projections and 2 heads
        # is softmax(q k^T / sqrt(C/2)) v per half of the channels; F_g = that + F_q (Eq. 5's residual).
        g = torch.Generator().manual_seed(2)
        C, N_g, h, w = 4, 3, 2, 3
        gomm = ocnet.GOMM(C, N_g, heads=2, dropout=0.1).eval()
        with torch.no_grad():
            gomm.prototypes.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 1.0]]))
            gomm.fuse[0].weight.copy_(torch.cat([torch.eye(C), torch.eye(C)], 1)[..., None, None])
            gomm.attention.in_proj_weight.copy_(torch.eye(C).repeat(3, 1))
            gomm.attention.in_proj_bias.zero_()
        _set_identity(gomm.attention.out_proj)
        f_q = torch.randn(1, C, h, w, generator=g)
        with torch.no_grad():
            f_g, logits_g = gomm(f_q)

        # Eq. (3-4): the nearest prototype (largest cosine) at each pixel, found by a loop
        f_ig = torch.zeros(1, C, h, w)
        nearest = []
        for i in range(h):
            for j in range(w):
                sims = [_cos(f_q[0, :, i, j], gomm.prototypes[k]).item() for k in range(N_g)]
                k = max(range(N_g), key=sims.__getitem__)
                nearest.append(k)
                f_ig[0, :, i, j] = F.relu(gomm.prototypes[k].detach() + f_q[0, :, i, j])
        assert len(set(nearest)) > 1  # the pixels do not all pick one prototype: argmax and argmin differ here
        with torch.no_grad():
            assert torch.allclose(logits_g, gomm.head(f_ig), atol=1e-5)  # M̂_g is the head on F_ig

        # Eq. (5): multi-head attention by hand, plus the residual F_q
        q, kv = f_q.flatten(2)[0].T, f_ig.flatten(2)[0].T  # (hw, C)
        d = C // 2
        heads = []
        for s in (slice(0, d), slice(d, C)):
            weights = torch.softmax(q[:, s] @ kv[:, s].T / math.sqrt(d), dim=1)  # (hw, hw)
            heads.append(weights @ kv[:, s])
        attended = torch.cat(heads, 1).T.reshape(1, C, h, w)
        assert torch.allclose(f_g, attended + f_q, atol=1e-5)


    # ---------------- §4.3, Eq. (6): multi-frequency pooling, P_s; the query generalization's inputs (§5.1) ---

    def test_ocnet_mfp_first_component_is_map_and_dct_is_orthogonal(self):
        g = torch.Generator().manual_seed(0)
        f = torch.randn(3, 8, 6, 5, generator=g)
        m = (torch.rand(3, 24, 20, generator=g) > 0.5).float()
        m[2] = 0  # empty mask: zeros
        p = ocnet.multi_frequency_pooling(f, m, 7)
        assert p.shape == (3, 49, 8)
        assert torch.allclose(p[:, 0], common.masked_average_pooling(f, m), atol=1e-6)
        assert (p[2] == 0).all()
        basis = ocnet.dct_basis(6, 5, 3, "cpu").flatten(1)  # (9, 30)
        gram = basis @ basis.T
        assert torch.allclose(gram - torch.diag(gram.diag()), torch.zeros(9, 9), atol=1e-5)
        assert torch.allclose(basis[0], torch.ones(30)) and math.isclose(gram[0, 0].item(), 30, rel_tol=1e-6)
        # one component by hand: u = 1 along the rows, v = 0
        assert torch.allclose(basis[3].view(6, 5)[:, 0], torch.cos(math.pi * (torch.arange(6) + 0.5) / 6))

    def test_ocnet_mfp_every_component_by_hand(self):
        # each of the n*n components against sum(f * m * basis_l) / sum(m), the DCT-II cosines written out here;
        # component l = u * n + v (u along the rows). A soft mask checks that m weights the pixels linearly.
        g = torch.Generator().manual_seed(1)
        B, C, h, w, n = 2, 3, 6, 5, 4
        f = torch.randn(B, C, h, w, generator=g)
        m = torch.rand(B, h, w, generator=g)
        m[1, :3] = 0  # a partial mask
        p = ocnet.multi_frequency_pooling(f, m, n)
        assert p.shape == (B, n * n, C)
        for b in range(B):
            area = m[b].sum().item() + common.MAP_EPS
            for u in range(n):
                for v in range(n):
                    expected = torch.zeros(C)
                    for i in range(h):
                        for j in range(w):
                            basis = math.cos(math.pi * u * (i + 0.5) / h) * math.cos(math.pi * v * (j + 0.5) / w)
                            expected += f[b, :, i, j] * m[b, i, j] * basis
                    assert torch.allclose(p[b, u * n + v], expected / area, atol=1e-5), (b, u, v)

    def test_ocnet_support_prototypes_prior_and_generalization_inputs_by_hand(self, ocnet_run):
        # Step 4-5 with K = 2: the CCM receives P_s = the shot mean of Eq. (6)'s MFP of each shot (foreground = label 1
        # only, 255 is not foreground), and the query generalization gets [F_g from GOMM, P_s component 0 (MAP),
        # the prior of both shots]
        _, _, m_s, _ = ocnet_run["episode"]
        _, f_g, f_s, m, p_s, p_s_drop = ocnet_run["ccm_in"]
        assert torch.equal(p_s_drop, p_s)  # dropout off: P_s before and after it are one
        B, S, C, h, w = f_s.shape
        n = ocnet.Config.dct_size
        fg = F.interpolate((m_s == 1).float(), (h, w), mode="bilinear", align_corners=True)  # (B, S, h, w)
        assert torch.allclose(m, fg)
        ii, jj = torch.arange(h)[:, None] + 0.5, torch.arange(w)[None] + 0.5
        expected = torch.zeros(B, n * n, C)
        for u in range(n):
            for v in range(n):
                basis = torch.cos(math.pi * u * ii / h) * torch.cos(math.pi * v * jj / w)  # (h, w)
                for k in range(S):
                    pooled = (f_s[:, k] * (fg[:, k] * basis)[:, None]).sum((2, 3))  # (B, C)
                    expected[:, u * n + v] += pooled / (fg[:, k].sum((1, 2))[:, None] + common.MAP_EPS) / S
        assert torch.allclose(p_s, expected, atol=1e-4 * expected.abs().max().item())
        map_mean = sum(common.masked_average_pooling(f_s[:, k], (m_s[:, k] == 1).float()) for k in range(S)) / S
        x = ocnet_run["gen_in"]  # (B, 2C + 1, h, w)
        assert x.shape == (B, 2 * C + 1, h, w)
        assert torch.allclose(x[:, :C], ocnet_run["f_g"])
        assert torch.allclose(x[:, C:2 * C], map_mean[..., None, None].expand(-1, -1, h, w), atol=1e-5)
        f4 = ocnet_run["layer4"]  # the backbone's one call: [query, masked supports]
        f_q4, f_s4 = f4[:B], f4[B:].unflatten(0, (B, S))
        prior = sum(common.cosine_prior(f_q4, f_s4[:, k], m_s[:, k]) for k in range(S)) / S  # PFENet: shot mean
        assert torch.allclose(x[:, 2 * C:], prior, atol=1e-5)
        assert not torch.allclose(prior, common.cosine_prior(f_q4, f_s4[:, 0], m_s[:, 0]), atol=1e-3)  # both count


    # ---------------- §4.3, Eq. (7-10): prototype selection and the transport costs ---------------------------

    def test_ocnet_prototype_selection_by_hand(self):
        # support: e0 on the object (left half), e1 elsewhere; prototypes e0 (mask = M_s), e1, -e0, e0 + e1
        C, h, w = 4, 4, 4
        e = torch.eye(C)
        m = torch.zeros(1, 1, h, w)
        m[..., :2] = 1
        f_s = (m[:, :, None] * e[0, :, None, None] + (1 - m[:, :, None]) * e[1, :, None, None])  # (1, 1, C, h, w)
        p_s = torch.stack([e[1], e[0] + e[1], e[0], -e[0]])[None]  # (1, 4, C); nearest: e0, farthest: -e0
        ccm = ocnet.CCM(C, num_select=1, pa_scale=10.0)
        f_q = e[0, None, :, None, None].expand(1, C, 2, 2)  # every query pixel is e0
        f_c, logits_pa, cost = ccm(f_q, torch.randn(1, C, 2, 2), f_s, m[:, :, :, :], p_s, p_s)
        assert torch.allclose(cost[0, 0], torch.full((2, 2), 2.0))  # background slot: -e0, cosine -1
        assert torch.allclose(cost[0, 1], torch.zeros(2, 2), atol=1e-6)  # foreground slot: e0, cosine 1
        assert f_c.shape == (1, 2 * C, 2, 2) and logits_pa.shape == (1, 2, 2, 2) and logits_pa.abs().max() <= 10 + 1e-4

    def test_ocnet_ccm_selection_averages_the_shot_distances(self):
        # K shots (§5.1): Eq. (8-9) rank the prototypes by the distance averaged over the shots; the case is picked
        # so that shot 0 alone would select other prototypes
        g = torch.Generator().manual_seed(4)
        B, S, C, hs, L, n_s = 1, 2, 6, 5, 8, 2
        f_s = torch.randn(B, S, C, hs, hs, generator=g)
        m = torch.zeros(B, S, hs, hs)
        m[0, 0, 1:4, 1:3] = 1
        m[0, 1, 2:5, 2:5] = 1
        p_s = torch.randn(B, L, C, generator=g)
        f_q = torch.randn(B, C, 3, 3, generator=g)
        dist = torch.zeros(S, L)
        for k in range(S):
            for l in range(L):
                sim = torch.stack([torch.stack([_cos(f_s[0, k, :, i, j], p_s[0, l]) for j in range(hs)])
                                   for i in range(hs)])  # M_sp of shot k, prototype l
                dist[k, l] = ((sim - m[0, k]) ** 2).sum().sqrt()
        order = dist.mean(0).argsort().tolist()
        fg, bg = set(order[:n_s]), set(order[-n_s:])
        order0 = dist[0].argsort().tolist()
        assert (set(order0[:n_s]), set(order0[-n_s:])) != (fg, bg)  # the case discriminates
        ccm = ocnet.CCM(C, num_select=n_s, pa_scale=10.0)
        with torch.no_grad():
            _, _, cost = ccm(f_q, torch.randn(B, C, 3, 3, generator=g), f_s, m, p_s, p_s)
        slots = _slot_prototypes(cost, f_q, p_s)
        assert set(slots[:n_s]) == bg and set(slots[n_s:]) == fg

    def test_ocnet_transport_cost_stays_fp32_under_bf16_autocast(self, ocnet_models):
        # Sinkhorn divides the cost by eps = 0.05: bf16's 1/128 steps would become 0.16 in the exponent
        model = ocnet_models["resnet50"]
        img_q, img_s, m_s, _ = episode(2, 1, **OCNET_EPISODE)
        with torch.no_grad(), ocnet_training_without_dropout(model), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(img_q, img_s, m_s)  # training: the costs are made
        assert out["logits_pa"].dtype == torch.bfloat16 and out["cost_pa"].dtype == torch.float32
        assert not torch.equal(out["cost_pa"], out["cost_pa"].bfloat16().float())  # values between bf16's steps


    # ---------------- §4.3, Eq. (11-12): Sinkhorn and the prototype allocating mask M_pa ----------------------

    def test_ocnet_sinkhorn_meets_marginals_and_prefers_low_cost(self):
        g = torch.Generator().manual_seed(0)
        N, K = 48, 6
        cost = 2 * torch.rand(3, N, K, generator=g)  # 1 - cosine lies in [0, 2]
        region = torch.ones(3, N, dtype=torch.bool)
        region[1, ::3] = False  # a partial region: zero padding elsewhere
        region[2] = False  # an empty region
        plan = ocnet.sinkhorn(cost, region, eps=0.05, iters=ocnet.Config.sinkhorn_iters)
        assert torch.isfinite(plan).all() and (plan >= 0).all()
        for b in (0, 1):
            n_f = region[b].sum()
            assert torch.allclose(plan[b].sum(1)[region[b]], torch.full((n_f,), 1 / n_f), atol=1e-4 / n_f)
            assert (plan[b][~region[b]] == 0).all()
            assert torch.allclose(plan[b].sum(0), torch.full((K,), 1 / K), atol=1e-5)
        assert (plan[2] == 0).all()
        # every row has one free column, each column free for N/K rows: the plan follows them
        cheap = torch.ones(1, N, K)
        cheap[0, torch.arange(N), torch.arange(N) % K] = 0
        plan = ocnet.sinkhorn(cheap, torch.ones(1, N, dtype=torch.bool), eps=0.05, iters=50)
        assert (plan[0].argmax(1) == torch.arange(N) % K).all()
        assert (plan * cheap).sum() < 1e-3  # the independent coupling 1/(N K) everywhere would pay 5/6

    def test_ocnet_allocation_target_by_hand(self):
        # 2x3 feature map, N_s = 2: background slots 0, 1; foreground slots 2, 3
        m_q = torch.tensor([[[0, 0, 255], [1, 1, 1]]])  # one row of background (and an ignored pixel), one of fg
        cost = torch.ones(1, 4, 2, 3)
        cost[0, 1, 0, 0] = cost[0, 0, 0, 1] = 0  # pixel (0,0) is cheap for bg slot 1, pixel (0,1) for bg slot 0
        cost[0, 3, 1, :2] = 0  # foreground: two pixels cheap for slot 3, (1,2) has no preference: uniform
        m_pa = ocnet.allocation_target(cost, m_q, eps=0.05, iters=50)  # marginals: slot 2 must take (1,2)
        assert m_pa.tolist() == [[[1, 0, 255], [3, 3, 2]]]

    def test_ocnet_allocation_target_solves_both_problems_as_one_batch(self):
        # Eq. (11) for the background and the foreground pixels as one Sinkhorn batch: the plans and M_pa equal
        # those of two separate solves, an image without foreground (an empty problem) among them
        g = torch.Generator().manual_seed(0)
        B, N_s, h, w = 3, 4, 6, 5
        cost = 2 * torch.rand(B, 2 * N_s, h, w, generator=g)
        m_q = torch.randint(0, 2, (B, h, w), generator=g)
        m_q[0, 0] = IGNORE_INDEX
        m_q[2] = 0
        m_pa = ocnet.allocation_target(cost, m_q, eps=0.05, iters=100)
        c, region = cost.flatten(2).transpose(1, 2), m_q.flatten(1)  # (B, hw, 2N_s), (B, hw)
        background = ocnet.sinkhorn(c[..., :N_s], region == 0, 0.05, 100)  # (B, hw, N_s)
        foreground = ocnet.sinkhorn(c[..., N_s:], region == 1, 0.05, 100)
        both = ocnet.sinkhorn(torch.cat([c[..., :N_s], c[..., N_s:]]), torch.cat([region == 0, region == 1]), 0.05, 100)
        torch.testing.assert_close(both, torch.cat([background, foreground]), rtol=0, atol=1e-6)
        expected = torch.cat([background, foreground], 2).argmax(2).view(B, h, w).masked_fill(m_q == 255, 255)
        assert torch.equal(m_pa, expected)
        assert (m_pa[2] < N_s).all() and (foreground[2] == 0).all()  # no foreground: background slots only
        labelled = m_q != IGNORE_INDEX
        assert ((m_pa >= N_s) == (m_q == 1))[labelled].all()  # each pixel goes to a slot of its own kind

    def test_ocnet_allocation_target_is_made_without_dropout(self, ocnet_resnet, ocnet_run):
        # Eq. (7-11) take F_q, F_s, P_s before the features' Dropout2d (Choices): in train mode, under two dropout
        # draws, the costs and the target M_pa are those computed without dropout from the same weights, while
        # M̂_pa does see the dropout. The CCM's inputs are the 1x1 reduction's own output (its ReLU's, hooked before the
        # Dropout2d).
        model, ref = ocnet_resnet, ocnet_run["out"]  # ref: dropout off
        img_q, img_s, m_s, m_q = ocnet_run["episode"]
        B, S = img_s.shape[:2]
        target = ocnet.allocation_target(ref["cost_pa"], m_q, model.cfg.ot_eps, model.cfg.sinkhorn_iters)
        assert len(target[target != IGNORE_INDEX].unique()) > 2  # several slots are taught
        outs, reduced = [], []
        ccm_in, h1 = _capture_inputs(model.ccm)
        h2 = model.down[1].register_forward_hook(lambda mod, args, out: reduced.append(out.detach().clone()))
        model.train()
        try:
            for seed in (1, 2):
                torch.manual_seed(seed)
                with torch.no_grad():
                    outs.append(model(img_q, img_s, m_s))
        finally:
            model.eval()
            h1.remove(), h2.remove()
        assert not torch.allclose(outs[0]["logits_pa"], outs[1]["logits_pa"], atol=1e-3)  # the draws differ
        for out in outs:
            assert torch.allclose(out["cost_pa"], ref["cost_pa"], atol=1e-6)
            m_pa = ocnet.allocation_target(out["cost_pa"], m_q, model.cfg.ot_eps, model.cfg.sinkhorn_iters)
            assert torch.equal(m_pa, target)
        f_q, _, f_s, m, p_s, p_s_drop = ccm_in[0]
        assert torch.equal(f_q, reduced[0]) and torch.equal(f_s, reduced[1].unflatten(0, (B, S)))  # query, supports
        mfp = ocnet.multi_frequency_pooling(f_s.flatten(0, 1), m.flatten(0, 1), model.cfg.dct_size)
        assert torch.allclose(p_s, mfp.unflatten(0, (B, S)).mean(1), atol=1e-6)
        _slot_prototypes(outs[0]["cost_pa"], reduced[0], p_s)  # every cost channel: 1 - cos(F_q, P_s[l]), no dropout
        assert (p_s_drop - p_s).abs().max() > 0.1  # while Eq. (13) gets the prototypes after dropout


    # ---------------- §4.3, Eq. (13-15): the object-level correlation F_c -------------------------------------

    def test_ocnet_ccm_correlation_by_hand(self):
        # Support: e0 on the object (left half), e1 elsewhere. Distances of the prototypes' M_sp to M_s:
        # e0 -> 0, e0+e1 -> 2.16, e2 -> 2.83, e1 -> 4, -e0 -> 5.66; N_s = 2: foreground {e0, e0+e1}, background
        # {-e0, e1}, e2 unused. With the four "LN" set to identity, Eq. (13-15) are computed here from F_g (not F_q)
        # and from P_s after dropout (p_s_drop, other prototypes here), at the slots the dropout-free P_s selected:
        # M̂_pa = cos(F_g, p_s_drop[slots]), P_q = M̂_pa^T F_g / (h w), F_c = [P_q at each pixel's argmax, F_g].
        C, h, w = 4, 2, 3
        # f_g: another feature than f_q (Eq. 10 uses F_q, Eq. 13-15 F_g); P_s in a shuffled order: e2 first, e0 last
        f_q, f_g, f_s, m, p_s, p_s_drop = self._by_hand_ccm_case(order=(4, 1, 2, 3, 0))
        ccm = ocnet.CCM(C, num_select=2, pa_scale=10.0)
        _set_identity(ccm.key_g, ccm.key_p, ccm.value_g, ccm.out)
        with torch.no_grad():
            f_c, logits_pa, cost = ccm(f_q, f_g, f_s, m, p_s, p_s_drop)

        slots = _slot_prototypes(cost, f_q, p_s)  # Eq. (10): cost = 1 - cos(F_q, selected), background first
        assert set(slots[:2]) == {3, 1} and set(slots[2:]) == {4, 2}
        selected = p_s_drop[0, slots]  # (4, C) in the module's slot order
        tokens = f_g[0].flatten(1).T  # (hw, C)
        m_pa = torch.tensor([[_cos(t, s).item() for s in selected] for t in tokens])  # (hw, 2N_s)
        assert torch.allclose(logits_pa[0].flatten(1).T, 10 * m_pa, atol=1e-5)  # Eq. (13), scaled by pa_scale
        clean = torch.tensor([[_cos(t, s).item() for s in p_s[0, slots]] for t in tokens])
        assert (m_pa - clean).abs().max() > 0.1  # the case tells the two prototype sets apart
        p_q = m_pa.T @ tokens / (h * w)  # Eq. (14): (2N_s, C)
        best = m_pa.argmax(1)  # Eq. (15)
        assert not torch.equal(best, m_pa.argmin(1))
        expected = torch.cat([p_q[best].T.reshape(1, C, h, w), f_g], 1)
        assert torch.allclose(f_c, expected, atol=1e-5)


    # ---------------- §4.4, Eq. (16): the loss ----------------------------------------------------------------

    def test_ocnet_loss_terms_and_gradients(self, ocnet_models):
        model = ocnet_models["resnet50"].train()
        img_q, img_s, m_s, m_q = episode(2, 2, **OCNET_EPISODE)
        model.zero_grad(set_to_none=True)
        out = model(img_q, img_s, m_s)
        total, terms = model.loss(out, m_q, m_s)
        assert set(terms) == {"target", "general", "allocation"}
        assert all(torch.isfinite(t) and t > 0 for t in terms.values())
        assert torch.allclose(total, sum(terms.values()))
        total.backward()
        for name, p in model.named_parameters():
            if name.startswith(("backbone.", "cam.")):
                assert not p.requires_grad and p.grad is None, name
            else:
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        assert model.backbone.training is False and model.cam.training is False  # frozen parts stay in eval

    def test_ocnet_loss_terms_by_hand(self, ocnet_resnet, ocnet_run):
        # Eq. (16): L_t = CE(M̂_q, M_q) over the labelled pixels, L_g = CE(M̂_g, M_g) against the mask M_g itself
        # (1 = general object), L_p = CE(M̂_pa, M_pa) against the Sinkhorn target
        model, out = ocnet_resnet, ocnet_run["out"]
        _, _, m_s, m_q = ocnet_run["episode"]
        with torch.no_grad():
            total, terms = model.loss(out, m_q, m_s)
        m_g = out["m_g"]
        assert 0 < m_g.float().mean() < 1  # both classes present, so M_g and 1 - M_g give different losses
        assert torch.allclose(terms["general"], F.cross_entropy(out["logits_g"], m_g), atol=1e-6)
        # the untrained head is near 50/50, yet the inverted mask moves the loss by ~1e-3, 1000x the tolerance above
        assert not torch.allclose(terms["general"], F.cross_entropy(out["logits_g"], 1 - m_g), atol=1e-4)
        labelled = m_q != IGNORE_INDEX
        logp = F.log_softmax(out["logits"], 1)  # (B, 2, H, W), already at the label's size
        l_t = -logp.gather(1, m_q.clamp(max=1)[:, None])[:, 0][labelled].mean()
        assert torch.allclose(terms["target"], l_t, atol=1e-6)
        m_pa = ocnet.allocation_target(out["cost_pa"], m_q, model.cfg.ot_eps, model.cfg.sinkhorn_iters)
        assert torch.allclose(terms["allocation"], F.cross_entropy(out["logits_pa"], m_pa, ignore_index=IGNORE_INDEX),
                              atol=1e-6)
        assert torch.allclose(total, terms["target"] + terms["general"] + terms["allocation"])


    # ---------------- §5.1: K shots, ignored support pixels, a short training ---------------------------------

    def test_ocnet_shot_order_does_not_matter_but_every_shot_does(self, ocnet_resnet, ocnet_run):
        # §5.1: the K supports are averaged, so permuting them leaves every output unchanged; replacing shot 1 alone
        # (shot 0 kept) must change the prediction
        img_q, img_s, m_s, _ = ocnet_run["episode"]
        ref = ocnet_run["out"]
        img_other = img_s.clone()
        img_other[:, 1] = torch.randn(1, 3, OCNET_SIZE, OCNET_SIZE, generator=torch.Generator().manual_seed(6))
        with torch.no_grad(), ocnet_training_without_dropout(ocnet_resnet):  # every output, as ref's
            out = ocnet_resnet(img_q, img_s.flip(1), m_s.flip(1))
            other = ocnet_resnet(img_q, img_other, m_s)
        for k in ref:
            assert torch.allclose(ref[k].float(), out[k].float(), atol=1e-4), k
        assert not torch.allclose(ref["logits"], other["logits"], atol=1e-5)

    def test_ocnet_ignored_support_pixels_count_as_background(self, ocnet_resnet, ocnet_run):
        # 255 in the support mask (object borders, padding) is not foreground: the episode's 255 bands (17 rows of
        # shot 1, 2 of shot 0) give exactly the outputs of the same bands labelled 0
        img_q, img_s, m_s, _ = ocnet_run["episode"]
        zeroed = m_s.masked_fill(m_s == IGNORE_INDEX, 0)
        assert (zeroed != (m_s != 0).long()).sum() > 500  # the bands would change the foreground if they counted
        with torch.no_grad(), ocnet_training_without_dropout(ocnet_resnet):  # every output, as ocnet_run's
            ref = ocnet_resnet(img_q, img_s, zeroed)
        out = ocnet_run["out"]
        for k in ref:
            assert torch.allclose(ref[k].float(), out[k].float(), atol=1e-5), k

    def test_ocnet_short_synthetic_training_lowers_the_loss(self, ocnet_models):
        # four steps of the harness's SGD at the paper's lr (§5.1) on two synthetic episodes;
        # loss compared without dropout (the training forward: evaluation's lacks the loss's outputs)
        torch.manual_seed(0)  # dropout: the loss falls by 0.13 to 0.38 over the seeds 0-5
        model = copy.deepcopy(ocnet_models["resnet50"]).eval()
        img_q, img_s, m_s, m_q, _ = synthetic_episode(2, 1, OCNET_SIZE)

        def loss():
            return model.loss(model(img_q, img_s, m_s), m_q, m_s)[0]

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.005, momentum=0.9, weight_decay=1e-4)  # §5.1, before the x 10
        with torch.no_grad(), ocnet_training_without_dropout(model):
            before = loss().item()
        model.train()
        for _ in range(4):
            optimizer.zero_grad()
            loss().backward()
            optimizer.step()
        with torch.no_grad(), ocnet_training_without_dropout(model):
            after = loss().item()
        assert math.isfinite(after) and after < before - 0.05


    # ---------------- §5.3 ablations: Table 3 (GOMM, CCM), Table 4 (CAM, Mask, Atten), Table 5 (allocation) ---

    @pytest.mark.parametrize("row", list(OCNET_ABLATIONS))
    def test_ocnet_ablation_builds_trains_and_removes_its_parameters(self, ocnet_resnet, row, monkeypatch):
        # each row of Tables 3-5: exactly its module's parameters gone (written out, and the default's modules),
        # 1 and 5 shots train (finite loss of the terms the row keeps, gradients) and evaluate; Sinkhorn runs only
        # where M_pa supervises the allocation
        fields, learnable, frozen, modules, terms = OCNET_ABLATIONS[row]
        torch.manual_seed(0)
        model = ocnet.Model(ocnet.Config(backbone="resnet50", pretrained=False, **fields))

        def count(net, trainable):
            return sum(p.numel() for p in net.parameters() if p.requires_grad == trainable)

        assert count(ocnet_resnet, True) - count(model, True) == learnable
        assert count(ocnet_resnet, False) - count(model, False) == frozen
        default = sum(count(ocnet_resnet.get_submodule(name), t) for name in modules for t in (True, False))
        stem = model.decoder.stem[0].weight.shape[1] - ocnet_resnet.decoder.stem[0].weight.shape[1]  # Mean: C
        assert default - _C * stem == learnable + frozen
        solves = []
        sinkhorn = ocnet.sinkhorn
        monkeypatch.setattr(ocnet, "sinkhorn", lambda *a: solves.append(1) or sinkhorn(*a))
        for batch, shot in ((2, 1), (1, 5)):
            img_q, img_s, m_s, m_q = episode(batch, shot, **OCNET_EPISODE)
            model.train().zero_grad(set_to_none=True)
            total, got = model.loss(model(img_q, img_s, m_s), m_q, m_s)
            total.backward()
            assert set(got) == terms and torch.isfinite(total) and torch.allclose(total, sum(got.values()))
            grads = [p.grad for p in model.parameters() if p.requires_grad]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            with torch.no_grad():
                out = model.eval()(img_q, img_s, m_s)
            assert set(out) == {"logits"} and out["logits"].shape == (batch, 2, OCNET_SIZE, OCNET_SIZE)
            assert torch.isfinite(out["logits"]).all()
        assert len(solves) == (2 if "allocation" in terms else 0)  # one Sinkhorn batch per loss

    def test_ocnet_table3_without_gomm_the_generalization_reads_f_q(self):
        # GOMM off: no CAM, no GOMM, and the query generalization gets [F_q, P_s^0, prior] (F_q: the 1x1
        # reduction's own output, hooked; evaluation: no dropout)
        torch.manual_seed(0)
        model = ocnet.Model(ocnet.Config(pretrained=False, gomm=False)).eval()
        assert model.gomm is None and model.cam is None
        img_q, img_s, m_s, _ = episode(1, 2, **OCNET_EPISODE)
        gen_in, h1 = _capture_inputs(model.generalize)
        reduced = []
        h2 = model.down[1].register_forward_hook(lambda mod, args, out: reduced.append(out.detach().clone()))
        try:
            with torch.no_grad():
                model(img_q, img_s, m_s)
        finally:
            h1.remove(), h2.remove()
        assert torch.equal(gen_in[0][0][:, :_C], reduced[0][:1])  # the query's F_q, where F_g would be

    def test_ocnet_table3_without_ccm_the_decoder_reads_the_global_prototype_beside_f_g(self, monkeypatch):
        # CCM off: F_c = [P_s^0 at every pixel, F_g] (F_g after the generalization), with P_s^0 the shot mean of
        # the supports' MAP; MFP pools the DC component alone (n = 1), and the loss has no L_p and no Sinkhorn
        torch.manual_seed(0)
        model = ocnet.Model(ocnet.Config(pretrained=False, ccm=False)).eval()
        assert model.ccm is None and model.decoder.stem[0].weight.shape[1] == 2 * _C  # the decoder as OCNet's
        img_q, img_s, m_s, m_q = episode(1, 2, **OCNET_EPISODE)
        dec_in, h1 = _capture_inputs(model.decoder)
        reduced, generalized, sizes = [], [], []
        h2 = model.down[1].register_forward_hook(lambda mod, args, out: reduced.append(out.detach().clone()))
        h3 = model.generalize.register_forward_hook(lambda mod, args, out: generalized.append(out.detach().clone()))
        mfp = ocnet.multi_frequency_pooling
        monkeypatch.setattr(ocnet, "multi_frequency_pooling", lambda f, m, n: sizes.append(n) or mfp(f, m, n))
        try:
            with torch.no_grad():
                model(img_q, img_s, m_s)
        finally:
            h1.remove(), h2.remove(), h3.remove()
        f_s = reduced[1]  # (S, C, h, w): the two supports
        p_s0 = sum(common.masked_average_pooling(f_s[k:k + 1], (m_s[:, k] == 1).float()) for k in range(2)) / 2
        f_c, = dec_in[0]
        h, w = f_s.shape[-2:]
        assert torch.allclose(f_c[:, :_C], p_s0[..., None, None].expand(-1, -1, h, w), atol=1e-6)
        assert torch.equal(f_c[:, _C:], generalized[0]) and sizes == [1]
        with torch.no_grad():
            _, terms = model.train().loss(model(img_q, img_s, m_s), m_q, m_s)
        assert set(terms) == {"target", "general"}

    def test_ocnet_table4_general_object_mask_without_mask_or_cam(self):
        # Mask off: M_g = 1_tau(CAM); CAM off: M_g = 1_tau(prior), no classifier built. The case discriminates:
        # each rule gives another M_g than the max of both
        img_q, img_s, m_s, _ = episode(2, 1, **OCNET_EPISODE)
        masks = {}
        for field in ("mask", "cam"):
            torch.manual_seed(0)
            model = ocnet.Model(ocnet.Config(pretrained=False, **{field: False}))
            with torch.no_grad(), ocnet_training_without_dropout(model):
                m_g = model(img_q, img_s, m_s)["m_g"]
            prior, cam = ocnet_prior_and_cam(model, img_q, img_s, m_s)
            if field == "mask":
                assert torch.equal(m_g, (cam[:, 0] >= 0.6).long())
                assert not torch.equal(m_g, (torch.maximum(prior, cam)[:, 0] >= 0.6).long())
            else:
                assert cam is None and torch.equal(m_g, (prior[:, 0] >= 0.6).long())
            masks[field] = m_g
        assert not torch.equal(masks["mask"], masks["cam"])

    def test_ocnet_table4_without_atten_f_g_is_f_ig(self):
        # Atten off: no attention module, F_g = F_ig = ReLU(P_g[argmax cos(F_q, P_g)] + F_q) with Conv1x1 = [I, I];
        # M̂_g is still the head on F_ig
        g = torch.Generator().manual_seed(2)
        C, N_g, h, w = 4, 3, 2, 3
        gomm = ocnet.GOMM(C, N_g, heads=2, dropout=0.1, atten=False).eval()
        assert gomm.attention is None
        with torch.no_grad():
            gomm.prototypes.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 1.0]]))
            gomm.fuse[0].weight.copy_(torch.cat([torch.eye(C), torch.eye(C)], 1)[..., None, None])
        f_q = torch.randn(1, C, h, w, generator=g)
        with torch.no_grad():
            f_g, logits_g = gomm(f_q)
            nearest = torch.einsum("chw,kc->khw", F.normalize(f_q[0], dim=0),
                                   F.normalize(gomm.prototypes, dim=1)).argmax(0)  # (h, w)
            f_ig = F.relu(gomm.prototypes[nearest].permute(2, 0, 1) + f_q[0])[None]  # (1, C, h, w)
            assert len(nearest.unique()) > 1
            assert torch.allclose(f_g, f_ig, atol=1e-6) and torch.allclose(logits_g, gomm.head(f_ig), atol=1e-6)
            assert gomm(f_q, predict=False)[1] is None

    def _by_hand_ccm_case(self, order=(0, 1, 2, 3, 4)):
        """The support of test_ocnet_ccm_correlation_by_hand: the prototypes e0, e1, e0+e1, -e0, e2 in `order`
        (default: P_s^0 = e0, the prototype nearest to M_s), at distances e0 -> 0, e0+e1 -> 2.16, e2 -> 2.83,
        e1 -> 4, -e0 -> 5.66 from M_s. -> f_q, f_g, f_s, m, p_s, p_s_drop."""
        g = torch.Generator().manual_seed(3)
        C, h, w = 4, 2, 3
        e = torch.eye(C)
        m = torch.zeros(1, 1, 4, 4)
        m[..., :2] = 1
        f_s = m[:, :, None] * e[0, :, None, None] + (1 - m[:, :, None]) * e[1, :, None, None]  # (1, 1, C, 4, 4)
        prototypes = [e[0], e[1], e[0] + e[1], -e[0], e[2]]
        p_s = torch.stack([prototypes[i] for i in order])[None]  # (1, 5, C)
        f_q, f_g = torch.randn(1, C, h, w, generator=g), torch.randn(1, C, h, w, generator=g)
        return f_q, f_g, f_s, m, p_s, torch.randn(1, 5, C, generator=g)

    def test_ocnet_table5_mean_concatenates_the_global_and_the_mean_prototype(self):
        # Mean: no allocation, no "LN": F_c = [P_s^0, mean of the other selected foreground prototypes, F_g] at
        # every pixel, from P_s after dropout. N_s = 2: ID_t = {0, 2}, the mean is P_s[2] alone; N_s = 3: ID_t =
        # {0, 2, 4}, the mean of P_s[2] and P_s[4]
        f_q, f_g, f_s, m, p_s, p_s_drop = self._by_hand_ccm_case()
        for n_s, rest in ((2, p_s_drop[0, 2]), (3, (p_s_drop[0, 2] + p_s_drop[0, 4]) / 2)):
            ccm = ocnet.CCM(4, num_select=n_s, pa_scale=10.0, allocation="mean")
            assert not list(ccm.parameters())
            f_c, logits_pa, cost = ccm(f_q, f_g, f_s, m, p_s, p_s_drop)
            expected = torch.cat([p_s_drop[0, 0], rest])[None, :, None, None].expand(-1, -1, 2, 3)
            assert logits_pa is None and cost is None and f_c.shape == (1, 12, 2, 3)
            assert torch.allclose(f_c[:, :8], expected, atol=1e-6) and torch.equal(f_c[:, 8:], f_g)
        torch.manual_seed(0)
        assert ocnet.Model(ocnet.Config(pretrained=False, allocation="mean")).decoder.stem[0].in_channels == 3 * _C

    def test_ocnet_table5_cosine_allocates_as_ocnet_without_m_pa(self):
        # Cosine: Eq. (13-15) unchanged (the same weights give the same F_c), but no transport costs, so no M_pa
        # and no L_p, even when the target is asked for
        f_q, f_g, f_s, m, p_s, p_s_drop = self._by_hand_ccm_case()
        torch.manual_seed(0)
        ours = ocnet.CCM(4, num_select=2, pa_scale=10.0)
        cosine = ocnet.CCM(4, num_select=2, pa_scale=10.0, allocation="cosine")
        cosine.load_state_dict(ours.state_dict())
        with torch.no_grad():
            ref, _, _ = ours(f_q, f_g, f_s, m, p_s, p_s_drop)
            f_c, logits_pa, cost = cosine(f_q, f_g, f_s, m, p_s, p_s_drop, target=True)
        assert logits_pa is None and cost is None and torch.equal(f_c, ref)

    def test_ocnet_table5_fore_allocates_the_foreground_prototypes_alone(self):
        # Fore: N_s slots, the foreground ID_t = {0, 2}: cost = 1 - cos(F_q, P_s[ID_t]), M̂_pa = cos(F_g,
        # P_s_drop[ID_t]) with the "LN" set to identity, F_c = [P_q at each pixel's argmax, F_g]
        f_q, f_g, f_s, m, p_s, p_s_drop = self._by_hand_ccm_case()
        ccm = ocnet.CCM(4, num_select=2, pa_scale=10.0, allocation="fore")
        _set_identity(ccm.key_g, ccm.key_p, ccm.value_g, ccm.out)
        with torch.no_grad():
            f_c, logits_pa, cost = ccm(f_q, f_g, f_s, m, p_s, p_s_drop)
        slots = _slot_prototypes(cost, f_q, p_s)
        assert cost.shape == logits_pa.shape == (1, 2, 2, 3) and set(slots) == {0, 2}
        tokens = f_g[0].flatten(1).T  # (hw, C)
        m_pa = torch.tensor([[_cos(t, p_s_drop[0, l]).item() for l in slots] for t in tokens])  # (hw, N_s)
        assert torch.allclose(logits_pa[0].flatten(1).T, 10 * m_pa, atol=1e-5)
        p_q = m_pa.T @ tokens / 6
        expected = torch.cat([p_q[m_pa.argmax(1)].T.reshape(1, 4, 2, 3), f_g], 1)
        assert torch.allclose(f_c, expected, atol=1e-5)

    def test_ocnet_table5_fore_target_teaches_foreground_pixels_only(self):
        # the case of test_ocnet_allocation_target_by_hand, its foreground slots alone: the foreground pixels as
        # there (two cheap for slot 1, the third left to slot 0 by the marginals), background pixels ignored
        m_q = torch.tensor([[[0, 0, 255], [1, 1, 1]]])
        cost = torch.ones(1, 2, 2, 3)
        cost[0, 1, 1, :2] = 0
        m_pa = ocnet.allocation_target(cost, m_q, eps=0.05, iters=50, background=False)
        assert m_pa.tolist() == [[[255, 255, 255], [1, 1, 0]]]

    def test_ocnet_table5_fore_loss_asks_for_the_foreground_target_alone(self, monkeypatch):
        # Fore through a training forward and its loss: Model.loss solves Eq. (11) without the background problem
        # (background=False) on the N_s foreground costs, so M_pa ignores (255) every background pixel of M_q and
        # teaches every foreground one, and L_p is the cross-entropy against that M_pa
        torch.manual_seed(0)
        model = ocnet.Model(ocnet.Config(pretrained=False, allocation="fore"))
        img_q, img_s, m_s, m_q = episode(2, 1, **OCNET_EPISODE)
        calls, target = [], ocnet.allocation_target

        def spy(cost, m_q, eps, iters, background=True):
            m_pa = target(cost, m_q, eps, iters, background)
            calls.append((background, cost.shape[1], m_pa))
            return m_pa

        monkeypatch.setattr(ocnet, "allocation_target", spy)
        with torch.no_grad(), ocnet_training_without_dropout(model):
            out = model(img_q, img_s, m_s)
            _, terms = model.loss(out, m_q, m_s)
        (background, slots, m_pa), = calls
        assert background is False and slots == model.cfg.num_select
        m = F.interpolate(m_q[:, None].float(), m_pa.shape[-2:], mode="nearest")[:, 0]  # M_q at feature resolution
        assert (m == 0).sum() > 10 and (m == 1).sum() > 10
        assert (m_pa[m == 0] == IGNORE_INDEX).all() and (m_pa[m == 1] < slots).all()
        assert torch.allclose(terms["allocation"], F.cross_entropy(out["logits_pa"], m_pa, ignore_index=IGNORE_INDEX))

    def test_ocnet_ablations_from_the_command_line(self, capsys):
        # --set gives each switch its Config value (typed by the field); a value outside Table 5's is one line
        argv = ["--model", "ocnet", "--dataset", "synthetic", "--set", "cam=false", "atten=false", "allocation=fore"]
        args, module = train.parse_args(argv)
        cfg = train.make_config(module, args)
        assert (cfg.gomm, cfg.ccm, cfg.cam, cfg.mask, cfg.atten, cfg.allocation) == (True, True, False, True, False,
                                                                                      "fore")
        ocnet.check_config(cfg)  # a combination the model builds (check_config's refusals: the tests above)
        assert train.make_config(module, train.parse_args(argv[:4])[0]) == ocnet.Config()  # the defaults
        with pytest.raises(SystemExit):
            train.parse_args([*argv[:4], "--set", "allocation=back"])
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("error: --set allocation=back: allocation is one of fore+back, mean, "
                                                  "cosine, fore")


# ==========================================================================================================
# qgnet.py: QGNet: SLIC by hand; the contrastive stage (InfoNCE, queues, momentum, shuffled BN); its file; the
# few-shot stage (shapes, gradients, FEM's inputs and the loss by hand); both stages through train.py
# ==========================================================================================================

QGNET_TINY_PRIOR = dict(prior_batch_size=4, prior_queue=8, prior_img_size=32, prior_patch_size=32, bn_splits=2)


def qgnet_tiny_contrast(contrast="local+global"):
    """GlobalLocalContrast with QGNET_TINY_PRIOR's queues of 8 keys and 2 shuffle-BN sub-batches, MoCo v2's rest."""
    cfg = qgnet.prior_config(QGNET_TINY_PRIOR, "pascal")
    return qgnet.GlobalLocalContrast(contrast, cfg.embedding_dim, cfg.prior_queue, cfg.temperature, cfg.key_momentum,
                                     cfg.bn_splits)


@pytest.fixture(scope="module")
def qgnet_contrast():
    torch.manual_seed(0)
    return qgnet_tiny_contrast()


@pytest.fixture(scope="module")
def qgnet_noisy_contrast():
    """A tiny GlobalLocalContrast whose encoder_q differs from encoder_k (its copy at construction) by ~10% noise,
    so that a check can tell which encoder a key came from. Relative noise: in eval mode a random ResNet-50's
    activations already grow with depth, and uniformly larger weights would overflow them."""
    torch.manual_seed(12)
    model = qgnet_tiny_contrast()
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            scale = p.abs().mean() if p.abs().max() > 0 else 0.01  # BN biases start at 0
            p.add_(0.1 * scale * torch.randn_like(p))
    return model


def qgnet_flat_regions(size=64):
    """A synthetic image of four flat colours: background, a disc, a right band, a bottom-left block."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    region = torch.zeros(size, size, dtype=torch.long)
    region[(yy - 30) ** 2 + (xx - 25) ** 2 < 15 ** 2] = 1
    region[xx > 45] = 2
    region[(yy > 50) & (xx < 30)] = 3
    colours = torch.tensor([[0.2, 0.3, 0.8], [0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.9, 0.9, 0.2]])
    return colours[region].permute(2, 0, 1), region  # (3, H, W), (H, W)


def qgnet_info_nce_by_hand(q, k, queue, tau):
    """Eq. (1)/(2) per sample: -log exp(q.k+/tau) / (exp(q.k+/tau) + sum_i exp(q.n_i/tau)), mean over the batch."""
    losses = []
    for n in range(len(q)):
        pos = q[n] @ k[n] / tau
        neg = q[n] @ queue / tau  # (K,)
        losses.append(torch.logsumexp(torch.cat([pos[None], neg]), 0) - pos)
    return torch.stack(losses).mean()


def qgnet_shifted_shots_episode(B=2, S=2, size=65, seed=9):
    """B random episodes whose shots have foreground boxes of their own (shifted per shot and per episode), the
    first 4 columns 255 (background for the maps). -> img_q, img_s, m_s (no query label: the tests read FEM's
    inputs)."""
    g = torch.Generator().manual_seed(seed)
    img_q, img_s = torch.randn(B, 3, size, size, generator=g), torch.randn(B, S, 3, size, size, generator=g)
    m_s = torch.zeros(B, S, size, size, dtype=torch.long)
    for b in range(B):
        for s in range(S):
            top, left = 5 + 12 * s + 3 * b, 8 + 9 * s
            m_s[b, s, top:top + 25, left:left + 30] = 1
    m_s[..., :4] = 255
    return img_q, img_s, m_s


def qgnet_fem_inputs(model, img_q, img_s, m_s):
    """(f_q, guider, maps) as FEM receives them in model's forward."""
    captured = []
    handle = model.fem.register_forward_pre_hook(lambda module, args: captured.append(args))
    try:
        with torch.no_grad():
            model(img_q, img_s, m_s)
    finally:
        handle.remove()
    return captured[0]


class TestQGNet:
    # ---------------- contrastive learning (§4.1): InfoNCE (Eq. 1-2), queues, momentum keys, Eq. (3), Table 6 ------

    def test_qgnet_info_nce_equals_eq1_by_hand(self):
        torch.manual_seed(1)
        q = torch.nn.functional.normalize(torch.randn(2, 3), dim=1)
        k = torch.nn.functional.normalize(torch.randn(2, 3), dim=1)
        queue = torch.nn.functional.normalize(torch.randn(3, 4), dim=0)
        tau = 0.2
        direct = 0.0
        for n in range(2):
            pos = math.exp(float(q[n] @ k[n]) / tau)
            neg = sum(math.exp(float(q[n] @ queue[:, i]) / tau) for i in range(4))
            direct += -math.log(pos / (neg + pos)) / 2
        assert qgnet.info_nce(q, k, queue, tau).item() == pytest.approx(direct, rel=1e-5)

    def test_qgnet_queue_advances_and_wraps(self, qgnet_contrast):
        qgnet_contrast.queue_global_ptr.zero_()
        batches = [torch.full((3, 128), float(i)) for i in (1, 2, 3)]
        for keys in batches:
            qgnet_contrast.enqueue("queue_global", keys)
        assert qgnet_contrast.queue_global_ptr.item() == 9 % 8
        assert qgnet_contrast.queue_global[0].tolist() == [3, 1, 1, 2, 2, 2, 3, 3]  # slots 6, 7, 0 took the third batch
        qgnet_contrast.enqueue("queue_global", torch.arange(10.0)[:, None].expand(10, 128))  # more keys than slots
        assert sorted(qgnet_contrast.queue_global[0].tolist()) == list(range(2, 10))  # the newest 8 kept

    def test_qgnet_one_pretraining_step_moves_query_encoder_and_momentum_key(self, qgnet_contrast):
        # the step moves weights and queues: the fixture's stay as they are
        qgnet_contrast = copy.deepcopy(qgnet_contrast)
        torch.manual_seed(2)
        qgnet_contrast.train()
        optimizer = torch.optim.SGD(qgnet_contrast.encoder_q.parameters(), lr=0.1, momentum=0.9)
        # encoder_k starts as a copy of encoder_q: make them differ, or a missing update can't show
        with torch.no_grad():
            for p in qgnet_contrast.encoder_q.parameters():
                p.add_(0.01 * torch.randn_like(p))
        q0 = [p.detach().clone() for p in qgnet_contrast.encoder_q.parameters()]
        k0 = [p.detach().clone() for p in qgnet_contrast.encoder_k.parameters()]
        assert not any(torch.equal(a, b) for a, b in zip(k0, q0))
        ptr0 = qgnet_contrast.queue_local_ptr.item()
        batch = {name: torch.randn(4, 3, 32, 32) for name in ("img_q", "img_k", "patch_q", "patch_k")}
        loss, terms = qgnet_contrast(**batch)
        assert set(terms) == {"global", "local"} and torch.isfinite(loss)
        assert loss.item() == pytest.approx((terms["global"] + terms["local"]).item())  # Eq. (3)
        m = qgnet_contrast.key_momentum
        for p_k, a, b in zip(qgnet_contrast.encoder_k.parameters(), k0, q0):
            # theta_k <- m theta_k + (1 - m) theta_q, to rounding; without the update p_k stays at a, 1e-3 |b - a| away
            assert torch.allclose(p_k, m * a + (1 - m) * b, rtol=1e-6, atol=1e-7)
        assert not torch.equal(qgnet_contrast.encoder_k.conv1.weight, k0[0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert all(p.grad is None for p in qgnet_contrast.encoder_k.parameters())
        assert all(p.grad is not None for p in qgnet_contrast.encoder_q.parameters())
        assert not torch.equal(qgnet_contrast.encoder_q.conv1.weight, q0[0])
        # the optimizer step leaves encoder_k alone
        for p_k, a, b in zip(qgnet_contrast.encoder_k.parameters(), k0, q0):
            assert torch.allclose(p_k, m * a + (1 - m) * b, rtol=1e-6, atol=1e-7)
        assert qgnet_contrast.queue_local_ptr.item() == (ptr0 + 4) % 8
        fresh = qgnet_contrast.queue_local[:, [(ptr0 + i) % 8 for i in range(4)]]
        assert torch.allclose(fresh.norm(dim=0), torch.ones(4), atol=1e-5)  # normalised keys went in

    def test_qgnet_keys_come_from_the_momentum_encoder_in_input_order(self, qgnet_noisy_contrast):
        torch.manual_seed(6)
        qgnet_noisy_contrast.eval()  # BN from running statistics: shuffling can then change only the order of the keys
        x = torch.randn(6, 3, 32, 32)
        with torch.no_grad():
            expected = F.normalize(qgnet_noisy_contrast.encoder_k(x), dim=1)  # (6, D), row i = image i
            from_q = F.normalize(qgnet_noisy_contrast.encoder_q(x), dim=1)
        assert (expected @ expected.T - torch.eye(6)).max() < 1 - 1e-3  # distinct keys: a permutation would show
        assert not torch.allclose(from_q, expected, atol=1e-3)  # and the two encoders can be told apart
        for _ in range(2):  # a new random shuffle each call, always undone
            keys = qgnet_noisy_contrast.keys(x)
            assert keys.shape == (6, qgnet_noisy_contrast.dim)
            assert torch.allclose(keys, expected, atol=1e-5)

    def test_qgnet_shuffle_bn_uses_shuffled_sub_batches_and_restores_the_order(self, qgnet_noisy_contrast, monkeypatch):
        torch.manual_seed(7)
        qgnet_noisy_contrast.train()  # BN from batch statistics: a key depends on the sub-batch it was computed in
        x = torch.randn(4, 3, 32, 32)
        order = torch.tensor([2, 0, 3, 1])
        monkeypatch.setattr(torch, "randperm", lambda n, **kwargs: order.clone())
        keys = qgnet_noisy_contrast.keys(x)  # bn_splits 2: sub-batches x[[2, 0]] and x[[3, 1]]
        # by hand: each sub-batch through encoder_k, its keys written back to the rows of their own images
        expected = torch.empty_like(keys)
        with torch.no_grad():
            expected[[2, 0]] = F.normalize(qgnet_noisy_contrast.encoder_k(x[[2, 0]]), dim=1)
            expected[[3, 1]] = F.normalize(qgnet_noisy_contrast.encoder_k(x[[3, 1]]), dim=1)
            unshuffled = F.normalize(torch.cat([qgnet_noisy_contrast.encoder_k(x[:2]),
                                                qgnet_noisy_contrast.encoder_k(x[2:])]), dim=1)
        assert torch.allclose(keys, expected, atol=1e-5)
        assert not torch.allclose(keys, unshuffled, atol=1e-3)  # the sub-batches really were the shuffled ones
        assert not torch.allclose(keys, keys[order], atol=1e-3)  # and the order matters

    def test_qgnet_step_contrasts_images_with_image_queue_and_patches_with_patch_queue(self, qgnet_noisy_contrast):
        torch.manual_seed(8)
        qgnet_noisy_contrast.eval()  # deterministic queries and keys, so they can be recomputed after the step
        batch = {name: torch.randn(4, 3, 32, 32) for name in ("img_q", "img_k", "patch_q", "patch_k")}
        queue_g, queue_l = qgnet_noisy_contrast.queue_global.clone(), qgnet_noisy_contrast.queue_local.clone()
        ptr_g, ptr_l = qgnet_noisy_contrast.queue_global_ptr.item(), qgnet_noisy_contrast.queue_local_ptr.item()
        assert not torch.allclose(queue_g, queue_l, atol=1e-2)  # two different dictionaries, so a mix-up shows
        loss, terms = qgnet_noisy_contrast(**batch)
        with torch.no_grad():  # queries from encoder_q, keys from encoder_k as it is after this step's momentum update
            q, q_p = (F.normalize(qgnet_noisy_contrast.encoder_q(batch[n]), dim=1) for n in ("img_q", "patch_q"))
            k, k_p = (F.normalize(qgnet_noisy_contrast.encoder_k(batch[n]), dim=1) for n in ("img_k", "patch_k"))
        tau = qgnet_noisy_contrast.temperature
        # Eq. (1): images against the image keys K; Eq. (2): patches against the patch keys M; queues as before the step
        assert terms["global"].item() == pytest.approx(qgnet_info_nce_by_hand(q, k, queue_g, tau).item(), rel=1e-4)
        assert terms["local"].item() == pytest.approx(qgnet_info_nce_by_hand(q_p, k_p, queue_l, tau).item(), rel=1e-4)
        assert loss.item() == pytest.approx((terms["global"] + terms["local"]).item())  # Eq. (3)
        # then this batch's image keys replace the 4 oldest image keys, its patch keys the 4 oldest patch keys
        for queue, before, ptr, new in ((qgnet_noisy_contrast.queue_global, queue_g, ptr_g, k),
                                        (qgnet_noisy_contrast.queue_local, queue_l, ptr_l, k_p)):
            slots = [(ptr + i) % 8 for i in range(4)]
            kept = [i for i in range(8) if i not in slots]
            assert torch.allclose(queue[:, slots], new.T, atol=1e-5)
            assert torch.equal(queue[:, kept], before[:, kept])

    @pytest.mark.parametrize("contrast", ["global", "local"])
    def test_qgnet_one_contrast_alone_builds_its_queue_and_encodes_its_views_only(self, contrast):
        """Table 6: L_global or L_local alone. The other loss's queue is not built (its buffers missing, the
        parameters shared), its views are neither loaded nor encoded, and the loss is the one term, by hand."""
        torch.manual_seed(13)
        both, alone = qgnet_tiny_contrast(), qgnet_tiny_contrast(contrast)
        other = {"global": "local", "local": "global"}[contrast]
        assert alone.contrasts == [contrast] and both.contrasts == ["global", "local"]
        names = {n for n, _ in alone.named_buffers() if n.startswith("queue")}
        assert names == {f"queue_{contrast}", f"queue_{contrast}_ptr"}
        numel = lambda net, kind: sum(t.numel() for t in getattr(net, kind)())  # noqa: E731
        assert numel(both, "buffers") - numel(alone, "buffers") == 128 * 8 + 1  # one queue (D x K) and its pointer
        assert numel(both, "parameters") == numel(alone, "parameters")  # one encoder pair serves both losses
        calls = {"encoder_q": [], "encoder_k": []}
        for name, log in calls.items():
            getattr(alone, name).register_forward_hook(lambda m, args, out, log=log: log.append(args[0]))
        alone.eval()  # deterministic: the loss can be recomputed
        views = {"global": ("img_q", "img_k"), "local": ("patch_q", "patch_k")}
        batch = {name: torch.randn(4, 3, 32, 32) for name in views[contrast]}
        queue = getattr(alone, f"queue_{contrast}").clone()
        loss, terms = alone(**batch)
        query, key = (batch[name] for name in views[contrast])
        assert len(calls["encoder_q"]) == 1 and torch.equal(calls["encoder_q"][0], query)
        assert len(calls["encoder_k"]) == 2 and sorted(torch.cat(calls["encoder_k"]).sum((1, 2, 3)).tolist()) == \
            sorted(key.sum((1, 2, 3)).tolist())  # two shuffle-BN sub-batches of the key views, nothing else
        with torch.no_grad():
            q = F.normalize(alone.encoder_q(query), dim=1)
            k = F.normalize(alone.encoder_k(key), dim=1)
        assert set(terms) == {contrast} and loss.item() == terms[contrast].item()
        assert loss.item() == pytest.approx(qgnet_info_nce_by_hand(q, k, queue, alone.temperature).item(), rel=1e-4)
        assert torch.isfinite(loss) and loss.requires_grad
        # the data side: a view set without the other loss's views; no boxes: no patch at all
        episodes = data.build_dataset("synthetic", "train", 0, img_size=64, train_length=1)
        boxes = [[[0, 0, 32, 32]]]
        sample = qgnet.UnlabeledImages([(episodes, 0)], 32 if contrast == "global" else None,
                                       boxes if contrast == "local" else None, 32)[0]
        assert set(sample) == set(views[contrast]) and not set(sample) & set(views[other])

    # ---------------- local patches (§4.1.2): Felzenszwalb (Algorithm 1), SLIC (Algorithm 2), boxes, views ---------

    def test_qgnet_felzenszwalb_merges_by_int_plus_k_over_size_by_hand(self):
        """Algorithm 1 on a strip of four pixels, red 0, a, 3a, 6a (a = 31.875 in 0-255 units; green, blue 0): the
        edges weigh a, 2a, 3a. A singleton's threshold is Int + k/|C| = k."""
        strip = torch.zeros(3, 1, 4, dtype=torch.float64)
        strip[0, 0] = torch.tensor([0, 1, 3, 6]) / 8  # x 255: 0, 31.875, 95.625, 191.25, exact in binary
        a = 31.875

        def segments(k):
            return qgnet.felzenszwalb(strip, k, sigma=0, min_size=1)[0].tolist()
        # k = 1.5a: edge a <= min(1.5a, 1.5a) joins {0, 1} (Int a); edge 2a > min(a + 1.5a/2, 1.5a) = 1.5a; 3a > 1.5a
        assert segments(1.5 * a) == [0, 0, 1, 2]
        # k = 2.5a: edge 2a <= min(Int a + 2.5a/2, 2.5a) = 2.25a joins {0, 1, 2} (Int 2a): Int counts, as k/|C| alone
        # (1.25a) would refuse; edge 3a > min(2a + 2.5a/3, 2.5a) = 2.5a
        assert segments(2.5 * a) == [0, 0, 0, 1]
        # k = 3a: edge 3a <= min(2a + 3a/3, 3a) = 3a: equal, so joined (Algorithm 1's <=)
        assert segments(3 * a) == [0, 0, 0, 0]
        assert segments(2.999 * a) == [0, 0, 0, 1]

    def test_qgnet_felzenszwalb_splits_two_flat_regions_exactly(self):
        img = torch.zeros(3, 16, 32, dtype=torch.float64)
        img[:, :, :16] = torch.tensor([0.25, 0.5, 0.75])[:, None, None]
        img[:, :, 16:] = torch.tensor([0.25, 0.5, 0.25])[:, None, None]  # blue differs by 0.5: 127.5 in 0-255 units
        halves = torch.zeros(16, 32, dtype=torch.long)
        halves[:, 16:] = 1
        # unblurred: each half joins along its zero-weight edges first (Int 0, 256 px); across the border every edge
        # weighs 127.5, joined iff 127.5 <= k / 256, i.e. k >= 32640
        assert torch.equal(qgnet.felzenszwalb(img, 32639.0, sigma=0, min_size=1), halves)
        assert qgnet.felzenszwalb(img, 32640.0, sigma=0, min_size=1).unique().tolist() == [0]
        cfg = qgnet.PriorConfig()  # the defaults (blurred border included) split it at the border too
        assert torch.equal(qgnet.felzenszwalb(img, cfg.felzenszwalb_k, cfg.felzenszwalb_sigma,
                                              cfg.felzenszwalb_min_size), halves)
        region = qgnet_flat_regions()[1]  # four flat colours: exactly their four regions
        labels = qgnet.felzenszwalb(qgnet_flat_regions()[0], 300.0, sigma=0, min_size=1)
        assert len({(int(r), int(l)) for r, l in zip(region.flatten(), labels.flatten())}) == 4 == labels.max() + 1

    def test_qgnet_felzenszwalb_graph_is_8_connected_and_small_components_join_the_cheapest_neighbour(self):
        a, b = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 1.0])
        chequer = torch.stack([torch.stack([a, b]), torch.stack([b, a])]).permute(2, 0, 1)  # (3, 2, 2): a b / b a
        # each colour's two pixels touch only diagonally: one component per diagonal
        (p, q), (r, t) = qgnet.felzenszwalb(chequer, 1.0, sigma=0, min_size=1).tolist()
        assert p == t and q == r and p != q
        img = torch.zeros(3, 6, 8, dtype=torch.float64)
        img[:, :, 4:] = 1.0  # left black (24 px), right white (24 px)
        img[:, 2:4, 3] = 0.375  # a 2-px blob in the left half, at the border: 95.6 from black, 159.4 from white
        labels = qgnet.felzenszwalb(img, 1.0, sigma=0, min_size=1)
        assert labels.max() == 2  # k = 1 joins no different colours
        merged = qgnet.felzenszwalb(img, 1.0, sigma=0, min_size=3)  # the blob is under 3 px: it joins black
        expected = torch.zeros(6, 8, dtype=torch.long)
        expected[:, 4:] = 1
        assert torch.equal(merged, expected)
        assert torch.equal(qgnet.felzenszwalb(img, 1.0, sigma=0, min_size=25), torch.zeros(6, 8, dtype=torch.long))

    def test_qgnet_gaussian_blur_by_hand(self):
        row = np.zeros((1, 1, 9))
        row[0, 0, 4] = 1.0  # an impulse
        g = np.exp(-0.5 * (np.arange(-3, 4) / 0.8) ** 2)  # radius int(4 x 0.8 + 0.5) = 3
        g /= g.sum()
        out = qgnet.gaussian_blur(row, 0.8)
        assert np.allclose(out[0, 0, 1:8], g) and out[0, 0, 0] == 0 and out[0, 0, 8] == 0
        row = np.zeros((1, 1, 9))
        row[0, 0, 0] = 1.0  # at the edge, mirrored with the edge pixel repeated: ... x1 x0 | x0 x1 ...
        out = qgnet.gaussian_blur(row, 0.8)
        # padded x2 x1 x0 | x0 x1 ...: out[0] = g(0) x0 + g(-1) x0, out[1] = g(-1) x0 + g(-2) x0, ...
        assert np.allclose(out[0, 0, :5], [g[3] + g[2], g[2] + g[1], g[1] + g[0], g[0], 0])
        assert qgnet.gaussian_blur(row, 0) is row
        assert np.allclose(qgnet.gaussian_blur(np.ones((3, 5, 7)), 0.8), 1.0)  # weights sum to 1, also at the edges

    def test_qgnet_rgb_to_lab_reference_colours(self):
        rgb = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).T[:, :, None]  # (3, 3, 1)
        lab = qgnet.rgb_to_lab(rgb)[:, :, 0].T
        expected = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.24, 80.09, 67.20]])  # CIELAB tables, D65
        assert torch.allclose(lab, expected, atol=0.02)

    def test_qgnet_connected_components_by_hand(self):
        labels = torch.tensor([[1, 0, 1], [1, 0, 1], [1, 1, 1]])
        assert qgnet.connected_components(labels).tolist() == [[0, 1, 0], [0, 1, 0], [0, 0, 0]]
        labels = torch.tensor([[1, 0, 1], [1, 0, 1]])  # the right column is a second part of label 1
        assert qgnet.connected_components(labels).tolist() == [[0, 1, 2], [0, 1, 2]]

    def test_qgnet_enforce_connectivity_merges_fragments_into_largest_neighbour(self):
        labels = torch.tensor([[0, 0, 0, 1, 1, 1, 1],
                               [0, 1, 0, 1, 1, 1, 1],  # a one-pixel fragment of label 1 inside label 0 (10 px)
                               [0, 0, 0, 2, 1, 1, 1],  # label 2 (3 px) touches label 0 (10 px) and label 1 (14 px)
                               [0, 0, 2, 2, 1, 1, 1]])
        out = qgnet.enforce_connectivity(labels, min_size=4)
        expected = torch.tensor([[0, 0, 0, 1, 1, 1, 1],
                                 [0, 0, 0, 1, 1, 1, 1],
                                 [0, 0, 0, 1, 1, 1, 1],
                                 [0, 0, 1, 1, 1, 1, 1]])  # the fragment joins 0 (its only neighbour), label 2 joins 1
        assert torch.equal(out, expected)
        assert torch.equal(qgnet.enforce_connectivity(labels, min_size=1), qgnet.connected_components(labels).unique(
            return_inverse=True)[1])  # nothing to merge: just the 4-connected parts, relabelled 0..n-1
        # A (0) and D (2), 6 px each, touch only B (1, 8 px), which joins C (3, 10 px). Merged in the same round,
        # A and D would keep B's old label after B moved on: one label of 12 >= min_size px on two separate pieces.
        chain = torch.tensor([[0, 0, 0, 1, 3, 3],
                              [0, 0, 0, 1, 3, 3],
                              [1, 1, 1, 1, 3, 3],
                              [2, 2, 2, 1, 3, 3],
                              [2, 2, 2, 1, 3, 3]])
        assert qgnet.enforce_connectivity(chain, min_size=9).unique().numel() == 1  # all joins C, round by round
        for seed in range(20):  # random maps: every label ends 4-connected and at least min_size pixels
            labels = torch.randint(0, 5, (12, 12), generator=torch.Generator().manual_seed(seed))
            out = qgnet.enforce_connectivity(labels, min_size=8)
            assert out.unique().numel() == qgnet.connected_components(out).unique().numel(), seed
            assert torch.bincount(out.flatten()).min() >= 8, seed

    def test_qgnet_slic_recovers_flat_regions_with_connected_s_spaced_superpixels(self):
        img, region = qgnet_flat_regions()
        labels = qgnet.slic(img, n_segments=16, compactness=10.0)
        n = int(labels.max()) + 1
        assert labels.dtype == torch.long and labels.unique().tolist() == list(range(n))
        assert 8 <= n <= 32  # about K = 16 superpixels
        assert qgnet.connected_components(labels).unique().numel() == n  # every superpixel is 4-connected
        step = math.sqrt(64 * 64 / 16)
        for s in range(n):
            ys, xs = torch.nonzero(labels == s, as_tuple=True)
            assert region[ys, xs].unique().numel() == 1  # pure: inside one flat region
            assert ys.max() - ys.min() < 3 * step and xs.max() - xs.min() < 3 * step  # compact, ~S-spaced
        for a, b in (((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
                     ((slice(1, None), slice(None)), (slice(None, -1), slice(None)))):
            edge = region[a] != region[b]
            assert (labels[a][edge] != labels[b][edge]).all()  # every region boundary is a superpixel boundary

    def test_qgnet_felzenszwalb_patches_are_smaller_than_slic_ones(self):
        """§5.4 on Fig. 4: SLIC's patches are the larger. The defaults on synthetic images (128 px, as the stage's
        copies): a smaller median segment than SLIC's 16 superpixels, none under min_size."""
        cfg = qgnet.PriorConfig()
        episodes = data.build_dataset("synthetic", "train", 0, img_size=128, train_length=4)
        for i in range(4):
            img = qgnet.load_unlabeled((episodes, i)).float() / 255
            fh = torch.bincount(qgnet.felzenszwalb(img, cfg.felzenszwalb_k, cfg.felzenszwalb_sigma,
                                                   cfg.felzenszwalb_min_size).flatten())
            superpixels = torch.bincount(qgnet.slic(img, cfg.slic_segments, cfg.slic_compactness).flatten())
            assert fh.float().median() < superpixels.float().median() and fh.min() >= cfg.felzenszwalb_min_size, i

    def test_qgnet_superpixel_boxes_cover_the_image_in_original_pixels(self):
        img = (qgnet_flat_regions(64)[0] * 255).round().to(torch.uint8)
        img = torch.nn.functional.interpolate(img[None].float(), size=(120, 90), mode="nearest")[0].to(torch.uint8)
        slic = functools.partial(qgnet.slic, n_segments=8, compactness=10.0)
        boxes = qgnet.superpixel_boxes(img, slic, 64)  # SLIC on a 64 x 48 copy, boxes in the 120 x 90 pixels
        assert boxes.shape[1] == 4 and len(boxes) >= 4
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 120).all() and (boxes[:, 3] <= 90).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        covered = torch.zeros(120, 90, dtype=torch.bool)
        for top, left, bottom, right in boxes.tolist():
            covered[top:bottom, left:right] = True
        assert covered.all()
        assert (boxes == torch.tensor([0, 0, 120, 90])).all(1).sum() == 0  # boxes of parts, not of the whole image

    def test_qgnet_unlabeled_images_give_two_views_of_image_and_patch(self):
        episodes = data.build_dataset("synthetic", "train", 0, img_size=64, train_length=2)
        items = [(episodes, 0), (episodes, 1)]
        slic = functools.partial(qgnet.slic, n_segments=16, compactness=10.0)
        boxes = [qgnet.SuperpixelBoxes(items, slic, 64)[i] for i in range(2)]
        sample = qgnet.UnlabeledImages(items, 32, boxes, 32)[1]
        assert {k: tuple(v.shape) for k, v in sample.items()} == {
            "img_q": (3, 32, 32), "img_k": (3, 32, 32), "patch_q": (3, 32, 32), "patch_k": (3, 32, 32)}
        assert not torch.equal(sample["img_q"], sample["img_k"])  # two random views
        assert all(torch.isfinite(v).all() for v in sample.values())
        rendered = qgnet.load_unlabeled(items[1])
        assert rendered.dtype == torch.uint8 and rendered.shape == (3, 64, 64)

    # ---------------- P_q = F_p(I_q) (§4.2, Eq. 8): the stage-1 file, its path and values --------------------------

    def test_qgnet_prior_checkpoint_is_loaded_as_dilated_momentum_encoder(self, qgnet_contrast, tmp_path):
        path = tmp_path / "prior.pt"
        torch.save({"model": qgnet_contrast.state_dict()}, path)
        model = qgnet.build(qgnet.Config(pretrained=False, prior_checkpoint=str(path)),
                            common.Setting(pretrained=False))
        prior = model.prior_extractor
        assert torch.equal(prior.stages["layer0"][0].weight, qgnet_contrast.encoder_k.conv1.weight)
        assert torch.equal(prior.stages["layer0"][1].running_var, qgnet_contrast.encoder_k.bn1.running_var)
        assert torch.equal(prior.stages["layer4"][2].conv3.weight, qgnet_contrast.encoder_k.layer4[2].conv3.weight)
        assert prior.stages["layer4"][0].conv2.dilation == (4, 4)  # output stride 8 in the few-shot stage
        assert not any(p.requires_grad for p in prior.parameters())
        # so train.calibrate_random_backbones leaves stage 1's BatchNorm statistics alone (and estimates F's)
        assert prior.calibrated and not prior.needs_statistics
        assert [m for m in model.modules() if isinstance(m, Backbone) and m.needs_statistics] == [model.backbone]
        # a random F_p, from no file: --untrained-prior, or a checkpoint's (its weights replace these)
        for cfg, run in ((qgnet.Config(pretrained=False, untrained_prior=True), common.Setting(pretrained=False)),
                         (qgnet.Config(pretrained=False, prior_checkpoint=str(tmp_path / "absent.pt")),
                          common.Setting(pretrained=False, from_checkpoint=True))):
            assert qgnet.build(cfg, run).prior_extractor.needs_statistics

    def test_qgnet_build_without_the_stage_1_file_raises_with_the_command(self, qgnet_contrast, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)  # no runs/ here

        def never(*args, **kwargs):
            raise AssertionError("QGNet built before its stage-1 file was checked")
        monkeypatch.setattr(qgnet.Model, "__init__", never)  # the file is checked first: no network, no forward
        path = tmp_path / "absent.pt"
        with pytest.raises(common.WeightsUnavailableError) as err:
            qgnet.build(qgnet.Config(pretrained=False, prior_checkpoint=str(path)),
                        common.Setting(dataset="synthetic", fold=2))
        message = str(err.value)
        assert "python train.py --model qgnet --stage prior --dataset synthetic --fold 2" in message
        assert str(path) in message
        # the default file of the run, and the command that writes it there
        with pytest.raises(common.WeightsUnavailableError) as err:
            qgnet.build(qgnet.Config(pretrained=False, prior_all_images=True),
                        common.Setting(dataset="pascal", fold=1, data_root="/d/VOC2012"))
        assert "runs/qgnet-prior-pascal-fold1-all/prior_extractor.pt does not exist" in str(err.value)
        assert "--stage prior --dataset pascal --fold 1 --data-root /d/VOC2012 --prior-all-images\n" in str(err.value)
        root = str(tmp_path / "mine")  # a folder dataset's novel classes name the file and the command
        with pytest.raises(common.WeightsUnavailableError) as err:
            qgnet.build(qgnet.Config(pretrained=False), common.Setting(dataset="folder", data_root=root,
                                                                       test_classes=(3, 7)))
        assert f"runs/qgnet-prior-{data.split_name('folder', 0, root, (3, 7))}/prior_extractor.pt" in str(err.value)
        assert f"--stage prior --dataset folder --test-classes 3,7 --data-root {root}\n" in str(err.value)
        # a file that is there but is not stage 1's
        state = qgnet_contrast.state_dict()
        for name, content in (("text.pt", None), ("list.pt", [1, 2]),
                              ("other.pt", {"model": {"conv.weight": torch.zeros(1)}}),
                              ("cut.pt", {"model": {k: v for k, v in state.items() if "layer4.2" not in k}})):
            bad = tmp_path / name
            if content is None:
                bad.write_text("not a torch file")
            else:
                torch.save(content, bad)
            with pytest.raises(common.WeightsUnavailableError, match="stage 1") as err:
                qgnet.build(qgnet.Config(pretrained=False, prior_checkpoint=str(bad)),
                            common.Setting(dataset="synthetic"))
            assert str(bad) in str(err.value) and "--model qgnet --stage prior --dataset synthetic" in str(err.value)

    def test_qgnet_prior_paths(self):
        assert str(qgnet.prior_checkpoint_path(common.Setting(dataset="pascal", fold=1), {})) == \
            "runs/qgnet-prior-pascal-fold1/prior_extractor.pt"
        assert str(qgnet.prior_checkpoint_path(common.Setting(dataset="coco"), {"prior_all_images": True})) == \
            "runs/qgnet-prior-coco-fold0-all/prior_extractor.pt"
        assert str(qgnet.prior_checkpoint_path(common.Setting(dataset="coco"), {
            "prior_all_images": True, "prior_checkpoint": "x/y.pt", "patches": "felzenszwalb"})) == "x/y.pt"
        # COCO's two splits hold other classes in a fold: each has its own file
        assert str(qgnet.prior_checkpoint_path(common.Setting(dataset="coco", fold=2, coco_split="contiguous"), {})) \
            == "runs/qgnet-prior-coco-contiguous-fold2/prior_extractor.pt"
        # every stage-1 value that differs from the dataset's recipe, sorted; one equal to it names nothing
        pascal, coco = common.Setting(dataset="pascal"), common.Setting(dataset="coco")
        path = lambda run, **values: str(qgnet.prior_checkpoint_path(run, values)).split("/")[1]  # noqa: E731
        assert path(pascal, patches="felzenszwalb") == "qgnet-prior-pascal-fold0-patches=felzenszwalb"
        assert path(pascal, prior_epochs=2000, patches="felzenszwalb", contrast="local", prior_all_images=True) == \
            "qgnet-prior-pascal-fold0-all-contrast=local-patches=felzenszwalb-prior_epochs=2000"
        assert path(pascal, prior_epochs=1000, patches="slic", contrast="local+global") == "qgnet-prior-pascal-fold0"
        assert path(coco, prior_epochs=200) == "qgnet-prior-coco-fold0"  # §5.1: COCO's 200 is its recipe
        assert path(coco, prior_epochs=1000) == "qgnet-prior-coco-fold0-prior_epochs=1000"
        assert path(pascal, key_momentum=0.99, prior_lr=0.06) == \
            "qgnet-prior-pascal-fold0-key_momentum=0.99-prior_lr=0.06"

    def test_qgnet_fewshot_stage_reads_the_stage_1_file_its_values_name(self, qgnet_contrast, tmp_path, monkeypatch):
        """The few-shot stage of a Table 5 / 6 row (its stage-1 values as --set) reads the file they name, refuses
        one made with other values, points to the command that makes it, and runs 1- and 5-shot."""
        monkeypatch.chdir(tmp_path)
        setting = common.Setting(dataset="synthetic", fold=0, pretrained=False)
        rows = ({"patches": "felzenszwalb"}, {"contrast": "global"}, {"contrast": "local"}, {"prior_epochs": 8})
        for values in rows:
            (field, value), = values.items()
            cfg = qgnet.Config(pretrained=False, **values)
            path = tmp_path / qgnet.prior_checkpoint_path(setting, dataclasses.asdict(cfg))
            assert path.parent.name == f"qgnet-prior-synthetic-fold0-{field}={value}"
            with pytest.raises(common.WeightsUnavailableError) as err:
                qgnet.build(cfg, setting)
            assert f"--stage prior --dataset synthetic --fold 0 --set {field}={value}\n" in str(err.value)
            made = qgnet.prior_config(values, "synthetic")
            path.parent.mkdir(parents=True)
            state = {"model": qgnet_contrast.state_dict(), "epoch": made.prior_epochs,
                     "config": dataclasses.asdict(made), "images": qgnet.images_seen(setting, False)}
            torch.save({**state, "config": dataclasses.asdict(qgnet.prior_config({}, "synthetic"))}, path)
            if field != "prior_epochs":  # a file of the default values in its place is refused, one line
                with pytest.raises(common.WeightsUnavailableError, match=f"made with {field}=.*, not the {field}="
                                                                         f"{value} this run names"):
                    qgnet.build(cfg, setting)
            torch.save(state, path)
            model = qgnet.build(cfg, setting)
            assert torch.equal(model.prior_extractor.stages["layer0"][0].weight, qgnet_contrast.encoder_k.conv1.weight)
        model.train()  # the loss reads FEM's auxiliary logits, which only a training forward computes
        for S in (1, 5):
            img_q, img_s, m_s, m_q = episode(1, S, 33)
            with torch.no_grad():
                out = model(img_q, img_s, m_s)
                loss, _ = model.loss(out, m_q, m_s)
            assert out["logits"].shape == (1, 2, 33, 33) and torch.isfinite(out["logits"]).all()
            assert torch.isfinite(loss)

    # ---------------- few-shot stage (§4.2.1-4.2.2): prior map, shapes, gradients, FEM's inputs, loss --------------

    def test_qgnet_prior_region_map_is_eq_9_to_12_with_gradients(self):
        torch.manual_seed(3)
        x = torch.randn(2, 4, 3, 3, requires_grad=True)
        p = torch.randn(2, 4, 2, 2, requires_grad=True)
        out = qgnet.prior_region_map(x, p)
        assert out.shape == (2, 1, 3, 3)
        for b in range(2):
            xs, ps = x[b].detach().flatten(1).T, p[b].detach().flatten(1).T  # (9, 4), (4, 4)
            s = torch.tensor([max(float(xi @ pj / (xi.norm() * pj.norm() + 1e-7)) for pj in ps) for xi in xs])
            s = (s - s.min()) / (s.max() - s.min() + 1e-7)
            assert torch.allclose(out[b].flatten().detach(), s, atol=1e-5)
        out.sum().backward()
        assert x.grad.abs().sum() > 0 and p.grad.abs().sum() > 0  # no detach: both projections learn through it

    @pytest.mark.parametrize("B,S", [(2, 1), (1, 5)])
    def test_qgnet_fewshot_forward_shapes_and_finite_loss(self, qgnet_model, B, S):
        torch.manual_seed(4)
        qgnet_model.eval()
        img_q, img_s = torch.randn(B, 3, 65, 65), torch.randn(B, S, 3, 65, 65)
        m_s = torch.zeros(B, S, 65, 65, dtype=torch.long)
        m_s[..., 20:45, 20:45] = 1
        m_s[..., :3, :] = 255
        with torch.no_grad():
            out = qgnet_model(img_q, img_s, m_s)
            qgnet_model.train()  # FEM's auxiliary logits: computed for the loss in training, not in evaluation
            trained = qgnet_model(img_q, img_s, m_s)
            qgnet_model.eval()
            loss, terms = qgnet_model.loss(trained, m_s[:, 0], m_s)
        assert out["logits"].shape == (B, 2, 65, 65) and out["aux"] == []
        assert [tuple(a.shape[-2:]) for a in trained["aux"]] == [(9, 9), (4, 4), (2, 2), (1, 1)]  # 65 px -> 9 x 9
        assert set(terms) == {"main", "aux"} and torch.isfinite(loss)
        with torch.no_grad():  # an empty support mask: no NaN anywhere
            empty = qgnet_model(img_q, img_s, torch.zeros_like(m_s))["logits"]
        assert torch.isfinite(empty).all()

    def test_qgnet_fewshot_gradients_only_in_the_learnable_heads(self, qgnet_model):
        torch.manual_seed(5)
        qgnet_model.train()
        qgnet_model.zero_grad()
        img_q, img_s = torch.randn(2, 3, 65, 65), torch.randn(2, 2, 3, 65, 65)
        m_s = torch.zeros(2, 2, 65, 65, dtype=torch.long)
        m_s[..., 10:40, 15:50] = 1
        m_q = torch.zeros(2, 65, 65, dtype=torch.long)
        m_q[:, 20:50, 20:50] = 1
        loss, _ = qgnet_model.loss(qgnet_model(img_q, img_s, m_s), m_q, m_s)
        loss.backward()
        learnable = {n.split(".")[0] for n, p in qgnet_model.named_parameters() if p.requires_grad}
        assert learnable == {"bridge_proj", "prior_proj", "down_query", "down_supp", "fem"}
        for name, p in qgnet_model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
            else:
                assert p.grad is None and name.split(".")[0] in ("backbone", "prior_extractor"), name
        for module in learnable:
            assert any(p.grad.abs().sum() > 0 for p in getattr(qgnet_model, module).parameters()), module
        assert not qgnet_model.prior_extractor.training and not qgnet_model.backbone.training  # frozen BN stays in eval

    def test_qgnet_fem_receives_hand_computed_guided_map_prior_map_and_guider(self, qgnet_model):
        qgnet_model.eval()  # no dropout in the projections: the forward is deterministic
        B, S = 2, 2
        img_q, img_s, m_s = qgnet_shifted_shots_episode(B, S)
        f_q23, guider, maps = qgnet_fem_inputs(qgnet_model, img_q, img_s, m_s)
        assert maps.shape == (B, 2, 9, 9) and guider.shape == (B, 256)
        stages = qgnet_model.backbone.stages
        with torch.no_grad():
            # the frozen backbone stage by stage; mask: PFENet's support layer4 (layer3 x mask)
            def layers(x, mask=None):
                f = {"layer1": stages["layer1"](stages["layer0"](x))}
                f["layer2"] = stages["layer2"](f["layer1"])
                f["layer3"] = stages["layer3"](f["layer2"])
                x3 = f["layer3"]
                if mask is not None:
                    x3 = x3 * F.interpolate((mask == 1).float()[:, None], x3.shape[-2:], mode="bilinear",
                                            align_corners=True)
                f["layer4"] = stages["layer4"](x3)
                return f
            f_q = layers(img_q)
            f_s = layers(img_s.flatten(0, 1), m_s.flatten(0, 1))
            # guided region map: PFENet's prior of the query layer4 against the masked supports' layer4, mean over shots
            f_s4 = f_s["layer4"].view(B, S, *f_s["layer4"].shape[1:])
            guided = common.cosine_prior(f_q["layer4"], f_s4, m_s)  # (B, 1, 9, 9)
            # prior region map, Eq. (9)-(12): projected bridge X_q against projected prior P_q of the same query
            x = qgnet_model.bridge_proj(f_q["layer4"]).flatten(2)  # (B, 256, hw)
            p = qgnet_model.prior_proj(qgnet_model.prior_extractor(img_q)["layer4"]).flatten(2)  # (B, 256, h'w')
            cos = torch.einsum("bcq,bcr->bqr", x, p) / (x.norm(dim=1)[:, :, None] * p.norm(dim=1)[:, None, :] + 1e-7)
            s_q = cos.max(dim=2).values  # Eq. (10): best prior pixel for each bridge pixel, (B, hw)
            lo, hi = s_q.min(1, keepdim=True).values, s_q.max(1, keepdim=True).values
            prior = ((s_q - lo) / (hi - lo + 1e-7)).view(B, 1, 9, 9)  # Eq. (12)
            # category guider: Weighted_GAP of down_supp(layer3 | layer2) under the resized support mask,
            # mean over shots
            def mid_level(f, reduction):  # 1x1 conv (no bias) of cat(layer3, layer2), ReLU; Dropout2d is off in eval
                return F.relu(F.conv2d(torch.cat([f["layer3"], f["layer2"]], 1), reduction[0].weight))
            f_s23 = mid_level(f_s, qgnet_model.down_supp)  # (B*S, 256, 9, 9)
            m = F.interpolate((m_s.flatten(0, 1) == 1).float()[:, None], (9, 9), mode="bilinear", align_corners=True)
            proto = (f_s23 * m).sum((2, 3)) / (m.sum((2, 3)) + common.MAP_EPS)  # (B*S, 256)
            expected_guider = proto.view(B, S, -1).mean(1)
            expected_f_q23 = mid_level(f_q, qgnet_model.down_query)
        assert torch.allclose(maps[:, :1], guided, atol=1e-4)
        assert torch.allclose(maps[:, 1:], prior, atol=1e-4)
        assert torch.allclose(guider, expected_guider, rtol=1e-4, atol=1e-5)
        assert torch.allclose(f_q23, expected_f_q23, rtol=1e-4, atol=1e-5)
        # the hand computations are not degenerate: the prior map spans [0, 1] (Eq. 12); the guided map, a mean of two
        # such maps, lies in [0, 1] and varies; masking the support's layer3 changes it
        assert torch.allclose(prior.amin((1, 2, 3)), torch.zeros(B), atol=1e-6)
        assert torch.allclose(prior.amax((1, 2, 3)), torch.ones(B), atol=1e-5)
        assert guided.min() >= 0 and guided.max() <= 1 and (guided.amax((1, 2, 3)) - guided.amin((1, 2, 3)) > 0.3).all()
        unmasked4 = layers(img_s.flatten(0, 1))["layer4"].view_as(f_s4)
        assert (common.cosine_prior(f_q["layer4"], unmasked4, m_s) - guided).abs().max() > 1e-2

    def test_qgnet_guider_and_guided_map_are_shot_symmetric_and_prior_map_ignores_the_support(self, qgnet_model):
        qgnet_model.eval()
        img_q, img_s, m_s = qgnet_shifted_shots_episode(1, 2, seed=10)
        _, guider, maps = qgnet_fem_inputs(qgnet_model, img_q, img_s, m_s)
        # the shots in the other order: a mean over shots does not change
        _, guider_swapped, maps_swapped = qgnet_fem_inputs(qgnet_model, img_q, img_s.flip(1), m_s.flip(1))
        assert torch.allclose(guider_swapped, guider, rtol=1e-5, atol=1e-6)
        assert torch.allclose(maps_swapped, maps, atol=1e-5)
        # a different second shot (its mask moved): both support-derived inputs change, the prior map does not (§4.2.1:
        # it comes from the query alone)
        m_other = m_s.clone()
        m_other[0, 1] = torch.where(m_s[0, 1] == 255, 255, 0)
        m_other[0, 1, 35:60, 30:60] = 1
        _, guider_other, maps_other = qgnet_fem_inputs(qgnet_model, img_q, img_s, m_other)
        assert (guider_other - guider).abs().max() > 1e-3
        assert (maps_other[:, 0] - maps[:, 0]).abs().max() > 1e-2
        assert torch.equal(maps_other[:, 1], maps[:, 1])

    def test_qgnet_loss_is_main_plus_aux_weight_times_mean_aux_by_hand(self, qgnet_model, monkeypatch):
        torch.manual_seed(11)
        logits = torch.randn(2, 2, 17, 17)
        aux = [torch.randn(2, 2, s, s) for s in (9, 4, 2, 1)]
        m_q = torch.randint(0, 2, (2, 17, 17))
        m_q[:, :3] = 255  # ignored rows

        def ce(z):  # mean cross-entropy over the labelled pixels, z upsampled bilinearly (align_corners) to the labels
            z = F.interpolate(z, (17, 17), mode="bilinear", align_corners=True).log_softmax(1)
            valid = m_q != 255
            picked = z.gather(1, m_q.clamp(max=1)[:, None])[:, 0]  # (B, H, W) log-probability of the true label
            return -picked[valid].mean()

        main, aux_mean = ce(logits), torch.stack([ce(a) for a in aux]).mean()
        for weight in (0.0, 0.4, 2.5):
            monkeypatch.setattr(qgnet_model, "cfg", dataclasses.replace(qgnet_model.cfg, aux_weight=weight))
            total, terms = qgnet_model.loss({"logits": logits, "aux": aux}, m_q)
            assert terms["main"].item() == pytest.approx(main.item(), rel=1e-5)
            assert terms["aux"].item() == pytest.approx(aux_mean.item(), rel=1e-5)
            assert total.item() == pytest.approx(main.item() + weight * aux_mean.item(), rel=1e-5)

    # ---------------- opposite region maps (§4.3) and their recall (§5.4, Eq. 16, Table 7) -------------------------

    @pytest.mark.parametrize("S", [1, 5])
    def test_qgnet_region_maps_are_fems_maps_high_on_the_object(self, qgnet_model, S):
        """Table 7 (§5.4, Eq. 16): forward returns, in training and evaluation, the guided map FEM reads and the prior
        map FEM reads turned over (1 - S_Q: §4.3 finds S_Q low on the object), each (B,1,h,w) in [0, 1]."""
        img_q, img_s, m_s = qgnet_shifted_shots_episode(2, S, seed=14)
        for training in (False, True):
            qgnet_model.train(training)
            seen = []
            handle = qgnet_model.fem.register_forward_pre_hook(lambda module, args: seen.append(args[2]))
            try:
                with torch.no_grad():
                    maps = qgnet_model(img_q, img_s, m_s)["region_maps"]
            finally:
                handle.remove()
            assert set(maps) == {"guided", "prior"}
            assert all(m.shape == (2, 1, 9, 9) and m.min() >= 0 and m.max() <= 1 for m in maps.values())
            assert torch.equal(maps["guided"], seen[0][:, :1])
            assert torch.equal(maps["prior"], 1 - seen[0][:, 1:])
            assert torch.allclose(maps["prior"].amax((1, 2, 3)), torch.ones(2))  # min-max's 0 (Eq. 12) on top
        qgnet_model.eval()

    # ---------------- both stages through train.py (§5.1) ----------------------------------------------------------

    def test_qgnet_stage_1_is_a_run_and_its_file_serves_only_the_images_it_saw(self, tmp_path, monkeypatch, capsys):
        """--stage prior keeps its file unless --resume (with its own values) or --overwrite; the few-shot stage refuses
        a file of other images (another fold or split could hold its novel classes) and an unfinished one."""
        monkeypatch.chdir(tmp_path)
        flags = ["--model", "qgnet", "--dataset", "synthetic", "--no-pretrained", "--workers", "0", "--img-size", "64",
                 "--stage", "prior", "--train-length", "8", "--log-every", "1", "--fold", "1",
                 "--set", "prior_batch_size=4", "prior_queue=8", "prior_img_size=32"]
        folder = "runs/qgnet-prior-synthetic-fold1-prior_batch_size=4-prior_epochs=1-prior_img_size=32-prior_queue=8"
        path = tmp_path / folder / "prior_extractor.pt"
        assert train.main([*flags, "prior_epochs=1"]) == Path(folder) / "prior_extractor.pt"
        before = path.read_bytes()
        with pytest.raises(SystemExit, match="holds a run already .prior_extractor.pt, epoch 1."):
            train.main([*flags, "prior_epochs=1"])
        with pytest.raises(SystemExit) as err:  # a resumed stage keeps its values (here: a file named by its path)
            train.main([*flags, "prior_epochs=2", "--prior-checkpoint", str(path), "--resume"])
        assert "was made with other stage-1 values (prior_epochs 1 (now 2))" in str(err.value.code)
        assert path.read_bytes() == before
        state = torch.load(path, weights_only=True)
        assert state["images"] == {"dataset": "synthetic", "all_images": False, "fold": 1, "test_classes": None,
                                   "coco_split": "interleaved"}
        build = lambda fold: qgnet.build(qgnet.Config(pretrained=False, prior_checkpoint=str(path)),  # noqa: E731
                                         common.Setting(dataset="synthetic", fold=fold, pretrained=False))
        assert build(1).prior_extractor.calibrated  # its own fold: taken
        with pytest.raises(common.WeightsUnavailableError, match="was made on other images .synthetic, fold 1 training "
                                                                 "images. than this run's .synthetic, fold 2 training"):
            build(2)
        torch.save({**state, "epoch": 0, "config": {**state["config"], "prior_epochs": 3}}, path)
        with pytest.raises(common.WeightsUnavailableError, match="stopped after epoch 0 of 3: finish it with"):
            build(1)
        path.write_bytes(before[:1000])  # cut short: one line, no traceback
        with pytest.raises(SystemExit) as err:
            train.main([*flags, "prior_epochs=1", "--resume"])
        assert str(err.value.code).startswith(f"error: cannot read {Path(folder)}")

    def test_qgnet_prior_stage_gets_the_run_the_schedule_and_its_recipe_from_train_py(self, monkeypatch, tmp_path):
        monkeypatch.chdir(tmp_path)  # train.py holds the stage file's folder, under runs/
        got = []
        monkeypatch.setitem(qgnet.STAGES, "prior", lambda *given: got.append(given) or "written")
        flags = ["--model", "qgnet", "--stage", "prior", "--workers", "0", "--seed", "5", "--out", str(tmp_path / "o")]
        assert train.main([*flags, "--dataset", "coco", "--fold", "2", "--data-root", str(tmp_path),
                           "--set", "prior_queue=1024"]) == "written"
        run, schedule, options = got[-1]
        assert (run.dataset, run.fold, run.data_root, run.from_checkpoint) == ("coco", 2, str(tmp_path), False)
        assert (schedule.seed, schedule.workers) == (5, 0)
        cfg = qgnet.prior_config(options, "coco")
        assert (cfg.prior_epochs, cfg.prior_queue, cfg.prior_batch_size) == (200, 1024, 256)  # §5.1, flag, MoCo v2
        assert (cfg.prior_lr, cfg.prior_img_size, cfg.prior_patch_size) == (None, 224, 96)  # lr: MoCo's, by the batch
        train.main([*flags, "--dataset", "synthetic", "--set", "prior_epochs=2"])
        cfg = qgnet.prior_config(got[-1][2], "synthetic")  # the synthetic quick start, but the value given wins
        assert (cfg.prior_epochs, cfg.prior_batch_size, cfg.prior_queue, cfg.prior_img_size, cfg.prior_patch_size) == (
            2, 32, 4096, 64, 32)

    @pytest.mark.parametrize("value, message", [
        ("prior_queue=0", "prior_queue must be >= 1, got 0"), ("slic_segments=0", "slic_segments must be >= 1, got 0"),
        ("prior_batch_size=1", "prior_batch_size must be >= 2 (BatchNorm and InfoNCE's negatives), got 1"),
        ("prior_lr=0", "prior_lr and temperature must be > 0 and key_momentum in [0, 1), got 0.0, 0.2 and 0.999"),
        ("key_momentum=1", "prior_lr and temperature must be > 0 and key_momentum in [0, 1), got None, 0.2 and 1.0")])
    def test_qgnet_prior_stage_refuses_values_that_would_crash_or_train_nothing(self, value, message, tmp_path,
                                                                               monkeypatch):
        monkeypatch.chdir(tmp_path)  # the stage's folder is under runs/
        with pytest.raises(SystemExit) as err:
            train.main(["--model", "qgnet", "--stage", "prior", "--dataset", "synthetic", "--workers", "0",
                        "--set", value])
        assert str(err.value.code) == f"error: --stage prior: {message}"
        assert not list(tmp_path.rglob("*.pt"))

    def test_qgnet_stage_1_file_with_a_damaged_config_is_one_line(self, tmp_path):
        path = tmp_path / "prior.pt"
        torch.save({"model": {}, "config": [1, 2]}, path)
        with pytest.raises(common.WeightsUnavailableError, match="is not a file of QGNet's stage 1"):
            qgnet.read_stage1_file(path, cfg=qgnet.PriorConfig())

    def test_qgnet_prior_stage_refuses_the_schedule_flags_it_does_not_read(self, tmp_path, monkeypatch):
        # stage 1's epochs, batch, rate and crop are PriorConfig's --set fields: --epochs 3 would be dropped silently
        monkeypatch.chdir(tmp_path)  # the stage's folder is under runs/
        flags = ["--model", "qgnet", "--stage", "prior", "--dataset", "synthetic", "--workers", "0"]
        with pytest.raises(SystemExit) as err:
            train.main([*flags, "--epochs", "3", "--lr", "0.1"])
        assert str(err.value.code) == ("error: --stage prior: --epochs, --lr would change nothing; stage 1's schedule "
                                       "is --set prior_epochs=N prior_batch_size=N prior_lr=X")
        assert not list(tmp_path.rglob("*.pt"))  # nothing trained, nothing written

    def test_qgnet_two_stages_on_synthetic(self, tmp_path):
        prior = tmp_path / "prior" / "prior_extractor.pt"
        common_flags = ["--model", "qgnet", "--dataset", "synthetic", "--no-pretrained", "--workers", "0",
                        "--img-size", "64", "--prior-checkpoint", str(prior)]
        assert train.main([*common_flags, "--stage", "prior", "--train-length", "8", "--log-every", "1", "--set",
                           "prior_epochs=1", "prior_batch_size=4", "prior_queue=8", "prior_img_size=32"]) == prior
        records = read_metrics(prior.parent, "prior_extractor_metrics.jsonl")
        assert len(records) == 2 and all(math.isfinite(r["global"]) and math.isfinite(r["local"]) for r in records)
        out = tmp_path / "fewshot"
        miou, fbiou = train.main([*common_flags, "--train-length", "8", "--batch-size", "4", "--epochs", "2",
                                  "--test-episodes", "4", "--test-seeds", "1", "--log-every", "1", "--out", str(out)])
        assert 0 <= miou <= 1 and 0 <= fbiou <= 1
        losses = [r["loss"] for r in read_metrics(out) if r["event"] == "train"]
        assert len(losses) == 4 and all(map(math.isfinite, losses)) and losses[-1] < losses[0]
        encoder_k = torch.load(prior, weights_only=True)["model"]["encoder_k.layer3.1.conv2.weight"]
        trained = torch.load(out / "last.pt", weights_only=False)["model"]
        assert torch.equal(trained["prior_extractor.stages.layer3.1.conv2.weight"], encoder_k)
        bn_var = torch.load(prior, weights_only=True)["model"]["encoder_k.bn1.running_var"]
        assert torch.equal(trained["prior_extractor.stages.layer0.1.running_var"], bn_var)  # stage 1's statistics kept
        prior.unlink()  # the checkpoint holds every weight: evaluating it needs no stage-1 file
        again = train.main(["--eval-only", "--checkpoint", str(out / "last.pt"), "--dataset", "synthetic",
                            "--workers", "0", "--test-episodes", "4", "--test-seeds", "1",
                            "--out", str(tmp_path / "e")])
        assert again == (miou, fbiou)

    def test_qgnet_checkpoint_evaluates_and_resumes_without_the_stage_1_file(self, qgnet_contrast, tmp_path):
        prior = tmp_path / "prior_extractor.pt"
        # a stage-1 file (untrained: its weights are what counts)
        torch.save({"model": qgnet_contrast.state_dict()}, prior)
        encoder_k = qgnet_contrast.encoder_k.layer3[1].conv2.weight.detach().clone()
        out = tmp_path / "run"
        flags = ["--model", "qgnet", "--dataset", "synthetic", "--no-pretrained", "--workers", "0", "--img-size", "64",
                 "--prior-checkpoint", str(prior), "--train-length", "4", "--batch-size", "2", "--test-episodes", "2",
                 "--test-seeds", "1", "--log-every", "1", "--out", str(out)]
        train.main([*flags, "--epochs", "2"])
        prior.unlink()  # from here on every weight of F_p comes from the run's checkpoints
        scores = train.main(["--eval-only", "--checkpoint", str(out / "last.pt"), "--workers", "0",
                             "--test-episodes", "2", "--test-seeds", "1", "--out", str(tmp_path / "eval")])
        assert all(0 <= s <= 1 for s in scores)
        state = torch.load(out / "last.pt", weights_only=True)
        torch.save({**state, "epoch": 1}, out / "last.pt")  # as if it had stopped after epoch 1
        train.main([*flags, "--resume"])
        state = torch.load(out / "last.pt", weights_only=False)
        assert state["epoch"] == 2
        assert torch.equal(state["model"]["prior_extractor.stages.layer3.1.conv2.weight"], encoder_k)  # still stage 1's

    # ---------------- ablations (§5.4): Tables 5 and 6, a --set row for both stages --------------------------------

    def test_qgnet_stage_1_values_are_set_fields_that_name_one_file_for_both_stages(self, monkeypatch, tmp_path,
                                                                                   capsys):
        """Tables 5 and 6: a row is one --set given to --stage prior (PriorConfig, STAGE_CONFIGS) and to the few-shot
        stage (Config, which extends PriorConfig); both name the same stage-1 file, for every fold of --fold all."""
        monkeypatch.chdir(tmp_path)
        got = []
        monkeypatch.setitem(qgnet.STAGES, "prior", lambda *given: got.append(given) or "written")
        row = ["--set", "patches=felzenszwalb", "contrast=local", "prior_epochs=2000"]
        train.main(["--model", "qgnet", "--stage", "prior", "--fold", "all", *row])
        assert len(got) == 4
        for fold, (run, schedule, options) in enumerate(got):
            assert {k: options[k] for k in ("patches", "contrast", "prior_epochs")} == {
                "patches": "felzenszwalb", "contrast": "local", "prior_epochs": 2000}
            cfg = qgnet.prior_config(options, run.dataset)
            assert (cfg.patches, cfg.contrast, cfg.prior_epochs, cfg.prior_queue) == ("felzenszwalb", "local", 2000,
                                                                                      65536)
            fewshot, module = train.parse_args(["--model", "qgnet", "--fold", str(fold), *row])
            net_cfg = train.make_config(module, fewshot)
            assert (net_cfg.patches, net_cfg.contrast, net_cfg.prior_epochs) == ("felzenszwalb", "local", 2000)
            folder = f"qgnet-prior-pascal-fold{fold}-contrast=local-patches=felzenszwalb-prior_epochs=2000"
            assert qgnet.prior_file(run, options) == Path("runs") / folder / "prior_extractor.pt"
            assert qgnet.prior_checkpoint_path(train.setting_of(fewshot), dataclasses.asdict(net_cfg)) == \
                qgnet.prior_file(run, options)
            assert fewshot.out == Path("runs") / f"qgnet-pascal-fold{fold}-1shot-contrast=local-patches=felzenszwalb-" \
                                                 "prior_epochs=2000"
        fewshot, _ = train.parse_args(["--model", "qgnet", "--fold", "all", *row])
        assert all(one.set == {"patches": "felzenszwalb", "contrast": "local", "prior_epochs": 2000}
                   for one in fewshot.folds)
        # at --stage prior --set takes PriorConfig's fields only, and Table 5 / 6's choices only
        for item, message in (("aux_weight=0.5", "qgnet's PriorConfig has no field 'aux_weight'"),
                              ("patches=quickshift", "patches is one of slic, felzenszwalb"),
                              ("contrast=both", "contrast is one of local+global, local, global")):
            with pytest.raises(SystemExit):
                train.parse_args(["--model", "qgnet", "--stage", "prior", "--set", item])
            assert message in capsys.readouterr().err

    @pytest.mark.parametrize("row", ["patches=felzenszwalb", "contrast=global", "contrast=local"])
    def test_qgnet_ablation_rows_are_two_commands(self, row, tmp_path, monkeypatch):
        """A Table 5 / 6 row end to end on the synthetic set: stage 1 with the row's --set (no SLIC for Felzenszwalb's
        row, no segmentation at all for global contrast; a log of its own terms), then (Felzenszwalb's row: the other
        rows' few-shot stage reads its file as this one's) the few-shot stage with the same --set finds the file."""
        monkeypatch.chdir(tmp_path)

        def forbidden(*args, **kwargs):
            raise AssertionError(f"{row} ran a segmentation it does not use")
        unused = {"patches=felzenszwalb": ["slic"], "contrast=global": ["slic", "felzenszwalb"]}.get(row, [])
        for name in unused:
            monkeypatch.setattr(qgnet, name, forbidden)
        run = ["--model", "qgnet", "--dataset", "synthetic", "--no-pretrained", "--workers", "0", "--img-size", "64",
               "--train-length", "8", "--log-every", "1"]
        tiny = ["prior_epochs=1", "prior_batch_size=4", "prior_queue=8", "prior_img_size=32", "prior_patch_size=32"]
        path = train.main([*run, "--stage", "prior", "--set", *tiny, row])
        assert row in path.parent.name
        field, value = row.split("=")
        assert torch.load(path, weights_only=True)["config"][field] == value
        records = read_metrics(path.parent, "prior_extractor_metrics.jsonl")
        terms = {"contrast=global": {"global"}, "contrast=local": {"local"}}.get(row, {"global", "local"})
        assert all(terms <= set(r) and not {"global", "local"} - terms & set(r) for r in records)
        assert all(math.isfinite(r[t]) for r in records for t in terms)
        if row != "patches=felzenszwalb":
            return
        miou, fbiou = train.main([*run, "--set", *tiny, row, "--epochs", "1", "--batch-size", "4",
                                  "--test-episodes", "2", "--test-seeds", "1"])
        assert 0 <= miou <= 1 and 0 <= fbiou <= 1


# ==========================================================================================================
# crcnet.py: CRCNet: shapes at 1 and 5 shots, the loss, gradients with and without the encoder; its modules by
# hand; K shots by fine-tuning, fusion and scales; the pairs of query and support and their masks; each ablation
# switch (Tables 1-4, 6, 7); CRCNet's modules on PFENet (Tables 5, 8, 12)
# ==========================================================================================================

CRCNET_SIZE = 33  # 33 -> 5x5 features at output stride 8 (the backbone dominates the CPU time)


def make_crcnet(**kw):
    """A narrow CRCNet (dim 32 instead of 256) keeps the CPU tests fast; the structure is the paper's."""
    torch.manual_seed(0)
    narrow = {"dim": 32, "cr_reduction": 4} if kw.get("cross_reference", True) else {"dim": 32}  # 4: an FC 8 wide
    return crcnet.Model(crcnet.Config(pretrained=False, **{**narrow, **kw}))


@pytest.fixture(scope="module")
def crcnet_model():
    # one test scale: infer is compared with forward below; the default three scales have their own test
    return make_crcnet(refine_steps=3, ft_steps=3, ft_lr=0.05, test_scales=(1.0,))


# boxes (top, bottom, left, right) at 33 x 33: each covers a different set of the pixels 0, 8, 16, 24, 32 that
# the 5 x 5 features sample (see _at_features), so every episode and shot has its own feature-level mask
Q_BOXES = [(5, 20, 8, 25), (14, 33, 0, 12)]


S_BOXES = [[(3, 18, 10, 28), (20, 31, 2, 20), (0, 12, 20, 33)],
           [(0, 12, 0, 12), (6, 26, 6, 26), (14, 31, 14, 33)]]


def crcnet_mixed_episode(B=2, S=2, seed=0):
    """episode(B, S, CRCNET_SIZE, seed=seed)'s images, with masks that differ per episode (the query's, Q_BOXES)
    and per episode and shot (the supports', S_BOXES); query rows 0-1 and support rows 31-32 are 255 as in
    episode. -> img_q, img_s, m_s, m_q."""
    img_q, img_s, m_s, m_q = episode(B, S, CRCNET_SIZE, seed=seed)
    m_q.zero_()
    m_s.zero_()
    for b in range(B):
        top, bottom, left, right = Q_BOXES[b]
        m_q[b, top:bottom, left:right] = 1
        for k in range(S):
            top, bottom, left, right = S_BOXES[b][k]
            m_s[b, k, top:bottom, left:right] = 1
    m_q[:, :2] = IGNORE_INDEX
    m_s[:, :, -2:] = IGNORE_INDEX
    return img_q, img_s, m_s, m_q


def _at_features(m):
    """Labels (..., 33, 33) -> the support foreground at the 5 x 5 features, by hand: bilinear resizing with
    aligned corners from 33 = 4 * 8 + 1 to 5 samples exactly the pixels 0, 8, 16, 24, 32; 255 is background."""
    return (m[..., ::8, ::8] == 1).float()


def _ce(logits, labels):
    """Eq. (4) by hand: 2-class cross-entropy of logits (N,2,5,5) upsampled to labels (N,33,33), averaged over
    the labelled pixels of all N images together (255 ignored)."""
    up = F.interpolate(logits, labels.shape[-2:], mode="bilinear", align_corners=True)
    valid = labels != IGNORE_INDEX
    return F.cross_entropy(up, labels.clamp(max=1), reduction="none")[valid].mean()


def _refine_by_concatenation(refine, x):
    """MaskRefinement's logits written plainly: every step convolves [x, x_global, cached(cache)] with combine."""
    x = refine.entry(x)
    x_global = x + refine.global_conv(x)
    cache = torch.zeros(x.shape[0], 1, *x.shape[-2:])
    for step in range(refine.steps):
        with torch.set_grad_enabled(step == refine.steps - 1):
            y = refine.combine(torch.cat([x, x_global, refine.cached(cache)], 1))
            logits = refine.cls(y + refine.combine_residual(y))
        cache = logits.softmax(1)[:, 1:].detach()
    return logits


@pytest.fixture(scope="module")
def crcnet_traced(crcnet_model):
    """One training forward (with m_q) of a mixed B=2, S=2 batch with the inputs of the global conditional
    module and of the refinement recorded, the encoder features computed separately (query, supports), and
    both masks at the features by hand."""
    net = crcnet_model
    img_q, img_s, m_s, m_q = crcnet_mixed_episode(B=2, S=2)
    seen = {}
    hooks = [net.head.global_conditional.register_forward_pre_hook(lambda m, a: seen.__setitem__("global", a)),
             net.head.refinement.register_forward_pre_hook(lambda m, a: seen.__setitem__("refine", a[0]))]
    try:
        with torch.no_grad():
            seen["out"] = net(img_q, img_s, m_s, m_q=m_q)
            f_q = net.encoder(img_q).repeat_interleave(2, 0)  # (4, C, 5, 5): query b for its two pairs
            f_s = net.encoder(img_s.flatten(0, 1))  # (4, C, 5, 5): support k of episode b at b * 2 + k
    finally:
        for h in hooks:
            h.remove()
    m = _at_features(m_s).flatten(0, 1)[:, None]  # (4, 1, 5, 5)
    m_q_feat = _at_features(m_q).repeat_interleave(2, 0)[:, None]  # (4, 1, 5, 5): query b's for its two pairs
    return net, f_q, f_s, m, m_q_feat, seen, (img_q, img_s, m_s, m_q)


# ---------------- the predictions of fine-tuned heads -----------------------------------------------------

@pytest.fixture(scope="module")
def crcnet_tuned_episodes(crcnet_model):
    """A mixed B=2, S=2 batch and each episode's fine-tuned head weights (finetune is checked by hand in
    TestCRCNet, below)."""
    img_q, img_s, m_s, m_q = crcnet_mixed_episode(B=2, S=2)
    with torch.no_grad():
        weights = [crcnet_model.finetune(img_s[b], m_s[b]) for b in range(2)]
    return img_q, img_s, m_s, weights


def crcnet_tuned_outputs(net, tuned, kshot):
    """net.infer of the episodes `tuned` (crcnet_tuned_episodes) under cfg.kshot = kshot, checking that it leaves
    the weights and gradients as they were; and for each episode b and support k, net._forward of the query with
    that support alone under the head weights tuned on episode b. -> prediction, outs[b][k]"""
    img_q, img_s, m_s, weights = tuned
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.cfg.kshot = kshot
    try:
        with torch.no_grad():
            pred = net.infer(img_q, img_s, m_s)
    finally:
        net.cfg.kshot = "finetune"
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in net.parameters())
    with torch.no_grad():
        outs = [[net._forward(img_q[b:b + 1], img_s[b:b + 1, k:k + 1], m_s[b:b + 1, k:k + 1],
                              head_weights=weights[b]) for k in range(img_s.shape[1])] for b in range(len(img_q))]
    return pred, outs


# ---------------- the ablation switches: parameters by hand, a network that runs -----------------------------

CRCNET_FAST = dict(refine_steps=2, ft_steps=2, test_scales=(1.0,))  # a switch's network: brief refinement and tuning
CRCNET_FAST_UNCACHED = dict(ft_steps=2, test_scales=(1.0,))  # mask_refinement=False: one step, refine_steps refused


def n_params(net):
    return sum(p.numel() for p in net.parameters())


def conv_params(c_in, c_out, k=3):
    """A k x k conv with a bias: every conv of CRCNet's modules."""
    return k * k * c_in * c_out + c_out


def co_occurrence_params(d, rates=3):
    """§4.3's head by hand: 3x3; ASPP (1x1, a 3x3 per rate, the pooled 1x1, a 1x1 over the concatenation); 3x3; 1x1."""
    aspp = 2 * conv_params(d, d, 1) + rates * conv_params(d, d) + conv_params((rates + 2) * d, d, 1)
    return 2 * conv_params(d, d) + aspp + conv_params(d, 2, 1)


def cross_reference_params(d, reduction):
    """§4.3's two FC layers, d -> d / reduction -> d, with biases."""
    return 2 * d * (d // reduction) + d // reduction + d


def global_conditional_params(d):
    """Fig. 5: the 3x3 merge of [f, vector] (2d -> d) and the residual's two 3x3 convs."""
    return conv_params(2 * d, d) + 2 * conv_params(d, d)


def local_conditional_params(d):
    """Fig. 6: theta and delta, 1x1 convs."""
    return 2 * conv_params(d, d, 1)


def crcnet_runs(net, shots=(1, 5)):
    """A switch's network trains and evaluates at each number of shots: forward (with m_q), the loss and infer
    (K shots fine-tuned, cfg.kshot) all finite. -> {S: (forward's output, the loss terms)}."""
    seen = {}
    for S in shots:
        img_q, img_s, m_s, m_q = episode(2, S, CRCNET_SIZE)
        out = net(img_q, img_s, m_s, m_q=m_q)
        loss, terms = net.loss(out, m_q, m_s)
        assert torch.isfinite(loss) and all(torch.isfinite(t) for t in terms.values()), S
        assert all(torch.isfinite(v).all() for v in out.values() if torch.is_tensor(v)), S
        with torch.no_grad():
            pred = net.infer(img_q, img_s, m_s)
        assert pred.shape == (2, 2, CRCNET_SIZE, CRCNET_SIZE) and torch.isfinite(pred).all(), S
        seen[S] = out, terms
    return seen


# ---------------- CRCNet's modules on PFENet (network="pfenet", Tables 5, 8, 12) -----------------------------

PFENET_VARIANTS = {"PFENet": (False, False), "GC": (True, False), "CR": (False, True), "CRC": (True, True)}


def make_pfenet(**kw):
    """PFENet's variant as make_crcnet builds CRCNet (dim 32), with its recipe's frozen backbone, one test scale and
    its own K-shot fusion (DEFAULTS under network=pfenet); fine-tuning takes 2 steps."""
    return make_crcnet(network="pfenet", train_encoder=False, test_scales=(1.0,), kshot="fusion", ft_steps=2, **kw)


@pytest.fixture(scope="module")
def pfenet_variants():
    """PFENet alone, + GC, + CR, + CRC (the rows of Tables 8 and 12), in eval mode: PFENet's dropout off."""
    return {name: make_pfenet(global_conditional=gc, cross_reference=cr).eval()
            for name, (gc, cr) in PFENET_VARIANTS.items()}


def pfenet_by_hand(net, img_q, img_s, m_s):
    """PFENetHead's FEM inputs by hand (eval mode): PFENet's reduced features and prior, the cross-reference
    weights (each support by its pair's product, the query by their mean), the prototype averaged over the shots,
    the global conditional module on the query. -> f_q, proto, prior for FEM, and G_q, G_s."""
    B, S = img_s.shape[:2]
    enc, head = net.encoder, net.head
    feats_q, feats_s = enc.backbone(img_q), enc.backbone(img_s.flatten(0, 1), mask=m_s.flatten(0, 1))
    f_q, f_s = enc.down_query.reduce(feats_q), enc.down_supp.reduce(feats_s)  # (B, C, 5, 5), (B*S, C, 5, 5)
    s4 = feats_s["layer4"]
    prior = common.cosine_prior(feats_q["layer4"], s4.view(B, S, *s4.shape[1:]), m_s)
    if head.cross_reference is not None:
        fc = head.cross_reference.importance
        v_q, v_s = (torch.sigmoid(fc[2](torch.relu(fc[0](f.mean((2, 3)))))) for f in (f_q, f_s))
        w = v_q.repeat_interleave(S, 0) * v_s  # (B*S, C): pair (b, k)
        f_q, f_s = f_q * w.view(B, S, -1).mean(1)[:, :, None, None], f_s * w[:, :, None, None]
    m = _at_features(m_s).flatten(0, 1)[:, None]  # (B*S, 1, 5, 5)
    proto = ((f_s * m).sum((2, 3)) / (m.sum((2, 3)) + common.MAP_EPS)).view(B, S, -1).mean(1)  # (B, C)
    g_q, g_s = f_q, f_s
    if head.global_conditional is not None:
        f_q = head.global_conditional(f_q, proto)
    return f_q, proto, prior, g_q, g_s


class TestCRCNet:
    # ---------------- §4.1 overview (Fig. 2): the paper's configuration, shapes at 1 and 5 shots, gradients --------

    def test_crcnet_paper_configuration_shapes_and_size(self):
        net = crcnet.Model(crcnet.Config(pretrained=False))
        assert net.head.refinement.steps == 10 and net.cfg.sub_weight == 0.1 and net.cfg.dim == 256
        assert net.cfg.train_encoder and net.cfg.test_scales == (0.75, 1.0, 1.25)  # §5.1 end to end; §5.3
        learnable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        backbone = sum(p.numel() for p in net.encoder.backbone.parameters())
        assert backbone == 23_508_032  # ResNet-50 without its fc, trained end to end (§5.1)
        assert learnable == backbone + 20_137_492  # the 3x3 reduction of [layer3, layer4] (3072 -> 256) alone is 7.08M
        img_q, img_s, m_s, m_q = episode(1, 1, CRCNET_SIZE)
        with torch.no_grad():
            out = net(img_q, img_s, m_s, m_q=m_q)
        assert out["logits"].shape == (1, 2, CRCNET_SIZE, CRCNET_SIZE) and out["support"].shape == (1, 2, 5, 5)
        assert torch.isfinite(out["logits"]).all()

    @pytest.mark.parametrize("S", [1, 5])
    def test_crcnet_forward_shapes_query_and_support(self, crcnet_model, S):
        img_q, img_s, m_s, m_q = episode(2, S, CRCNET_SIZE)
        out = crcnet_model(img_q, img_s, m_s, m_q=m_q)
        assert out["logits"].shape == (2, 2, CRCNET_SIZE, CRCNET_SIZE)
        for key in ("query", "support", "query_sub", "support_sub"):
            assert out[key].shape == (2 * S, 2, 5, 5) and torch.isfinite(out[key]).all()
        # logits: the log of the query probabilities averaged over the shots, upsampled bilinearly
        log_p = F.log_softmax(out["query"], 1).view(2, S, 2, 5, 5).exp().mean(1).log()
        up = F.interpolate(log_p, (CRCNET_SIZE, CRCNET_SIZE), mode="bilinear", align_corners=True)
        assert torch.allclose(out["logits"], up, atol=1e-5)
        loss, terms = crcnet_model.loss(out, m_q, m_s)
        assert torch.isfinite(loss)

    @pytest.mark.parametrize("train_encoder", [True, False])
    def test_crcnet_gradients_reach_every_learnable_parameter_and_the_backbone_only_when_trained(self, train_encoder):
        # §5.1 end to end (the default): every parameter, the ResNet's included, gets a gradient from Eq. (5);
        # --freeze-encoder: none of the ResNet's does, every other one still does
        net = make_crcnet(refine_steps=2, train_encoder=train_encoder)  # 2 steps: the cached branch is in the graph
        net.train()
        img_q, img_s, m_s, m_q = episode(2, 1, CRCNET_SIZE)
        loss, _ = net.loss(net(img_q, img_s, m_s, m_q=m_q), m_q, m_s)
        loss.backward()
        learnable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        missing = [n for n, p in learnable if p.grad is None or p.grad.abs().sum() == 0]
        assert not missing, missing
        backbone = list(net.encoder.backbone.parameters())
        if train_encoder:
            assert len(learnable) == len(list(net.parameters())) and all(p.requires_grad for p in backbone)
        else:
            assert learnable and all(not n.startswith("encoder.backbone") for n, _ in learnable)
            assert (all(p.grad is None for p in backbone)
                    and all(p.requires_grad for p in net.encoder.reduce.parameters()))
        assert not net.encoder.backbone.training  # BN stays in eval either way

    # ---------------- §4.2 the Siamese encoder, Table 2's multi-level features --------------------------------------

    def test_crcnet_multi_level_off_reads_layer4_alone_table2(self):
        # Table 2 "Multi-Level" off (§5.3: "the features solely from the last layer"): levels=("layer4",); the 3x3
        # reduction loses exactly the weights that read layer3's 1024 channels
        full, last = make_crcnet(**CRCNET_FAST), make_crcnet(levels=("layer4",), **CRCNET_FAST)
        assert n_params(full) - n_params(last) == 9 * 1024 * 32
        assert last.encoder.reduce[0].in_channels == 2048
        img = episode(1, 1, CRCNET_SIZE)[0]
        with torch.no_grad():
            feats = full.encoder.backbone(img)  # the same backbone weights: both built from seed 0
            assert all(torch.equal(a, b) for a, b in zip(full.encoder.backbone.parameters(),
                                                         last.encoder.backbone.parameters()))
            both = full.encoder.reduce(torch.cat([feats["layer3"], feats["layer4"]], 1))
            assert torch.allclose(full.encoder(img), both, atol=1e-6)
            assert torch.allclose(last.encoder(img), last.encoder.reduce(feats["layer4"]), atol=1e-6)
        crcnet_runs(last)

    # ---------------- §4.3 the cross-reference module --------------------------------------------------------------

    def test_crcnet_cross_reference_is_symmetric_and_by_hand(self):
        torch.manual_seed(0)
        cr = crcnet.CrossReference(dim=32, reduction=16)
        f_q, f_s = torch.randn(2, 32, 5, 5), torch.randn(2, 32, 5, 5)
        g_q, g_s = cr(f_q, f_s)
        h_s, h_q = cr(f_s, f_q)
        assert torch.allclose(g_q, h_q) and torch.allclose(g_s, h_s)
        w = torch.sigmoid(cr.importance[2](torch.relu(cr.importance[0](f_q.mean((2, 3))))))
        w = w * torch.sigmoid(cr.importance[2](torch.relu(cr.importance[0](f_s.mean((2, 3))))))
        assert torch.allclose(g_q, f_q * w[:, :, None, None]) and ((w >= 0) & (w <= 1)).all()

    @pytest.mark.parametrize("activation", ["relu", "softmax"])
    def test_crcnet_cross_reference_activation_table6(self, crcnet_model, activation):
        # Table 6: ReLU, or a softmax over the channels, in the Sigmoid's place (§4.3); the product of both images'
        # vectors re-weights both maps as before, and the activation has no parameters of its own
        torch.manual_seed(0)
        cr = crcnet.CrossReference(dim=32, reduction=4, activation=activation)
        f_q, f_s = torch.randn(2, 32, 5, 5), torch.randn(2, 32, 5, 5)
        g_q, g_s = cr(f_q, f_s)
        fc = cr.importance
        act = torch.relu if activation == "relu" else (lambda x: torch.softmax(x, 1))
        v_q, v_s = (act(fc[2](torch.relu(fc[0](f.mean((2, 3)))))) for f in (f_q, f_s))
        w = (v_q * v_s)[:, :, None, None]
        assert torch.allclose(g_q, f_q * w, atol=1e-6) and torch.allclose(g_s, f_s * w, atol=1e-6)
        if activation == "softmax":
            assert torch.allclose(v_q.sum(1), torch.ones(2)) and torch.allclose(v_s.sum(1), torch.ones(2))
        else:
            assert (v_q >= 0).all() and (v_q == 0).any()  # ReLU: unbounded above, some channels cut to 0
        net = make_crcnet(cr_activation=activation, **CRCNET_FAST)
        assert n_params(net) == n_params(crcnet_model)
        crcnet_runs(net)

    def test_crcnet_without_cross_reference_g_is_f_and_no_sub_predictions_table1(self, crcnet_model):
        # Table 1 "Conditional Module" only: the cross-reference module and its co-occurrence head (§4.3) are not
        # built; G = F at its place, so the refinement reads [global, local, F], and Eq. (5) is L_QM + L_SM
        net = make_crcnet(cross_reference=False, **CRCNET_FAST)
        assert net.head.cross_reference is None and net.head.co_occurrence is None
        assert n_params(crcnet_model) - n_params(net) == cross_reference_params(32, 4) + co_occurrence_params(32)
        img_q, img_s, m_s, m_q = crcnet_mixed_episode(B=2, S=2)
        seen = []
        hook = net.head.refinement.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            with torch.no_grad():
                out = net(img_q, img_s, m_s, m_q=m_q)
                f_q = net.encoder(img_q).repeat_interleave(2, 0)  # (4, C, 5, 5): query b for its two pairs
                f_s = net.encoder(img_s.flatten(0, 1))
        finally:
            hook.remove()
        assert seen[0].shape == (8, 3 * 32, 5, 5)
        assert torch.allclose(seen[0][:, 2 * 32:], torch.cat([f_q, f_s]), atol=1e-5)  # F itself
        assert set(out) == {"logits", "query", "support"}
        total, terms = net.loss(out, m_q, m_s)
        assert set(terms) == {"query", "support"} and torch.equal(total, terms["query"] + terms["support"])
        q_labels, s_labels = m_q.repeat_interleave(2, 0), m_s.flatten(0, 1)
        assert torch.allclose(total, _ce(out["query"], q_labels) + _ce(out["support"], s_labels), atol=1e-6)
        crcnet_runs(net)

    # ---------------- §4.4 the conditional module, each branch conditioned on the other image (§4.7) ---------------

    def test_crcnet_local_conditional_eq1_to_3_by_hand(self):
        torch.manual_seed(0)
        local = crcnet.LocalConditional(dim=4)
        f, f_s = torch.randn(1, 4, 2, 3), torch.randn(1, 4, 2, 3)
        m = torch.tensor([[[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]]])
        out = local(f, f_s, m)
        theta, delta = local.theta(f)[0].flatten(1), local.delta(f_s)[0].flatten(1)  # (4, 6)
        expected = torch.zeros(4, 6)
        for i in range(6):  # every query position
            sim = torch.stack([theta[:, i] @ delta[:, j] * m.flatten()[j] for j in range(6)])  # Eq. (1), (2)
            expected[:, i] = f_s[0].flatten(1) @ torch.softmax(sim, 0)  # Eq. (3)
        assert torch.allclose(out[0].flatten(1), expected, atol=1e-5)
        # an empty support mask gives the plain average of the support features, not NaN
        empty = local(f, f_s, torch.zeros_like(m))
        assert torch.allclose(empty, f_s.mean((2, 3), keepdim=True).expand_as(empty), atol=1e-6)

    def test_crcnet_local_conditional_logits_stay_fp32_under_bf16_autocast(self):
        # Eq. (1)'s products are not scaled: logits of 100-400 here, where bf16 steps by 0.5-2 and the softmax's
        # mass moves (the module's output was 9% off, of its largest value). theta, delta, Eq. (1)-(2) run in fp32,
        # so only Eq. (3)'s bf16 rounding remains (0.25%); the tolerance is 1%. Inputs are bf16 values, so that
        # autocast's rounding of them is no part of the difference.
        torch.manual_seed(0)
        local = crcnet.LocalConditional(dim=32)
        g = torch.Generator().manual_seed(0)
        f, f_s = (8 * torch.randn(2, 2, 32, 5, 5, generator=g)).bfloat16().float()
        m = (torch.rand(2, 1, 5, 5, generator=g) > 0.3).float()
        with torch.no_grad():
            sim = local.theta(f).flatten(2).transpose(1, 2) @ local.delta(f_s).flatten(2)  # Eq. (1), fp32
            assert sim.median() > 100 and sim.max() > 400
            expected = local(f, f_s, m)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                amp = local(f, f_s, m)
        assert amp.dtype == torch.bfloat16  # Eq. (3) is left to autocast
        assert (amp.float() - expected).abs().max() < 0.01 * expected.abs().max()

    def test_crcnet_mixed_episode_masks_differ_per_episode_and_shot(self):
        # the premise of the tests below: no two episodes (or shots) share a feature-level mask
        img_q, img_s, m_s, m_q = crcnet_mixed_episode(B=2, S=3)
        assert not torch.equal(_at_features(m_q[0]), _at_features(m_q[1]))
        masks = _at_features(m_s).flatten(0, 1)  # (6, 5, 5)
        assert all(not torch.equal(masks[a], masks[b]) for a in range(6) for b in range(a))
        assert (masks.sum((1, 2)) > 0).all() and (m_s[..., ::8, ::8] == IGNORE_INDEX).any()

    def test_crcnet_global_vector_is_the_other_images_foreground_average(self, crcnet_traced):
        # §4.4: the query branch's category vector is the foreground average of the support features under the
        # support's mask; §4.7 (roles interchangeable): the support branch's is the query's under the query's mask
        # (255 as background in both)
        net, f_q, f_s, m, m_q_feat, seen, _ = crcnet_traced
        f, proto = seen["global"]
        assert torch.allclose(f, torch.cat([f_q, f_s]), atol=1e-5)  # both branches, query branch first
        support_avg = (f_s * m).sum((2, 3)) / (m.sum((2, 3)) + common.MAP_EPS)  # (4, C)
        query_avg = (f_q * m_q_feat).sum((2, 3)) / (m_q_feat.sum((2, 3)) + common.MAP_EPS)  # (4, C)
        assert torch.allclose(proto, torch.cat([support_avg, query_avg]), atol=1e-5)
        assert not torch.allclose(support_avg[0], support_avg[1], atol=1e-3)  # the two supports give different vectors
        assert not torch.allclose(query_avg[0], query_avg[2], atol=1e-3)  # and so do the two episodes' queries
        assert not torch.allclose(support_avg, query_avg, atol=1e-3)  # the two branches are conditioned differently

    def test_crcnet_each_branch_is_conditioned_on_the_other_images_mask(self, crcnet_model):
        # §4.7: the support prediction depends on the query's mask and not on its own (no shortcut through its own
        # foreground), the query prediction on the support's and not on the query's; the co-occurrence
        # sub-predictions (§4.3) on neither. Other masks: the two episodes' query masks swapped, the two shots'
        # support masks swapped (all differ at the features, test_crcnet_mixed_episode_masks_differ_...)
        net = crcnet_model
        img_q, img_s, m_s, m_q = crcnet_mixed_episode(B=2, S=2)
        with torch.no_grad():
            out = net(img_q, img_s, m_s, m_q=m_q)
            other_s = net(img_q, img_s, m_s.flip(1), m_q=m_q)
            other_q = net(img_q, img_s, m_s, m_q=m_q.flip(0))
            evaluation = net(img_q, img_s, m_s)  # no m_q: the query branch alone
        assert torch.allclose(other_s["support"], out["support"], atol=1e-6)
        assert torch.allclose(other_q["query"], out["query"], atol=1e-6)
        for n in range(4):  # every pair's prediction follows the other image's mask
            assert not torch.allclose(other_q["support"][n], out["support"][n], atol=1e-4), n
            assert not torch.allclose(other_s["query"][n], out["query"][n], atol=1e-4), n
        for key in ("query_sub", "support_sub"):
            assert (torch.allclose(other_s[key], out[key], atol=1e-6)
                    and torch.allclose(other_q[key], out[key], atol=1e-6))
        assert set(evaluation) == {"logits", "query"}  # the support branch and the sub-predictions are not computed
        for key in evaluation:
            assert torch.allclose(evaluation[key], out[key], atol=1e-5), key

    def test_crcnet_255_in_a_support_or_query_mask_counts_as_background(self, crcnet_model):
        # 255 (unlabelled) is not foreground, in a support's mask (the query branch's reference) nor in the query's
        # (the support branch's): replacing it by 0 changes nothing, in any output
        img_q, img_s, m_s, m_q = crcnet_mixed_episode(B=1, S=2)
        m_s[:, :, 14:18] = IGNORE_INDEX  # row 16 is sampled by the features, and it crosses both support boxes
        m_q[:, 14:18] = IGNORE_INDEX  # and the query box; rows 0-1 are 255 already
        for mask in (m_s, m_q):
            assert ((mask[..., ::8, ::8] == IGNORE_INDEX) & (mask[..., ::8, ::8] != 1)).any()
            foreground = common.foreground_at(mask.flatten(0, -3)[:, None], (5, 5))  # as crcnet.Model._forward
            assert torch.equal(foreground, _at_features(mask).flatten(0, -3)[:, None])
        zero_s, zero_q = (mask.masked_fill(mask == IGNORE_INDEX, 0) for mask in (m_s, m_q))
        with torch.no_grad():
            out = crcnet_model(img_q, img_s, m_s, m_q=m_q)
            out_zero = crcnet_model(img_q, img_s, zero_s, m_q=zero_q)
        for key in ("logits", "query", "support", "query_sub", "support_sub"):
            assert torch.equal(out[key], out_zero[key]), key

    @pytest.mark.parametrize("off", [("global_conditional",), ("local_conditional",),
                                     ("global_conditional", "local_conditional")])
    def test_crcnet_conditional_modules_switch_off_table3(self, crcnet_model, off):
        # Table 3 (and Table 1's "w/o conditional module": both off): a module switched off is not built, and the
        # refinement's entry conv loses the 3x3 weights that read its 32 channels; with both off nothing reads a
        # mask (the support's nor the query's): the network co-segments the two images
        net = make_crcnet(**{name: False for name in off}, **CRCNET_FAST)
        own = {"global_conditional": global_conditional_params(32), "local_conditional": local_conditional_params(32)}
        assert n_params(crcnet_model) - n_params(net) == sum(own[name] + 9 * 32 * 32 for name in off)
        assert all(getattr(net.head, name) is None for name in off)
        assert net.head.refinement.entry[0].in_channels == (3 - len(off)) * 32
        img_q, img_s, m_s, m_q = crcnet_mixed_episode(B=2, S=2)
        with torch.no_grad():
            out = net(img_q, img_s, m_s, m_q=m_q)
            other = net(img_q, img_s, m_s.flip(1), m_q=m_q.flip(0))  # every pair's masks differ (mixed episode)
        for key in ("query", "support"):
            assert torch.allclose(other[key], out[key], atol=1e-4) == (len(off) == 2), key
        crcnet_runs(net)

    def test_crcnet_local_conditional_without_support_mask_table7(self, crcnet_model):
        # Table 7 "w/o mask": Eq. (2) without Phi(Mask_sup), the softmax over every reference pixel; no mask is read
        torch.manual_seed(0)
        local = crcnet.LocalConditional(dim=4, support_mask=False)
        f, f_s = torch.randn(1, 4, 2, 3), torch.randn(1, 4, 2, 3)
        m = torch.tensor([[[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]]])
        theta, delta = local.theta(f)[0].flatten(1), local.delta(f_s)[0].flatten(1)  # (4, 6)
        expected = f_s[0].flatten(1) @ torch.softmax(theta.T @ delta, 1).T  # Eq. (1), (2) unmasked, (3)
        out = local(f, f_s, m)
        assert torch.allclose(out[0].flatten(1), expected, atol=1e-5)
        assert torch.equal(local(f, f_s, torch.zeros_like(m)), out)
        masked = crcnet.LocalConditional(dim=4)
        masked.load_state_dict(local.state_dict())
        assert not torch.allclose(masked(f, f_s, m), out, atol=1e-3)  # the same weights with the mask differ
        net = make_crcnet(local_support_mask=False, **CRCNET_FAST)
        assert n_params(net) == n_params(crcnet_model)
        crcnet_runs(net)

    # ---------------- §4.5 the mask refinement module --------------------------------------------------------------

    def test_crcnet_refinement_runs_configured_steps_and_updates_cache(self):
        torch.manual_seed(0)
        refine = crcnet.MaskRefinement(in_dim=12, dim=8, k=7, steps=4)
        calls = []
        refine.cached.register_forward_hook(lambda m, i, o: calls.append(i[0].clone()))
        logits, caches = refine(torch.randn(2, 12, 5, 5))
        assert len(calls) == 4 and len(caches) == 5
        assert (caches[0] == 0).all() and (calls[0] == 0).all()  # the cache starts as zeros
        for t in range(1, 5):
            assert not torch.equal(caches[t], caches[t - 1])  # updated every step
            assert torch.equal(calls[t - 1], caches[t - 1])  # and each step reads the previous one
        assert torch.allclose(caches[-1], logits.softmax(1)[:, 1:])
        assert ((caches[-1] > 0) & (caches[-1] < 1)).all()

    @pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
    def test_crcnet_refinement_convolves_the_feature_levels_once_as_the_concatenation_would(self, layout):
        # the combined conv is split by input channels (features once, the cached branch every step): the same
        # logits, caches and gradients as the plain concatenation, and the same state_dict (old checkpoints load)
        torch.manual_seed(0)
        refine = crcnet.MaskRefinement(in_dim=12, dim=8, k=7, steps=4).to(memory_format=layout)
        assert refine.state_dict()["combine.0.weight"].shape == (8, 3 * 8, 3, 3)
        assert not any(key.startswith("combine.") and key not in ("combine.0.weight", "combine.0.bias")
                       for key in refine.state_dict())
        x = torch.randn(2, 12, 5, 5).to(memory_format=layout).requires_grad_()
        logits, caches = refine(x)
        grads = torch.autograd.grad(logits.square().sum(), [x, *refine.parameters()])
        expected = _refine_by_concatenation(refine, x)
        expected_grads = torch.autograd.grad(expected.square().sum(), [x, *refine.parameters()])
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(caches[-1], expected.softmax(1)[:, 1:], rtol=1e-5, atol=1e-6)
        assert all(g.abs().sum() > 0 for g in grads)  # the combined weight among them, from both of its parts
        for name, g, e in zip(["x", *dict(refine.named_parameters())], grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6, msg=name)

    def test_crcnet_refinement_input_is_global_local_then_cross_reference(self, crcnet_traced):
        # §4.5: the refinement reads [global conditional, local conditional, cross-reference output G]; G is the
        # encoder features re-weighted by the product of both images' importance vectors (§4.3), not F itself
        net, f_q, f_s, m, m_q_feat, seen, _ = crcnet_traced
        head, C = net.head, f_q.shape[1]
        x = seen["refine"]
        assert x.shape == (8, 3 * C, 5, 5)
        fc = head.cross_reference.importance

        def importance(feat):
            return torch.sigmoid(fc[2](torch.relu(fc[0](feat.mean((2, 3))))))

        w = (importance(f_q) * importance(f_s))[:, :, None, None]
        assert torch.allclose(x[:, 2 * C:], torch.cat([f_q * w, f_s * w]), atol=1e-5)
        assert not torch.allclose(x[:, 2 * C:], torch.cat([f_q, f_s]), atol=1e-3)  # G != F: w < 1
        with torch.no_grad():
            # each branch conditioned on the other image: the query on (f_s, m_s), the support on (f_q, m_q)
            f, f_ref, m_ref = torch.cat([f_q, f_s]), torch.cat([f_s, f_q]), torch.cat([m, m_q_feat])
            proto = (f_ref * m_ref).sum((2, 3)) / (m_ref.sum((2, 3)) + common.MAP_EPS)
            glob = head.global_conditional(f, proto)
            local = head.local_conditional(f, f_ref, m_ref)
            own = head.local_conditional(f, torch.cat([f_s, f_s]), torch.cat([m, m]))  # the support on itself
        assert torch.allclose(x[:, :C], glob, atol=1e-5)
        # |local| ~ 10 and the softmax of Eq. (2) is sharp: the encoder's batching alone moves it by ~5e-5
        assert torch.allclose(x[:, C:2 * C], local, atol=2e-4)
        assert not torch.allclose(x[4:, C:2 * C], own[4:], atol=1e-1)  # the support branch is not its own reference

    def test_crcnet_mask_refinement_off_runs_once_without_the_cache_table2(self, crcnet_model):
        # Table 2 "Mask Refine" off, §5.3's baseline: the cached branch is removed (its conv, and the 32 input
        # channels of the combined conv that read it) and the module predicts from the features once, whatever
        # refine_steps
        torch.manual_seed(0)
        refine = crcnet.MaskRefinement(in_dim=12, dim=8, k=7, steps=4, cached=False)
        assert refine.steps == 1 and refine.cached is None and refine.combine[0].in_channels == 16
        x = torch.randn(2, 12, 5, 5)
        logits, caches = refine(x)
        h = refine.entry(x)
        y = refine.combine(torch.cat([h, h + refine.global_conv(h)], 1))
        assert torch.allclose(logits, refine.cls(y + refine.combine_residual(y)), atol=1e-6)
        assert len(caches) == 2 and torch.allclose(caches[1], logits.softmax(1)[:, 1:])
        net = make_crcnet(mask_refinement=False, **CRCNET_FAST_UNCACHED)
        assert n_params(crcnet_model) - n_params(net) == conv_params(1, 32) + 9 * 32 * 32
        calls = {"off": [], "on": []}
        hooks = [net.head.refinement.cls.register_forward_hook(lambda *args: calls["off"].append(1)),
                 crcnet_model.head.refinement.cls.register_forward_hook(lambda *args: calls["on"].append(1))]
        img_q, img_s, m_s, m_q = episode(2, 1, CRCNET_SIZE)
        try:
            with torch.no_grad():
                net(img_q, img_s, m_s)
                crcnet_model(img_q, img_s, m_s)
        finally:
            for hook in hooks:
                hook.remove()
        assert (len(calls["off"]), len(calls["on"])) == (1, 3)  # the fixture refines 3 times
        crcnet_runs(net)

    # ---------------- §4.6 K shots: fine-tuning, and Table 4's fusion ----------------------------------------------

    def test_crcnet_finetuning_changes_prediction_and_restores_everything(self, crcnet_model):
        img_q, img_s, m_s, m_q = episode(2, 3, CRCNET_SIZE)
        before = {k: v.clone() for k, v in crcnet_model.state_dict().items()}
        crcnet_model.eval()
        rng = torch.get_rng_state()
        with torch.no_grad():
            tuned = crcnet_model.infer(img_q, img_s, m_s)
            # "finetune" predicts from support 0
            first_support = crcnet_model(img_q, img_s[:, :1], m_s[:, :1])["logits"]
        assert tuned.shape == (2, 2, CRCNET_SIZE, CRCNET_SIZE) and torch.isfinite(tuned).all()
        assert not torch.allclose(tuned, first_support, atol=1e-4)
        assert not crcnet_model.training and torch.equal(torch.get_rng_state(), rng)
        crcnet_model.train()
        with torch.no_grad():
            alone = crcnet_model.infer(img_q[1:], img_s[1:], m_s[1:])
        assert crcnet_model.training
        crcnet_model.eval()
        assert torch.allclose(alone, tuned[1:], atol=1e-6)  # per episode, deterministic (a fixed generator)
        after = crcnet_model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert all(p.grad is None for p in crcnet_model.parameters())
        crcnet_model.cfg.ft_steps = 0  # no step: exactly the plain 1-shot prediction
        try:
            with torch.no_grad():
                assert torch.allclose(crcnet_model.infer(img_q, img_s, m_s), first_support, atol=1e-5)
        finally:
            crcnet_model.cfg.ft_steps = 3

    def test_crcnet_finetune_trains_the_head_on_pairs_of_distinct_supports_and_keeps_the_encoder_fixed(self,
                                                                                                       crcnet_model,
                                                                                                       monkeypatch):
        # §4.6: "We kept the parameters in the Siamese encoder fixed", also when training tunes it (train_encoder)
        img_q, img_s, m_s, m_q = episode(1, 2, CRCNET_SIZE)
        encoder = {k: v.clone() for k, v in crcnet_model.encoder.state_dict().items()}
        assert crcnet_model.cfg.train_encoder and all(p.requires_grad for p in crcnet_model.encoder.parameters())
        seen = []
        original = crcnet.pair_loss
        monkeypatch.setattr(crcnet, "pair_loss",
                            lambda out, mq, ms, w: seen.append((mq, ms)) or original(out, mq, ms, w))
        weights = crcnet_model.finetune(img_s[0], m_s[0])
        assert len(seen) == 3
        for mq, ms in seen:  # with two supports, every pair is (0, 1) or (1, 0)
            assert not torch.equal(mq, ms)
        names = dict(crcnet_model.head.named_parameters())
        assert set(weights) == set(names) and any(not torch.equal(weights[n], names[n]) for n in names)
        # the encoder is neither tuned nor in the fine-tuning graph: its weights unchanged, no gradient reached it
        assert all(torch.equal(encoder[k], v) for k, v in crcnet_model.encoder.state_dict().items())
        assert all(p.grad is None for p in crcnet_model.parameters())

    def test_crcnet_finetune_step_is_sgd_on_a_pair_conditioned_on_each_others_mask(self, crcnet_model):
        # §4.6 by hand for one step: the tuned head weights are p - lr * grad of Eq. (5) for an ordered pair (i, j)
        # of distinct supports, where support i plays the query (labels m_s[i]) and support j the support (labels
        # m_s[j]); the query branch is conditioned on j's features and mask, the support branch on i's (§4.7).
        # SGD's first momentum step is a plain gradient step
        net = crcnet_model
        img_q, img_s, m_s, m_q = crcnet_mixed_episode(B=1, S=2)
        steps, lr = net.cfg.ft_steps, net.cfg.ft_lr
        net.cfg.ft_steps, net.cfg.ft_lr = 1, 0.5
        try:
            tuned = net.finetune(img_s[0], m_s[0])
        finally:
            net.cfg.ft_steps, net.cfg.ft_lr = steps, lr
        with torch.no_grad():
            f_s = net.encoder(img_s[0])  # (2, C, 5, 5)
        m, labels = _at_features(m_s[0])[:, None], m_s[0]
        params = dict(net.head.named_parameters())
        candidates = []
        for i, j in [(0, 1), (1, 0), (0, 0), (1, 1)]:
            w = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
            out = functional_call(net.head, w, (f_s[i:i + 1], f_s[j:j + 1], m[j:j + 1], m[i:i + 1]))
            loss = _ce(out["query"], labels[i:i + 1]) + _ce(out["support"], labels[j:j + 1])
            loss = loss + 0.1 * (_ce(out["query_sub"], labels[i:i + 1]) + _ce(out["support_sub"], labels[j:j + 1]))
            grads = torch.autograd.grad(loss, list(w.values()))
            candidates.append({n: p.detach() - 0.5 * g for (n, p), g in zip(params.items(), grads)})
        matches = [all(torch.allclose(tuned[n], cand[n], rtol=1e-4, atol=1e-6) for n in params) for cand in candidates]
        # (0, 1) and (1, 0) are mirror images (§4.7): the same two predictions swapped, so one loss and one step,
        # whichever the generator drew; a support paired with itself is never drawn
        assert matches == [True, True, False, False], matches
        assert any(not torch.equal(tuned[n], params[n]) for n in params)  # the step moved the weights

    def test_crcnet_finetune_predicts_each_episode_from_its_tuned_weights_and_first_support(self, crcnet_model,
                                                                                            crcnet_tuned_episodes):
        # "finetune": episode b is tuned on its own supports and masks, then predicted from its first support
        pred, outs = crcnet_tuned_outputs(crcnet_model, crcnet_tuned_episodes, "finetune")
        for b in range(2):
            assert torch.allclose(pred[b:b + 1], outs[b][0]["logits"], atol=1e-5), b
        # the fine-tuning depends on which support carries which mask: swapping two supports' masks changes it
        _, img_s, m_s, weights = crcnet_tuned_episodes
        with torch.no_grad():
            swapped = crcnet_model.finetune(img_s[0], m_s[0].flip(0))
        assert any(not torch.allclose(swapped[n], weights[0][n], atol=1e-6) for n in weights[0])

    def test_crcnet_finetune_plus_fusion_averages_every_support_under_the_tuned_weights(self, crcnet_model,
                                                                                        crcnet_tuned_episodes):
        # "finetune+fusion" (Table 4, last row): the same tuned weights, then the query probabilities of both
        # 1-shot pairs averaged; it must differ from "finetune", which uses the first support only
        fused, outs = crcnet_tuned_outputs(crcnet_model, crcnet_tuned_episodes, "finetune+fusion")
        for b in range(2):
            probs = [out["query"].softmax(1) for out in outs[b]]
            expected = F.interpolate((sum(probs) / 2).log(), (CRCNET_SIZE, CRCNET_SIZE), mode="bilinear",
                                     align_corners=True)
            assert torch.allclose(fused[b:b + 1], expected, atol=1e-5), b
            first = F.interpolate(probs[0].log(), (CRCNET_SIZE, CRCNET_SIZE), mode="bilinear", align_corners=True)
            assert not torch.allclose(fused[b:b + 1], first, atol=1e-3)

    def test_crcnet_fusion_averages_one_shot_probabilities(self, crcnet_model):
        img_q, img_s, m_s, m_q = episode(2, 3, CRCNET_SIZE)
        crcnet_model.cfg.kshot = "fusion"
        try:
            with torch.no_grad():
                fused = crcnet_model.infer(img_q, img_s, m_s)
                probs = [crcnet_model(img_q, img_s[:, k:k + 1], m_s[:, k:k + 1])["query"].softmax(1) for k in range(3)]
        finally:
            crcnet_model.cfg.kshot = "finetune"
        expected = F.interpolate((sum(probs) / 3).log(), (CRCNET_SIZE, CRCNET_SIZE), mode="bilinear",
                                 align_corners=True)
        assert torch.allclose(fused, expected, atol=1e-5)

    def test_crcnet_table4_model_at_1_5_and_10_shots(self):
        # Table 4 ablates Table 1's model (its 1-shot fusion, 49.6, is Table 1's full row and Table 2's first):
        # one feature level, no cache, one scale; its rows fuse, fine-tune, or both, at 1, 5 and 10 shots
        args, module = train.parse_args(["--model", "crcnet", "--shot", "10", "--set", "levels=layer4",
                                         "mask_refinement=false", "test_scales=1", "kshot=finetune+fusion"])
        cfg = train.make_config(module, args)
        assert (cfg.levels, cfg.mask_refinement, cfg.test_scales, cfg.kshot, args.shot) == \
            (("layer4",), False, (1.0,), "finetune+fusion", 10)
        net = make_crcnet(levels=("layer4",), mask_refinement=False, **CRCNET_FAST_UNCACHED)
        img_q, img_s, m_s, m_q = episode(1, 10, CRCNET_SIZE)
        preds = {}
        for kshot in ("fusion", "finetune", "finetune+fusion"):
            net.cfg.kshot = kshot
            with torch.no_grad():
                preds[kshot] = net.infer(img_q, img_s, m_s)
            assert torch.isfinite(preds[kshot]).all(), kshot
        assert not torch.allclose(preds["fusion"], preds["finetune+fusion"], atol=1e-4)
        assert not torch.allclose(preds["finetune"], preds["finetune+fusion"], atol=1e-4)
        loss, _ = net.loss(net(img_q, img_s, m_s, m_q=m_q), m_q, m_s)  # 10 pairs trained as 1-shot episodes
        assert torch.isfinite(loss)
        crcnet_runs(net)

    # ---------------- §4.7 training: the loss (Eq. 4-5), the pairs, interchangeable roles --------------------------

    def test_crcnet_loss_has_four_terms_eq5(self, crcnet_model):
        img_q, img_s, m_s, m_q = episode(2, 1, CRCNET_SIZE)
        out = crcnet_model(img_q, img_s, m_s, m_q=m_q)
        total, terms = crcnet_model.loss(out, m_q, m_s)
        assert set(terms) == {"query", "support", "query_sub", "support_sub"}
        assert all(torch.isfinite(t) and t > 0 for t in terms.values())
        expected = terms["query"] + terms["support"] + 0.1 * (terms["query_sub"] + terms["support_sub"])
        assert torch.allclose(total, expected)
        # L_SM is the 2-class cross-entropy of the support prediction against m_s (255 ignored), Eq. (4)
        up = F.interpolate(out["support"], (CRCNET_SIZE, CRCNET_SIZE), mode="bilinear", align_corners=True)
        valid = m_s[:, 0] != 255
        ce = F.cross_entropy(up, m_s[:, 0].clamp(max=1), reduction="none")[valid].mean()
        assert torch.allclose(terms["support"], ce, atol=1e-6)

    def test_crcnet_loss_gives_each_pair_its_own_episodes_labels(self, crcnet_model):
        # Model.loss on made-up logits: pair n = b * S + k (episode-major, as forward builds them) must be scored
        # against the query mask of episode b and the mask of support k of episode b (Eq. 5, lambda = 0.1)
        B, S = 2, 3
        img_q, img_s, m_s, m_q = crcnet_mixed_episode(B=B, S=S)
        g = torch.Generator().manual_seed(1)
        out = {key: 3 * torch.randn(B * S, 2, 5, 5, generator=g)
               for key in ("query", "support", "query_sub", "support_sub")}
        total, terms = crcnet_model.loss(out, m_q, m_s)
        q_labels = torch.stack([m_q[b] for b in range(B) for k in range(S)])  # (6, 33, 33)
        s_labels = torch.stack([m_s[b, k] for b in range(B) for k in range(S)])
        assert torch.allclose(terms["query"], _ce(out["query"], q_labels), atol=1e-6)
        assert torch.allclose(terms["support"], _ce(out["support"], s_labels), atol=1e-6)
        assert torch.allclose(terms["query_sub"], _ce(out["query_sub"], q_labels), atol=1e-6)
        assert torch.allclose(terms["support_sub"], _ce(out["support_sub"], s_labels), atol=1e-6)
        by_hand = _ce(out["query"], q_labels) + _ce(out["support"], s_labels)
        by_hand = by_hand + 0.1 * (_ce(out["query_sub"], q_labels) + _ce(out["support_sub"], s_labels))
        assert torch.allclose(total, by_hand, atol=1e-6)
        # the check has teeth: the episode-interleaved pairing (episode b's label on pair b') scores differently
        wrong = torch.stack([m_q[n % B] for n in range(B * S)])
        assert abs(_ce(out["query"], wrong) - terms["query"]) > 1e-2

    def test_crcnet_forward_pairs_are_episode_major(self, crcnet_traced):
        # the order the loss assumes: out[...][b * S + k] is the pair (query b, support k of episode b)
        net, f_q, f_s, m, m_q_feat, seen, (img_q, img_s, m_s, m_q) = crcnet_traced
        with torch.no_grad():
            for b in range(2):
                alone = net(img_q[b:b + 1], img_s[b:b + 1], m_s[b:b + 1], m_q=m_q[b:b + 1])
                for key in ("query", "support", "query_sub", "support_sub"):
                    assert torch.allclose(seen["out"][key][2 * b:2 * b + 2], alone[key], atol=1e-5)

    def test_crcnet_swapping_query_and_support_swaps_the_predictions(self, crcnet_model):
        # §4.7 "Their roles are interchangeable": the pair read the other way round (the support as the query with
        # its mask, the query as the support) gives the same two predictions, swapped
        img_q, img_s, m_s, m_q = crcnet_mixed_episode(B=2, S=1)
        with torch.no_grad():
            out = crcnet_model(img_q, img_s, m_s, m_q=m_q)
            swapped = crcnet_model(img_s[:, 0], img_q[:, None], m_q[:, None], m_q=m_s[:, 0])
        for key, mirror in (("query", "support"), ("support", "query"), ("query_sub", "support_sub"),
                            ("support_sub", "query_sub")):
            assert torch.allclose(swapped[key], out[mirror], atol=1e-5), key
        assert not torch.allclose(out["query"], out["support"], atol=1e-3)  # two different predictions

    def test_crcnet_short_synthetic_training_lowers_the_loss(self):
        net = make_crcnet(refine_steps=2)
        net.train()
        episodes = data.build_dataset("synthetic", "train", 0, img_size=32, train_length=16)
        optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.0025, momentum=0.9)
        losses = []
        for step in range(8):  # fresh episodes every step
            batch = data.collate_episodes([episodes[i] for i in (2 * step, 2 * step + 1)])
            out = net(batch["img_q"], batch["img_s"], batch["m_s"], m_q=batch["m_q"])
            loss, _ = net.loss(out, batch["m_q"], batch["m_s"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert all(math.isfinite(x) for x in losses)
        assert sum(losses[-2:]) < 0.8 * sum(losses[:2])

    # ---------------- §5.1, §5.3 multi-scale inference -------------------------------------------------------------

    def test_crcnet_multi_scale_inference_by_default(self, crcnet_model):
        # §5.3: by default both images are resized to 0.75, 1 and 1.25 of their size (images bilinearly, masks
        # nearest) and the query probabilities, resized back, are averaged; one scale is plain forward
        net = crcnet_model
        img_q, img_s, m_s, m_q = episode(1, 1, CRCNET_SIZE)
        with torch.no_grad():
            plain = net(img_q, img_s, m_s)["logits"]
            assert torch.allclose(net.infer(img_q, img_s, m_s), plain, atol=1e-6)  # the fixture's one scale
            net.cfg.test_scales = crcnet.Config().test_scales
            try:
                multi = net.infer(img_q, img_s, m_s)
            finally:
                net.cfg.test_scales = (1.0,)
            probs = []
            for size in (25, 33, 41):  # round(33 * scale)
                q = F.interpolate(img_q, (size, size), mode="bilinear", align_corners=True)
                s = F.interpolate(img_s[:, 0], (size, size), mode="bilinear", align_corners=True)[:, None]
                m = F.interpolate(m_s.float(), (size, size), mode="nearest").long()
                logits = net(q, s, m)["logits"]  # (1, 2, size, size)
                probs.append(F.interpolate(logits, (33, 33), mode="bilinear", align_corners=True).exp())
        assert multi.shape == (1, 2, CRCNET_SIZE, CRCNET_SIZE)
        assert torch.allclose(multi, (sum(probs) / 3).log(), atol=1e-5)
        assert not torch.allclose(multi, plain, atol=1e-4)

    # ---------------- Tables 5, 8, 9, 11, 12: CRCNet's modules on PFENet (network="pfenet") ------------------------

    def test_crcnet_pfenet_alone_is_pfenet_with_its_10_8m_parameters(self):
        # GC and CR off: PFENet [50] at full width, its ResNet-50 frozen and its 10.8M learnable parameters counted
        # by hand: down_query, down_supp (1536 -> 256, 1x1, no bias); FEM's four bins (init_merge 513 -> 256, three
        # alpha_conv 512 -> 256, two 3x3 beta_conv and an inner_cls head each); res1 (1024 -> 256), res2, cls
        net = crcnet.Model(crcnet.Config(pretrained=False, network="pfenet", train_encoder=False,
                                         global_conditional=False, cross_reference=False))
        d = 256
        cls = 9 * d * d + 2 * d + 2
        by_hand = 2 * 1536 * d + 4 * (2 * d + 1) * d + 3 * 2 * d * d + 4 * (2 * 9 * d * d + cls) + 4 * d * d + \
            2 * 9 * d * d + cls
        assert sum(p.numel() for p in net.parameters() if p.requires_grad) == by_hand == 10_817_034
        assert not any(p.requires_grad for p in net.encoder.backbone.parameters())
        assert (net.head.cross_reference, net.head.co_occurrence, net.head.global_conditional) == (None,) * 3
        assert net.head.fem.bins == common.FEM_BINS

    def test_crcnet_pfenet_gc_and_cr_add_exactly_their_modules(self, pfenet_variants):
        # Tables 8 and 12's rows: GC adds the global conditional module, CR the cross-reference module with its
        # co-occurrence head, CRC both; nothing else changes
        count = {name: n_params(net) for name, net in pfenet_variants.items()}
        gc, cr = global_conditional_params(32), cross_reference_params(32, 4) + co_occurrence_params(32)
        assert (count["GC"] - count["PFENet"], count["CR"] - count["PFENet"], count["CRC"] - count["PFENet"]) == \
            (gc, cr, gc + cr)

    @pytest.mark.parametrize("S", [1, 5])
    @pytest.mark.parametrize("variant", list(PFENET_VARIANTS))
    def test_crcnet_pfenet_forward_places_gc_and_cr_in_pfenet(self, pfenet_variants, variant, S):
        # FEM reads the query through CR (re-weighted) and GC (conditioned on the prototype), the prototype of the
        # re-weighted supports averaged over the shots, and PFENet's prior; the co-occurrence head predicts both
        # images from G_q, G_s when the loss's labels are given; the logits are the query's, upsampled
        net = pfenet_variants[variant]
        img_q, img_s, m_s, m_q = episode(2, S, CRCNET_SIZE)
        seen = []
        hook = net.head.fem.register_forward_pre_hook(lambda module, args: seen.append(args))
        try:
            with torch.no_grad():
                out = net(img_q, img_s, m_s, m_q=m_q)
                f_q, proto, prior, g_q, g_s = pfenet_by_hand(net, img_q, img_s, m_s)
        finally:
            hook.remove()
        for got, expected in zip(seen[0], (f_q, proto, prior)):
            assert torch.allclose(got, expected, atol=1e-5)
        assert out["query"].shape == (2, 2, 5, 5) and len(out["aux"]) == len(common.FEM_BINS)
        up = F.interpolate(F.log_softmax(out["query"], 1), (CRCNET_SIZE,) * 2, mode="bilinear", align_corners=True)
        assert torch.allclose(out["logits"], up, atol=1e-5)
        cr = PFENET_VARIANTS[variant][1]
        assert ("query_sub" in out) == ("support_sub" in out) == cr
        if cr:
            with torch.no_grad():
                sub = net.head.co_occurrence(torch.cat([g_q, g_s]))
            assert torch.allclose(torch.cat([out["query_sub"], out["support_sub"]]), sub, atol=1e-5)
        with torch.no_grad():
            assert set(net(img_q, img_s, m_s)) == {"logits", "query"}  # evaluation: no FEM aux, no sub-predictions
        net.train()  # PFENet's dropout on: trains at 1 and 5 shots
        try:
            crcnet_runs(net, shots=(S,))
        finally:
            net.eval()

    @pytest.mark.parametrize("cr", [False, True])
    def test_crcnet_pfenet_loss_is_main_aux_and_the_co_occurrence_terms(self, pfenet_variants, cr):
        # PFENet's loss (main + aux_weight 1 x the mean of FEM's per-bin terms) and, with CR, Eq. (5)'s lambda
        # (L_QMsub + L_SMsub), on made-up logits: the query's terms against m_q, the supports' against m_s; on an
        # evaluation forward (no m_q), CR on or off, the loss says in one line that forward needs m_q
        net = pfenet_variants["CR" if cr else "PFENet"]
        B, S = 2, 3
        img_q, img_s, m_s, m_q = crcnet_mixed_episode(B=B, S=S)
        g = torch.Generator().manual_seed(1)
        out = {"query": 3 * torch.randn(B, 2, 5, 5, generator=g),
               "aux": [3 * torch.randn(B, 2, b, b, generator=g) for b in (5, 2, 1, 1)]}
        if cr:
            out.update(query_sub=3 * torch.randn(B, 2, 5, 5, generator=g),
                       support_sub=3 * torch.randn(B * S, 2, 5, 5, generator=g))
        total, terms = net.loss(out, m_q, m_s)
        main, aux = _ce(out["query"], m_q), torch.stack([_ce(a, m_q) for a in out["aux"]]).mean()
        by_hand = main + aux
        assert torch.allclose(terms["main"], main, atol=1e-6) and torch.allclose(terms["aux"], aux, atol=1e-6)
        if cr:
            q_sub, s_sub = _ce(out["query_sub"], m_q), _ce(out["support_sub"], m_s.flatten(0, 1))
            assert torch.allclose(terms["query_sub"], q_sub, atol=1e-6)
            assert torch.allclose(terms["support_sub"], s_sub, atol=1e-6)
            by_hand = by_hand + 0.1 * (q_sub + s_sub)
        assert set(terms) == ({"main", "aux", "query_sub", "support_sub"} if cr else {"main", "aux"})
        assert torch.allclose(total, by_hand, atol=1e-6)
        with torch.no_grad():
            evaluation = net(img_q, img_s, m_s)  # no m_q: neither FEM's aux logits nor CR's sub-predictions
        with pytest.raises(ValueError, match="forward needs m_q") as error:  # one line, CR on or off
            net.loss(evaluation, m_q, m_s)
        assert "\n" not in str(error.value)

    @pytest.mark.parametrize("variant", ["PFENet", "CRC"])
    def test_crcnet_pfenet_fusion_is_its_own_and_finetuning_restores_every_weight_table5(self, pfenet_variants,
                                                                                         variant):
        # Table 5: PFENet's own K shots ("fusion": prototypes and priors averaged, one forward) against PFENet + FT
        # (§4.6 on pairs of supports, then every support under the tuned head: "finetune+fusion"); fine-tuning
        # writes no weight of the model, leaves no gradient, and with no step is PFENet's own prediction
        net = pfenet_variants[variant]
        img_q, img_s, m_s, m_q = crcnet_mixed_episode(B=2, S=3)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        with torch.no_grad():
            fused = net.infer(img_q, img_s, m_s)
            assert torch.allclose(fused, net(img_q, img_s, m_s)["logits"], atol=1e-6)
        net.cfg.kshot = "finetune+fusion"
        try:
            with torch.no_grad():
                tuned = net.infer(img_q, img_s, m_s)
                weights = net.finetune(img_s[1], m_s[1])
                alone = net._forward(img_q[1:], img_s[1:], m_s[1:], head_weights=weights)["logits"]
            net.cfg.ft_steps = 0
            with torch.no_grad():
                untuned = net.infer(img_q, img_s, m_s)
        finally:
            net.cfg.kshot, net.cfg.ft_steps = "fusion", 2
        assert torch.isfinite(tuned).all() and not torch.allclose(tuned, fused, atol=1e-4)
        assert torch.allclose(tuned[1:], alone, atol=1e-6)  # episode 1 under the head tuned on its own supports
        assert torch.allclose(untuned, fused, atol=1e-6)
        assert set(weights) == {name for name, _ in net.head.named_parameters()}  # the encoder is not tuned
        after = net.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert all(p.grad is None for p in net.parameters())

    def test_crcnet_pfenet_finetune_step_is_sgd_on_pfenets_loss_for_a_pair_of_supports(self, pfenet_variants):
        # §4.6 on PFENet + CRC, one step by hand: support i plays the query (PFENet's query reduction and plain
        # layer4, labels m_s[i]), support j the support (its reduction, the layer4 of its masked layer3, mask
        # m_s[j]); the tuned head is p - lr * grad of PFENet's loss with the co-occurrence terms. PFENet is not
        # symmetric, so exactly one of the two ordered pairs is the step taken; a support is never its own pair
        net = pfenet_variants["CRC"]
        img_q, img_s, m_s, m_q = crcnet_mixed_episode(B=1, S=2)
        net.cfg.ft_steps, net.cfg.ft_lr = 1, 0.5
        try:
            tuned = net.finetune(img_s[0], m_s[0])
        finally:
            net.cfg.ft_steps, net.cfg.ft_lr = 2, crcnet.Config().ft_lr
        enc, labels = net.encoder, m_s[0]
        with torch.no_grad():
            plain, masked = enc.backbone(img_s[0]), enc.backbone(img_s[0], mask=labels)
            f_q, f_s = enc.down_query.reduce(plain), enc.down_supp.reduce(masked)
        m = _at_features(labels)[:, None]
        params = dict(net.head.named_parameters())
        candidates = []
        for i, j in [(0, 1), (1, 0), (0, 0), (1, 1)]:
            prior = common.cosine_prior(plain["layer4"][i:i + 1], masked["layer4"][j:j + 1], labels[j:j + 1])
            w = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
            out = functional_call(net.head, w, (f_q[i:i + 1], f_s[j:j + 1], m[j:j + 1], prior, True))
            q, s = labels[i:i + 1], labels[j:j + 1]
            loss = _ce(out["query"], q) + torch.stack([_ce(a, q) for a in out["aux"]]).mean()
            loss = loss + 0.1 * (_ce(out["query_sub"], q) + _ce(out["support_sub"], s))
            grads = torch.autograd.grad(loss, list(w.values()))
            candidates.append({n: p.detach() - 0.5 * g for (n, p), g in zip(params.items(), grads)})
        matches = [all(torch.allclose(tuned[n], cand[n], rtol=1e-4, atol=1e-6) for n in params) for cand in candidates]
        assert matches.count(True) == 1 and not any(matches[2:]), matches

    def test_crcnet_pfenet_recipe_is_pfenets_and_the_other_networks_fields_are_refused(self):
        # --set network=pfenet: PFENet's recipe as its code runs it (the harness's: lr x10, batch, epochs, crop,
        # augmentation), its frozen backbone, one test scale, its own K shots, FT at its training lr; CRCNet's
        # recipe unchanged; a field only the other network has is refused rather than silently ignored
        for dataset in ("pascal", "coco"):
            args, module = train.parse_args(["--model", "crcnet", "--dataset", dataset, "--set", "network=pfenet",
                                             "global_conditional=false", "cross_reference=false"])
            cfg = train.make_config(module, args)
            harness = train.HARNESS_DEFAULTS[dataset]
            assert {k: getattr(args, k) for k in harness} == harness
            assert (cfg.network, cfg.global_conditional, cfg.cross_reference) == ("pfenet", False, False)
            assert (cfg.train_encoder, cfg.test_scales, cfg.kshot, cfg.ft_lr) == (False, (1.0,), "fusion", args.lr)
            args, module = train.parse_args(["--model", "crcnet", "--dataset", dataset])
            assert (args.lr, args.img_size, args.augment) == (0.0025, 321, "crop-scale-flip")
            assert train.make_config(module, args).kshot == "finetune"
        with pytest.raises(ValueError, match="mask_refinement, refine_steps: no part of network=pfenet"):
            crcnet.Model(crcnet.Config(pretrained=False, network="pfenet", mask_refinement=False, refine_steps=3))
        with pytest.raises(ValueError, match="bins: no part of network=crcnet"):
            crcnet.Model(crcnet.Config(pretrained=False, bins=(1.0, 0.5)))

    # ---------------- bad input, flags and the harness -------------------------------------------------------------

    @pytest.mark.parametrize("fields, message", [
        (dict(kshot="vote"), "kshot must be one of ('finetune', 'fusion', 'finetune+fusion'), got 'vote'"),
        (dict(refine_steps=0), "refine_steps must be >= 1 (the refinement predicts; 1 = no re-use of the cache) and "
                               "ft_steps >= 0, got 0 and 20"),
        (dict(mask_refinement=False, refine_steps=3), "refine_steps: no part of mask_refinement=false (it would change "
                                                      "nothing)"),
        (dict(cross_reference=False, cr_activation="relu", aspp_rates=(6,), sub_weight=0.5),
         "cr_activation, aspp_rates, sub_weight: no part of cross_reference=false (it would change nothing)"),
        (dict(local_conditional=False, local_support_mask=False),
         "local_support_mask: no part of local_conditional=false (it would change nothing)"),
        *[(dict(gcn_kernel=k), f"gcn_kernel must be odd (its k x 1 and 1 x k convs keep the size), got {k}")
          for k in (6, 0)],  # 6: a size mismatch in the block's sum
        *[(dict(cr_reduction=r), "cr_reduction must be in 1..dim=32 (the cross-reference FC is dim // cr_reduction "
                                 f"wide), got {r}") for r in (0, 33)],  # 0: ZeroDivisionError; 33: a 0-wide FC
        *[(dict(test_scales=scales), f"test_scales must be one or more finite scales above 0, got {scales}")
          for scales in ((), (0.0,), (1.0, -0.5), (math.nan,))],  # else a crash in evaluation, after training
        *[(dict(aspp_rates=rates), f"aspp_rates must be dilations >= 1 (§4.3's ASPP), got {rates}")
          for rates in ((6, 0), (-6,))],  # else a crash at the first training step
        *[(dict(network="pfenet", cross_reference=False, global_conditional=False, bins=bins),
           f"bins must be one or more FEM bins above 0 (a fraction of the map, or a size), got {bins}")
          for bins in ((), (1.0, -0.5))],
        *[(fields, f"ft_lr and ft_momentum must be >= 0, got {lr} and {momentum}")
          for fields, lr, momentum in ((dict(ft_lr=-0.1), -0.1, 0.9), (dict(ft_momentum=-0.9), 0.0025, -0.9))],
        *[(dict(levels=levels), f"levels must be distinct ones of layer2, layer3, layer4, got {levels!r}")
          for levels in ((), ("layer1", "layer4"), ("layer5",), ("layer4", "layer4"), "layer4")],
    ])
    def test_crcnet_bad_config_is_one_value_error(self, fields, message):
        # every value that would fail later (a traceback in training, or in evaluation after it) or change nothing
        with pytest.raises(ValueError) as error:
            make_crcnet(**fields)
        assert str(error.value) == message

    def test_crcnet_a_tiny_test_scale_predicts_at_one_pixel(self):
        # test_scales=0.001 passes the > 0 check: its resize must not reach 0 pixels, after training
        net = make_crcnet(test_scales=(0.001, 1.0)).eval()
        img_q, img_s, m_s, _ = episode(2, 1, CRCNET_SIZE)
        with torch.no_grad():
            pred = net.infer(img_q, img_s, m_s)
        assert pred.shape == (2, 2, CRCNET_SIZE, CRCNET_SIZE) and torch.isfinite(pred).all()

    def test_crcnet_bad_input_raises(self):
        net = make_crcnet(refine_steps=1)
        img_q, img_s, m_s, m_q = episode(2, 2, CRCNET_SIZE)
        with pytest.raises(ValueError, match="same episodes"):
            net(img_q, img_s, m_s[:, :1])
        with pytest.raises(ValueError, match="same episodes"):
            net(img_q, img_s, m_s, m_q=m_q[:, :-1])
        with torch.no_grad():
            out = net(img_q, img_s, m_s)  # no m_q (evaluation): no support prediction to score
        with pytest.raises(ValueError, match="forward needs m_q"):
            net.loss(out, m_q, m_s)

    def test_crcnet_freeze_encoder_and_test_scales_flags_map_to_the_config(self):
        def config(*flags):
            args, module = train.parse_args(["--model", "crcnet", *flags])
            assert module is crcnet
            return train.make_config(module, args)

        assert config().train_encoder is True  # §5.1: end to end
        assert config("--freeze-encoder").train_encoder is False
        assert config().test_scales == (0.75, 1.0, 1.25)
        assert list(config("--test-scales", "1").test_scales) == [1.0]

    def test_crcnet_every_switch_is_a_set_field(self, capsys):
        # every ablation row is a command: --set FIELD=VALUE gives the Config value; a choice outside a Literal's
        # is refused in one line; all of them off at once still builds a network (the refinement on F alone)
        options = ["--model", "crcnet", "--set", "cr_activation=softmax", "local_support_mask=false"]  # Tables 6, 7
        cfg = train.make_config(*train.parse_args(options)[::-1])
        assert (cfg.cr_activation, cfg.local_support_mask) == ("softmax", False)
        switches = ["cross_reference=false", "global_conditional=false", "local_conditional=false",
                    "mask_refinement=false", "levels=layer4", "test_scales=1", "kshot=fusion"]
        args, module = train.parse_args(["--model", "crcnet", "--set", *switches])
        cfg = train.make_config(module, args)
        assert (cfg.cross_reference, cfg.global_conditional, cfg.local_conditional, cfg.mask_refinement) == (False,) * 4
        assert (cfg.levels, cfg.test_scales, cfg.kshot) == (("layer4",), (1.0,), "fusion")
        assert train.make_config(*train.parse_args(["--model", "crcnet"])[::-1]) == crcnet.Config()
        torch.manual_seed(0)
        net = crcnet.Model(dataclasses.replace(cfg, pretrained=False, dim=32))
        assert net.head.refinement.entry[0].in_channels == 32
        crcnet_runs(net, shots=(1,))
        with pytest.raises(SystemExit):
            train.parse_args(["--model", "crcnet", "--set", "cr_activation=tanh"])
        assert "cr_activation is one of sigmoid, relu, softmax" in capsys.readouterr().err
        with pytest.raises(ValueError, match="cr_activation must be one of"):
            crcnet.Model(crcnet.Config(pretrained=False, cr_activation="tanh"))

    def test_crcnet_harness_trains_and_evaluates_two_shot_by_finetuning(self, tmp_path):
        out = tmp_path / "run"
        train.main(["--model", "crcnet", "--dataset", "synthetic", "--no-pretrained", "--workers", "0",
                    "--img-size", "32", "--train-length", "2", "--batch-size", "2", "--epochs", "1", "--shot", "2",
                    "--test-episodes", "1", "--test-seeds", "1", "--refine-steps", "1", "--ft-steps", "1",
                    "--out", str(out)])
        records = read_metrics(out)
        assert records[0]["args"]["lr"] == 0.01 != train.HARNESS_DEFAULTS["synthetic"]["lr"]  # its own
        assert records[0]["args"]["ft_steps"] == 1 and records[0]["args"]["kshot"] is None  # Config default
        assert records[0]["args"]["train_encoder"] is None  # no recipe sets it: trained end to end (Config, §5.1)
        step = [r for r in records if r["event"] == "train"][0]
        # a support term: the harness passed m_q in training (train.query_mask); without it the loss raises
        assert math.isfinite(step["loss"]) and {"query", "support", "query_sub", "support_sub"} <= set(step)
        result = [r for r in records if r["event"] == "result"][0]
        assert result["shot"] == 2 and 0 <= result["miou"] <= 1

    def test_crcnet_harness_trains_and_evaluates_pfenet_crc_two_shot_with_finetuning(self, tmp_path):
        # PFENet + CRC + FT through the harness: PFENet's recipe, m_q passed in training (the co-occurrence terms
        # are computed), evaluation fine-tunes each episode's head and fuses both supports
        out = tmp_path / "run"
        train.main(["--model", "crcnet", "--dataset", "synthetic", "--no-pretrained", "--workers", "0",
                    "--img-size", "32", "--train-length", "2", "--batch-size", "2", "--epochs", "1", "--shot", "2",
                    "--test-episodes", "1", "--test-seeds", "1", "--ft-steps", "1", "--out", str(out),
                    "--set", "network=pfenet", "kshot=finetune+fusion"])
        records = read_metrics(out)
        assert records[0]["args"]["lr"] == train.HARNESS_DEFAULTS["synthetic"]["lr"]  # PFENet's: the harness's
        assert records[0]["args"]["train_encoder"] is False and records[0]["args"]["ft_lr"] == records[0]["args"]["lr"]
        step = [r for r in records if r["event"] == "train"][0]
        assert math.isfinite(step["loss"]) and {"main", "aux", "query_sub", "support_sub"} <= set(step)
        result = [r for r in records if r["event"] == "result"][0]
        assert result["shot"] == 2 and 0 <= result["miou"] <= 1


# ==========================================================================================================
# symnet.py: Sym-Net: shapes, loss, gradients; SPM, APA, TDC and the co-triplet loss by hand; K shots; word
# vectors, BAM's base learner and ensemble, the side files and the checkpoints that hold them; bf16 autocast;
# the ablations of Tables 3-6
# ==========================================================================================================

# ---------------- the forward pass recorded; a short training ---------------------------------------------

SYMNET_GRID = 6  # SYMNET_SIZE 41 -> 6x6 features; (41 - 1) / (6 - 1) = 8 is whole, so the bilinear
SYMNET_STEP = (SYMNET_SIZE - 1) // (SYMNET_GRID - 1)  # align_corners resize of a mask samples every 8th pixel exactly


def symnet_grid_mask(m_s):
    """(m_s == 1) on the 6x6 feature grid, read off by hand: pixels 0, 8, ..., 40 of each axis."""
    return (m_s == 1).float()[..., ::SYMNET_STEP, ::SYMNET_STEP]  # (..., 6, 6)


def symnet_record_forward(net, img_q, img_s, m_s, class_ids):
    """An eval forward pass (dropout off) with hooks that keep F^m of the query and the supports, the APA inputs
    and outputs (proto, text, keys/values input, output) of each shot, then of the query, TDC's input correlations
    and FEM's inputs."""
    rec = {"apa": []}
    hooks = [net.down_query.register_forward_hook(lambda mod, i, o: rec.__setitem__("f_q", o.clone())),
             net.down_supp.register_forward_hook(lambda mod, i, o: rec.__setitem__("f_s", o.clone())),
             net.apa.register_forward_hook(lambda mod, i, o: rec["apa"].append([*(x.clone() for x in i), o.clone()])),
             net.tdc.register_forward_pre_hook(lambda mod, i: rec.__setitem__("corr", [c.clone() for c in i[0]])),
             net.fem.register_forward_pre_hook(lambda mod, i: rec.__setitem__("fem", [x.clone() for x in i]))]
    net.eval()
    try:
        with torch.no_grad():
            out = net(img_q, img_s, m_s, class_ids)
    finally:
        for hook in hooks:
            hook.remove()
    (B, S), (shots, query) = img_s.shape[:2], rec["apa"]  # APA ran twice: the B*S supports, then the B queries
    assert shots[0].shape[0] == B * S and query[0].shape[0] == B
    rec["apa"] = [[x.view(B, S, *x.shape[1:])[:, k] for x in shots] for k in range(S)] + [query]
    return out, rec


def symnet_trains(net, episode, steps, lr, weight_decay=0.0, precision=contextlib.nullcontext):
    """Sym-Net after `steps` SGD steps (momentum 0.9) on one episode (img_q, img_s, m_s, m_q, class_ids), each
    under precision(): the loss in eval mode (fp32) before and after; every loss term and weight stays finite."""
    img_q, img_s, m_s, m_q, class_ids = episode
    args = (img_q, img_s, m_s, class_ids)

    def eval_loss():
        net.eval()
        with torch.no_grad():
            return net.loss(net(*args), m_q, m_s)[0].item()

    before = eval_loss()
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                                weight_decay=weight_decay)
    net.train()
    for _ in range(steps):
        with precision():
            total, terms = net.loss(net(*args), m_q, m_s)
        assert all(math.isfinite(v.item()) for v in (total, *terms.values())), terms
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    return before, eval_loss()


# ---------------- the co-triplet loss and the loss by hand ------------------------------------------------

def symnet_co_triplet(f_q, f_s, m_s, prior, p_q_aug, p_s_aug, **cfg):
    """Model.co_triplet needs nothing of the model but its Config: no backbone is built for these cases."""
    owner = types.SimpleNamespace(cfg=symnet.Config(pretrained=False, **cfg))
    return symnet.Model.co_triplet(owner, f_q, f_s, m_s, prior, p_q_aug, p_s_aug)


def symnet_unit(*v):
    v = torch.tensor(v, dtype=torch.float64)
    return v / v.norm()


def symnet_dist(a, b):
    return (a - b).norm().item()


def symnet_hand_ce(logits, labels):
    """Mean over the labelled pixels of logsumexp - the true class's logit, written out; logits (B,2,H,W)."""
    total, count = 0.0, 0
    for b, i, j in (labels != IGNORE_INDEX).nonzero().tolist():
        x = logits[b, :, i, j].double()
        total += (torch.logsumexp(x, 0) - x[labels[b, i, j]]).item()
        count += 1
    return total / count


# ---------------- K shots ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def symnet_two_shot(symnet_model):
    """A 2-shot episode (seed 0) and its recorded eval forward pass, shared by the K-shot tests."""
    img_q, img_s, m_s, m_q, class_ids = synthetic_episode(1, 2, SYMNET_SIZE)
    return (img_q, img_s, m_s, m_q, class_ids), *symnet_record_forward(symnet_model, img_q, img_s, m_s, class_ids)


def symnet_per_shot_forward(net, img_q, img_s, m_s, class_ids):
    """Model.forward (with BAM's ensemble) one shot at a time: each shot's prior, APA prototype, block
    correlations, co-triplet support term and scene difference from that shot alone, then their means (Fig. 2)."""
    cfg, S = net.cfg, img_s.shape[1]
    feats_q, feats_s = net.backbone.episode(img_q, img_s, blocks=True)
    f_q, f_s = net.down_query(feats_q), symnet.split_shots(net.down_supp(feats_s), S)  # (B,c,h,w), (B,S,c,h,w)
    m = common.foreground_at(m_s, f_q.shape[-2:])  # (B, S, h, w)

    def mean_of_shots(one_shot):  # one_shot(k, shot_of) with shot_of(x) = shot k of x, keeping a shot axis of 1
        return torch.stack([one_shot(k, lambda x: x[:, k:k + 1]) for k in range(S)]).mean(0)

    prior = mean_of_shots(lambda k, shot: symnet.self_activation_prior(
        feats_q["layer4"], shot(symnet.split_shots(feats_s["layer4"], S)), shot(m), cfg.windows))
    text = net.text[class_ids]
    p_s_aug = mean_of_shots(lambda k, shot: net.apa(masked_average_pooling(f_s[:, k], m[:, k]), text,
                                                    f_s[:, k] * m[:, k, None]))
    p_q_aug = net.apa(symnet.prior_region_mean(f_q, prior > cfg.tau1, prior, "top"), text, f_q * prior)
    corr = [mean_of_shots(lambda k, shot: symnet.block_correlation(q, shot(symnet.split_shots(s, S)), shot(m)))
            for q, s in zip(feats_q["blocks"], feats_s["blocks"])]
    ends = np.cumsum([0, *net.blocks])
    hyper = net.tdc([torch.cat(corr[a:b], 1) for a, b in zip(ends[:-1], ends[1:])])
    meta, aux = net.fem(f_q, cfg.alpha * p_q_aug + cfg.beta * p_s_aug, torch.cat([hyper, prior], 1))
    est = mean_of_shots(lambda k, shot: symnet.gram_distance(feats_q["layer2"],
                                                             shot(symnet.split_shots(feats_s["layer2"], S))))
    logits = net.ensemble(meta, net.base_learner(feats_q["layer4"]), est, net.base_learner.classes, class_ids)
    triplet = mean_of_shots(lambda k, shot: net.co_triplet(f_q, shot(f_s), shot(m_s), prior, p_q_aug, p_s_aug))
    logits = F.interpolate(logits, img_q.shape[-2:], mode="bilinear", align_corners=True)
    return {"logits": logits, "meta": meta, "aux": aux, "triplet": triplet, "prior": prior}


# ---------------- word vectors ----------------------------------------------------------------------------

def fake_word2vec(path, vectors, newline=True):
    """A word2vec C binary: header, then word + space + float32 vector (+ newline)."""
    dim = len(next(iter(vectors.values())))
    with open(path, "wb") as f:
        f.write(f"{len(vectors)} {dim}\n".encode())
        for word, vec in vectors.items():
            f.write(word.encode() + b" " + struct.pack(f"<{dim}f", *vec) + (b"\n" if newline else b""))


def unit_vector(v):
    return torch.from_numpy(v / np.linalg.norm(v))


# ---------------- ablations (§4.3, Tables 3-6) ------------------------------------------------------------

SYMNET_ROWS = {  # every ablation row of the paper that is not the default model: its --set values
    "Table 3, SPM x APA x TDC x": dict(spm=False, apa=False, tdc=False),
    "Table 3, SPM only": dict(apa=False, tdc=False),
    "Table 3, TDC only": dict(spm=False, apa=False),
    "Table 3, SPM + APA": dict(tdc=False),
    "Table 3, SPM + TDC (= Table 5, Support)": dict(apa=False),
    "Table 4, 0.45 0.55": dict(tau3=0.45),
    "Table 4, 0.45 0.60": dict(tau3=0.45, tau4=0.6),
    "Table 4, 0.40 0.60": dict(tau4=0.6),
    "Table 5, Support & Query": dict(aggregation="support+query"),
    "Table 5, Support & Word2Vec": dict(aggregation="support+word2vec"),
    "Table 5, w/o L_co-triplet": dict(co_triplet=False),
    "Table 6, 32": dict(hyper_dim=32),
    "Table 6, 64": dict(hyper_dim=64),
}


def symnet_meta(**fields):
    """Sym-Net with Config `fields` on the meta device: its modules and parameter shapes, no values (fast)."""
    with torch.device("meta"):
        return symnet.Model(symnet.Config(pretrained=False, **fields), symnet_run())


def symnet_learnable(net):
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def symnet_count_calls(monkeypatch, owner, *names):
    """{name: 0}, counting from now on the calls of owner.name (symnet's functions, Model's methods) for each name."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        def counted(*args, real=getattr(owner, name), name=name, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, counted)
    return calls


def symnet_fem_inputs(net, img_q, img_s, m_s, class_ids, train=False):
    """forward's output and FEM's inputs (f_q, prototype, extra maps), in eval (no_grad) or train mode."""
    seen = {}
    hook = net.fem.register_forward_pre_hook(lambda mod, args: seen.__setitem__("fem", args))
    net.train(train)
    try:
        with torch.no_grad() if not train else contextlib.nullcontext():
            out = net(img_q, img_s, m_s, class_ids)
    finally:
        hook.remove()
    return out, seen["fem"]


class TestSymNet:
    # ---------------- Fig. 2, the whole model: shapes, loss, gradients, empty masks, a short training ---------

    @pytest.mark.parametrize("shot", [1, 5])
    def test_symnet_forward_shapes_and_finite_loss(self, symnet_model, shot):
        B = 2 if shot == 1 else 1
        img_q, img_s, m_s, m_q, class_ids = synthetic_episode(B, shot, SYMNET_SIZE)
        symnet_model.train()
        out = symnet_model(img_q, img_s, m_s, class_ids)
        assert out["logits"].shape == (B, 2, SYMNET_SIZE, SYMNET_SIZE)
        assert out["meta"].shape == (B, 2, 6, 6) and out["prior"].shape == (B, 1, 6, 6)
        assert [a.shape[-1] for a in out["aux"]] == [6, 3, 2, 1]  # FEM bins 1, 1/2, 1/4, 1/8 of 6
        assert 0 <= out["prior"].min() and out["prior"].max() <= 1 + 1e-6
        total, terms = symnet_model.loss(out, m_q, m_s)
        assert set(terms) == {"final", "inter", "triplet"} and torch.isfinite(total)
        assert math.isclose(total.item(), sum(v.item() for v in terms.values()), rel_tol=1e-5)
        assert terms["triplet"] > 0
        symnet_model.eval()
        with torch.no_grad():
            out = symnet_model(img_q, img_s, m_s, class_ids)
        # same keys in eval
        assert out["triplet"].item() == 0 and out["logits"].shape == (B, 2, SYMNET_SIZE, SYMNET_SIZE)

    def test_symnet_every_parameter_gets_a_gradient_and_the_backbone_none(self, symnet_model):
        img_q, img_s, m_s, m_q, class_ids = synthetic_episode(1, 2, SYMNET_SIZE, seed=1)
        symnet_model.train()
        symnet_model.zero_grad(set_to_none=True)
        out = symnet_model(img_q, img_s, m_s, class_ids)
        total, _ = symnet_model.loss(out, m_q, m_s)
        total.backward()
        for name, p in symnet_model.named_parameters():
            if name.startswith("backbone."):
                assert not p.requires_grad and p.grad is None, name
            else:
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        # the word vectors feed W^Q's text columns
        assert symnet_model.apa.w_q.weight.grad[:, symnet_model.cfg.reduce_dim:].abs().sum() > 0
        symnet_model.zero_grad(set_to_none=True)

    def test_symnet_empty_support_mask_gives_no_nan(self, symnet_model):
        img_q, img_s, m_s, m_q, class_ids = synthetic_episode(2, 1, SYMNET_SIZE, seed=2)
        m_s[0] = 0  # episode 0: nothing marked
        m_s[1][m_s[1] == 1] = 255  # episode 1: only ignore pixels
        symnet_model.train()
        symnet_model.zero_grad(set_to_none=True)
        out = symnet_model(img_q, img_s, m_s, class_ids)
        total, terms = symnet_model.loss(out, m_q, m_s)
        assert torch.isfinite(out["logits"]).all() and torch.isfinite(total)
        assert torch.isfinite(out["prior"]).all() and (out["prior"] == 0).all()  # no support pixel to match
        total.backward()
        grads = [p.grad for p in symnet_model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), sum(g is None for g in grads)
        symnet_model.zero_grad(set_to_none=True)

    def test_symnet_vgg_is_refused_and_no_class_id_works(self, symnet_model):
        with pytest.raises(ValueError, match="ResNet"):
            symnet.Model(symnet.Config(backbone="vgg16_bn", pretrained=False), symnet_run())
        img_q, img_s, m_s, _, _ = synthetic_episode(1, 1, SYMNET_SIZE, seed=3)
        symnet_model.eval()
        with torch.no_grad():
            out = symnet_model(img_q, img_s, m_s, None)  # --predict passes no class: no text
        assert torch.isfinite(out["logits"]).all()

    def test_symnet_short_training_lowers_the_loss(self, tmp_path):
        torch.manual_seed(0)
        before, after = symnet_trains(make_symnet(tmp_path), synthetic_episode(2, 1, SYMNET_SIZE, seed=4), 6, 0.01)
        assert after < 0.9 * before, (before, after)

    # ---------------- §3.3 SPM (Eq. 1-3) against direct computations ------------------------------------------

    def test_symnet_spm_matches_a_direct_computation(self):
        g = torch.Generator().manual_seed(0)
        f_q = torch.rand(1, 3, 4, 5, generator=g)
        f_s = torch.rand(1, 2, 3, 4, 5, generator=g)
        m = torch.zeros(1, 2, 4, 5)
        m[0, 0, 1:3, 1:4] = 1
        m[0, 1, 0, 0] = 1
        windows = ((3, 3), (3, 1), (1, 3))

        def pooled(f, dh, dw):  # average over the window, padded zeros counted
            C, h, w = f.shape
            out = torch.zeros(C, h, w)
            for i in range(h):
                for j in range(w):
                    for di in range(-(dh // 2), dh // 2 + 1):
                        for dj in range(-(dw // 2), dw // 2 + 1):
                            if 0 <= i + di < h and 0 <= j + dj < w:
                                out[:, i, j] += f[:, i + di, j + dj] / (dh * dw)
            return out.flatten(1)  # (C, hw)

        shots = []
        for k in range(2):
            maps = []
            for dh, dw in windows:
                r_q, r_s = pooled(f_q[0], dh, dw), pooled(f_s[0, k] * m[0, k], dh, dw)
                s_r = torch.zeros(20, 20)  # Eq. (2): cos(r_q, r_s) * |r_q|
                for i in range(20):
                    for j in range(20):
                        if r_s[:, j].norm() > 0:
                            s_r[i, j] = F.cosine_similarity(r_q[:, i], r_s[:, j], dim=0) * r_q[:, i].norm()
                mean = s_r.mean(1)  # Eq. (3): mean over the support positions, then min-max
                maps.append((mean - mean.min()) / (mean.max() - mean.min()))
            shots.append(torch.stack(maps).mean(0))
        expected = torch.stack(shots).mean(0).view(1, 1, 4, 5)
        prior = symnet.self_activation_prior(f_q, f_s, m, windows)
        assert torch.allclose(prior, expected, atol=1e-5)

    def test_symnet_spm_hand_case_one_window(self):
        # 1x1 window: the support's only foreground pixel points along (1, 0); the query scores are r_q . (1, 0)
        f_q = torch.tensor([[[[1.0, 2.0], [0.0, 3.0]], [[5.0, 0.0], [1.0, 0.0]]]])  # (1, 2, 2, 2)
        f_s = torch.zeros(1, 1, 2, 2, 2)
        f_s[0, 0, 0, 0, 0] = 4.0
        m = torch.zeros(1, 1, 2, 2)
        m[0, 0, 0, 0] = 1
        # mean over the 4 support positions of cos * |r_q| = (x-component of r_q) / 4 -> [1, 2, 0, 3] / 4
        prior = symnet.self_activation_prior(f_q, f_s, m, ((1, 1),))
        assert torch.allclose(prior.flatten(), torch.tensor([1 / 3, 2 / 3, 0.0, 1.0]), atol=1e-6)

    # ---------------- §3.5 APA (Eq. 6-8) by hand; the prototypes of the forward pass (Eq. 4, 5, 7, 9) ---------

    def test_symnet_apa_hand_case_two_pixels(self):
        # W^Q passes the prototype and adds the text to its first channel, W^K = identity, W^V = 2 * identity, FFN =
        # identity: p_aug = sum_n softmax(q . k_n / sqrt(2))_n * 2 f_n + p
        apa = symnet.APA(2, 1, dropout=0.0)
        with torch.no_grad():
            apa.w_q.weight.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
            apa.w_k.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            apa.w_v.weight.copy_(2 * torch.eye(2).view(2, 2, 1, 1))
            apa.ffn[0].weight.copy_(torch.eye(2))
            apa.ffn[0].bias.zero_()
        proto, text = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0]])  # q = (2, 0)
        f = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # pixel 0 = (1, 0), pixel 1 = (0, 1)
        a0 = math.exp(2 / math.sqrt(2)) / (math.exp(2 / math.sqrt(2)) + 1)  # scores 2 / sqrt(2) and 0
        expected = torch.tensor([[2 * a0 + 1.0, 2 * (1 - a0)]])
        assert torch.allclose(apa(proto, text, f), expected, atol=1e-6)
        # no text: q = p = (1, 0), scores 1/sqrt(2) and 0
        a0 = math.exp(1 / math.sqrt(2)) / (math.exp(1 / math.sqrt(2)) + 1)
        assert torch.allclose(apa(proto, torch.zeros(1, 1), f), torch.tensor([[2 * a0 + 1.0, 2 * (1 - a0)]]), atol=1e-6)

    def test_symnet_forward_prototypes_follow_eq4_eq5_eq7_and_eq9(self, symnet_model):
        # Recomputed by hand from the recorded F^m, the prior and the APA outputs, for 2 shots:
        #   Eq. (4): p_s of shot k = the mean of that SUPPORT's F^m over its mask (MAP, area eps 5e-4);
        #   Eq. (5): p_q = the mean of the query's F^m where prior > tau1 (top-12 fallback when none);
        #   Eq. (7): APA's keys/values = F^m_s * mask (support), F^m_q * prior (query);
        #   Eq. (9): FEM's prototype = alpha p_q_aug + beta p_s_aug, p_s_aug the mean of the shots' APA outputs.
        net = symnet_model
        B, S, c = 2, 2, net.cfg.reduce_dim
        img_q, img_s, m_s, _, class_ids = synthetic_episode(B, S, SYMNET_SIZE, seed=1)
        out, rec = symnet_record_forward(net, img_q, img_s, m_s, class_ids)
        f_q, f_s = rec["f_q"], rec["f_s"].view(B, S, c, SYMNET_GRID, SYMNET_GRID)
        m, prior = symnet_grid_mask(m_s), out["prior"]
        assert len(rec["apa"]) == S + 1  # each shot, then the query
        text = net.text[class_ids]
        assert text.abs().sum() > 0  # the word vectors are on
        for k in range(S):
            proto, t, keys, _ = rec["apa"][k]
            p_s = (f_s[:, k] * m[:, k, None]).sum((2, 3)) / (m[:, k].sum((1, 2))[:, None] + MAP_EPS)
            assert torch.allclose(proto, p_s, atol=1e-5), k  # Eq. (4) from the support's own features
            assert torch.allclose(keys, f_s[:, k] * m[:, k, None], atol=1e-6) and torch.equal(t, text)
        p_q, t, keys, p_q_aug = rec["apa"][S]
        for b in range(B):
            scores = prior[b, 0].flatten()
            chosen = (scores > net.cfg.tau1).nonzero().flatten()
            if len(chosen) == 0:
                chosen = scores.argsort()[-symnet.QUERY_FALLBACK:]
            assert 0 < len(chosen) < SYMNET_GRID * SYMNET_GRID  # a real selection, not every pixel
            expected = f_q[b].flatten(1)[:, chosen].sum(1) / (len(chosen) + MAP_EPS)
            assert torch.allclose(p_q[b], expected, atol=1e-5), b  # Eq. (5)
        assert torch.allclose(keys, f_q * prior, atol=1e-6) and torch.equal(t, text)  # Eq. (7): prior-weighted
        assert not torch.allclose(keys, f_q, atol=1e-3)  # the weighting is not a no-op here
        p_s_aug = (rec["apa"][0][-1] + rec["apa"][1][-1]) / 2  # K shots averaged (Fig. 2)
        hybrid = rec["fem"][1]
        assert torch.allclose(hybrid, 0.5 * p_q_aug + 0.5 * p_s_aug, atol=1e-5)  # Eq. (9), alpha = beta = 0.5
        assert (p_s_aug - p_q_aug).abs().max() > 1e-2  # both terms matter: neither alone would match

    def test_symnet_eq5_takes_the_high_prior_pixels_of_a_planted_prior(self, symnet_model, monkeypatch):
        # A prior planted by hand (SPM replaced): 3 pixels above tau1 = 0.7, the rest below. p_q must be the mean of
        # the query features at exactly those 3 pixels, and the APA keys the features times this prior.
        net = symnet_model
        img_q, img_s, m_s, _, class_ids = synthetic_episode(1, 1, SYMNET_SIZE, seed=2)
        planted = torch.full((1, 1, SYMNET_GRID, SYMNET_GRID), 0.2)
        planted[0, 0, 1, 2], planted[0, 0, 4, 4], planted[0, 0, 5, 0] = 0.9, 0.75, 1.0
        planted[0, 0, 3, 3] = 0.7  # on the threshold: not above it
        monkeypatch.setattr(symnet, "self_activation_prior", lambda *a: planted.clone())
        out, rec = symnet_record_forward(net, img_q, img_s, m_s, class_ids)
        f_q = rec["f_q"][0]
        p_q, _, keys, _ = rec["apa"][1]
        expected = (f_q[:, 1, 2] + f_q[:, 4, 4] + f_q[:, 5, 0]) / (3 + MAP_EPS)
        assert torch.allclose(p_q[0], expected, atol=1e-5)
        assert torch.allclose(keys, rec["f_q"] * planted, atol=1e-6)
        assert torch.equal(out["prior"], planted) and torch.equal(rec["fem"][2][:, -1:], planted)  # FEM gets it too

    def test_symnet_prior_region_fallbacks(self):
        f = torch.arange(16.0).view(1, 1, 4, 4)
        prior = torch.arange(16.0).view(1, 1, 4, 4) / 15
        none = torch.zeros_like(prior, dtype=torch.bool)
        top = symnet.prior_region_mean(f, none, prior, "top")
        bottom = symnet.prior_region_mean(f, none, prior, "bottom")
        median = symnet.prior_region_mean(f, none, prior, "median")
        # 12 of 16 pixels: the highest 4..15, the lowest 0..11, around the median 2..13
        assert torch.allclose(top, torch.tensor([[9.5]]), atol=1e-2)
        assert torch.allclose(bottom, torch.tensor([[5.5]]), atol=1e-2)
        assert torch.allclose(median, torch.tensor([[7.5]]), atol=1e-2)
        assert torch.allclose(symnet.prior_region_mean(f, prior > 0.9, prior, "top"), torch.tensor([[14.5]]), atol=1e-2)

    # ---------------- §3.6 co-triplet loss (Eq. 10-12) by hand ------------------------------------------------

    def test_symnet_triplet_term_zero_when_margin_met_positive_otherwise(self):
        e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        assert symnet.triplet_term(e1, 3 * e1, -e1, 0.5).item() == 0  # 0 + 0.5 - 2 < 0
        assert symnet.triplet_term(e1, e1, e2, 0.5).item() == 0  # 0 + 0.5 - sqrt(2) < 0
        assert math.isclose(symnet.triplet_term(e1, -e1, e1, 0.5).item(), 2.5, abs_tol=1e-4)
        assert math.isclose(symnet.triplet_term(e1, e2, 2 * e1, 0.5).item(), math.sqrt(2) + 0.5, abs_tol=1e-4)

    def test_symnet_co_triplet_zero_when_every_margin_is_met(self, symnet_model):
        # support foreground pixels all equal the anchor's direction, background opposite; query regions likewise
        c, h = symnet_model.cfg.reduce_dim, 4
        d = torch.zeros(c)
        d[0] = 1
        m_s = torch.zeros(1, 1, h, h, dtype=torch.long)
        m_s[..., :2, :] = 1
        f_s = torch.where(m_s[:, :, None] == 1, d.view(1, 1, c, 1, 1), -d.view(1, 1, c, 1, 1)).float()
        prior = torch.zeros(1, 1, h, h)
        prior[..., 0, 0] = 0.5  # ambiguous band: one pixel; background: the rest
        f_q = (-d).view(1, c, 1, 1).repeat(1, 1, h, h)
        f_q[..., 0, 0] = d
        anchor = d[None]
        assert symnet_model.co_triplet(f_q, f_s, m_s, prior, anchor, anchor).item() == 0
        # swapped: the hard positives point away from the anchor
        assert symnet_model.co_triplet(-f_q, -f_s, m_s, prior, anchor, anchor).item() > 2
        # a support whose only non-object pixels are 255 keeps its negative: 255 counts as background, as in SN
        f_s[..., 2:, :] = d.view(1, 1, c, 1, 1)  # a background like the anchor: the margin is not met
        ignored = m_s.masked_fill(m_s == 0, IGNORE_INDEX)
        assert symnet_model.co_triplet(f_q, f_s, ignored, prior, anchor, anchor) == \
            symnet_model.co_triplet(f_q, f_s, m_s, prior, anchor, anchor) > 0

    def test_symnet_co_triplet_support_positive_is_the_farthest_foreground_pixel(self):
        # 2x2 support grid, c = 2, anchor e1. Foreground: 3*e1 (normalised distance 0) and 0.5*e2 (sqrt 2): the hard
        # positive is the FARTHEST in normalised distance, 0.5*e2 (unnormalised, 3*e1 would be the farther one).
        # Background: two pixels (-1, 1), so p_s^- points along (-1, 1) (the mean over all four pixels would point
        # along (1, 2.5)). The query term is 0 by construction (positive = anchor, negative = -anchor).
        f_s = torch.tensor([[3.0, 0.0], [0.0, 0.5], [-1.0, 1.0], [-1.0, 1.0]]).T.reshape(1, 1, 2, 2, 2)
        m_s = torch.tensor([[1, 1], [0, 0]]).view(1, 1, 2, 2)
        e1 = torch.tensor([[1.0, 0.0]])
        prior = torch.tensor([[0.5, 0.1], [0.1, 0.9]]).view(1, 1, 2, 2)  # band: pixel 0; below tau2: pixels 1, 2
        f_q = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0], [5.0, 5.0]]).T.reshape(1, 2, 2, 2)
        a = symnet_unit(1, 0)
        # sqrt(2) + 0.5 - 1.848 = 0.066
        expected = max(symnet_dist(a, symnet_unit(0, 1)) + 0.5 - symnet_dist(a, symnet_unit(-1, 1)), 0)
        assert expected > 0.05
        loss = symnet_co_triplet(f_q, f_s, m_s, prior, e1, e1)
        assert math.isclose(loss.item(), expected, abs_tol=1e-5)
        # what the wrong choices would give: nearest positive max(0 + 0.5 - 1.848, 0) = 0; negative over every
        # pixel sqrt(2) + 0.5 - |a - unit(1, 2.5)| = 0.79
        assert not math.isclose(loss.item(), 0.0, abs_tol=1e-3)
        every_pixel = symnet_dist(a, symnet_unit(0, 1)) + 0.5 - symnet_dist(a, symnet_unit(1, 2.5))
        assert not math.isclose(loss.item(), every_pixel, abs_tol=1e-3)

    def test_symnet_co_triplet_support_negative_is_the_background_mean_only(self):
        # 1x3 support: foreground (1, 1) (the only positive: |a - p+| = 0.765), background (1, 0.5) and a 255 pixel
        # (1, -0.3), which counts as background (SN): p_s^- along (2, 0.2). With every pixel the negative would be
        # along (3, 1.2); without the 255 pixel along (1, 0.5): each gives another loss.
        f_s = torch.tensor([[1.0, 1.0], [1.0, 0.5], [1.0, -0.3]]).T.reshape(1, 1, 2, 1, 3)
        m_s = torch.tensor([1, 0, IGNORE_INDEX]).view(1, 1, 1, 3)
        f_q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]).T.reshape(1, 2, 1, 3)
        prior = torch.tensor([0.5, 0.9, 0.1]).view(1, 1, 1, 3)  # query term: positive = a, negative = -a: 0
        e1 = torch.tensor([[1.0, 0.0]])
        a = symnet_unit(1, 0)
        pos = symnet_dist(a, symnet_unit(1, 1))
        expected = max(pos + 0.5 - symnet_dist(a, symnet_unit(2, 0.2)), 0)  # 0.765 + 0.5 - 0.0998 = 1.165
        loss = symnet_co_triplet(f_q, f_s, m_s, prior, e1, e1).item()
        assert math.isclose(loss, expected, abs_tol=1e-5)
        # every pixel: 0.887
        assert not math.isclose(loss, pos + 0.5 - symnet_dist(a, symnet_unit(3, 1.2)), abs_tol=1e-2)
        # 255 left out: 0.806
        assert not math.isclose(loss, pos + 0.5 - symnet_dist(a, symnet_unit(1, 0.5)), abs_tol=1e-2)

    def test_symnet_co_triplet_query_regions_by_hand(self):
        # The query term alone (support margins met): 3x1 pixels with prior 0.9 (tau1 region: no part in the loss),
        # 0.5 (ambiguous band tau3 < p < tau4: p_q^+) and 0.2 (< tau2: p_q^-).
        f_q = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]).T.reshape(1, 2, 3, 1)
        prior = torch.tensor([0.9, 0.5, 0.2]).view(1, 1, 3, 1)
        f_s = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]]).T.reshape(1, 1, 2, 3, 1)
        m_s = torch.tensor([1, 0, 0]).view(1, 1, 3, 1)
        anchor = torch.tensor([[0.0, 2.0]])  # along e2: the negative's direction
        a = symnet_unit(0, 1)
        # 0.765 + 0.5 - 0
        expected = max(symnet_dist(a, symnet_unit(1, 1)) + 0.5 - symnet_dist(a, symnet_unit(0, 1)), 0)
        loss = symnet_co_triplet(f_q, f_s, m_s, prior, anchor, torch.tensor([[1.0, 0.0]]))
        assert math.isclose(loss.item(), expected, abs_tol=1e-5)
        # no query branch (Table 5, "Support & Word2Vec": no p_q_aug): the support term alone, 0 here
        assert symnet_co_triplet(f_q, f_s, m_s, prior, None, torch.tensor([[1.0, 0.0]])).item() == 0

    def test_symnet_co_triplet_support_term_is_the_mean_over_shots_of_the_valid_items(self):
        # B = 2, S = 2, 1x2 supports (pixel 0 foreground, pixel 1 background). Shot 0: item 0 loss L_a, item 1 L_b;
        # shot 1: item 0 L_c, item 1 all foreground (no background: skipped, SN; it would add 1.5).
        # Support term = ((L_a + L_b) / 2 + L_c) / 2; the query term is 0.
        def support(fg, bg, all_fg=False):
            return torch.tensor([fg, bg]).T.reshape(2, 1, 2), torch.tensor([[1, 1 if all_fg else 0]])

        cases = [[support((0.0, 1.0), (0.0, 1.0)), support((1.0, -1.0), (1.0, 0.3))],  # shot 0: items 0, 1
                 [support((-1.0, 0.0), (0.0, 1.0)), support((-1.0, 0.0), (-1.0, 0.0), all_fg=True)]]  # shot 1
        f_s = torch.stack([torch.stack([cases[k][b][0] for k in range(2)]) for b in range(2)])  # (2, 2, 2, 1, 2)
        m_s = torch.stack([torch.stack([cases[k][b][1] for k in range(2)]) for b in range(2)])  # (2, 2, 1, 2)
        e1 = torch.tensor([1.0, 0.0])
        f_q = torch.stack([e1, -e1], 1).view(1, 2, 1, 2).repeat(2, 1, 1, 1)
        prior = torch.tensor([0.5, 0.1]).view(1, 1, 1, 2).repeat(2, 1, 1, 1)
        anchor = e1[None].repeat(2, 1)
        a = symnet_unit(1, 0)
        l_a = max(symnet_dist(a, symnet_unit(0, 1)) + 0.5 - symnet_dist(a, symnet_unit(0, 1)), 0)  # 0.5
        l_b = max(symnet_dist(a, symnet_unit(1, -1)) + 0.5 - symnet_dist(a, symnet_unit(1, 0.3)), 0)  # 0.975
        l_c = max(symnet_dist(a, symnet_unit(-1, 0)) + 0.5 - symnet_dist(a, symnet_unit(0, 1)), 0)  # 1.086
        expected = ((l_a + l_b) / 2 + l_c) / 2
        assert math.isclose(symnet_co_triplet(f_q, f_s, m_s, prior, anchor, anchor).item(), expected, abs_tol=1e-5)

    # ---------------- §3.7 TDC (Eq. 13): the block correlations -----------------------------------------------

    def test_symnet_block_correlation_direct(self):
        # two shots with masks of 4 and 2 pixels: per shot the mean of ReLU(cos) over its mask, then the mean of the
        # shots (not the mean over all 6 masked pixels)
        g = torch.Generator().manual_seed(1)
        f_q, f_s = torch.randn(1, 5, 3, 3, generator=g), torch.randn(1, 2, 5, 3, 3, generator=g)
        m = torch.zeros(1, 2, 3, 3)
        m[0, 0, 1:, 1:] = 1
        m[0, 1, 0, :2] = 1
        q = f_q[0].flatten(1)
        shots = []
        for k in range(2):
            s, fg = f_s[0, k].flatten(1), m[0, k].flatten().nonzero().flatten()
            shots.append(torch.stack([torch.stack([F.cosine_similarity(q[:, i], s[:, j], dim=0).clamp(min=0)
                                                   for j in fg]).mean() for i in range(9)]).view(1, 1, 3, 3))
        corr = symnet.block_correlation(f_q, f_s, m)
        assert torch.allclose(corr, (shots[0] + shots[1]) / 2, atol=1e-3)
        assert (shots[0] - shots[1]).abs().max() > 0.05  # the shots differ: the mean is not either one
        assert torch.allclose(symnet.block_correlation(f_q, f_s[:, :1], m[:, :1]), shots[0], atol=1e-3)  # one shot
        assert (symnet.block_correlation(f_q, f_s, torch.zeros(1, 2, 3, 3)) == 0).all()  # empty masks -> 0

    # ---------------- §3.8 the loss (Eq. 14-15) with BAM's "meta" term ----------------------------------------

    def test_symnet_loss_terms_by_hand_with_the_ensemble(self, symnet_model):
        # With a base learner the final output is the ensemble's, and BAM's CE on the meta learner's own output is
        # added: every term against a hand cross-entropy, on outputs given at the label size (no resize involved)
        classes = tuple(symnet.base_classes(symnet_run()))
        net = symnet.Model(dataclasses.replace(symnet_model.cfg, base_classes=classes), symnet_run())
        assert net.ensemble is not None
        g = torch.Generator().manual_seed(0)
        B, H = 2, 5
        m_q = torch.randint(0, 2, (B, H, H), generator=g)
        m_q[0, 0] = IGNORE_INDEX
        out = {"logits": torch.randn(B, 2, H, H, generator=g), "meta": 3 * torch.randn(B, 2, H, H, generator=g),
               "aux": [torch.randn(B, 2, H, H, generator=g) for _ in range(4)], "triplet": torch.tensor(0.25)}
        total, terms = net.loss(out, m_q, None)
        assert set(terms) == {"final", "inter", "triplet", "meta"}
        meta = symnet_hand_ce(out["meta"], m_q)
        assert meta > 0.5
        assert math.isclose(terms["meta"].item(), meta, rel_tol=1e-5)
        assert math.isclose(terms["final"].item(), symnet_hand_ce(out["logits"], m_q), rel_tol=1e-5)
        inter = sum(symnet_hand_ce(a, m_q) for a in out["aux"]) / 4
        assert math.isclose(terms["inter"].item(), inter, rel_tol=1e-5)
        assert math.isclose(total.item(), symnet_hand_ce(out["logits"], m_q) + inter + 0.25 + meta, rel_tol=1e-5)
        # the meta term trains the meta learner's output
        out["meta"].requires_grad_(True)
        net.loss(out, m_q, None)[0].backward()
        assert out["meta"].grad is not None and out["meta"].grad.abs().sum() > 0

    # ---------------- K shots (Fig. 2): averaged, all at once -------------------------------------------------

    def test_symnet_shot_order_does_not_matter_but_each_shot_does(self, symnet_model, symnet_two_shot):
        # K shots are averaged (priors, prototypes, correlations): permuting the supports leaves every output as it
        # was; changing the content of either shot changes the TDC input, the support prototype and the output
        net, ((img_q, img_s, m_s, _, cls), out, rec) = symnet_model, symnet_two_shot
        _, other_img_s, other_m_s, _, _ = synthetic_episode(1, 2, SYMNET_SIZE, seed=2)
        swapped, rec_sw = symnet_record_forward(net, img_q, img_s[:, [1, 0]], m_s[:, [1, 0]], cls)
        for key in ("logits", "meta", "prior"):
            assert torch.allclose(out[key], swapped[key], atol=1e-5), key
        for a, b in zip(rec["corr"], rec_sw["corr"]):
            assert torch.allclose(a, b, atol=1e-5)  # TDC input
        assert torch.allclose(rec["fem"][1], rec_sw["fem"][1], atol=1e-5)  # p_hybrid
        for k in range(2):  # shot k replaced by another image and mask
            img2, m2 = img_s.clone(), m_s.clone()
            img2[:, k], m2[:, k] = other_img_s[:, k], other_m_s[:, k]
            changed, rec2 = symnet_record_forward(net, img_q, img2, m2, cls)
            assert (changed["logits"] - out["logits"]).abs().max() > 1e-4, k
            assert max((a - b).abs().max() for a, b in zip(rec["corr"], rec2["corr"])) > 1e-3, k  # TDC sees shot k
            p_s_aug, p_s_aug2 = (sum(r["apa"][j][-1] for j in range(2)) / 2 for r in (rec, rec2))
            assert (p_s_aug - p_s_aug2).abs().max() > 1e-3, k  # and so does the support prototype
            assert torch.allclose(rec["apa"][1 - k][-1], rec2["apa"][1 - k][-1], atol=1e-5)  # the other shot's alone

    def test_symnet_k_shot_is_the_mean_of_the_one_shot_quantities(self, symnet_model, symnet_two_shot):
        # Fig. 2: a 2-shot episode's prior, block correlations (TDC input) and p_s_aug are the means of those of the
        # two 1-shot episodes made of each support alone; each shot's APA output is its 1-shot one
        net, ((img_q, img_s, m_s, _, class_ids), out, rec) = symnet_model, symnet_two_shot
        singles = [symnet_record_forward(net, img_q, img_s[:, k:k + 1], m_s[:, k:k + 1], class_ids) for k in range(2)]
        assert torch.allclose(out["prior"], (singles[0][0]["prior"] + singles[1][0]["prior"]) / 2, atol=1e-5)
        assert not torch.allclose(singles[0][0]["prior"], singles[1][0]["prior"], atol=1e-3)  # the shots differ
        for level, corr in enumerate(rec["corr"]):
            one = [single[1]["corr"][level] for single in singles]
            assert torch.allclose(corr, (one[0] + one[1]) / 2, atol=1e-5), level
            assert (one[0] - one[1]).abs().max() > 1e-3, level
        for k in range(2):
            assert torch.allclose(rec["apa"][k][-1], singles[k][1]["apa"][0][-1], atol=1e-5), k
        p_s_aug = (singles[0][1]["apa"][0][-1] + singles[1][1]["apa"][0][-1]) / 2
        p_q_aug = rec["apa"][2][-1]
        assert torch.allclose(rec["fem"][1], 0.5 * p_q_aug + 0.5 * p_s_aug, atol=1e-5)

    @pytest.mark.parametrize("shot", [1, 5])
    def test_symnet_all_shots_at_once_equal_the_per_shot_formulation(self, symnet_model, shot):
        # forward takes the K shots as one batch (one APA call for the B*S supports, one matrix of cosines per block,
        # a shot axis in SPM, the co-triplet support term and the scene difference); computing each shot alone and
        # averaging gives the same outputs, loss terms and gradients of every parameter, to float32 rounding
        classes = tuple(symnet.base_classes(symnet_run()))
        torch.manual_seed(0)
        net = symnet.Model(dataclasses.replace(symnet_model.cfg, base_classes=classes), symnet_run(),
                           symnet_model.text)
        for module in net.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.p = 0.0  # the two formulations would draw different dropout masks
        with torch.no_grad():  # weights away from the identity at initialisation, so that the scene difference counts
            net.ensemble.gram_merge.weight.copy_(torch.tensor([1.0, 0.5]).view(1, 2, 1, 1))
            net.ensemble.cls_merge.weight.copy_(torch.tensor([0.8, -0.5]).view(1, 2, 1, 1))
        img_q, img_s, m_s, m_q, class_ids = synthetic_episode(2, shot, SYMNET_SIZE, seed=6)
        net.train()
        results = []
        for forward in (net, lambda *args: symnet_per_shot_forward(net, *args)):
            net.zero_grad(set_to_none=True)
            out = forward(img_q, img_s, m_s, class_ids)
            total, terms = net.loss(out, m_q, m_s)
            total.backward()
            results.append({**{key: out[key].detach() for key in ("logits", "meta", "prior", "triplet")},
                            **{f"aux {i}": a.detach() for i, a in enumerate(out["aux"])},
                            **{f"loss {key}": value.detach() for key, value in terms.items()},
                            **{name: p.grad for name, p in net.named_parameters() if p.grad is not None}})
        at_once, per_shot = results
        assert at_once.keys() == per_shot.keys() and len(at_once) > 60  # outputs, 4 loss terms, every gradient
        for key, expected in per_shot.items():
            assert torch.allclose(at_once[key], expected, rtol=1e-4, atol=1e-5 * expected.abs().max()), key
        assert per_shot["triplet"] > 0 and per_shot["ensemble.gram_merge.weight"].abs().max() > 0
        net.zero_grad(set_to_none=True)

    # ---------------- §4.1 word vectors (word2vec) ------------------------------------------------------------

    def test_symnet_word_vectors_from_a_fake_word2vec_binary(self, tmp_path):
        g = np.random.default_rng(0)
        vocab = {w: g.standard_normal(symnet.TEXT_DIM).astype(np.float32)
                 for w in ["cat", "potted_plant", "potted", "plant", "red", "disc", "table", "tv", "</s>"]}
        for newline in (True, False):
            binary = tmp_path / f"w2v{newline}.bin"
            fake_word2vec(binary, vocab, newline)
            with pytest.warns(UserWarning, match="nosuchword"):
                vectors = symnet.build_word_vectors(binary, tmp_path / "v.pt",
                                                    ["cat", "pottedplant", "red striped disc", "diningtable",
                                                     "nosuchword"])
            assert set(vectors) == {"cat", "pottedplant", "red striped disc", "diningtable"}
            assert torch.allclose(vectors["cat"], unit_vector(vocab["cat"]), atol=1e-6)
            assert torch.allclose(vectors["pottedplant"], unit_vector(vocab["potted_plant"]), atol=1e-6)  # phrase first
            mean = (vocab["red"] + vocab["disc"]) / 2  # "striped" is not in the binary: mean of the others
            assert torch.allclose(vectors["red striped disc"], unit_vector(mean), atol=1e-6)
            assert torch.allclose(vectors["diningtable"], unit_vector(vocab["table"]), atol=1e-6)  # MIANet's word
            assert torch.load(tmp_path / "v.pt").keys() == vectors.keys()

    def test_symnet_load_word_vectors_rows_by_class_id(self, word_vectors, tmp_path):
        table = symnet.load_word_vectors(word_vectors, "synthetic")
        stored = torch.load(word_vectors)
        assert table.shape == (21, symnet.TEXT_DIM) and (table[0] == 0).all()
        assert torch.equal(table[7], stored[data.class_names("synthetic")[7]])
        torch.save({"cat": torch.ones(symnet.TEXT_DIM)}, tmp_path / "few.pt")
        with pytest.raises(common.WeightsUnavailableError, match="lack"):
            symnet.load_word_vectors(tmp_path / "few.pt", "pascal")

    def test_symnet_without_word_vectors_one_warning_and_text_off(self, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)  # no runs/ here: no base learner either
        with pytest.warns(UserWarning) as record:
            net = symnet.build(symnet.Config(pretrained=False), symnet_run())
        messages = [str(r.message) for r in record]
        assert sum("text branch is off" in m for m in messages) == 1
        assert sum("meta learner alone" in m for m in messages) == 1
        assert any("--set aggregation=support+query" in m for m in messages)  # the row's own command
        assert net.text is None and net.ensemble is None and net.cfg.base_classes is None  # no table of zeros
        seen = []  # APA's text input: zero for the supports and the query
        hook = net.apa.register_forward_pre_hook(lambda mod, args: seen.append(args[1]))
        img_q, img_s, m_s, _, class_ids = synthetic_episode(1, 1, SYMNET_SIZE)
        net.eval()
        with torch.no_grad():
            net(img_q, img_s, m_s, class_ids)
        hook.remove()
        assert [t.shape for t in seen] == [(1, symnet.TEXT_DIM)] * 2 and all((t == 0).all() for t in seen)
        with warnings.catch_warnings(record=True) as record:  # evaluating a checkpoint: it holds the base learner
            warnings.simplefilter("always")
            symnet.build(symnet.Config(pretrained=False), symnet_run(from_checkpoint=True))
        assert not any("meta learner alone" in str(r.message) for r in record)

    def test_symnet_build_refuses_a_named_side_file_that_is_missing_or_does_not_fit(self, tmp_path, monkeypatch,
                                                                                    word_vectors):
        # build reads the files: a named one that is absent, or lacks the run's classes, is a WeightsUnavailableError
        # that names it, raised before any model is built (a forward never sees it); train.py says it in one line
        def no_model(*args, **kwargs):
            raise AssertionError("a model was built although a named file is missing")

        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(symnet, "Model", no_model)
        cases = {"--word-vectors .*absent_vectors.pt$": dict(word_vectors=str(tmp_path / "absent_vectors.pt")),
                 "--base-learner .*absent_base.pt$": dict(base_learner=str(tmp_path / "absent_base.pt"),
                                                          word_vectors=str(word_vectors)),
                 "--word-vectors .*x.pt, --base-learner .*no.pt$": dict(word_vectors=str(tmp_path / "x.pt"),
                                                                        base_learner=str(tmp_path / "no.pt"))}
        for message, flags in cases.items():
            with pytest.raises(common.WeightsUnavailableError, match="no such file: " + message):
                symnet.build(symnet.Config(pretrained=False, **flags), symnet_run())
        torch.save({"cat": torch.ones(symnet.TEXT_DIM)}, tmp_path / "few.pt")
        with pytest.raises(common.WeightsUnavailableError, match=r"few.pt lack the synthetic classes"):
            symnet.build(symnet.Config(pretrained=False, word_vectors=str(tmp_path / "few.pt")), symnet_run())
        # a file that is no torch file, or a torch file of something else: named, not torch's traceback
        (tmp_path / "text.pt").write_text("not a torch file")
        with pytest.raises(common.WeightsUnavailableError, match=r"cannot read .*text.pt as word vectors"):
            symnet.build(symnet.Config(pretrained=False, word_vectors=str(tmp_path / "text.pt")), symnet_run())
        torch.save({"model": {}}, tmp_path / "other.pt")
        with pytest.raises(common.WeightsUnavailableError,
                           match=r"other.pt is not a base learner .*lacks classes, backbone$"):
            symnet.build(symnet.Config(pretrained=False, base_learner=str(tmp_path / "other.pt"),
                                       word_vectors=str(word_vectors)), symnet_run())
        with pytest.raises(SystemExit, match=r"^error: cannot read .*text.pt as a base learner"):
            train.main(["--model", "symnet", "--dataset", "synthetic", "--no-pretrained", "--img-size", "33",
                        "--train-length", "2", "--batch-size", "2", "--epochs", "1", "--workers", "0",
                        "--base-learner", str(tmp_path / "text.pt"), "--out", str(tmp_path / "run0")])
        with pytest.raises(SystemExit, match=r"^error: no such file: --base-learner .*absent_base.pt$"):
            train.main(["--model", "symnet", "--dataset", "synthetic", "--no-pretrained", "--img-size", "33",
                        "--train-length", "2", "--batch-size", "2", "--epochs", "1", "--workers", "0",
                        "--base-learner", str(tmp_path / "absent_base.pt"), "--out", str(tmp_path / "run")])

    def test_symnet_on_fss1000_no_base_learner_is_read_nor_its_stage_offered(self, tmp_path, monkeypatch):
        # FSS-1000 has no semantic labels of the base classes, so --stage base refuses it: read_base_learner says
        # so in one warning that offers no such command, and refuses a named file instead of reading it
        monkeypatch.chdir(tmp_path)
        setting = common.Setting(dataset="fss1000", pretrained=False)
        with pytest.warns(UserWarning) as record:
            assert symnet.read_base_learner(symnet.Config(pretrained=False), setting) is None
        assert [str(r.message) for r in record] == [
            "Sym-Net on FSS-1000 runs as the meta learner alone: BAM's base learner trains on semantic labels of every "
            "base class, which FSS-1000 does not have"]
        torch.save({"model": {}, "classes": [1], "backbone": "resnet50"}, tmp_path / "base.pt")
        with pytest.raises(common.WeightsUnavailableError, match=r"^--base-learner .*base.pt: BAM's base learner "
                                                                 r"trains on .*; drop the flag"):
            symnet.read_base_learner(symnet.Config(pretrained=False, base_learner=str(tmp_path / "base.pt")), setting)

    def test_symnet_base_learner_file_with_damaged_classes_is_one_line(self, tmp_path):
        torch.save({"model": {}, "classes": 5, "backbone": "resnet50"}, tmp_path / "base.pt")
        with pytest.raises(common.WeightsUnavailableError, match=r"base.pt is not a file of --stage base \(its "
                                                                 r"classes: 5\)"):
            symnet.read_base_learner(symnet.Config(pretrained=False, base_learner=str(tmp_path / "base.pt")),
                                     common.Setting(dataset="synthetic", fold=0, pretrained=False))

    def test_symnet_folder_classes_size_the_text_and_word_vectors(self, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)  # no runs/ here: no base learner
        root = _write_folder(tmp_path / "mine")
        torch.save({name: torch.full((symnet.TEXT_DIM,), float(c)) for c, name in enumerate(FOLDER_NAMES, 1)},
                   tmp_path / "v.pt")
        table = symnet.load_word_vectors(tmp_path / "v.pt", "folder", root=root)
        assert table.shape == (7, symnet.TEXT_DIM) and (table[0] == 0).all() and (table[4] == 4).all()  # row 4: car
        with pytest.warns(UserWarning) as record:  # no word vectors, no base learner: one warning each
            net = symnet.build(symnet.Config(pretrained=False),
                               common.Setting(dataset="folder", data_root=str(root), fold=1, pretrained=False))
        assert any("meta learner alone" in str(r.message) for r in record)
        assert net.text is None  # no word vectors: no table
        # a checkpoint's table: as many rows as the run's classes + 1, which train.setting_of counts in the folder
        args, _ = train.parse_args(["--model", "symnet", "--dataset", "folder", "--data-root", str(root), "--fold", "1",
                                    "--no-pretrained", "--word-vectors", str(tmp_path / "v.pt")])
        run = train.setting_of(args, from_checkpoint=True)
        assert run.num_classes == 6
        net = symnet.build(train.make_config(symnet, args), run)
        assert net.text.shape == (7, symnet.TEXT_DIM) and (net.text == 0).all()  # zeros until the checkpoint loads
        with pytest.raises(ValueError, match="setting.num_classes is needed"):
            symnet.build(train.make_config(symnet, args), dataclasses.replace(run, num_classes=None))
        # a base learner of fold 1 (base classes 1, 3, 4, 6) does not fit the run with --test-classes 3,6
        torch.save({"model": {}, "classes": [1, 3, 4, 6], "backbone": "resnet50"}, tmp_path / "base.pt")
        with pytest.raises(common.WeightsUnavailableError,
                           match=r"classes \[1, 3, 4, 6\]; this model needs resnet50, classes \[1, 2, 4, 5\]"):
            symnet.build(symnet.Config(pretrained=False, base_learner=str(tmp_path / "base.pt"),
                                       word_vectors=str(tmp_path / "v.pt")),
                         common.Setting(dataset="folder", data_root=str(root), test_classes=(3, 6), pretrained=False))

    # ---------------- §4.1 BAM's base learner and ensemble, its stage, the checkpoints, the harness -----------

    def test_symnet_base_learner_images_are_bams_whole_list_with_novel_pixels_as_background(self, tmp_path,
                                                                                            monkeypatch):
        root = _write_pascal(tmp_path / "voc")
        # fold 0: classes 1-5 novel, 6-20 base
        images = symnet.BaseClassImages(common.Setting(dataset="pascal", fold=0, img_size=80, data_root=root))
        # every training image, c_small (under 2048 px) and d_mixed (novel class 2) too, unlike the episodes
        assert images.names == ["a_voc", "b_sbd", "c_small", "d_mixed", "f_multi"] and len(images) == 5
        monkeypatch.setattr(data, "train_transform", lambda img, label, *a: (img, label))  # the labels as read
        _, label = images[(0, images.names.index("d_mixed"))]
        raw = torch.from_numpy(_PASCAL_LABELS["d_mixed"]).long()
        assert torch.equal(label, torch.where(raw == 6, 1, 0))  # base class 6 -> channel 1, novel class 2 -> 0
        _, label = images[(0, images.names.index("b_sbd"))]
        assert set(label.unique().tolist()) == {0, 2, IGNORE_INDEX}  # class 7 -> channel 2; 255 stays

    def test_symnet_bam_ensemble_identity_at_init_and_leaves_the_episode_class_out(self):
        ens = symnet.BAMEnsemble()
        meta = torch.randn(2, 2, 3, 3)
        base = torch.full((2, 4, 3, 3), -20.0)
        base[:, 2] = 20.0  # every pixel: base channel 2 = class 7 of classes [6, 7, 8]
        classes = torch.tensor([6, 7, 8])
        out = ens(meta, base, torch.zeros(2), classes, torch.tensor([7, 1]))
        assert torch.allclose(out, meta.softmax(1), atol=1e-6)  # weights [1, 0]: the meta learner alone
        with torch.no_grad():
            ens.cls_merge.weight.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))  # base classes -> background
        out = ens(meta, base, torch.zeros(2), classes, torch.tensor([7, 1]))
        assert torch.allclose(out[0, 0], meta.softmax(1)[0, 0], atol=1e-6)  # episode class 7: its channel left out
        assert torch.allclose(out[1, 0], meta.softmax(1)[1, 0] - 1, atol=1e-6)  # novel class 1: nothing left out
        with torch.no_grad():  # the scene difference enters both scores through gram_merge's second weight
            ens.gram_merge.weight.copy_(torch.tensor([1.0, 1.0]).view(1, 2, 1, 1))
            ens.cls_merge.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
        out = ens(meta, base, torch.tensor([0.5, 0.0]), classes, torch.tensor([7, 1]))
        assert torch.allclose(out[0], meta.softmax(1)[0] + 0.5, atol=1e-6)  # episode 0: est 0.5 added to bg and fg
        assert torch.allclose(out[1], meta.softmax(1)[1], atol=1e-6)  # episode 1: est 0

    def test_symnet_gram_distance_zero_for_same_scene_and_mean_over_shots(self):
        g = torch.Generator().manual_seed(0)
        f_q = torch.rand(2, 4, 3, 3, generator=g)
        other = torch.rand(2, 4, 3, 3, generator=g)
        assert torch.allclose(symnet.gram_distance(f_q, f_q[:, None]), torch.zeros(2), atol=1e-6)
        one = symnet.gram_distance(f_q, other[:, None])
        both = symnet.gram_distance(f_q, torch.stack([f_q, other], 1))
        assert (one > 0).all() and torch.allclose(both, one / 2, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 inside: the bf16 matmuls were 1-2% off
            amp = symnet.gram_distance(f_q, other[:, None])
        assert amp.dtype == torch.float32 and torch.allclose(amp, one, rtol=1e-5)

    def test_symnet_resume_follows_the_checkpoint_when_a_base_learner_appears(self, tmp_path, monkeypatch):
        # trained without a base learner, resumed after --stage base wrote one at the default path: the checkpoint
        # decides (no ensemble), and the optimizer matches it (it was built before the checkpoint was read: crash)
        monkeypatch.chdir(tmp_path)
        argv = ["--model", "symnet", "--dataset", "synthetic", "--fold", "1", "--no-pretrained", "--img-size", "33",
                "--train-length", "4", "--batch-size", "2", "--workers", "0", "--test-episodes", "2",
                "--test-seeds", "1", "--out", str(tmp_path / "run")]
        with warnings.catch_warnings(record=True) as caught:  # and: no --word-vectors, the text branch is off
            warnings.simplefilter("always")
            train.main([*argv, "--epochs", "2"])
        assert any("meta learner alone" in str(w.message) for w in caught)
        state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
        torch.save({**state, "epoch": 1}, tmp_path / "run" / "last.pt")  # as if it had stopped after epoch 1
        train.main(["--model", "symnet", "--stage", "base", "--dataset", "synthetic", "--fold", "1", "--no-pretrained",
                    "--img-size", "33", "--train-length", "4", "--batch-size", "2", "--epochs", "1", "--workers", "0"])
        assert symnet.base_learner_path(symnet_run(1)).is_file()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # resumed from its checkpoint: no side file is read, nothing to warn about
            train.main([*argv, "--resume"])
        state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
        assert state["epoch"] == 2 and not any(k.startswith("ensemble.") for k in state["model"])

    def test_symnet_base_stage_resumes_exactly_and_an_unfinished_file_is_refused(self, tmp_path, monkeypatch):
        """The base stage writes its file after every epoch; one killed after epoch 1 of 2 is refused by Sym-Net with
        the command that finishes it, and --stage base --resume gives the weights of the run that was never killed."""
        argv = ["--model", "symnet", "--stage", "base", "--dataset", "synthetic", "--fold", "1", "--no-pretrained",
                "--img-size", "33", "--train-length", "4", "--batch-size", "2", "--epochs", "2", "--workers", "0"]
        whole, cut = tmp_path / "whole" / "base.pt", tmp_path / "cut" / "base.pt"
        train.main([*argv, "--base-learner", str(whole)])
        real = common.save_atomic

        def killed_in_epoch_2(state, path):
            if state.get("epoch") == 2:
                raise RuntimeError("killed")
            real(state, path)

        monkeypatch.setattr(common, "save_atomic", killed_in_epoch_2)
        with pytest.raises(RuntimeError, match="killed"):
            train.main([*argv, "--base-learner", str(cut)])
        monkeypatch.undo()
        with pytest.raises(common.WeightsUnavailableError, match="stopped after epoch 1 of 2: finish it with python "
                                                                 "train.py --model symnet --stage base .* --resume"):
            symnet.read_base_learner(symnet.Config(base_learner=str(cut), pretrained=False), symnet_run(1))
        with pytest.raises(SystemExit, match="holds a run already"):  # not replaced without --resume or --overwrite
            train.main([*argv, "--base-learner", str(cut)])
        with pytest.raises(SystemExit, match="was made with lr 0.05 .now 0.01."):  # its own recipe, or none
            train.main([*argv, "--base-learner", str(cut), "--resume", "--lr", "0.01"])
        train.main([*argv, "--base-learner", str(cut), "--resume"])
        a, b = torch.load(whole, weights_only=True), torch.load(cut, weights_only=True)
        assert b["epoch"] == 2 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        assert [r["epoch"] for r in read_metrics(cut.parent, "base_metrics.jsonl") if r["event"] == "base"] == [1, 2]

    def test_symnet_base_stage_trains_and_sym_net_uses_it(self, tmp_path, word_vectors):
        path = tmp_path / "base.pt"
        argv = ["--model", "symnet", "--stage", "base", "--dataset", "synthetic", "--fold", "1", "--no-pretrained",
                "--img-size", "33", "--train-length", "4", "--batch-size", "2", "--epochs", "1", "--workers", "0",
                "--log-every", "1", "--base-learner", str(path)]
        with pytest.raises(SystemExit, match="needs --batch-size >= 2"):
            train.main([*argv, "--batch-size", "1"])
        assert train.main(argv) == path and path.is_file()  # 2 steps
        state = torch.load(path, weights_only=False)
        assert (state["classes"] == symnet.base_classes(symnet_run(1))
                == [c for c in range(1, 21) if c not in range(6, 11)])
        assert state["model"]["cls.4.weight"].shape[0] == 16  # background + 15 base classes
        torch.manual_seed(0)
        net = make_symnet(tmp_path, fold=1, base_learner=str(path), word_vectors=str(word_vectors))
        assert net.ensemble is not None and not any(p.requires_grad for p in net.base_learner.parameters())
        assert net.cfg.base_classes == tuple(state["classes"])  # recorded in the Config that checkpoints keep
        # random weights: the meta learner's backbone takes the BN statistics the base learner was trained on, and
        # the harness leaves them (same seed, so the same weights: the head sees the features it learned on)
        buffers = dict(net.backbone.named_buffers())
        assert all(torch.equal(buffers[k], v) for k, v in state["backbone_buffers"].items())
        assert net.backbone.calibrated and any(v.abs().sum() > 0 for k, v in buffers.items() if "running_mean" in k)
        weights = dict(net.backbone.named_parameters())
        torch.manual_seed(0)  # what --stage base built, with its default --seed 0
        stage_weights = common.Backbone("resnet50", pretrained=False)
        assert all(torch.equal(weights[k], v) for k, v in stage_weights.named_parameters())
        train.calibrate_random_backbones(net, train.parse_args(["--model", "symnet", "--dataset", "synthetic",
                                         "--no-pretrained", "--img-size", "33", "--workers", "0"])[0], "cpu", 0)
        assert all(torch.equal(v, state["backbone_buffers"][k]) for k, v in net.backbone.named_buffers())
        with pytest.raises(common.WeightsUnavailableError, match="trained on random .* this model uses ImageNet"):
            symnet.read_base_learner(symnet.Config(base_learner=str(path)), symnet_run(1))
        with pytest.raises(common.WeightsUnavailableError, match="trained on random .* --backbone-weights"):
            symnet.read_base_learner(symnet.Config(base_learner=str(path), pretrained="resnet50.pth"), symnet_run(1))
        net.train()
        assert not net.base_learner.training  # frozen BN
        img_q, img_s, m_s, m_q, class_ids = synthetic_episode(2, 1, 33, seed=5)
        total, terms = net.loss(net(img_q, img_s, m_s, class_ids), m_q, m_s)
        assert set(terms) == {"final", "inter", "triplet", "meta"} and torch.isfinite(total)
        total.backward()
        assert net.ensemble.cls_merge.weight.grad is not None and net.ensemble.gram_merge.weight.grad is not None
        assert all(p.grad is None for p in net.base_learner.parameters())
        # a checkpoint decides, through its Config: trained without the base learner -> none; with it -> rebuilt
        # (from_checkpoint: no file is read, so flags naming absent files do not matter) and loaded strictly
        with_base = {k: v.clone() for k, v in net.state_dict().items()}
        alone = symnet.build(dataclasses.replace(net.cfg, base_classes=None), symnet_run(1, from_checkpoint=True))
        alone.load_state_dict({k: v for k, v in with_base.items() if not k.startswith(("base_learner.", "ensemble."))})
        assert alone.base_learner is None and alone.ensemble is None
        absent = dataclasses.replace(net.cfg, base_learner=str(tmp_path / "no.pt"), word_vectors=str(tmp_path / "x"))
        restored = symnet.build(absent, symnet_run(1, from_checkpoint=True))
        restored.load_state_dict(with_base)
        assert (restored.ensemble is not None
                and torch.equal(restored.base_learner.classes, torch.tensor(state["classes"])))
        assert not any(p.requires_grad for p in restored.base_learner.parameters())
        assert all(torch.equal(v, with_base[k]) for k, v in restored.state_dict().items())
        with pytest.raises(common.WeightsUnavailableError, match="trained for"):
            make_symnet(tmp_path, fold=2, base_learner=str(path))

    def test_symnet_checkpoints_restore_through_train_py_without_their_side_files(self, tmp_path, monkeypatch,
                                                                                  word_vectors):
        # Two runs, one with a base learner and word vectors, one without either; then every side file is deleted
        # and a base learner is put at the default path. --eval-only --checkpoint rebuilds each model as its
        # checkpoint's Config describes it (base learner or none), reads no file and loads every weight strictly.
        monkeypatch.chdir(tmp_path)
        side = tmp_path / "side"
        side.mkdir()
        vectors, base = side / "vectors.pt", side / "base.pt"
        vectors.write_bytes(word_vectors.read_bytes())
        common_argv = ["--model", "symnet", "--dataset", "synthetic", "--fold", "1", "--no-pretrained", "--img-size",
                       "33", "--train-length", "4", "--batch-size", "2", "--workers", "0"]
        test_argv = ["--test-episodes", "2", "--test-seeds", "1"]
        train.main([*common_argv, "--stage", "base", "--epochs", "1", "--base-learner", str(base)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train.main([*common_argv, *test_argv, "--epochs", "1", "--out", str(tmp_path / "with"),
                        "--base-learner", str(base), "--word-vectors", str(vectors)])
            train.main([*common_argv, *test_argv, "--epochs", "1", "--out", str(tmp_path / "alone")])
        default = symnet.base_learner_path(symnet_run(1))
        default.parent.mkdir(parents=True)
        base.rename(default)  # a base learner the checkpoint trained without must not be taken
        vectors.unlink()
        built, construct = [], train.construct
        monkeypatch.setattr(train, "construct", lambda *args: built.append(construct(*args)) or built[-1])
        for name in ("with", "alone"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train.main([*common_argv, *test_argv, "--eval-only", "--checkpoint", str(tmp_path / name / "last.pt"),
                            "--out", str(tmp_path / f"{name}-eval")])
            saved = torch.load(tmp_path / name / "last.pt", weights_only=False)["model"]
            restored = built[-1].state_dict()
            assert restored.keys() == saved.keys() and all(torch.equal(restored[k], v) for k, v in saved.items()), name
        with_base, alone = built
        assert (with_base.cfg.base_classes == tuple(symnet.base_classes(symnet_run(1)))
                and with_base.ensemble is not None)
        assert with_base.text.abs().sum() > 0  # the word vectors, from the checkpoint
        assert alone.cfg.base_classes is None and alone.base_learner is None and alone.ensemble is None
        assert alone.text is None  # trained without word vectors: no table of zeros

    def test_symnet_harness_fills_the_config_and_defaults(self, word_vectors, tmp_path):
        args, module = train.parse_args(["--model", "symnet", "--dataset", "coco", "--fold", "2", "--shot", "5",
                                         "--word-vectors", str(word_vectors), "--base-learner", "b.pt",
                                         "--coco-split", "contiguous", "--no-pretrained"])
        cfg, run = train.make_config(module, args), train.setting_of(args)
        assert (run.dataset, run.fold, run.shot, run.coco_split, run.pretrained) == ("coco", 2, 5, "contiguous", False)
        assert cfg.pretrained is False and cfg.word_vectors == str(word_vectors) and cfg.base_learner == "b.pt"
        harness = {"shot", "img_size", "dataset", "fold", "coco_split", "from_checkpoint", "data_root", "test_classes"}
        assert not harness & {field.name for field in dataclasses.fields(cfg)}  # the run's context is the Run's
        assert (args.lr, args.batch_size, args.epochs, args.img_size) == (0.05, 32, 50, 641)  # §4.1 as SN runs it
        assert json.loads(json.dumps(dataclasses.asdict(cfg)))["tau1"] == 0.7
        assert set(symnet.STAGES) == {"base"}

    @pytest.mark.parametrize("dataset, epochs", [("pascal", 100), ("coco", 20)])
    def test_symnet_base_stage_takes_bams_base_recipe(self, dataset, epochs):
        args, _ = train.parse_args(["--model", "symnet", "--stage", "base", "--dataset", dataset])
        assert (args.lr, args.batch_size, args.epochs, args.img_size) == (0.0025, 12, epochs, 417)
        meta, _ = train.parse_args(["--model", "symnet", "--dataset", dataset])  # the meta learner keeps its own
        assert (meta.lr, meta.batch_size) == (0.05, 32)

    # ---------------- bf16 autocast: what would lose the result runs in float32; a short bf16 training --------
    # CPU autocast stands in for CUDA's: convolutions, linear layers and matrix products run in bf16 on both (CUDA
    # also keeps softmax, norms and sums in float32; the CPU does not, so these cases are the stricter ones).

    def test_symnet_apa_attention_under_bf16_autocast(self):
        # W^Q passes the prototype, W^K = W^V = identity, FFN = identity. Channel 0 of the 64 pixels is 100 plus an
        # offset in (-1, 1), so that the logits are 300 +- 3 (bf16's step there: 2); channel 1 is the pixel's index,
        # so that the output's channel 1 is the attention-weighted index, 33.40 by hand. bf16 logits gave 30.5;
        # float32 logits leave the output's own rounding (bf16's step at 33: 0.25).
        c, hw = 8, 64
        apa = symnet.APA(c, 4, dropout=0.0)
        with torch.no_grad():
            apa.w_q.weight.copy_(torch.cat([torch.eye(c), torch.zeros(c, 4)], 1))
            apa.w_k.weight.copy_(torch.eye(c).view(c, c, 1, 1))
            apa.w_v.weight.copy_(torch.eye(c).view(c, c, 1, 1))
            apa.ffn[0].weight.copy_(torch.eye(c))
            apa.ffn[0].bias.zero_()
        g = torch.Generator().manual_seed(0)
        f = torch.zeros(1, c, 1, hw)
        f[0, 0, 0] = 100 + 2 * torch.rand(hw, generator=g) - 1
        f[0, 1, 0] = torch.arange(hw).float()
        proto, text = torch.zeros(1, c), torch.zeros(1, 4)
        proto[0, 0] = 3 * math.sqrt(c)  # q = proto: logits = proto_0 f_0 / sqrt(c) = 3 f_0
        expected = (torch.softmax(3 * f[0, 0, 0].double(), 0) * torch.arange(hw)).sum().item()
        with torch.no_grad():
            assert math.isclose(apa(proto, text, f)[0, 1].item(), expected, abs_tol=1e-3)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                amp = apa(proto, text, f)[0, 1].item()
        assert math.isclose(amp, expected, abs_tol=0.25), (amp, expected)

    def test_symnet_block_correlation_under_bf16_autocast(self):
        # Two shots of post-ReLU block features of magnitude 10, 100 and 1000 (bf16 values, as a bf16 backbone gives
        # them) with cosines of 0.5-0.8: the correlations of the query pixels differ by ~0.01. With the norms and the
        # masked mean in float32 and the cosine matrix in bf16 they are within 1e-3 of float32's (measured 5e-4); a
        # bf16 mean was 2.4e-3 off (bf16's step near 0.6: 0.004).
        g = torch.Generator().manual_seed(0)
        B, C, h, S = 2, 256, 8, 2
        shared = torch.rand(1, 1, C, 1, 1, generator=g)
        feats = F.relu(shared + 0.5 * torch.randn(B, 1 + S, C, h, h, generator=g))
        feats = (feats * torch.tensor([10.0, 100.0, 1000.0]).view(1, 3, 1, 1, 1)).bfloat16().float()
        m = (torch.rand(B, S, h, h, generator=g) > 0.3).float()
        expected = symnet.block_correlation(feats[:, 0], feats[:, 1:], m)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = symnet.block_correlation(feats[:, 0], feats[:, 1:], m)
        assert 0.5 < expected.min() and expected.max() < 0.8 and expected.std() > 5e-3
        assert amp.dtype == torch.float32 and (amp - expected).abs().max() < 1e-3

    def test_symnet_query_regions_and_co_triplet_under_bf16_autocast(self):
        # bf16 features of magnitude up to 1000 on a 32x32 grid, as F^m's 1x1 convs give them under autocast: the query
        # region means (Eq. 5, 10, 11) and the co-triplet loss equal float32's on the same values (bf16 sums over
        # hundreds of pixels were 0.6% off, the loss 3e-4)
        g = torch.Generator().manual_seed(0)
        c, h, S = 64, 32, 2
        f_q = (1000 * torch.rand(2, c, h, h, generator=g)).bfloat16()
        f_s = (1000 * torch.rand(2, S, c, h, h, generator=g)).bfloat16()
        m_s = (torch.rand(2, S, h, h, generator=g) > 0.5).long()
        prior = torch.rand(2, 1, h, h, generator=g)
        anchors = torch.randn(2, c, generator=g), torch.randn(2, c, generator=g)
        expected = symnet.prior_region_mean(f_q.float(), prior > 0.3, prior, "top")
        expected_loss = symnet_co_triplet(f_q.float(), f_s.float(), m_s, prior, *anchors).item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            p_q = symnet.prior_region_mean(f_q, prior > 0.3, prior, "top")
            loss = symnet_co_triplet(f_q, f_s, m_s, prior, *anchors).item()
        assert p_q.dtype == torch.float32 and torch.allclose(p_q, expected, rtol=1e-5)
        assert expected_loss > 0.5 and math.isclose(loss, expected_loss, rel_tol=1e-5)

    def test_symnet_bam_ensemble_and_spm_under_bf16_autocast(self):
        # BAM's ensemble on bf16 logits: meta logits 300 +- a few (bf16's step: 2), base logits of +-300. Softmaxes and
        # merges in float32 give float32's result on the same logits; bf16 probabilities were 4e-3 off.
        g = torch.Generator().manual_seed(0)
        meta = (3 * torch.randn(2, 2, 8, 8, generator=g) + 300).bfloat16()
        base = (300 * torch.randn(2, 16, 8, 8, generator=g)).bfloat16()
        est, classes, class_ids = torch.rand(2, generator=g), torch.arange(6, 21), torch.tensor([7, 1])
        ens = symnet.BAMEnsemble()
        with torch.no_grad():
            ens.gram_merge.weight.copy_(torch.tensor([1.0, 0.5]).view(1, 2, 1, 1))
            ens.cls_merge.weight.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))
            expected = ens(meta.float(), base.float(), est, classes, class_ids)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                amp = ens(meta, base, est, classes, class_ids)
        assert amp.dtype == torch.float32 and torch.allclose(amp, expected, atol=1e-6)
        # SPM on layer4-like features of magnitude 1000 (float32 inside, Choices): float32's prior
        f_q = 1000 * F.relu(torch.randn(2, 512, 8, 8, generator=g))
        f_s = 1000 * F.relu(torch.randn(2, 2, 512, 8, 8, generator=g))
        m = (torch.rand(2, 2, 8, 8, generator=g) > 0.5).float()
        expected = symnet.self_activation_prior(f_q, f_s, m, symnet.Config.windows)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = symnet.self_activation_prior(f_q, f_s, m, symnet.Config.windows)
        assert amp.dtype == torch.float32 and torch.allclose(amp, expected, atol=1e-6)

    def test_symnet_short_bf16_training_stays_finite(self, tmp_path, word_vectors):
        # The synthetic recipe's optimiser (SGD, lr 0.05, momentum 0.9, weight decay 1e-4) for a few steps of 2-shot
        # episodes under bf16 autocast: every loss term and weight stays finite, and the loss (in float32) falls
        torch.manual_seed(0)
        before, after = symnet_trains(make_symnet(tmp_path, word_vectors=str(word_vectors)),
                                      synthetic_episode(2, 2, SYMNET_SIZE, seed=7), 3, 0.05, 1e-4,
                                      lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        assert after < 0.9 * before, (before, after)

    # ---------------- §4.3 ablations: Table 3 (SPM, APA, TDC), 4 (tau3, tau4), 5 (aggregation), 6 (N') ---------

    @pytest.mark.parametrize("row", list(SYMNET_ROWS))
    def test_symnet_every_ablation_row_runs_from_its_command_line_at_1_and_5_shots(self, row, word_vectors, tmp_path,
                                                                                  monkeypatch):
        # The row's command (--set; here always with --word-vectors, which the README passes only to the rows that
        # read them: the others warn it unused) gives its Config values and names its run folder; the model it builds
        # trains a step at 1 and 5 shots with finite logits, loss terms and gradients, the co-triplet term exactly
        # where APA and L_co-triplet are on
        monkeypatch.chdir(tmp_path)  # no runs/ here: no base learner
        values = SYMNET_ROWS[row]
        words = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]
        args, module = train.parse_args(["--model", "symnet", "--dataset", "synthetic", "--no-pretrained",
                                         "--word-vectors", str(word_vectors), "--set", *words])
        cfg = train.make_config(module, args)
        assert {k: getattr(cfg, k) for k in values} == values and all(w in str(args.out) for w in words)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = symnet.build(cfg, train.setting_of(args))
        for shot in (1, 5):
            img_q, img_s, m_s, m_q, class_ids = synthetic_episode(1, shot, 33, seed=shot)
            net.train()
            net.zero_grad(set_to_none=True)
            out = net(img_q, img_s, m_s, class_ids)
            total, terms = net.loss(out, m_q, m_s)
            total.backward()
            assert out["logits"].shape == (1, 2, 33, 33) and torch.isfinite(out["logits"]).all(), shot
            assert all(torch.isfinite(v) for v in terms.values()) and torch.isfinite(total), (shot, terms)
            assert set(terms) == {"final", "inter"} | ({"triplet"} if cfg.apa and cfg.co_triplet else set())
            grads = [p.grad for p in net.parameters() if p.requires_grad]
            assert all(g is not None and torch.isfinite(g).all() for g in grads), shot

    def test_symnet_each_switch_removes_exactly_its_modules_parameters(self):
        # Parameter counts by hand (c = 256, d = 300, N' = 48 (§4.1), TDC's 16 hidden channels, ResNet-50's 4, 6, 3
        # blocks) against the models each switch builds (on the meta device: shapes, no values)
        c, d, n, hidden, blocks = 256, symnet.TEXT_DIM, 48, 16, (4, 6, 3)
        apa = (c + d) * c + 3 * c * c + c  # W^Q (c+d -> c), W^K, W^V (1x1 convs, no bias), the FFN's linear + bias
        merge = 2 * hidden * hidden * 9 + hidden + 2 * hidden  # 3x3 conv 2*hidden -> hidden with bias, GroupNorm
        tdc = sum((k + 1) * hidden for k in blocks) + 2 * merge + hidden * n * 9 + n  # 1x1 per level, merges, 3x3 to N'
        channel = 4 * c  # one FEM input map: a column of init_merge's 1x1 conv (no bias) at each of the 4 scales
        full = symnet_meta()
        assert symnet_learnable(full.apa) == apa and symnet_learnable(full.tdc) == tdc  # the formulas are right
        count = {name: symnet_learnable(symnet_meta(**values)) for name, values in SYMNET_ROWS.items()}
        whole = symnet_learnable(full)
        assert whole - count["Table 3, SPM + TDC (= Table 5, Support)"] == apa  # APA off
        assert count["Table 3, SPM + TDC (= Table 5, Support)"] - count["Table 3, TDC only"] == channel  # M^pri's map
        assert whole - count["Table 3, SPM + APA"] == tdc + n * channel  # TDC off: TDC and F^hyper's N' maps
        assert whole - count["Table 3, SPM only"] == apa + tdc + n * channel
        # all three off: FEM reads no extra map, neither F^hyper's N' nor M^pri's
        assert whole - count["Table 3, SPM x APA x TDC x"] == apa + tdc + (n + 1) * channel
        assert whole - count["Table 5, Support & Query"] == d * c  # W^Q's text columns
        for row in ("Table 4, 0.45 0.55", "Table 4, 0.45 0.60", "Table 4, 0.40 0.60", "Table 5, Support & Word2Vec",
                    "Table 5, w/o L_co-triplet"):
            assert count[row] == whole, row  # what they change is computation (tests below), not parameters
        for width in (32, 64):  # Table 6: TDC's last conv and F^hyper's maps in FEM
            assert count[f"Table 6, {width}"] - whole == (width - n) * (hidden * 9 + 1 + channel), width
        assert symnet_meta(apa=False).apa is None and symnet_meta(tdc=False).tdc is None  # not built at all
        with pytest.raises(ValueError, match="spm=false needs apa=false"):  # APA reads SPM's prior (Table 3's note)
            symnet_meta(spm=False)
        with pytest.raises(ValueError, match="tau3 < tau4"):
            symnet_meta(tau3=0.55, tau4=0.55)

    def test_symnet_config_values_it_cannot_run_are_refused_before_anything_is_built(self):
        # --set values that crashed mid-forward (SPM's windows, TDC's channels, reduce_dim) or changed nothing (Table
        # 5's fields with APA off, which makes their prototypes and anchors; N' with TDC off): one ValueError each
        windows = r"^windows: SPM's pooling windows, a non-empty tuple of pairs \(d_h, d_w\) of odd positive ints"
        channels = r"^TDC's channels: hyper_dim \(N'\) and tdc_hidden must be >= 1, got "
        cases = {"windows=5,5": windows + r".*got \(5, 5\)$", "windows=((4,4),)": windows, "windows=()": windows,
                 "windows=((5,5),(7,))": windows, "windows=((5,-1),)": windows, "windows=((5.0,5),)": windows,
                 "hyper_dim=0": channels + "0 and 16$", "tdc_hidden=0": channels + "48 and 0$",
                 "apa=false co_triplet=false": r"^co_triplet=false: no part of apa=false \(it would change nothing\)$",
                 "apa=false aggregation=support+query co_triplet=false":
                     r"^aggregation=support\+query, co_triplet=false: no part of apa=false",
                 "spm=false apa=false aggregation=support+word2vec": r"^aggregation=support\+word2vec: no part of",
                 "tdc=false hyper_dim=32": r"^hyper_dim=32: no part of tdc=false \(it would change nothing\)$",
                 "tdc=false tdc_hidden=0": r"^tdc_hidden=0: no part of tdc=false", "reduce_dim=0": r"^reduce_dim must"}
        for words, message in cases.items():
            args, module = train.parse_args(["--model", "symnet", "--dataset", "synthetic", "--no-pretrained",
                                             "--set", *words.split()])
            with pytest.raises(ValueError, match=message), torch.device("meta"):
                symnet.Model(train.make_config(module, args), train.setting_of(args))
        for fields in (dict(windows=((3, 3),)), dict(windows=((1, 7), (7, 1))), dict(tdc=False)):
            assert symnet_meta(**fields).cfg.windows == fields.get("windows", symnet.Config.windows), fields

    def test_symnet_fem_gets_the_maps_of_the_modules_that_are_on(self, monkeypatch, symnet_model):
        # FEM's extra maps are [F^hyper (N'), M^pri] of the modules that are on; SPM off runs no prior, TDC off no
        # block correlation and asks the backbone for no block outputs; with neither, FEM gets no extra map
        img_q, img_s, m_s, _, class_ids = synthetic_episode(1, 2, SYMNET_SIZE, seed=3)
        calls = symnet_count_calls(monkeypatch, symnet, "self_activation_prior", "block_correlation")
        out, fem = symnet_fem_inputs(symnet_model, img_q, img_s, m_s, class_ids)
        assert calls == {"self_activation_prior": 1, "block_correlation": 13}  # the counters see the default's
        assert fem[2].shape[1] == 48 + 1 and torch.equal(fem[2][:, -1:], out["prior"])
        for values, maps in [(dict(spm=False, apa=False), "hyper"), (dict(tdc=False), "prior"),
                             (dict(hyper_dim=32), "both"), (dict(spm=False, apa=False, tdc=False), "zero")]:
            torch.manual_seed(0)
            net = symnet.Model(symnet.Config(pretrained=False, **values), symnet_run())
            hyper, blocks = [], []
            if net.tdc is not None:
                net.tdc.register_forward_hook(lambda mod, args, o: hyper.append(o))
            real = net.backbone.episode
            monkeypatch.setattr(net.backbone, "episode", lambda *a, **k: blocks.append(k["blocks"]) or real(*a, **k))
            calls.update(dict.fromkeys(calls, 0))
            out, fem = symnet_fem_inputs(net, img_q, img_s, m_s, class_ids)
            assert calls == {"self_activation_prior": int(net.cfg.spm), "block_correlation": 13 * net.cfg.tdc}, values
            assert blocks == [net.cfg.tdc] and (out["prior"] is None) == (not net.cfg.spm), values
            if maps == "hyper":
                assert torch.equal(fem[2], hyper[0]) and fem[2].shape[1] == 48
            elif maps == "prior":
                assert torch.equal(fem[2], out["prior"])  # one map
            elif maps == "both":
                assert fem[2].shape[1] == 32 + 1 and torch.equal(fem[2], torch.cat([hyper[0], out["prior"]], 1))
            else:
                assert fem[2] is None  # no extra map at all

    def test_symnet_apa_off_gives_fem_the_support_map_prototype_and_no_co_triplet(self, monkeypatch, word_vectors,
                                                                                tmp_path, symnet_model):
        # §4.3's baseline: FEM's prototype is the mean over the shots of each support's MAP (Eq. 4), by hand; no query
        # region (Eq. 5, 10, 11), no co-triplet loss, and the word vectors are not read
        monkeypatch.chdir(tmp_path)
        with pytest.warns(UserWarning) as record:  # and: no base learner here
            net = symnet.build(symnet.Config(pretrained=False, apa=False, word_vectors=str(word_vectors)), symnet_run())
        assert any("--word-vectors unused: Sym-Net with apa=false" in str(r.message) for r in record)
        assert net.apa is None and net.text is None
        img_q, img_s, m_s, m_q, class_ids = synthetic_episode(2, 2, SYMNET_SIZE, seed=4)
        regions = symnet_count_calls(monkeypatch, symnet, "prior_region_mean")
        triplets = symnet_count_calls(monkeypatch, symnet.Model, "co_triplet")
        symnet_model.train()
        symnet_model(img_q, img_s, m_s, class_ids)
        assert regions["prior_region_mean"] == 3 and triplets["co_triplet"] == 1  # the default's: Eq. 5, 10, 11
        regions["prior_region_mean"] = triplets["co_triplet"] = 0
        f_s = []
        hook = net.down_supp.register_forward_hook(lambda mod, args, o: f_s.append(o))
        _, fem = symnet_fem_inputs(net, img_q, img_s, m_s, class_ids)
        hook.remove()
        f_s, m = f_s[0].view(2, 2, -1, SYMNET_GRID, SYMNET_GRID), symnet_grid_mask(m_s)
        p_s = (f_s * m[:, :, None]).sum((3, 4)) / (m.sum((2, 3))[..., None] + MAP_EPS)  # (B, S, c): Eq. (4)
        assert torch.allclose(fem[1], p_s.mean(1), atol=1e-5) and (p_s[:, 0] - p_s[:, 1]).abs().max() > 1e-3
        out, _ = symnet_fem_inputs(net, img_q, img_s, m_s, class_ids, train=True)
        total, terms = net.loss(out, m_q, m_s)
        assert regions["prior_region_mean"] == triplets["co_triplet"] == 0 and out["triplet"] == 0
        assert set(terms) == {"final", "inter"} and torch.allclose(total, terms["final"] + terms["inter"])

    def test_symnet_support_and_word2vec_has_no_query_branch(self, monkeypatch, word_vectors, tmp_path):
        # Table 5, "Support & Word2Vec": APA runs once, on the supports with the word vector; FEM takes the mean of
        # the shots' APA outputs; no query region is pooled (Eq. 5, 10, 11); the co-triplet keeps its support term
        net = make_symnet(tmp_path, aggregation="support+word2vec", word_vectors=str(word_vectors))
        img_q, img_s, m_s, m_q, class_ids = synthetic_episode(2, 2, SYMNET_SIZE, seed=5)
        regions = symnet_count_calls(monkeypatch, symnet, "prior_region_mean")
        apa, feats = [], {}
        net.apa.register_forward_hook(lambda mod, args, o: apa.append((args, o)))
        net.down_query.register_forward_hook(lambda mod, args, o: feats.__setitem__("f_q", o))
        net.down_supp.register_forward_hook(lambda mod, args, o: feats.__setitem__("f_s", o))
        _, fem = symnet_fem_inputs(net, img_q, img_s, m_s, class_ids)
        (args, p_s_aug), = apa  # one call: the B*S supports
        assert torch.equal(args[1], net.text[class_ids].repeat_interleave(2, 0)) and args[1].abs().sum() > 0
        assert torch.allclose(fem[1], p_s_aug.view(2, 2, -1).mean(1), atol=1e-6)
        torch.manual_seed(1)
        out, fem = symnet_fem_inputs(net, img_q, img_s, m_s, class_ids, train=True)
        assert regions["prior_region_mean"] == 0
        f_s = feats["f_s"].view(2, 2, *feats["f_q"].shape[1:])
        support_term = net.co_triplet(feats["f_q"], f_s, m_s, out["prior"], None, fem[1])
        both_terms = net.co_triplet(feats["f_q"], f_s, m_s, out["prior"], fem[1], fem[1])
        assert torch.equal(out["triplet"], support_term) and (both_terms - support_term).abs() > 1e-4
        assert "triplet" in net.loss(out, m_q, m_s)[1]

    def test_symnet_support_and_query_has_no_word_vector(self, word_vectors, tmp_path):
        # Table 5, "Support & Query": both branches, no text: W^Q maps the prototype alone (c -> c), the word vectors
        # are not read (one warning), APA gets no text; FEM's prototype is Eq. (9)'s
        with pytest.warns(UserWarning) as record, contextlib.chdir(tmp_path):  # and: no base learner here
            net = symnet.build(symnet.Config(pretrained=False, aggregation="support+query",
                                             word_vectors=str(word_vectors)), symnet_run())
        assert any("--word-vectors unused: Sym-Net with apa=true, aggregation=support+query" in str(r.message)
                   for r in record)
        assert net.text is None and net.apa.w_q.in_features == net.cfg.reduce_dim
        img_q, img_s, m_s, _, class_ids = synthetic_episode(1, 2, SYMNET_SIZE, seed=6)
        apa = []
        net.apa.register_forward_hook(lambda mod, args, o: apa.append((args, o)))
        _, fem = symnet_fem_inputs(net, img_q, img_s, m_s, class_ids)
        (supports, p_s_aug), (query, p_q_aug) = apa
        assert supports[1] is None and query[1] is None
        assert torch.allclose(fem[1], 0.5 * p_q_aug + 0.5 * p_s_aug.view(1, 2, -1).mean(1), atol=1e-6)

    def test_symnet_without_co_triplet_the_loss_is_the_segmentation_terms(self, monkeypatch):
        # Table 5, "w/o L_co-triplet": the co-triplet loss is not computed; L = L_inter-seg + L_final-seg, which
        # still trains APA
        torch.manual_seed(0)
        net = symnet.Model(symnet.Config(pretrained=False, co_triplet=False), symnet_run())
        triplets = symnet_count_calls(monkeypatch, symnet.Model, "co_triplet")
        img_q, img_s, m_s, m_q, class_ids = synthetic_episode(2, 1, SYMNET_SIZE, seed=7)
        out, _ = symnet_fem_inputs(net, img_q, img_s, m_s, class_ids, train=True)
        total, terms = net.loss(out, m_q, m_s)
        assert triplets["co_triplet"] == 0 and out["triplet"] == 0 and set(terms) == {"final", "inter"}
        assert torch.allclose(total, terms["final"] + terms["inter"])
        total.backward()
        assert net.apa.w_q.weight.grad.abs().sum() > 0

    def test_symnet_tau3_and_tau4_bound_eq11s_ambiguous_band(self):
        # Table 4: the hard positive p_q^+ is the mean of the query pixels with tau3 < prior < tau4. Five 5x1 pixels
        # (c = 2): (1,0) at 0.9, (1,1) at 0.42, (0,1) at 0.2 (the negative, < tau2), (0,1) at 0.5, (2,0) at 0.58;
        # anchor along e2, the support's margins met (support term 0). Each row's band, by hand:
        f_q = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 1.0], [2.0, 0.0]]).T.reshape(1, 2, 5, 1)
        prior = torch.tensor([0.9, 0.42, 0.2, 0.5, 0.58]).view(1, 1, 5, 1)
        f_s = torch.tensor([[1.0, 0.0]] + [[-1.0, 0.0]] * 4).T.reshape(1, 1, 2, 5, 1)
        m_s = torch.tensor([1, 0, 0, 0, 0]).view(1, 1, 5, 1)
        a = symnet_unit(0, 1)
        bands = {(0.40, 0.55): (1.0, 2.0),  # pixels 1 and 3: the mean (0.5, 1)
                 (0.45, 0.55): (0.0, 1.0),  # pixel 3
                 (0.45, 0.60): (2.0, 1.0),  # pixels 3 and 4: (1, 0.5)
                 (0.40, 0.60): (3.0, 2.0)}  # pixels 1, 3, 4: (1, 2/3)
        losses = {}
        for (tau3, tau4), positive in bands.items():
            expected = symnet_dist(a, symnet_unit(*positive)) + 0.5 - symnet_dist(a, symnet_unit(0, 1))
            losses[tau3, tau4] = symnet_co_triplet(f_q, f_s, m_s, prior, torch.tensor([[0.0, 2.0]]),
                                                   torch.tensor([[1.0, 0.0]]), tau3=tau3, tau4=tau4).item()
            assert math.isclose(losses[tau3, tau4], expected, abs_tol=1e-5), (tau3, tau4)
        assert len({round(v, 3) for v in losses.values()}) == 4  # each row pools another band

# ==========================================================================================================
# qpenet.py: QPENet in the paper's order: the overview (shapes, K shots, what evaluation computes), PPG, DPE, GBC,
# FFA and its cross attention, the loss, the parameter counts and the ablations of §IV-D (Tables III-V)
# ==========================================================================================================

QPENET_H_FEAT = 5


@pytest.fixture(scope="module")
def qpenet_step(qpenet_model):
    """One 2-shot training step: the outputs, the loss and a snapshot of the gradients."""
    img_q, img_s, m_s, m_q = episode(2, 2, QPENET_SIZE)
    qpenet_model.train()
    qpenet_model.zero_grad()
    out = qpenet_model(img_q, img_s, m_s)
    total, terms = qpenet_model.loss(out, m_q, m_s)
    total.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in qpenet_model.named_parameters()}
    return dict(out=out, total=total, terms=terms, grads=grads, m_s=m_s, m_q=m_q)


TOL = dict(atol=1e-5, rtol=1e-5)


class Scripted(nn.Module):
    """Stands in for a Convs: records every input and returns the next of the given logits."""

    def __init__(self, *outputs):
        super().__init__()
        self.outputs, self.inputs = list(outputs), []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.outputs[len(self.inputs) - 1]


def logits_of(fg):
    """Two-channel logits whose argmax is the binary mask fg (..., h, w): channel 1 wins exactly where fg = 1."""
    fg = fg.float()
    return torch.stack([1 - fg, fg], -3)


def map_by_hand(f, m):
    """MAP written out: f (C, n) features of n pixels, m (n,) weights -> sum_i f(i) m(i) / (sum_i m(i) + eps)."""
    return (f * m).sum(1) / (m.sum() + MAP_EPS)


def pixels(f):
    """(..., C, h, w) -> (C, n): the pixels of one image (or of all K shots of one episode) as columns."""
    return f.movedim(-3, 0).reshape(f.shape[-3], -1)


def cosine_by_hand(f, p):
    """Eq. (13)/(14) written out: f (C, h, w), p (C,) -> p.f(i) / (|p| |f(i)|), (h, w)."""
    return (f * p[:, None, None]).sum(0) / (p.norm() * f.norm(dim=0))


def expect_broadcast(x, p):
    """Assert that every pixel of x (N, C, h, w) holds the prototype p (N, C)."""
    torch.testing.assert_close(x, p[:, :, None, None].expand_as(x), **TOL)


# ---------------- FFA: Eq. (12)-(15) inputs, Eq. (16) keys ------------------------------------------------

def qpenet_small_ffa(**kw):
    torch.manual_seed(0)
    return qpenet.FFA(8, heads=2, ffn_dim=16, attn_dropout=0.1, head_dropout=0.1, layers=2, **kw).eval()


def qpenet_cross_by_hand(layer, x, tokens):
    """One Cross layer written out for one image: x (N, C) query pixels, tokens (L, C) the support foreground
    pixels F_s * M_s (L may be 0: then attention adds nothing). Weights taken from layer, masking done here."""
    N, C = x.shape
    heads = layer.heads
    d = C // heads
    if len(tokens) == 0:
        attn = torch.zeros(N, C)
    else:
        q = (x @ layer.to_q.weight.T).view(N, heads, d).transpose(0, 1)  # (heads, N, d)
        k = (tokens @ layer.to_k.weight.T).view(-1, heads, d).transpose(0, 1)  # (heads, L, d)
        v = (tokens @ layer.to_v.weight.T).view(-1, heads, d).transpose(0, 1)
        a = (q @ k.transpose(1, 2) / math.sqrt(d)).softmax(-1) @ v  # (heads, N, d)
        attn = a.transpose(0, 1).reshape(N, C) @ layer.to_out.weight.T
    x = layer.norm_attn(x + attn)
    return layer.norm_ffn(x + layer.ffn(x))


def qpenet_keys_episode():
    """B=3 episodes of 2 shots, features 3x3, labels m_s 6x6 (nearest samples label rows/columns 0, 2, 4; the
    bilinear M_s samples 0, 2.5, 5). Episode 1 has foreground only in its second shot, episode 2 none at all
    (a 255 row). -> f_q, f_s, m_s, the four prototypes (FFA's order), and the bilinear M_s (B,S,3,3)."""
    torch.manual_seed(1)
    B, S, C, h, w = 3, 2, 8, 3, 3
    f_q, f_s = torch.randn(B, C, h, w), torch.randn(B, S, C, h, w)
    m_s = torch.zeros(B, S, 2 * h, 2 * w, dtype=torch.long)
    m_s[0, 0, :3, :3] = 1  # keys (0,0) (0,1) (1,0) (1,1); bilinear M_s 1, 0.5, 0.5, 0.25 there
    m_s[0, 0, 3, 5] = 1  # bilinear M_s 0.5 at (1,2), no key: nearest reads label (2,4) = 0
    m_s[0, 1, 4:] = 1
    m_s[0, 1, 4, 4] = IGNORE_INDEX  # (2,2): bilinear M_s 1 (label row 5), no key: nearest reads this 255
    m_s[1, 1, 2:, 2:] = 1  # keys (1,1) (1,2) (2,1) (2,2)
    m_s[1, 1, 0, 4] = 1  # key (0,2), where the bilinear M_s is 0
    m_s[2, :, 0] = IGNORE_INDEX
    p_bg, p_pre, p_main, p_aux = (torch.randn(B, C) for _ in range(4))
    m_bilinear = F.interpolate((m_s == 1).float(), (h, w), mode="bilinear", align_corners=True)
    return f_q, f_s, m_s, p_bg, p_pre, p_main, p_aux, m_bilinear


def qpenet_nearest_keys(m_s, h, w):
    """The keys of Eq. (16) by hand: the label (..., H, W) read at row i * H // h, column j * W // w, == 1."""
    H, W = m_s.shape[-2:]
    rows, cols = [i * H // h for i in range(h)], [j * W // w for j in range(w)]
    return m_s[..., rows, :][..., cols] == 1  # (..., h, w) bool


# ---------------- §IV-D ablations: the rows of Tables III-V as Config fields, their parameters by hand ------------

QPENET_ABLATIONS = {  # every row that differs from the full model (the defaults); "no FGPE" is the switch alone
    "III-baseline": dict(fgpe=False, bgpe=False, decoder="fem"),
    "III-FGPE": dict(bgpe=False, decoder="fem"),
    "III-FGPE+BGPE": dict(decoder="fem"),
    "III-FGPE+FFA": dict(bgpe=False),
    "no-FGPE": dict(fgpe=False),
    "IV-pre": dict(foreground_prototypes="pre"),
    "IV-main": dict(foreground_prototypes="main"),
    "IV-aux": dict(foreground_prototypes="aux"),
    "IV-main+aux": dict(foreground_prototypes="main+aux"),
    "V-no-activation-maps": dict(activation_maps=False),
    "V-SGM": dict(dpe="sgm"),
}


def qpenet_variant(**kw):
    """QPENet with random weights and the given Config fields (an ablation row)."""
    torch.manual_seed(0)
    return qpenet.Model(qpenet.Config(pretrained=False, **kw))


def qpenet_convs_params(c_in, c):
    """A Convs by hand: 1x1 reduce (no bias), two 3x3 residual, 3x3 + 1x1 -> 2 (with bias)."""
    return c_in * c + 2 * 9 * c * c + 9 * c * c + 2 * c + 2


def qpenet_ffa_params(c=256, ffn=768, layers=2):
    """FFA by hand: Conv_1 of Eq. (12) and (15) (no bias), per Cross layer q/k/v/out, two LayerNorms and the FFN
    (no biases), the final Convs."""
    return 2 * c * c + (2 * c + 2) * c + layers * (4 * c * c + 2 * 2 * c + 2 * c * ffn) + qpenet_convs_params(c, c)


def qpenet_fem_params(c=256, extra=3 * 256, bins=4):
    """PFENet's FEM by hand: per scale init_merge (2c + extra -> c), beta_conv (two 3x3), inner_cls; alpha_conv
    (2c -> c) on every scale but the first; res1 (bins * c -> c), res2 (two 3x3), cls (3x3, then 1x1 -> 2)."""
    cls = 9 * c * c + 2 * c + 2
    return (bins * ((2 * c + extra) * c + 2 * 9 * c * c + cls) + (bins - 1) * 2 * c * c + bins * c * c
            + 2 * 9 * c * c + cls)


def qpenet_parameter_change(kw, c=256):
    """The learnable parameters that an ablation row adds (negative: removes), by hand."""
    change = 0
    if not kw.get("fgpe", True):
        change -= qpenet_convs_params(2 * c, c)  # PPG and DPE's one Convs: the paper's 34.6M - 32.7M
    if not kw.get("bgpe", True):
        change -= 2 * (c * c + c)  # GBC's cleaner, two Linear(c, c) with biases
    if kw.get("decoder") == "fem":
        change += qpenet_fem_params(c) - qpenet_ffa_params(c)
    inputs = {"pre": c, "main": 1, "aux": 1}  # Eq. (15)'s input channels per prototype: BC(P_pre), A_main, A_aux
    kept = kw.get("foreground_prototypes", "pre+main+aux").split("+")
    change -= c * sum(n for name, n in inputs.items() if name not in kept)  # Conv_1's columns, no bias
    if not kw.get("activation_maps", True):
        change += c * 2 * (c - 1)  # BC(P_main), BC(P_aux): c channels each instead of 1
    return change


def qpenet_scripted_episode(model, S=2):
    """A 2-episode forward input whose features are random stand-ins (model.features replaced), with the masks
    that scripted Convs give (the wiring test's): -> img_q, img_s, m_s, m_q, f_q, f_s, the bilinear M_s, fg_pre
    (B,h,w) for Eq. (2) and rev (B,S,h,w) for Eq. (4)."""
    torch.manual_seed(0)
    B, C, h = 2, model.cfg.dim, QPENET_H_FEAT
    img_q, img_s, m_s, m_q = episode(B, S, QPENET_SIZE)
    f = torch.randn(B + B * S, C, h, h)
    model.features = lambda img: f
    fg_pre = torch.zeros(B, h, h)
    fg_pre[0, 1:3, 1:4] = 1
    fg_pre[1, 4, 0] = 1
    rev = torch.zeros(B, S, h, h)
    rev[0, 0, :2] = 1
    rev[0, 1, :, 2:] = 1
    rev[1, 0, 2:, :3] = 1
    rev[1, 1] = 1
    m = F.interpolate((m_s == 1).float(), (h, h), mode="bilinear", align_corners=True)
    return img_q, img_s, m_s, m_q, f[:B], f[B:].view(B, S, C, h, h), m, fg_pre, rev


def qpenet_map_each(f, m):
    """MAP by hand for each episode: f (B,[S,]C,h,w), m (B,[S,]h,w) -> (B,C)."""
    return torch.stack([map_by_hand(pixels(f[b]), m[b].flatten()) for b in range(len(f))])


class TestQPENet:
    # ---------------- §III-B overview: shapes, what evaluation computes, K shots, empty masks, the wiring ---------

    @pytest.mark.parametrize("shot", [1, 5])
    def test_qpenet_forward_shapes(self, qpenet_model, qpenet_step, shot):
        img_q, img_s, m_s, _ = episode(2, shot, QPENET_SIZE)
        with torch.no_grad():
            out = qpenet_model.eval()(img_q, img_s, m_s)
        assert out["logits"].shape == (2, 2, QPENET_SIZE, QPENET_SIZE)
        assert out["y_pre"].shape == out["y_bg_q"].shape == (2, 2, QPENET_H_FEAT, QPENET_H_FEAT)
        assert out["y_rev"].shape == (2, shot, 2, QPENET_H_FEAT, QPENET_H_FEAT)
        assert qpenet_step["out"]["y_bg_s"].shape == (2, 2, 2, QPENET_H_FEAT, QPENET_H_FEAT)  # 2 shots, training
        assert (out["m_main"].shape == out["m_aux"].shape == out["m_s_down"].shape
                == (2, shot, QPENET_H_FEAT, QPENET_H_FEAT))
        assert all(torch.isfinite(v).all() for v in out.values())
        assert set(qpenet_step["out"]) - set(out) == {"y_bg_s"}  # evaluation: all but what only the loss reads

    def test_qpenet_evaluation_computes_only_what_the_logits_read(self, qpenet_model):
        # Choices 9: Eq. (9)'s y_bg^s, read by the loss alone, is not computed in evaluation: GBC's Convs segments
        # the query only (B images), where training also segments the B*S supports; the logits are those of a
        # forward that computes it (training mode with every dropout at p = 0)
        img_q, img_s, m_s, _ = episode(2, 3, QPENET_SIZE)
        model = copy.deepcopy(qpenet_model)
        for module in model.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.p = 0.0
            if isinstance(module, qpenet.CrossAttention):
                module.dropout = 0.0
        batches = []
        model.gbc.convs.register_forward_pre_hook(lambda mod, args: batches.append(len(args[0])))
        with torch.no_grad():
            trained = model.train()(img_q, img_s, m_s)
            assert batches == [2, 6] and "y_bg_s" in trained
            batches.clear()
            evaluated = model.eval()(img_q, img_s, m_s)
        assert batches == [2] and "y_bg_s" not in evaluated
        torch.testing.assert_close(evaluated["logits"], trained["logits"])

    def test_qpenet_shot_order_does_not_matter(self, qpenet_model):
        img_q, img_s, m_s, _ = episode(2, 2, QPENET_SIZE)
        qpenet_model.eval()
        with torch.no_grad():
            a = qpenet_model(img_q, img_s, m_s)["logits"]
            b = qpenet_model(img_q, img_s.flip(1), m_s.flip(1))["logits"]
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

    def test_qpenet_empty_support_mask_gives_no_nan(self, qpenet_model):
        img_q, img_s, _, m_q = episode(2, 2, QPENET_SIZE)
        m_s = torch.zeros(2, 2, QPENET_SIZE, QPENET_SIZE, dtype=torch.long)
        qpenet_model.train()
        qpenet_model.zero_grad()
        out = qpenet_model(img_q, img_s, m_s)
        total, terms = qpenet_model.loss(out, m_q, m_s)
        assert all(torch.isfinite(v).all() for v in out.values())
        assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values())
        total.backward()
        grads = [p.grad for p in qpenet_model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), sum(g is None for g in grads)

    def test_qpenet_model_feeds_each_prototype_to_its_equation(self, qpenet_model, monkeypatch):
        # The wiring of Model.forward, end to end with scripted heads: Eq. (2) gets P_pre, Eq. (3) pools the
        # query under y_pre's foreground, Eq. (4) is driven by that P_psd (not P_pre), and FFA receives
        # P_bg from GBC, P_pre, and P_main / P_aux from y_rev, all worked out here by hand
        S, C = 2, qpenet_model.cfg.dim
        monkeypatch.setattr(qpenet_model, "features", qpenet_model.features)  # the stand-in features undone after
        img_q, img_s, m_s, _, f_q, f_s, m, fg_pre, rev = qpenet_scripted_episode(qpenet_model, S)
        scripted = Scripted(logits_of(fg_pre), logits_of(rev).flatten(0, 1))
        # swapped by hand, not with monkeypatch: its undo deletes a submodule (it is not in the instance __dict__)
        convs, qpenet_model.foreground.convs = qpenet_model.foreground.convs, scripted
        seen = {}
        hooks = [qpenet_model.ffa.register_forward_pre_hook(lambda mod, args: seen.update(ffa=args)),
                 qpenet_model.gbc.register_forward_hook(lambda mod, args, out: seen.update(gbc=out))]
        try:
            with torch.no_grad():
                out = qpenet_model.eval()(img_q, img_s, m_s)
        finally:
            qpenet_model.foreground.convs = convs
            for hook in hooks:
                hook.remove()

        p_pre, p_psd = qpenet_map_each(f_s, m), qpenet_map_each(f_q, fg_pre)
        p_main, p_aux = qpenet_map_each(f_s, m * rev), qpenet_map_each(f_s, m * (1 - rev))
        assert (p_psd - p_pre).abs().max() > 0.1 and (p_main - p_aux).abs().max() > 0.1  # the test can tell them apart

        assert len(scripted.inputs) == 2  # one Convs for Eq. (2) and Eq. (4)
        x_pre, x_rev = scripted.inputs
        torch.testing.assert_close(x_pre[:, :C], f_q)
        expect_broadcast(x_pre[:, C:], p_pre)  # Eq. (2)
        torch.testing.assert_close(x_rev[:, :C], f_s.flatten(0, 1))
        expect_broadcast(x_rev[:, C:], p_psd.repeat_interleave(S, 0))  # Eq. (4): P_psd of Eq. (3)
        torch.testing.assert_close(out["m_main"], m * rev)
        torch.testing.assert_close(out["m_aux"], m * (1 - rev))

        ffa_f_q, ffa_f_s, ffa_m, p_bg, ffa_p_pre, ffa_p_main, ffa_p_aux = seen["ffa"]
        torch.testing.assert_close(ffa_f_q, f_q)
        torch.testing.assert_close(ffa_f_s, f_s)
        assert torch.equal(ffa_m, m_s)  # Eq. (16) selects its keys from the label itself (the keys tests below)
        assert torch.equal(p_bg, seen["gbc"][0])  # Eq. (12): GBC's P_bg
        torch.testing.assert_close(ffa_p_pre, p_pre, **TOL)
        torch.testing.assert_close(ffa_p_main, p_main, **TOL)
        torch.testing.assert_close(ffa_p_aux, p_aux, **TOL)

    # ---------------- §III-C1 PPG (Eq. 1-3): MAP over all shots, the pseudo-prototype with a scripted Convs -------

    def test_qpenet_shot_map_pools_all_shots_jointly(self):
        f_s = torch.randn(2, 3, 4, 5, 6)
        m = (torch.rand(2, 3, 5, 6) > 0.5).float()
        m[0, 1] = 0  # an empty shot adds nothing
        expected = (f_s * m[:, :, None]).sum((1, 3, 4)) / (m.sum((1, 2, 3))[:, None] + common.MAP_EPS)
        torch.testing.assert_close(qpenet.shot_map(f_s, m), expected)

    def test_qpenet_ppg_pools_the_pseudo_prototype_from_the_predicted_query_foreground(self):
        # Eq. (1)-(3): Convs sees Concat(F_q, BC(P_pre)); P_psd is the mean of F_q over the pixels y_pre calls
        # foreground (channel 1), not over its background
        torch.manual_seed(0)
        C, h, w = 4, 3, 3
        fe = qpenet.ForegroundEvolution(C, feature_dropout=0.5, head_dropout=0.1)
        f_q, f_s = torch.randn(2, C, h, w), torch.randn(2, 2, C, h, w)
        m = torch.zeros(2, 2, h, w)
        m[0, 0, 0, :2] = 1.0
        m[0, 1, 2, 2] = 0.5  # a soft edge pixel of the downsampled mask, in the second shot
        m[1, 1, 1:, 1:] = 1.0  # image 1: foreground only in the second shot
        fg_pre = torch.zeros(2, h, w)
        fg_pre[0, 0, 0] = fg_pre[0, 2, 1] = 1  # image 0: two query pixels predicted foreground
        fg_pre[1, 1, 2] = 1  # image 1: one
        fe.convs = Scripted(logits_of(fg_pre))
        p_pre = qpenet.shot_map(f_s, m)  # Eq. (1), in Model.forward (the baseline's prototype too)
        y_pre, p_psd = fe.ppg(f_q, p_pre)

        torch.testing.assert_close(p_pre, qpenet_map_each(f_s, m), **TOL)
        (x,) = fe.convs.inputs
        torch.testing.assert_close(x[:, :C], f_q)  # F_q first
        expect_broadcast(x[:, C:], p_pre)  # then BC(P_pre)
        assert torch.equal(y_pre, logits_of(fg_pre))
        expected = torch.stack([(f_q[0, :, 0, 0] + f_q[0, :, 2, 1]) / (2 + MAP_EPS), f_q[1, :, 1, 2] / (1 + MAP_EPS)])
        torch.testing.assert_close(p_psd, expected, **TOL)

    # ---------------- §III-C2 DPE (Eq. 4-8): the reverse segmentation and the split of the support mask -----------

    def test_qpenet_dpe_splits_the_support_mask_by_the_reverse_segmentation(self):
        # Eq. (4)-(8): every shot of episode b is reverse-segmented with episode b's P_psd; M_main / M_aux are
        # M_s inside / outside the predicted foreground; P_main / P_aux pool all shots of an episode
        torch.manual_seed(0)
        B, S, C, h, w = 2, 2, 4, 3, 3
        fe = qpenet.ForegroundEvolution(C, feature_dropout=0.5, head_dropout=0.1)
        f_s = torch.randn(B, S, C, h, w)
        m = torch.rand(B, S, h, w) * (torch.rand(B, S, h, w) > 0.3)  # soft, with zeros
        m[:, :, 0, 0] = 1.0
        p_psd = torch.randn(B, C)
        rev = torch.zeros(B, S, h, w)
        rev[0, 0, 0] = 1  # first row of (0, 0)
        rev[0, 1, :, 1] = 1  # middle column of (0, 1)
        rev[1, 1, 1:, :2] = 1  # a corner of (1, 1); shot (1, 0) predicts no foreground
        fe.convs = Scripted(logits_of(rev).flatten(0, 1))
        y_rev, m_main, m_aux, p_main, p_aux = fe.dpe(f_s, m, p_psd)

        (x,) = fe.convs.inputs
        assert x.shape == (B * S, 2 * C, h, w)
        for b in range(B):
            for k in range(S):
                torch.testing.assert_close(x[b * S + k, :C], f_s[b, k])
                expect_broadcast(x[b * S + k, None, C:], p_psd[b, None])  # episode b's pseudo-prototype
        assert y_rev.shape == (B, S, 2, h, w)
        torch.testing.assert_close(m_main, m * rev)
        torch.testing.assert_close(m_aux, m * (1 - rev))
        torch.testing.assert_close(p_main, qpenet_map_each(f_s, m * rev), **TOL)
        torch.testing.assert_close(p_aux, qpenet_map_each(f_s, m * (1 - rev)), **TOL)

    def test_qpenet_main_and_aux_partition_the_support_mask(self, qpenet_step):
        out, m_s = qpenet_step["out"], qpenet_step["m_s"]
        m, main, aux = out["m_s_down"], out["m_main"], out["m_aux"]
        torch.testing.assert_close(main + aux, m)  # Eq. (5) + (6) = M_s
        assert (main * aux == 0).all()  # disjoint
        rev = (out["y_rev"].argmax(2) == 1).float()
        torch.testing.assert_close(main, m * rev)  # main = inside the mask and reverse-predicted foreground
        expected = F.interpolate((m_s == 1).float(), (QPENET_H_FEAT, QPENET_H_FEAT), mode="bilinear",
                                 align_corners=True)
        torch.testing.assert_close(m, expected)
        assert 0 < m.sum() and (m > 0).sum() < m.numel()

    # ---------------- §III-D GBC (Eq. 9-11) by hand ---------------------------------------------------------------

    def test_qpenet_gbc_cleaner_by_hand(self):
        torch.manual_seed(0)
        gbc = qpenet.GBC(8, feature_dropout=0.0, head_dropout=0.0).train()  # training (y_bg^s), nothing random
        f_q, f_s = torch.rand(2, 8, 4, 4), torch.rand(2, 3, 8, 4, 4)
        p_bg, y_bg_q, y_bg_s = gbc(f_q, f_s)
        assert y_bg_s.shape == (2, 3, 2, 4, 4)
        evaluated = gbc.eval()(f_q, f_s)
        assert evaluated[2] is None  # Eq. (9) only trains P_global: omitted in evaluation (§III-D)
        assert torch.equal(evaluated[0], p_bg) and torch.equal(evaluated[1], y_bg_q)
        bg = (y_bg_q[:, 1] > y_bg_q[:, 0]).float()  # channel 1 = background
        gap = (f_q * bg[:, None]).sum((2, 3)) / 16  # GAP over all h*w pixels, not MAP
        fc1, fc2 = gbc.cleaner[0], gbc.cleaner[2]
        gate = torch.sigmoid(fc2(torch.relu(fc1(gap))))
        torch.testing.assert_close(p_bg, gbc.p_global * gate)
        # Eq. (9) uses the same Convs as Eq. (10)
        torch.testing.assert_close(y_bg_s[:, 0], gbc.convs(torch.cat([f_s[:, 0], qpenet.broadcast(
            gbc.p_global.expand(2, -1), f_q)], 1)))

    # ---------------- §III-E FFA: Eq. (12)-(15) inputs, the cross attention and its keys (Eq. 16) -----------------

    def test_qpenet_ffa_filter_and_fusion_inputs_by_hand(self):
        # Eq. (12): Conv_1 sees Concat(F_q, BC(P_bg)); Eq. (13)-(15): Conv_1 sees Concat(F_q', BC(P_pre), A_main,
        # A_aux) with A_main = cos(P_main, F_q) and A_aux = cos(P_aux, F_q), in that order
        ffa = qpenet_small_ffa()
        B, S, C, h, w = 2, 1, 8, 3, 4
        f_q, f_s = torch.randn(B, C, h, w), torch.randn(B, S, C, h, w)
        m_s = (torch.rand(B, S, 8 * h, 8 * w) > 0.5).long()  # support labels
        p_bg, p_pre, p_main, p_aux = (torch.randn(B, C) for _ in range(4))
        seen = {}
        hooks = [ffa.filter.register_forward_pre_hook(lambda mod, args: seen.update(filter_in=args[0].clone())),
                 ffa.filter.register_forward_hook(lambda mod, args, out: seen.update(filter_out=out.clone())),
                 ffa.fuse.register_forward_pre_hook(lambda mod, args: seen.update(fuse_in=args[0].clone()))]
        try:
            with torch.no_grad():
                ffa(f_q, f_s, m_s, p_bg, p_pre, p_main, p_aux)
        finally:
            for hook in hooks:
                hook.remove()

        x = seen["filter_in"]
        assert x.shape == (B, 2 * C, h, w)
        torch.testing.assert_close(x[:, :C], f_q)
        expect_broadcast(x[:, C:], p_bg)
        x = seen["fuse_in"]
        assert x.shape == (B, 2 * C + 2, h, w)
        torch.testing.assert_close(x[:, :C], seen["filter_out"])  # F_q' of Eq. (12)
        expect_broadcast(x[:, C:2 * C], p_pre)
        for b in range(B):
            torch.testing.assert_close(x[b, 2 * C], cosine_by_hand(f_q[b], p_main[b]), **TOL)
            torch.testing.assert_close(x[b, 2 * C + 1], cosine_by_hand(f_q[b], p_aux[b]), **TOL)

    def test_qpenet_cross_attention_matches_formula(self):
        torch.manual_seed(0)
        B, N, L, C, heads = 2, 5, 7, 8, 2
        layer = qpenet.CrossAttention(C, heads, ffn_dim=16, dropout=0.1).eval()
        x, tokens = torch.randn(B, N, C), torch.randn(B, L, C)
        valid = torch.ones(B, L, dtype=torch.bool)
        valid[0, 4:] = False
        valid[1, :2] = False
        d = C // heads
        q = (x @ layer.to_q.weight.T).view(B, N, heads, d).transpose(1, 2)
        k = (tokens @ layer.to_k.weight.T).view(B, L, heads, d).transpose(1, 2)
        v = (tokens @ layer.to_v.weight.T).view(B, L, heads, d).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, heads, N, L)
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        direct = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C) @ layer.to_out.weight.T
        torch.testing.assert_close(layer.attend(x, tokens, valid), direct, atol=1e-5, rtol=1e-5)
        h = layer.norm_attn(x + direct)
        torch.testing.assert_close(layer(x, tokens, valid), layer.norm_ffn(h + layer.ffn(h)), atol=1e-5, rtol=1e-5)
        # the masked tokens do not matter
        changed = tokens.clone()
        changed[0, 4:] = 100.0
        torch.testing.assert_close(layer.attend(x, changed, valid), direct, atol=1e-5, rtol=1e-5)
        # all-zero tokens (a support without foreground) add exactly nothing
        zero = layer.attend(x, torch.zeros(B, L, C), torch.ones(B, L, dtype=torch.bool))
        assert zero.abs().max() == 0

    def test_qpenet_cross_attention_keys_are_the_labelled_support_foreground_pixels_by_hand(self):
        # Eq. (16), Choices 6: the keys/values are the support pixels labelled 1 at feature resolution (nearest, as
        # the official), of all shots together, unweighted (F_s * M_s with M_s that 0/1 mask). Other pixels are no
        # keys (zero keys would still take a share of the softmax), even where the bilinear M_s is fractional, and
        # a key counts fully where the bilinear M_s is 0.25 or 0. The reference attends over those pixels only.
        ffa = qpenet_small_ffa()
        f_q, f_s, m_s, *protos, m_bilinear = qpenet_keys_episode()
        B, S, C, h, w = f_s.shape
        keys = qpenet_nearest_keys(m_s, h, w)  # (B, S, h, w)
        assert keys[0, 0].tolist() == [[True, True, False], [True, True, False], [False] * 3]
        assert m_bilinear[0, 0, 1, 2] == 0.5 and m_bilinear[0, 1, 2, 2] == 1  # M_s > 0 at two pixels ...
        assert not keys[0, 0, 1, 2] and not keys[0, 1, 2, 2]  # ... that are no keys (nearest reads a 0 and a 255)
        assert m_bilinear[0, 0, 1, 1] == 0.25 and m_bilinear[1, 1, 0, 2] == 0 and keys[0, 0, 1, 1] and keys[1, 1, 0, 2]
        seen = {}
        hook = ffa.fuse.register_forward_hook(lambda mod, args, out: seen.update(x=out.clone()))
        try:
            with torch.no_grad():
                y = ffa(f_q, f_s, m_s, *protos)
        finally:
            hook.remove()

        with torch.no_grad():
            for b in range(B):
                tokens = f_s[b].permute(0, 2, 3, 1)[keys[b]]  # (L, C): the key pixels' features, unweighted
                assert len(tokens) == [6, 5, 0][b]
                x = seen["x"][b].flatten(1).T  # (h*w, C): F_q'' of Eq. (15)
                for layer in ffa.cross:
                    x = qpenet_cross_by_hand(layer, x, tokens)
                expected = ffa.convs(x.T.reshape(1, C, h, w))
                torch.testing.assert_close(y[b:b + 1], expected, **TOL)

    def test_qpenet_support_features_matter_only_at_the_keys(self):
        # Eq. (16) attends to F_s * M_s, M_s the label at feature resolution: support features off the keys cannot
        # change y_final, even where the bilinear M_s is 0.5 or 1 (episode 0: (0,1,2) and (0,2,2): the keys are not
        # the pixels where M_s > 0); features at the keys (bilinear M_s 1, 0.5, 0.25; episode 1: 0) do
        ffa = qpenet_small_ffa()
        f_q, f_s, m_s, *protos, m_bilinear = qpenet_keys_episode()
        keys = qpenet_nearest_keys(m_s, *f_s.shape[-2:])  # (B, S, h, w)
        with torch.no_grad():
            y = ffa(f_q, f_s, m_s, *protos)
            outside = f_s + 5.0 * torch.randn_like(f_s) * (~keys)[:, :, None]
            assert (m_bilinear * ~keys).max() == 1  # the changed pixels include some with M_s > 0
            torch.testing.assert_close(ffa(f_q, outside, m_s, *protos), y)
            for b, k, i, j in [(0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 1, 1), (1, 1, 0, 2)]:
                inside = f_s.clone()
                inside[b, k, :, i, j] += 5.0 * torch.randn(f_s.shape[2])
                changed = ffa(f_q, inside, m_s, *protos)
                assert (changed[b] - y[b]).abs().max() > 1e-3
                others = [e for e in range(len(y)) if e != b]
                torch.testing.assert_close(changed[others], y[others])  # the other episodes keep their own keys

    def test_qpenet_model_takes_the_cross_attention_keys_from_the_label(self, qpenet_model, monkeypatch):
        # Model.forward, with 4x4 stand-in features for 33 px labels: nearest reads label rows/columns 0, 8, 16, 24,
        # the bilinear M_s of Eq. (1) samples 0, 10.67, 21.33, 32. The support boxes (rows 11-21 and 13-23, columns
        # 5-29) make row 1 of shot 0 fractional in M_s (0.67) but no key, and column 3 keys where M_s is 0. Both
        # Cross layers get exactly those pixels' features, unweighted, as their valid tokens.
        torch.manual_seed(0)
        B, S, C, h = 2, 2, qpenet_model.cfg.dim, 4
        img_q, img_s, m_s, _ = episode(B, S, QPENET_SIZE, s_box=(11, 22, 5, 30))
        f = torch.randn(B + B * S, C, h, h)
        monkeypatch.setattr(qpenet_model, "features", lambda img: f)
        f_s = f[B:].view(B, S, C, h, h)
        seen = []
        hooks = [cross.register_forward_pre_hook(lambda mod, args: seen.append(args[1:]))
                 for cross in qpenet_model.ffa.cross]
        try:
            with torch.no_grad():
                out = qpenet_model.eval()(img_q, img_s, m_s)
        finally:
            for hook in hooks:
                hook.remove()

        keys = qpenet_nearest_keys(m_s, h, h)  # (B, S, h, w)
        row = [[False] * 4, [False] * 4, [False, True, True, True], [False] * 4]
        assert keys[:, 0].tolist() == keys[:, 1].tolist() == [row] * B
        m = out["m_s_down"]  # the bilinear M_s
        assert 0.6 < m[0, 0, 1, 1] < 0.7 and not keys[0, 0, 1, 1]  # M_s > 0 there, yet no key
        assert m[0, 0, 2, 3] == 0 and keys[0, 0, 2, 3]
        assert len(seen) == 2  # both layers, the same keys
        for tokens, valid in seen:
            assert torch.equal(valid, keys.flatten(1))  # (B, S*h*w), shot by shot
            expected = (f_s * keys[:, :, None]).permute(0, 1, 3, 4, 2).reshape(B, -1, C)  # zero off the keys
            torch.testing.assert_close(tokens, expected)

    # ---------------- §III-F loss (Eq. 17-19): the terms, gradients, L_bm by hand ---------------------------------

    def test_qpenet_loss_terms_and_gradients(self, qpenet_model, qpenet_step):
        out, total, terms = qpenet_step["out"], qpenet_step["total"], qpenet_step["terms"]
        assert set(terms) == {"pre", "rev", "final", "bm_s", "bm_q"}
        assert all(torch.isfinite(v) and v > 0 for v in terms.values())
        cfg = qpenet_model.cfg
        expected = (cfg.alpha * (terms["pre"] + terms["rev"] + terms["final"])
                    + cfg.beta * (terms["bm_s"] + terms["bm_q"]))
        torch.testing.assert_close(total, expected)
        torch.testing.assert_close(terms["final"], common.seg_loss(out["logits"], qpenet_step["m_q"]))
        torch.testing.assert_close(terms["rev"],
                                   common.seg_loss(out["y_rev"].flatten(0, 1), qpenet_step["m_s"].flatten(0, 1)))
        grads = qpenet_step["grads"]
        missing = [n for n, p in qpenet_model.named_parameters() if p.requires_grad and
                   (grads[n] is None or not torch.isfinite(grads[n]).all() or grads[n].abs().sum() == 0)]
        assert not missing, f"no gradient: {missing}"
        assert all(grads[n] is None for n, _ in qpenet_model.named_parameters() if n.startswith("backbone."))
        assert all(not p.requires_grad for p in qpenet_model.backbone.parameters())

    def test_qpenet_background_mining_loss_by_hand(self):
        # one 1x2 image: pixel 0 foreground, pixel 1 background; logits equal except pixel 0 (p_bg = sigmoid(1))
        y_bg = torch.zeros(1, 2, 1, 2)
        y_bg[0, qpenet.BACKGROUND, 0, 0] = 1.0
        m = torch.tensor([[[1, 0]]])
        p = torch.sigmoid(torch.tensor(1.0))
        not_bg = -torch.log(1 - p) / (1 + qpenet.BM_EPS)
        every = (-torch.log(p) - math.log(0.5)) / 2
        torch.testing.assert_close(qpenet.background_mining_loss(y_bg, m, 0.5), not_bg + 0.5 * every)
        # 255 counts nowhere; no foreground: only the every-pixel term
        m = torch.tensor([[[255, 0]]])
        torch.testing.assert_close(qpenet.background_mining_loss(y_bg, m, 0.5), 0.5 * torch.tensor(math.log(2)))

    def test_qpenet_background_mining_loss_foreground_term_is_per_image(self):
        # L_bm's first term is -log(1 - p_bg) averaged over each image's own foreground, then over the images, so a
        # 1-pixel object counts as much as a 3-pixel one; the second is -log p_bg over every labelled pixel of the
        # batch (255 left out). Constant logits per image: p_bg = sigmoid(a_n) everywhere in image n.
        a = [0.5, -1.0]
        y_bg = torch.zeros(2, 2, 1, 4)
        y_bg[0, qpenet.BACKGROUND] = a[0]
        y_bg[1, qpenet.BACKGROUND] = a[1]
        m = torch.tensor([[[1, 0, 0, IGNORE_INDEX]],  # 1 foreground pixel, 3 labelled
                          [[1, 1, 1, 0]]])  # 3 foreground pixels, 4 labelled
        not_bg = [math.log1p(math.exp(a_n)) for a_n in a]  # -log(1 - sigmoid(a)) = softplus(a)
        is_bg = [math.log1p(math.exp(-a_n)) for a_n in a]  # -log sigmoid(a)
        first = (not_bg[0] * 1 / (1 + qpenet.BM_EPS) + not_bg[1] * 3 / (3 + qpenet.BM_EPS)) / 2
        every = (3 * is_bg[0] + 4 * is_bg[1]) / 7
        loss = qpenet.background_mining_loss(y_bg, m, 0.5)
        torch.testing.assert_close(loss, torch.tensor(first + 0.5 * every))
        pooled = (not_bg[0] + 3 * not_bg[1]) / 4 + 0.5 * every  # one mean over the batch's foreground: not L_bm
        assert abs(loss.item() - pooled) > 0.1

    # ---------------- §IV-B, §IV-D: parameter counts and a short training -----------------------------------------

    def test_qpenet_parameter_counts(self, qpenet_model):
        learnable, total = train.count_parameters(qpenet_model)
        head = qpenet_convs_params(512, 256)  # Convs(512 -> 256 -> 2)
        assert sum(p.numel() for p in qpenet_model.foreground.parameters()) == head == 1_901_058  # paper: 34.6M - 32.7M
        assert learnable == 7_738_118
        # ResNet-50 up to layer3: layer4's 14,964,736 weights are not built, as QPENet never reads them
        assert total - learnable == sum(p.numel() for p in qpenet_model.backbone.parameters()) == 8_543_296
        layer4 = Backbone("resnet50", False).stages["layer4"]
        assert 23_508_032 - 8_543_296 == sum(p.numel() for p in layer4.parameters())

    def test_qpenet_short_synthetic_training_lowers_the_loss(self, tmp_path):
        train.main(["--model", "qpenet", "--dataset", "synthetic", "--no-pretrained", "--workers", "0",
                    "--img-size", "32", "--train-length", "8", "--batch-size", "4", "--epochs", "3",
                    "--lr", "0.01", "--test-episodes", "2", "--test-seeds", "1", "--log-every", "2",
                    "--out", str(tmp_path)])
        records = read_metrics(tmp_path)
        losses = [r["loss"] for r in records if r["event"] == "train"]
        assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
        assert losses[-1] < losses[0]
        assert any(r["event"] == "result" for r in records)

    # ---------------- §IV-D ablations: Table III (FGPE, BGPE, FFA or FEM), Table IV, Table V, the command line ----

    @pytest.mark.parametrize("row", QPENET_ABLATIONS)
    def test_qpenet_ablation_trains_and_evaluates_at_1_and_5_shots(self, row):
        # every row: finite logits and loss terms at 1 and 5 shots; the terms are Eq. (17)-(19)'s that the row keeps
        # (FGPE: y_pre, y_rev; the FEM: its auxiliary loss), summed with alpha and beta; and every learnable
        # parameter gets a gradient, so the row builds nothing it does not use
        kw = QPENET_ABLATIONS[row]
        model = qpenet_variant(**kw)
        expected = {"final", "bm_s", "bm_q"} | ({"pre", "rev"} if kw.get("fgpe", True) else set())
        expected |= {"fem_aux"} if kw.get("decoder") == "fem" else set()
        for shot in (1, 5):
            img_q, img_s, m_s, m_q = episode(2, shot, QPENET_SIZE)
            model.train().zero_grad()
            out = model(img_q, img_s, m_s)
            total, terms = model.loss(out, m_q, m_s)
            assert set(terms) == expected and all(torch.isfinite(v) and v > 0 for v in terms.values())
            l_fg = sum(v for k, v in terms.items() if not k.startswith("bm_"))
            torch.testing.assert_close(total, 1.0 * l_fg + 0.5 * (terms["bm_s"] + terms["bm_q"]))
            total.backward()
            missing = [n for n, p in model.named_parameters() if p.requires_grad and
                       (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
            assert not missing, f"{row}, {shot} shots: no gradient in {missing}"
            with torch.no_grad():
                logits = model.eval()(img_q, img_s, m_s)["logits"]
            assert logits.shape == (2, 2, QPENET_SIZE, QPENET_SIZE) and torch.isfinite(logits).all()

    @pytest.mark.parametrize("row", QPENET_ABLATIONS)
    def test_qpenet_ablation_removes_exactly_its_module_parameters(self, row):
        # the learnable parameters of a row against the full model's 7,738,118 differ by the module it removes
        # (or the inputs it narrows), counted by hand; the hand counts are those of the full model's modules
        with torch.device("meta"):  # shapes only
            full, model = qpenet_variant(), qpenet_variant(**QPENET_ABLATIONS[row])
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        assert count(full.foreground) == qpenet_convs_params(512, 256) == 1_901_058
        assert count(full.gbc.cleaner) == 2 * (256 * 256 + 256) == 131_584
        assert count(full.ffa) == qpenet_ffa_params() == 3_410_946
        if hasattr(model, "fem"):
            assert count(model.fem) == qpenet_fem_params() == 10_816_010 and not hasattr(model, "ffa")
        learnable = train.count_parameters(model)[0]
        assert learnable - train.count_parameters(full)[0] == qpenet_parameter_change(QPENET_ABLATIONS[row])
        assert (model.foreground is None) == (row in ("III-baseline", "no-FGPE"))
        assert (model.gbc.cleaner is None) == (row in ("III-baseline", "III-FGPE", "III-FGPE+FFA"))

    @pytest.mark.parametrize("row, foreground, background", [
        ("full", [2, 6], [2]), ("no-FGPE", None, [2]), ("III-FGPE+FFA", [2, 6], []), ("IV-pre", [], [2]),
        ("IV-aux", [2, 6], [2]), ("V-SGM", [6], [2]), ("III-FGPE+BGPE", [2, 6], [2])])
    def test_qpenet_ablation_evaluation_runs_only_what_the_logits_read(self, row, foreground, background):
        # Choices 9: training runs PPG and DPE (their Convs on the B queries, then the B*S supports) and GBC's Convs
        # (Eq. 10 on the queries, Eq. 9 on the supports) for the loss; evaluation only what the decoder reads:
        # without BGPE no background map, with P_pre alone no PPG or DPE, SGM no PPG, the FEM decoder no auxiliary
        # logits (no empty "fem_aux" either). The evaluation logits are those of training mode with every dropout at
        # p = 0
        model = qpenet_variant(**QPENET_ABLATIONS.get(row, {}))
        for module in model.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.p = 0.0
            if isinstance(module, qpenet.CrossAttention):
                module.dropout = 0.0
        runs = {"foreground": [], "background": []}
        if model.foreground is not None:
            model.foreground.convs.register_forward_pre_hook(lambda m, a: runs["foreground"].append(len(a[0])))
        model.gbc.convs.register_forward_pre_hook(lambda m, a: runs["background"].append(len(a[0])))
        img_q, img_s, m_s, _ = episode(2, 3, QPENET_SIZE)
        with torch.no_grad():
            trained = model.train()(img_q, img_s, m_s)
            assert runs == {"foreground": [2, 6] if foreground is not None else [], "background": [2, 6]}
            runs = {"foreground": [], "background": []}
            evaluated = model.eval()(img_q, img_s, m_s)
        assert runs == {"foreground": foreground or [], "background": background}
        ran = foreground or []
        assert ("y_pre" in evaluated) == (2 in ran) and ("y_rev" in evaluated) == (6 in ran)
        assert ("y_bg_q" in evaluated) == (background == [2]) and "y_bg_s" not in evaluated
        assert ("fem_aux" in trained) == (model.cfg.decoder == "fem") and "fem_aux" not in evaluated
        torch.testing.assert_close(evaluated["logits"], trained["logits"])

    def test_qpenet_without_fgpe_the_decoder_gets_p_pre_for_every_foreground_prototype(self):
        # Table III without FGPE (Choices 12): no PPG or DPE; FFA's P_pre, P_main and P_aux are all MAP(F_s, M_s),
        # worked out here; no y_pre, y_rev or their loss terms
        model = qpenet_variant(fgpe=False)
        img_q, img_s, m_s, m_q, f_q, f_s, m, _, _ = qpenet_scripted_episode(model)
        seen = {}
        model.ffa.register_forward_pre_hook(lambda mod, args: seen.update(ffa=args))
        out = model.train()(img_q, img_s, m_s)
        p_pre = qpenet_map_each(f_s, m)
        _, _, _, _, *prototypes = seen["ffa"]
        for p in prototypes:
            torch.testing.assert_close(p, p_pre, **TOL)
        assert model.foreground is None and not {"y_pre", "y_rev", "m_main", "m_aux"} & set(out)
        assert set(model.loss(out, m_q, m_s)[1]) == {"final", "bm_s", "bm_q"}

    def test_qpenet_without_bgpe_the_decoder_gets_the_global_background_prototype(self):
        # Table III without BGPE (Choices 13): no cleaner; Eq. (12) concatenates BC(P_global) itself, and P_global
        # still learns from Eq. (9)-(10) through L_bm alone (as in NERTNet), besides Eq. (12)
        model = qpenet_variant(bgpe=False)
        img_q, img_s, m_s, m_q, f_q, *_ = qpenet_scripted_episode(model)
        seen = []
        model.ffa.filter.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
        out = model.train()(img_q, img_s, m_s)
        x, = seen
        torch.testing.assert_close(x[:, :256], f_q)
        expect_broadcast(x[:, 256:], model.gbc.p_global.detach().expand(2, -1))
        _, terms = model.loss(out, m_q, m_s)
        (terms["bm_s"] + terms["bm_q"]).backward()
        assert model.gbc.p_global.grad.abs().sum() > 0

    def test_qpenet_fem_decoder_takes_the_prototypes_broadcast_and_adds_its_auxiliary_loss(self):
        # Table III's baseline decoder (Choices 14): FEM(F_q, P_pre, [BC(P_main), BC(P_aux), BC(P_bg)]), the
        # prototypes worked out from the model's own masks; L_fg gains the mean of its per-scale losses
        model = qpenet_variant(decoder="fem")
        img_q, img_s, m_s, m_q, f_q, f_s, m, _, _ = qpenet_scripted_episode(model)
        seen = {}
        model.fem.register_forward_pre_hook(lambda mod, args: seen.update(fem=args))
        model.gbc.register_forward_hook(lambda mod, args, out: seen.update(gbc=out))
        out = model.train()(img_q, img_s, m_s)
        fem_f_q, proto, extra = seen["fem"]
        assert torch.equal(fem_f_q, f_q) and extra.shape == (2, 3 * 256, QPENET_H_FEAT, QPENET_H_FEAT)
        torch.testing.assert_close(proto, qpenet_map_each(f_s, m), **TOL)
        expect_broadcast(extra[:, :256], qpenet_map_each(f_s, out["m_main"]))
        expect_broadcast(extra[:, 256:512], qpenet_map_each(f_s, out["m_aux"]))
        expect_broadcast(extra[:, 512:], seen["gbc"][0])
        assert len(out["fem_aux"]) == 4  # one per scale
        total, terms = model.loss(out, m_q, m_s)
        torch.testing.assert_close(terms["fem_aux"], sum(common.seg_loss(a, m_q) for a in out["fem_aux"]) / 4)
        torch.testing.assert_close(total, terms["pre"] + terms["rev"] + terms["final"] + terms["fem_aux"]
                                   + 0.5 * (terms["bm_s"] + terms["bm_q"]))

    @pytest.mark.parametrize("prototypes", ["pre", "main", "aux", "main+aux"])
    def test_qpenet_table_iv_prototypes_are_the_inputs_of_eq_15(self, prototypes):
        # Table IV (Choices 15): Eq. (15) concatenates F_q' with BC(P_pre), A_main = cos(P_main, F_q), A_aux =
        # cos(P_aux, F_q) of the row's prototypes only, in that order; Conv_1 is as wide as that
        names = tuple(prototypes.split("+"))
        ffa = qpenet_small_ffa(prototypes=names)
        f_q, f_s, m_s, p_bg, p_pre, p_main, p_aux, _ = qpenet_keys_episode()
        seen = {}
        ffa.filter.register_forward_hook(lambda mod, args, out: seen.update(filter_out=out.clone()))
        ffa.fuse.register_forward_pre_hook(lambda mod, args: seen.update(fuse_in=args[0].clone()))
        with torch.no_grad():
            ffa(f_q, f_s, m_s, p_bg, p_pre, p_main, p_aux)
        expected = [seen["filter_out"]] + ([p_pre[:, :, None, None].expand(-1, -1, 3, 3)] if "pre" in names else [])
        for name, p in (("main", p_main), ("aux", p_aux)):
            if name in names:
                expected.append(torch.stack([cosine_by_hand(f_q[b], p[b]) for b in range(len(p))])[:, None])
        expected = torch.cat(expected, 1)
        torch.testing.assert_close(seen["fuse_in"], expected, **TOL)
        assert ffa.fuse[0].in_channels == expected.shape[1] == {"pre": 16, "main": 9, "aux": 9, "main+aux": 10}[
            prototypes]

    @pytest.mark.parametrize("prototypes", ["pre+main+aux", "main+aux"])
    def test_qpenet_without_activation_maps_eq_15_takes_the_broadcast_prototypes(self, prototypes, monkeypatch):
        # Table V "w/o activation maps" (Choices 16): Eq. (15) concatenates F_q', BC(P_pre), BC(P_main), BC(P_aux)
        # (of the row's prototypes); no cosine of Eq. (13)-(14) is computed
        names = tuple(prototypes.split("+"))
        ffa = qpenet_small_ffa(prototypes=names, activation_maps=False)
        f_q, f_s, m_s, p_bg, p_pre, p_main, p_aux, _ = qpenet_keys_episode()
        seen = {}
        ffa.filter.register_forward_hook(lambda mod, args, out: seen.update(filter_out=out.clone()))
        ffa.fuse.register_forward_pre_hook(lambda mod, args: seen.update(fuse_in=args[0].clone()))

        def no_activation_map(*args, **kw):
            raise AssertionError("an activation map was computed")
        monkeypatch.setattr(F, "cosine_similarity", no_activation_map)
        with torch.no_grad():
            ffa(f_q, f_s, m_s, p_bg, p_pre, p_main, p_aux)
        chosen = [p for name, p in (("pre", p_pre), ("main", p_main), ("aux", p_aux)) if name in names]
        expected = torch.cat([seen["filter_out"]] + [p[:, :, None, None].expand(-1, -1, 3, 3) for p in chosen], 1)
        torch.testing.assert_close(seen["fuse_in"], expected)
        assert ffa.fuse[0].in_channels == 8 * (1 + len(names))

    def test_qpenet_sgm_reverse_segments_the_support_with_its_own_prototype(self):
        # Table V "w SGM" (Choices 16): Eq. (4)'s Convs gets BC(P_pre) = BC(MAP(F_s, M_s)) in place of BC(P_psd);
        # Eq. (5)-(8) split M_s by that reverse segmentation as in DPE. Training still runs PPG (y_pre's loss);
        # evaluation does not (nothing reads P_psd)
        model = qpenet_variant(dpe="sgm")
        img_q, img_s, m_s, _, f_q, f_s, m, fg_pre, rev = qpenet_scripted_episode(model)
        p_pre, p_psd = qpenet_map_each(f_s, m), qpenet_map_each(f_q, fg_pre)
        assert (p_psd - p_pre).abs().max() > 0.1  # the test can tell them apart
        seen = {}
        model.ffa.register_forward_pre_hook(lambda mod, args: seen.update(ffa=args))
        for training, outputs in ((True, [logits_of(fg_pre), logits_of(rev).flatten(0, 1)]),
                                  (False, [logits_of(rev).flatten(0, 1)])):
            model.foreground.convs = scripted = Scripted(*outputs)
            with torch.no_grad():
                out = model.train(training)(img_q, img_s, m_s)
            assert len(scripted.inputs) == len(outputs) and ("y_pre" in out) == training
            x_rev = scripted.inputs[-1]
            torch.testing.assert_close(x_rev[:, :256], f_s.flatten(0, 1))
            expect_broadcast(x_rev[:, 256:], p_pre.repeat_interleave(2, 0))
            torch.testing.assert_close(out["m_main"], m * rev)
            torch.testing.assert_close(out["m_aux"], m * (1 - rev))
            torch.testing.assert_close(seen["ffa"][5], qpenet_map_each(f_s, m * rev), **TOL)
            torch.testing.assert_close(seen["ffa"][6], qpenet_map_each(f_s, m * (1 - rev)), **TOL)

    def test_qpenet_ablations_from_the_command_line(self, capsys):
        # each row is a --set of train.py, typed by its Config field; a value that is none of a field's choices, a
        # combination that means nothing and FFA's attention heads that do not split dim are refused with a line that
        # says why (not a crash in the first forward)
        def config(*fields):
            args, module = train.parse_args(["--model", "qpenet", "--set", *fields])
            return train.make_config(module, args)

        cfg = config("fgpe=false", "bgpe=false", "decoder=fem")
        assert (cfg.fgpe, cfg.bgpe, cfg.decoder, cfg.foreground_prototypes) == (False, False, "fem", "pre+main+aux")
        cfg = config("foreground_prototypes=main+aux", "activation_maps=false", "dpe=sgm")
        assert (cfg.fgpe, cfg.foreground_prototypes, cfg.activation_maps, cfg.dpe) == (True, "main+aux", False, "sgm")
        for field, message in (("decoder=pfenet", "decoder is one of ffa, fem"),
                               ("foreground_prototypes=pre+aux", "one of pre, main, aux, main+aux, pre+main+aux"),
                               ("dpe=scl", "dpe is one of dpe, sgm"), ("bgpe=maybe", "bgpe is true or false")):
            with pytest.raises(SystemExit):
                config(field)
            assert message in capsys.readouterr().err
        with pytest.raises(ValueError, match="FEM decoder takes every prototype"):
            qpenet_variant(decoder="fem", foreground_prototypes="main+aux")
        with pytest.raises(ValueError, match="FEM decoder takes every prototype"):
            qpenet_variant(decoder="fem", activation_maps=False)
        with pytest.raises(ValueError, match="dpe=sgm replaces DPE"):
            qpenet_variant(fgpe=False, dpe="sgm")
        for fields in (dict(dim=100), dict(heads=0), dict(heads=-2)):
            with pytest.raises(ValueError, match=r"heads=-?\d+ must be at least 1 and divide dim=\d+"):
                qpenet_variant(**fields)
        for fields in (dict(heads=4), dict(ffn_dim=512), dict(cross_layers=1), dict(attn_dropout=0.0)):
            name = next(iter(fields))  # the FEM decoder has no attention: a value there would change nothing
            with pytest.raises(ValueError, match=f"^{name}: no part of decoder=fem \\(it would change nothing\\)$"):
                qpenet_variant(decoder="fem", **fields)
        with pytest.raises(ValueError, match=r"^activation_maps: no part of foreground_prototypes=pre \("):
            qpenet_variant(foreground_prototypes="pre", activation_maps=False)
        for name, value in (("dim", 0), ("ffn_dim", -1), ("cross_layers", 0)):
            with pytest.raises(ValueError, match=f"^{name} must be >= 1, got {value}$"):
                qpenet_variant(**{name: value})
        with torch.device("meta"):  # shapes only: the FEM decoder has no attention heads
            assert not hasattr(qpenet_variant(decoder="fem"), "ffa")



# ==========================================================================================================
# All five models: a training step on PFENet's deep-stem ResNet, none that waits for the device, compiled ones
# ==========================================================================================================

class TestAllModels:
    @pytest.mark.parametrize("name", ["ocnet", "qpenet", "crcnet", "symnet", "qgnet"])
    def test_every_model_trains_one_step_on_the_deep_stem(self, name, tmp_path):
        torch.manual_seed(0)
        model = deep_stem_model(name, tmp_path).train()
        backbone, = [m for m in model.modules() if isinstance(m, Backbone) and m.name == "resnet50_deep"]
        assert backbone.stages["layer0"][6].out_channels == 128  # PFENet's stem
        stats = backbone.stages["layer0"][4].running_mean.clone()
        img_q, img_s, m_s, m_q = episode(1, 1, 33)
        out = model(img_q, img_s, m_s, **train.query_mask(model, {"m_q": m_q}))
        total, _ = model.loss(out, m_q, m_s)
        total.backward()
        assert out["logits"].shape == (1, 2, 33, 33) and torch.isfinite(total)
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
        stem = backbone.stages["layer0"][3].weight.grad  # the deep stem's second conv
        if backbone.trainable:  # CRCNet trains its encoder end to end (§5.1)
            assert stem is not None and stem.abs().sum() > 0
        else:
            assert all(p.grad is None for p in backbone.parameters())
        assert not backbone.training and torch.equal(backbone.stages["layer0"][4].running_mean, stats)  # BN in eval

    @pytest.mark.parametrize("name", ["ocnet", "qpenet", "crcnet", "symnet", "qgnet"])
    def test_training_step_never_waits_for_the_device(self, name, request):
        """A training step (forward, loss, backward, SGD step) that reads a value back from the GPU stalls the
        queue of kernels until that value exists; none of the five models may do that (train.py reads the loss
        once per progress line)."""
        model, size = {"ocnet": ("ocnet_models", OCNET_SIZE), "qpenet": ("qpenet_model", QPENET_SIZE),
                       "crcnet": ("crcnet_model", CRCNET_SIZE), "symnet": ("symnet_model", SYMNET_SIZE),
                       "qgnet": ("qgnet_model", 65)}[name]
        model = request.getfixturevalue(model)
        model = model["resnet50"] if name == "ocnet" else model
        img_q, img_s, m_s, m_q = episode(2, 2, size, (8, 24, 8, 24), (6, 22, 10, 26))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-9, momentum=0.9)
        state = copy.deepcopy(model.state_dict())
        model.train()

        def step():
            out = model(img_q, img_s, m_s, torch.tensor([1, 2]), **train.query_mask(model, {"m_q": m_q}))
            loss, _ = model.loss(out, m_q, m_s)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        seen = train.count_step(step)["syncs"]  # the detector --bench reports with
        model.load_state_dict(state)  # the module-scoped model stays as the other tests expect it
        assert seen == [], f"{name} synchronises with the host: {sorted(set(seen))}"

    @pytest.mark.parametrize("name", ["ocnet", "qgnet", "crcnet", "symnet", "qpenet"])
    def test_every_model_compiles_to_the_eager_loss_and_gradients(self, name, request):
        """torch.compile (train.py --compile) of each model, with AOTAutograd's tracing of forward and backward
        (backend aot_eager: inductor's front end, no code generation), gives the eager training step's loss and
        gradients: the frames dynamo cannot trace (OCNet's Grad-CAM takes torch.autograd.grad inside forward) run
        eagerly between graphs. Train mode, every dropout at p = 0 so that both runs draw nothing."""
        fixture, size = {"ocnet": ("ocnet_resnet", OCNET_SIZE), "qgnet": ("qgnet_model", 65),
                         "crcnet": ("crcnet_model", CRCNET_SIZE), "symnet": ("symnet_model", SYMNET_SIZE),
                         "qpenet": ("qpenet_model", QPENET_SIZE)}[name]
        model = copy.deepcopy(request.getfixturevalue(fixture)).train()  # the module-scoped fixture stays as it is
        for module in model.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.p = 0.0
            if isinstance(module, qpenet.CrossAttention):
                module.dropout = 0.0  # its attention's dropout_p
        img_q, img_s, m_s, m_q = episode(1, 1, size, (8, 24, 8, 24), (6, 22, 10, 26))

        def step(net):
            model.zero_grad(set_to_none=True)
            out = net(img_q, img_s, m_s, torch.tensor([1]), **train.query_mask(model, {"m_q": m_q}))
            loss, _ = model.loss(out, m_q, m_s)
            loss.backward()
            return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

        loss, grads = step(model)
        try:
            compiled_loss, compiled_grads = step(torch.compile(model, backend="aot_eager"))
        finally:
            torch._dynamo.reset()  # no compiled frame outlives the test
        torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=0)
        assert compiled_grads.keys() == grads.keys() and len(grads) > 0
        for n, g in grads.items():
            torch.testing.assert_close(compiled_grads[n], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=n)
