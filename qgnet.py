"""QGNet: few-shot segmentation guided by the query itself, with a contrastively pretrained prior extractor.

W. Liu, Z. Wu, H. Ding, F. Liu, J. Lin, G. Lin, W. Zhou, "Few-Shot Segmentation with Global and Local Contrastive
Learning", arXiv:2108.05293v2 (journal version; no venue in the text). Official code, few-shot stage only:
github.com/liuweide01/QGNet-Few-shot-segmentation @ 1e77b35 ("official": model/PFENet_QGNet.py).

Stage 1 trains a ResNet-50 "prior extractor" F_p without labels: MoCo v2 on whole images (global InfoNCE) plus
MoCo v2 on local patches, SLIC superpixels or Felzenszwalb segments (local InfoNCE). Stage 2 is PFENet with one
more map: the query's bridge features (frozen ImageNet backbone) against its own prior features (frozen F_p), each
through a learnable projection, give a "prior region map" that needs no support; FEM takes it with PFENet's guided
region map (support-masked prior) and the category guider (masked average pooling).

    python train.py --model qgnet --stage prior --fold 0 --data-root ~/data/VOC2012   # stage 1 -> runs/qgnet-prior-*
    python train.py --model qgnet --fold 0 --data-root ~/data/VOC2012                 # stage 2 loads it

Stage 1's values are the fields of PriorConfig, set with --set at --stage prior (STAGE_CONFIGS). Config has the same
fields (it extends PriorConfig): both stages name the stage-1 file by them, each value that differs from the
dataset's recipe (prior_config) as FIELD=VALUE, runs/qgnet-prior-SPLIT[-all][-FIELD=VALUE...]/prior_extractor.pt.
An ablation of stage 1 is one --set, given to both commands:
    python train.py --model qgnet --stage prior --fold all --set patches=felzenszwalb   # Table 5, stage 1
    python train.py --model qgnet --fold all --set patches=felzenszwalb                 # its few-shot stage

Paper -> code:
    §4.1.1 Eq. (1) global InfoNCE, §4.1.2 Eq. (2) local    info_nce; GlobalLocalContrast (queues, momentum keys)
    §4.1.2 Eq. (3) L = L_local + L_global; Table 6         GlobalLocalContrast.forward (PriorConfig.contrast)
    §4.1.2 Algorithm 1: Felzenszwalb patches; Table 5      felzenszwalb, gaussian_blur; segmenter (PriorConfig.patches)
    §4.1.2 Eq. (4)-(7), Algorithm 2: SLIC patches          rgb_to_lab, slic, connected_components,
                                                            enforce_connectivity; superpixel_boxes
    §5.1 prior-extractor training, MoCo v2 augmentations    moco_v2_augmentation, UnlabeledImages, STAGES["prior"]
    §4.2 Eq. (8) X_q, X_s = F(I), P_q = F_p(I_q)             common.Backbone; build, read_prior_extractor
    §4.2.1 Eq. (9)-(12) prior region map; §4.3              prior_region_map (common.cosine_prior without a mask)
    §4.2.2 guided region map, category guider, FEM          Model.forward (common.cosine_prior, MAP, FEM)
    §5.4 Eq. (16), Table 7: the region maps' recall         Model.forward's "region_maps" (train.py scores them)

Choices (the paper is silent unless said otherwise; the official code has no stage 1 at all):
- Patch = the bounding box of a random segment, cropped from the image, two MoCo v2 views of it (96 px, crop area
  0.5-1, not 0.2-1: a patch is small already). Not masked to the segment: its silhouette, the same in both views,
  would be a shortcut. Segments are computed once per image, before training, on a copy with a 128 px long side.
- One encoder and one momentum encoder for images and patches; separate queues of image keys (K) and patch keys
  (M), 65536 each (§4.1); older keys of the same image stay negatives (MoCo). The rest is MoCo v2's ("following
  MoCo v2", §5.1; values at PriorConfig); random init (the official file, epoch 2000, suggests from scratch).
- SLIC: 16 superpixels (§5.4, Fig. 4: SLIC's patches are the larger), m = 10 (Achanta et al.), <= 10 iterations
  or mean centre shift < 0.5 px; parts below S^2/2 join their largest neighbour (scikit-image's min_size_factor).
- Felzenszwalb: the authors' own values for ~128 px images, k = 300 and sigma = 0.8, parts under 50 px merged:
  smaller patches than SLIC's, as §5.4 says of Fig. 4 (measured: PriorConfig.felzenszwalb_min_size).
- Table 6's rows train on L_local or L_global alone; the other loss's queue, views and encoder passes are not
  made (global alone segments no image).
- Images: the fold's few-shot training images (labels unused). --prior-all-images takes every image of the dataset
  as §5.1 does; not the default, as it shows F_p the test images and their novel classes.
- F_p = the momentum encoder (official loader: "encoder_k"), dilated to output stride 8 (official L62-71). Frozen
  backbones keep BN in eval (official: running statistics drift); bridge backbone from torchvision (7x7 stem), not
  PSPNet's deep-stem resnet50_v2.
- Recipe as the official code runs it: PASCAL lr 0.025 (§5.2's 0.0025 x 10, as its poly_learning_rate multiplies
  every group's), batch 4, 200 epochs, 473 px. COCO, which neither the official code nor the paper sets: PFENet's
  one-GPU run (lr 0.005 x 10, batch 8, 50 epochs) at the paper's 473 px. Augmentation: PFENet's (the official
  train.py's; §5.1 names its crop, scale and flip).
- Training images: the harness's list, filtered as BAM's (no image with a pixel of a novel class; data.py), like
  every model here. The official code trains on PFENet's list, which keeps those images and relabels their
  novel-class pixels as background.
- K shots: the guided map and the guider are averaged over shots (official); the prior map sees only the query.
- Eq. (9) compares X_q and P_q after a learnable 3x3 conv (256, ReLU, Dropout 0.5) on each: the official
  down_learn_super / down_learn_unsuper (L153-162); the paper compares the raw features.
- F (the bridge backbone) is frozen, as in the official code and every model here; §4.2.1 says it was fine-tuned
  on the labelled training images.
- FEM's query input is the reduced mid-level query feature (cat(layer3, layer2) -> 1x1 conv, PFENet's down_query,
  official L208-209), not the bridge features §4.2.2 names; likewise the category guider pools the reduced
  mid-level support feature (down_supp, official L229-231), not X_s.
- Table 7's region maps are oriented as Eq. (16) reads them, high on the object: the prior map as 1 - S_Q, since
  §4.3 finds S_Q low on the object. S_Q's own recall at alpha is 1 - this one's at 1 - alpha.
"""
import dataclasses
import math
import sys
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

import common
import data

PRIOR_CHANNELS = 2048  # ResNet-50 layer4, the prior features P_q (official L184-188)


@dataclass
class PriorConfig:
    """Stage 1 (§4.1, §5.1): --set FIELD=VALUE at --stage prior. None: the dataset's recipe (prior_config)."""
    patches: Literal["slic", "felzenszwalb"] = "slic"  # Table 5: §4.1.2's patch generation method 2 or 1
    contrast: Literal["local+global", "local", "global"] = "local+global"  # Table 6; Eq. (3) L = L_local + L_global
    prior_epochs: int = None  # Table 5: 1000 (best, with SLIC) or 2000; §5.1: PASCAL 1000, COCO 200
    prior_batch_size: int = None  # MoCo v2: 256
    prior_lr: float = None  # None: MOCO_LR * batch / MOCO_BATCH
    prior_queue: int = None  # §4.1.1 K and §4.1.2 M: 65536
    prior_img_size: int = None  # MoCo v2's crop: 224
    prior_patch_size: int = None  # ours: 96, SwAV's small-crop size, for a segment of a few % of the image
    embedding_dim: int = 128  # MoCo v2
    temperature: float = 0.2  # MoCo v2's tau (the paper names tau without a value)
    key_momentum: float = 0.999  # MoCo's momentum m of the key encoder
    bn_splits: int = 8  # MoCo's shuffle BN over 8 GPUs
    segment_side: int = 128  # ours: long side of the image copy that SLIC or Felzenszwalb segments
    slic_segments: int = 16  # ours, see Choices
    slic_compactness: float = 10.0  # m of Eq. (4), Achanta et al.'s default for CIELAB
    felzenszwalb_k: float = 300.0  # tau(C) = k / |C| on 0-255 intensities: Felzenszwalb & Huttenlocher's, 128 px
    felzenszwalb_sigma: float = 0.8  # their Gaussian smoothing before the graph
    # Ours: 50 px of the 128 px copy (a box of >= ~7 px). On six scikit-image photos this gave 9-33 segments of
    # median area 0.7-2.7% (SLIC: 11-15 of 6-9%); min 20 (their code's example) 14-51 of 0.2-1.2%.
    felzenszwalb_min_size: int = 50


@dataclass
class Config(PriorConfig):
    """Stage 2 (§4.2), after stage 1's fields (PriorConfig's), which name the stage-1 file it reads. Fields named
    like a flag are filled from the command line."""
    backbone: str = "resnet50"  # §5.1: ResNet-50/101 or VGG-16 feature extractor F
    pretrained: bool = True
    prior_checkpoint: str = None  # stage 1's file; None: prior_checkpoint_path's default for the run
    prior_all_images: bool = False  # the default file is that of stage 1 on every image
    untrained_prior: bool = False  # random F_p instead of stage 1's (tests)
    reduce_dim: int = 256  # official reduce_dim
    projection_dropout: float = 0.5  # official down_learn_super/unsuper Dropout2d (L153-162)
    feature_dropout: float = 0.5  # PFENet down_query/down_supp Dropout2d
    aux_weight: float = 1.0  # official config aux_weight
    bins: tuple = common.FEM_BINS  # PASCAL ppm_scales 60/30/15/8 at 473 px


STAGE_CONFIGS = {"prior": PriorConfig}  # what --set sets at --stage prior

DEFAULTS = {
    "pascal": dict(lr=0.025, batch_size=4, epochs=200, img_size=473, augment="pfenet"),  # §5.2's 0.0025 x 10
    "coco": dict(lr=0.05, batch_size=8, epochs=50, img_size=473, augment="pfenet"),  # PFENet's 1-GPU COCO run
}

# Stage 1's recipe for the PriorConfig fields left None (a folder dataset takes PASCAL's): §5.1's epochs, MoCo v2's
# batch and crop, §4.1's queues, our patch views. Synthetic: a CPU-sized quick start (its images are 128 px).
PRIOR_RECIPE = dict(prior_epochs=1000, prior_batch_size=256, prior_queue=65536, prior_img_size=224, prior_patch_size=96)
PRIOR_RECIPES = {"coco": dict(PRIOR_RECIPE, prior_epochs=200),
                 "synthetic": dict(prior_epochs=4, prior_batch_size=32, prior_queue=4096, prior_img_size=64,
                                   prior_patch_size=32)}


def add_args(parser):
    parser.add_argument("--prior-checkpoint", help="stage-1 checkpoint, written by --stage prior and read by the "
                        "few-shot stage (default runs/qgnet-prior-SPLIT[-all][-FIELD=VALUE...]/prior_extractor.pt)")
    parser.add_argument("--prior-all-images", action="store_true", default=None,
                        help="stage 1 on every image of the dataset, test images included, as the paper")
    parser.add_argument("--untrained-prior", action="store_true", default=None,
                        help="random prior extractor instead of stage 1's (for tests)")


# ----------------------------------------------------------------------------------------------------------
# Stage 2, §4.2: the few-shot network


def prior_region_map(x_q, p_q):
    """Eq. (9)-(12): s_q = max over prior pixels q' of cos(x_q, p_q'), then (S - min) / (max - min + 1e-7) per image:
    PFENet's prior with P_q as an unmasked "support". x_q (B,C,h,w) bridge, p_q (B,C,h',w') prior -> (B,1,h,w)."""
    everywhere = torch.ones(p_q.shape[0], *p_q.shape[-2:], dtype=torch.long, device=p_q.device)  # (B, h', w')
    return common.cosine_prior(x_q, p_q, everywhere)


def projection(c_in, c_out, p):
    """3x3 conv (no bias) + ReLU + Dropout2d: official down_learn_super/unsuper (L153-162)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(p))


class Model(nn.Module):
    """forward(img_q, img_s, m_s) -> {"logits" (B,2,H,W), "aux": FEM's per-scale logits, "region_maps": {"guided",
    "prior"}: (B,1,h,w) in [0, 1], high on the object (Table 7)}.

    prior_weights: F_p's state dict (build reads it from stage 1's file); None: a random F_p, for a checkpoint's
    weights to replace (or --untrained-prior). Built with build(cfg, setting)."""

    def __init__(self, cfg: Config, prior_weights=None):
        super().__init__()
        self.cfg = cfg
        self.backbone = common.Backbone(cfg.backbone, pretrained=cfg.pretrained)  # F, frozen
        # F_p, frozen: a ResNet-50 dilated to output stride 8 as the official code (L62-71) and common.Backbone
        self.prior_extractor = common.Backbone("resnet50", pretrained=False)
        if prior_weights is not None:
            self.prior_extractor.load_state_dict(prior_weights)
            self.prior_extractor.calibrated = True  # stage 1's BatchNorm statistics: train.py keeps them
        c, d = self.backbone.channels, cfg.reduce_dim
        self.bridge_proj = projection(c["layer4"], d, cfg.projection_dropout)  # official down_learn_super
        self.prior_proj = projection(PRIOR_CHANNELS, d, cfg.projection_dropout)  # official down_learn_unsuper
        self.down_query = common.MidLevelReduction(c["layer3"] + c["layer2"], d, cfg.feature_dropout)
        self.down_supp = common.MidLevelReduction(c["layer3"] + c["layer2"], d, cfg.feature_dropout)
        self.fem = common.FEM(d, extra_dim=2, bins=cfg.bins)  # [guided map, prior map]: official init_merge 514

    def forward(self, img_q, img_s, m_s, class_ids=None):
        B, S = img_s.shape[:2]
        # 1. Eq. (8): X_q = F(I_q), X_s = F(I_s), P_q = F_p(I_q), all frozen
        f_q, f_s = self.backbone.episode(img_q, img_s, m_s=m_s)  # layer2..4: (B, C, h, w), (B*S, C, h, w)
        p_q = self.prior_extractor(img_q)["layer4"]  # (B, 2048, h, w)
        # 2. prior region map, Eq. (9)-(12), between the projected bridge and prior features of the query alone.
        # §4.3: this map is LOW on the object and high on the background, opposite to the guided map (F_p moved
        # object features away from the bridge feature space, backgrounds stayed close); FEM learns to read both.
        prior_map = prior_region_map(self.bridge_proj(f_q["layer4"]), self.prior_proj(p_q))  # (B, 1, h, w)
        # 3. guided region map (§4.2.2): the support's layer4 of its masked layer3 (PFENet; episode's m_s),
        # masked again by cosine_prior, averaged over the shots
        f_s4 = f_s["layer4"]  # (B*S, C4, h, w)
        guided_map = common.cosine_prior(f_q["layer4"], f_s4.view(B, S, *f_s4.shape[1:]), m_s)  # (B, 1, h, w)
        # 4. category guider: masked average pooling of the support's mid-level features, mean over shots
        m = common.foreground_at(m_s.flatten(0, 1), f_s["layer3"].shape[-2:])  # (B*S, h, w), PFENet
        f_s23 = self.down_supp(f_s)  # cat(layer3, layer2) reduced: (B*S, 256, h, w)
        guider = common.masked_average_pooling(f_s23, m).view(B, S, -1).mean(1)  # (B, 256)
        # 5. FEM on the query's mid-level features, the guider and both maps
        f_q23 = self.down_query(f_q)  # (B, 256, h, w)
        logits, aux = self.fem(f_q23, guider, torch.cat([guided_map, prior_map], 1), aux=self.training)  # (B,2,h,w)
        logits = F.interpolate(logits, img_q.shape[-2:], mode="bilinear", align_corners=True)  # (B, 2, H, W)
        # Table 7, Eq. (16): the maps with R = V > alpha as their object region, so the prior map turned over (§4.3)
        return {"logits": logits, "aux": aux, "region_maps": {"guided": guided_map, "prior": 1 - prior_map}}

    def loss(self, out, m_q, m_s=None):
        """Cross-entropy of the prediction plus aux_weight x the mean of FEM's per-scale ones (official L307-316; an
        evaluation forward computes none: then the first alone)."""
        main = common.seg_loss(out["logits"], m_q)
        if not out["aux"]:
            return main, {"main": main}
        aux = torch.stack([common.seg_loss(a, m_q) for a in out["aux"]]).mean()
        return main + self.cfg.aux_weight * aux, {"main": main, "aux": aux}


def build(cfg, setting):
    """Model for a common.Setting (train.construct): F_p's weights from the run's stage-1 file (read_prior_extractor),
    unless cfg.untrained_prior or setting.from_checkpoint (the checkpoint holds them): then no file is read."""
    return Model(cfg, None if cfg.untrained_prior or setting.from_checkpoint else read_prior_extractor(cfg, setting))


# ----------------------------------------------------------------------------------------------------------
# The stage-1 file: its values, where it is, which images it saw, how the few-shot stage reads it


def prior_config(values, dataset):
    """The PriorConfig of a run: the fields of `values` (a dict: --stage prior's options, or the few-shot Config's
    fields), those left None from the dataset's recipe (PRIOR_RECIPES, else PRIOR_RECIPE)."""
    given = {f.name: values[f.name] for f in dataclasses.fields(PriorConfig) if values.get(f.name) is not None}
    return PriorConfig(**{**PRIOR_RECIPES.get(dataset, PRIOR_RECIPE), **given})


def check_prior_config(cfg):
    """ValueError for a stage-1 value that would crash stage 1 or train nothing (else a traceback mid-run)."""
    counts = ("prior_epochs", "prior_queue", "prior_img_size", "prior_patch_size", "embedding_dim", "bn_splits",
              "segment_side", "slic_segments", "felzenszwalb_min_size")
    for name in counts:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.prior_batch_size < 2:
        raise ValueError(f"prior_batch_size must be >= 2 (BatchNorm and InfoNCE's negatives), got "
                         f"{cfg.prior_batch_size}")
    if not (cfg.prior_lr is None or cfg.prior_lr > 0) or not cfg.temperature > 0 or not 0 <= cfg.key_momentum < 1:
        raise ValueError(f"prior_lr and temperature must be > 0 and key_momentum in [0, 1), got {cfg.prior_lr}, "
                         f"{cfg.temperature} and {cfg.key_momentum}")


def named_values(values, dataset):
    """{field: value} of the stage-1 values that differ from the dataset's recipe: what names the stage-1 file."""
    cfg, recipe = prior_config(values, dataset), prior_config({}, dataset)
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(PriorConfig)
            if getattr(cfg, f.name) != getattr(recipe, f.name)}


def word(value):
    """A value as --set writes it (train.py's format_value): false, none, 0.5."""
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def prior_checkpoint_path(setting, values):
    """values["prior_checkpoint"] (--prior-checkpoint), else runs/qgnet-prior-SPLIT[-all][-FIELD=VALUE...]/
    prior_extractor.pt under the working directory (like train.py's runs/): SPLIT as data.split_name of the
    common.Setting (pascal-fold0, coco-contiguous-fold0), -all for values["prior_all_images"], then named_values,
    sorted. values: --stage prior's options or the few-shot Config's fields: both stages name one file."""
    if values.get("prior_checkpoint"):
        return Path(values["prior_checkpoint"])
    split = data.split_name(setting.dataset, setting.fold, setting.data_root, setting.test_classes, setting.coco_split)
    parts = [f"qgnet-prior-{split}", *(["all"] if values.get("prior_all_images") else []),
             *(f"{k}={word(v)}" for k, v in sorted(named_values(values, setting.dataset).items()))]
    return Path(common.RUNS_DIR) / "-".join(parts) / "prior_extractor.pt"


def stage_flags(setting, values):
    """The flags that name a run's stage-1 file (prior_checkpoint_path), for the messages that point from one stage
    to the other."""
    s = setting
    split = f"--test-classes {','.join(map(str, s.test_classes))}" if s.test_classes else f"--fold {s.fold}"
    named = named_values(values, s.dataset)
    return (f"--dataset {s.dataset} {split}" + (f" --data-root {s.data_root}" if s.data_root else "")
            + (f" --coco-split {s.coco_split}" if s.dataset == "coco" and s.coco_split != "interleaved" else "")
            + (" --prior-all-images" if values.get("prior_all_images") else "")
            + (f" --prior-checkpoint {values['prior_checkpoint']}" if values.get("prior_checkpoint") else "")
            + (" --set " + " ".join(f"{k}={word(v)}" for k, v in sorted(named.items())) if named else ""))


def read_prior_extractor(cfg, setting):
    """F_p's weights (Eq. 8) from the run's stage-1 file (prior_checkpoint_path), in common.Backbone's keys:
    stage 1's momentum encoder without its MLP head (official resnet.py L201-217), BatchNorm statistics included.
    A file that is missing, unfinished, made on other images than this run's or with other values than the run
    names (named_values), or holding no such encoder raises common.WeightsUnavailableError with the command of
    stage 1. A file that does not say which images it saw (one converted from elsewhere) is taken with a warning."""
    values = dataclasses.asdict(cfg)
    path, flags = prior_checkpoint_path(setting, values), stage_flags(setting, values)
    make = (f"Make it with\n    python train.py --model qgnet --stage prior {flags}\nor name an existing one with "
            "--prior-checkpoint PATH (--untrained-prior: a random one, for tests).")
    if not path.is_file():
        raise common.WeightsUnavailableError(f"QGNet needs the prior extractor of stage 1, and {path} does not "
                                             f"exist. {make}")
    state = read_stage1_file(path, seen=images_seen(setting, cfg.prior_all_images), hint=f". {make}")
    saved = state.get("config") or {}
    differ = {k: v for k, v in named_values(values, setting.dataset).items() if k in saved and saved[k] != v}
    if differ:
        raise common.WeightsUnavailableError(
            f"{path} was made with {', '.join(f'{k}={word(saved[k])}' for k in differ)}, not the "
            f"{', '.join(f'{k}={word(v)}' for k, v in differ.items())} this run names. {make}")
    epochs = saved.get("prior_epochs")
    if epochs is not None and state.get("epoch", epochs) < epochs:
        raise common.WeightsUnavailableError(
            f"{path} is stage 1 stopped after epoch {state['epoch']} of {epochs}: finish it with\n    python train.py "
            f"--model qgnet --stage prior {flags} --resume")
    if "images" not in state:
        warnings.warn(f"{path} does not say which images it was trained on: taken as it is")
    stem = {"conv1.": "layer0.0.", "bn1.": "layer0.1."}  # torchvision's stem -> common.Backbone's layer0

    def rename(key):
        head = next((old for old in stem if key.startswith(old)), "")
        return "stages." + stem.get(head, "") + key[len(head):]
    weights = {rename(k[len("encoder_k."):]): v for k, v in state["model"].items()
               if k.startswith("encoder_k.") and not k.startswith("encoder_k.fc.")}
    with torch.device("meta"):  # F_p's keys and shapes, no weights initialised (no random numbers drawn)
        expected = {k: v.shape for k, v in common.Backbone("resnet50", pretrained=False).state_dict().items()}
    if {k: v.shape for k, v in weights.items()} != expected:
        raise common.WeightsUnavailableError(f"{path} holds no ResNet-50 momentum encoder (encoder_k.*) of stage 1. "
                                             f"{make}")
    return weights


def images_seen(setting, all_images):
    """What decides which images stage 1 trains on, as its file records it: the dataset and, unless it sees every
    image, the fold's split. A prior extractor made for other images is refused (it may have seen the
    run's novel classes)."""
    seen = {"dataset": setting.dataset, "all_images": bool(all_images)}
    if not all_images:
        seen.update(fold=setting.fold, test_classes=list(setting.test_classes) if setting.test_classes else None,
                    coco_split=setting.coco_split)
    return seen


def read_stage1_file(path, cfg=None, seen=None, hint=""):
    """Stage 1's file, as common.read_torch_file reads it: one line (common.WeightsUnavailableError, `hint` at its
    end) for a file that is not one, or, when given, whose PriorConfig (`cfg`, a resume's recipe) or images
    (`seen`) differ."""
    state = common.read_torch_file(path, f"{path} as stage 1's prior extractor", hint=hint)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise common.WeightsUnavailableError(f"{path} is not a file of QGNet's stage 1 (--stage prior){hint}")
    saved = state.get("config") or {}  # a file converted from elsewhere has none
    if not isinstance(saved, dict):
        raise common.WeightsUnavailableError(f"{path} is not a file of QGNet's stage 1 (--stage prior){hint}")
    if cfg is not None and saved != dataclasses.asdict(cfg):
        differ = ", ".join(f"{k} {saved.get(k)} (now {v})" for k, v in dataclasses.asdict(cfg).items()
                           if saved.get(k) != v)
        raise common.WeightsUnavailableError(f"--resume: {path} was made with other stage-1 values ({differ}): a "
                                             "resumed stage keeps them; drop the --set values, or --overwrite to "
                                             "start again")
    if seen is not None and state.get("images") not in (None, seen):
        raise common.WeightsUnavailableError(
            f"{path} was made on other images ({describe_images(state['images'])}) than this run's "
            f"({describe_images(seen)}): it may have seen the run's novel classes; use the run's own file")
    return state


def describe_images(seen):
    """images_seen(...) in words."""
    where = seen["dataset"]
    if seen.get("all_images"):
        return f"every image of {where}"
    which = f"classes {seen['test_classes']}" if seen.get("test_classes") else f"fold {seen['fold']}"
    return f"{where}, {which}{' (' + seen['coco_split'] + ')' if seen['dataset'] == 'coco' else ''} training images"


# ----------------------------------------------------------------------------------------------------------
# Stage 1, §4.1 (--stage prior): the prior extractor, trained by global and local contrast


MOCO_LR, MOCO_BATCH = 0.03, 256  # MoCo v2: lr 0.03 for batch 256, scaled linearly for other batches
SGD_MOMENTUM, WEIGHT_DECAY = 0.9, 1e-4  # MoCo v2
COLOR_JITTER, COLOR_P, GRAY_P = (0.4, 0.4, 0.4, 0.1), 0.8, 0.2  # MoCo v2 aug_plus
BLUR_SIGMA, BLUR_P, BLUR_KERNEL = (0.1, 2.0), 0.5, 0.1  # MoCo v2; kernel ~10% of the crop side (SimCLR)
GLOBAL_SCALE, PATCH_SCALE = (0.2, 1.0), (0.5, 1.0)  # RandomResizedCrop area: MoCo v2 / ours for patches
PRIOR_SAVE_EVERY = 10  # stage-1 epochs between checkpoints
SEGMENT_BATCH = 32  # images per DataLoader batch of the segmentation pass


def train_prior_extractor(setting, schedule, options):
    """Stage 1 (§4.1, §5.1), STAGES["prior"]: global-local contrastive training of the prior extractor on the
    unlabeled images of the run's dataset and fold (common.Setting). options: QGNet's flags and --set's values,
    the PriorConfig fields (prior_config); of the common.Schedule it takes train_length, workers, seed, log_every,
    bf16 and resume. Writes prior_file(...) (the whole state, every PRIOR_SAVE_EVERY epochs and at the end;
    --resume continues it, with the PriorConfig and the images it was made with) and its log, NAME_metrics.jsonl,
    next to it. Returns the file's path."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        sys.exit("error: --stage prior runs in one process (queues, shuffle BN); start it without torchrun")
    unread = [f"--{flag.replace('_', '-')}" for flag in ("epochs", "batch_size", "lr") if flag in schedule.given]
    if unread:  # MoCo's schedule is PriorConfig's: a flag here would change nothing
        sys.exit(f"error: --stage prior: {', '.join(unread)} would change nothing; stage 1's schedule is --set "
                 "prior_epochs=N prior_batch_size=N prior_lr=X")
    cfg = prior_config(options, setting.dataset)
    try:
        check_prior_config(cfg)
    except ValueError as err:
        sys.exit(f"error: --stage prior: {err}")
    path, seen = prior_file(setting, options), images_seen(setting, options.get("prior_all_images"))
    log_file = path.with_name(f"{path.stem}_metrics.jsonl")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    torch.manual_seed(schedule.seed)
    model = GlobalLocalContrast(cfg.contrast, cfg.embedding_dim, cfg.prior_queue, cfg.temperature, cfg.key_momentum,
                                cfg.bn_splits).to(device, memory_format=layout)
    lr = cfg.prior_lr if cfg.prior_lr is not None else MOCO_LR * cfg.prior_batch_size / MOCO_BATCH
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr, SGD_MOMENTUM, weight_decay=WEIGHT_DECAY, fused=True)
    start = 0
    if schedule.resume and path.is_file():
        state = read_stage1_file(path, cfg, seen)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["epoch"]
        common.cut_log(log_file, start)
    items = unlabeled_images(setting, schedule, options.get("prior_all_images"))
    boxes = None
    if "local" in model.contrasts:
        print(f"qgnet stage 1: {cfg.patches} patches of {len(items)} images (once per run)", flush=True)
        segments = SuperpixelBoxes(items, segmenter(cfg), cfg.segment_side)
        boxes = [b for chunk in DataLoader(segments, SEGMENT_BATCH, num_workers=schedule.workers, collate_fn=list)
                 for b in chunk]
    views = UnlabeledImages(items, cfg.prior_img_size if "global" in model.contrasts else None, boxes,
                            cfg.prior_patch_size)
    loader = DataLoader(views, cfg.prior_batch_size, shuffle=True, drop_last=True, num_workers=schedule.workers,
                        pin_memory=device.type == "cuda", persistent_workers=schedule.workers > 0,
                        generator=torch.Generator().manual_seed(schedule.seed))
    if len(loader) == 0:
        sys.exit(f"error: {len(items)} images do not fill one batch of {cfg.prior_batch_size} "
                 "(--set prior_batch_size=N)")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and schedule.bf16 else nullcontext()
    total = cfg.prior_epochs * len(loader)
    split = data.split_name(setting.dataset, setting.fold, setting.data_root, setting.test_classes, setting.coco_split)
    print(f"qgnet stage 1 on {split}: {len(items)} images, {len(loader)} steps of {cfg.prior_batch_size}, epochs "
          f"{start + 1}..{cfg.prior_epochs}, lr {lr:g}, {cfg.contrast} contrast, queues {cfg.prior_queue}, {device} "
          f"-> {path}", flush=True)

    def batches(epoch):
        model.train()
        return loader

    def step(batch):
        with amp:
            return model(**{k: v.to(device, non_blocking=True, memory_format=layout) for k, v in batch.items()})

    def end_epoch(epoch):
        if (epoch + 1) % PRIOR_SAVE_EVERY == 0 or epoch + 1 == cfg.prior_epochs:
            common.check_finite(model)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                     "config": dataclasses.asdict(cfg), "images": seen, "seed": schedule.seed}
            common.save_atomic(state, path)

    def cosine(it):  # MoCo v2's schedule, per iteration
        return lr * 0.5 * (1 + math.cos(math.pi * it / total))

    schedule.fit(step, optimizer, batches, cosine, cfg.prior_epochs, len(loader), start_epoch=start,
                 log_every=schedule.log_every, per_step=cfg.prior_batch_size, unit="images", tag="[prior] ",
                 log=partial(print, flush=True), log_file=log_file, event="prior", end_epoch=end_epoch)
    print(f"prior extractor saved to {path}; the few-shot stage:\n    python train.py --model qgnet "
          f"{stage_flags(setting, options)}", flush=True)
    return path


def prior_file(setting, options):
    """STAGE_FILES["prior"]: the file stage 1 writes for a run and its options (train.py holds its folder)."""
    return prior_checkpoint_path(setting, options)


STAGES = {"prior": train_prior_extractor}
STAGE_FILES = {"prior": prior_file}


def unlabeled_images(setting, schedule, all_images):
    """Stage 1's images: the fold's few-shot training images (train.py's list, labels unused), or with all_images
    every listed image of the train and test splits. Synthetic: the rendered query images."""
    items = []
    for split in ("train", "test") if all_images else ("train",):
        try:
            episodes = data.build_dataset(setting.dataset, split, setting.fold, img_size=setting.img_size,
                                          root=setting.data_root, seed=schedule.seed if split == "train" else 0,
                                          coco_split=setting.coco_split, train_length=schedule.train_length,
                                          test_classes=setting.test_classes)
        except FileNotFoundError as err:
            sys.exit(f"error: {err}")
        if setting.dataset == "synthetic":
            items += [(episodes, i) for i in range(len(episodes))]
        else:
            names = episodes.files if all_images else episodes.images
            items += [episodes.files[name][0] for name in sorted(names)]
    return items


# ----------------------------------------------------------------------------------------------------------
# §4.1.2: local patches, Felzenszwalb's graph-based segments (Algorithm 1) or SLIC superpixels (Algorithm 2)


def segmenter(cfg):
    """Table 5's patch generation method of a PriorConfig: a picklable function img (3,h,w) in [0,1] -> labels."""
    if cfg.patches == "felzenszwalb":
        return partial(felzenszwalb, k=cfg.felzenszwalb_k, sigma=cfg.felzenszwalb_sigma,
                       min_size=cfg.felzenszwalb_min_size)
    return partial(slic, n_segments=cfg.slic_segments, compactness=cfg.slic_compactness)


GAUSS_TRUNCATE = 4.0  # the smoothing kernel's radius in sigmas (Felzenszwalb & Huttenlocher's code, scipy's)
GRAPH_EDGES = ((np.s_[:, 1:], np.s_[:, :-1]), (np.s_[1:, :], np.s_[:-1, :]),
               (np.s_[1:, 1:], np.s_[:-1, :-1]), (np.s_[:-1, 1:], np.s_[1:, :-1]))  # 8-neighbours: -, |, \, /


def gaussian_blur(x, sigma):
    """x (C,H,W) numpy float64 smoothed by a Gaussian of std sigma (radius round(4 sigma)), edges mirrored with
    the edge pixel repeated (scipy's "reflect"); sigma 0: x itself."""
    if sigma <= 0:
        return x
    r = int(GAUSS_TRUNCATE * sigma + 0.5)
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    g /= g.sum()
    for axis in (1, 2):  # separable: rows, then columns
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        p = np.pad(x, pad, mode="symmetric")
        n = x.shape[axis]
        x = sum(w * np.take(p, np.arange(i, i + n), axis=axis) for i, w in enumerate(g))
    return x


def felzenszwalb(img, k, sigma, min_size):
    """Felzenszwalb & Huttenlocher's graph-based segmentation (IJCV 2004; §4.1.2, Algorithm 1) of img (3,H,W) in
    [0,1] -> labels (H,W) int64 in 0..n-1. The graph: pixels, each joined to its 8 neighbours by an edge of weight
    w = ||I_i - I_j|| (RGB in 0-255 units, after gaussian_blur with sigma). In ascending order of w, an edge joins
    its two components when w <= MInt(C1, C2) = min(Int(C1) + k/|C1|, Int(C2) + k/|C2|), Int(C) being the largest
    weight in C's minimum spanning tree (the edge that last joined it). Then, as the authors' code does, a
    component under min_size pixels joins its neighbour across the next edge in the same order."""
    x = gaussian_blur(img.double().numpy() * 255, sigma)  # (3, H, W)
    H, W = x.shape[-2:]
    pixel = np.arange(H * W).reshape(H, W)
    a = np.concatenate([pixel[here].ravel() for here, _ in GRAPH_EDGES])  # (E,) one end of each edge
    b = np.concatenate([pixel[there].ravel() for _, there in GRAPH_EDGES])  # (E,) the other
    w = np.concatenate([np.sqrt(((x[:, here[0], here[1]] - x[:, there[0], there[1]]) ** 2).sum(0)).ravel()
                        for here, there in GRAPH_EDGES])  # (E,)
    order = np.argsort(w, kind="stable")
    edges = list(zip(a[order].tolist(), b[order].tolist(), w[order].tolist()))
    parent, size, internal = list(range(H * W)), [1] * (H * W), [0.0] * (H * W)  # union-find: |C|, Int(C) by root

    def find(v):
        while parent[v] != v:
            parent[v] = parent[parent[v]]  # path halving
            v = parent[v]
        return v

    def join(r, s, weight):
        parent[s] = r
        size[r] += size[s]
        internal[r] = weight  # edges come in ascending order: the largest of the merged spanning tree

    for i, j, weight in edges:
        r, s = find(i), find(j)
        if r != s and weight <= min(internal[r] + k / size[r], internal[s] + k / size[s]):
            join(r, s, weight)
    for i, j, weight in edges:
        r, s = find(i), find(j)
        if r != s and min(size[r], size[s]) < min_size:
            join(r, s, weight)
    roots = np.array([find(v) for v in range(H * W)])
    return torch.from_numpy(np.unique(roots, return_inverse=True)[1].reshape(H, W))  # (H, W)


SRGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
D65_WHITE = (0.950456, 1.0, 1.088754)  # reference white of the CIELAB conversion
SLIC_RECENTRE = 3  # §4.1.2: centres move to the lowest gradient within n x n, n = 3
SLIC_ITERS, SLIC_TOL = 10, 0.5  # Achanta et al.: 10 iterations suffice; Algorithm 2's E: mean centre shift, px
SLIC_MIN_SIZE = 0.5  # fragments smaller than this x S^2 join their largest neighbour (scikit-image's default)
OUTSIDE_WINDOW = 1e6  # added to D_s outside a centre's 2S x 2S window: a pixel goes there only if no window reaches it
NEIGHBOURS = ((np.s_[1:, :], np.s_[:-1, :]), (np.s_[:-1, :], np.s_[1:, :]),
              (np.s_[:, 1:], np.s_[:, :-1]), (np.s_[:, :-1], np.s_[:, 1:]))  # 4-neighbourhood: (pixels, neighbours)


def rgb_to_lab(img):
    """sRGB img (3,H,W) in [0,1] -> CIELAB (3,H,W), L in 0..100 (D65 white), the colour space of SLIC. The
    constants are the standards': sRGB's transfer curve (IEC 61966-2-1) and CIE 1976 L*a*b*."""
    linear = torch.where(img > 0.04045, ((img + 0.055) / 1.055) ** 2.4, img / 12.92)
    xyz = torch.einsum("ij,jhw->ihw", torch.tensor(SRGB_TO_XYZ), linear) / torch.tensor(D65_WHITE)[:, None, None]
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def connected_components(labels):
    """4-connected components of a label map (H,W) -> (H,W) int64: the smallest flat pixel index of each."""
    H, W = labels.shape
    comp = torch.arange(H * W).view(H, W)
    while True:
        new = comp.clone()
        for here, there in NEIGHBOURS:
            same = labels[here] == labels[there]
            new[here] = torch.where(same, torch.minimum(new[here], comp[there]), new[here])
        new = new.flatten()[new.flatten()].view(H, W)  # pointer jumping: the id's own id is as small or smaller
        if torch.equal(new, comp):
            return comp
        comp = new


def enforce_connectivity(labels, min_size):
    """Algorithm 2's last step: split superpixels into 4-connected parts; a part smaller than min_size joins its
    largest neighbour (largest by (size, id), so merges never form cycles), until none is left. -> (H,W) 0..n-1,
    each label 4-connected. A part whose neighbour merges elsewhere in the same round waits for the next: two
    parts that joined a third which itself moved on would share a label without touching."""
    N = labels.numel()
    comp = connected_components(labels)
    while True:
        size = torch.bincount(comp.flatten(), minlength=N)  # (N,) pixels of each component id
        rank = size * N + torch.arange(N)
        best = torch.full((N,), -1)
        for here, there in NEIGHBOURS:
            a, b = comp[here].flatten(), comp[there].flatten()
            best.scatter_reduce_(0, a, torch.where(a != b, rank[b], -1), "amax")
        merge = (size > 0) & (size < min_size) & (best > rank)
        merge &= ~merge[best.clamp(min=0) % N]  # only into a part that stays this round (the largest merging can)
        if not merge.any():
            return torch.unique(comp, return_inverse=True)[1]
        comp = torch.where(merge, best % N, torch.arange(N))[comp]


def slic(img, n_segments, compactness):
    """SLIC superpixels (§4.1.2, Algorithm 2) of img (3,H,W) in [0,1] -> labels (H,W) int64 in 0..n-1, each
    4-connected. Dense K x N distances, masked to each centre's 2S x 2S window: fine for small images."""
    H, W = img.shape[-2:]
    lab = rgb_to_lab(img)  # (3, H, W)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    pixels = torch.cat([lab.flatten(1), torch.stack([yy.flatten(), xx.flatten()]).float()])  # (5, N) l a b y x
    # grid interval S = sqrt(N / K): one centre in the middle of every cell
    step = math.sqrt(H * W / n_segments)
    ny, nx = max(1, round(H / step)), max(1, round(W / step))
    cy, cx = ((torch.arange(ny) + 0.5) * H / ny).long(), ((torch.arange(nx) + 0.5) * W / nx).long()
    centre = (cy[:, None] * W + cx[None, :]).flatten()  # (K,) flat pixel index
    # Eq. (7): G = ||I(x+1,y) - I(x-1,y)||^2 + ||I(x,y+1) - I(x,y-1)||^2; centres move to the lowest G in 3 x 3
    p = F.pad(lab[None], (1, 1, 1, 1), mode="replicate")[0]  # (3, H+2, W+2)
    grad = ((p[:, 1:-1, 2:] - p[:, 1:-1, :-2]) ** 2 + (p[:, 2:, 1:-1] - p[:, :-2, 1:-1]) ** 2).sum(0)  # (H, W)
    r = SLIC_RECENTRE // 2
    window = F.unfold(F.pad(grad[None, None], (r, r, r, r), value=math.inf), SLIC_RECENTRE)[0]  # (9, N)
    offset = window[:, centre].argmin(0)  # (K,)
    centres = pixels[:, centre + (offset // SLIC_RECENTRE - r) * W + offset % SLIC_RECENTRE - r]  # (5, K)
    for _ in range(SLIC_ITERS):
        # Eq. (4)-(6): D_s = D_lab + D_xy / S * m, for the centres whose 2S x 2S window holds the pixel
        d_lab = torch.cdist(pixels[:3].T, centres[:3].T)  # (N, K)
        d_xy = torch.cdist(pixels[3:].T, centres[3:].T)  # (N, K)
        outside = torch.cdist(pixels[3:].T, centres[3:].T, p=math.inf) > step  # (N, K)
        labels = (d_lab + d_xy / step * compactness + OUTSIDE_WINDOW * outside).argmin(1)  # (N,)
        # new centre = mean of its pixels (an empty cluster keeps its centre); residual E = mean centre shift
        count = torch.bincount(labels, minlength=centres.shape[1])
        mean = torch.zeros_like(centres).index_add_(1, labels, pixels) / count.clamp(min=1)
        moved = torch.where(count > 0, mean, centres)
        shift = (moved[3:] - centres[3:]).norm(dim=0).mean()
        centres = moved
        if shift < SLIC_TOL:
            break
    return enforce_connectivity(labels.view(H, W), SLIC_MIN_SIZE * step ** 2)


def superpixel_boxes(img, segment, side):
    """Bounding boxes (n,4) [top, left, bottom, right) in img's pixels of the segments of img uint8 (3,H0,W0):
    segment (segmenter's) runs on a copy whose long side is `side`."""
    H0, W0 = img.shape[-2:]
    scale = min(1.0, side / max(H0, W0))
    h, w = max(1, round(H0 * scale)), max(1, round(W0 * scale))
    labels = segment(TF.resize(img, [h, w], antialias=True).float() / 255)  # (h, w)
    boxes = []
    for s in range(int(labels.max()) + 1):
        ys, xs = torch.nonzero(labels == s, as_tuple=True)
        top, left, bottom, right = int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1
        boxes.append([top * H0 // h, left * W0 // w, -(-bottom * H0 // h), -(-right * W0 // w)])  # rounded outwards
    return torch.tensor(boxes)  # (n, 4)


# ----------------------------------------------------------------------------------------------------------
# §4.1, §5.1: MoCo v2 views of images and patches, InfoNCE, the momentum encoder and its queues


def moco_v2_augmentation(size, scale):
    """MoCo v2's aug_plus (§5.1: blur, colour distortion, random crop, flip): uint8 (3,h,w) -> (3,size,size)."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=scale, antialias=True),
        T.RandomApply([T.ColorJitter(*COLOR_JITTER)], p=COLOR_P),
        T.RandomGrayscale(GRAY_P),
        T.RandomApply([T.GaussianBlur(2 * int(BLUR_KERNEL * size / 2) + 1, sigma=BLUR_SIGMA)], p=BLUR_P),
        T.RandomHorizontalFlip(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(data.MEAN, data.STD),
    ])


def load_unlabeled(item):
    """An image path, or (synthetic episodes, index): that episode's query image, rendered -> uint8 (3,H,W)."""
    if isinstance(item, tuple):
        episodes, index = item
        return (episodes.render_episode(index)[1][0][0] * 255).round().to(torch.uint8)
    return data.load_image(item)


class SuperpixelBoxes(Dataset):
    """superpixel_boxes of every image (segment, side as there): the segments depend on the image alone, so they
    are computed once, before training."""

    def __init__(self, items, segment, side):
        self.items, self.segment, self.side = items, segment, side

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return superpixel_boxes(load_unlabeled(self.items[i]), self.segment, self.side).tolist()  # no shared memory


class UnlabeledImages(Dataset):
    """What load_unlabeled reads of `items`, as views: two of the image, img_size px (global contrast; None: none),
    and two of one of its patches, the crop of a random box of `boxes` (superpixel_boxes of each image, as lists),
    patch_size px (local contrast; boxes None: none). No label is read."""

    def __init__(self, items, img_size, boxes, patch_size):
        self.items, self.boxes = items, boxes
        self.global_view = moco_v2_augmentation(img_size, GLOBAL_SCALE) if img_size else None
        self.patch_view = moco_v2_augmentation(patch_size, PATCH_SCALE) if boxes is not None else None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        img, views = load_unlabeled(self.items[i]), {}
        if self.patch_view:
            top, left, bottom, right = map(int, self.boxes[i][int(torch.randint(len(self.boxes[i]), ()))])
            patch = img[:, top:bottom, left:right]
        if self.global_view:
            views.update(img_q=self.global_view(img), img_k=self.global_view(img))
        if self.patch_view:
            views.update(patch_q=self.patch_view(patch), patch_k=self.patch_view(patch))
        return views


def info_nce(q, k, queue, tau):
    """Eq. (1)/(2): -log exp(q.k0/tau) / (exp(q.k0/tau) + sum_i exp(q.k_i/tau)), mean over the batch, in fp32.
    q, k (N,D) L2-normalised queries and their positive keys; queue (D,K) the negative keys."""
    with torch.autocast(q.device.type, enabled=False):
        q, k = q.float(), k.float()
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.float()], 1) / tau  # (N, 1+K)
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def contrast_encoder(dim):
    """ResNet-50 with MoCo v2's MLP head (2048 -> 2048 -> ReLU -> dim) in torchvision's layout (fc.0, fc.2)."""
    net = torchvision.models.resnet50(num_classes=dim)
    net.fc = nn.Sequential(nn.Linear(net.fc.in_features, net.fc.in_features), nn.ReLU(inplace=True), net.fc)
    return net


class GlobalLocalContrast(nn.Module):
    """§4.1: MoCo (query encoder, momentum key encoder, a queue of keys per contrast) with the losses of `contrast`:
    "local+global" Eq. (3), L = L_local + L_global; "local" or "global" alone (Table 6), whose forward takes only
    its views (img_q, img_k: global; patch_q, patch_k: local) and whose other queue is not built."""

    def __init__(self, contrast, dim, queue, temperature, key_momentum, bn_splits):
        super().__init__()
        self.contrasts = [c for c in ("global", "local") if c in contrast.split("+")]
        self.dim, self.temperature, self.key_momentum, self.bn_splits = dim, temperature, key_momentum, bn_splits
        self.encoder_q, self.encoder_k = contrast_encoder(dim), contrast_encoder(dim)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        self.encoder_k.requires_grad_(False)
        # K image keys (Eq. 1), M patch keys (Eq. 2). A PASCAL fold has ~5k images: 65536 keys span ~14 epochs
        for name in self.contrasts:
            self.register_buffer(f"queue_{name}", F.normalize(torch.randn(dim, queue), dim=0))
            self.register_buffer(f"queue_{name}_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self):
        # MoCo: theta_k <- m * theta_k + (1 - m) * theta_q
        for p_k, p_q in zip(self.encoder_k.parameters(), self.encoder_q.parameters()):
            p_k.mul_(self.key_momentum).add_(p_q.detach(), alpha=1 - self.key_momentum)

    @torch.no_grad()
    def keys(self, x):
        """L2-normalised keys (N,D) of x (N,3,h,w), BN statistics from random sub-batches (MoCo's shuffle BN)."""
        order = torch.randperm(len(x), device=x.device)
        splits = max(1, min(self.bn_splits, len(x) // 2))  # at least 2 samples per BatchNorm sub-batch
        k = torch.cat([self.encoder_k(chunk) for chunk in x[order].chunk(splits)])  # (N, D), shuffled
        return F.normalize(k[torch.argsort(order)], dim=1)

    @torch.no_grad()
    def enqueue(self, name, keys):
        """MoCo's dynamic dictionary: keys (N,D) replace the oldest entries of queue `name`."""
        queue, ptr = getattr(self, name), getattr(self, f"{name}_ptr")
        keys = keys[-queue.shape[1]:]
        slots = (ptr + torch.arange(len(keys), device=keys.device)) % queue.shape[1]
        queue[:, slots] = keys.T.to(queue.dtype)
        ptr.copy_((ptr + len(keys)) % queue.shape[1])

    def forward(self, img_q=None, img_k=None, patch_q=None, patch_k=None):
        views = {"global": (img_q, img_k), "local": (patch_q, patch_k)}  # (N, 3, h, w) each
        # 1. queries: a view of each image (q) and of each patch (q_p) through the trained encoder
        q = {c: F.normalize(self.encoder_q(views[c][0]), dim=1) for c in self.contrasts}  # (N, D)
        # 2. positive keys: the other views through the momentum encoder
        self.momentum_update()
        k = {c: self.keys(views[c][1]) for c in self.contrasts}  # (N, D)
        # 3. Eq. (1) global, Eq. (2) local, each against its queue (a copy: it changes below); Eq. (3): their sum
        terms = {c: info_nce(q[c], k[c], getattr(self, f"queue_{c}").clone(), self.temperature) for c in self.contrasts}
        # 4. this batch's keys become negatives for the next ones
        for c in self.contrasts:
            self.enqueue(f"queue_{c}", k[c])
        return sum(terms.values()), {c: t.detach() for c, t in terms.items()}
