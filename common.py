"""The blocks the few-shot segmentation models share (frozen backbone, masked average pooling, PFENet's prior, FEM),
the loss and the metrics; then what the harness and the models share: Setting, Schedule, safe files.

Source: Z. Tian, H. Zhao, M. Shu, Z. Yang, R. Li, J. Jia, "Prior Guided Feature Enrichment Network for Few-Shot
Segmentation", TPAMI 2020, arXiv:2008.01449, github.com/dvlab-research/PFENet @ a5056754. "PFENet.py:N" below
means model/PFENet.py line N of that repository; test.py and util/util.py likewise.

Tensor vocabulary (every file of the repository uses it):
    B batch of episodes, S shots, C channels, H x W image size, h x w feature size
    img_q (B,3,H,W)    query image            img_s (B,S,3,H,W)  support images
    m_q   (B,H,W)      query mask             m_s   (B,S,H,W)    support masks: int64, 0/1/255 (background/fg/ignore)
    f_q   (B,C,h,w)    query features         f_s   (B,S,C,h,w)  support features
    proto (B,C)        prototype              prior (B,1,h,w)    prior mask in [0, 1]
    logits (B,2,H,W)   background / foreground scores
"""
import dataclasses
import json
import os
import pickle
import signal
import tempfile
import threading
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import Bottleneck, conv1x1, conv3x3

IGNORE_INDEX = 255  # PFENet ignore_label: VOC object borders and the padding of test images
MAP_EPS = 5e-4  # PFENet Weighted_GAP, PFENet.py:16
COSINE_EPS = 1e-7  # PFENet prior, PFENet.py:222 (cosine denominator and min-max normalisation)
IOU_EPS = 1e-10  # PFENet test.py:233,243
FEM_BINS = (1.0, 0.5, 0.25, 0.125)  # PFENet COCO config ppm_scales; rounded at h = 60: PASCAL's 60/30/15/8 (FEM)
FEM_DROPOUT = 0.1  # PFENet.py:104,147 (cls and inner_cls heads)
RUNS_DIR = "runs"  # parent of every default run folder (train.py's and the stages'), in the working directory


# ---------- The frozen backbone ----------
class DeepStemResNet(torchvision.models.ResNet):
    """PSPNet's ResNet of PFENet's resnet50_v2.pth / resnet101_v2.pth (model/resnet.py:100-128, keys as the files'):
    torchvision's with three 3x3 convs (3->64 stride 2, 64->64, 64->128, BatchNorm, ReLU) in place of the 7x7."""

    def __init__(self, layers, **kwargs):
        super().__init__(Bottleneck, list(layers), **kwargs)
        self.conv1 = conv3x3(3, 64, stride=2)  # replaces torchvision's 7x7; bn1 (64) stays
        self.conv2, self.bn2 = conv3x3(64, 64), nn.BatchNorm2d(64)
        self.conv3, self.bn3 = conv3x3(64, 128), nn.BatchNorm2d(128)
        self.layer1[0] = Bottleneck(128, 64, downsample=nn.Sequential(conv1x1(128, 256), nn.BatchNorm2d(256)))
        for m in [self.conv1, self.conv2, self.conv3, *self.layer1[0].modules()]:
            if isinstance(m, nn.Conv2d):  # the initialisation torchvision (and PFENet) give every conv
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))  # (N, 64, H/2, W/2)
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.maxpool(self.relu(self.bn3(self.conv3(x))))  # (N, 128, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# name -> (builder, torchvision's ImageNet weights: its classic IMAGENET1K_V1 as HSNet; none for PFENet's *_deep)
BACKBONES = {
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (torchvision.models.resnet101, torchvision.models.ResNet101_Weights.IMAGENET1K_V1),
    "vgg16_bn": (torchvision.models.vgg16_bn, torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1),
    "resnet50_deep": (partial(DeepStemResNet, (3, 4, 6, 3)), None),  # resnet50_v2.pth
    "resnet101_deep": (partial(DeepStemResNet, (3, 4, 23, 3)), None),  # resnet101_v2.pth
}
PFENET_BACKBONES_URL = "https://drive.google.com/drive/folders/1Hrz1wOxOZm4nIIS7UMJeL79AQrdvpj6v"  # README.md:58
RESNET_DILATION = {"layer3": 2, "layer4": 4}  # PFENet.py:84-93: strides 1, output stride 8 (473 -> 60)
VGG_SPLIT = ((0, 7), (7, 14), (14, 24), (24, 34), (34, 43))  # PFENet.py:21-25, indices into vgg16_bn.features
LAYERS = ("layer1", "layer2", "layer3", "layer4")  # a Backbone's stages after its stem, layer0
BLOCK_STAGES = ("layer2", "layer3", "layer4")  # stages whose block outputs blocks=True returns (as HSNet)
CALIBRATION_IMAGES = 64  # --no-pretrained: Backbone.calibrate's BatchNorm statistics from this many training images


class WeightsUnavailableError(RuntimeError):
    """Weights a model needs (ImageNet's, a weight file, a stage's file) could not load; it says how to get them."""


class WeightsFileError(WeightsUnavailableError):
    """A weight file (pretrained=PATH) that cannot be read or does not fit the backbone; one line naming the keys."""


def is_weight_file(pretrained):
    """True when Backbone's `pretrained` names a weight file (str or os.PathLike) rather than being True / False."""
    return isinstance(pretrained, (str, os.PathLike))


def _load_torchvision(name, pretrained):
    """`name`'s net with torchvision's ImageNet weights (pretrained True; none for the *_deep names) or random."""
    builder, weights = BACKBONES[name]
    kwargs = {"replace_stride_with_dilation": [False, True, True]} if name.startswith("resnet") else {}
    if not pretrained:
        return builder(**kwargs)
    if weights is None:
        raise WeightsUnavailableError(
            f"torchvision does not ship ImageNet weights for {name}, the deep-stem ResNet (PSPNet's) that PFENet, "
            f"BAM, Sym-Net, QPENet and QGNet use. PFENet's README links them, as the ImageNet pretrained backbones "
            f"for its initmodel folder ({name.replace('_deep', '_v2.pth')}):\n    {PFENET_BACKBONES_URL}\n"
            f"Pass the file with --backbone-weights PATH, or --no-pretrained to run with random backbone weights.")
    try:
        return builder(weights=weights, **kwargs)
    except Exception as err:  # URLError, OSError, a corrupt download's RuntimeError: all mean "no weights here"
        raise WeightsUnavailableError(
            f"could not load the ImageNet weights of {name} ({weights}): {err!r}\n"
            f"Fetch them once on a machine with internet access:\n"
            f"    python -c \"import torchvision; torchvision.models.{name}(weights='{weights.name}')\"\n"
            f"torchvision caches them in {torch.hub.get_dir()}/checkpoints ($TORCH_HOME/hub, default "
            f"~/.cache/torch/hub).\nOr pass --no-pretrained to run with random backbone weights.") from err


def imagenet_classifier(name, pretrained):
    """The ImageNet classifier of torchvision's weights of `name` (pretrained True), or a random one (False)."""
    if is_weight_file(pretrained):
        raise ValueError(f"a weight file's classifier is common.Backbone.head, not torchvision's ({pretrained})")
    net = _load_torchvision(name, pretrained)
    return net.fc if name.startswith("resnet") else net.classifier


def _load_weight_file(net, name, path):
    """The weight file `path` (a state dict, maybe under "state_dict"/"model", maybe "module.") into `net` -> its
    ImageNet classifier with the file's weights, or None. A tensor missing (num_batches_tracked excepted: older
    files lack it), unexpected or mis-shaped is a WeightsFileError naming the keys: nothing is left at random."""
    if not Path(path).is_file():
        raise WeightsFileError(f"the weight file {path} does not exist")
    state = read_torch_file(path, f"the weight file {path} as tensors", WeightsFileError,
                            "; for a checkpoint holding other objects, save its state dict alone with "
                            "torch.save(state_dict, PATH)")
    while isinstance(state, dict) and any(isinstance(state.get(k), dict) for k in ("state_dict", "model")):
        state = next(state[k] for k in ("state_dict", "model") if isinstance(state.get(k), dict))
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                           for k, v in state.items()):
        found = sorted(map(str, state))[:5] if isinstance(state, dict) else type(state).__name__
        raise WeightsFileError(f"the weight file {path} holds no state dict (a dict of tensors, possibly under "
                               f"'state_dict' or 'model'); found {found}")
    if all(k.startswith("module.") for k in state):  # saved from nn.DataParallel / DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    head = "fc." if name.startswith("resnet") else "classifier."  # the ImageNet classifier: ResNet's, VGG's (3 FCs)
    expected = net.state_dict()
    wanted = {k: v for k, v in expected.items() if not k.startswith(head)}
    missing = [k for k in wanted if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in wanted and not k.startswith(head)]
    misshaped = [f"{k} {tuple(state[k].shape)} instead of {tuple(v.shape)}" for k, v in wanted.items()
                 if k in state and state[k].shape != v.shape]
    if missing or unexpected or misshaped:
        problems = []  # '2 missing keys (a, b)': the count and the first 3
        for keys, kind in ((missing, "missing"), (unexpected, "unexpected"), (misshaped, "mis-shaped")):
            if keys:
                more = ", ..." if len(keys) > 3 else ""
                problems.append(f"{len(keys)} {kind} key{'s' if len(keys) > 1 else ''} ({', '.join(keys[:3])}{more})")
        hint = ""
        if name.startswith("resnet") and "layer1.0.conv1.weight" in state:  # which ResNet the file holds
            guess = "resnet101" if "layer3.22.conv1.weight" in state else "resnet50"
            guess += "_deep" if "conv3.weight" in state else ""  # PFENet's stem has a conv3, torchvision's none
            hint = f"; it looks like {guess}'s: --backbone {guess}" if guess != name else ""
        raise WeightsFileError(f"the weight file {path} does not fit {name}: {'; '.join(problems)}{hint}")
    has_head = ({k: v.shape for k, v in state.items() if k.startswith(head)}
                == {k: v.shape for k, v in expected.items() if k.startswith(head)})
    net.load_state_dict({k: v for k, v in state.items() if has_head or not k.startswith(head)}, strict=False)
    return getattr(net, head.rstrip(".")) if has_head else None


class Backbone(nn.Module):
    """Frozen ImageNet feature extractor: forward(x (N,3,H,W)) -> {"layer1".."layer4": (N,C,h,w)}, up to `last`;
    ResNets dilated to output stride 8 (RESNET_DILATION), VGG-16-BN in PFENet's stages (VGG_SPLIT, ceil-mode pools,
    model/vgg.py:69; layer2 at layer3's size, PFENet.py:192). pretrained: True (torchvision's ImageNet weights), False
    (random) or a weight file's path. trainable: the weights learn (CRCNet §5.1), BatchNorm still in eval (a batch of
    4 episodes gives noisy statistics). head: the weight file's ImageNet classifier or None, frozen and outside the
    module tree, for OCNet's Grad-CAM (one classifier and the features share their weights)."""

    def __init__(self, name="resnet50", pretrained=True, trainable=False, last="layer4"):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
        if last not in LAYERS:
            raise ValueError(f"last must be one of {LAYERS}, got {last!r}")
        self.name = name
        net = _load_torchvision(name, False if is_weight_file(pretrained) else pretrained)
        head = _load_weight_file(net, name, pretrained) if is_weight_file(pretrained) else None
        if name.startswith("resnet"):
            # torchvision gives a dilated stage's first block the previous dilation; PFENet dilates every block alike
            for stage_name, d in RESNET_DILATION.items():
                for block in getattr(net, stage_name):
                    block.conv2.dilation, block.conv2.padding = (d, d), (d, d)
            stem = [net.conv1, net.bn1, net.relu]  # (N, 64, H/2, W/2)
            if isinstance(net, DeepStemResNet):
                stem += [net.conv2, net.bn2, net.relu, net.conv3, net.bn3, net.relu]  # (N, 128, H/2, W/2)
            stages = [nn.Sequential(*stem, net.maxpool), net.layer1, net.layer2, net.layer3, net.layer4]
            self.channels = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
        else:
            for layer in net.features:
                if isinstance(layer, nn.MaxPool2d):
                    layer.ceil_mode = True
            stages = [net.features[start:end] for start, end in VGG_SPLIT]  # last pool and classifier dropped
            self.channels = {"layer1": 128, "layer2": 256, "layer3": 512, "layer4": 512}
        self.layers = LAYERS[:LAYERS.index(last) + 1]  # the stages run; a stage after `last` is not even built
        self.stages = nn.ModuleDict(zip(["layer0", *self.layers], stages))
        self.pretrained, self.trainable = pretrained, trainable
        self.calibrated = False  # random weights: set by calibrate() or by a model that loads estimated statistics
        self.requires_grad_(trainable)
        self.train(False)
        object.__setattr__(self, "head", None if head is None else head.requires_grad_(False).eval())  # unregistered

    @property
    def needs_statistics(self):
        """Random weights whose BatchNorm statistics were neither estimated (calibrate) nor loaded (calibrated)."""
        return not self.pretrained and not self.calibrated

    @torch.no_grad()
    def calibrate(self, images, batch_size=16):
        """BatchNorm statistics := their mean over batches of `images` (N,3,H,W), for random weights: with the initial
        ones (mean 0, var 1) activations grow with depth, unlike the ImageNet features models expect."""
        norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
        nn.Module.train(self, True)  # bypasses the eval-only train() below
        for start in range(0, len(images), batch_size):
            self(images[start:start + batch_size])
        nn.Module.train(self, False)
        for m in norms:
            m.momentum = 0.1  # torch's default, as constructed
        self.calibrated = True

    def train(self, mode=True):
        # Always eval, as HSNet and BAM (fix_bn); PFENet's model.train() (train.py:247) lets the frozen BN drift
        return super().train(False)

    def forward(self, x, blocks=False, mask=None):
        """blocks=True (ResNets): also "blocks", every bottleneck's output of BLOCK_STAGES. mask (N,H,W) labels:
        layer4 runs on layer3 x (mask == 1), PFENet's support features for the prior (PFENet.py:209-210)."""
        if blocks and not self.name.startswith("resnet"):
            raise ValueError(f"blocks=True needs a ResNet backbone; {self.name} has no bottleneck blocks")
        if mask is not None and "layer4" not in self.layers:
            raise ValueError("mask masks layer4's input, and this backbone stops at " + self.layers[-1])
        feats, block_feats = {}, []
        # no_grad, not inference_mode: an inference tensor cannot be saved for backward nor take Grad-CAM's gradient
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            x = self.stages["layer0"](x)
            for name in self.layers:
                if name == "layer4" and mask is not None:
                    x = x * resize((mask == 1).to(x.dtype)[:, None], x.shape[-2:])  # (N, C3, h, w)
                for block in self.stages[name]:
                    x = block(x)
                    if blocks and name in BLOCK_STAGES:
                        block_feats.append(x)
                feats[name] = x  # (N, channels[name], h, w)
            if not self.name.startswith("resnet") and "layer2" in feats:  # to layer3's size: its pool's ceil(h/2)
                feats["layer2"] = resize(feats["layer2"], [-(-d // 2) for d in feats["layer2"].shape[-2:]])
        if blocks:
            feats["blocks"] = block_feats
        return feats

    def episode(self, img_q, img_s, blocks=False, m_s=None):
        """img_q (B,3,H,W), img_s (B,S,3,H,W) as one batch (BatchNorm frozen: as two calls) -> (feats_q, feats_s),
        views of (B,C,h,w) and (B*S,C,h,w); with m_s (B,S,H,W), forward's mask for the supports only."""
        B = img_q.shape[0]
        mask = None if m_s is None else torch.cat([torch.ones_like(m_s[:, 0]), m_s.flatten(0, 1)])  # query: all ones
        feats = self(torch.cat([img_q, img_s.flatten(0, 1)]), blocks=blocks, mask=mask)  # (B + B*S, C, h, w)
        rows = (slice(None, B), slice(B, None))  # the query's, the supports'
        return tuple({name: [f[r] for f in x] if name == "blocks" else x[r] for name, x in feats.items()} for r in rows)


# ---------- Masks, prototypes and priors ----------
def foreground_at(mask, size, mode="bilinear"):
    """Label maps (..., H, W) -> float (..., h, w): the foreground (== 1, PFENet.py:202) resized as PFENet.py:209."""
    fg = resize((mask == 1).float().reshape(-1, 1, *mask.shape[-2:]), size, mode)  # (N, 1, h, w)
    return fg.reshape(*mask.shape[:-2], *fg.shape[-2:])


def masked_average_pooling(f, m):
    """Prototype = sum(f * m) / (sum(m) + eps) over the pixels (PFENet Weighted_GAP, PFENet.py:13-18): f (B,C,h,w),
    m (B,1,H,W) or (B,H,W) float foreground, resized (PFENet.py:209) to h,w -> (B,C); an empty mask gives zeros."""
    if m.dim() == 3:
        m = m.unsqueeze(1)  # (B, 1, H, W)
    if m.shape[-2:] != f.shape[-2:]:
        m = resize(m, f.shape[-2:])  # (B, 1, h, w)
    return (f * m).sum((2, 3)) / (m.sum((2, 3)) + MAP_EPS)  # (B, C)


def cosine_prior(f_q, f_s, m_s):
    """PFENet's training-free prior (PFENet.py:221-248) -> (B,1,h,w): prior[i] = max_j cos(f_q[i], f_s[j] * m[j]) over
    the support pixels j, then (prior - min) / (max - min + eps) per image, averaged over shots. f_q (B,C,h,w) layer4,
    f_s (B,[S,]C,h',w'), m_s (B,[S,]H,W) labels. In float32 as PFENet, even under autocast: the max and the min-max
    would amplify bf16's rounding. One shot at a time: all at once would hold S (B, h'w', hw) matrices (1.4 GB each
    at 641 px, batch 8) to save a few launches of kernels that run longer than their launch takes."""
    with torch.autocast(f_q.device.type, enabled=False):
        f_q, f_s = f_q.float(), f_s.float()
        if f_s.dim() == 4:
            f_s, m_s = f_s.unsqueeze(1), m_s.unsqueeze(1)  # (B, 1, C, h', w'), (B, 1, H, W)
        B, C, h, w = f_q.shape
        q = f_q.reshape(B, C, h * w)  # (B, C, hw)
        q_norm = q.norm(dim=1, keepdim=True)  # (B, 1, hw)
        m = resize((m_s == 1).float(), f_s.shape[-2:])  # (B, S, h', w'), PFENet.py:209,225
        best = []
        for shot in range(f_s.shape[1]):
            s = (f_s[:, shot] * m[:, shot, None]).flatten(2).transpose(1, 2)  # (B, h'w', C)
            s_norm = s.norm(dim=2, keepdim=True)  # (B, h'w', 1)
            cos = torch.bmm(s, q) / (s_norm * q_norm + COSINE_EPS)  # (B, h'w', hw)
            best.append(cos.max(dim=1).values)  # (B, hw): best-matching support pixel
        p = torch.stack(best, 1)  # (B, S, hw)
        p_min, p_max = p.min(dim=2, keepdim=True).values, p.max(dim=2, keepdim=True).values  # per image and shot
        return ((p - p_min) / (p_max - p_min + COSINE_EPS)).mean(1).reshape(B, 1, h, w)  # (B, 1, h, w)


# ---------- Blocks that two or more models share ----------
def resize(x, size, mode="bilinear"):
    """x (N,C,h,w) resized: bilinear with align_corners=True as PFENet throughout, or mode="nearest" (labels)."""
    return F.interpolate(x, size=size, mode=mode, align_corners=True if mode == "bilinear" else None)


def conv_relu(c_in, c_out, k, stride=1, dilation=1, bias=False):
    """nn.Sequential(k x k conv keeping the size at stride 1, ReLU): PFENet's head layer (no BatchNorm, no bias)."""
    conv = nn.Conv2d(c_in, c_out, k, stride, padding=dilation * (k // 2), dilation=dilation, bias=bias)
    return nn.Sequential(conv, nn.ReLU(inplace=True))


class MidLevelReduction(nn.Sequential):
    """PFENet's down_query / down_supp (PFENet.py:95-117, 194-195): cat(layer3, layer2), 1x1 conv, ReLU, Dropout2d."""

    def __init__(self, in_dim, dim, dropout):
        super().__init__(nn.Conv2d(in_dim, dim, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(dropout))

    dropout = property(lambda self: self[2])  # the Dropout2d module

    def reduce(self, feats):
        return self[1](self[0](torch.cat([feats["layer3"], feats["layer2"]], 1)))  # (N, dim, h, w)

    def forward(self, feats):
        return self.dropout(self.reduce(feats))


class FEM(nn.Module):
    """PFENet's Feature Enrichment Module (PFENet.py:119-174, 256-286), every width in_dim. Per bin, finest first:
    [f_q pooled, prototype, extra (the prior)] -> init_merge -> alpha_conv on [it, the previous scale] (residual)
    -> beta_conv (residual) -> inner_cls (aux=True); the scales at h,w -> res1 -> res2 (residual) -> cls. A bin > 1
    is a size, one <= 1 a fraction of h, rounded where PFENet floors (PFENet.py:261): one list fits PASCAL (473 px)
    and COCO (641 px); at other sizes a bin may be one larger than PFENet's.
    forward(f_q (B,in_dim,h,w), proto (B,in_dim), extra (B,extra_dim,h,w) or None) -> (logits, [aux per bin])."""

    def __init__(self, in_dim=256, extra_dim=1, bins=FEM_BINS, classes=2):
        super().__init__()
        self.bins = tuple(bins)

        def classifier():  # PFENet's cls and inner_cls (PFENet.py:101-106, 144-149)
            return nn.Sequential(*conv_relu(in_dim, in_dim, 3), nn.Dropout2d(FEM_DROPOUT),
                                 nn.Conv2d(in_dim, classes, 1))
        self.init_merge = nn.ModuleList(conv_relu(2 * in_dim + extra_dim, in_dim, 1) for _ in self.bins)
        self.alpha_conv = nn.ModuleList(conv_relu(2 * in_dim, in_dim, 1) for _ in self.bins[1:])
        self.beta_conv = nn.ModuleList(
            nn.Sequential(*conv_relu(in_dim, in_dim, 3), *conv_relu(in_dim, in_dim, 3)) for _ in self.bins)
        self.inner_cls = nn.ModuleList(classifier() for _ in self.bins)
        self.res1 = conv_relu(len(self.bins) * in_dim, in_dim, 1)
        self.res2 = nn.Sequential(*conv_relu(in_dim, in_dim, 3), *conv_relu(in_dim, in_dim, 3))
        self.cls = classifier()

    def forward(self, f_q, proto, extra=None, aux=True):
        h, w = f_q.shape[-2:]
        scales, logits_aux = [], []
        for i, b in enumerate(self.bins):
            size = (max(1, round(h * b)), max(1, round(w * b))) if b <= 1 else (int(b), int(b))
            maps = [] if extra is None else [resize(extra, size)]
            x = torch.cat([F.adaptive_avg_pool2d(f_q, size), proto[:, :, None, None].expand(-1, -1, *size), *maps], 1)
            x = self.init_merge[i](x)  # (B, 2*in_dim + extra_dim, bh, bw) -> (B, in_dim, bh, bw)
            if i > 0:  # inter-scale merging with the previous (finer) scale, kept at h,w
                x = self.alpha_conv[i - 1](torch.cat([x, resize(scales[-1], size)], 1)) + x
            x = self.beta_conv[i](x) + x
            if aux:
                logits_aux.append(self.inner_cls[i](x))  # (B, classes, bh, bw)
            scales.append(resize(x, (h, w)))
        x = self.res1(torch.cat(scales, 1))  # (B, len(bins)*in_dim, h, w) -> (B, in_dim, h, w)
        x = self.res2(x) + x
        return self.cls(x), logits_aux  # (B, classes, h, w)


# ---------- The loss and the metrics ----------
def seg_loss(logits, m_q):
    """Cross-entropy of logits (B,2,h,w) upsampled to m_q (B,H,W), 255 ignored (PFENet.py:290-300): the mean over
    the labelled pixels, 0 when none (F.cross_entropy's mean would be NaN and poison the gradients)."""
    if logits.shape[-2:] != m_q.shape[-2:]:
        logits = resize(logits, m_q.shape[-2:])  # (B, 2, H, W)
    total = F.cross_entropy(logits, m_q, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (m_q != IGNORE_INDEX).sum().clamp(min=1)


def intersection_and_union(pred, target, ignore_index=IGNORE_INDEX):
    """pred, target (B,H,W) or (H,W) -> background and foreground (inter, union) (B,2), as util/util.py:67-79."""
    if pred.dim() == 2:
        pred, target = pred[None], target[None]  # (1, H, W)
    c = torch.arange(2, device=pred.device)[:, None, None, None]  # background, foreground
    p, t = (pred == c) & (target != ignore_index), target == c  # (2, B, H, W)
    return (p & t).flatten(2).sum(2).T.double(), (p | t).flatten(2).sum(2).T.double()  # (B, 2), (B, 2)


class IoUMeter:
    """Class mIoU and FB-IoU over episodes (PFENet test.py:210-253). Class mIoU: per class, the sum of foreground I
    over the sum of U, averaged over the fold's classes, one without an episode counting 0 (PFENet test.py:240-247,
    HSNet). FB-IoU: the mean of background and foreground IoU over all episodes. update() never syncs the host."""

    def __init__(self, num_classes, device="cpu"):
        self.device = torch.device(device)
        zeros = partial(torch.zeros, dtype=torch.float64, device=self.device)
        self.class_inter, self.class_union, self.class_count = (zeros(num_classes + 1) for _ in range(3))  # by id
        self.inter, self.union = zeros(2), zeros(2)  # [background, foreground] over all episodes
        self.prob_sum, self.pixels = zeros(2), zeros(2)  # p(foreground) summed over true background / fg pixels

    def update(self, pred, target, class_ids, prob=None):
        """pred, target (B,H,W) or (H,W); class_ids (B,); prob: p(foreground) (B,H,W), for mean_probability()."""
        if prob is not None:
            for c in (0, 1):  # 255 pixels are neither
                is_c = (target == c).to(self.device)
                self.prob_sum[c] += (prob.to(self.device, torch.float64) * is_c).sum()
                self.pixels[c] += is_c.sum()
        inter, union = (t.to(self.device) for t in intersection_and_union(pred, target))  # (B, 2)
        ids = torch.as_tensor(class_ids, device=self.device).reshape(-1)  # (B,)
        self.class_inter.index_add_(0, ids, inter[:, 1])
        self.class_union.index_add_(0, ids, union[:, 1])
        self.class_count.index_add_(0, ids, torch.ones_like(inter[:, 1]))
        self.inter += inter.sum(0)
        self.union += union.sum(0)

    def seen(self):
        return self.class_count.nonzero().flatten().tolist()  # the class ids that have had an episode

    def class_iou(self, classes=None):
        """{class_id: IoU} for `classes` (one without an episode: 0), or for the classes seen when None."""
        iou = (self.class_inter / (self.class_union + IOU_EPS)).tolist()
        return {c: iou[c] for c in (self.seen() if classes is None else classes)}

    def miou(self, classes=None):
        """Mean of class_iou(classes): pass the fold's classes for the protocol's mIoU. NaN when empty."""
        ious = list(self.class_iou(classes).values())
        return sum(ious) / len(ious) if ious else float("nan")

    def fbiou(self):
        return (self.inter / (self.union + IOU_EPS)).mean().item()

    def mean_probability(self):
        """[background, foreground]: the mean p(foreground) over the true background pixels, and foreground ones.
        A diagnostic: a model that ranks object pixels far above the rest, but under 0.5, scores 0 mIoU all the same."""
        return (self.prob_sum / self.pixels).tolist()

    def all_reduce(self):
        """Sum the state over the ranks of torch.distributed (when initialised; with NCCL, keep it on the GPU)."""
        if dist.is_available() and dist.is_initialized():
            for t in (self.class_inter, self.class_union, self.class_count, self.inter, self.union, self.prob_sum,
                      self.pixels):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)


class RecallMeter:
    """Recall of region maps V (B,1,h,w), resized as the logits, against the query mask (QGNet §5, Eq. 16, Table 7):
    |{V > t} & mask| / |mask| per threshold t, pixels summed over the episodes (255 is neither)."""
    THRESHOLDS = tuple(k / 10 for k in range(1, 10))

    def __init__(self, device="cpu"):
        self.device, self.hits = torch.device(device), {}  # hits: {name: (T,) mask pixels above each threshold}
        self.mask = torch.zeros((), dtype=torch.float64, device=device)  # mask pixels

    def update(self, maps, m_q):
        """maps {name: (B,1,h,w) in [0, 1]}, m_q (B,H,W) labels."""
        fg = m_q == 1  # (B, H, W)
        self.mask += fg.sum()
        t = torch.tensor(self.THRESHOLDS, device=fg.device)[:, None, None, None]  # (T, 1, 1, 1)
        for name, v in maps.items():
            above = resize(v.float(), fg.shape[-2:])[:, 0] > t  # (T, B, H, W)
            hits = (above & fg).flatten(1).sum(1).to(self.device, torch.float64)  # (T,)
            self.hits[name] = self.hits.get(name, 0) + hits

    def all_reduce(self):
        """Sum over the ranks of torch.distributed (when initialised); returns self."""
        if dist.is_available() and dist.is_initialized():
            for t in (self.mask, *self.hits.values()):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return self

    def recall(self):
        return {name: (hits / self.mask.clamp(min=1)).tolist() for name, hits in self.hits.items()}  # per threshold


# ---------- A run's setting, for a model and its stages ----------
@dataclasses.dataclass(frozen=True)
class Setting:
    """The run's context for a model (Model(cfg, setting)) and its stages, apart from its Config so that a harness
    flag can be renamed without silently changing a model; train.py fills every field (setting_of)."""
    dataset: str = "pascal"  # pascal, coco, fss1000, synthetic, folder
    fold: int = 0
    coco_split: str = "interleaved"
    data_root: str = None
    test_classes: tuple = None  # a folder dataset's novel ids in place of the fold
    shot: int = 1
    img_size: int = None  # train crop and test canvas: the run's recipe (a model's DEFAULTS, else train.py's)
    backbone: str = "resnet50"
    pretrained: object = True  # True: the backbone's ImageNet weights; False: random; a path: a weight file
    from_checkpoint: bool = False  # every weight comes from a checkpoint: no side file (stage output) is read
    num_classes: int = None  # the dataset's classes, ids 1..num_classes (base and novel)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How an extra stage (a model's STAGES[name](setting, schedule, options)) trains: train.py's flags and loop."""
    epochs: int
    batch_size: int
    lr: float
    train_length: int = None  # synthetic: episodes (or images) per epoch
    workers: int = 0  # DataLoader workers
    seed: int = 0
    log_every: int = 20
    bf16: bool = False  # bf16 autocast on CUDA (--bf16)
    resume: bool = False  # continue the stage's own checkpoint (--resume)
    out: Path = None  # the run folder (--out, or train.py's default); a stage's files may have paths of their own
    fit: object = None  # train.fit, the training loop of every run: fit(loss_of, optimizer, batches, lr_at, ...)
    given: frozenset = frozenset()  # the flags the command line gave: a stage refuses one it does not read


# ---------- Files read without running code, written whole or not at all ----------
def read_torch_file(path, what, error=WeightsUnavailableError, hint=""):
    """torch.load(path) with weights_only (no code from the file runs), else `error` in one line: a file holding
    other objects is refused (never saying how around that); any other is not a whole torch file, `hint` added."""
    try:
        with warnings.catch_warnings():  # torch's warning about a pickle protocol: the refusal below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a crafted, truncated or foreign file raises many kinds
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        found = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else "")
        if isinstance(err, pickle.UnpicklingError) and "GLOBAL" in found:  # a class or function to call
            raise error(f"cannot read {what}: it holds objects other than tensors and plain values "
                        f"({found.rstrip('.')}), and loading them could run code: refused") from err
        detail = found[:found.find(". ")] if ". " in found else found[:120]
        raise error(f"cannot read {what}: not a whole file of torch.save ({type(err).__name__}: {detail}){hint}") \
            from err


class NonFiniteWeightsError(ArithmeticError):
    """A checkpoint was about to be written from weights that are not all finite: it is not written."""


class LogError(ValueError):
    """A record in the middle of a log is damaged (a torn last line is dropped instead): the message names it."""


class SaveError(OSError):
    """A checkpoint or a log record could not be written (a full disk); what was written before is intact."""


def check_finite(module):
    """NonFiniteWeightsError unless every float parameter and buffer is finite (a host sync: not every step)."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    if tensors and not torch.stack([torch.isfinite(t).all() for t in tensors]).all():
        raise NonFiniteWeightsError("the weights are no longer finite")


@contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM while a file is written, then act on the first that came (Python: main thread only)."""
    held = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    caught = []
    previous = {signum: signal.signal(signum, lambda number, frame: caught.append(number)) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught and caught[0] == signal.SIGINT and previous[signal.SIGINT] == signal.SIG_DFL:
            raise KeyboardInterrupt  # Ctrl-C as Python's own handler takes it, not the process killed
        if caught:  # the first one, to the handler restored: it runs before raise_signal returns
            signal.raise_signal(caught[0])


def plain(value):
    """value as the plain types that weights_only reads (paths become strings), else a TypeError naming it."""
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, (str, int, float, bool, type(None), torch.Tensor)):
        return value
    raise TypeError(f"{value!r} ({type(value).__name__}) is not a plain value for a checkpoint")


def _replace_file(path, write):
    """write(f) into a temporary of its own beside path (two writers never share one), synced, renamed over path,
    signals deferred: a crash, a signal or a full disk never leaves a half-written file at path (SaveError)."""
    path = Path(path)
    with signals_deferred():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as err:
            raise SaveError(f"could not write {path} ({err.strerror or err})") from err
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(err, (OSError, RuntimeError)):  # torch reports a failed write as a RuntimeError
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
                kept = f"{path} is left as it was" if path.exists() else f"nothing was written at {path}"
                raise SaveError(f"could not write {path} ({reason}; is the disk full?): {kept}") from err
            raise


def save_atomic(state, path):
    """torch.save(plain(state)) to path, whole or not at all (_replace_file); it loads with weights_only=True."""
    _replace_file(path, partial(torch.save, plain(state)))


def append_jsonl(path, record):
    """Append one JSON line to a log, signals deferred; a failed write (a full disk) is undone: SaveError."""
    line = (json.dumps(plain(record)) + "\n").encode()
    with signals_deferred():
        try:
            with open(path, "ab") as f:
                start = f.tell()
                try:
                    f.write(line)
                    f.flush()
                except OSError:
                    f.truncate(start)
                    raise
        except OSError as err:
            raise SaveError(f"could not append to {path} ({err.strerror or err}; is the disk full?): the records "
                            "before it are kept") from err


def cut_log(path, epoch, note=print):
    """--resume: the log without the epochs after `epoch` (written again), the resume marked, so it reads as one run."""
    if not Path(path).exists():
        return
    kept = [r for r in read_jsonl(path, note) if r.get("event") in ("start", "resume") or r.get("epoch", 0) <= epoch]
    kept.append({"event": "resume", "epoch": epoch})
    _replace_file(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))


def read_jsonl(path, note=print):
    """A JSON-lines log's records; a torn last line (a crash) is dropped with a note, any other bad one a LogError."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise LogError(f"{path} line {i + 1} is not a JSON record ({line[:80]!r}): repair or delete that "
                               "line (the other records and the checkpoints are intact)") from None
            note(f"note: dropped the last line of {path}: a record that a crash cut short")
    return records
