"""QPENet: Query-guided Prototype Evolution Network for Few-Shot Segmentation.

R. Cong, H. Xiong, J. Chen, W. Zhang, Q. Huang, Y. Zhao. IEEE Transactions on Multimedia, 2024.
Official code: github.com/rmcong/QPENet_TMM24 @ c0d3df3 ("official" below: model/QPENet.py and its configs).

The query shapes the prototypes. PPG segments the query coarsely with the support prototype and pools a
pseudo-prototype from the query under that prediction; DPE reverse-segments the support with it and splits the
support mask into a main region (what the query needs) and an auxiliary one, each giving a prototype. GBC
segments the background with a learned global prototype and "cleans" that prototype with a gate computed from
the query's background. FFA filters the query with the background prototype, adds the activation maps of the
evolved prototypes, attends twice to the support foreground pixels and decodes the mask.

Paper -> code:
    §III-B features F_q, F_s (shared CNN)     Model.features: frozen common.Backbone + common.MidLevelReduction
    "Convs" (3x3 and 1x1 layers)              Convs
    §III-C1 PPG, Eq. (1)-(3)                  Model.forward (Eq. 1: shot_map), ForegroundEvolution.ppg
    §III-C2 DPE, Eq. (4)-(8)                  ForegroundEvolution.dpe
    MAP                                       common.masked_average_pooling (shot_map: over all K shots)
    §III-D GBC, Eq. (9)-(11)                  GBC
    §III-E FFA, Eq. (12)-(15)                 FFA.forward
    Eq. (16) Cross(Cross(F_q'', F_s*M_s))     CrossAttention (x2), then FFA.convs
    §III-F loss, Eq. (17)-(19); L_bm          Model.loss, background_mining_loss
    §IV-B training setup                      DEFAULTS, Config
    §IV-D ablations, Tables III-V             Config: fgpe, bgpe, decoder; foreground_prototypes; activation_maps, dpe

The ablations of §IV-D (PASCAL-5i, 1-shot, ResNet-50) are runs: train.py --model qpenet --fold all --set ...
    Table III  baseline: fgpe=false bgpe=false decoder=fem;  + FGPE: bgpe=false decoder=fem;  + FGPE + BGPE:
               decoder=fem;  + FGPE + FFA: bgpe=false;  all three: the defaults
    Table IV   foreground_prototypes=pre, =main, =aux, =main+aux; all three: the default (pre+main+aux)
    Table V    "w/o activation maps": activation_maps=false;  "w SGM": dpe=sgm

K shots: P_pre, P_main and P_aux are each one MAP over the pixels of all K supports; one preliminary query
prediction y_pre and one pseudo-prototype P_psd follow from P_pre; P_psd reverse-segments every support, and
the cross-attention keys are the foreground pixels of all K supports together.

Choices (paper silent, or where we differ from the official code, whose behaviour each entry states):
 1. F_q, F_s: cat(layer3, layer2) of the frozen backbone -> 1x1 conv (256, no bias) + ReLU + Dropout2d 0.5 (PFENet's,
    as the official), one reduction for both ("two weight-shared CNNs", §III-B; the official: down_query and
    down_supp). Backbone: torchvision's ResNet by default; the official's deep stem (resnet50_v2) with --backbone
    resnet50_deep --backbone-weights resnet50_v2.pth. Conv_1 of Eq. (12), (15): a 1x1 conv, no bias, + ReLU.
 2. Convs: the official head (1x1 reduce + Dropout2d 0.5, two 3x3 residual, 3x3 + Dropout2d 0.1 + 1x1 -> 2).
    PPG and DPE share one (same "Convs" in Eq. 2 and 4; its 1.90M parameters are exactly the paper's 34.6M -
    32.7M); GBC has its own for Eq. 9 and 10; the final one of Eq. 16 reduces without dropout, as the official.
 3. y_pre in Eq. 3, y_rev in Eq. 5-6 and y_bg^q in Eq. 11 are hard masks (argmax), as the official; no
    gradient flows through them. M_s of Eq. 5-6 is the bilinearly downsampled mask of Eq. 1, so
    M_main + M_aux = M_s exactly (the official also uses the soft mask).
 4. The official also pools prototypes from "predicted foreground outside the mask" and "neither", and adds
    them, a prior mask, the activation of P_pre, a gated support map and 0.5 (P_pre + P_psd) to FFA, plus an
    auxiliary head on F_q'' (loss weight 0.6). We follow Eq. (12)-(16) only.
 5. GBC: P_global is a random N(0, 1) vector (§III-D; the official starts from zeros). FC(FC(GAP(.))) is
    Linear(256, 256) - ReLU - Linear(256, 256) - sigmoid, a channel gate in (0, 1) (GBC says why). GAP is the
    plain mean over all h*w pixels of F_q * y_bg^q, as written. Channel 1 of y_bg is background (QPENet.py L503).
 6. Eq. (16) "Cross": the official cross-attention layer (8 heads, no biases, dropout 0.1; residual, LayerNorm,
    FFN 256-768-256) over the support pixels labelled 1 at h x w (nearest, as the official), unweighted, all K
    shots together; without the official's deformable self-attention, cycle-consistency mask and random key
    sampling (CrossAttention and FFA.forward say why).
 7. Losses: "BCE" on two logits is softmax cross-entropy (common.seg_loss: upsampled to the label, 255 ignored).
    alpha = 1, beta = 0.5: the official weighs y_final 1 and averages its two L_bm; it weighs y_pre and y_rev 0.25
    each, which Eq. (19)'s single alpha cannot express, so they keep the paper's weight 1. K shots: the y_rev and
    support L_bm terms pool all shots (Model.loss).
 8. L_bm (NERTNet, as the official): per image, -log(1 - p_bg) averaged over the foreground, plus
    0.5 x -log p_bg averaged over every pixel; ours leaves out the 255 pixels, which the official counts.
 9. Evaluation computes only what the logits read, so forward's dict is smaller there: never y_bg^s (Eq. 9, "omitted
    during testing", §III-D), y_bg^q only for Eq. (11) (BGPE), PPG and DPE only where the decoder reads P_main or
    P_aux, PPG not under SGM (which reads no P_psd). loss() takes a training forward's dict.
10. Recipe as the official configs run it (DEFAULTS lists it): lr 0.025, the paper's 0.0025 (§IV-B) x 10, as the
    official poly_learning_rate multiplies every group's; its epochs (the paper: 200 on PASCAL). The official stops
    early and keeps the best checkpoint on the test classes; the harness evaluates the last (--select-best does as
    the official).
11. The official cannot run K > 1 (its transformer reshapes the shot-averaged support map per shot) and keeps
    only the last shot's y_pre and P_psd; ours combines K shots as stated above. One MAP over all K supports
    weighs each shot by its object's area; the official computes prototypes per shot and would average them
    with equal weights (as PFENet does).
12. Without FGPE (Table III) PPG and DPE are not built (-1.90M, Choices 2): P_main = P_aux = P_pre = MAP(F_s, M_s),
    the baseline's prototype, so either decoder keeps the width of its inputs; L_fg loses y_pre and y_rev.
13. Without BGPE (Table III) the cleaner of Eq. (11) is not built and P_bg = P_global. Eq. (9)-(10) and L_bg still
    train P_global: that is how NERTNet [42] learns the global background prototype that the baseline uses.
14. decoder="fem" (Table III): PFENet's FEM (common.FEM; no prior, Choices 4) replaces FFA (Eq. 12-16). It takes
    P_pre as its prototype and BC(P_main), BC(P_aux), BC(P_bg) as extra maps (§III-E's "broadcasting ... and
    concatenating"), and adds PFENet's auxiliary loss to L_fg (the mean over its per-scale logits, weight 1).
15. foreground_prototypes (Table IV) chooses the inputs of Eq. (15) among BC(P_pre), A_main and A_aux; its Conv_1
    narrows. PPG and DPE still run and learn in training (Eq. 17). Only FFA has Eq. (15): the FEM refuses a subset.
16. Table V: activation_maps=false gives Eq. (15) BC(P_main), BC(P_aux) in place of A_main, A_aux ("directly
    concatenate the broadcasted prototypes"); dpe="sgm" is SCL's self-guided module [41] in DPE's place: Eq. (4)
    segments the support with its own P_pre, not with P_psd; Eq. (5)-(8) and PPG (its y_pre loss) stay.
"""
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

BACKGROUND = 1  # channel of y_bg that means "background" (Fig. 3; official QPENet.py L503)
BM_EPS = 1e-5  # L_bm foreground-area epsilon (official weighted_BCE, from NERTNet)

# The official configs (Choices 10): lr 0.025 (the paper's 0.0025 x 10); batch 4 on one GPU (§IV-B); PASCAL epochs
# by fold and backbone as config/pascal/pascal_split{0-3}_resnet{50,101}.yaml: ResNet-50 100, 100, 100 and 50 (fold
# 3), ResNet-101 150 (the paper: 200); COCO 50; 473 px for both datasets (§IV-B); PFENet's augmentation (the official
# train.py's). Synthetic data: the harness's quick-start values.
DEFAULTS = {
    "pascal": dict(lr=0.025, batch_size=4, epochs={"resnet50": {0: 100, 1: 100, 2: 100, 3: 50}, "resnet101": 150},
                   img_size=473, augment="pfenet"),
    "coco": dict(lr=0.025, batch_size=4, epochs=50, img_size=473, augment="pfenet"),
}


@dataclass
class Config:
    backbone: str = "resnet50"  # §IV-B: ResNet-50 or ResNet-101, frozen ImageNet weights
    pretrained: bool = True  # §IV-B
    dim: int = 256  # c of F_q, F_s: the official reduce_dim
    feature_dropout: float = 0.5  # Dropout2d after the 1x1 reductions (official down_*, PFENet)
    head_dropout: float = 0.1  # Dropout2d in the classifier of Convs (official *_cls, PFENet)
    cross_layers: int = 2  # Eq. (16): Cross(Cross(.))
    heads: int = 8  # official cross_transformer.py (256 is not divisible by 12)
    ffn_dim: int = 768  # official FFN: 3 x embed_dims
    attn_dropout: float = 0.1  # official attn_drop = proj_drop = FFN dropout
    alpha: float = 1.0  # Eq. (19) weight of L_fg: Choices 7
    beta: float = 0.5  # Eq. (19) weight of L_bg: Choices 7
    bm_all_weight: float = 0.5  # L_bm weight of the every-pixel background term (official/NERTNet erfa)
    # §IV-D ablations (train.py --set FIELD=VALUE); the defaults are the full model
    fgpe: bool = True  # Table III "FGPE": foreground prototype evolution, PPG + DPE (Choices 12)
    bgpe: bool = True  # Table III "BGPE": background prototype evolution, GBC's cleaning (Eq. 11; Choices 13)
    decoder: Literal["ffa", "fem"] = "ffa"  # Table III "FFA", or the baseline's decoder, PFENet's FEM (Choices 14)
    # Table IV: the foreground prototypes that FFA uses (Eq. 15; Choices 15)
    foreground_prototypes: Literal["pre", "main", "aux", "main+aux", "pre+main+aux"] = "pre+main+aux"
    activation_maps: bool = True  # Table V "w/o activation maps": Eq. (15) takes the broadcast prototypes (Choices 16)
    dpe: Literal["dpe", "sgm"] = "dpe"  # Table V "w SGM": SCL's self-guided module replaces DPE (Choices 16)


def add_args(parser):
    parser.add_argument("--alpha", type=float, default=None, help="Eq. (19) weight of L_fg (default 1.0)")
    parser.add_argument("--beta", type=float, default=None, help="Eq. (19) weight of L_bg (default 0.5)")


def broadcast(p, f):
    """BC in the paper: a prototype (B,C) expanded to the spatial size of f (B,*,h,w) -> (B,C,h,w)."""
    return p[:, :, None, None].expand(-1, -1, *f.shape[-2:])


def shot_map(f_s, m):
    """MAP over the pixels of all K supports at once: f_s (B,S,C,h,w), m (B,S,h,w) -> (B,C).
    An area-weighted mean of the per-shot prototypes, so a shot whose region is empty adds nothing."""
    B, S, C, h, w = f_s.shape
    f = f_s.permute(0, 2, 1, 3, 4).reshape(B, C, S * h, w)  # shots stacked along the height
    return common.masked_average_pooling(f, m.reshape(B, 1, S * h, w))  # (B, C)


class Convs(nn.Module):
    """The segmentation head "Convs" of Eq. (2), (4), (9), (10), (16): 3x3 and 1x1 convolutions (§III-C1).
    x (N,in_dim,h,w) -> logits (N,2,h,w). Layout of the official head (Choices 2)."""

    def __init__(self, in_dim, dim, reduce_dropout, head_dropout):
        super().__init__()
        self.reduce = nn.Sequential(*common.conv_relu(in_dim, dim, 1), nn.Dropout2d(reduce_dropout))
        self.res = nn.Sequential(*common.conv_relu(dim, dim, 3), *common.conv_relu(dim, dim, 3))
        self.cls = nn.Sequential(*common.conv_relu(dim, dim, 3), nn.Dropout2d(head_dropout), nn.Conv2d(dim, 2, 1))

    def forward(self, x):
        x = self.reduce(x)  # (N, dim, h, w)
        return self.cls(self.res(x) + x)  # (N, 2, h, w)


class ForegroundEvolution(nn.Module):
    """§III-C: PPG and DPE, the support-query-support evolution of the foreground prototype. One Convs serves
    both the preliminary segmentation of the query (Eq. 2) and the reverse segmentation of the support (Eq. 4)."""

    def __init__(self, dim, feature_dropout, head_dropout):
        super().__init__()
        self.convs = Convs(2 * dim, dim, feature_dropout, head_dropout)

    def ppg(self, f_q, p_pre):
        """Pseudo-prototype Generation after Eq. (1) (P_pre, Model.forward). f_q (B,C,h,w), P_pre (B,C).
        Returns y_pre (B,2,h,w), P_psd (B,C)."""
        # Eq. (2): y_pre = Convs(Concat(F_q, BC(P_pre)))
        y_pre = self.convs(torch.cat([f_q, broadcast(p_pre, f_q)], 1))  # (B, 2, h, w)
        # Eq. (3): P_psd = MAP(F_q, y_pre), y_pre as its hard foreground mask
        p_psd = common.masked_average_pooling(f_q, (y_pre.argmax(1) == 1).float())  # (B, C)
        return y_pre, p_psd

    def dpe(self, f_s, m, p_psd):
        """Dual Prototype Evolution. f_s (B,S,C,h,w), m (B,S,h,w), P_psd (B,C) (SGM, Table V: P_pre in its place).
        Returns y_rev (B,S,2,h,w), M_main, M_aux (B,S,h,w), P_main, P_aux (B,C)."""
        B, S, C, h, w = f_s.shape
        f = f_s.flatten(0, 1)  # (B*S, C, h, w)
        # Eq. (4): y_rev = Convs(Concat(F_s, BC(P_psd))), every shot with the one pseudo-prototype (SGM: the support's
        # own P_pre, Choices 16)
        y_rev = self.convs(torch.cat([f, broadcast(p_psd.repeat_interleave(S, 0), f)], 1))  # (B*S, 2, h, w)
        y_rev = y_rev.view(B, S, 2, h, w)
        rev = (y_rev.argmax(2) == 1).float()  # (B, S, h, w)
        # Eq. (5): M_main = 1{M_s = 1} * 1{y_rev = 1}
        m_main = m * rev
        # Eq. (6): M_aux = 1{M_s = 1} * 1{y_rev != 1}
        m_aux = m * (1 - rev)
        # Eq. (7), (8): P_main = MAP(F_s, M_main), P_aux = MAP(F_s, M_aux)
        return y_rev, m_main, m_aux, shot_map(f_s, m_main), shot_map(f_s, m_aux)


class GBC(nn.Module):
    """§III-D Global Background Cleansing: a learned global background prototype segments the background of
    query and support (Eq. 9-10) and is cleaned channel-wise by a gate from the query's background (Eq. 11)."""

    def __init__(self, dim, feature_dropout, head_dropout, clean=True):
        super().__init__()
        self.p_global = nn.Parameter(torch.randn(dim))  # "a randomly initialized vector" (§III-D)
        self.convs = Convs(2 * dim, dim, feature_dropout, head_dropout)
        # FC(FC(.)) of Eq. (11), Choices 5: the paper gives no widths or activations, and two linear layers in a row
        # would collapse into one. The official implements Eq. (11) as a 4-expert dynamic 3x3 convolution of the
        # broadcast P_global instead. Without BGPE (Table III, clean=False) there is none: P_bg = P_global
        self.cleaner = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim),
                                     nn.Sigmoid()) if clean else None

    def forward(self, f_q, f_s):
        """f_q (B,C,h,w), f_s (B,S,C,h,w) -> P_bg (B,C), y_bg^q (B,2,h,w), y_bg^s (B,S,2,h,w). In evaluation y_bg^s
        is None, and y_bg^q too without the cleaner: only the loss reads them (Choices 9)."""
        B, S, _, h, w = f_s.shape
        p_global = self.p_global.expand(B, -1)  # (B, C)
        y_bg_q = y_bg_s = None
        if self.training or self.cleaner is not None:
            # Eq. (10): y_bg^q = Convs(Concat(F_q, BC(P_global)))
            y_bg_q = self.convs(torch.cat([f_q, broadcast(p_global, f_q)], 1))  # (B, 2, h, w)
        if self.training:  # only the loss reads y_bg^s: it trains P_global, "omitted during testing" (§III-D)
            # Eq. (9): y_bg^s = Convs(Concat(F_s, BC(P_global))), the same Convs
            f = f_s.flatten(0, 1)  # (B*S, C, h, w)
            y_bg_s = self.convs(torch.cat([f, broadcast(p_global.repeat_interleave(S, 0), f)], 1))  # (B*S, 2, h, w)
            y_bg_s = y_bg_s.view(B, S, 2, h, w)
        p_bg = p_global  # without BGPE (Table III): the global prototype itself (Choices 13)
        if self.cleaner is not None:
            # Eq. (11): P_bg = P_global * FC(FC(GAP(F_q * y_bg^q))), y_bg^q as its hard background mask
            background = (y_bg_q.argmax(1, keepdim=True) == BACKGROUND).float()  # (B, 1, h, w)
            p_bg = p_global * self.cleaner((f_q * background).mean((2, 3)))  # (B, C)
        return p_bg, y_bg_q, y_bg_s


class CrossAttention(nn.Module):
    """"Cross" of Eq. (16), Choices 6: multi-head attention of the query pixels (queries) over the support tokens (keys
    and values: two projections of the same tokens), residual and LayerNorm, then an FFN, residual and LayerNorm: the
    official cross-attention layer. Dropped from the official: the deformable self-attention block (with its own FFN
    and LayerNorm) and its sine positional encoding, the cycle-consistency mask, the random sampling of 300 fg + 300
    bg keys (which mislabels its keys, a bug inherited from CyCTR, and makes test results seed-dependent), and its
    keys' content (gated support features, foreground and background).
    x (B,N,C) query tokens, tokens (B,L,C), valid (B,L) bool (the tokens that may be attended) -> (B,N,C)."""

    def __init__(self, dim, heads, ffn_dim, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.norm_attn, self.norm_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim, bias=False), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, dim, bias=False))
        self.drop = nn.Dropout(dropout)

    def attend(self, x, tokens, valid):
        B, N, C = x.shape
        d = C // self.heads
        q = self.to_q(x).view(B, N, self.heads, d).transpose(1, 2)  # (B, heads, N, d)
        k = self.to_k(tokens).view(B, -1, self.heads, d).transpose(1, 2)  # (B, heads, L, d)
        v = self.to_v(tokens).view(B, -1, self.heads, d).transpose(1, 2)  # (B, heads, L, d)
        # softmax(Q K^T / sqrt(d)) V per head, over the valid tokens only: torch's scaled_dot_product_attention, exactly
        # that formula (tested), whose fused GPU kernels need not hold the (h*w) x (K*h*w) attention matrix (3600 x
        # 18000 per head at 473 px, 5-shot)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :],
                                             dropout_p=self.dropout if self.training else 0.0)  # (B, heads, N, d)
        return self.to_out(out.transpose(1, 2).reshape(B, N, C))  # (B, N, C)

    def forward(self, x, tokens, valid):
        x = self.norm_attn(x + self.drop(self.attend(x, tokens, valid)))
        return self.norm_ffn(x + self.drop(self.ffn(x)))


class FFA(nn.Module):
    """§III-E Feature Filtering and Activation: background filtering (Eq. 12), activation maps (Eq. 13-14),
    fusion with P_pre (Eq. 15), two cross-attentions over the support foreground and the final Convs (Eq. 16).
    prototypes: those Eq. (15) takes (Table IV); activation_maps=False: broadcast P_main, P_aux instead (Table V)."""

    def __init__(self, dim, heads, ffn_dim, attn_dropout, head_dropout, layers, prototypes=("pre", "main", "aux"),
                 activation_maps=True):
        super().__init__()
        self.prototypes, self.activation_maps = prototypes, activation_maps  # Table IV, Table V
        evolved = ("main" in prototypes) + ("aux" in prototypes)
        # Conv_1 of Eq. (12) and (15): the paper names only the 1x1 conv; + ReLU (Choices 1). Eq. (15) concatenates
        # F_q', BC(P_pre) and an activation map (or, without them, a broadcast prototype) per evolved prototype
        fused = dim + dim * ("pre" in prototypes) + evolved * (1 if activation_maps else dim)
        self.filter = nn.Sequential(*common.conv_relu(2 * dim, dim, 1))
        self.fuse = nn.Sequential(*common.conv_relu(fused, dim, 1))
        self.cross = nn.ModuleList(CrossAttention(dim, heads, ffn_dim, attn_dropout) for _ in range(layers))
        self.convs = Convs(dim, dim, 0.0, head_dropout)

    def forward(self, f_q, f_s, m_s, p_bg, p_pre, p_main, p_aux):
        """f_q (B,C,h,w), f_s (B,S,C,h,w), m_s (B,S,H,W) support labels, prototypes (B,C) -> y_final (B,2,h,w)."""
        B, C, h, w = f_q.shape
        # Eq. (12): F_q' = Conv_1(Concat(F_q, BC(P_bg)))
        f_q1 = self.filter(torch.cat([f_q, broadcast(p_bg, f_q)], 1))  # (B, C, h, w)
        parts = [f_q1] + ([broadcast(p_pre, f_q)] if "pre" in self.prototypes else [])  # Table IV: Choices 15
        evolved = [p for name, p in (("main", p_main), ("aux", p_aux)) if name in self.prototypes]
        if not self.activation_maps:  # Table V "w/o activation maps": the broadcast prototypes (Choices 16)
            parts += [broadcast(p, f_q) for p in evolved]  # n x (B, C, h, w)
        elif evolved:
            # Eq. (13), (14): A(i) = cos(P, F_q(i)) for P_main and P_aux
            protos = torch.stack(evolved, 1)[..., None, None]  # (B, n, C, 1, 1): the maps in one call
            parts.append(F.cosine_similarity(f_q[:, None], protos, dim=2))  # (B, n, h, w): A_main, A_aux
        # Eq. (15): F_q'' = Conv_1(Concat(F_q', BC(P_pre), A_main, A_aux))
        f_q2 = self.fuse(torch.cat(parts, 1))  # (B, C, h, w)
        # Eq. (16): y_final = Convs(Cross(Cross(F_q'', F_s * M_s), F_s * M_s)), the keys the foreground pixels of all
        # shots (Choices 6). As the official (CyCTR's get_supp_flatten_input): the support label resized to h x w by
        # nearest (PyTorch's, input pixel floor(i H / h)), then == 1, so 255 is no key. M_s of Eq. (16) is that 0/1
        # mask, and a key enters unweighted, as F_s itself. Weighting the keys by the bilinear M_s of Eq. (1) would
        # not fit this selection: that mask samples the label at i (H - 1) / (h - 1), so a key can sit where it is 0
        # and become a zero token; and a token scaled towards 0 still takes softmax mass (its logit tends to 0, not
        # to -inf) while adding almost nothing, why "M_s > 0" does not select either.
        keys = common.foreground_at(m_s, (h, w), mode="nearest")  # (B, S, h, w), 1 on a key, else 0
        tokens = (f_s * keys[:, :, None]).permute(0, 1, 3, 4, 2).reshape(B, -1, C)  # (B, S*h*w, C)
        valid = keys.flatten(1) > 0  # (B, S*h*w)
        # a support set without any key (no foreground, or an object between the sampled pixels) leaves all-zero
        # tokens, which add exactly nothing (the official marks the 2 x 2 central pixels as foreground instead)
        valid = valid | ~valid.any(1, keepdim=True)
        x = f_q2.flatten(2).transpose(1, 2)  # (B, h*w, C)
        for cross in self.cross:
            x = cross(x, tokens, valid)  # (B, h*w, C)
        return self.convs(x.transpose(1, 2).reshape(B, C, h, w))  # (B, 2, h, w)


def background_mining_loss(y_bg, m, all_weight):
    """L_bm (NERTNet; official weighted_BCE + erfa term). y_bg (N,2,h,w) logits, channel BACKGROUND = background;
    m (N,H,W) labels {0,1,255}. Per image -log(1 - p_bg) averaged over its foreground (0 without one), mean over
    the images; plus all_weight x the mean of -log p_bg over every labelled pixel."""
    log_p = F.log_softmax(common.resize(y_bg.float(), m.shape[-2:]), 1)
    fg = (m == 1).float()  # (N, H, W)
    not_bg = -(log_p[:, 1 - BACKGROUND] * fg).sum((1, 2)) / (fg.sum((1, 2)) + BM_EPS)  # (N,)
    labelled = (m != common.IGNORE_INDEX).float()
    bg = -(log_p[:, BACKGROUND] * labelled).sum() / labelled.sum().clamp(min=1)
    return not_bg.mean() + all_weight * bg


class Model(nn.Module):
    """QPENet (Fig. 2). forward(img_q (B,3,H,W), img_s (B,S,3,H,W), m_s (B,S,H,W), class_ids unused) -> dict:
    logits (B,2,H,W) = y_final upsampled; m_s_down (B,S,h,w); y_pre (B,2,h,w), y_rev (B,S,2,h,w), m_main, m_aux
    (B,S,h,w) with FGPE; y_bg_q (B,2,h,w), y_bg_s (B,S,2,h,w); fem_aux (FEM's per-scale logits) with the FEM.
    Evaluation leaves out what only the loss reads (Choices 9)."""

    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.decoder == "fem" and (cfg.foreground_prototypes != "pre+main+aux" or not cfg.activation_maps):
            raise ValueError("foreground_prototypes and activation_maps choose the inputs of FFA's Eq. (15) (Tables IV "
                             "and V); the FEM decoder takes every prototype, broadcast (Choices 14)")
        for name in ("dim", "ffn_dim", "cross_layers"):  # Eq. (16) has two cross-attentions of dim channels
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        unread = {}  # fields a switch leaves unread: a run named by them would be another's
        if cfg.decoder == "fem":
            unread["decoder=fem"] = ("heads", "ffn_dim", "cross_layers", "attn_dropout")
        elif cfg.foreground_prototypes == "pre":
            unread["foreground_prototypes=pre"] = ("activation_maps",)  # no P_main, P_aux to activate
        for switch, names in unread.items():
            changed = [name for name in names if getattr(cfg, name) != getattr(Config, name)]
            if changed:
                raise ValueError(f"{', '.join(changed)}: no part of {switch} (it would change nothing)")
        if cfg.decoder == "ffa" and (cfg.heads < 1 or cfg.dim % cfg.heads):
            raise ValueError(f"heads={cfg.heads} must be at least 1 and divide dim={cfg.dim}: each of Eq. (16)'s "
                             "attention heads takes dim / heads channels")
        if cfg.dpe == "sgm" and not cfg.fgpe:
            raise ValueError("dpe=sgm replaces DPE, which fgpe=false leaves out (Table V ablates the full model)")
        self.cfg = cfg
        # torchvision's ResNet by default, the official's deep stem with --backbone resnet50_deep (Choices 1), with
        # PFENet's dilation, up to layer3: layer4 is never read
        self.backbone = common.Backbone(cfg.backbone, pretrained=cfg.pretrained, last="layer3")
        mid = self.backbone.channels["layer2"] + self.backbone.channels["layer3"]
        self.down = common.MidLevelReduction(mid, cfg.dim, cfg.feature_dropout)
        # Table III: FGPE = PPG + DPE (Choices 12), BGPE = GBC's cleaner (Choices 13)
        self.foreground = ForegroundEvolution(cfg.dim, cfg.feature_dropout, cfg.head_dropout) if cfg.fgpe else None
        self.gbc = GBC(cfg.dim, cfg.feature_dropout, cfg.head_dropout, clean=cfg.bgpe)
        prototypes = tuple(cfg.foreground_prototypes.split("+"))  # Table IV
        if cfg.decoder == "ffa":
            self.ffa = FFA(cfg.dim, cfg.heads, cfg.ffn_dim, cfg.attn_dropout, cfg.head_dropout, cfg.cross_layers,
                           prototypes, cfg.activation_maps)
        else:  # Table III's baseline decoder: extra maps BC(P_main), BC(P_aux), BC(P_bg) (Choices 14)
            self.fem = common.FEM(cfg.dim, extra_dim=3 * cfg.dim)
        # evaluation runs PPG and DPE only for a decoder that reads P_main or P_aux (Choices 9)
        self.reads_evolved = cfg.decoder == "fem" or "main" in prototypes or "aux" in prototypes

    def features(self, img):
        """F of §III-B for a batch of images (N,3,H,W) -> (N,C,h,w): mid-level features, reduced (Choices 1)."""
        return self.down(self.backbone(img))  # (N, C, h, w)

    def forward(self, img_q, img_s, m_s, class_ids=None):
        B, S = img_s.shape[:2]
        # 1. features of query and supports from the shared CNN; the support masks downsampled (M_s of Eq. 1)
        f = self.features(torch.cat([img_q, img_s.flatten(0, 1)]))  # (B + B*S, C, h, w)
        f_q, f_s = f[:B], f[B:].unflatten(0, (B, S))  # (B, C, h, w), (B, S, C, h, w)
        m = common.foreground_at(m_s, f.shape[-2:])  # (B, S, h, w)
        # 2. PPG (Eq. 1-3): preliminary prototype, preliminary query prediction, pseudo-prototype
        p_pre = shot_map(f_s, m)  # Eq. (1): P_pre = MAP(F_s, M_s), the baseline's prototype too: (B, C)
        p_main = p_aux = p_pre  # without FGPE (Table III; Choices 12)
        y_pre = y_rev = m_main = m_aux = fem_aux = None
        evolve = self.foreground is not None and (self.training or self.reads_evolved)  # Choices 9
        if evolve and (self.training or self.cfg.dpe == "dpe"):  # SGM reads no P_psd: y_pre for the loss only
            y_pre, p_psd = self.foreground.ppg(f_q, p_pre)  # (B, 2, h, w), (B, C)
        # 3. DPE (Eq. 4-8): reverse segmentation of the supports with P_psd (SGM, Table V: with P_pre), main and
        # auxiliary prototypes
        if evolve:
            guide = p_psd if self.cfg.dpe == "dpe" else p_pre
            y_rev, m_main, m_aux, p_main, p_aux = self.foreground.dpe(f_s, m, guide)  # y_rev (B, S, 2, h, w)
        # 4. GBC (Eq. 9-11): background maps and the cleaned background prototype (without BGPE: P_global)
        p_bg, y_bg_q, y_bg_s = self.gbc(f_q, f_s)  # (B, C), (B, 2, h, w), (B, S, 2, h, w) or None
        # 5. FFA (Eq. 12-16): filtering, activation, cross-attention, final Convs; or the baseline's FEM (Table III)
        if self.cfg.decoder == "ffa":
            y_final = self.ffa(f_q, f_s, m_s, p_bg, p_pre, p_main, p_aux)  # (B, 2, h, w)
        else:
            extra = torch.cat([broadcast(p, f_q) for p in (p_main, p_aux, p_bg)], 1)  # (B, 3C, h, w)
            y_final, fem_aux = self.fem(f_q, p_pre, extra, aux=self.training)  # (B, 2, h, w), per scale (B,2,b,b)
            fem_aux = fem_aux or None  # evaluation: the FEM returns [] (aux=False), not stored (Choices 9)
        logits = common.resize(y_final, img_q.shape[-2:])  # (B, 2, H, W)
        out = {"logits": logits, "y_pre": y_pre, "y_rev": y_rev, "y_bg_q": y_bg_q, "y_bg_s": y_bg_s,
               "m_main": m_main, "m_aux": m_aux, "m_s_down": m, "fem_aux": fem_aux}
        return {k: v for k, v in out.items() if v is not None}  # what this run computes (Choices 9)

    def loss(self, out, m_q, m_s):
        """Eq. (19): alpha L_fg + beta L_bg; every term returned by name. out: a training forward's dict (Choices 9),
        m_q (B,H,W), m_s (B,S,H,W)."""
        terms = {}
        # Eq. (17): L_fg = L_bce(y_pre, M_q) + L_bce(y_rev, M_s) + L_bce(y_final, M_q), Choices 7: "BCE" on two
        # logits is softmax cross-entropy, identical to BCE on the logit difference. 255 is ignored as the official
        # does for y_pre and y_final (its y_rev target, s_y == 1, counts the support's 255 pixels as background).
        # K shots: y_rev's term pools the labelled pixels of all shots.
        if self.foreground is not None:  # FGPE's terms (Table III; Choices 12)
            terms["pre"] = common.seg_loss(out["y_pre"], m_q)
            terms["rev"] = common.seg_loss(out["y_rev"].flatten(0, 1), m_s.flatten(0, 1))
        terms["final"] = common.seg_loss(out["logits"], m_q)
        if out.get("fem_aux"):  # the FEM decoder's auxiliary loss, PFENet's: the mean over its scales (Choices 14)
            terms["fem_aux"] = torch.stack([common.seg_loss(a, m_q) for a in out["fem_aux"]]).mean()
        # Eq. (18): L_bg = L_bm(y_bg^s, M_s) + L_bm(y_bg^q, M_q); K shots: the support's foreground part is a mean
        # per image, then over images and shots
        terms["bm_s"] = background_mining_loss(out["y_bg_s"].flatten(0, 1), m_s.flatten(0, 1), self.cfg.bm_all_weight)
        terms["bm_q"] = background_mining_loss(out["y_bg_q"], m_q, self.cfg.bm_all_weight)
        # Eq. (19): L = alpha (L_pre + L_rev + L_final) + beta (L_bm^s + L_bm^q); beta = 0.5 as the official, whose
        # L_bg is the mean of the query and support L_bm (0.5 x Eq. 18 for K = 1), Choices 7
        l_fg = sum(v for k, v in terms.items() if k not in ("bm_s", "bm_q"))  # ((pre + rev) + final) + fem_aux
        l_bg = terms["bm_s"] + terms["bm_q"]
        return self.cfg.alpha * l_fg + self.cfg.beta * l_bg, terms
