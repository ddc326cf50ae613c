"""Shared building blocks of the few-shot segmentation models, and the evaluation metrics.

Contents, bottom-up:
    IGNORE_INDEX            label of pixels that count nowhere (loss and metrics)
    Backbone                frozen ImageNet ResNet-50/101 (dilated, output stride 8) or VGG-16-BN
    masked_average_pooling  support prototype: mean of the features under a mask (PFENet Weighted_GAP)
    cosine_prior            PFENet's training-free prior mask from high-level features
    FEM                     PFENet's Feature Enrichment Module (multi-scale decoder with auxiliary heads)
    seg_loss                cross-entropy on logits upsampled to the label size, 255 ignored
    intersection_and_union  per-episode background/foreground intersection and union
    IoUMeter                class mIoU and FB-IoU accumulated over episodes

Source: Z. Tian, H. Zhao, M. Shu, Z. Yang, R. Li, J. Jia, "Prior Guided Feature Enrichment Network
for Few-Shot Segmentation", TPAMI 2020, arXiv:2008.01449, github.com/dvlab-research/PFENet @ a5056754.
"PFENet.py:N" below means model/PFENet.py line N of that repository; test.py and util/util.py likewise.

Tensor vocabulary (every file of the repository uses it):
    B batch of episodes, S shots, C channels, H x W image size, h x w feature size
    img_q (B,3,H,W)    query image            img_s (B,S,3,H,W)  support images
    m_q   (B,H,W)      query mask, int64 in {0: background, 1: foreground, 255: ignore}
    m_s   (B,S,H,W)    support masks, same values
    f_q   (B,C,h,w)    query features         f_s   (B,S,C,h,w)  support features
    proto (B,C)        prototype              prior (B,1,h,w)    prior mask in [0, 1]
    logits (B,2,H,W)   background / foreground scores
"""
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

IGNORE_INDEX = 255  # PFENet ignore_label: VOC object borders and the padding of test images
MAP_EPS = 5e-4  # PFENet Weighted_GAP, PFENet.py:16
COSINE_EPS = 1e-7  # PFENet prior, PFENet.py:222 (cosine denominator and min-max normalisation)
IOU_EPS = 1e-10  # PFENet test.py:233,243
FEM_BINS = (1.0, 0.5, 0.25, 0.125)  # PFENet COCO config ppm_scales; at h = 60 the PASCAL bins 60/30/15/8
FEM_DROPOUT = 0.1  # PFENet.py:104,147 (cls and inner_cls heads)

# name -> (torchvision builder, ImageNet weights); IMAGENET1K_V1 are the classic ones (HSNet's pretrained=True)
BACKBONES = {
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
    "resnet101": (torchvision.models.resnet101, torchvision.models.ResNet101_Weights.IMAGENET1K_V1),
    "vgg16_bn": (torchvision.models.vgg16_bn, torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1),
}
RESNET_DILATION = {"layer3": 2, "layer4": 4}  # PFENet.py:84-93: strides 1, output stride 8 (473 -> 60)
VGG_SPLIT = ((0, 7), (7, 14), (14, 24), (24, 34), (34, 43))  # PFENet.py:21-25, indices into vgg16_bn.features
BLOCK_STAGES = ("layer2", "layer3", "layer4")  # stages whose block outputs blocks=True returns (as HSNet)


def _resize(x, size):
    """Bilinear resize with align_corners=True, PFENet's choice throughout (e.g. PFENet.py:267, 273, 279)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class WeightsUnavailableError(RuntimeError):
    """The ImageNet weights could not be downloaded or loaded; the message says how to fetch them once."""


def _load_torchvision(name, pretrained):
    """torchvision's `name` with ImageNet weights (or random ones); a clear error when the weights can't load."""
    builder, weights = BACKBONES[name]
    kwargs = {"replace_stride_with_dilation": [False, True, True]} if name.startswith("resnet") else {}
    if not pretrained:
        return builder(weights=None, **kwargs)
    try:
        return builder(weights=weights, **kwargs)
    except Exception as err:  # URLError, OSError, a corrupt download's RuntimeError: all mean "no weights here"
        raise WeightsUnavailableError(
            f"could not load the ImageNet weights of {name} ({weights}): {err!r}\n"
            f"Fetch them once on a machine with internet access:\n"
            f"    python -c \"import torchvision; torchvision.models.{name}(weights='{weights.name}')\"\n"
            f"torchvision caches them in {torch.hub.get_dir()}/checkpoints "
            f"($TORCH_HOME/hub, default ~/.cache/torch/hub).\n"
            f"Or pass --no-pretrained to run with random backbone weights."
        ) from err


class Backbone(nn.Module):
    """Frozen ImageNet feature extractor returning layer1..layer4 (and optionally every ResNet block).

    ResNet-50/101: torchvision's, with PFENet's dilation (PFENet.py:84-93): strides 1 and dilation 2 in every
    block of layer3, 4 in layer4, so layer2..layer4 share the output stride 8 (473 -> 60x60, 641 -> 81x81).
    Note: torchvision's stem is the standard 7x7 conv, not PFENet's deep stem of three 3x3 convs
    ("resnet50_v2", resnet.py:108-119), so ImageNet weights come from torchvision rather than PFENet's Drive.
    VGG-16-BN: torchvision's features split into five stages as PFENet (PFENet.py:20-46), with PFENet's
    ceil-mode max pooling (model/vgg.py:69) so 473 -> layer2 60x60, layer3/layer4 30x30; layer2 is resized
    bilinearly to layer3's size (PFENet.py:192) so layer2..layer4 always share one size.
    forward(x (N,3,H,W), blocks=False) -> {"layer1".."layer4": (N,C,h,w)} plus, with blocks=True (ResNet
    only), "blocks": the output of every bottleneck of layer2..layer4 in order (13 for ResNet-50, 30 for 101).
    """

    def __init__(self, name="resnet50", pretrained=True):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
        self.name = name
        net = _load_torchvision(name, pretrained)
        if name.startswith("resnet"):
            # torchvision's flag gives the first block of a dilated stage the previous dilation (1, then 2);
            # PFENet dilates every block's 3x3 conv alike. Weights are unaffected.
            for stage_name, d in RESNET_DILATION.items():
                for block in getattr(net, stage_name):
                    block.conv2.dilation, block.conv2.padding = (d, d), (d, d)
            stages = [nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
                      net.layer1, net.layer2, net.layer3, net.layer4]  # fc and avgpool dropped
            self.channels = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
        else:
            for layer in net.features:
                if isinstance(layer, nn.MaxPool2d):
                    layer.ceil_mode = True
            stages = [net.features[start:end] for start, end in VGG_SPLIT]  # last pool and classifier dropped
            self.channels = {"layer1": 128, "layer2": 256, "layer3": 512, "layer4": 512}
        self.stages = nn.ModuleDict(zip(["layer0", "layer1", "layer2", "layer3", "layer4"], stages))
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode=True):
        # Always eval, whatever the parent model asks. PFENet calls model.train() (train.py:247), which puts the
        # frozen backbone's BN in train mode: it normalises with the statistics of a few episode images and its
        # running statistics drift away from ImageNet's. HSNet (hsnet.py) and BAM (fix_bn) keep it in eval.
        return super().train(False)

    def forward(self, x, blocks=False):
        if blocks and not self.name.startswith("resnet"):
            raise ValueError(f"blocks=True needs a ResNet backbone; {self.name} has no bottleneck blocks")
        feats, block_feats = {}, []
        with torch.no_grad():
            x = self.stages["layer0"](x)
            for name in ("layer1", "layer2", "layer3", "layer4"):
                if blocks and name in BLOCK_STAGES:
                    for block in self.stages[name]:
                        x = block(x)
                        block_feats.append(x)
                else:
                    x = self.stages[name](x)
                feats[name] = x  # (N, channels[name], h, w)
            if not self.name.startswith("resnet"):
                feats["layer2"] = _resize(feats["layer2"], feats["layer3"].shape[-2:])
        if blocks:
            feats["blocks"] = block_feats
        return feats


def masked_average_pooling(f, m):
    """Prototype = sum(f * m) / (sum(m) + eps) over the pixels (PFENet Weighted_GAP, PFENet.py:13-18).

    f (B,C,h,w); m (B,1,H,W) or (B,H,W) float foreground indicator, e.g. (m_s == 1).float(), resized
    bilinearly (align_corners=True, PFENet.py:209) to h,w when sizes differ. Returns (B,C); an empty mask
    gives exact zeros.
    """
    if m.dim() == 3:
        m = m.unsqueeze(1)  # (B, 1, H, W)
    if m.shape[-2:] != f.shape[-2:]:
        m = _resize(m, f.shape[-2:])  # (B, 1, h, w)
    return (f * m).sum((2, 3)) / (m.sum((2, 3)) + MAP_EPS)  # (B, C)


def cosine_prior(f_q, f_s, m_s):
    """PFENet's training-free prior mask (TPAMI 2020; PFENet.py:221-248), from high-level (layer4) features.

    For every query pixel i: prior[i] = max_j cos(f_q[i], f_s[j] * m[j]) over the support pixels j, then
    per image (prior - min) / (max - min + eps); averaged over shots (PFENet.py:247).
    f_q (B,C,h,w) high-level query features; f_s (B,C,h',w') or (B,S,C,h',w'); m_s (B,H,W) or (B,S,H,W)
    labels, foreground = 1 (255 counts as background, PFENet.py:202). Returns prior (B,1,h,w) in [0, 1].
    Computed in float32 even under bf16 autocast, as PFENet does: a max over cosines followed by min-max
    normalisation would otherwise amplify bf16's rounding (8 mantissa bits).
    """
    with torch.autocast(f_q.device.type, enabled=False):
        return _cosine_prior_fp32(f_q.float(), f_s.float(), m_s)


def _cosine_prior_fp32(f_q, f_s, m_s):
    if f_s.dim() == 4:
        f_s, m_s = f_s.unsqueeze(1), m_s.unsqueeze(1)  # (B, 1, C, h', w'), (B, 1, H, W)
    B, C, h, w = f_q.shape
    q = f_q.reshape(B, C, h * w)  # (B, C, hw)
    q_norm = q.norm(dim=1, keepdim=True)  # (B, 1, hw)
    m = _resize((m_s == 1).float(), f_s.shape[-2:])  # (B, S, h', w'), PFENet.py:209,225
    priors = []
    for shot in range(f_s.shape[1]):  # one shot at a time: the similarity matrix is (B, h'w', hw)
        s = (f_s[:, shot] * m[:, shot, None]).flatten(2).transpose(1, 2)  # (B, h'w', C)
        s_norm = s.norm(dim=2, keepdim=True)  # (B, h'w', 1)
        cos = torch.bmm(s, q) / (s_norm * q_norm + COSINE_EPS)  # (B, h'w', hw)
        p = cos.max(dim=1).values  # (B, hw): best-matching support pixel
        p_min, p_max = p.min(dim=1, keepdim=True).values, p.max(dim=1, keepdim=True).values
        priors.append((p - p_min) / (p_max - p_min + COSINE_EPS))
    return torch.stack(priors, 1).mean(1).reshape(B, 1, h, w)  # (B, 1, h, w)


def _conv_relu(c_in, c_out, k):
    """k x k conv without bias (PFENet's head has neither BN nor biases) followed by ReLU."""
    return [nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.ReLU(inplace=True)]


def _classifier(dim, classes):
    """PFENet's cls / inner_cls head (PFENet.py:101-106, 144-149): 3x3 conv, ReLU, Dropout2d, 1x1 conv."""
    return nn.Sequential(*_conv_relu(dim, dim, 3), nn.Dropout2d(FEM_DROPOUT), nn.Conv2d(dim, classes, 1))


class FEM(nn.Module):
    """PFENet's Feature Enrichment Module (TPAMI 2020; PFENet.py:119-174, 256-286).

    Per scale, finest first: pool f_q to the bin, concatenate the expanded prototype and the extra maps
    (PFENet: the prior), init_merge (1x1) -> for every scale after the first, alpha_conv (1x1) on [this, previous
    scale resized to this bin] added as a residual (inter-scale merging) -> beta_conv (two 3x3) residual ->
    inner_cls auxiliary logits; upsampled to h,w. The scales are concatenated -> res1 (1x1) -> res2 (two 3x3)
    residual -> cls. All widths equal in_dim (PFENet's reduce_dim 256).
    A bin <= 1 is a fraction of the feature size, rounded (60 -> 60/30/15/8, 81 -> 81/40/20/10); a bin > 1 is
    an absolute size (PFENet PASCAL: [60, 30, 15, 8]).
    forward(f_q (B,in_dim,h,w), proto (B,in_dim), extra (B,extra_dim,h,w)) -> (logits (B,classes,h,w),
    aux: list of (B,classes,b,b), one per bin).
    """

    def __init__(self, in_dim=256, extra_dim=1, bins=FEM_BINS, classes=2):
        super().__init__()
        self.bins = tuple(bins)
        self.init_merge = nn.ModuleList(
            nn.Sequential(*_conv_relu(2 * in_dim + extra_dim, in_dim, 1)) for _ in self.bins)
        self.alpha_conv = nn.ModuleList(nn.Sequential(*_conv_relu(2 * in_dim, in_dim, 1)) for _ in self.bins[1:])
        self.beta_conv = nn.ModuleList(
            nn.Sequential(*_conv_relu(in_dim, in_dim, 3), *_conv_relu(in_dim, in_dim, 3)) for _ in self.bins)
        self.inner_cls = nn.ModuleList(_classifier(in_dim, classes) for _ in self.bins)
        self.res1 = nn.Sequential(*_conv_relu(len(self.bins) * in_dim, in_dim, 1))
        self.res2 = nn.Sequential(*_conv_relu(in_dim, in_dim, 3), *_conv_relu(in_dim, in_dim, 3))
        self.cls = _classifier(in_dim, classes)

    @staticmethod
    def bin_size(b, h, w):
        """Pooled size (bh, bw) of bin b for an h x w feature map."""
        if b <= 1:
            return max(1, round(h * b)), max(1, round(w * b))
        return int(b), int(b)

    def forward(self, f_q, proto, extra):
        h, w = f_q.shape[-2:]
        scales, aux = [], []
        for i, b in enumerate(self.bins):
            size = self.bin_size(b, h, w)
            x = torch.cat([F.adaptive_avg_pool2d(f_q, size),
                           proto[:, :, None, None].expand(-1, -1, *size),
                           _resize(extra, size)], 1)  # (B, 2*in_dim + extra_dim, bh, bw)
            x = self.init_merge[i](x)  # (B, in_dim, bh, bw)
            if i > 0:  # inter-scale merging with the previous (finer) scale, kept at h,w
                previous = _resize(scales[-1], size)
                x = self.alpha_conv[i - 1](torch.cat([x, previous], 1)) + x
            x = self.beta_conv[i](x) + x
            aux.append(self.inner_cls[i](x))  # (B, classes, bh, bw)
            scales.append(_resize(x, (h, w)))
        x = self.res1(torch.cat(scales, 1))  # (B, len(bins)*in_dim, h, w) -> (B, in_dim, h, w)
        x = self.res2(x) + x
        return self.cls(x), aux  # (B, classes, h, w)


def seg_loss(logits, m_q):
    """Cross-entropy of logits (B,2,h,w), upsampled bilinearly (align_corners=True) to m_q's H,W, with the
    labels m_q (B,H,W); 255 ignored (PFENet.py:290-300). Mean over the labelled pixels; 0 when there are none
    (where F.cross_entropy's mean would give NaN and poison the gradients). Returns a scalar."""
    if logits.shape[-2:] != m_q.shape[-2:]:
        logits = _resize(logits, m_q.shape[-2:])  # (B, 2, H, W)
    total = F.cross_entropy(logits, m_q, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (m_q != IGNORE_INDEX).sum().clamp(min=1)


def intersection_and_union(pred, target, ignore_index=IGNORE_INDEX):
    """Per-episode intersection and union of background (0) and foreground (1), as PFENet's
    intersectionAndUnionGPU (util/util.py:67-79): pixels where target == ignore_index count in neither.

    pred, target (B,H,W) or (H,W), values {0,1} (target also ignore_index).
    Returns (inter, union), each (B,2) float64 [background, foreground]; an (H,W) input gives (1,2).
    """
    if pred.dim() == 2:
        pred, target = pred[None], target[None]  # (1, H, W)
    valid = target != ignore_index
    inter, union = [], []
    for c in (0, 1):
        p, t = (pred == c) & valid, target == c
        inter.append((p & t).flatten(1).sum(1))
        union.append((p | t).flatten(1).sum(1))
    return torch.stack(inter, 1).double(), torch.stack(union, 1).double()  # (B, 2), (B, 2)


class IoUMeter:
    """Class mIoU and FB-IoU accumulated over episodes, as PFENet's test.py:210-253.

    Class mIoU (the headline number): per class c, IoU_c = sum of foreground I / (sum of foreground U + 1e-10)
    over the episodes of class c; mean over the classes seen. FB-IoU: background and foreground I and U summed
    over all episodes, IoU of each, their mean. State: float64 tensors on `device`, indexed by class id
    1..num_classes (index 0 unused); update() never synchronises with the host.
    """

    def __init__(self, num_classes, device="cpu"):
        self.device = torch.device(device)
        zeros = partial(torch.zeros, dtype=torch.float64, device=self.device)
        self.class_inter, self.class_union, self.class_count = (zeros(num_classes + 1) for _ in range(3))
        self.inter, self.union = zeros(2), zeros(2)  # [background, foreground] over all episodes

    def update(self, pred, target, class_ids):
        """pred, target (B,H,W) (or (H,W) for one episode); class_ids (B,) class of each episode."""
        inter, union = intersection_and_union(pred, target)  # (B, 2)
        inter, union = inter.to(self.device), union.to(self.device)
        ids = torch.as_tensor(class_ids, device=self.device).reshape(-1)  # (B,)
        self.class_inter.index_add_(0, ids, inter[:, 1])
        self.class_union.index_add_(0, ids, union[:, 1])
        self.class_count.index_add_(0, ids, torch.ones_like(inter[:, 1]))
        self.inter += inter.sum(0)
        self.union += union.sum(0)

    def class_iou(self):
        """{class_id: IoU} for the classes seen so far."""
        iou = self.class_inter / (self.class_union + IOU_EPS)
        seen = self.class_count.nonzero().flatten()
        return dict(zip(seen.tolist(), iou[seen].tolist()))

    def miou(self):
        """Mean of class_iou() over the classes seen (NaN before any update)."""
        ious = list(self.class_iou().values())
        return sum(ious) / len(ious) if ious else float("nan")

    def fbiou(self):
        """Mean of the global background and foreground IoU."""
        return (self.inter / (self.union + IOU_EPS)).mean().item()

    def all_reduce(self):
        """Sum the state over the ranks of torch.distributed (no-op when it is not initialised). With NCCL
        the meter must live on the rank's GPU."""
        if dist.is_available() and dist.is_initialized():
            for t in (self.class_inter, self.class_union, self.class_count, self.inter, self.union):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
