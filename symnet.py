"""Sym-Net: Symmetrical Joint Learning Support-query Prototypes for Few-shot Segmentation.

Q. Li, B. Sun, F. Xiao, Y. Qi, B. Bhanu (2024; the paper names no venue). Official code:
github.com/Sunbaoquan/Sym-Net @ 448f312 ("SN" below: model/SymNet.py), built on BAM (github.com/chunbolang/BAM).

Sym-Net forms the prototype symmetrically from both sides of the episode. A parameter-free prior (SPM) finds
the query object by matching pooled regions, weighted by a self-activation kernel. It selects confident query
pixels for a query prototype, which is built exactly like the support one. Both prototypes are aligned with the
class's word vector by attention (APA), trained with a hard-mined co-triplet loss, and averaged. Correlations of
every backbone block (TDC) restore the spatial detail that pooling loses. PFENet's FEM decodes everything, and
BAM's base learner ensemble (common.py) then suppresses base classes.

Paper -> code:
    §3.3 SPM, Eq. (1)-(3)              self_activation_prior
    §3.5 APA: Eq. (4)                  masked_average_pooling of the support (common.py)
              Eq. (5)                  prior_region_mean (the high-confidence query pixels)
              Eq. (6)-(8)              APA
              Eq. (9)                  SymNet.forward, stage 4
    §3.6 co-triplet loss: Eq. (10), (11) prior_region_mean (background and ambiguous query pixels)
              Eq. (12)                 triplet_term, SymNet.co_triplet
    §3.7 TDC, Eq. (13)                 block_correlation, TDC
    §3.8 decoder, Eq. (14)-(15)        common.FEM; SymNet.loss
    §4.1 base learner ("PSPNet serves as the base learner") -> common.BaseLearner, common.BAMEnsemble,
         trained by the stage `base` (common.train_base_learner)
    §4.1 word2vec text embeddings      build_word_vectors (GoogleNews binary -> file), load_word_vectors
K shots: K priors, K support prototypes (each through APA) and K sets of correlations, averaged (Fig. 2); the
co-triplet support term is averaged over the shots. Shots are averaged with equal weights (paper), not with
BAM's learned K-shot weights.

Choices (where the paper is silent we follow SN; differences from SN are said):
- Recipe as SN runs it (DEFAULTS): lr 0.05, the paper's 0.005 (§4.1) x 10, as SN's poly_learning_rate
  multiplies every group's (config: "base_lr: 0.005  # scale x 10"); global batch 32: the paper's "batch size
  of 8" is per process (SN's DataLoader under DistributedSampler, train.sh on 4 GPUs, §4.1's four V100s), so
  the run behind the tables took 32 episodes a step at lr 0.05. 200 / 50 epochs, 473 / 641 px, PFENet's
  augmentation (§4.1). The base learner's stage takes BAM's base recipe (STAGE_DEFAULTS: its configs
  *_base.yaml, one GPU's batch 12, the head's 10 x 2.5e-4, 417 px; 100 epochs on PASCAL, 20 on COCO).
- Backbone: the shared frozen ImageNet ResNet (common.Backbone) and its post-ReLU block outputs for TDC; SN
  uses BAM's PSPNet-fine-tuned deep-stem ResNet and pre-ReLU blocks. VGG is refused: TDC needs bottlenecks.
- F^m (c = 256, §4.1): PFENet's cat(layer3, layer2) -> 1x1 conv, ReLU, Dropout2d(0.5), separate weights for
  query and support (SN down_query / down_supp); §4.1 names stage 3 alone.
- Masks on the feature grid: bilinear (align_corners, PFENet's), a soft mask where Eq. (4) writes an indicator;
  it is binary only when (H-1)/(h-1) is whole (473 and 641 px), not at the synthetic 128 px.
- SPM: support mask resized bilinearly, padded zeros counted by the pooling (SN). Eq. (2)'s omega_q = <r_q, r_q>
  is called "the L2-norm" in the text: we use the norm |r_q|, as SN. Mean_j cos(r_q, r_s_j)|r_q|
  = r_q . mean_j(r_s_j / |r_s_j|) gives the same prior (within eps) without the HW x HW matrix S_r. Float32,
  like common.cosine_prior: min-max would amplify bf16 rounding.
- Empty regions (SN feat_aggregation): Eq. (5) falls back to the 12 highest-prior pixels (K-shot averaging or
  an empty support mask can leave none above tau1), Eq. (10) to the 12 lowest, Eq. (11) to the 12 around the
  median. Means via common.masked_average_pooling (area eps 5e-4, SN's Weighted_GAP for Eq. 4).
- APA as the paper: separate W^V, scores scaled by 1/sqrt(d), d = 256 (§4.1; §3.5 also calls the text width
  d, 300: the scale uses the prototype width c = 256); SN has V = K and an unscaled
  bilinear score. The undefined "FFN" is SN's Linear + Dropout(0.1). One APA serves both branches (SN).
- Word vectors: GoogleNews word2vec, unit length (as SN's rows); a name is its underscore-joined phrase if the
  binary has it, else the mean of its words; VOC's compound names use MIANet's words (WORD2VEC_ALIASES).
  Without --word-vectors the text input is zero (Table 5, row "Support & Query"); it is zero too whenever
  forward gets no class_ids (--predict), even with word vectors loaded.
- Co-triplet: distances between L2-normalised vectors (SN; margin 0.5 assumes unit scale); the support
  negative is the mean background feature (paper; SN averages normalised ones); items without foreground or
  background have no support term (SN); L = support term + query term (SN).
- TDC: per block, the mask-weighted mean of ReLU(cos) (SN's mean over foreground pixels when the mask is
  binary); 1x1 convs to 16 channels, GroupNorm + ReLU after the 3x3 merges and a last 3x3 conv to N' (SN).
  Top-down (layer4 with layer3, then layer2) as the name, the text and SN; Eq. (13) with §4.1's N1..N3 reads
  bottom-up. Concatenation as Eq. (13); SN adds.
- Loss: 2-class cross-entropy (= Eq. 14's BCE on the logit difference). With the base learner, BAM's CE on
  the meta learner's own output is added ("meta"), as SN.
- Base learner: --base-learner or common.base_learner_path(...) when the file exists. Checkpoints carry the
  base learner and the word vectors, so a trained model needs neither file.
"""
import dataclasses
import mmap
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data

TEXT_DIM = 300  # word2vec GoogleNews vectors (§4.1)
QUERY_FALLBACK = 12  # pixels used when a prior region is empty (SN feat_aggregation: topk 12, median +- 6)
TDC_EPS = 1e-5  # SN correlation.py: feature norms + 1e-5
# VOC's compound class names -> the words MIANet's embeddings use (notes §3; SN's vectors are MIANet's)
WORD2VEC_ALIASES = {"diningtable": "table", "pottedplant": "potted plant", "tvmonitor": "tv"}


@dataclasses.dataclass
class Config:
    backbone: str = "resnet50"  # §4.1
    pretrained: bool = True
    shot: int = 1
    img_size: int = 473  # §4.1 crop (COCO 641)
    dataset: str = "pascal"  # names the class ids of the word vectors and of the base learner
    fold: int = 0  # the base learner is per fold
    coco_split: str = "interleaved"  # data.py's default split: names the base classes of a COCO base learner
    data_root: str = None  # --data-root: where a folder dataset's classes are read (data.dataset_classes)
    test_classes: tuple = None  # --test-classes: a folder dataset's novel ids in place of the fold
    word_vectors: str = None  # --word-vectors: file of build_word_vectors; None: no text branch
    base_learner: str = None  # --base-learner; None: common.base_learner_path(...) if that file exists
    from_checkpoint: bool = False  # set by train.py: the checkpoint holds the base learner, or was trained without
    reduce_dim: int = 256  # c = d = 256 (§4.1)
    windows: tuple = ((5, 5), (7, 1), (1, 7))  # SPM pooling windows d_h x d_w (§4.1)
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


DEFAULTS = {  # SN's run (Choices): nominal lr 0.005 and batch 8 per GPU (§4.1), x 10 and x 4 GPUs
    "pascal": dict(lr=0.05, batch_size=32, epochs=200, img_size=473, augment="pfenet"),
    "coco": dict(lr=0.05, batch_size=32, epochs=50, img_size=641, augment="pfenet"),
}
STAGES = {"base": common.train_base_learner}
STAGE_DEFAULTS = {"base": {  # BAM config/*_base.yaml: batch 3 x 4 GPUs ("bs12 for 1GPU"), head lr 2.5e-4 x 10
    "pascal": dict(lr=0.0025, batch_size=12, epochs=100, img_size=417),
    "folder": dict(lr=0.0025, batch_size=12, epochs=100, img_size=417),  # PASCAL's
    "coco": dict(lr=0.0025, batch_size=12, epochs=20, img_size=417),
}}


def add_args(parser):
    parser.add_argument("--word-vectors", help="class word vectors (.pt) from symnet.build_word_vectors; "
                                               "without them APA's text branch is off")
    parser.add_argument("--base-learner", help="base learner checkpoint (default "
                                               "runs/base-DATASET-foldK-BACKBONE/base_learner.pt, written by "
                                               "--stage base; without it Sym-Net is the meta learner alone)")


# ----------------------------------------------------------------------------------------------------------
# Word vectors: GoogleNews word2vec binary -> {class name: unit 300-d vector}


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


def load_word_vectors(path, dataset, dim=TEXT_DIM, root=None):
    """Rows for the class ids of `dataset` (a folder dataset's: of its `root`) from a build_word_vectors file
    -> (num_classes+1, dim), row 0 zero."""
    vectors = torch.load(path, map_location="cpu")
    names = data.class_names(dataset, root)
    missing = [name for name in names.values() if name not in vectors]
    if missing:
        raise ValueError(f"word vectors {path} lack the {dataset} classes {missing}")
    table = torch.zeros(len(names) + 1, dim)
    for c, name in names.items():
        table[c] = vectors[name]
    return table


# ----------------------------------------------------------------------------------------------------------
# SPM, APA, co-triplet and TDC


def split_shots(x, S):
    """(B*S, ...) -> (B, S, ...): the support images of an episode were run through the backbone as one batch."""
    return x.view(-1, S, *x.shape[1:])


def self_activation_prior(f_q, f_s, m, windows):
    """SPM (§3.3): f_q (B,C,h,w), f_s (B,S,C,h,w) high-level (layer4) features, m (B,S,h,w) resized support
    masks. For each shot and window, the min-max normalised mean over support positions of cos(r_q, r_s) * |r_q|.
    These maps are averaged over the windows and then over the shots. Returns prior (B,1,h,w) in [0, 1]."""
    with torch.autocast(f_q.device.type, enabled=False):
        f_q, f_s = f_q.float(), f_s.float() * m.float()[:, :, None]  # (B,S,C,h,w): support background out
        B, S, C, h, w = f_s.shape
        shots = []
        for k in range(S):
            maps = []
            for dh, dw in windows:
                # Eq. (1): r = AvgPool_{dh x dw}(F), padding keeping the size (padded zeros counted, as SN)
                r_q = F.avg_pool2d(f_q, (dh, dw), 1, (dh // 2, dw // 2)).flatten(2)  # (B, C, hw)
                r_s = F.avg_pool2d(f_s[:, k], (dh, dw), 1, (dh // 2, dw // 2)).flatten(2)  # (B, C, hw)
                # Eq. (2)-(3): Mean_j cos(r_q, r_s_j) * |r_q| = r_q . mean_j (r_s_j / |r_s_j|)
                direction = (r_s / (r_s.norm(dim=1, keepdim=True) + common.COSINE_EPS)).mean(2)  # (B, C)
                score = torch.einsum("bcn,bc->bn", r_q, direction)  # (B, hw)
                low, high = score.min(1, keepdim=True).values, score.max(1, keepdim=True).values
                maps.append((score - low) / (high - low + common.COSINE_EPS))  # Norm(.)
            shots.append(torch.stack(maps).mean(0))  # (B, hw): the prior M^pri of shot k
        return torch.stack(shots).mean(0).view(B, 1, h, w)  # (B, 1, h, w)


def prior_region_mean(f, inside, prior, fallback):
    """Mean of f (B,C,h,w) over the pixels where `inside` (B,1,h,w) holds (Eq. 5, 10, 11). An image with no
    such pixel uses the QUERY_FALLBACK pixels of the `fallback` rank of the prior: "top", "median" or
    "bottom". Returns (B,C)."""
    order = prior.flatten(1).argsort(1)  # (B, hw) ascending
    n = order.shape[1]
    k = min(QUERY_FALLBACK, n)
    start = {"bottom": 0, "median": n // 2 - k // 2, "top": n - k}[fallback]
    ranked = torch.zeros_like(order, dtype=f.dtype).scatter_(1, order[:, start:start + k], 1.0).view_as(prior)
    empty = inside.flatten(1).sum(1) == 0  # (B,)
    region = torch.where(empty[:, None, None, None], ranked, inside.to(f.dtype))  # (B, 1, h, w)
    return common.masked_average_pooling(f, region)  # (B, C)


class APA(nn.Module):
    """Visual-text alignment (§3.5, Fig. 4): single-head attention whose query is the prototype concatenated
    with the word vector and whose keys / values are the mask- (support) or prior-weighted (query) features.
    forward(proto (B,c), text (B,d), f (B,c,h,w) weighted features) -> augmented prototype (B,c)."""

    def __init__(self, dim, text_dim, dropout):
        super().__init__()
        self.w_q = nn.Linear(dim + text_dim, dim, bias=False)  # W^Q in R^{(c+d) x c}
        self.w_k = nn.Conv2d(dim, dim, 1, bias=False)  # W^K, 1x1 conv
        self.w_v = nn.Conv2d(dim, dim, 1, bias=False)  # W^V, 1x1 conv
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))  # SN's "FFN": proj + dropout
        self.scale = dim ** -0.5  # 1/sqrt(d), d = 256 (§4.1)

    def forward(self, proto, text, f):
        # Eq. (6)-(7): Q = (p ⊕ t) W^Q, K = F~ W^K, V = F~ W^V
        q = self.w_q(torch.cat([proto, text.to(proto.dtype)], 1))  # (B, c)
        k, v = self.w_k(f).flatten(2), self.w_v(f).flatten(2)  # (B, c, hw) each
        # Eq. (8): p_aug = FFN(Softmax(Q K^T / sqrt(d)) V) + p
        attention = torch.softmax(torch.einsum("bc,bcn->bn", q, k) * self.scale, dim=1)  # (B, hw)
        return self.ffn(torch.einsum("bn,bcn->bc", attention, v)) + proto  # (B, c)


def triplet_term(anchor, positive, negative, margin):
    """Eq. (12), one branch: max(|a - p+| + margin - |a - p-|, 0) on L2-normalised (B,c) vectors -> (B,)."""
    a, p, n = (F.normalize(x.float(), dim=1) for x in (anchor, positive, negative))
    return F.relu(F.pairwise_distance(a, p) + margin - F.pairwise_distance(a, n))


def block_correlation(f_q, f_s, m):
    """One TDC channel: for every query pixel, the mask-weighted mean over support pixels of ReLU(cos).
    f_q (B,C,h,w), f_s (B,C,h,w) features of one block, m (B,h,w) support mask -> (B,1,h,w)."""
    B, C, h, w = f_q.shape
    q, s = f_q.flatten(2), f_s.flatten(2)  # (B, C, hw)
    q = q / (q.norm(dim=1, keepdim=True) + TDC_EPS)
    s = s / (s.norm(dim=1, keepdim=True) + TDC_EPS)
    cos = torch.bmm(q.transpose(1, 2), s).clamp(min=0)  # (B, hw_q, hw_s)
    weights = m.flatten(1).to(cos.dtype)  # (B, hw_s)
    # mean over the support mask, with the area eps of PFENet's prototype pooling (common.MAP_EPS)
    corr = torch.bmm(cos, weights[:, :, None])[:, :, 0] / (weights.sum(1, keepdim=True) + common.MAP_EPS)
    return corr.view(B, 1, h, w)  # (B, 1, h, w)


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
# Sym-Net


def read_base_learner(cfg):
    """The base learner checkpoint of --stage base for this dataset, fold and backbone, or None (with one
    warning when the default path is empty, unless a checkpoint is to be loaded; SymNet deals with a
    --base-learner file that does not exist)."""
    if cfg.from_checkpoint:
        return None  # the checkpoint holds the base learner, or was trained without one
    path = Path(cfg.base_learner or common.base_learner_path(cfg.dataset, cfg.fold, cfg.backbone, cfg.data_root,
                                                             cfg.test_classes))
    if not path.is_file():
        if not cfg.base_learner:
            warnings.warn(f"no base learner at {path}: Sym-Net runs as the meta learner alone "
                          f"(train one with: python train.py --model symnet --stage base --fold {cfg.fold})")
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    expected = common.base_classes(cfg.dataset, cfg.fold, cfg.coco_split, cfg.data_root, cfg.test_classes)
    if state["backbone"] != cfg.backbone or list(state["classes"]) != expected:
        raise ValueError(f"base learner {path} was trained for {state['backbone']}, classes {state['classes']}; "
                         f"this model needs {cfg.backbone}, classes {expected}")
    random = "backbone_buffers" in state  # saved with the random backbone's BatchNorm statistics
    if random == cfg.pretrained:
        kinds = {True: "random (--no-pretrained)", False: "ImageNet"}
        raise ValueError(f"base learner {path} was trained on {kinds[random]} backbone weights; this model uses "
                         f"{kinds[not cfg.pretrained]} ones")
    return state


class SymNet(nn.Module):
    """Sym-Net (Fig. 2) as the meta learner, with BAM's base learner ensemble when its checkpoint exists.
    forward(img_q (B,3,H,W), img_s (B,S,3,H,W), m_s (B,S,H,W), class_ids (B,) or None) -> {"logits" (B,2,H,W),
    "meta" (B,2,h,w) FEM output, "aux" [4 x (B,2,b,b)], "triplet" () (0 in eval), "prior" (B,1,h,w)}."""

    def __init__(self, cfg: Config):
        super().__init__()
        if not cfg.backbone.startswith("resnet"):
            raise ValueError(f"Sym-Net's TDC correlates every bottleneck block: it needs a ResNet, not {cfg.backbone}")
        self.cfg = cfg
        # Files named by flags but absent are an error at the first forward, unless a checkpoint (which holds
        # the word vectors and the base learner) is loaded first: a trained model needs neither file.
        flags = {"--word-vectors": cfg.word_vectors, "--base-learner": cfg.base_learner}
        self.missing_files = [f"{flag} {path}" for flag, path in flags.items() if path and not Path(path).is_file()]
        text = None
        if cfg.word_vectors and Path(cfg.word_vectors).is_file():
            text = load_word_vectors(cfg.word_vectors, cfg.dataset, root=cfg.data_root)
        base_state = read_base_learner(cfg)  # files first: their errors come before the backbone is built
        if not cfg.word_vectors:
            warnings.warn("Sym-Net without --word-vectors: APA's text branch is off (Table 5, 'Support & Query')")
        self.backbone = common.Backbone(cfg.backbone, pretrained=cfg.pretrained)
        ch, c = self.backbone.channels, cfg.reduce_dim
        self.blocks = [len(self.backbone.stages[name]) for name in common.BLOCK_STAGES]  # [4, 6, 3] ResNet-50
        self.down_query, self.down_supp = (
            nn.Sequential(nn.Conv2d(ch["layer3"] + ch["layer2"], c, 1, bias=False), nn.ReLU(inplace=True),
                          nn.Dropout2d(cfg.mid_dropout)) for _ in range(2))
        self.apa = APA(c, TEXT_DIM, cfg.apa_dropout)
        self.tdc = TDC(self.blocks, cfg.tdc_hidden, cfg.hyper_dim)
        self.fem = common.FEM(c, extra_dim=cfg.hyper_dim + 1)  # extra: [F^hyper, M^pri]
        # row c: the word vector of class c (zeros: text off); a buffer, so that checkpoints carry it
        if text is None:
            text = torch.zeros(len(data.class_names(cfg.dataset, cfg.data_root)) + 1, TEXT_DIM)
        self.register_buffer("text", text)
        self.base_learner = self.ensemble = None
        if base_state is not None:
            self._attach_base_learner(base_state["classes"])
            self.base_learner.load_state_dict(base_state["model"])
            if not cfg.pretrained and "backbone_buffers" in base_state:  # random weights: the base stage's BN
                self.backbone.load_state_dict(base_state["backbone_buffers"], strict=False)  # statistics
                self.backbone.calibrated = True

    def _attach_base_learner(self, classes):
        device = self.text.device
        self.base_learner = common.BaseLearner(self.backbone.channels["layer4"], classes).freeze().to(device)
        self.ensemble = common.BAMEnsemble().to(device)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """A checkpoint carries the base learner and ensemble weights, or was trained without them."""
        if "base_learner.classes" in state_dict and self.base_learner is None:
            self._attach_base_learner(state_dict["base_learner.classes"].tolist())
            print("Sym-Net: base learner and ensemble restored from the checkpoint")
        elif "base_learner.classes" not in state_dict:
            self.base_learner = self.ensemble = None
            if self.cfg.from_checkpoint:
                print("Sym-Net: the checkpoint was trained without a base learner: the meta learner alone")
        self.missing_files = []
        return super().load_state_dict(state_dict, strict, assign)

    def co_triplet(self, f_q, f_s, m_s, prior, p_q_aug, p_s_aug):
        """Eq. (10)-(12) (training only): f_q (B,c,h,w), f_s (B,S,c,h,w), m_s (B,S,H,W) labels, prior
        (B,1,h,w), anchors p_q_aug, p_s_aug (B,c). Returns the scalar L_co-triplet."""
        cfg = self.cfg
        # Eq. (10), (11): query negative (prior < tau2) and hard positive (tau3 < prior < tau4)
        p_q_neg = prior_region_mean(f_q, prior < cfg.tau2, prior, "bottom")  # (B, c)
        p_q_pos = prior_region_mean(f_q, (prior > cfg.tau3) & (prior < cfg.tau4), prior, "median")  # (B, c)
        loss_q = triplet_term(p_q_aug, p_q_pos, p_q_neg, cfg.margin).mean()  # Eq. (12), query branch
        # support: the foreground pixel farthest from the anchor, and the mean background feature, per shot
        fg = F.interpolate((m_s == 1).float(), f_s.shape[-2:], mode="nearest")  # (B, S, h, w)
        bg = 1 - fg  # (B, S, h, w): 255 counts as background, as in SN and in the rest of this file
        anchor = F.normalize(p_s_aug.float(), dim=1)  # (B, c)
        losses_s = []
        for k in range(f_s.shape[1]):
            pixels = f_s[:, k].flatten(2)  # (B, c, hw)
            dist = (F.normalize(pixels.float(), dim=1) - anchor[:, :, None]).norm(dim=1)  # (B, hw)
            hardest = dist.masked_fill(fg[:, k].flatten(1) == 0, -1).argmax(1)  # (B,)
            p_s_pos = pixels.gather(2, hardest.view(-1, 1, 1).expand(-1, pixels.shape[1], 1))[:, :, 0]  # (B, c)
            p_s_neg = common.masked_average_pooling(f_s[:, k], bg[:, k])  # (B, c)
            valid = ((fg[:, k].flatten(1).sum(1) > 0) & (bg[:, k].flatten(1).sum(1) > 0)).float()  # (B,)
            terms = triplet_term(p_s_aug, p_s_pos, p_s_neg, cfg.margin)  # Eq. (12), support branch: (B,)
            losses_s.append((terms * valid).sum() / valid.sum().clamp(min=1))
        return loss_q + torch.stack(losses_s).mean()

    def forward(self, img_q, img_s, m_s, class_ids=None):
        if self.missing_files:
            raise FileNotFoundError(f"no such file: {', '.join(self.missing_files)}")
        cfg, (B, S), (H, W) = self.cfg, img_s.shape[:2], img_q.shape[-2:]
        # 1. frozen backbone: layer2-4 and every bottleneck block of query and supports
        feats_q, feats_s = self.backbone.episode(img_q, img_s, blocks=True)  # (B, ...) and (B*S, ...) entries
        # 2. mid-level features F^m and the resized support masks
        f_q = self.down_query(torch.cat([feats_q["layer3"], feats_q["layer2"]], 1))  # (B, c, h, w)
        f_s = split_shots(self.down_supp(torch.cat([feats_s["layer3"], feats_s["layer2"]], 1)), S)  # (B, S, c, h, w)
        h, w = f_q.shape[-2:]
        m = F.interpolate((m_s == 1).float(), (h, w), mode="bilinear", align_corners=True)  # (B, S, h, w)
        # 3. SPM: the prior mask M^pri (Eq. 1-3)
        prior = self_activation_prior(feats_q["layer4"], split_shots(feats_s["layer4"], S), m, cfg.windows)  # (B,1,h,w)
        # 4. APA: symmetrical prototypes aligned with the word vector (Eq. 4-9)
        text = self.text[class_ids] if class_ids is not None else self.text.new_zeros(B, TEXT_DIM)  # (B, d)
        p_s_aug = torch.stack([self.apa(common.masked_average_pooling(f_s[:, k], m[:, k]),  # Eq. (4)
                                        text, f_s[:, k] * m[:, k, None]) for k in range(S)]).mean(0)  # (B, c)
        p_q = prior_region_mean(f_q, prior > cfg.tau1, prior, "top")  # Eq. (5)
        p_q_aug = self.apa(p_q, text, f_q * prior.to(f_q.dtype))  # (B, c)
        # Eq. (9): p_hybrid = alpha p_q_aug + beta p_s_aug
        p_hybrid = cfg.alpha * p_q_aug + cfg.beta * p_s_aug  # (B, c)
        # 5. TDC: block correlations per stage, averaged over shots, fused top-down (Eq. 13)
        blocks_q, blocks_s = feats_q["blocks"], [split_shots(x, S) for x in feats_s["blocks"]]
        corr = [torch.stack([block_correlation(q, s[:, k], m[:, k]) for k in range(S)]).mean(0)
                for q, s in zip(blocks_q, blocks_s)]  # 13 x (B, 1, h, w)
        ends = np.cumsum([0, *self.blocks])
        hyper = self.tdc([torch.cat(corr[a:b], 1) for a, b in zip(ends[:-1], ends[1:])])  # (B, N', h, w)
        # 6. FEM decoder on query features, hybrid prototype, hyper-correlation and prior
        meta, aux = self.fem(f_q, p_hybrid, torch.cat([hyper, prior.to(hyper.dtype)], 1))  # (B, 2, h, w)
        # 7. BAM's ensemble with the base learner, when there is one
        logits = meta
        if self.ensemble is not None:
            with torch.no_grad():
                base = self.base_learner(feats_q["layer4"])  # (B, 1+n, h, w)
                est = common.gram_distance(feats_q["layer2"], split_shots(feats_s["layer2"], S))  # (B,)
            logits = self.ensemble(meta, base, est, self.base_learner.classes, class_ids)  # (B, 2, h, w)
        # 8. co-triplet loss (Eq. 10-12), training only
        triplet = self.co_triplet(f_q, f_s, m_s, prior, p_q_aug, p_s_aug) if self.training else meta.new_zeros(())
        logits = F.interpolate(logits, (H, W), mode="bilinear", align_corners=True)  # (B, 2, H, W)
        return {"logits": logits, "meta": meta, "aux": aux, "triplet": triplet, "prior": prior}

    def loss(self, out, m_q, m_s):
        """Eq. (15): L = L_co-triplet + L_inter-seg (mean of the 4 FEM scales) + L_final-seg, plus "meta" (CE on
        the meta learner's own output) when the ensemble gives the final output (BAM, SN)."""
        # Eq. (14): each L_seg is BCE, here 2-class cross-entropy (the same on the logit difference)
        terms = {"final": common.seg_loss(out["logits"], m_q),
                 "inter": torch.stack([common.seg_loss(a, m_q) for a in out["aux"]]).mean(),
                 "triplet": out["triplet"]}
        if self.ensemble is not None:
            terms["meta"] = common.seg_loss(out["meta"], m_q)
        return sum(terms.values()), terms


Model = SymNet
