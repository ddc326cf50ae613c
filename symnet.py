"""Sym-Net: Symmetrical Joint Learning Support-query Prototypes for Few-shot Segmentation.

Q. Li, B. Sun, F. Xiao, Y. Qi, B. Bhanu (2024; the paper names no venue). Official code:
github.com/Sunbaoquan/Sym-Net @ 448f312 ("SN" below: model/SymNet.py), built on BAM (github.com/chunbolang/BAM).

Sym-Net forms the prototype symmetrically from both sides of the episode. A parameter-free prior (SPM) finds
the query object by matching pooled regions, weighted by a self-activation kernel. It selects confident query
pixels for a query prototype, which is built exactly like the support one. Both prototypes are aligned with the
class's word vector by attention (APA), trained with a hard-mined co-triplet loss, and averaged. Correlations of
every backbone block (TDC) restore the spatial detail that pooling loses. PFENet's FEM decodes everything, and
BAM's ensemble with a base learner (a PSPNet head trained on the base classes) then suppresses base classes.

Paper -> code:
    §3.3 SPM, Eq. (1)-(3)              self_activation_prior
    §3.5 APA: Eq. (4)                  masked_average_pooling of the support (common.py)
              Eq. (5)                  prior_region_mean (the high-confidence query pixels)
              Eq. (6)-(8)              APA
              Eq. (9)                  Model.prototypes (stage 4)
    §3.6 co-triplet loss: Eq. (10), (11) prior_region_mean (background and ambiguous query pixels)
              Eq. (12)                 triplet_term, Model.co_triplet
    §3.7 TDC, Eq. (13)                 block_correlation, TDC
    §3.8 decoder, Eq. (14)-(15)        common.FEM; Model.loss
    §4.1 word2vec text embeddings      build_word_vectors (GoogleNews binary -> file), load_word_vectors
    §4.1 "PSPNet serves as the base learner", following [37], BAM (C. Lang, G. Cheng, B. Tu, J. Han, "Learning
         What Not to Segment", CVPR 2022; github.com/chunbolang/BAM, "BAM" below):
              PSPNet head: BAM model/PSPNet.py, model/PPM.py            BaseLearner
              scene difference: BAM model/BAM.py get_gram_matrix        gram_matrix, gram_distance
              classifier ensemble: BAM model/BAM.py                     BAMEnsemble; Model.forward, stage 7
              base-class images: BAM util/dataset.py (Pre-Training)     base_classes, BaseClassImages
              base training: BAM train_base.py, config/*_base.yaml      train_base_learner, the stage `base`
    side files (word vectors, base learner) and checkpoints            build, read_base_learner
    §4.3 ablations (--set FIELD=VALUE): Table 3 spm, apa, tdc; Table 4 tau3, tau4; Table 5 aggregation,
         co_triplet (its "Support" row is apa=false); Table 6 hyper_dim (N')
K shots: K priors, K support prototypes (each through APA) and K sets of correlations, averaged (Fig. 2); the
co-triplet support term is averaged over the shots. Each is computed for all shots at once (a shot axis, or the
B*S supports as one batch), not in a loop over the shots. Shots are averaged with equal weights (paper), not with
BAM's learned K-shot weights.

Choices (where the paper is silent we follow SN; differences from SN are said):
- Recipe as SN runs it (DEFAULTS, which says why): lr 0.05 (the paper's 0.005 x 10) and a global batch of 32
  (8 per GPU on 4 GPUs), 200 / 50 epochs, 473 / 641 px, PFENet's augmentation (§4.1). The base learner's stage
  takes BAM's base recipe (STAGE_DEFAULTS).
- Backbone: the shared frozen ImageNet ResNet (common.Backbone) and its post-ReLU block outputs for TDC; SN
  uses BAM's PSPNet-fine-tuned deep-stem ResNet and pre-ReLU blocks. VGG is refused: TDC needs bottlenecks.
- F^m (c = 256, §4.1): PFENet's cat(layer3, layer2) -> 1x1 conv, ReLU, Dropout2d(0.5), separate weights for
  query and support (SN down_query / down_supp); §4.1 names stage 3 alone.
- Masks on the feature grid: bilinear (align_corners, PFENet's), a soft mask where Eq. (4) writes an indicator;
  it is binary only when (H-1)/(h-1) is whole (473 and 641 px), not at the synthetic 128 px.
- SPM: support mask resized bilinearly, padded zeros counted by the pooling (SN). Eq. (2)'s omega_q = <r_q, r_q>
  is called "the L2-norm" in the text: we use the norm |r_q|, as SN. Mean_j cos(r_q, r_s_j)|r_q|
  = r_q . mean_j(r_s_j / |r_s_j|) gives the same prior (within eps) without the HW x HW matrix S_r.
- Empty regions (SN feat_aggregation): Eq. (5) falls back to the 12 highest-prior pixels (K-shot averaging or
  an empty support mask can leave none above tau1), Eq. (10) to the 12 lowest, Eq. (11) to the 12 around the
  median. Means via common.masked_average_pooling (area eps 5e-4, SN's Weighted_GAP for Eq. 4).
- APA as the paper: separate W^V, scores scaled by 1/sqrt(d), d = 256 (§4.1; §3.5 also calls the text width
  d, 300: the scale uses the prototype width c = 256); SN has V = K and an unscaled bilinear score. The
  undefined "FFN" is SN's Linear + Dropout(0.1). One APA serves both branches (SN).
- Word vectors: GoogleNews word2vec, unit length (as SN's rows); a name is its underscore-joined phrase if the
  binary has it, else the mean of its words; VOC's compound names use MIANet's words (WORD2VEC_ALIASES).
  Without --word-vectors, or without class_ids (--predict), the text input is zero: W^Q's text columns stay
  but read nothing (aggregation=support+query has none).
- Co-triplet: distances between L2-normalised vectors (SN; margin 0.5 assumes unit scale); the support
  negative is the mean background feature (paper; SN averages normalised ones); items without foreground or
  background have no support term (SN); L = support term + query term (SN).
- TDC: per block, the mask-weighted mean of ReLU(cos) (SN's mean over foreground pixels when the mask is
  binary); 1x1 convs to 16 channels, GroupNorm + ReLU after the 3x3 merges and a last 3x3 conv to N' (SN).
  Top-down (layer4 with layer3, then layer2) as the name, the text and SN; Eq. (13) with §4.1's N1..N3 reads
  bottom-up. Concatenation as Eq. (13); SN adds.
- bf16 autocast (train.py --bf16): convolutions, linear layers and the blocks' cosine matrices in bf16 (rounding
  no more than the bf16 features they read); float32 where bf16's 8 significant bits would lose the result: SPM,
  APA's logits and softmax, the blocks' norms and masked means, the query region means, the co-triplet
  distances, the scene difference and BAM's ensemble (each place says why).
- Loss: 2-class cross-entropy (= Eq. 14's BCE on the logit difference). With the base learner, BAM's CE on
  the meta learner's own output is added ("meta"), as SN.
- Base learner: --base-learner, else base_learner_path(setting) if that file exists (else, and on FSS-1000, which
  has no semantic labels, the meta learner alone, with one warning). Config.base_classes records its classes;
  checkpoints carry its weights and the word vectors. It trains on our frozen, shared backbone, its last epoch
  kept (train_base_learner says how BAM differs).
- SPM off (Table 3): no prior at all; FEM loses M^pri's channel. Not PFENet's cosine prior in its place: the
  table's note says APA, which reads the prior (Eq. 5, 7), cannot run without SPM, as it could with a stand-in.
- APA off (Table 3): FEM's prototype is the support's MAP (Eq. 4; the mean of the shots'), §4.3's baseline; no
  query prototype, word vector or co-triplet loss (APA gives its anchors): a changed co_triplet or aggregation is
  refused. It is Table 5's "Support" row too: both tables give it the same four folds.
- Table 5: support+word2vec drops the query branch (FEM takes p_s_aug; the co-triplet keeps its support term);
  support+query drops the word vector and W^Q's text columns. TDC off (Table 3): FEM loses F^hyper; with SPM off
  too, FEM reads no extra map at all.
- Left open by §4.3: every ablation row keeps BAM's base-learner ensemble (where a base learner exists), and
  Table 5's "Support & Query" keeps both co-triplet terms (it drops the word vector alone).
"""
import dataclasses
import mmap
import os
import sys
import warnings
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import common
import data

TEXT_DIM = 300  # word2vec GoogleNews vectors (§4.1)
QUERY_FALLBACK = 12  # pixels used when a prior region is empty (SN feat_aggregation: topk 12, median +- 6)
TDC_EPS = 1e-5  # SN correlation.py: feature norms + 1e-5


@dataclasses.dataclass
class Config:
    backbone: str = "resnet50"  # §4.1
    pretrained: bool = True
    word_vectors: str = None  # --word-vectors: file of build_word_vectors; None: no text branch
    base_learner: str = None  # --base-learner; None: base_learner_path(setting) if that file exists
    base_classes: tuple = None  # set by build: the base learner's class ids (its channels 1..n); None: none
    reduce_dim: int = 256  # c = d = 256 (§4.1)
    windows: tuple = ((5, 5), (7, 1), (1, 7))  # SPM pooling windows d_h x d_w (§4.1), odd sizes
    tau1: float = 0.7  # query prototype threshold (§4.1)
    tau2: float = 0.4  # query negative threshold (§4.1)
    tau3: float = 0.40  # ambiguous band, lower (§4.1, Table 4)
    tau4: float = 0.55  # ambiguous band, upper (§4.1, Table 4)
    margin: float = 0.5  # Eq. (12)
    alpha: float = 0.5  # Eq. (9), query side (§4.1)
    beta: float = 0.5  # Eq. (9), support side (§4.1)
    hyper_dim: int = 48  # N' (§4.1, Table 6)
    tdc_hidden: int = 16  # SN TDC hidden_dim
    mid_dropout: float = 0.5  # SN down_query / down_supp Dropout2d
    apa_dropout: float = 0.1  # SN APA dropout
    # the modules of Table 3 (off: Choices); APA needs SPM (the table's note)
    spm: bool = True  # SPM, §3.3
    apa: bool = True  # APA with its co-triplet loss, §3.4-3.6
    tdc: bool = True  # TDC, §3.7
    # Table 5's prototype aggregation methods ("Support" alone: apa=false) and its row without L_co-triplet
    aggregation: Literal["support+query+word2vec", "support+query", "support+word2vec"] = "support+query+word2vec"
    co_triplet: bool = True  # Eq. (12)


# SN's run: lr 0.05 is the paper's 0.005 (§4.1) x 10, as SN's poly_learning_rate multiplies every group's (its
# config: "base_lr: 0.005  # scale x 10"); the paper's "batch size of 8" is per process (SN's DataLoader under a
# DistributedSampler, train.sh on 4 GPUs, §4.1's four V100s): the run behind the tables took 32 episodes a step
DEFAULTS = {
    "pascal": dict(lr=0.05, batch_size=32, epochs=200, img_size=473, augment="pfenet"),
    "coco": dict(lr=0.05, batch_size=32, epochs=50, img_size=641, augment="pfenet"),
}


def add_args(parser):
    parser.add_argument("--word-vectors", help="class word vectors (.pt) from symnet.build_word_vectors; "
                                               "without them APA's text branch is off")
    parser.add_argument("--base-learner", help="base learner checkpoint: where --stage base writes it and Sym-Net "
                                               "reads it (default runs/base-DATASET-foldK-BACKBONE/base_learner.pt; "
                                               "without it Sym-Net is the meta learner alone)")


# ----------------------------------------------------------------------------------------------------------
# SPM, APA, co-triplet and TDC


def split_shots(x, S):
    """(B*S, ...) -> (B, S, ...): the support images of an episode were run through the backbone as one batch."""
    return x.view(-1, S, *x.shape[1:])


def self_activation_prior(f_q, f_s, m, windows):
    """SPM (§3.3): f_q (B,C,h,w), f_s (B,S,C,h,w) high-level (layer4) features, m (B,S,h,w) resized support
    masks. For each shot and window, the min-max normalised mean over support positions of cos(r_q, r_s) * |r_q|.
    These maps are averaged over the windows and the shots. Returns prior (B,1,h,w) in [0, 1]."""
    with torch.autocast(f_q.device.type, enabled=False):  # fp32, as common.cosine_prior: min-max amplifies rounding
        f_q, f_s = f_q.float(), f_s.float() * m.float()[:, :, None]  # (B,S,C,h,w): support background out
        B, S, C, h, w = f_s.shape
        maps = []
        for dh, dw in windows:
            # Eq. (1): r = AvgPool_{dh x dw}(F), padding keeping the size (padded zeros counted, as SN)
            r_q = F.avg_pool2d(f_q, (dh, dw), 1, (dh // 2, dw // 2)).flatten(2)  # (B, C, hw)
            r_s = F.avg_pool2d(f_s.flatten(0, 1), (dh, dw), 1, (dh // 2, dw // 2)).view(B, S, C, h * w)
            # Eq. (2)-(3): Mean_j cos(r_q, r_s_j) * |r_q| = r_q . mean_j (r_s_j / |r_s_j|), every shot at once
            direction = (r_s / (r_s.norm(dim=2, keepdim=True) + common.COSINE_EPS)).mean(3)  # (B, S, C)
            score = torch.einsum("bcn,bsc->bsn", r_q, direction)  # (B, S, hw)
            low, high = score.min(2, keepdim=True).values, score.max(2, keepdim=True).values
            maps.append((score - low) / (high - low + common.COSINE_EPS))  # Norm(.): the prior of each shot
        return torch.stack(maps).mean((0, 2)).view(B, 1, h, w)  # (B, 1, h, w)


def prior_region_mean(f, inside, prior, fallback):
    """Mean of f (B,C,h,w) over the pixels where `inside` (B,1,h,w) holds (Eq. 5, 10, 11). An image with no
    such pixel uses the QUERY_FALLBACK pixels of the `fallback` rank of the prior: "top", "median" or
    "bottom". Returns (B,C)."""
    order = prior.flatten(1).argsort(1)  # (B, hw) ascending
    n = order.shape[1]
    k = min(QUERY_FALLBACK, n)
    start = {"bottom": 0, "median": n // 2 - k // 2, "top": n - k}[fallback]
    ranked = torch.zeros_like(order, dtype=torch.float32).scatter_(1, order[:, start:start + k], 1.0).view_as(prior)
    empty = inside.flatten(1).sum(1) == 0  # (B,)
    region = torch.where(empty[:, None, None, None], ranked, inside.float())  # (B, 1, h, w)
    return common.masked_average_pooling(f.float(), region)  # (B, C); fp32: bf16 sums over many pixels are ~1% off


class APA(nn.Module):
    """Visual-text alignment (§3.5, Fig. 4): single-head attention whose query is the prototype concatenated
    with the word vector and whose keys / values are the mask- (support) or prior-weighted (query) features.
    forward(proto (B,c), text (B,d) or None when text_dim is 0 (Table 5: no word vector), f (B,c,h,w) weighted
    features) -> augmented prototype (B,c)."""

    def __init__(self, dim, text_dim, dropout):
        super().__init__()
        self.w_q = nn.Linear(dim + text_dim, dim, bias=False)  # W^Q in R^{(c+d) x c}
        self.w_k = nn.Conv2d(dim, dim, 1, bias=False)  # W^K, 1x1 conv
        self.w_v = nn.Conv2d(dim, dim, 1, bias=False)  # W^V, 1x1 conv
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))  # SN's "FFN": proj + dropout
        self.scale = dim ** -0.5  # 1/sqrt(d), d = 256 (§4.1)

    def forward(self, proto, text, f):
        f = f.flatten(2)  # (B, c, hw)
        # Eq. (6)-(7): Q = (p ⊕ t) W^Q, K = F~ W^K, V = F~ W^V, taken as Q K^T = (Q W^K^T) F~^T and A V = (A F~) W^V:
        # the same products, with W^K and W^V applied to one vector per item instead of to every pixel
        with torch.autocast(f.device.type, enabled=False):  # fp32: logits grow to hundreds, where bf16's step is 1-2
            q = self.w_q(proto.float() if text is None else torch.cat([proto.float(), text.float()], 1))  # (B, c)
            logits = torch.einsum("bc,bcn->bn", q @ self.w_k.weight.flatten(1), f.float()) * self.scale  # (B, hw)
            attention = torch.softmax(logits, dim=1)  # (B, hw)
        # Eq. (8): p_aug = FFN(Softmax(Q K^T / sqrt(d)) V) + p
        attended = torch.einsum("bn,bcn->bc", attention, f)  # (B, c): the attention-weighted F~
        return self.ffn(F.linear(attended, self.w_v.weight.flatten(1))) + proto  # (B, c)


def triplet_term(anchor, positive, negative, margin):
    """Eq. (12), one branch: max(|a - p+| + margin - |a - p-|, 0) on L2-normalised (..., c) vectors -> (...)."""
    a, p, n = (F.normalize(x.float(), dim=-1) for x in (anchor, positive, negative))  # fp32: |a - p| of unit vectors
    return F.relu(F.pairwise_distance(a, p) + margin - F.pairwise_distance(a, n))


def block_correlation(f_q, f_s, m):
    """One TDC channel: for every query pixel, the mean over the shots of the mask-weighted mean over the
    shot's support pixels of ReLU(cos). f_q (B,C,h,w), f_s (B,S,C,h,w) features of one block, m (B,S,h,w)
    support masks -> (B,1,h,w). The shots share one matrix of cosines (B, hw, S*hw)."""
    B, C, h, w = f_q.shape
    with torch.autocast(f_q.device.type, enabled=False):  # fp32: a bf16 norm scales a pixel's cosines by up to 0.4%
        q, s = f_q.flatten(2).float(), f_s.transpose(1, 2).flatten(2).float()  # (B, C, hw), (B, C, S*hw)
        q = q / (q.norm(dim=1, keepdim=True) + TDC_EPS)
        s = s / (s.norm(dim=1, keepdim=True) + TDC_EPS)
        # each shot's mask over its area, with the area eps of PFENet's prototype pooling (common.MAP_EPS), / S:
        # one product gives the mean over the shots of the mask-weighted means
        weights = m.flatten(2).float()  # (B, S, hw)
        weights = (weights / (weights.sum(2, keepdim=True) + common.MAP_EPS) / m.shape[1]).flatten(1)  # (B, S*hw)
    # the big product stays bf16 under autocast: it rounds no more than the bf16 block features it reads
    cos = torch.bmm(q.transpose(1, 2), s).clamp(min=0)  # (B, hw, S*hw)
    with torch.autocast(f_q.device.type, enabled=False):  # fp32: bf16's step near 0.5 (0.004) rivals the pixels' spread
        return torch.bmm(cos.float(), weights[:, :, None]).view(B, 1, h, w)  # (B, 1, h, w)


class TDC(nn.Module):
    """Top-down hyper-correlation (§3.7): the block correlations of layer2, layer3 and layer4 (F_corr3,
    F_corr2, F_corr1: N3 = 4, N2 = 6, N1 = 3 maps on ResNet-50) each reduced by a 1x1 conv, fused top-down.
    forward(corrs: [(B,N3,h,w), (B,N2,h,w), (B,N1,h,w)] for layer2, layer3, layer4) -> F^hyper (B,N',h,w)."""

    def __init__(self, counts, hidden, out_dim):
        super().__init__()
        self.reduce = nn.ModuleList(nn.Conv2d(n, hidden, 1) for n in counts)  # Conv1x1 per level
        self.merge_top = nn.Sequential(nn.Conv2d(2 * hidden, hidden, 3, padding=1), nn.GroupNorm(1, hidden),
                                       nn.ReLU(inplace=True))
        self.merge_out = nn.Sequential(nn.Conv2d(2 * hidden, hidden, 3, padding=1), nn.GroupNorm(1, hidden),
                                       nn.ReLU(inplace=True), nn.Conv2d(hidden, out_dim, 3, padding=1))

    def forward(self, corrs):
        c2, c3, c4 = (conv(c) for conv, c in zip(self.reduce, corrs))  # 3 x (B, hidden, h, w)
        # Eq. (13), top-down: F^hyper = Conv3x3(Cat[Conv3x3(Cat[layer4, layer3]), layer2])
        return self.merge_out(torch.cat([self.merge_top(torch.cat([c4, c3], 1)), c2], 1))  # (B, N', h, w)


# ----------------------------------------------------------------------------------------------------------
# BAM's base learner and ensemble (§4.1): a PSPNet head trained on the base classes (the stage `base`, below) and
# the ensemble that moves to the background whatever it recognises as a base class


PPM_BINS = (1, 2, 3, 6)  # PSPNet pyramid pooling bins (BAM model/PSPNet.py: bins=(1, 2, 3, 6))
PSP_HIDDEN = 512  # width of PSPNet's classifier (BAM model/PSPNet.py: cls, fea_dim*2 -> 512)
PSP_DROPOUT = 0.1  # PSPNet cls Dropout2d (BAM model/PSPNet.py)
GRAM_EPS = 1e-7  # BAM get_gram_matrix denominator (model/BAM.py)


class BaseLearner(nn.Module):
    """PSPNet's head (Zhao et al., CVPR 2017) as BAM's base learner (BAM model/PSPNet.py, model/PPM.py).

    Pyramid pooling: per bin b in (1, 2, 3, 6), adaptive average pooling to b x b, 1x1 conv to in_dim/4 (no
    bias), BN, ReLU, upsampled back; concatenated with the input (2*in_dim) -> 3x3 conv to 512 (no bias), BN,
    ReLU, Dropout2d(0.1), 1x1 conv to 1 + n classes. `classes` are the base class ids in channel order
    (channel i = classes[i-1]); a buffer, so that a checkpoint says which classes it knows.
    forward(f4 (B,in_dim,h,w) layer4 features) -> logits (B,1+n,h,w).
    freeze(): no gradients and always eval mode (BN statistics fixed), for use inside a meta learner.
    """

    def __init__(self, in_dim, classes):
        super().__init__()
        self.register_buffer("classes", torch.as_tensor(list(classes), dtype=torch.long))
        self.frozen = False
        dim = in_dim // len(PPM_BINS)
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_dim, dim, 1, bias=False), nn.BatchNorm2d(dim),
                          nn.ReLU(inplace=True)) for b in PPM_BINS)
        self.cls = nn.Sequential(nn.Conv2d(2 * in_dim, PSP_HIDDEN, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(PSP_HIDDEN), nn.ReLU(inplace=True), nn.Dropout2d(PSP_DROPOUT),
                                 nn.Conv2d(PSP_HIDDEN, 1 + len(self.classes), 1))

    def freeze(self):
        self.frozen = True
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode=True):
        return super().train(mode and not self.frozen)

    def forward(self, f4):
        pyramid = [F.interpolate(stage(f4), f4.shape[-2:], mode="bilinear", align_corners=True)
                   for stage in self.ppm]  # 4 x (B, in_dim/4, h, w)
        return self.cls(torch.cat([f4, *pyramid], 1))  # (B, 2*in_dim, h, w) -> (B, 1+n, h, w)


def gram_matrix(f):
    """BAM's get_gram_matrix: cosine similarity of every pair of channels. f (B,C,h,w) -> (B,C,C)."""
    x = f.flatten(2)  # (B, C, hw)
    norm = x.norm(dim=2, keepdim=True)  # (B, C, 1)
    return torch.bmm(x, x.transpose(1, 2)) / (torch.bmm(norm, norm.transpose(1, 2)) + GRAM_EPS)  # (B, C, C)


def gram_distance(f_q, f_s):
    """BAM's scene difference est_val = ||G(f_q) - G(f_s)||_F / ||1_CxC||_F (= C), in [0, 2].

    f_q (B,C,h,w) low-level (layer2) query features, f_s (B,S,C,h,w) support ones. Returns (B,): the mean over
    the shots (BAM weights the shots by a learned kshot_rw instead; Sym-Net's paper averages its K shots).
    In float32 even under bf16 autocast: a small difference of two near-equal C x C matrices (cf. cosine_prior)."""
    with torch.autocast(f_q.device.type, enabled=False):
        (B, S, C), g_q = f_s.shape[:3], gram_matrix(f_q.float())  # (B, C, C)
        g_s = gram_matrix(f_s.flatten(0, 1).float()).view(B, S, C, C)  # every shot at once
        return (g_q[:, None] - g_s).flatten(2).norm(dim=2).mean(1) / C  # (B,)


class BAMEnsemble(nn.Module):
    """BAM's classifier ensemble (model/BAM.py, "Classifier Ensemble"), from the meta learner's probabilities
    p = softmax(meta_logits) and the base learner's q = softmax(base_logits):
        bg = gram_merge([p_bg, est]), fg = gram_merge([p_fg, est])   1x1 conv 2 -> 1, initialised [1, 0]
        bg' = cls_merge([bg, base_map])                              1x1 conv 2 -> 1, initialised [1, 0]
    with base_map = the sum of q over the base-class channels and est = gram_distance(...). Returns [bg', fg]
    (B,2,h,w): scores that cross-entropy takes as logits, as in BAM. At initialisation bg' = p_bg, fg = p_fg.
    An episode whose class is one of `base_classes` (training) leaves its own channel out of base_map, or the
    base learner would push the very target to the background (BAM, cls_type 'Base'); at test the classes are
    novel and nothing is left out. class_ids None (e.g. --predict): nothing is left out.
    forward(meta_logits (B,2,h,w), base_logits (B,1+n,h,w), est (B,), base_classes (n,), class_ids (B,) or None)
    """

    def __init__(self):
        super().__init__()
        self.gram_merge = nn.Conv2d(2, 1, 1, bias=False)
        self.cls_merge = nn.Conv2d(2, 1, 1, bias=False)
        with torch.no_grad():
            for conv in (self.gram_merge, self.cls_merge):
                conv.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))

    def forward(self, meta_logits, base_logits, est, base_classes, class_ids=None):
        with torch.autocast(meta_logits.device.type, enabled=False):  # fp32: bf16 probabilities move in steps of 0.004
            p, q = meta_logits.float().softmax(1), base_logits.float().softmax(1)  # (B, 2, h, w), (B, 1+n, h, w)
            keep = torch.ones_like(q[:, 1:, 0, 0])  # (B, n)
            if class_ids is not None:
                keep = (base_classes[None] != class_ids.view(-1, 1)).float()  # (B, n)
            base_map = (q[:, 1:] * keep[:, :, None, None]).sum(1, keepdim=True)  # (B, 1, h, w)
            est_map = est.float().view(-1, 1, 1, 1).expand_as(base_map)  # (B, 1, h, w)
            bg = self.gram_merge(torch.cat([p[:, :1], est_map], 1))  # (B, 1, h, w)
            fg = self.gram_merge(torch.cat([p[:, 1:], est_map], 1))
            return torch.cat([self.cls_merge(torch.cat([bg, base_map], 1)), fg], 1)  # (B, 2, h, w)


# ----------------------------------------------------------------------------------------------------------
# Sym-Net


def odd_window(window):
    """An SPM window (d_h, d_w): two odd positive ints, so that avg_pool2d's padding d // 2 keeps the size."""
    return isinstance(window, tuple) and len(window) == 2 and all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 and d % 2 == 1 for d in window)


def reads_text(cfg):
    """Whether APA reads the class word vectors: APA on and a Table 5 aggregation with word2vec."""
    return cfg.apa and "word2vec" in cfg.aggregation


class Model(nn.Module):
    """Sym-Net (Fig. 2) as the meta learner, with BAM's base learner ensemble when cfg.base_classes names one.

    Model(cfg, setting, text=None, base_state=None), made by build(cfg, setting), which reads the side files.
    text: the (num_classes+1, 300) word-vector table of load_word_vectors, rows by class id; a buffer, so that
    checkpoints carry it. It exists when APA reads word vectors and cfg.word_vectors names them: None then means
    a checkpoint's rows are to be loaded, into zeros of setting.num_classes + 1 rows. The base learner and the
    ensemble exist when cfg.base_classes names the base learner's classes: base_state, the base stage's file
    (read_base_learner), fills the base learner, and its backbone_buffers (random weights) become the
    backbone's BatchNorm statistics (backbone.calibrated); without base_state, a checkpoint fills them.
    The ablation switches of Tables 3 and 5 (Config) leave out the modules they switch off.
    forward(img_q (B,3,H,W), img_s (B,S,3,H,W), m_s (B,S,H,W), class_ids (B,) or None) -> {"logits" (B,2,H,W),
    "meta" (B,2,h,w) FEM output, "aux" [4 x (B,2,b,b)] ([] in eval), "triplet" () (0 in eval and with the loss off),
    "prior" (B,1,h,w) (None with SPM off)}."""

    def __init__(self, cfg: Config, setting: common.Setting, text=None, base_state=None):
        super().__init__()
        if not cfg.backbone.startswith("resnet"):
            raise ValueError(f"Sym-Net's TDC correlates every bottleneck block: it needs a ResNet, not {cfg.backbone}")
        if cfg.apa and not cfg.spm:
            raise ValueError("APA reads SPM's prior (Eq. 5, 7; Table 3's note): spm=false needs apa=false")
        if not cfg.tau3 < cfg.tau4:
            raise ValueError(f"Eq. (11)'s band needs tau3 < tau4, got {cfg.tau3}, {cfg.tau4}")
        if not (isinstance(cfg.windows, tuple) and cfg.windows and all(map(odd_window, cfg.windows))):
            raise ValueError(f"windows: SPM's pooling windows, a non-empty tuple of pairs (d_h, d_w) of odd positive "
                             f"ints (padding d // 2 keeps the size), e.g. windows=((5,5),(7,1)); got {cfg.windows!r}")
        if cfg.tdc and not (cfg.hyper_dim >= 1 and cfg.tdc_hidden >= 1):
            raise ValueError(f"TDC's channels: hyper_dim (N') and tdc_hidden must be >= 1, got {cfg.hyper_dim} and "
                             f"{cfg.tdc_hidden}")
        if cfg.reduce_dim < 1:
            raise ValueError(f"reduce_dim must be >= 1, got {cfg.reduce_dim}")
        # APA makes the prototypes Table 5 aggregates and the co-triplet loss's anchors; TDC has the N' channels
        for switch, names in (("apa", ("aggregation", "co_triplet")), ("tdc", ("hyper_dim", "tdc_hidden"))):
            changed = [f"{f.name}={str(getattr(cfg, f.name)).lower()}" for f in dataclasses.fields(Config)
                       if f.name in names and getattr(cfg, f.name) != f.default]
            if not getattr(cfg, switch) and changed:
                raise ValueError(f"{', '.join(changed)}: no part of {switch}=false (it would change nothing)")
        if base_state is not None and cfg.base_classes is None:
            raise ValueError("a base learner's weights were given, but cfg.base_classes names no base learner")
        self.cfg = cfg
        self.backbone = common.Backbone(cfg.backbone, pretrained=cfg.pretrained)
        ch, c = self.backbone.channels, cfg.reduce_dim
        self.blocks = [len(self.backbone.stages[name]) for name in common.BLOCK_STAGES]  # [4, 6, 3] ResNet-50
        self.down_query, self.down_supp = (common.MidLevelReduction(ch["layer3"] + ch["layer2"], c, cfg.mid_dropout)
                                           for _ in range(2))
        text_on = reads_text(cfg)
        self.apa = APA(c, TEXT_DIM if text_on else 0, cfg.apa_dropout) if cfg.apa else None
        self.tdc = TDC(self.blocks, cfg.tdc_hidden, cfg.hyper_dim) if cfg.tdc else None
        extra = cfg.hyper_dim * cfg.tdc + cfg.spm  # FEM's extra maps: [F^hyper, M^pri], as far as they are on
        self.fem = common.FEM(c, extra_dim=extra)
        if text_on and text is None and cfg.word_vectors:  # a checkpoint's rows, loaded after this
            if setting.num_classes is None:
                raise ValueError("Sym-Net's word-vector table has a row per class: setting.num_classes is needed")
            text = torch.zeros(setting.num_classes + 1, TEXT_DIM)
        self.register_buffer("text", text if text_on else None)  # row c: class c's word vector
        self.base_learner = self.ensemble = None
        if cfg.base_classes is not None:
            self.base_learner = BaseLearner(ch["layer4"], cfg.base_classes).freeze()
            self.ensemble = BAMEnsemble()
        if base_state is not None:
            self.base_learner.load_state_dict(base_state["model"])
            if "backbone_buffers" in base_state:  # random weights: the BN statistics the base learner learned on
                self.backbone.load_state_dict(base_state["backbone_buffers"], strict=False)
                self.backbone.calibrated = True

    def prototypes(self, f_q, f_s, m, prior, class_ids):
        """Stage 4: FEM's prototype and the anchors of the co-triplet loss (None for a branch that is off).
        f_q (B,c,h,w), f_s (B,S,c,h,w), m (B,S,h,w), prior (B,1,h,w) -> proto, p_q_aug, p_s_aug, each (B,c)."""
        cfg, (B, S) = self.cfg, f_s.shape[:2]
        p_s = common.masked_average_pooling(f_s.flatten(0, 1), m.flatten(0, 1))  # Eq. (4), the B*S shots: (B*S, c)
        if self.apa is None:  # APA off (Table 3): MAP's support prototype, the mean of the shots'
            return p_s.view(B, S, -1).mean(1), None, None
        text = None
        if reads_text(cfg):  # t (Eq. 6): zero without word vectors or class ids (Choices)
            known = self.text is not None and class_ids is not None
            text = self.text[class_ids] if known else torch.zeros(B, TEXT_DIM, device=f_q.device)  # (B, d)
        # APA per shot (the B*S supports as one batch), then the mean of the shots
        p_s_aug = self.apa(p_s, None if text is None else text.repeat_interleave(S, 0),
                           (f_s * m[:, :, None]).flatten(0, 1))  # (B*S, c)
        p_s_aug = p_s_aug.view(B, S, -1).mean(1)  # (B, c)
        if "query" not in cfg.aggregation:  # Table 5, "Support & Word2Vec": no query branch
            return p_s_aug, None, p_s_aug
        p_q = prior_region_mean(f_q, prior > cfg.tau1, prior, "top")  # Eq. (5)
        p_q_aug = self.apa(p_q, text, f_q * prior.to(f_q.dtype))  # (B, c)
        # Eq. (9): p_hybrid = alpha p_q_aug + beta p_s_aug
        return cfg.alpha * p_q_aug + cfg.beta * p_s_aug, p_q_aug, p_s_aug

    def co_triplet(self, f_q, f_s, m_s, prior, p_q_aug, p_s_aug):
        """Eq. (10)-(12) (training only): f_q (B,c,h,w), f_s (B,S,c,h,w), m_s (B,S,H,W) labels, prior
        (B,1,h,w), anchors p_q_aug (None: no query branch, no query term), p_s_aug (B,c). Returns the scalar
        L_co-triplet."""
        cfg = self.cfg
        loss_q = 0
        if p_q_aug is not None:  # Eq. (10), (11): query negative (prior < tau2) and hard positive (tau3 < prior < tau4)
            p_q_neg = prior_region_mean(f_q, prior < cfg.tau2, prior, "bottom")  # (B, c)
            p_q_pos = prior_region_mean(f_q, (prior > cfg.tau3) & (prior < cfg.tau4), prior, "median")  # (B, c)
            loss_q = triplet_term(p_q_aug, p_q_pos, p_q_neg, cfg.margin).mean()  # Eq. (12), query branch
        # support, per shot (all shots at once): the foreground pixel farthest from the anchor, the mean background
        fg = common.foreground_at(m_s, f_s.shape[-2:], mode="nearest")  # (B, S, h, w)
        bg = 1 - fg  # (B, S, h, w): 255 counts as background, as in SN and in the rest of this file
        pixels = f_s.flatten(3)  # (B, S, c, hw)
        anchor = F.normalize(p_s_aug.float(), dim=1)[:, None, :, None]  # (B, 1, c, 1)
        dist = (F.normalize(pixels.float(), dim=2) - anchor).norm(dim=2)  # (B, S, hw)
        hardest = dist.masked_fill(fg.flatten(2) == 0, -1).argmax(2)  # (B, S)
        p_s_pos = pixels.gather(3, hardest[:, :, None, None].expand(-1, -1, pixels.shape[2], 1))[..., 0]  # (B, S, c)
        p_s_neg = common.masked_average_pooling(f_s.flatten(0, 1), bg.flatten(0, 1)).view_as(p_s_pos)  # (B, S, c)
        valid = ((fg.sum((2, 3)) > 0) & (bg.sum((2, 3)) > 0)).float()  # (B, S)
        terms = triplet_term(p_s_aug[:, None].expand_as(p_s_pos), p_s_pos, p_s_neg, cfg.margin)  # Eq. 12: (B, S)
        loss_s = (terms * valid).sum(0) / valid.sum(0).clamp(min=1)  # (S,): per shot, the mean over valid items
        return loss_q + loss_s.mean()

    def forward(self, img_q, img_s, m_s, class_ids=None):
        cfg, (B, S), (H, W) = self.cfg, img_s.shape[:2], img_q.shape[-2:]
        # 1. frozen backbone: layer2-4 of query and supports, and every bottleneck block's output for TDC
        feats_q, feats_s = self.backbone.episode(img_q, img_s, blocks=self.tdc is not None)  # (B, ...), (B*S, ...)
        # 2. mid-level features F^m and the resized support masks
        f_q = self.down_query(feats_q)  # (B, c, h, w)
        f_s = split_shots(self.down_supp(feats_s), S)  # (B, S, c, h, w)
        m = common.foreground_at(m_s, f_q.shape[-2:])  # (B, S, h, w)
        # 3. SPM: the prior mask M^pri (Eq. 1-3)
        prior = None
        if cfg.spm:
            prior = self_activation_prior(feats_q["layer4"], split_shots(feats_s["layer4"], S), m, cfg.windows)
        # 4. APA: symmetrical prototypes aligned with the word vector (Eq. 4-9)
        proto, p_q_aug, p_s_aug = self.prototypes(f_q, f_s, m, prior, class_ids)  # (B, c)
        # 5. TDC: block correlations per stage, averaged over shots, fused top-down (Eq. 13)
        hyper = None
        if self.tdc is not None:
            blocks_q, blocks_s = feats_q["blocks"], [split_shots(x, S) for x in feats_s["blocks"]]
            corr = [block_correlation(q, s, m) for q, s in zip(blocks_q, blocks_s)]  # 13 x (B, 1, h, w)
            stages = [sum(self.blocks[:i]) for i in range(len(self.blocks) + 1)]  # [0, 4, 10, 13]: stage boundaries
            hyper = self.tdc([torch.cat(corr[a:b], 1) for a, b in zip(stages[:-1], stages[1:])])  # (B, N', h, w)
        # 6. FEM decoder on query features, the prototype, hyper-correlation and prior
        maps = [x.to(f_q.dtype) for x in (hyper, prior) if x is not None]
        meta, aux = self.fem(f_q, proto, torch.cat(maps, 1) if maps else None, aux=self.training)  # (B, 2, h, w)
        # 7. BAM's ensemble with the base learner, when there is one
        logits = meta
        if self.ensemble is not None:
            with torch.no_grad():
                base = self.base_learner(feats_q["layer4"])  # (B, 1+n, h, w)
                est = gram_distance(feats_q["layer2"], split_shots(feats_s["layer2"], S))  # (B,)
            logits = self.ensemble(meta, base, est, self.base_learner.classes, class_ids)  # (B, 2, h, w)
        # 8. co-triplet loss (Eq. 10-12), training only, on APA's anchors
        triplet = meta.new_zeros(())
        if self.training and self.apa is not None and cfg.co_triplet:
            triplet = self.co_triplet(f_q, f_s, m_s, prior, p_q_aug, p_s_aug)
        logits = F.interpolate(logits, (H, W), mode="bilinear", align_corners=True)  # (B, 2, H, W)
        return {"logits": logits, "meta": meta, "aux": aux, "triplet": triplet, "prior": prior}

    def loss(self, out, m_q, m_s):
        """Eq. (15): L = L_co-triplet (where APA and Table 5 keep it) + L_inter-seg (mean of the 4 FEM scales) +
        L_final-seg, plus "meta" (CE on the meta learner's own output) when the ensemble gives the final output
        (BAM, SN)."""
        # Eq. (14): each L_seg is BCE, here 2-class cross-entropy (the same on the logit difference)
        terms = {"final": common.seg_loss(out["logits"], m_q)}
        if out["aux"]:  # FEM's auxiliary logits, which an evaluation forward does not compute
            terms["inter"] = torch.stack([common.seg_loss(a, m_q) for a in out["aux"]]).mean()
        if self.apa is not None and self.cfg.co_triplet:
            terms["triplet"] = out["triplet"]
        if self.ensemble is not None:
            terms["meta"] = common.seg_loss(out["meta"], m_q)
        return sum(terms.values()), terms


def build(cfg, setting):
    """Sym-Net for a run (train.construct): reads the word vectors (cfg.word_vectors) and the base learner
    (read_base_learner), records the base learner's classes in the model's Config (cfg.base_classes; None
    without one) and hands both to Model. A named file that does not exist, or that does not fit the run:
    WeightsUnavailableError, before anything is built. With setting.from_checkpoint no file is read: the checkpoint
    holds the word vectors and the base learner, and its Config says whether it has one."""
    text = base_state = None
    if not setting.from_checkpoint:
        named = {"--word-vectors": cfg.word_vectors, "--base-learner": cfg.base_learner}
        missing = [f"{flag} {path}" for flag, path in named.items() if path and not Path(path).is_file()]
        if missing:
            raise common.WeightsUnavailableError(f"no such file: {', '.join(missing)}")
        if cfg.word_vectors and reads_text(cfg):
            text = load_word_vectors(cfg.word_vectors, setting.dataset, root=setting.data_root)
        base_state = read_base_learner(cfg, setting)
        cfg = dataclasses.replace(cfg, base_classes=None if base_state is None else tuple(base_state["classes"]))
        if cfg.word_vectors and not reads_text(cfg):
            warnings.warn(f"--word-vectors unused: Sym-Net with apa={str(cfg.apa).lower()}, aggregation="
                          f"{cfg.aggregation} reads no word vector")
        elif reads_text(cfg) and not cfg.word_vectors:
            warnings.warn("Sym-Net without --word-vectors: APA's text branch is off, its input zero (Table 5's "
                          "'Support & Query' row: --set aggregation=support+query)")
    return Model(cfg, setting, text, base_state)


# ----------------------------------------------------------------------------------------------------------
# The side files, read in one place: the word vectors and the base learner


def read_side_file(path, what, keys):
    """A side file as a dict holding `keys` (common.read_torch_file); a file that is not one:
    WeightsUnavailableError naming it and `what` it should be."""
    state = common.read_torch_file(path, f"{path} as {what}")
    missing = [] if isinstance(state, dict) else ["a dict"]
    missing += [key for key in keys if isinstance(state, dict) and key not in state]
    if missing:
        raise common.WeightsUnavailableError(f"{path} is not {what}: it lacks {', '.join(missing)}")
    return state


def load_word_vectors(path, dataset, dim=TEXT_DIM, root=None):
    """Rows for the class ids of `dataset` (a folder dataset's: of its `root`) from a build_word_vectors file
    -> (num_classes+1, dim), row 0 zero. A file without some of the classes: WeightsUnavailableError."""
    vectors = read_side_file(path, "word vectors (symnet.build_word_vectors)", ())
    names = data.class_names(dataset, root)
    missing = [name for name in names.values() if name not in vectors]
    if missing:
        raise common.WeightsUnavailableError(f"the word vectors {path} lack the {dataset} classes {missing}")
    table = torch.zeros(len(names) + 1, dim)
    for c, name in names.items():
        table[c] = vectors[name]
    return table


def read_base_learner(cfg, setting):
    """The base stage's file for this run (train_base_learner writes it): cfg.base_learner, else
    base_learner_path(setting); None, with one warning, when the default file does not exist or the dataset is
    FSS-1000 (no base learner can be trained for it). A file that is not finished, or made for another backbone,
    other classes or images (another dataset or split), or the other kind of backbone weights (random or not), or
    one named on FSS-1000: WeightsUnavailableError."""
    if setting.dataset == "fss1000":  # a mask per image of its one class: no semantic labels to train one on
        why = "BAM's base learner trains on semantic labels of every base class, which FSS-1000 does not have"
        if cfg.base_learner:
            raise common.WeightsUnavailableError(f"--base-learner {cfg.base_learner}: {why}; drop the flag (Sym-Net "
                                                 "runs there as the meta learner alone)")
        warnings.warn(f"Sym-Net on FSS-1000 runs as the meta learner alone: {why}")
        return None
    path = Path(cfg.base_learner or base_learner_path(setting))
    command = (f"python train.py --model symnet --stage base --dataset {setting.dataset} --fold {setting.fold}"
               + (f" --coco-split {setting.coco_split}" if setting.dataset == "coco" else ""))
    if not path.is_file():
        warnings.warn(f"no base learner at {path}: Sym-Net runs as the meta learner alone (train one with: {command})")
        return None
    state = read_side_file(path, "a base learner (python train.py --model symnet --stage base)",
                           ("model", "classes", "backbone"))
    if state.get("epoch", 0) < state.get("epochs", 0):
        raise common.WeightsUnavailableError(f"base learner {path} stopped after epoch {state['epoch']} of "
                                             f"{state['epochs']}: finish it with {command} --resume")
    expected = base_classes(setting)
    if not isinstance(state["classes"], (list, tuple)):
        raise common.WeightsUnavailableError(f"base learner {path} is not a file of --stage base (its classes: "
                                             f"{state['classes']!r})")
    if state["backbone"] != cfg.backbone or list(state["classes"]) != expected:
        raise common.WeightsUnavailableError(
            f"base learner {path} was trained for {state['backbone']}, classes {state['classes']}; this model "
            f"needs {cfg.backbone}, classes {expected}")
    seen, own = state.get("images"), base_images(setting)
    if seen is not None and (seen.get("dataset"), seen.get("coco_split")) != (own["dataset"], own["coco_split"]):
        raise common.WeightsUnavailableError(f"base learner {path} was trained on {seen['dataset']} ({seen}); this "
                                             f"run is on {own['dataset']} ({own})")
    random = "backbone_buffers" in state  # saved with the random backbone's BatchNorm statistics
    if random == bool(cfg.pretrained):
        kinds = {True: "random (--no-pretrained)", False: "ImageNet (or --backbone-weights)"}
        raise common.WeightsUnavailableError(
            f"base learner {path} was trained on {kinds[random]} backbone weights; this model uses "
            f"{kinds[not cfg.pretrained]} ones")
    return state


def base_classes(setting):
    """Base (training) class ids of the run's fold, in the base learner's channel order 1..n (channel 0:
    background). A folder dataset's come from its root, with setting.test_classes in place of the fold when given."""
    count, _, novel = data.dataset_classes(setting.dataset, setting.fold, setting.data_root, setting.test_classes,
                                           setting.coco_split)
    return [c for c in range(1, count + 1) if c not in novel]


def base_learner_path(setting):
    """Where --stage base writes the base learner and where Sym-Net looks for it by default: one file for each
    split (COCO's two included) and backbone."""
    split = data.split_name(setting.dataset, setting.fold, setting.data_root, setting.test_classes, setting.coco_split)
    return Path(common.RUNS_DIR) / f"base-{split}-{setting.backbone}" / "base_learner.pt"


def base_images(setting):
    """What decides the base learner's training images, as its file records it (read_base_learner compares)."""
    return {"dataset": setting.dataset, "fold": setting.fold, "coco_split": setting.coco_split,
            "test_classes": list(setting.test_classes) if setting.test_classes else None}


# ----------------------------------------------------------------------------------------------------------
# Made once before training: the word vectors (build_word_vectors) and the base learner (--stage base)


# VOC's compound class names -> the words of MIANet's embeddings/pascal.txt (SN ships MIANet's vectors)
WORD2VEC_ALIASES = {"diningtable": "table", "pottedplant": "potted plant", "tvmonitor": "tv"}


def read_word2vec(path, words):
    """{word: float32 vector} for the `words` present in a word2vec C binary (header "COUNT DIM\\n", then per
    entry the word, a space, DIM little-endian float32, and an optional newline), read with numpy alone."""
    wanted, found = {w.encode(): w for w in words}, {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        end = mm.find(b"\n")
        count, dim = map(int, mm[:end].split())
        pos = end + 1
        for _ in range(count):
            space = mm.find(b" ", pos)
            word = mm[pos:space].lstrip(b"\n")
            pos = space + 1 + 4 * dim
            if word in wanted:
                found[wanted[word]] = np.frombuffer(mm[space + 1:pos], dtype="<f4").copy()  # (dim,)
    return found


def build_word_vectors(word2vec_bin, out_path, names=None):
    """Write {class name: unit-length vector} for the class names of PASCAL, COCO and synthetic (or `names`).
    A name is looked up (after WORD2VEC_ALIASES) as its underscore-joined phrase, else as the mean of its
    words; names with no word in the binary are left out, with a warning. Returns the dict."""
    names = names or sorted({n for ds in ("pascal", "coco", "synthetic") for n in data.class_names(ds).values()})
    keys = {name: WORD2VEC_ALIASES.get(name, name) for name in names}
    words = {w for key in keys.values() for w in [key.replace(" ", "_"), *key.split()]}
    found = read_word2vec(word2vec_bin, words)
    vectors, missing = {}, []
    for name, key in keys.items():
        parts = [found[w] for w in key.split() if w in found]
        vec = found.get(key.replace(" ", "_"), np.mean(parts, 0) if parts else None)
        if vec is None:
            missing.append(name)
            continue
        vectors[name] = torch.from_numpy(vec / np.linalg.norm(vec)).float()  # (300,)
    if missing:
        warnings.warn(f"no word of these class names is in {word2vec_bin}: {missing}")
    torch.save(vectors, out_path)
    return vectors


BASE_SCALE_RANGE = (0.5, 2.0)  # BAM config/*_base.yaml scale_min / scale_max (episodic training: 0.9-1.1)
BASE_MOMENTUM, BASE_WEIGHT_DECAY, BASE_POLY_POWER = 0.9, 1e-4, 0.9  # BAM config/*_base.yaml
STAGE_DEFAULTS = {"base": {  # BAM config/*_base.yaml: batch 3 x 4 GPUs ("bs12 for 1GPU"), head lr 2.5e-4 x 10
    "pascal": dict(lr=0.0025, batch_size=12, epochs=100, img_size=417),
    "folder": dict(lr=0.0025, batch_size=12, epochs=100, img_size=417),  # PASCAL's
    "coco": dict(lr=0.0025, batch_size=12, epochs=20, img_size=417),
}}


def train_base_learner(setting, schedule, options):
    """The stage `base`: BaseLearner on the frozen backbone, trained on the fold's base classes.

    python train.py --model symnet --stage base --fold K [--dataset D --data-root R]
    setting (common.Setting): the dataset, fold (or test classes), COCO split, crop size, backbone and its weights.
    schedule (common.Schedule): epochs, batch size, lr, train_length (synthetic), workers, seed, log_every, bf16;
    train.py fills it from STAGE_DEFAULTS["base"] (BAM's base recipe) where no flag is given. options: Sym-Net's
    flags, options["base_learner"] the file to write (None: base_learner_path(setting)).
    SGD (momentum 0.9, weight decay 1e-4) with the poly schedule per iteration, as BAM's train_base.py, on the
    head only (BAM also fine-tunes the backbone at a tenth of the rate; ours stays frozen and shared). The last
    epoch's weights are kept, as the harness does for every model: BAM validates every epoch on the test images
    (base-class labels), keeps the best and stops after 75 epochs without improvement. One process. Writes
    base_file(setting, options) after every epoch: {model, optimizer, epoch, epochs, recipe, classes, backbone,
    images} (with random backbone weights also backbone_buffers, the BatchNorm statistics estimated here, which the
    meta learner's backbone, the same random weights by the same seed, then takes instead of estimating its own),
    and its log NAME_metrics.jsonl beside it; schedule.resume continues the file with the recipe it was made with.
    Returns its path.
    """
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        sys.exit("error: --stage base runs in one process: start it with python, not torchrun")
    if setting.dataset == "fss1000":  # a mask per image of its one class: no semantic labels of the base classes
        sys.exit("error: --stage base trains on semantic labels of every base class, which FSS-1000 does not have; "
                 "Sym-Net runs there as the meta learner alone")
    if schedule.batch_size < 2:  # the pyramid's 1x1 bin leaves BatchNorm one value per channel
        sys.exit(f"error: --stage base needs --batch-size >= 2 (BAM uses 12), got {schedule.batch_size}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = base_file(setting, options)
    log_file = path.with_name(f"{path.stem}_metrics.jsonl")
    recipe = {"lr": schedule.lr, "batch_size": schedule.batch_size, "epochs": schedule.epochs,
              "img_size": setting.img_size, "seed": schedule.seed, "train_length": schedule.train_length}
    torch.manual_seed(schedule.seed)  # before the backbone, as train.py: random weights equal the meta learner's
    backbone = common.Backbone(setting.backbone, pretrained=setting.pretrained).to(device)
    try:
        images = BaseClassImages(setting, schedule.seed, schedule.train_length)
    except FileNotFoundError as err:  # a missing or incomplete data root: the message names the layout
        sys.exit(f"error: {err}")
    resumed = read_side_file(path, "a base learner (--stage base)", ("model", "optimizer", "epoch", "recipe")) if (
        schedule.resume and path.is_file()) else None
    if resumed is not None and resumed["recipe"] != recipe:
        differ = ", ".join(f"{k} {resumed['recipe'].get(k)} (now {v})" for k, v in recipe.items()
                           if resumed["recipe"].get(k) != v)
        raise common.WeightsUnavailableError(f"--resume: {path} was made with {differ}: a resumed stage keeps its "
                                             "recipe; drop the flags, or --overwrite to start it again")
    if resumed is not None and "backbone_buffers" in resumed:  # the statistics it trained on, not new ones
        backbone.load_state_dict(resumed["backbone_buffers"], strict=False)
    elif backbone.needs_statistics:  # as train.py does for the meta learner's backbone
        count = min(common.CALIBRATION_IMAGES, len(images))
        backbone.calibrate(torch.stack([images[(0, i)][0] for i in range(count)]).to(device))
    learner = BaseLearner(backbone.channels["layer4"], images.classes).to(device)
    optimizer = torch.optim.SGD(learner.parameters(), schedule.lr, BASE_MOMENTUM, weight_decay=BASE_WEIGHT_DECAY,
                                fused=True)
    start = 0
    if resumed is not None:
        learner.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        start = resumed["epoch"]
        common.cut_log(log_file, start)
    steps = len(images) // schedule.batch_size
    if steps == 0:
        sys.exit(f"error: {len(images)} base-class images do not fill one batch of {schedule.batch_size}")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if schedule.bf16 and device.type == "cuda" else nullcontext()
    print(f"[base] {len(images)} images of base classes {images.classes}, epochs {start + 1}..{schedule.epochs} of "
          f"{steps} steps of {schedule.batch_size}, lr {schedule.lr}, {device} -> {path}", flush=True)

    def batches(epoch):
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(schedule.seed * 100003 + epoch))
        keys = [(epoch, i) for i in order[:steps * schedule.batch_size].tolist()]
        torch.manual_seed(schedule.seed * 100003 + epoch * 101)  # dropout: the same, resumed or not
        learner.train()
        return DataLoader(images, batch_size=schedule.batch_size, sampler=keys, num_workers=schedule.workers,
                          pin_memory=device.type == "cuda")

    def step(batch):
        img, label = (x.to(device, non_blocking=True) for x in batch)  # (B,3,H,W), (B,H,W)
        with amp:
            logits = learner(backbone(img)["layer4"])  # (B, 1+n, h, w)
            loss = common.seg_loss(logits, label)
        valid = label != common.IGNORE_INDEX
        scores = F.interpolate(logits.detach().float(), label.shape[-2:], mode="bilinear", align_corners=True)
        hits = (scores.argmax(1) == label) & valid  # (B, H, W)
        return loss, {"pixel_accuracy": hits.sum() / valid.sum().clamp(min=1)}

    def end_epoch(epoch):
        common.check_finite(learner)
        state = {"model": learner.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                 "epochs": schedule.epochs, "recipe": recipe, "classes": images.classes, "backbone": setting.backbone,
                 "images": base_images(setting)}
        if not backbone.pretrained:  # the meta learner's random backbone must give the features this head learned on
            state["backbone_buffers"] = dict(backbone.named_buffers())
        common.save_atomic(state, path)

    total = schedule.epochs * steps
    schedule.fit(step, optimizer, batches, lambda it: schedule.lr * (1 - it / total) ** BASE_POLY_POWER,
                 schedule.epochs, steps, start_epoch=start, log_every=schedule.log_every, per_step=schedule.batch_size,
                 unit="images", tag="[base] ", log=partial(print, flush=True), log_file=log_file, event="base",
                 end_epoch=end_epoch)
    print(f"[base] wrote {path}", flush=True)
    return path


def base_file(setting, options):
    """STAGE_FILES["base"]: --base-learner, else base_learner_path(setting) (train.py holds its folder as a run's)."""
    return Path(options.get("base_learner") or base_learner_path(setting))


STAGES = {"base": train_base_learner}
STAGE_FILES = {"base": base_file}


class BaseClassImages(Dataset):
    """Training images of the run's fold with the semantic labels of its base classes, for the base learner.

    PASCAL / COCO / folder: every image of the training list (data.build_dataset's train files: VOC train U SBD
    train_noval; COCO train2014; a folder's train.txt, else its images without a novel pixel), the pixels of
    novel classes relabelled background, as BAM's BaseData (util/dataset.py, "Pre-Training") does: neither the
    episodes' 2048-pixel rule nor their filter of images with novel pixels applies here. data.train_transform
    at BAM's base scale range 0.5-2.0, cropped to setting.img_size. Synthetic: data.render_synthetic with one base
    class (1-3 objects) and base-class distractors, `length` images. Item (epoch, index) ->
    img (3,H,W) normalised, label (H,W) int64 channel ids (0 background, i = classes[i-1], 255 ignore; a class
    of no channel -> 0); every random draw comes from a numpy Generator seeded with (seed, epoch, index).
    Note: data.train_transform's crop keeps the pixels labelled 1, here base channel 1 (for episodes, the
    episode class): a harmless bias of the crop position.
    """

    def __init__(self, setting, seed=0, length=None):
        self.classes = base_classes(setting)
        self.dataset, self.img_size, self.seed = setting.dataset, setting.img_size, seed
        self.episodes = data.build_dataset(setting.dataset, "train", setting.fold, img_size=setting.img_size,
                                           root=setting.data_root, seed=seed, coco_split=setting.coco_split,
                                           train_length=length, test_classes=setting.test_classes)
        self.names = sorted(self.episodes.files) if setting.dataset != "synthetic" else None  # the whole training list
        self.length = len(self.episodes) if setting.dataset == "synthetic" else len(self.names)
        self.lut = torch.zeros(256, dtype=torch.long)  # dataset class id -> channel id
        self.lut[self.classes] = torch.arange(1, len(self.classes) + 1)
        self.lut[common.IGNORE_INDEX] = common.IGNORE_INDEX

    def __len__(self):
        return self.length

    def __getitem__(self, key):
        epoch, index = key
        rng = np.random.default_rng((self.seed, epoch, index))
        if self.dataset == "synthetic":
            class_id = self.classes[rng.integers(len(self.classes))]
            others = np.array([c for c in self.classes if c != class_id])
            img, label = data.render_synthetic(rng, class_id, others, self.img_size)  # (3,H,W) in [0,1], (H,W)
            mean, std = torch.tensor(data.MEAN).view(3, 1, 1), torch.tensor(data.STD).view(3, 1, 1)
            return (img - mean) / std, self.lut[label]
        image_path, label_path = self.episodes.files[self.names[index]]
        img, label = data.load_image(image_path), self.lut[data.load_mask(label_path)]  # (3,H0,W0), (H0,W0)
        return data.train_transform(img, label, rng, self.img_size, BASE_SCALE_RANGE)
