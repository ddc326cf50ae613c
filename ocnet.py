"""OCNet: Object-level Correlation for Few-Shot Segmentation.

C. Wen, Y. Zhang, J. Fan, H. Zhu, X.-S. Wei, Y. Wang, Z. Kou, S. Sun, ICCV 2025, arXiv:2509.07917.
There is no public code: the paper is the only source, so everything it leaves open is a Config field or a Choices
entry below.

Instead of correlating the support object with the whole query image, OCNet first mines the query's "general
objects" (GOMM: learnable general object prototypes, supervised by a CAM + prior mask and fused back into the
query feature by cross-attention), then allocates selected support frequency prototypes to them (CCM: DCT
multi-frequency pooling, foreground / background prototype selection, an optimal-transport allocation target),
and decodes the resulting object-level correlation F_c with an FPN.

Paper -> code
    §4.1     mid-level F_s/F_q, high-level F^h        Model.features (common.MidLevelReduction); layer4
    Eq. 1-2  general object mask M_g                  Model.forward step 2 (common.cosine_prior, ImageNetCAM)
    Eq. 3-5  P_g, M_gp, Alloc, F_ig, M̂_g, F_g         GOMM
    §5.1     query generalization strategy [49]       Model.generalize
    Eq. 6    P_s = MFP(F_s, M_s)                      multi_frequency_pooling, dct_basis
    Eq. 7-10 M_sp, Top-k / Low-k selection, M_qf      CCM.forward
    Eq. 11-12 Sinkhorn plan, M_pa                     sinkhorn, allocation_target (in Model.loss: needs M_q)
    Eq. 13-15 M̂_pa, P_q, F_c                           CCM.forward
    §4.3     FPN decoder [27]                         FPNDecoder
    Eq. 16   L = L_t + L_g + L_p                      Model.loss
    §5.1     K shots: support prototypes averaged     Model.forward step 4
    §5.3     ablations: Tables 3, 4, 5                Config: gomm, ccm; cam, mask, atten; allocation

Choices (the paper leaves these open; there is no official code to follow)
    - Features as PFENet/BAM [21, 42], which §4.1 follows: F = 1x1 conv of [layer3, layer2] to C = 256 with
      ReLU and Dropout 0.5, F^h = layer4; the support's F^h of Eq. (1) is layer4 of its masked layer3, as in
      the PFENet prior that Eq. (1) follows (PFENet.py:209-210). One projection for query and support (PFENet
      has two), so that the query-support cosines of Eq. 10 compare one space.
    - CAM [65] (cam=true): Grad-CAM (Selvaraju et al., ICCV 2017) of the top-1 class of the frozen
      backbone's own ImageNet classifier on F_q^h, ReLU, min-max normalised: parameter-free, for every backbone;
      CAM itself for ResNet, CAM's generalisation for VGG-16-BN's three-FC head (why, and the cost: ImageNetCAM).
    - N_g = 16 general object prototypes: a PASCAL fold's 15 base classes plus background.
    - Atten (Eq. 5): multi-head attention with 8 heads (the Transformer [43]), nothing else (Eq. 5 has only the
      residual). The general object head and the final head: PFENet's classifier (3x3, ReLU, Dropout 0.1, 1x1).
    - Query generalization [49] is only named (§5.1); DGFPNet's abstract describes it as integrating the query
      attention mask and the support information into the feature, so F_g <- ReLU(Conv1x1([F_g, P_s^0, prior]))
      (PFENet's merge of prototype and prior). It is also the decoder's only direct view of the support.
    - MFP: the 7x7 lowest-frequency 2-D DCT basis over the whole h x w feature grid (L = 49), each component
      pooled under the mask and divided by the mask area as MAP, so component 0 is exactly MAP.
    - Eq. 8-9: the text picks the N_s largest and smallest *similarities*, so ID_t = the N_s masks M_sp nearest
      to M_s (euclidean), ID_l = the N_s farthest; K shots: distances averaged. N_s = 8 (16 of the 49).
    - Eq. 11 prints "+ eps H(T)" with H = -sum T log T, which would favour a sparse plan; we solve the standard
      entropic OT of the cited Sinkhorn [5], Tr(T^T C) - eps H(T).
    - Eq. 11: log-domain Sinkhorn, 100 iterations (row marginals within 1e-5 at eps = 0.05), at feature resolution
      on detached cosines, M_q downsampled by nearest; it runs in loss(), the only place M_q is known.
    - Eq. 7-11 (the selection ID_t / ID_l and the transport costs, so the whole target M_pa) on F_q, F_s, P_s
      before the features' Dropout2d; only Eq. 13-14 (M̂_pa, P_q) see P_s after it: a label drawn through
      dropout would move between steps (the argument beside Model.features).
    - Eq. 13-14: the four "LN" are separate Linear(C, C): keys of F_g and of the prototypes, value of F_g, output.
      The MatMul of Eq. 14 is divided by h*w (a mean over pixels) so P_q does not grow with the image; L_p sees
      10 x M̂_pa (raw cosines in [-1, 1] cannot fit a 2 N_s-way cross-entropy; PANet [46] scales them by 20; 10
      is untuned: a logit range of 20 already lets the softmax over 16 prototypes reach p > 0.999).
    - FPN decoder: 4 levels (F_c and three stride-2 3x3 convs), lateral 1x1 + bilinear top-down + 3x3 smoothing
      with ReLU, all 256 wide (FPN's width); the finest level predicts. L_g and L_p are taken at h x w.
    - lr 0.025: BAM's rate per episode at §5.1's batch 4 (§5.1 prints 0.005, BAM's configured value, which its
      code trains x 10 at batch 8: the arithmetic beside DEFAULTS). Batch 4 on COCO too: §5.1 states one.
    - Table 3 without GOMM: the query generalization, the CCM and the decoder read F_q in place of F_g; no CAM, no
      M_g, no L_g. Without CCM, the baseline's "dense global prototype comparison": F_c = [P_s^0 at every pixel,
      F_g], as wide as CCM's F_c (the decoder unchanged); no L_p. Both off: the baseline, L_t alone.
    - Table 4: without Mask, M_g = 1_tau(CAM); without Atten (Eq. 5), F_g = F_ig, the feature whose lost
      information Atten restores (§4.2). Row "CAM" = both off. cam=false (no row of the paper): M_g from the Mask
      alone, for a weight file without an ImageNet classifier.
    - Table 5 "Mean": F_c = [P_s^0, the mean of the other ID_t prototypes, F_g] at every pixel (§5.3's
      concatenation: the decoder's stem reads 3C); "Cosine": Eq. 13-15 on both sets unchanged, no M_pa, no L_p;
      "Fore": ID_t alone, M_pa from the foreground problem of Eq. 11, background pixels ignored by L_p.
"""
import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# §5.1: SGD, batch 4, lr 0.005; 200 epochs at 473 px on PASCAL, 75 at 641 px on COCO; PFENet's augmentation ("the
# same data augmentation setting as [42]"). The lr: OCNet has no public code and builds on BAM [21] (its base
# learner and episodes); BAM's code multiplies its configured "base_lr: 0.005" by 10 (util/util.py
# poly_learning_rate, scale_lr=10) and trains at 0.05 with a global batch of 8 (2 per GPU on 4 GPUs, train.sh):
# 0.05 / 8 per episode, which is 0.025 at batch 4. HDMNet [35], also cited, trains with AdamW at 1e-4, no guide to
# an SGD rate.
DEFAULTS = {
    "pascal": dict(lr=0.025, batch_size=4, epochs=200, img_size=473, augment="pfenet"),
    "coco": dict(lr=0.025, batch_size=4, epochs=75, img_size=641, augment="pfenet"),
}

Allocation = Literal["fore+back", "mean", "cosine", "fore"]  # Table 5's rows, the default (OCNet's) first


@dataclass
class Config:
    backbone: str = "resnet50"  # §5.1: VGG-16 and ResNet-50, ImageNet weights, frozen
    pretrained: bool = True  # §5.1
    reduce_dim: int = 256  # C: PFENet/BAM's reduce_dim [21, 42]
    feature_dropout: float = 0.5  # PFENet's down_query/down_supp Dropout2d
    head_dropout: float = common.FEM_DROPOUT  # PFENet's cls head
    gomm: bool = True  # Table 3 "GOMM" (§4.2); false: F_q in place of F_g (Choices)
    tau: float = 0.6  # §4.2 Eq. 2: general object mask threshold
    cam: bool = True  # the CAM [65] in M_g (Eq. 1), Grad-CAM of the backbone's ImageNet classifier; false: no row of
    # Table 4 (its "CAM" row is mask=false atten=false), M_g from the Mask alone (Choices)
    mask: bool = True  # Table 4 "Mask": the high-level cosine similarity (prior) mask in M_g (Eq. 1)
    atten: bool = True  # Table 4 "Atten": Eq. 5's cross-attention; false: F_g = F_ig (Choices)
    num_general: int = 16  # N_g (not given): a PASCAL fold's 15 base classes + background
    attn_heads: int = 8  # Eq. 5 Atten (not given): the Transformer's [43] 8 heads
    ccm: bool = True  # Table 3 "CCM" (§4.3); false: the dense global prototype comparison (Choices)
    allocation: Allocation = "fore+back"  # Table 5: how CCM allocates the selected prototypes (Choices)
    dct_size: int = 7  # §4.3: L = 7 x 7 = 49 frequency prototypes [49]
    num_select: int = 8  # N_s (not given): 2 N_s = 16 of the 49 prototypes
    ot_eps: float = 0.05  # §4.3 Eq. 11: entropic regularisation
    sinkhorn_iters: int = 100  # not given: row marginals within 1e-5 (relative) at eps 0.05; 50 leave 2e-3
    pa_scale: float = 10.0  # not given: cosine -> logit scale of M̂_pa in L_p (PANet [46] uses 20)
    fpn_levels: int = 4  # §4.3 FPN [27] (not given): four pyramid levels, as FPN's P2-P5


def seg_head(dim, dropout, classes=2):
    """PFENet's classifier: 3x3 conv, ReLU, Dropout2d, 1x1 conv to the class logits."""
    return nn.Sequential(common.conv_relu(dim, dim, 3), nn.Dropout2d(dropout), nn.Conv2d(dim, classes, 1))


def cosine_map(f, protos):
    """Cosine of every pixel of f (B,C,h,w) with every prototype of protos (B,K,C) -> (B,K,h,w)."""
    return torch.einsum("bchw,bkc->bkhw", F.normalize(f, dim=1), F.normalize(protos, dim=2))


def allocate(protos, index):
    """Alloc (Eq. 4, 15): at every pixel the prototype protos[b, index[b,i,j]]; protos (B,K,C), index (B,h,w)
    -> (B,C,h,w)."""
    B, K, C = protos.shape
    picked = protos.gather(1, index.flatten(1)[..., None].expand(-1, -1, C))  # (B, hw, C)
    return picked.transpose(1, 2).reshape(B, C, *index.shape[1:])  # (B, C, h, w)


def minmax(x, eps=common.COSINE_EPS):
    """Per-image min-max normalisation of x (B,1,h,w) to [0, 1], with the prior's eps."""
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return (x - lo) / (hi - lo + eps)


def dct_basis(h, w, n, device):
    """The n x n lowest frequencies of the 2-D DCT-II over an h x w grid -> (n*n, h, w); component 0 is all ones."""
    u = torch.arange(n, device=device, dtype=torch.float32)
    cos_i = torch.cos(math.pi * u[:, None] * (torch.arange(h, device=device) + 0.5) / h)  # (n, h)
    cos_j = torch.cos(math.pi * u[:, None] * (torch.arange(w, device=device) + 0.5) / w)  # (n, w)
    return (cos_i[:, None, :, None] * cos_j[None, :, None, :]).reshape(n * n, h, w)  # (L, h, w)


def multi_frequency_pooling(f, m, n):
    """Eq. (6), MFP [49]: P[l] = sum(f * m * basis_l) / (sum(m) + eps) for the L = n*n DCT components.
    f (B,C,h,w); m (B,H,W) float foreground, resized as common.masked_average_pooling does -> (B,L,C).
    Component 0 is exactly masked_average_pooling(f, m); an empty mask gives zeros. On a grid smaller than n
    (tiny test images) the components of frequency >= h vanish or repeat: an h-point DCT has h frequencies."""
    m = common.resize(m[:, None], f.shape[-2:])  # (B, 1, h, w)
    basis = dct_basis(*f.shape[-2:], n, f.device).flatten(1)  # (L, hw)
    pooled = (f * m).flatten(2) @ basis.T.to(f.dtype)  # (B, C, L)
    return (pooled / (m.sum((2, 3))[..., None] + common.MAP_EPS)).transpose(1, 2)  # (B, L, C)


def sinkhorn(cost, region, eps, iters):
    """Eq. (11): min_T Tr(T^T cost) - eps H(T) s.t. T 1 = mu, T^T 1 = nu, by log-domain Sinkhorn iterations [5].
    cost (B,N,K); region (B,N) bool: mu = 1/N_f on the N_f rows inside it and 0 outside (the zero padding),
    nu = 1/K. Returns T (B,N,K); an empty region gives T = 0."""
    log_k = -cost / eps
    n_f = region.sum(1, keepdim=True).clamp(min=1).float()  # (B, 1)
    log_mu = torch.where(region, -n_f.log(), -math.inf)  # (B, N)
    log_nu = -math.log(cost.shape[2])
    u, v = torch.zeros_like(log_mu), torch.zeros_like(cost[:, 0])  # (B, N), (B, K)
    for _ in range(iters):
        u = log_mu - torch.logsumexp(log_k + v[:, None, :], dim=2)
        v = log_nu - torch.logsumexp(log_k + u[:, :, None], dim=1)
    plan = torch.exp(log_k + u[:, :, None] + v[:, None, :])  # (B, N, K)
    return torch.where(region[..., None], plan, 0.0)  # an empty region leaves v = inf and NaN here: zeroed


def allocation_target(cost, m_q, eps, iters, background=True):
    """Eq. (11-12): the prototype allocating mask M_pa (B,h,w), values 0..2N_s-1 (0..N_s-1 without background) and
    255 where m_q is ignored. With background (Table 5 "Fore + Back"), cost (B,2N_s,h,w) = 1 - [M_qb, M_qf]:
    background pixels are transported to the N_s background prototypes (slots 0..N_s-1), foreground pixels to the
    N_s foreground ones. Without ("Fore"), cost (B,N_s,h,w) = 1 - M_qf, and background pixels teach no slot (255).
    m_q (B,H,W) downsampled by nearest."""
    B, h, w = cost.shape[0], *cost.shape[-2:]
    m = F.interpolate(m_q[:, None].float(), (h, w), mode="nearest")[:, 0].long()  # (B, h, w)
    c = cost.float().flatten(2).transpose(1, 2)  # (B, hw, 2N_s) ("Fore": N_s)
    region = m.flatten(1)  # (B, hw)
    kinds = (0, 1) if background else (1,)  # the pixels of each problem: background, foreground
    # with background ("Fore + Back") its problem and the foreground one have the same size (N_s slots each): one
    # batch of 2B problems, one Sinkhorn loop (each iteration's kernels launched once for both, not twice); "Fore"
    # solves the B foreground problems alone
    plans = sinkhorn(torch.cat(c.chunk(len(kinds), dim=2)), torch.cat([region == k for k in kinds]), eps, iters)
    # Eq. (12): M_pa = Argmax(M_oqb ⊕ M_oqf), each plan zero at the pixels of the other problem
    m_pa = torch.cat(plans.chunk(len(kinds)), 2).argmax(2).view(B, h, w)
    taught = (m != common.IGNORE_INDEX) if background else (m == 1)
    return m_pa.masked_fill(~taught, common.IGNORE_INDEX)


class ImageNetCAM(nn.Module):
    """CAM [65] of the query from the frozen backbone's own ImageNet classifier, as Grad-CAM: channel weights =
    spatial mean of the gradient of the top-1 class score, ReLU of the weighted channel sum, min-max normalised.
    ResNet: global pooling + fc, where this is CAM itself. VGG-16-BN: the last max-pool (dropped by
    common.Backbone), the 7x7 average pool and the three FC layers, in eval mode (no dropout).
    The classifier comes with the backbone's weights: `head` = common.Backbone.head, the one of a weight file
    (pretrained=PATH, e.g. PFENet's resnet50_v2.pth for a deep-stem backbone), shared with the backbone; else
    torchvision's for `backbone` (random when pretrained=False, as the backbone). A weight file without one
    is an error: cam=false needs none.
    forward(f_h (B,C_h,h,w) layer4) -> cam (B,1,h,w) in [0, 1]."""

    def __init__(self, backbone, pretrained, head=None):
        super().__init__()
        if head is None and common.is_weight_file(pretrained):
            raise common.WeightsFileError(
                f"the weight file {pretrained} holds no ImageNet classifier of {backbone} (1000 classes) for "
                f"OCNet's Grad-CAM: pass --set cam=false to build the general object mask from the prior alone")
        if head is None:  # torchvision's weights API (common.Backbone drops the classifier, and fetched the weights)
            head = common.imagenet_classifier(backbone, pretrained)
        if backbone.startswith("resnet"):  # global pooling + fc: Grad-CAM equals CAM [65] (up to ReLU and scale)
            self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
        else:
            # VGG-16-BN has no global pooling: three FC layers on its last block, max-pooled and pooled to 7x7, and
            # Grad-CAM is CAM's standard generalisation to such heads. They cost 124M frozen parameters (0.5 GB in
            # checkpoints); cam=false builds none and leaves M_g to the prior
            self.classifier = nn.Sequential(nn.MaxPool2d(2, 2, ceil_mode=True), nn.AdaptiveAvgPool2d(7),
                                            nn.Flatten(), head)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode=True):
        return super().train(False)  # frozen like the backbone: VGG's classifier dropout stays off

    def forward(self, f_h):
        with torch.enable_grad():  # also under no_grad; the gradient is w.r.t. f_h only
            f_h = f_h.detach().requires_grad_(True)
            score = self.classifier(f_h).amax(1).sum()  # top-1 ImageNet class score of every image
            grad, = torch.autograd.grad(score, f_h)  # (B, C_h, h, w)
        cam = (grad.mean((2, 3), keepdim=True) * f_h.detach()).sum(1, keepdim=True)  # (B, 1, h, w)
        return minmax(F.relu(cam.float()))


class GOMM(nn.Module):
    """General Object Mining Module (§4.2, Fig. 2a), Eq. (3-5); its supervision M_g (Eq. 1-2) is made in Model.
    atten=False (Table 4): no cross-attention, F_g = F_ig.
    forward(f_q (B,C,h,w), predict) -> (f_g (B,C,h,w) general object feature, logits_g (B,2,h,w) = M̂_g, or None
    without predict: only L_g reads it)."""

    def __init__(self, dim, num_general, heads, dropout, atten=True):
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(num_general, dim))  # P_g, "randomly initialized"
        self.fuse = common.conv_relu(2 * dim, dim, 1)
        self.head = seg_head(dim, dropout)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True) if atten else None

    def forward(self, f_q, predict=True):
        B, C, h, w = f_q.shape
        p_g = self.prototypes.expand(B, -1, -1)  # (B, N_g, C)
        # Eq. (3): M_gp = Cosine(F_q, P_g)
        m_gp = cosine_map(f_q, p_g)  # (B, N_g, h, w)
        # Eq. (4): F_ig = Conv1x1(Alloc(P_g, Argmax(M_gp)) ⊕ F_q)
        f_ig = self.fuse(torch.cat([allocate(p_g, m_gp.argmax(1)), f_q], 1))  # (B, C, h, w)
        logits_g = self.head(f_ig) if predict else None  # (B, 2, h, w)
        if self.attention is None:  # Table 4 without "Atten"
            return f_ig, logits_g
        # Eq. (5): F_g = Atten(F_q, F_ig, F_ig) + F_q
        q, kv = f_q.flatten(2).transpose(1, 2), f_ig.flatten(2).transpose(1, 2)  # (B, hw, C)
        attended = self.attention(q, kv, kv, need_weights=False)[0]  # (B, hw, C)
        return attended.transpose(1, 2).reshape(B, C, h, w) + f_q, logits_g


class CCM(nn.Module):
    """Correlation Construction Module (§4.3, Fig. 2b): prototype selection (Eq. 7-9), the transport costs of
    M_qf / M_qb (Eq. 10; the plan itself needs M_q and is made in the loss), M̂_pa, P_q and F_c (Eq. 13-15).
    allocation (Table 5): "fore+back" (OCNet), "fore" (ID_t alone), "cosine" (no M_pa: no costs), "mean" (no
    allocation: F_c = [P_s^0, mean of the other ID_t prototypes, F_g], no parameters).
    forward(f_q, f_g (B,C,h,w), f_s (B,S,C,h,w), m (B,S,h,w) support foreground, p_s, p_s_drop (B,L,C), target)
    -> (f_c (B,2C,h,w) ("mean": 3C), logits_pa (B,2N_s,h,w) = pa_scale * M̂_pa, cost (B,2N_s,h,w)), the N_s
    background slots first ("fore": the N_s foreground slots alone, (B,N_s,h,w)); logits_pa and cost are None without
    target or where M_pa supervises nothing.
    f_q, f_s and p_s are taken before the features' dropout (they make the selection and the target: Choices);
    p_s_drop is P_s after it, the prototypes Eq. (13-14) learn from."""

    def __init__(self, dim, num_select, pa_scale, allocation="fore+back"):
        super().__init__()
        if allocation not in get_args(Allocation):
            raise ValueError(f"allocation must be one of {', '.join(get_args(Allocation))}, not {allocation!r}")
        self.num_select, self.pa_scale, self.allocation = num_select, pa_scale, allocation
        self.supervised = allocation in ("fore+back", "fore")  # M_pa supervises the allocation (L_p)
        if allocation != "mean":  # the "LN" of Eq. (13-14)
            self.key_g, self.key_p, self.value_g, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, f_q, f_g, f_s, m, p_s, p_s_drop, target=True):
        B, S, C = f_s.shape[:3]
        h, w = f_g.shape[-2:]
        # Eq. (7): M_sp = Cosine(F_s, P_s), every shot against the shot-averaged prototypes
        m_sp = cosine_map(f_s.flatten(0, 1), p_s.repeat_interleave(S, 0)).unflatten(0, (B, S))
        # Eq. (8-9): foreground ID_t = the N_s masks nearest to M_s, background ID_l = the N_s farthest
        dist = (m_sp - m[:, :, None]).flatten(3).norm(dim=3).mean(1)  # (B, L)
        id_t = dist.topk(self.num_select, dim=1, largest=False).indices  # (B, N_s)
        if self.allocation == "mean":  # Table 5 "Mean": no allocation, the prototypes at every pixel
            others = (id_t != 0).to(p_s_drop.dtype)[..., None]  # (B, N_s, 1): the selected but the global P_s^0
            picked = p_s_drop.gather(1, id_t[..., None].expand(-1, -1, C)) * others  # (B, N_s, C)
            rest = picked.sum(1) / others.sum(1).clamp(min=1)  # (B, C)
            protos = torch.cat([p_s_drop[:, 0], rest], 1)[..., None, None].expand(-1, -1, h, w)  # (B, 2C, h, w)
            return torch.cat([protos, f_g], 1), None, None  # (B, 3C, h, w)
        if self.allocation == "fore":  # Table 5 "Fore": the foreground prototypes alone
            ids = id_t[..., None].expand(-1, -1, C)  # (B, N_s, C)
        else:
            id_l = dist.topk(self.num_select, dim=1).indices  # (B, N_s)
            ids = torch.cat([id_l, id_t], 1)[..., None].expand(-1, -1, C)  # (B, 2N_s, C): background slots first
        cost = None
        if target and self.supervised:  # only the target M_pa (in the loss) reads the costs
            selected = p_s.gather(1, ids)  # (B, 2N_s, C) ("fore": N_s, here and below)
            # Eq. (10): M_qb ⊕ M_qf = Cosine(F_q, Select(P_s, ID_l & ID_t)); 1 - it is the cost of Eq. (11), in
            # fp32: Sinkhorn divides it by eps = 0.05, so bf16's steps of 1/128 would flip the argmax of near-equal
            # plans
            with torch.autocast(f_q.device.type, enabled=False):
                cost = 1 - cosine_map(f_q.detach().float(), selected.detach().float())  # (B, 2N_s, h, w)
        # Eq. (13): M̂_pa = Cosine(LN(F_g), LN(Select(P_s, ID_l & ID_t))), the prototypes after dropout
        tokens = f_g.flatten(2).transpose(1, 2)  # (B, hw, C)
        keys = F.normalize(self.key_p(p_s_drop.gather(1, ids)), dim=2)  # (B, 2N_s, C)
        m_pa = F.normalize(self.key_g(tokens), dim=2) @ keys.transpose(1, 2)  # (B, hw, 2N_s)
        # Eq. (14): P_q = LN(MatMul(M̂_pa, LN(F_g))), the MatMul as a mean over the h*w pixels
        p_q = self.out(m_pa.transpose(1, 2) @ self.value_g(tokens) / (h * w))  # (B, 2N_s, C)
        # Eq. (15): F_c = Alloc(P_q, Argmax(M̂_pa)) ⊕ F_g
        m_pa = m_pa.transpose(1, 2).reshape(B, -1, h, w)  # (B, 2N_s, h, w)
        f_c = torch.cat([allocate(p_q, m_pa.argmax(1)), f_g], 1)  # (B, 2C, h, w)
        return f_c, None if cost is None else self.pa_scale * m_pa, cost


class FPNDecoder(nn.Module):
    """§4.3 "the decoder employs FPN structure [27]": a bottom-up pyramid of F_c (1x1 stem, stride-2 3x3 convs),
    FPN's top-down pathway (lateral 1x1 + upsampled coarser level, 3x3 smoothing), the finest level classified.
    forward(f_c (B,in_dim,h,w)) -> logits (B,2,h,w)."""

    def __init__(self, in_dim, dim, levels, dropout):
        super().__init__()
        self.stem = common.conv_relu(in_dim, dim, 1)
        self.down = nn.ModuleList(common.conv_relu(dim, dim, 3, stride=2) for _ in range(levels - 1))
        self.lateral = nn.ModuleList(nn.Conv2d(dim, dim, 1, bias=False) for _ in range(levels - 1))
        self.smooth = nn.ModuleList(common.conv_relu(dim, dim, 3) for _ in range(levels - 1))
        self.head = seg_head(dim, dropout)

    def forward(self, f_c):
        pyramid = [self.stem(f_c)]  # (B, dim, h, w)
        for down in self.down:
            pyramid.append(down(pyramid[-1]))  # h/2, h/4, h/8 (rounded up)
        x = pyramid[-1]
        for i in reversed(range(len(self.down))):
            x = self.smooth[i](self.lateral[i](pyramid[i]) + common.resize(x, pyramid[i].shape[-2:]))  # top-down
        return self.head(x)  # (B, 2, h, w)


def check_config(cfg):
    """ValueError (Model.__init__ raises it before building) for a field changed that the switches leave unread (it
    would change nothing), a count below 1 (N_s, N_g, FPN levels, L, Sinkhorn's iterations), eps <= 0, heads that
    do not split C, an M_g without a source or more selected prototypes than the L of MFP."""
    unread = {}  # switch -> the fields it leaves unread
    if not cfg.gomm:
        unread["gomm=false"] = ("tau", "cam", "mask", "atten", "num_general", "attn_heads")
    elif not cfg.atten:
        unread["atten=false"] = ("attn_heads",)
    if not cfg.ccm:
        unread["ccm=false"] = ("allocation", "dct_size", "num_select", "ot_eps", "sinkhorn_iters", "pa_scale")
    elif cfg.allocation in ("mean", "cosine"):  # no M_pa: no Sinkhorn, no L_p
        unread[f"allocation={cfg.allocation}"] = ("ot_eps", "sinkhorn_iters", "pa_scale")
    for switch, names in unread.items():
        changed = [name for name in names if getattr(cfg, name) != getattr(Config, name)]
        if changed:
            raise ValueError(f"{', '.join(changed)}: no part of {switch} (it would change nothing)")
    for name in ("reduce_dim", "num_select", "num_general", "fpn_levels", "dct_size", "sinkhorn_iters"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.ot_eps > 0:
        raise ValueError(f"ot_eps must be > 0 (Sinkhorn divides the costs by it), got {cfg.ot_eps}")
    if cfg.gomm and cfg.atten and (cfg.attn_heads < 1 or cfg.reduce_dim % cfg.attn_heads):
        raise ValueError(f"attn_heads must divide reduce_dim = {cfg.reduce_dim} (Atten's heads split C), got "
                         f"{cfg.attn_heads}")
    if cfg.gomm and not (cfg.cam or cfg.mask):
        raise ValueError("GOMM's M_g (Eq. 1) needs the CAM or the Mask: cam and mask are both false")
    slots = 1 if cfg.allocation in ("fore", "mean") else 2  # "Fore", "Mean" select ID_t alone; else ID_l and ID_t
    if cfg.ccm and slots * cfg.num_select > cfg.dct_size ** 2:
        raise ValueError(f"{'2 * ' * (slots == 2)}num_select = {slots * cfg.num_select} exceeds the dct_size ** 2 = "
                         f"{cfg.dct_size ** 2} prototypes (allocation={cfg.allocation})")


class Model(nn.Module):
    """OCNet (Fig. 2). forward(img_q (B,3,H,W), img_s (B,S,3,H,W), m_s (B,S,H,W), class_ids unused) -> dict:
    logits (B,2,H,W) = M̂_q; in training also what only the loss reads: logits_g (B,2,h,w) = M̂_g and m_g (B,h,w)
    = M_g (with GOMM), logits_pa (B,2N_s,h,w) = scaled M̂_pa and cost_pa (B,2N_s,h,w) (N_s for "fore"), from which
    loss() builds M_pa (where M_pa supervises CCM's allocation). K = S shots: P_s and the prior are averaged. The
    ablations of §5.3 are Config fields (Tables 3-5)."""

    def __init__(self, cfg: Config):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        C = cfg.reduce_dim
        self.backbone = common.Backbone(cfg.backbone, pretrained=cfg.pretrained)
        channels = self.backbone.channels
        self.down = common.MidLevelReduction(channels["layer2"] + channels["layer3"], C, cfg.feature_dropout)
        # the CAM serves M_g alone, GOMM's supervision: no GOMM, no CAM
        self.cam = ImageNetCAM(cfg.backbone, cfg.pretrained, self.backbone.head) if cfg.gomm and cfg.cam else None
        self.gomm = GOMM(C, cfg.num_general, cfg.attn_heads, cfg.head_dropout, cfg.atten) if cfg.gomm else None
        self.generalize = common.conv_relu(2 * C + 1, C, 1)
        self.ccm = CCM(C, cfg.num_select, cfg.pa_scale, cfg.allocation) if cfg.ccm else None
        wide = 3 if cfg.ccm and cfg.allocation == "mean" else 2  # F_c's width: "Mean" adds a prototype (Table 5)
        self.decoder = FPNDecoder(wide * C, C, cfg.fpn_levels, cfg.head_dropout)

    def features(self, feats):
        """Mid-level F from the backbone's dict: PFENet's 1x1 reduction of [layer3, layer2] -> F (N,C,h,w) after
        its Dropout2d, and F before it (the allocation target's features: Choices)."""
        # M_pa is a label. Dropout2d draws its channels per image, so after it the query and the support
        # prototypes lie in different random subspaces, and the distance ranking that orders the slots changes
        # with each draw: the slot a pixel is taught would move between steps. One channel mask shared by query
        # and support would put the cosines in one space but still redraw the target at every step; without
        # dropout the target in training is the one eval mode computes, from the same weights.
        f = self.down.reduce(feats)  # (N, C, h, w), before the dropout
        return self.down.dropout(f), f

    def forward(self, img_q, img_s, m_s, class_ids=None):
        B, S = img_s.shape[:2]
        out = {}  # the logits, and in training what the loss reads (evaluation reads the logits alone)
        # 1. frozen backbone: mid-level F_q, F_s and high-level F_q^h, F_s^h (§4.1); F_s^h is layer4 of the
        # masked support layer3, as PFENet's prior, which Eq. (1) follows (episode's m_s). F_q, F_s after their
        # dropout, and f_q_clean, f_s_clean before it, for the allocation target (Choices)
        feats_q, feats_s = self.backbone.episode(img_q, img_s, m_s=m_s)
        (f_q, f_q_clean), f_q4 = self.features(feats_q), feats_q["layer4"]  # (B, C, h, w) x 2, (B, C_h, h, w)
        f_s, f_s_clean = (f.unflatten(0, (B, S)) for f in self.features(feats_s))  # (B, S, C, h, w) x 2
        f_s4 = feats_s["layer4"].unflatten(0, (B, S))  # (B, S, C_h, h, w)
        h, w = f_q.shape[-2:]

        # 2. Eq. (1-2): M_g = 1_tau(Max(Cosine(F_q^h, F_s^h) ⊕ CAM(F_q^h))), support background removed by M_s;
        # the cosine part is the prior mask, which the query generalization reads too; M_g is L_g's target alone
        prior = common.cosine_prior(f_q4, f_s4, m_s)  # (B, 1, h, w)
        if self.gomm is not None and self.training:
            general = [prior] if self.cfg.mask else []  # Table 4 "Mask"
            if self.cam is not None:  # Table 4 "CAM"
                general.append(self.cam(f_q4))
            out["m_g"] = (torch.stack(general).amax(0)[:, 0] >= self.cfg.tau).long()  # (B, h, w)

        # 3. GOMM, Eq. (3-5): general object prototypes -> F_ig, M̂_g; cross-attention -> F_g (Table 3 without
        # GOMM: F_q in its place)
        f_g = f_q
        if self.gomm is not None:
            f_g, logits_g = self.gomm(f_q, predict=self.training)
            if self.training:
                out["logits_g"] = logits_g

        # 4. Eq. (6): P_s = MFP(F_s, M_s), averaged over the K shots (§5.1); without CCM only P_s^0 (MAP) is read
        m = common.foreground_at(m_s, (h, w))  # (B, S, h, w)
        n = self.cfg.dct_size if self.ccm is not None else 1
        if self.training and self.ccm is not None:
            # P_s after and before the features' dropout, pooled as one batch of 2B*S images: one pass, not two
            both = torch.cat([f_s, f_s_clean]).flatten(0, 1)  # (2B*S, C, h, w)
            p_s, p_s_clean = multi_frequency_pooling(both, m.repeat(2, 1, 1, 1).flatten(0, 1), n
                                                     ).unflatten(0, (2, B, S)).mean(2)  # (B, L, C) each
        else:  # one P_s: evaluation draws no dropout (F_s is F_s before it); training without CCM reads P_s^0 alone,
            # after the dropout (nothing reads P_s before it: no CCM, no target)
            p_s = p_s_clean = multi_frequency_pooling(f_s.flatten(0, 1), m.flatten(0, 1), n
                                                      ).unflatten(0, (B, S)).mean(1)  # (B, L, C)

        # 5. query generalization [49] (§5.1): the support prototype (MAP) and the prior fused into F_g
        f_g = self.generalize(torch.cat([f_g, p_s[:, 0, :, None, None].expand(-1, -1, h, w), prior], 1))

        # 6. CCM, Eq. (7-10, 13-15): prototype selection and allocation -> object-level correlation F_c; the
        # selection and the target's costs from the features without dropout, M̂_pa from P_s with it. Table 3
        # without CCM: the dense global prototype comparison, P_s^0 at every pixel beside F_g
        if self.ccm is None:
            f_c = torch.cat([p_s[:, 0, :, None, None].expand(-1, -1, h, w), f_g], 1)  # (B, 2C, h, w)
        else:
            f_c, logits_pa, cost_pa = self.ccm(f_q_clean, f_g, f_s_clean, m, p_s_clean, p_s, target=self.training)
            if cost_pa is not None:
                out.update(logits_pa=logits_pa, cost_pa=cost_pa)

        # 7. FPN decoder -> M̂_q
        out["logits"] = common.resize(self.decoder(f_c), img_q.shape[-2:])  # (B, 2, H, W)
        return out

    def loss(self, out, m_q, m_s):
        """Eq. (16): L = L_t + L_g + L_p, each a cross-entropy (255 ignored); L_g with GOMM, L_p where M_pa
        supervises CCM's allocation (Tables 3, 5)."""
        terms = {"target": common.seg_loss(out["logits"], m_q)}
        if self.gomm is not None:
            terms["general"] = common.seg_loss(out["logits_g"], out["m_g"])
        if self.ccm is not None and self.ccm.supervised:
            with torch.no_grad(), torch.autocast(m_q.device.type, enabled=False):
                m_pa = allocation_target(out["cost_pa"], m_q, self.cfg.ot_eps, self.cfg.sinkhorn_iters,
                                         background=self.cfg.allocation == "fore+back")  # (B, h, w)
            terms["allocation"] = common.seg_loss(out["logits_pa"], m_pa)
        return sum(terms.values()), terms
