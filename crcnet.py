"""CRCNet: Few-shot Segmentation with Cross-Reference and Region-Global Conditional Networks.

W. Liu, C. Zhang, G. Lin, F. Liu. IJCV 2022, arXiv:2208.10761 (extends CRNet, CVPR 2020). No public code: the
paper is the only source, and every value it leaves open is a Config field or an entry under "Choices".

A symmetric network predicts the masks of both images of a (query, support) pair. A cross-reference module
re-weights the channels of both feature maps by the product of their sigmoid importance vectors (co-occurrent
features) and predicts the co-occurrent objects with an auxiliary head. A conditional module adds the other
image's foreground vector (global) and an attention over its foreground pixels (local): the query branch is
conditioned on the support's mask, the support branch (training only, where the query's mask is known) on the
query's. A mask refinement module with a confidence cache then predicts recurrently. K shots: the network is
fine-tuned at test time on pairs of the labelled supports (§4.6), or the 1-shot probabilities are averaged (the
fusion baseline, Table 4). network="pfenet" puts the global conditional and cross-reference modules into PFENet
(Tian et al., TPAMI 2020 [50]): the paper's Tables 5, 8, 9, 11 and 12.

Paper -> code:
    §4.2 Siamese encoder (ResNet, layer3 + layer4, §5.1; end to end) SiameseEncoder
    §4.3 cross-reference module, Fig. 3                              CrossReference
    §4.3 co-occurrent sub-prediction head (convs + ASPP)             ASPP, CoOccurrenceHead
    §4.4 global conditional module, Fig. 5                           GlobalConditional
    §4.4 local conditional module, Eq. (1)-(3), Fig. 6               LocalConditional
    §4.5 mask refinement: global convolution block [41], cache       GlobalConvBlock, MaskRefinement
    Fig. 2 one (query, support) pair through §4.3-§4.5, both heads   PairHead
    §4.7 interchangeable roles: each branch conditioned on the other PairHead, Model.forward(m_q=)
    Eq. (4)-(5) loss with lambda = 0.1                               pair_loss, Model.loss
    §4.6 k-shot fine-tuning; Table 4 fusion                          Model.infer, Model.finetune, Model._forward
    §5.1, §5.3 multi-scale test                                      Model._multi_scale, _log_mean_exp
    Tables 5, 8, 9, 11, 12: PFENet + GC / CR / CRC / FT              PFENetEncoder, PFENetHead, pfenet_loss
    Tables 1-4, 6, 7: the ablation switches                          Config (each field cites its table)
    Eq. (6)-(8) mIoU and FB-IoU                                      common.IoUMeter (train.py evaluates)

Choices (the paper is silent unless a section is named):
    - The whole encoder (ResNet, 3x3 reduction) learns at the training lr (§5.1 "end-to-end training", one lr);
      BN stays in eval with ImageNet's statistics. --freeze-encoder (train_encoder=False) freezes the ResNet as
      the other models here (and CANet's code [63]) do, the reduction still learning: the option for comparing
      the five models on one frozen backbone.
    - Every module is shared by the query and the support branch (§4.7), the cross-reference FCs included, so
      that the fused importance vector is symmetric in the two images.
    - Encoder: one 3x3 conv ([layer3, layer4], 3072 -> 256) + ReLU (§5.1: 3x3, 256, ReLU); no dropout or BN
      anywhere, as the paper names neither (convs have biases instead).
    - Cross-reference FC widths 256 -> 256/16 -> 256: SE-Net's reduction ratio, this being SE-style attention.
    - ASPP: CANet's [63] (DeepLab v3's: 1x1, 3x3 at rates 6/12/18, image pooling, concatenated, 1x1), where the
      paper cites DeepLab [4], whose v2 ASPP sums four 3x3 branches at rates 6/12/18/24.
    - Co-occurrence head ("several convolutional layers and ASPP", §4.3): a 3x3 conv, the ASPP, a 3x3 conv, and
      a 1x1 conv to the two scores.
    - Global conditional (Fig. 5, "a residual convolution"): a 3x3 conv brings [f, vector] back to 256 so that a
      residual (two 3x3 convs, a basic block without BN) can be added; the refinement's combined block alike.
    - Refinement: the feature branch is a 3x3 conv then GCN [41] (k x 1 -> 1 x k plus 1 x k -> k x 1, residual);
      the classifier a 3x3 and a 1x1 conv, as the co-occurrence head ends; the cached branch one 3x3 conv of the
      1-channel cache to 256. The cache is the foreground probability, detached: only the last of the steps is
      differentiated and supervised (Eq. 5).
    - Each branch is conditioned on the other image (§4.7), in the global vector and the local attention alike:
      the query on the support's mask, the support on the query's (PairHead says why); without m_q (evaluation)
      the support branch, which nothing then reads, is not computed.
    - Eq. (2) literally: similarities are multiplied by the reference mask (bilinearly resized, 255 counts as
      background), so background scores 0, not -inf; an empty mask gives a uniform row. Eq. (1) is not scaled
      either (no 1/sqrt(C)): Eq. (1)-(2) run in fp32 under bf16 autocast (LocalConditional says why).
    - Roles interchangeable (§4.7): the branches mirror each other, so swapping query and support swaps the two
      predictions and leaves Eq. (5) as it is: no explicit swap; both images are supervised every step.
    - K shots in forward: every support is paired with the query and the query probabilities are averaged
      (Table 4's fusion); each pair is supervised as a 1-shot episode.
    - Fine-tuning (§4.6): the encoder (backbone, 3x3 reduction) fixed, the head tuned on copies of its weights
      (the model is never written) by SGD (training momentum, no weight decay), one random ordered pair of distinct
      supports a step; "finetune" then predicts from the first support, "finetune+fusion" from all (Table 4).
      §4.6 gives no step count or rate: ft_steps 20 (5-shot's 20 ordered pairs, each once on average) at §5.1's lr.
    - Multi-scale inference at [0.75, 1, 1.25] by default: §5.1 fuses scales, so the reported numbers include it;
      §5.1 lists [0.75, 1.25], §5.3 and Table 2 these three, which keep the original size among the fused ones.
      Images bilinear, masks nearest; fine-tuning at scale 1; --test-scales 1: one scale, as the others test.
    - lr 0.0025 (§5.1) for every learnable layer, the ResNet included (CANet's code, this group's predecessor,
      trains its head at 10 x 0.00025: the same); synthetic 0.01 (the harness's 0.05 diverges: DEFAULTS).
    - Table 1 "w/o cross-reference": G = F at its place, its co-occurrence head and Eq. (5)'s lambda terms gone.
    - Tables 8 and 15's "CRNet" [35]: local_conditional=false (§1: CRCNet is CRNet plus the local-global conditional).
      "w/o conditional": global and local off (two fields): the refinement reads G alone, no mask is read.
    - A conditional module switched off narrows the refinement's entry conv by the 256 channels it gave.
    - Table 2 "w/o mask refine" (§5.3's baseline): the cached branch (its conv and its 256 input channels of
      the combined block) removed and the module run once; "w/o multi-level": layer4 alone (levels).
    - Table 4 ablates Table 1's model (its fusion 1-shot, 49.6, is Table 1's full row): one level, no cache,
      one scale. Table 6: ReLU or a softmax over the channels in the Sigmoid's place. Table 7: Eq. (2) unmasked.
    - network="pfenet": PFENet as its code runs it (frozen backbone, cat(layer3, layer2) reduced per role with
      dropout 0.5, layer4 prior, FEM, main + aux loss, K shots averaged in prototype and prior), its recipe.
    - CR on PFENet: re-weights the reduced query and support features (the prototype pools G_s) and adds the
      co-occurrence terms; K shots: each support by its pair's vector, the query by their mean.
    - GC on PFENet: the query through the global conditional module with PFENet's prototype, before FEM (which
      still reads the prototype). CRC = GC + CR (Table 8's caption); the local module is CRCNet's alone.
    - FT on PFENet (Table 5): §4.6 with PFENet's backbone and reductions fixed, its loss on pairs of supports, at
      its training lr; "finetune+fusion" predicts from all supports, as PFENet's 5-shot.
    - Table 14 (§5.4, box supports): the pixel-trained runs evaluated with box supports (--eval-only
      --support-boxes): §5.4 boxes the test supports, where --support-boxes in training (data.py) would box the
      training supports too.
    - PFENet on COCO at its config's 641 px (lr 0.005 x 10, batch 8, 50 epochs): Table 12's "473 x 473" is
      PASCAL's size, which it gives PFENet [50] itself too, whose config trains COCO at 641.
    - A changed field that the run leaves unread is refused, as it would do nothing: one of the other network
      (levels on PFENet, bins on CRCNet, ...) or of a module switched off (refine_steps without mask_refinement,
      cr_activation, cr_reduction, aspp_rates and sub_weight without cross_reference, local_support_mask without
      local_conditional).
"""
import dataclasses
import math
import typing
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import common

KShot = Literal["finetune", "fusion", "finetune+fusion"]  # §4.6 and Table 4's rows
FT_SEED = 0  # fine-tuning pairs come from their own generator: deterministic, global RNG untouched
# Table 6: what turns the second FC's output into channel importance (§4.3: a Sigmoid, in [0, 1])
IMPORTANCE = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "softmax": partial(nn.Softmax, dim=1)}
LEVELS = ("layer2", "layer3", "layer4")  # the backbone's stages at one size, output stride 8 (layer1 is at 1/4)
CRCNET_FIELDS = ("levels", "local_conditional", "local_support_mask", "mask_refinement", "gcn_kernel", "refine_steps")
PFENET_FIELDS = ("feature_dropout", "aux_weight", "bins")


@dataclass
class Config:
    network: Literal["crcnet", "pfenet"] = "crcnet"  # "pfenet": Tables 5, 8, 9, 11, 12 (PFENet + GC/CR/CRC/FT)
    backbone: str = "resnet50"  # §5.1
    pretrained: bool = True  # §5.1 ImageNet
    levels: tuple = ("layer3", "layer4")  # §5.1 multi-level features at 1/8; Table 2 "Multi-Level" off: layer4
    dim: int = 256  # §5.1: every conv of the modules gives 256 channels (PFENet's reduce_dim too)
    cross_reference: bool = True  # §4.3 with its co-occurrence head; Table 1, Tables 8 and 12 "CR"
    cr_activation: Literal["sigmoid", "relu", "softmax"] = "sigmoid"  # §4.3; Table 6
    cr_reduction: int = 16  # §4.3 two FC layers, width open: SE-Net's ratio
    aspp_rates: tuple = (6, 12, 18)  # §4.3 ASPP [4]; CANet's rates
    global_conditional: bool = True  # §4.4 Fig. 5; Tables 1 and 3, Tables 8 and 12 "GC"
    local_conditional: bool = True  # §4.4 Fig. 6; Tables 1 and 3 (CRCNet only)
    local_support_mask: bool = True  # Eq. (2)'s Phi(Mask_sup); Table 7 "w/o mask"
    mask_refinement: bool = True  # §4.5's cached branch, recurrent; Table 2 "Mask Refine" off: §5.3's baseline
    gcn_kernel: int = 7  # §4.5 1x7 and 7x1 kernels
    refine_steps: int = 10  # §5.1
    sub_weight: float = 0.1  # Eq. (5) lambda
    kshot: KShot = "finetune"  # §4.6; "fusion": Table 4 baseline (PFENet: its own); "finetune+fusion": last row
    ft_steps: int = 20  # §4.6 silent: 5-shot has 20 ordered pairs of distinct supports, each seen once on average
    ft_lr: float = 0.0025  # §4.6 silent: the training lr of §5.1 (PFENet's recipe: its own)
    ft_momentum: float = 0.9  # §4.6 silent: the training optimiser's
    test_scales: tuple = (0.75, 1.0, 1.25)  # §5.3, Table 2 "Multi-Scale" (§5.1: 0.75, 1.25); Choices
    train_encoder: bool = True  # §5.1 "end-to-end training"; False: --freeze-encoder, the ResNet frozen (Choices)
    feature_dropout: float = 0.5  # PFENet's down_query / down_supp Dropout2d
    aux_weight: float = 1.0  # PFENet's FEM auxiliary loss weight
    bins: tuple = common.FEM_BINS  # PFENet's FEM: PASCAL's 60/30/15/8 at 473 px


def add_args(parser):
    parser.add_argument("--kshot", choices=typing.get_args(KShot), help="k-shot inference (default finetune, §4.6)")
    parser.add_argument("--ft-steps", type=int, help="test-time fine-tuning steps (default 20)")
    parser.add_argument("--ft-lr", type=float,
                        help="test-time fine-tuning learning rate (default 0.0025, §5.1's training lr, whatever "
                             "--lr; network=pfenet: its recipe's training lr, 0.025, COCO and synthetic 0.05)")
    parser.add_argument("--test-scales", type=float, nargs="+", help="default 0.75 1 1.25 (§5.3); 1: one scale")
    parser.add_argument("--refine-steps", type=int, help="mask refinement iterations, >= 1 (default 10, §5.1)")
    parser.add_argument("--freeze-encoder", action="store_const", const=False, dest="train_encoder", default=None,
                        help="keep the ResNet frozen, as the other models (default: CRCNet trained end to end, "
                             "§5.1; network=pfenet frozen, as PFENet)")


EVALUATION_FLAGS = ("kshot", "ft_steps", "ft_lr", "ft_momentum", "test_scales")  # --resume lets them change


def by_network(crcnet, pfenet=None):
    """A recipe value by --set network=: CRCNet's (the default), or PFENet's (None: the next recipe's, the harness's,
    which is PFENet's own: PASCAL lr 0.0025 x 10, batch 4, 200 epochs, 473 px; COCO its config's one-GPU run)."""
    return {"network=crcnet": crcnet, "network=pfenet": pfenet}


# PFENet's evaluation and encoder under network=pfenet: its frozen backbone, one test scale, its own K shots
# (prototypes and priors averaged); fine-tuning (Table 5) at its training lr. CRCNet's: the Config's (None).
PFENET_OWN = dict(train_encoder=by_network(None, False), test_scales=by_network(None, (1.0,)),
                  kshot=by_network(None, "fusion"))
# CRCNet: Table 8 trains at 321; §5.1: SGD, lr 0.0025, 200 epochs. Batch sizes and COCO's epochs are not given:
# the harness's (PFENet's) values. Synthetic: the harness's quick-start values, at 88 px where the others use 128
# (321/473 of it, to a multiple of 8), as CRCNet's crop is smaller than theirs, and at lr 0.01: 0.03 and the
# harness's 0.05 drive its loss to NaN (no layer of its head normalises). Trained end to end as §5.1, the encoder
# included: frozen, its head learned the synthetic novel classes far more slowly (barely above the baseline in 30
# epochs); one test scale, so that the quick start stays a few minutes on a CPU (three scales triple evaluation).
# PFENet on COCO: its config's 641 px (Choices). A folder dataset has the harness's recipe and the Config's fields
# (no model file has one): network=pfenet there adds --freeze-encoder --test-scales 1 --kshot fusion --ft-lr 0.025.
DEFAULTS = {  # §5.1's augmentation: random crop, scale and flip (no rotation, no blur); PFENet's its own
    "pascal": dict(lr=by_network(0.0025), batch_size=4, epochs=200, img_size=by_network(321),
                   augment=by_network("crop-scale-flip"), ft_lr=by_network(None, 0.025), **PFENET_OWN),
    "coco": dict(lr=by_network(0.0025), batch_size=8, epochs=50, img_size=by_network(321),
                 augment=by_network("crop-scale-flip"), ft_lr=by_network(None, 0.05), **PFENET_OWN),
    "synthetic": dict(img_size=by_network(88), lr=by_network(0.01), ft_lr=by_network(None, 0.05),
                      **{**PFENET_OWN, "test_scales": (1.0,)}),
}
DEFAULTS["fss1000"] = DEFAULTS["pascal"]  # Tables 14, 15: §5.1's one recipe (its 224 px images upscaled to 321)


# the only layer type of the paper's modules (§5.1): a conv and a ReLU, with a bias (no BatchNorm anywhere: Choices)
conv_relu = partial(common.conv_relu, bias=True)


def _log_mean_exp(log_p, dim):
    """log of the mean of the probabilities exp(log_p) along dim: the fusion of predictions (Table 4, §5.1)."""
    return torch.logsumexp(log_p, dim) - math.log(log_p.shape[dim])


class SiameseEncoder(nn.Module):
    """§4.2: the backbone shared by both images (trainable: §5.1 end to end), its `levels` (layer3 and layer4 at
    1/8, §5.1; Table 2's last layer alone: layer4) concatenated, a 3x3 conv to dim. forward(img) -> (N,dim,h,w)."""

    def __init__(self, backbone, pretrained, trainable, levels, dim):
        super().__init__()
        # BN in eval with ImageNet's statistics even when trainable: a batch of 4 pairs would give noisy ones
        self.backbone = common.Backbone(backbone, pretrained=pretrained, trainable=trainable,
                                        last=max(levels, key=common.LAYERS.index))
        self.levels = levels
        self.reduce = conv_relu(sum(self.backbone.channels[name] for name in levels), dim, 3)

    def forward(self, img):
        feats = self.backbone(img)
        return self.reduce(torch.cat([feats[name] for name in self.levels], 1))  # (N, dim, h, w)

    def episode(self, img_q, img_s, m_s, m_q=None):
        """PairHead's inputs for every (query, support) pair, one pass over the query and every support:
        f_q, f_s (B*S,C,h,w), the foreground at h x w of the support m_s and of the query m_q (B*S,1,h,w) or None."""
        B, S = img_s.shape[:2]
        f = self(torch.cat([img_q, img_s.flatten(0, 1)]))  # (B + B*S, C, h, w)
        f_q = f[:B, None].expand(B, S, *f.shape[1:]).flatten(0, 1)  # (B*S, C, h, w): one pair per support
        m = common.foreground_at(m_s.flatten(0, 1)[:, None], f.shape[-2:])  # (B*S, 1, h, w), 255 as background
        if m_q is not None:  # the query's foreground, once per pair
            m_q = common.foreground_at(m_q[:, None], f.shape[-2:]).repeat_interleave(S, 0)  # (B*S, 1, h, w)
        return f_q, f[B:], m, m_q

    def supports(self, img_s, m_s):
        """One episode's supports img_s (S,3,H,W), m_s (S,H,W) for fine-tuning: features and foreground at h x w."""
        f = self(img_s)  # (S, C, h, w)
        return f, common.foreground_at(m_s[:, None], f.shape[-2:])  # (S, 1, h, w)

    @staticmethod
    def pair(supports, i, j):
        """PairHead's inputs for support i as the query and j as its support, each conditioned on the other's mask."""
        f, m = supports
        return f[i:i + 1], f[j:j + 1], m[j:j + 1], m[i:i + 1]


class CrossReference(nn.Module):
    """§4.3, Fig. 3: importance = act(FC(ReLU(FC(GAP(f))))) per image (act: Sigmoid, Table 6 ReLU or softmax); the
    product of the two re-weights both maps. forward(f_q (N,C,h,w), f_s (N*S,C,h,w)): S supports per query (CRCNet's
    pairs: 1); each support is re-weighted by its pair's product, the query by their mean (PFENet's K shots)."""

    def __init__(self, dim, reduction, activation="sigmoid"):
        super().__init__()
        self.importance = nn.Sequential(nn.Linear(dim, dim // reduction), nn.ReLU(inplace=True),
                                        nn.Linear(dim // reduction, dim), IMPORTANCE[activation]())

    def forward(self, f_q, f_s):
        N, S = f_q.shape[0], f_s.shape[0] // f_q.shape[0]
        # only channels active in both images keep a high weight
        w = self.importance(f_q.mean((2, 3))).repeat_interleave(S, 0) * self.importance(f_s.mean((2, 3)))  # (N*S, C)
        w_q = w.view(N, S, -1).mean(1)  # (N, C)
        return f_q * w_q[:, :, None, None], f_s * w[:, :, None, None]  # G_q (N, C, h, w), G_s (N*S, C, h, w)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling as CANet's (DeepLab v3's): 1x1, 3x3 at each rate and image pooling,
    concatenated and fused by a 1x1 (icoz69/CaNet one_shot_network.py, layer6_0-layer7)."""

    def __init__(self, dim, rates):
        super().__init__()
        self.branches = nn.ModuleList([conv_relu(dim, dim, 1), *(conv_relu(dim, dim, 3, dilation=r) for r in rates)])
        self.pool = conv_relu(dim, dim, 1)
        self.project = conv_relu(dim * (len(rates) + 2), dim, 1)

    def forward(self, x):
        pooled = self.pool(x.mean((2, 3), keepdim=True)).expand_as(x)  # (N, dim, h, w)
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], 1))  # (N, dim, h, w)


class CoOccurrenceHead(nn.Module):
    """§4.3: the decoder of the co-occurrent objects (QM_sub, SM_sub): conv, ASPP, conv, 2-channel classifier; one
    conv before the ASPP and one after it are the fewest that make the paper's "several" around it."""

    def __init__(self, dim, rates):
        super().__init__()
        self.decode = nn.Sequential(conv_relu(dim, dim, 3), ASPP(dim, rates), conv_relu(dim, dim, 3),
                                    nn.Conv2d(dim, 2, 1))

    def forward(self, g):
        return self.decode(g)  # (N, 2, h, w)


class GlobalConditional(nn.Module):
    """§4.4, Fig. 5: the category vector, upsampled to h x w, concatenated, then a residual convolution."""

    def __init__(self, dim):
        super().__init__()
        self.merge = conv_relu(2 * dim, dim, 3)
        self.residual = nn.Sequential(conv_relu(dim, dim, 3), conv_relu(dim, dim, 3))

    def forward(self, f, proto):
        x = self.merge(torch.cat([f, proto[:, :, None, None].expand_as(f)], 1))  # (N, dim, h, w)
        return x + self.residual(x)


class LocalConditional(nn.Module):
    """§4.4, Fig. 6, Eq. (1)-(3): every pixel of f attends over the reference pixels; with support_mask background
    pixels score 0 (Eq. 2 multiplies by the mask), they are not excluded; without it (Table 7) all count alike."""

    def __init__(self, dim, support_mask=True):
        super().__init__()
        self.theta = conv_relu(dim, dim, 1)
        self.delta = conv_relu(dim, dim, 1)
        self.support_mask = support_mask

    def forward(self, f, f_s, m):
        """f (N,C,h,w) features to condition; f_s (N,C,h,w), m (N,1,h,w) the reference image's features and
        foreground: the support's for the query branch, the query's for the support branch (Eq. 1-3's F_s)."""
        N, C, h, w = f.shape
        # Eq. (1)-(2) in fp32, theta and delta included: the products are not scaled (no 1/sqrt(C)) and reach
        # hundreds, where bf16 (rounding them, and theta's and delta's outputs) moves logits by up to 1, and the
        # softmax with them
        with torch.autocast(f.device.type, enabled=False):
            # Eq. (1): M_sim = theta(F_q)^T (x) delta(F_s)
            sim = self.theta(f.float()).flatten(2).transpose(1, 2) @ self.delta(f_s.float()).flatten(2)  # (N, hw, hw)
            # Eq. (2): M'_sim = Softmax(M_sim . Phi(Mask_sup)), row-wise; Table 7 "w/o mask": Softmax(M_sim)
            attn = torch.softmax(sim * m.flatten(2) if self.support_mask else sim, dim=2)  # (N, hw, hw_s)
        # Eq. (3): F'_q = F_s (x) M'_sim, a weighted mean, which bf16 (under autocast) rounds as any feature
        return (f_s.flatten(2) @ attn.transpose(1, 2)).reshape(N, C, h, w)  # (N, C, h, w)


class GlobalConvBlock(nn.Module):
    """Global convolution block (Peng et al. [41]), §4.5: (k x 1 -> 1 x k) + (1 x k -> k x 1), few parameters."""

    def __init__(self, dim, k):
        super().__init__()
        col, row = dict(kernel_size=(k, 1), padding=(k // 2, 0)), dict(kernel_size=(1, k), padding=(0, k // 2))
        self.left = nn.Sequential(nn.Conv2d(dim, dim, **col), nn.Conv2d(dim, dim, **row))
        self.right = nn.Sequential(nn.Conv2d(dim, dim, **row), nn.Conv2d(dim, dim, **col))

    def forward(self, x):
        return self.left(x) + self.right(x)  # (N, dim, h, w)


class MaskRefinement(nn.Module):
    """§4.5, Fig. 7: a cache (zeros at first) of the last foreground probability, refined `steps` times; without
    the cached branch (cached=False, Table 2's baseline of §5.3) the block predicts from the features, once.

    forward(x (N,in_dim,h,w)) -> (logits (N,2,h,w) of the last step, caches: steps + 1 maps (N,1,h,w), the
    initial zeros first and the cache after every step)."""

    def __init__(self, in_dim, dim, k, steps, cached=True):
        super().__init__()
        self.steps = steps if cached else 1  # §5.3: "we only run the mask refinement module once"
        self.entry = conv_relu(in_dim, dim, 3)
        self.global_conv = GlobalConvBlock(dim, k)
        self.cached = conv_relu(1, dim, 3) if cached else None
        self.combine = conv_relu((3 if cached else 2) * dim, dim, 3)
        self.combine_residual = nn.Sequential(conv_relu(dim, dim, 3), conv_relu(dim, dim, 3))
        self.cls = nn.Sequential(conv_relu(dim, dim, 3), nn.Conv2d(dim, 2, 1))

    def forward(self, x):
        # feature branch: two levels (3x3 conv, then the large field of view), independent of the cache
        x = self.entry(x)  # (N, dim, h, w)
        x_global = x + self.global_conv(x)
        # combined block = ReLU(conv([x, x_global, cached])); a conv is linear in its input channels, so the
        # feature levels' part (the first 2 dim input channels of its one weight: checkpoints keep their keys) is
        # convolved once, here, and each step convolves the cached branch alone
        conv, relu = self.combine
        n = 2 * x.shape[1]
        features = F.conv2d(torch.cat([x, x_global], 1), conv.weight[:, :n], conv.bias, padding=conv.padding)
        if self.cached is not None:  # cached=False: the conv reads the features alone, there is no cached block
            # the cached block's weight made dense in the conv's dtype once, not copied (or cast by autocast) each step
            w_cached = conv.weight[:, n:].to(features.dtype, memory_format=torch.preserve_format, copy=True)
        cache = x.new_zeros(x.shape[0], 1, *x.shape[-2:])  # (N, 1, h, w): no prediction yet
        caches = [cache]
        for step in range(self.steps):
            # the cache holds a value, so only the last step needs a graph
            with torch.set_grad_enabled(torch.is_grad_enabled() and step == self.steps - 1):
                y = features
                if self.cached is not None:
                    y = y + F.conv2d(self.cached(cache), w_cached, padding=conv.padding)  # (N, dim, h, w)
                y = relu(y)
                logits = self.cls(y + self.combine_residual(y))  # (N, 2, h, w)
            # the cache update, a value: CANet's code [63] stores its history masks so (icoz69/CaNet train.py)
            cache = logits.softmax(1)[:, 1:].detach()  # (N, 1, h, w)
            caches.append(cache)
        return logits, caches


class PairHead(nn.Module):
    """Everything after the Siamese encoder for N (query, support) pairs (Fig. 2), both images' predictions; its
    modules come built, None where an ablation removes one (Tables 1-3).

    forward(f_q, f_s (N,dim,h,w), m_s (N,1,h,w) support foreground at h x w, m_q (N,1,h,w) query foreground or
    None) -> {"query": logits (N,2,h,w); with m_q also "support" and, with the cross-reference module,
    "query_sub", "support_sub"}. Without m_q (evaluation) what only the loss reads is not computed."""

    def __init__(self, cross_reference, co_occurrence, global_conditional, local_conditional, refinement):
        super().__init__()
        self.cross_reference, self.co_occurrence = cross_reference, co_occurrence
        self.global_conditional, self.local_conditional = global_conditional, local_conditional
        self.refinement = refinement

    def forward(self, f_q, f_s, m_s, m_q=None):
        N = f_q.shape[0]
        # 2. cross-reference module (§4.3): reinforced features G (Table 1 without it: G = F)
        g_q, g_s = (f_q, f_s) if self.cross_reference is None else self.cross_reference(f_q, f_s)
        # the branches as one batch (2N = query, then support; N = the query alone without m_q): features,
        # reinforced features, and the reference image that conditions them. Each branch is conditioned on the
        # other image: conditioned on its own mask, a support pixel would find itself among the foreground keys,
        # a shortcut to half of Eq. (5)'s main term that teaches nothing transferable
        f, g, f_ref, m_ref = (f_q, g_q, f_s, m_s) if m_q is None else (
            torch.cat([f_q, f_s]), torch.cat([g_q, g_s]), torch.cat([f_s, f_q]), torch.cat([m_s, m_q]))
        # 3. conditional module (§4.4) on the encoder features: global, local (Table 3 switches each)
        conditional = []
        if self.global_conditional is not None:
            proto = common.masked_average_pooling(f_ref, m_ref)  # (2N, C): foreground average pooling
            conditional.append(self.global_conditional(f, proto))  # (2N, C, h, w)
        if self.local_conditional is not None:
            conditional.append(self.local_conditional(f, f_ref, m_ref))  # (2N, C, h, w)
        # 4. mask refinement (§4.5) on the concatenated conditional and cross-reference outputs
        logits, _ = self.refinement(torch.cat([*conditional, g], 1))  # (2N, 2, h, w)
        out = {"query": logits[:N]}
        if m_q is not None:  # what the loss alone reads: the support's prediction, the co-occurrent objects (§4.3)
            out["support"] = logits[N:]
            if self.co_occurrence is not None:
                sub = self.co_occurrence(g)  # (2N, 2, h, w)
                out.update(query_sub=sub[:N], support_sub=sub[N:])
        return out


class PFENetEncoder(nn.Module):
    """PFENet's features [50] (network="pfenet"): the backbone (frozen unless trainable), cat(layer3, layer2)
    reduced by a 1x1 conv per role (down_query, down_supp: common.MidLevelReduction, with dropout), and the prior
    from layer4, a support's of its masked layer3 (common.cosine_prior, averaged over the shots)."""

    def __init__(self, backbone, pretrained, trainable, dim, dropout):
        super().__init__()
        self.backbone = common.Backbone(backbone, pretrained=pretrained, trainable=trainable)
        mid = self.backbone.channels["layer3"] + self.backbone.channels["layer2"]
        self.down_query = common.MidLevelReduction(mid, dim, dropout)
        self.down_supp = common.MidLevelReduction(mid, dim, dropout)

    def episode(self, img_q, img_s, m_s, m_q=None):
        """PFENetHead's inputs: f_q (B,C,h,w), f_s (B*S,C,h,w), the supports' foreground (B*S,1,h,w) (PFENet's
        bilinear mask), prior (B,1,h,w), and sub: whether the loss's labels m_q are given (training)."""
        B, S = img_s.shape[:2]
        feats_q, feats_s = self.backbone.episode(img_q, img_s, m_s=m_s)
        m = common.foreground_at(m_s.flatten(0, 1)[:, None], feats_s["layer3"].shape[-2:])  # (B*S, 1, h, w)
        f_s4 = feats_s["layer4"]  # (B*S, C4, h, w)
        prior = common.cosine_prior(feats_q["layer4"], f_s4.view(B, S, *f_s4.shape[1:]), m_s)  # (B, 1, h, w)
        return self.down_query(feats_q), self.down_supp(feats_s), m, prior, m_q is not None

    def supports(self, img_s, m_s):
        """One episode's supports img_s (S,3,H,W), m_s (S,H,W) for fine-tuning, in both roles: the query's (plain)
        and the support's (layer4 of the masked layer3)."""
        feats_q, feats_s = self.backbone(img_s), self.backbone(img_s, mask=m_s)
        m = common.foreground_at(m_s[:, None], feats_s["layer3"].shape[-2:])  # (S, 1, h, w)
        return self.down_query(feats_q), self.down_supp(feats_s), feats_q["layer4"], feats_s["layer4"], m, m_s

    @staticmethod
    def pair(supports, i, j):
        """PFENetHead's inputs for support i as the query and j as its support, with the sub-predictions."""
        f_q, f_s, f_q4, f_s4, m, m_s = supports
        prior = common.cosine_prior(f_q4[i:i + 1], f_s4[j:j + 1], m_s[j:j + 1])  # (1, 1, h, w)
        return f_q[i:i + 1], f_s[j:j + 1], m[j:j + 1], prior, True


class PFENetHead(nn.Module):
    """PFENet's decoder [50] with CRCNet's modules where they enter it (Tables 5, 8, 12; Choices), each None when
    off (GC and CR off: PFENet alone).

    forward(f_q (B,C,h,w), f_s (B*S,C,h,w) reduced features, m (B*S,1,h,w) support foreground, prior (B,1,h,w),
    sub) -> {"query": logits (B,2,h,w), and with sub what only the loss reads: "aux", FEM's per-bin logits
    [(B,2,b,b) per bin], and with the cross-reference module "query_sub" (B,2,h,w), "support_sub" (B*S,2,h,w)}."""

    def __init__(self, cross_reference, co_occurrence, global_conditional, fem):
        super().__init__()
        self.cross_reference, self.co_occurrence = cross_reference, co_occurrence
        self.global_conditional, self.fem = global_conditional, fem

    def forward(self, f_q, f_s, m, prior, sub=False):
        B, C = f_q.shape[:2]
        out = {}
        # 2. CR: the cross-reference module (§4.3) on both images' reduced features, and their co-occurrent objects
        if self.cross_reference is not None:
            f_q, f_s = self.cross_reference(f_q, f_s)  # G_q (B, C, h, w), G_s (B*S, C, h, w)
            if sub:
                pred = self.co_occurrence(torch.cat([f_q, f_s]))  # (B + B*S, 2, h, w)
                out.update(query_sub=pred[:B], support_sub=pred[B:])
        # 3. PFENet's prototype: every support's foreground average, averaged over the shots
        proto = common.masked_average_pooling(f_s, m).view(B, -1, C).mean(1)  # (B, C)
        # 4. GC: the global conditional module (§4.4, Fig. 5) conditions the query on the prototype
        if self.global_conditional is not None:
            f_q = self.global_conditional(f_q, proto)  # (B, C, h, w)
        # 5. PFENet's feature enrichment module on the query, the prototype and the prior
        out["query"], aux = self.fem(f_q, proto, prior, aux=sub)  # (B, 2, h, w), [(B, 2, b, b) per bin] or []
        if sub:
            out["aux"] = aux
        return out


def seg_terms(terms, total, out, m_q, m_s, sub_weight):
    """Adds Eq. (5)'s lambda (L_QMsub + L_SMsub) to (total, terms) where the cross-reference module predicted."""
    if "query_sub" not in out:
        return total, terms
    terms.update(query_sub=common.seg_loss(out["query_sub"], m_q), support_sub=common.seg_loss(out["support_sub"], m_s))
    return total + sub_weight * (terms["query_sub"] + terms["support_sub"]), terms


def pair_loss(out, m_q, m_s, sub_weight):
    """Eq. (5): (L_QM + L_SM) + lambda (L_QMsub + L_SMsub); out from PairHead, m_q, m_s (N,H,W) per pair."""
    # Eq. (4): each L is BCE on the foreground probability, i.e. 2-class cross-entropy (common.seg_loss, 255 ignored)
    terms = {"query": common.seg_loss(out["query"], m_q), "support": common.seg_loss(out["support"], m_s)}
    return seg_terms(terms, terms["query"] + terms["support"], out, m_q, m_s, sub_weight)


def pfenet_loss(out, m_q, m_s, aux_weight, sub_weight):
    """PFENet's loss (main + aux_weight x the mean of FEM's per-bin ones, PFENet.py:290-300) and, with CR,
    Eq. (5)'s lambda terms; out from PFENetHead, m_q (B,H,W), m_s (B*S,H,W)."""
    terms = {"main": common.seg_loss(out["query"], m_q),
             "aux": torch.stack([common.seg_loss(a, m_q) for a in out["aux"]]).mean()}
    return seg_terms(terms, terms["main"] + aux_weight * terms["aux"], out, m_q, m_s, sub_weight)


def check_config(cfg):
    """A Literal field's value among its choices; no field changed where it would change nothing (the other
    network's, or one of a module switched off); every number in its range, so that a bad value is one line here,
    not a traceback in training (or after it, in evaluation)."""
    other = PFENET_FIELDS if cfg.network == "crcnet" else CRCNET_FIELDS
    same = lambda value: tuple(value) if isinstance(value, list) else value  # noqa: E731 (as the default's type)
    changed = []
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if typing.get_origin(field.type) is Literal and value not in typing.get_args(field.type):
            raise ValueError(f"{field.name} must be one of {typing.get_args(field.type)}, got {value!r}")
        if field.name in other and field.default != same(value):
            changed.append(field.name)
    if changed:
        raise ValueError(f"{', '.join(changed)}: no part of network={cfg.network} (it would change nothing)")
    unread = {"mask_refinement": ("refine_steps",),  # a switch off -> the fields it leaves unread
              "cross_reference": ("cr_activation", "cr_reduction", "aspp_rates", "sub_weight"),
              "local_conditional": ("local_support_mask",)}
    for switch, names in unread.items():
        changed = [name for name in names if same(getattr(cfg, name)) != getattr(Config, name)]
        if not getattr(cfg, switch) and changed:
            raise ValueError(f"{', '.join(changed)}: no part of {switch}=false (it would change nothing)")
    if cfg.refine_steps < 1 or cfg.ft_steps < 0:
        raise ValueError(f"refine_steps must be >= 1 (the refinement predicts; 1 = no re-use of the cache) and "
                         f"ft_steps >= 0, got {cfg.refine_steps} and {cfg.ft_steps}")
    if cfg.gcn_kernel < 1 or cfg.gcn_kernel % 2 == 0:
        raise ValueError(f"gcn_kernel must be odd (its k x 1 and 1 x k convs keep the size), got {cfg.gcn_kernel}")
    if not 1 <= cfg.cr_reduction <= cfg.dim:
        raise ValueError(f"cr_reduction must be in 1..dim={cfg.dim} (the cross-reference FC is dim // cr_reduction "
                         f"wide), got {cfg.cr_reduction}")
    if not cfg.test_scales or not all(0 < scale < math.inf for scale in cfg.test_scales):
        raise ValueError(f"test_scales must be one or more finite scales above 0, got {tuple(cfg.test_scales)}")
    if not all(isinstance(rate, int) and rate >= 1 for rate in cfg.aspp_rates):
        raise ValueError(f"aspp_rates must be dilations >= 1 (§4.3's ASPP), got {tuple(cfg.aspp_rates)}")
    if not cfg.bins or not all(size > 0 for size in cfg.bins):  # none: FEM concatenates no scale
        raise ValueError(f"bins must be one or more FEM bins above 0 (a fraction of the map, or a size), got "
                         f"{tuple(cfg.bins)}")
    if not (cfg.ft_lr >= 0 and cfg.ft_momentum >= 0):  # NaN too
        raise ValueError(f"ft_lr and ft_momentum must be >= 0, got {cfg.ft_lr} and {cfg.ft_momentum}")
    levels = cfg.levels if isinstance(cfg.levels, (list, tuple)) else ()  # a bare name is refused too
    if not levels or len(set(levels)) < len(levels) or not set(levels) <= set(LEVELS):
        raise ValueError(f"levels must be distinct ones of {', '.join(LEVELS)}, got {cfg.levels!r}")


class Model(nn.Module):
    """CRCNet (network="crcnet") or PFENet [50] with CRCNet's modules (network="pfenet").

    forward(img_q, img_s, m_s, class_ids=None, m_q=None) -> {"logits" (B,2,H,W): log-probabilities of the query
    (CRCNet: averaged over the S pairs), "query": the head's query logits at h x w (CRCNet: per pair, (B*S,2,h,w);
    PFENet: (B,2,h,w)), and with m_q (B,H,W) (training) what only the loss reads: "support" (CRCNet, whose support
    branch is conditioned on it), "aux" (PFENet's FEM), "query_sub", "support_sub" (the cross-reference module's)}.
    infer() adds §4.6's test-time fine-tuning and §5.1's multi-scale inference."""
    query_mask_in_training = True  # train.py passes m_q in training (the loss's labels; CRCNet conditions on it)

    def __init__(self, cfg: Config):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        d, pfenet = cfg.dim, cfg.network == "pfenet"
        if pfenet:
            self.encoder = PFENetEncoder(cfg.backbone, cfg.pretrained, cfg.train_encoder, d, cfg.feature_dropout)
        else:
            self.encoder = SiameseEncoder(cfg.backbone, cfg.pretrained, cfg.train_encoder, cfg.levels, d)
        # the modules that the ablation tables switch (Tables 1, 3, 8, 12): None where a row removes one
        cross_reference = CrossReference(d, cfg.cr_reduction, cfg.cr_activation) if cfg.cross_reference else None
        co_occurrence = CoOccurrenceHead(d, cfg.aspp_rates) if cfg.cross_reference else None
        global_conditional = GlobalConditional(d) if cfg.global_conditional else None
        if pfenet:
            self.head = PFENetHead(cross_reference, co_occurrence, global_conditional, common.FEM(d, 1, cfg.bins))
        else:
            local_conditional = LocalConditional(d, cfg.local_support_mask) if cfg.local_conditional else None
            width = (cfg.global_conditional + cfg.local_conditional + 1) * d  # [global, local, G]
            refinement = MaskRefinement(width, d, cfg.gcn_kernel, cfg.refine_steps, cfg.mask_refinement)
            self.head = PairHead(cross_reference, co_occurrence, global_conditional, local_conditional, refinement)

    def forward(self, img_q, img_s, m_s, class_ids=None, m_q=None):
        return self._forward(img_q, img_s, m_s, m_q)

    def _forward(self, img_q, img_s, m_s, m_q=None, head_weights=None):
        B, S = img_s.shape[:2]
        if (m_s.shape != (B, S, *img_s.shape[-2:]) or img_q.shape[0] != B
                or m_q is not None and m_q.shape != (B, *img_q.shape[-2:])):
            raise ValueError(f"img_q {tuple(img_q.shape)}, img_s {tuple(img_s.shape)}, m_s {tuple(m_s.shape)} and "
                             f"m_q {None if m_q is None else tuple(m_q.shape)} do not describe the same episodes")
        # 1. the encoder: CRCNet's Siamese encoder (§4.2) on every (query, support) pair, or PFENet's features
        inputs = self.encoder.episode(img_q, img_s, m_s, m_q)
        # 2.-4. the head: cross-reference, conditional and refinement modules (Fig. 2), or PFENet's with them
        out = functional_call(self.head, head_weights, inputs) if head_weights else self.head(*inputs)
        # 5. K shots: CRCNet averages the query probabilities of its pairs (Table 4's fusion; S = 1 is the
        # identity); PFENet fused its shots in the prototype and the prior: one prediction per episode
        log_p = F.log_softmax(out["query"].float(), 1)
        log_p = log_p.view(B, -1, *log_p.shape[1:])  # (B, S or 1, 2, h, w)
        out["logits"] = common.resize(_log_mean_exp(log_p, 1), img_q.shape[-2:])  # (B, 2, H, W)
        return out

    def loss(self, out, m_q, m_s):
        needs = ["support" if self.cfg.network == "crcnet" else "aux"] + ["query_sub"] * self.cfg.cross_reference
        if any(key not in out for key in needs):
            raise ValueError(f"{self.cfg.network}'s loss reads {', '.join(needs)}: in training, forward needs m_q "
                             "(what only the loss reads is computed with it; CRCNet's support branch is conditioned "
                             "on it)")
        if self.cfg.network == "pfenet":
            return pfenet_loss(out, m_q, m_s.flatten(0, 1), self.cfg.aux_weight, self.cfg.sub_weight)
        return pair_loss(out, m_q.repeat_interleave(m_s.shape[1], 0), m_s.flatten(0, 1), self.cfg.sub_weight)

    def finetune(self, img_s, m_s):
        """§4.6 for one episode: img_s (S,3,H,W), m_s (S,H,W). Returns fine-tuned copies {name: tensor} of the
        head's parameters; the encoder is fixed (even when trained, cfg.train_encoder) and the module's own
        weights are never written."""
        cfg = self.cfg
        with torch.no_grad():
            supports = self.encoder.supports(img_s, m_s)  # computed once: the encoder is not tuned
        weights = {name: p.detach().clone().requires_grad_() for name, p in self.head.named_parameters()}
        optimizer = torch.optim.SGD(weights.values(), lr=cfg.ft_lr, momentum=cfg.ft_momentum)
        pairs = torch.Generator().manual_seed(FT_SEED)
        with torch.enable_grad():
            for _ in range(cfg.ft_steps):
                # support i plays the query, j the support, i != j: of the "at most k^2" pairs, the k of an image
                # with itself are left out, as they cannot teach the cross-reference anything about a second image
                i, j = torch.randperm(len(img_s), generator=pairs)[:2].tolist()
                out = functional_call(self.head, weights, self.encoder.pair(supports, i, j))
                loss, _ = self.loss(out, m_s[i:i + 1], m_s[None, j:j + 1])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return {name: w.detach() for name, w in weights.items()}

    def infer(self, img_q, img_s, m_s, class_ids=None):
        """Evaluation hook: K > 1 shots fine-tune per episode (cfg.kshot) and every prediction is the average
        over cfg.test_scales. Returns log-probabilities (B,2,H,W). Weights and train/eval mode are unchanged."""
        S = img_s.shape[1]
        if S == 1 or self.cfg.kshot == "fusion":
            return self._multi_scale(img_q, img_s, m_s, None)
        shots = slice(0, 1) if self.cfg.kshot == "finetune" else slice(None)
        return torch.cat([self._multi_scale(img_q[b:b + 1], img_s[b:b + 1, shots], m_s[b:b + 1, shots],
                                            self.finetune(img_s[b], m_s[b])) for b in range(len(img_q))])

    def _multi_scale(self, img_q, img_s, m_s, head_weights):
        """§5.1: both images resized by every scale, predictions resized back and their probabilities averaged."""
        H, W = img_q.shape[-2:]
        log_p = []
        for scale in self.cfg.test_scales:
            size = (max(1, round(H * scale)), max(1, round(W * scale)))  # a tiny scale: one pixel, not none
            q, s, m = img_q, img_s, m_s
            if size != (H, W):
                q = common.resize(img_q, size)
                s = common.resize(img_s.flatten(0, 1), size).view(*img_s.shape[:3], *size)
                m = common.resize(m_s.float(), size, mode="nearest").long()  # (B, S, h', w')
            logits = self._forward(q, s, m, head_weights=head_weights)["logits"]  # (B, 2, h', w')
            log_p.append(common.resize(logits, (H, W)))  # (B, 2, H, W)
        return _log_mean_exp(torch.stack(log_p), 0)
