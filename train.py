"""Train and evaluate every few-shot segmentation model of this repository under one protocol.

    python train.py --model symnet --dataset synthetic --fold 0      # quick start, CPU, a few minutes
    python train.py --model symnet --fold 1 --data-root ~/data/VOC2012            # PASCAL-5i, fold 1, 1-shot
    python train.py --model qpenet --fold all --data-root ~/data/VOC2012          # four folds and their table
    python train.py --eval-only --checkpoint runs/x/last.pt --shot 5 --data-root ~/data/VOC2012
    torchrun --nproc_per_node 4 train.py --model ocnet --dataset coco --fold 2 --data-root ~/data/coco
    python train.py --model qgnet --stage prior --fold 0 --data-root ~/data/VOC2012   # a model's extra stage
    python train.py --model symnet --bench                           # speed, work, memory, parameters
    python train.py --predict --checkpoint runs/x/last.pt --support s.jpg --support-mask s.png --query q.jpg

A model is one of the five paper files, `baseline` (the parameter-free floor every model must beat), or the
path of your own `.py` file with the same interface, which then gets exactly the same protocol:

    Config                 dataclass of the model's hyperparameters: the paper's values, then `backbone`,
                           `pretrained` (True, False or a weight file) and the model's own flags from the
                           command line (make_config); saved in every checkpoint
    Model(cfg[, run])      nn.Module. run: common.Run, the run's context (dataset, fold, shots, crop...).
                           forward(img_q, img_s, m_s, class_ids=None) -> dict with "logits" (B,2,H,W) and
                           whatever its loss needs; loss(out, m_q, m_s) -> (total, {name: term}). A forward
                           with an `m_q` argument gets the query mask in training, never in evaluation
    build(cfg, run)        optional: the model with the files its stages wrote (construct); none are read when
                           run.from_checkpoint, as every weight is in the checkpoint
    DEFAULTS               optional {dataset: {flag: value}}: the paper's recipe (lr, batch_size, epochs,
                           img_size, augment, the model's flags); STAGE_DEFAULTS {stage: {dataset: ...}} a stage's
    add_args(parser)       optional: the model's own flags
    STAGES                 optional {name: fn(run, schedule, options)}: extra training stages (--stage NAME),
                           with common.Run, common.Schedule and the model's own flags {dest: value}
    Model.predict(...)     optional: inference hook (test-time fine-tuning, multi-scale), same arguments as
                           forward, returns logits; evaluation uses it instead of forward

Values left unset on the command line come from the checkpoint, the stage's and the paper's recipe, then the
harness's, in that order (resolve_defaults). The protocol (README.md, "Protocol"): SGD with momentum 0.9 and
weight decay 1e-4, poly learning rate (power 0.9) per iteration; the last checkpoint is evaluated; test episodes
depend only on (test seed, index), 1000 per seed (COCO 5000) x 5 seeds, mean and standard deviation reported;
IoU scored at the query's original resolution, in fp32.
"""
import argparse
import dataclasses
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import shlex
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps

try:
    import fcntl  # POSIX: the run folder's lock
except ImportError:
    fcntl = None
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Sampler
from torch.utils.flop_counter import flop_registry

import common
import data

MODELS = ("ocnet", "qgnet", "crcnet", "symnet", "qpenet", "baseline")
MOMENTUM = 0.9  # PFENet, BAM, HSNet-era FSS all use SGD with momentum 0.9
WEIGHT_DECAY = 1e-4  # PFENet train.py
POLY_POWER = 0.9  # PFENet util.poly_learning_rate
# Dense (no sparsity) bf16 tensor-core TFLOP/s from NVIDIA's data sheets, matched in order against the device
# name: the denominator of --bench's achieved fraction.
BF16_PEAK_TFLOPS = (("H200 NVL", 835.5), ("H200", 989.4), ("H100 NVL", 835.5), ("H100 PCIe", 756.5),
                    ("H100", 989.4), ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0),
                    ("A10", 125.0))  # a key matches whole words of the name: "A10" is not the A10G
BENCH_DATA_IMAGES = 300  # --bench-data without a dataset: this many PASCAL-sized JPEGs in a temporary folder
BENCH_DATA_SECONDS = 10.0  # --bench-data: time spent per worker count
# The run's episodes: a checkpoint's own where it has one (resolve_defaults), else these.
EPISODE_DEFAULTS = dict(dataset="pascal", fold=0, coco_split="interleaved")
# The recipe where a model file gives none for a dataset (the baseline, your own model file). PASCAL and COCO:
# PFENet's configs as its code runs them, every learning rate x10 (poly_learning_rate(..., scale_lr=10)):
# PASCAL base_lr 0.0025 -> 0.025 at batch 4; COCO the one-GPU setting of its config's comment, base_lr 0.005 ->
# 0.05 at batch 8 (its 4-GPU run: 0.02 x 10 at batch 32, the same rate per episode). Synthetic: the quick start,
# any model trained and evaluated in a few minutes on 2 CPU cores (README, quick start). Folder (your own data,
# where no model file has a recipe): PASCAL's.
HARNESS_DEFAULTS = {
    "pascal": dict(lr=0.025, batch_size=4, epochs=200, img_size=473, augment="pfenet"),
    "folder": dict(lr=0.025, batch_size=4, epochs=200, img_size=473, augment="pfenet"),
    "coco": dict(lr=0.05, batch_size=8, epochs=50, img_size=641, augment="pfenet"),
    "synthetic": dict(lr=0.05, batch_size=8, epochs=2, img_size=128, train_length=500, augment="pfenet",
                      test_episodes=300, test_seeds=1),
}
EXIT_NONFINITE = 3  # exit status when the loss becomes NaN or infinite
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")  # a training run's files in its folder (--overwrite removes)


# ----------------------------------------------------------------------------------------------------------
# Command line: the flags, and the one order in which a run's values are resolved


def build_parser(add_help=True):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                add_help=add_help)
    p.add_argument("--model", default="baseline", help=f"{', '.join(MODELS)}, or path/to/your_model.py")
    p.add_argument("--dataset", default=None, choices=["pascal", "coco", "synthetic", "folder"],
                   help="default: the --checkpoint's, else pascal; folder: your own images and labels under "
                        "--data-root (README: 'Your own data')")
    p.add_argument("--data-root", default=None, help="dataset folder (README: 'Datasets' gives the layout)")
    p.add_argument("--fold", type=fold_arg, default=None, metavar="{0,1,2,3,all}",
                   help="test fold (default: the --checkpoint's, else 0); all: the four folds one after another, "
                        "then their table. A folder dataset's folds: its folds.txt, else four quarters of its ids")
    p.add_argument("--test-classes", type=class_ids_arg, default=None, metavar="IDS",
                   help="--dataset folder: the novel class ids, comma-separated (e.g. 3,7,9), in place of --fold")
    p.add_argument("--shot", type=positive_int, default=1)
    p.add_argument("--coco-split", default=None, choices=["interleaved", "contiguous"],
                   help="default: the --checkpoint's, else interleaved")
    p.add_argument("--support-boxes", action="store_true",
                   help="weak supervision: every support mask becomes its objects' bounding boxes (CRCNet §5.4)")
    p.add_argument("--backbone", default="resnet50", choices=sorted(common.BACKBONES),
                   help="resnet50 (default), resnet101, vgg16_bn: torchvision's; resnet50_deep, resnet101_deep: the "
                        "papers' deep-stem ResNet (PSPNet's), whose weights need --backbone-weights")
    p.add_argument("--backbone-weights", default=None, metavar="PATH",
                   help="a weight file for the backbone: PFENet's resnet50_v2.pth / resnet101_v2.pth, torchvision's, "
                        "or any state dict with the backbone's key names")
    p.add_argument("--no-pretrained", action="store_true", help="random backbone weights (no ImageNet download)")
    p.add_argument("--epochs", type=positive_int, default=None, help="default: the model's, per dataset")
    p.add_argument("--batch-size", type=positive_int, default=None, help="global batch, split across processes")
    p.add_argument("--lr", type=float, default=None, help="base learning rate of the poly schedule")
    p.add_argument("--img-size", type=positive_int, default=None, help="train crop and test canvas size")
    p.add_argument("--train-length", type=positive_int, default=None,
                   help="training episodes per epoch (default: every filtered training image; synthetic 500)")
    p.add_argument("--workers", type=non_negative_int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    p.add_argument("--seed", type=non_negative_int, default=0, help="training seed (test episodes do not depend on it)")
    p.add_argument("--out", default=None, help="run folder (default runs/MODEL-DATASET-foldK-Sshot)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an OUT that holds a run: its last.pt, best.pt and metrics.jsonl are deleted")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint, do not train")
    p.add_argument("--checkpoint", default=None, help="weights for --eval-only, --predict, --vis")
    p.add_argument("--select-best", action="store_true",
                   help="validate on the test fold during training and evaluate the best (optimistic)")
    p.add_argument("--val-every", type=positive_int, default=5, help="epochs between validations for --select-best")
    p.add_argument("--test-episodes", type=positive_int, default=None,
                   help="episodes per seed (default: PASCAL 1000, COCO 5000; data.TEST_EPISODES)")
    p.add_argument("--test-seeds", type=positive_int, default=None,
                   help=f"test seeds, the mean reported (default {data.TEST_SEEDS})")
    p.add_argument("--log-every", type=positive_int, default=20, help="optimizer steps between progress lines")
    p.add_argument("--fp32", action="store_true", help="train without bf16 autocast on CUDA")
    p.add_argument("--bf16-eval", action="store_true",
                   help="evaluate under bf16 autocast on CUDA (default fp32, as the official code evaluates)")
    p.add_argument("--augment", default=None, choices=sorted(data.AUGMENTATIONS),
                   help="training augmentation recipe (default: the model's, for most PFENet's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--bench", action="store_true", help="time training steps and inference, then exit")
    p.add_argument("--bench-steps", type=positive_int, default=10)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="--bench: the GPU's dense bf16 TFLOP/s, for one not in BF16_PEAK_TFLOPS")
    p.add_argument("--bench-data", action="store_true",
                   help="episodes/s that data.py delivers with 0..--workers workers (PASCAL without --data-root: "
                        f"{BENCH_DATA_IMAGES} generated 500x375 JPEGs), then exit")
    p.add_argument("--vis", type=non_negative_int, default=0, metavar="N", help="write N PNGs of test episodes")
    p.add_argument("--stage", default=None, help="run a model's extra training stage (e.g. qgnet: prior)")
    p.add_argument("--predict", action="store_true", help="segment --query given --support/--support-mask")
    p.add_argument("--support", action="append", default=[], help="support image (repeat for K shots)")
    p.add_argument("--support-mask", action="append", default=[], help="its mask: nonzero pixels = object")
    p.add_argument("--query", action="append", default=[], help="query image (repeatable)")
    return p


def parse_args(argv=None):
    """Two passes: --model (or the checkpoint's model) first, so the model file can add its own flags."""
    known, _ = build_parser(add_help=False).parse_known_args(argv)  # --help waits for the model's own flags
    parser = build_parser()
    if known.checkpoint and "{fold}" in known.checkpoint and known.fold not in (None, "all"):
        known.checkpoint = known.checkpoint.format(fold=known.fold)  # one fold of a pattern
    trained = read_checkpoint(known.checkpoint.format(fold=0))["args"] if known.checkpoint else {}
    if known.checkpoint and "{fold}" in known.checkpoint:
        trained["fold"] = "all"  # a pattern names the four folds' checkpoints
    given = sys.argv[1:] if argv is None else argv
    if trained and not any(a == "--model" or a.startswith("--model=") for a in given):
        known.model = trained["model"]  # --predict and --eval-only need not repeat it
    module = load_model_module(known.model)
    if hasattr(module, "add_args"):
        module.add_args(parser.add_argument_group(f"{known.model} options"))
    args = parser.parse_args(argv)
    args.model, args.checkpoint = known.model, known.checkpoint
    args.own_flags = sorted(set(vars(args)) - set(vars(build_parser().parse_args([]))))  # add_args's dests
    args.model_flags = [k for k in args.own_flags if getattr(args, k) is not None]  # the model's flags given now
    if args.test_classes and args.fold is not None:
        parser.error(f"--test-classes names the novel classes itself: drop --fold {args.fold} (--fold K and --fold "
                     "all take a folder dataset's folds from its folds.txt)")
    if args.fold == "all" and (args.bench or args.bench_data or args.predict or args.resume):
        parser.error("--fold all trains and evaluates (or runs a --stage) for each fold, and resumes by itself")
    if args.eval_only and not args.checkpoint and args.fold != "all" and not model_is_parameter_free(module):
        parser.error("--eval-only needs --checkpoint (only the parameter-free baseline has none)")
    if args.predict and not (args.support and args.query and len(args.support) == len(args.support_mask)):
        parser.error("--predict needs --query, and one --support-mask for every --support")
    if args.backbone_weights and args.no_pretrained:
        parser.error("--backbone-weights and --no-pretrained exclude each other")
    if args.resume and (args.eval_only or args.overwrite):
        parser.error("--resume excludes --eval-only and --overwrite")
    if args.predict and not args.checkpoint and not model_is_parameter_free(module):
        parser.error("--predict needs --checkpoint (only the parameter-free baseline has none)")
    resolve_defaults(args, module, trained, known.checkpoint)
    if args.test_classes and args.dataset != "folder":
        parser.error(f"--test-classes chooses the novel classes of --dataset folder; {args.dataset}'s are its folds "
                     "(--fold)")
    if args.fold == "all":
        args.out = Path(args.out) if args.out else None  # the parent of the folds' folders, given or default
    else:
        args.out = Path(args.out) if args.out else default_out(args, args.fold)
    return args, module


def resolve_defaults(args, module, trained, checkpoint=None):
    """Fill every flag left unset (None) from the first of these that gives it, in this order:
        1. the command line (already in args: it always wins)
        2. the checkpoint (--checkpoint, its saved arguments `trained`): its dataset, fold and COCO split, so that
           a model is tested on the classes it never trained on; its crop size when tested on its own dataset
        3. the stage's recipe, module.STAGE_DEFAULTS[stage][dataset], when --stage runs one
        4. the paper's recipe, module.DEFAULTS[dataset] (lr, batch, epochs, crop, augmentation, model flags)
        5. the harness's: HARNESS_DEFAULTS[dataset], data.TEST_EPISODES[dataset], data.TEST_SEEDS
    A recipe key that is not a flag of this run is an error, so that renaming a flag cannot silently drop a
    paper's value."""
    if args.test_classes is None and args.fold is None:  # a --test-classes run is tested on its classes, unless
        args.test_classes = trained.get("test_classes")  # --fold names a fold
    for key, default in EPISODE_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, trained.get(key, default))
    was = {**EPISODE_DEFAULTS, **{k: trained[k] for k in EPISODE_DEFAULTS if k in trained}}
    other_split = args.dataset == "coco" and was["coco_split"] != args.coco_split  # folds partition the classes
    if trained and "all" not in (was["fold"], args.fold) and was["dataset"] == args.dataset and (
            was["fold"] != args.fold or other_split):
        print(f"WARNING: {checkpoint} was trained on {args.dataset} fold {was['fold']}: the test classes of "
              f"fold {args.fold} are among those it was trained on", file=sys.stderr)
    if trained.get("dataset") == args.dataset:
        args.data_root = args.data_root or trained.get("data_root")  # the files it was trained on
    if args.img_size is None and (args.predict or trained.get("dataset") == args.dataset):
        args.img_size = trained.get("img_size")  # test at the size the model was trained at
    layers = [getattr(module, "STAGE_DEFAULTS", {}).get(args.stage, {}).get(args.dataset, {}) if args.stage else {},
              getattr(module, "DEFAULTS", {}).get(args.dataset, {}),
              {"test_episodes": data.TEST_EPISODES[args.dataset], "test_seeds": data.TEST_SEEDS,
               **HARNESS_DEFAULTS[args.dataset]}]
    for layer in layers:
        for key, value in layer.items():
            if not hasattr(args, key):
                sys.exit(f"error: {args.model}: recipe value {key}={value!r} names no flag of train.py or the model")
            if getattr(args, key) is None:
                setattr(args, key, value)


def default_out(args, fold):
    """runs/MODEL-SPLIT-Sshot, SPLIT as data.split_name: a run's folder when --out does not name one."""
    split = data.split_name(args.dataset, fold, args.data_root, args.test_classes)
    return Path(common.RUNS_DIR) / f"{Path(args.model).stem}-{split}-{args.shot}shot"


def backbone_weights(args):
    """A Backbone's `pretrained`: the --backbone-weights file, else True (ImageNet) or False (--no-pretrained)."""
    return args.backbone_weights or not args.no_pretrained


def model_is_parameter_free(module):
    return module is BaselineModule


def fold_arg(text):
    """argparse type of --fold: 0..3, or "all"."""
    if text == "all":
        return text
    if text not in ("0", "1", "2", "3"):
        raise argparse.ArgumentTypeError(f"must be 0, 1, 2, 3 or all, got {text!r}")
    return int(text)


def class_ids_arg(text):
    """argparse type of --test-classes: comma-separated class ids >= 1 -> their sorted tuple, each once."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words or not all(w.isascii() and w.isdigit() and int(w) >= 1 for w in words):
        raise argparse.ArgumentTypeError(f"must be class ids >= 1 separated by commas (e.g. 3,7,9), got {text!r}")
    return tuple(sorted({int(w) for w in words}))


def positive_int(text):
    """argparse type of a count that must be at least 1 (0 would divide by zero or silently mean the default)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


# ----------------------------------------------------------------------------------------------------------
# A run, from the command line to the RESULT line


def main(argv=None):
    """Parse the command line and run it. A bad dataset file, a failed save and Ctrl-C end in one clear line and
    a non-zero exit status (130 for Ctrl-C, as shells report it), never a traceback."""
    args, module = parse_args(argv)
    try:
        return run_all_folds(args, module) if args.fold == "all" else run(args, module)
    except KeyboardInterrupt:
        stop_interrupted(args, sys.argv[1:] if argv is None else argv)
    except data.DatasetError as err:  # also when a DataLoader worker re-raised it
        sys.exit(f"error: {original_message(err)}")
    except common.SaveError as err:
        sys.exit(f"error: {err}")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def run(args, module):
    """One run of the command line: a stage, a benchmark, a prediction, or training and evaluation."""
    device, rank, world = setup_device()
    if args.batch_size % world:
        sys.exit(f"error: --batch-size {args.batch_size} is not divisible by {world} processes")
    if args.bench_data:
        return bench_data(args, device)
    if args.stage:  # an extra training stage that the model file provides, instead of the episodic training
        return run_stage(args, module, rank)
    if args.bench or args.predict:
        model, optimizer, *_ = build_model(module, args, device, rank, world)
        return bench(model, optimizer, args, device) if args.bench else predict(model, args, device)
    training = not args.eval_only and not model_is_parameter_free(module)
    with hold_run_folder(args, training) if rank == 0 else nullcontext():
        for split in ("train", "test") if training else ("test",):  # every listed file checked before the model
            build_dataset(args, split)
        model, optimizer, cfg, resumed = build_model(module, args, device, rank, world)
        learnable, total = count_parameters(model)
        log_file = args.out / "metrics.jsonl" if rank == 0 else None
        if resumed is not None and rank == 0:
            truncate_log(log_file, resumed["epoch"])
        log(rank, f"{Path(args.model).stem} on {args.dataset} {split_text(vars(args))}, {args.shot}-shot, "
                  f"{args.img_size}px, {device}, {world} process(es); {learnable:,} learnable / {total:,} "
                  f"parameters\nrun folder {args.out}")
        write_log(log_file, {"event": "start", "args": {k: str(v) for k, v in vars(args).items()}})
        # 1. training (skipped for --eval-only and for a model with nothing to learn)
        if training and learnable:
            train(model, optimizer, args, cfg, device, rank, world, log_file, resumed)
            if args.select_best and (args.out / "best.pt").exists():
                unwrap(model).load_state_dict(read_checkpoint(args.out / "best.pt")["model"])
                log(rank, "evaluating best.pt (chosen on the test fold: an optimistic estimate)")
        # 2. evaluation under the shared protocol, and pictures of it
        if args.vis and rank == 0:
            visualise(model, args, device, rank)
        scores = evaluate_protocol(model, args, device, rank, world)
        report(args, scores, rank, log_file)
    return scores["miou"], scores["fbiou"]


def run_all_folds(args, module):
    """--fold all: the four folds one after another, each in its own folder (OUT/foldK, or each fold's default
    folder), then their table. Resumable: a fold whose training is complete and whose last result was made
    under this protocol is taken as it is, an interrupted one resumes, a complete one without that result is
    evaluated. With --eval-only, every fold's checkpoint (--checkpoint with {fold} in it, else the fold folder's
    last.pt) is evaluated. Under torchrun every fold uses every process."""
    rank, records = int(os.environ.get("RANK", 0)), []
    for fold in range(data.NUM_FOLDS):
        one = argparse.Namespace(**{**vars(args), "fold": fold})
        one.out = args.out / f"fold{fold}" if args.out else default_out(args, fold)
        last = one.out / "last.pt"
        if args.checkpoint:
            one.checkpoint = args.checkpoint.format(fold=fold)
        elif args.eval_only:
            one.checkpoint = str(last)
        if args.stage:  # a model's extra stage, for every fold (e.g. Sym-Net's four base learners)
            run(one, module)
            continue
        fresh = args.eval_only or args.overwrite
        record = None if fresh else finished_result(one)
        if record is not None:
            log(rank, f"fold {fold}: complete in {one.out}, its result taken from metrics.jsonl")
        else:
            if not fresh and last.exists():
                done = read_checkpoint(last)["epoch"] >= one.epochs
                one.eval_only, one.checkpoint, one.resume = (True, str(last), False) if done else (False, None, True)
            elif not fresh and (one.out / "metrics.jsonl").exists():
                one.overwrite = True  # a fold that died before its first checkpoint: nothing of it to keep
            log(rank, f"\n=== fold {fold} of --fold all: {one.out}")
            run(one, module)
            record = read_result(one.out) if rank == 0 else None
        records.append(record)
    if rank == 0 and not args.stage:
        report_folds(args, records)
    return records


def run_stage(args, module, rank):
    """--stage NAME: the model file's STAGES[NAME](run, schedule, options), options being the model's own flags
    ({dest: value}); a NaN loss stops it with exit status 3."""
    stages = getattr(module, "STAGES", {})
    if args.stage not in stages:
        sys.exit(f"error: --stage {args.stage}: {args.model} offers {sorted(stages) or 'no extra stage'}")
    options = {k: getattr(args, k) for k in args.own_flags}
    schedule = common.Schedule(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               train_length=args.train_length, workers=args.workers, seed=args.seed,
                               log_every=args.log_every, bf16=not args.fp32, out=args.out, resume=args.resume)
    try:
        return stages[args.stage](run_context(args), schedule, options)
    except common.WeightsUnavailableError as err:
        sys.exit(f"error: {err}")
    except common.NonFiniteLossError as err:
        log(rank, f"error: {err} in --stage {args.stage}; stopping (try a lower learning rate, or --fp32).")
        sys.exit(EXIT_NONFINITE)


# ----------------------------------------------------------------------------------------------------------
# Data and model: the episodes, the model file, the built-in baseline


def build_dataset(args, split):
    try:
        return data.build_dataset(args.dataset, split, args.fold, shot=args.shot, img_size=args.img_size,
                                  root=args.data_root, seed=args.seed if split == "train" else 0,
                                  episodes=args.test_episodes,
                                  coco_split=args.coco_split, train_length=args.train_length,
                                  support_boxes=args.support_boxes, augment=args.augment,
                                  test_classes=args.test_classes)
    except FileNotFoundError as err:  # a missing or incomplete data root: the message names the layout
        sys.exit(f"error: {err}")


class EpisodeSampler(Sampler):
    """Yields (stream, index) keys. Training: a permutation seeded by (seed, epoch), split across ranks,
    trimmed to whole global batches. Test: episodes 0..n-1 of one test seed, rank r taking r, r+world, ...
    The key carries the stream (epoch or test seed), so that persistent DataLoader workers draw the right
    episode without being told about the epoch."""

    def __init__(self, length, rank=0, world=1, shuffle=False, seed=0, batch_size=1):
        self.length, self.rank, self.world = length, rank, world
        self.shuffle, self.seed, self.batch_size = shuffle, seed, batch_size
        self.stream = 0

    def set_stream(self, stream):
        self.stream = stream

    def _indices(self):
        if not self.shuffle:
            return list(range(self.rank, self.length, self.world))
        g = torch.Generator().manual_seed(self.seed * 100003 + self.stream)
        order = torch.randperm(self.length, generator=g).tolist()
        per_rank = self.length // (self.world * self.batch_size) * self.batch_size
        return order[self.rank::self.world][:per_rank]

    def __iter__(self):
        return iter([(self.stream, i) for i in self._indices()])

    def __len__(self):
        return len(self._indices())


def make_loader(dataset, sampler, batch_size, args, device, drop_last):
    """The episodes' DataLoader. It sets dataset.compact: batches carry uint8 images and masks (a fifth of the
    bytes through shared memory and pinning), which to_device turns into the default episodes on the device."""
    workers = args.workers
    dataset.compact = True
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=data.collate_episodes, drop_last=drop_last,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None)


def load_model_module(name):
    """A model file by name (`symnet`), the built-in `baseline`, or the path of a user's own .py file."""
    if name == "baseline":
        return BaselineModule
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            sys.exit(f"error: --model {name}: no such file")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module  # so that checkpoints and pickling can find it
        spec.loader.exec_module(module)
    elif name in MODELS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            sys.exit(f"error: --model {name}: {name}.py is not in this checkout yet")
    else:
        sys.exit(f"error: --model {name}: choose one of {', '.join(MODELS)} or give the path of a .py file")
    for attr in ("Config", "Model"):
        if not hasattr(module, attr):
            sys.exit(f"error: --model {name}: the module defines no `{attr}` (see train.py's docstring)")
    return module


def make_config(module, args):
    """The model's Config: its paper's defaults, then the backbone flags and the model's own flags (add_args,
    given or from its recipe). Nothing else of the command line reaches a Config: the run's context is a
    common.Run (run_context)."""
    values = {"backbone": args.backbone, "pretrained": backbone_weights(args),
              **{k: getattr(args, k) for k in args.own_flags if getattr(args, k) is not None}}
    names = {field.name for field in dataclasses.fields(module.Config)}
    return module.Config(**{k: v for k, v in values.items() if k in names})


def run_context(args, from_checkpoint=False):
    """The common.Run a model and a stage get: the run's dataset, fold, shots, crop and backbone."""
    return common.Run(dataset=args.dataset, fold=args.fold, coco_split=args.coco_split, data_root=args.data_root,
                      test_classes=tuple(args.test_classes) if args.test_classes else None, shot=args.shot,
                      img_size=args.img_size, backbone=args.backbone, pretrained=backbone_weights(args),
                      from_checkpoint=from_checkpoint)


def construct(module, cfg, run):
    """A model file's model for a run: its build(cfg, run) where it has one (which reads the files its stages
    wrote), else Model(cfg, run), else Model(cfg) (a model that needs no run context)."""
    if hasattr(module, "build"):
        return module.build(cfg, run)
    if "run" in inspect.signature(module.Model).parameters:
        return module.Model(cfg, run)
    return module.Model(cfg)


def build_model(module, args, device, rank, world):
    """(model, optimizer, cfg, resumed): the model from the paper's Config and the flags, or from --checkpoint's
    Config and weights (the model's own flags given now apply), or from OUT/last.pt for --resume; random backbones
    get their BatchNorm statistics (--no-pretrained); channels-last, compiled, wrapped in DDP as asked. resumed is
    the --resume checkpoint's state (its optimizer and epoch), else None."""
    state = read_checkpoint(args.checkpoint) if args.checkpoint else None
    resumed = read_resumable(args) if args.resume else None
    names = {field.name for field in dataclasses.fields(module.Config)}  # a saved field that is gone is left out
    if state is not None:  # every weight is in the checkpoint; the model's own flags given now apply (--kshot)
        given = {"pretrained": False, **{k: getattr(args, k) for k in args.model_flags}}
        saved = {k: v for k, v in {**state["config"], **given}.items() if k in names}
        cfg = module.Config(**saved)
    else:
        cfg = make_config(module, args)
    if resumed is not None:  # the flags as now; the fields no flag sets (the structure a model recorded) as saved
        flagged = {"backbone", "pretrained", *args.own_flags}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in resumed["config"].items() if k in names - flagged})
    torch.manual_seed(args.seed)
    try:
        model = construct(module, cfg, run_context(args, from_checkpoint=state is not None or resumed is not None))
    except common.WeightsUnavailableError as err:  # offline, a missing stage file: say what to do, no traceback
        sys.exit(f"error: {err}")
    cfg = getattr(model, "cfg", cfg)  # as built: a build(cfg, run) may record the structure it found (Sym-Net)
    model = model.to(device)
    if state is not None or resumed is not None:
        load_weights(model, state or resumed, args.checkpoint or args.out / "last.pt")
    elif not (args.bench or args.predict):
        calibrate_random_backbones(model, args, device, rank)
    # NHWC: cuDNN's tensor-core convolutions and oneDNN's CPU ones are faster on it
    model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY) if params else None
    if args.compile:
        model = torch.compile(model)
    if world > 1 and params:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=getattr(unwrap(model), "find_unused_parameters", False))
    return model, optimizer, cfg, resumed


def calibrate_random_backbones(model, args, device, rank):
    """--no-pretrained: every random-weight common.Backbone of the model gets BatchNorm statistics estimated on
    the first common.CALIBRATION_IMAGES images of the training episodes (the same for every model and process).
    They are saved in the checkpoints with every other weight."""
    backbones = [m for m in model.modules() if isinstance(m, common.Backbone) and m.needs_statistics]
    if not backbones:
        return
    dataset, images = build_dataset(args, "train"), []
    for i in range(len(dataset)):
        if len(images) >= common.CALIBRATION_IMAGES:
            break
        episode = dataset[(0, i)]
        images += [episode["img_q"], *episode["img_s"]]
    images = torch.stack(images[:common.CALIBRATION_IMAGES]).to(device)  # (N,3,H,W)
    for backbone in backbones:
        backbone.calibrate(images)
    log(rank, f"random backbone weights: BatchNorm statistics estimated on {len(images)} training images\n"
              "(the models are built for ImageNet features: on random ones expect ~0 mIoU, README, quick start)")


def read_checkpoint(path):
    """A checkpoint train.py wrote (last.pt, best.pt); anything else stops with a message naming the file."""
    if not Path(path).is_file():
        sys.exit(f"error: checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # not a torch file, truncated, ...: unpickling raises many kinds
        sys.exit(f"error: cannot read checkpoint {path}: {err}")
    if not isinstance(state, dict) or not {"model", "config", "args"} <= set(state):
        sys.exit(f"error: {path} is not a checkpoint of train.py (last.pt or best.pt of a run folder); a stage's "
                 "file (a base learner, a prior extractor) is found by the model itself")
    return state


def load_weights(model, state, path):
    """model.load_state_dict(state["model"]), with one line naming the file when its weights do not fit."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        sys.exit(f"error: the weights in {path} do not fit this model ({describe_run(state['args'])} saved "
                 f"them): {detail[:400]}{'...' if len(detail) > 400 else ''}")


# The built-in parameter-free baseline: the floor that every model must clearly beat (--model baseline)
@dataclasses.dataclass
class BaselineConfig:
    backbone: str = "resnet50"
    pretrained: bool = True
    baseline_features: str = "layer3"  # mid-level features, PFENet's prototype level; "image": the pixels


class PrototypeBaseline(nn.Module):
    """PANet's parameter-free rule: foreground and background prototypes of the support by masked average
    pooling, cosine with every query pixel, foreground where cos(fg) > cos(bg), i.e. a threshold at 0 on the
    difference. K shots: the prototypes are averaged. No learnable parameter: train.py evaluates it directly.
    Features: a level of the frozen backbone, or the normalised pixels ("image"), which need no weights at all.
    """

    def __init__(self, cfg: BaselineConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.baseline_features != "image":
            self.backbone = common.Backbone(cfg.backbone, pretrained=cfg.pretrained)

    def features(self, img):
        return img if self.cfg.baseline_features == "image" else self.backbone(img)[self.cfg.baseline_features]

    def forward(self, img_q, img_s, m_s, class_ids=None):
        B, S = img_s.shape[:2]
        f_q = self.features(img_q)  # (B,C,h,w)
        f_s = self.features(img_s.flatten(0, 1))  # (B*S,C,h,w)
        m = m_s.flatten(0, 1)  # (B*S,H,W); 255 belongs to neither prototype
        protos = [common.masked_average_pooling(f_s, (m == c).float()).view(B, S, -1).mean(1) for c in (0, 1)]
        cos = [F.cosine_similarity(f_q, p[:, :, None, None], dim=1) for p in protos]  # 2 x (B,h,w)
        logits = torch.stack(cos, 1)  # (B,2,h,w): background, foreground
        return {"logits": F.interpolate(logits, img_q.shape[-2:], mode="bilinear", align_corners=True)}

    def loss(self, out, m_q, m_s):
        total = common.seg_loss(out["logits"], m_q)
        return total, {"main": total}


class BaselineModule:
    """Stands in for a model file, so that the baseline goes through exactly the same code path."""
    Config = BaselineConfig
    Model = PrototypeBaseline
    DEFAULTS = {}
    __name__ = "baseline"

    @staticmethod
    def add_args(parser):
        parser.add_argument("--baseline-features", choices=["layer1", "layer2", "layer3", "layer4", "image"],
                            help="features of the baseline (default layer3)")


# ----------------------------------------------------------------------------------------------------------
# Training: epochs of episodic SGD through common.fit, a checkpoint after each


def train(model, optimizer, args, cfg, device, rank, world, log_file, resumed=None):
    """Epochs of episodic SGD with a per-iteration poly schedule; a checkpoint every epoch; returns best mIoU.
    resumed: the state of OUT/last.pt for --resume (main has loaded its model weights already)."""
    dataset = build_dataset(args, "train")
    per_rank = args.batch_size // world
    sampler = EpisodeSampler(len(dataset), rank, world, shuffle=True, seed=args.seed, batch_size=per_rank)
    loader = make_loader(dataset, sampler, per_rank, args, device, drop_last=True)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        sys.exit(f"error: {len(dataset)} training episodes do not fill one batch of {args.batch_size}")
    max_iter = args.epochs * steps_per_epoch
    start_epoch, best = 0, -1.0
    last = args.out / "last.pt"
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        start_epoch, best = resumed["epoch"], resumed["best"]
        log(rank, f"resumed from {last} after epoch {start_epoch}")
    log(rank, f"training: {len(dataset)} episodes/epoch, {steps_per_epoch} steps of {args.batch_size}, "
              f"{args.epochs} epochs, lr {args.lr}")

    def batches(epoch):
        sampler.set_stream(epoch)
        epoch_batches = iter(loader)  # starting workers draws from the global RNG: seed after it, so that
        torch.manual_seed(args.seed * 100003 + epoch * 101 + rank)  # dropout is the same whether or not we resumed
        model.train()
        return epoch_batches

    def step(batch):
        batch = to_device(batch, device)
        with autocast(device, not args.fp32):
            out = model(batch["img_q"], batch["img_s"], batch["m_s"], batch["class_id"], **query_mask(model, batch))
            return unwrap(model).loss(out, batch["m_q"], batch["m_s"])

    def end_epoch(epoch):
        nonlocal best
        if args.select_best and ((epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs):
            scores = evaluate_protocol(model, args, device, rank, world)
            miou = scores["miou"]
            write_log(log_file, {"event": "val", "epoch": epoch + 1, "miou": miou, "fbiou": scores["fbiou"]})
            if miou > best:
                best = miou
                if rank == 0:
                    save_checkpoint(args.out / "best.pt", model, optimizer, epoch + 1, cfg, args, best)
        if rank == 0:
            save_checkpoint(last, model, optimizer, epoch + 1, cfg, args, best)
        if world > 1:
            dist.barrier()

    try:
        common.fit(step, optimizer, batches, lambda it: args.lr * (1 - it / max_iter) ** POLY_POWER, args.epochs,
                   steps_per_epoch, start_epoch=start_epoch, log_every=args.log_every, per_step=args.batch_size,
                   log=lambda line: log(rank, line), log_file=log_file, end_epoch=end_epoch)
    except common.NonFiniteLossError as err:
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        log(rank, f"error: {err}; stopping. {kept} (try a lower --lr, or --fp32).")
        sys.exit(EXIT_NONFINITE)
    return best


def save_checkpoint(path, model, optimizer, epoch, cfg, args, best):
    state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "config": dataclasses.asdict(cfg), "args": {k: str(v) if isinstance(v, Path) else v
                                                         for k, v in vars(args).items()}, "best": best}
    common.save_atomic(state, path)


def query_mask(model, batch):
    """{"m_q": the query mask} for a model whose forward takes one in training (CRCNet predicts the support with
    the query as its labelled reference), else {}. Evaluation never passes it."""
    return {"m_q": batch["m_q"]} if "m_q" in inspect.signature(unwrap(model).forward).parameters else {}


# ----------------------------------------------------------------------------------------------------------
# Evaluation: the shared protocol, the report, the four-fold table


@torch.no_grad()
def evaluate(model, loader, dataset, device, args, rank, seed):
    """One test seed: class mIoU and FB-IoU (PFENet's definitions, common.IoUMeter) at original resolution."""
    net = unwrap(model)
    net.eval()
    infer = getattr(net, "predict", None) or (lambda *a: net(*a)["logits"])
    meter = common.IoUMeter(dataset.num_classes, device=device)
    loader.sampler.set_stream(seed)
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, args.bf16_eval):
            logits = infer(batch["img_q"], batch["img_s"], batch["m_s"], batch["class_id"])  # (B,2,H,W)
        for b, target in enumerate(batch["m_q_orig"]):
            probs = data.logits_to_original(logits[b].float(), target.shape[-2:]).softmax(0)  # (2,H0,W0)
            meter.update(probs.argmax(0)[None], target[None].to(device), batch["class_id"][b:b + 1], probs[1][None])
    meter.all_reduce()
    return meter


def evaluate_protocol(model, args, device, rank, world):
    """All test seeds; returns a dict of fractions: miou, fbiou (means over the seeds), miou_std, fbiou_std (their
    standard deviations over the seeds), per_class {class: IoU, mean over the seeds}, fg_prob [mean p(fg) on true
    background, on true foreground], seeds (per-seed miou and fbiou), and the dataset under "dataset"."""
    dataset = build_dataset(args, "test")
    sampler = EpisodeSampler(len(dataset), rank, world)
    loader = make_loader(dataset, sampler, max(1, args.batch_size // world), args, device, drop_last=False)
    mious, fbious, per_class, probs = [], [], {}, []
    for seed in range(args.test_seeds):
        t0 = time.perf_counter()
        meter = evaluate(model, loader, dataset, device, args, rank, seed)
        classes = [int(c) for c in dataset.classes]
        unseen = sorted(set(classes) - set(meter.seen()))
        if unseen:
            names = ", ".join(dataset.class_names.get(c, str(c)) for c in unseen)
            log(rank, f"WARNING: test seed {seed} has no episode of {names}: IoU 0 in the mIoU, as PFENet and HSNet "
                      "count it (more --test-episodes would cover every class)")
        mious.append(meter.miou(classes))
        fbious.append(meter.fbiou())
        probs.append(meter.mean_probability())
        for c, iou in meter.class_iou(classes).items():
            per_class.setdefault(c, []).append(iou)
        log(rank, f"test seed {seed}: mIoU {100 * mious[-1]:.2f}  FB-IoU {100 * fbious[-1]:.2f}  "
                  f"({len(dataset)} episodes, {time.perf_counter() - t0:.1f}s)")
    (miou, miou_std), (fbiou, fbiou_std) = spread(mious), spread(fbious)
    return {"miou": miou, "miou_std": miou_std, "fbiou": fbiou, "fbiou_std": fbiou_std,
            "per_class": {c: float(np.mean(v)) for c, v in per_class.items()}, "fg_prob": np.mean(probs, 0).tolist(),
            "seeds": {"miou": mious, "fbiou": fbious}, "dataset": dataset}


def spread(values):
    """(mean, sample standard deviation) of a list; the deviation is NaN for a single value."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def report(args, scores, rank, log_file):
    """The class table, the mean and spread over the test seeds, a metrics.jsonl record and the RESULT line."""
    if rank != 0:
        return
    dataset, per_class, probs = scores["dataset"], scores["per_class"], scores["fg_prob"]
    names = {c: dataset.class_names.get(c, str(c)) for c in per_class}
    width = max(map(len, names.values()), default=4)
    print(f"\n{'class':>6}  {'name':<{width}}  IoU")
    for c in sorted(per_class):
        print(f"{c:>6}  {names[c]:<{width}}  {100 * per_class[c]:6.2f}")
    if args.test_seeds > 1:
        print(f"\nmIoU {100 * scores['miou']:.2f} +- {100 * scores['miou_std']:.2f}  "
              f"FB-IoU {100 * scores['fbiou']:.2f} +- {100 * scores['fbiou_std']:.2f}  (mean +- standard deviation "
              f"over {args.test_seeds} test seeds of {args.test_episodes} episodes)")
    else:
        print(f"\nmIoU {100 * scores['miou']:.2f}  FB-IoU {100 * scores['fbiou']:.2f}  (one test seed of "
              f"{args.test_episodes} episodes, so no spread: --test-seeds 5 gives one)")
    print(f"mean p(foreground): {probs[1]:.3f} on object pixels, {probs[0]:.3f} on background (a diagnostic: a "
          "pixel counts as foreground from 0.5 on)")
    record = {"event": "result", "model": Path(args.model).stem, "dataset": args.dataset, "fold": args.fold,
              "test_classes": args.test_classes,
              "shot": args.shot, "img_size": args.img_size, "coco_split": args.coco_split,
              **{k: scores[k] for k in ("miou", "miou_std", "fbiou", "fbiou_std", "per_class")},
              "seed_miou": scores["seeds"]["miou"], "seed_fbiou": scores["seeds"]["fbiou"],
              "fg_prob_object": probs[1], "fg_prob_background": probs[0],
              "episodes": args.test_episodes, "seeds": args.test_seeds}
    write_log(log_file, record)
    print(result_line(record), flush=True)


def result_line(record):
    """The line for scripts: RESULT model=.. dataset=.. fold=.. shot=.. miou=.. miou_std=.. fbiou=.. fbiou_std=.."""
    scores = " ".join(f"{k}={100 * record[k]:.2f}" for k in ("miou", "miou_std", "fbiou", "fbiou_std"))
    split = split_text(record).replace(" ", "=", 1)  # fold=K, or classes=3,7,9
    return f"RESULT model={record['model']} dataset={record['dataset']} {split} " \
           f"shot={record['shot']} {scores}"


def write_log(log_file, record):
    if log_file is not None:
        with open(log_file, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_result(out):
    """The last result record of OUT/metrics.jsonl, or None."""
    log_file = out / "metrics.jsonl"
    records = [json.loads(line) for line in log_file.read_text().splitlines()] if log_file.exists() else []
    return next((r for r in reversed(records) if r.get("event") == "result"), None)


def finished_result(args):
    """The result record of a fold whose training is complete (last.pt at --epochs) and whose last result was
    made under this run's protocol (shot, crop, test episodes and seeds), else None."""
    record = read_result(args.out)
    if record is None or not (args.out / "last.pt").exists():
        return None
    protocol = ("shot", "img_size", "episodes", "seeds")
    asked = (args.shot, args.img_size, args.test_episodes, args.test_seeds)
    if tuple(record.get(k) for k in protocol) != asked or read_checkpoint(args.out / "last.pt")["epoch"] < args.epochs:
        return None
    return record


def report_folds(args, records):
    """The papers' four-fold table: per-fold mIoU and FB-IoU and their means, each with its standard deviation
    over the test seeds (the mean's: of the per-seed means over the folds), as text and as Markdown, then one
    RESULT line for the mean."""
    per_seed = {k: np.array([r[f"seed_{k}"] for r in records]) for k in ("miou", "fbiou")}  # (folds, seeds)
    mean = {k: spread(v.mean(0).tolist()) for k, v in per_seed.items()}
    cell = lambda m, sd: f"{100 * m:.2f}" + ("" if math.isnan(sd) else f" +- {100 * sd:.2f}")
    name, seeds = Path(args.model).stem, records[0]["seeds"]
    print(f"\n{name} on {args.dataset}, {args.shot}-shot, four folds ({seeds} test seed(s) of "
          f"{records[0]['episodes']} episodes; +- is the standard deviation over the seeds)")
    print(f"{'fold':>6}  {'mIoU':>15}  {'FB-IoU':>15}")
    for fold, r in enumerate(records):
        print(f"{fold:>6}  {cell(r['miou'], r['miou_std']):>15}  {cell(r['fbiou'], r['fbiou_std']):>15}")
    print(f"{'mean':>6}  {cell(*mean['miou']):>15}  {cell(*mean['fbiou']):>15}")
    md = lambda m, sd: f"{100 * m:.1f}" + ("" if math.isnan(sd) else f" ± {100 * sd:.1f}")
    print("\n| model | shot | fold 0 | fold 1 | fold 2 | fold 3 | mean mIoU | mean FB-IoU |\n"
          "|---|---|---|---|---|---|---|---|")
    print(f"| {name} | {args.shot} | " + " | ".join(md(r["miou"], r["miou_std"]) for r in records)
          + f" | {md(*mean['miou'])} | {md(*mean['fbiou'])} |\n")
    print(result_line({"model": name, "dataset": args.dataset, "fold": "all", "shot": args.shot,
                       "miou": mean["miou"][0], "miou_std": mean["miou"][1], "fbiou": mean["fbiou"][0],
                       "fbiou_std": mean["fbiou"][1]}), flush=True)


# ----------------------------------------------------------------------------------------------------------
# Run folders: nothing a user made is lost


@contextmanager
def hold_run_folder(args, training):
    """Make args.out ready for this run and hold it while the block runs. The folder must be writable; a lock
    (OUT/.lock, released by the system however the process ends) refuses a second run on it, naming the first
    one's process; temporaries that an interrupted save left are removed; and a training run does not start
    over a run that is there unless --resume continues it or --overwrite replaces it."""
    out = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / ".lock", "a+")
    except OSError as err:
        sys.exit(f"error: cannot write to the run folder {out}: {err.strerror or err} (give a writable --out)")
    try:
        take_run_folder(handle, args, training)
        yield
    finally:
        handle.close()  # the lock with it: the next run (another fold of --fold all) may take the folder


def take_run_folder(handle, args, training):
    """hold_run_folder's checks, with the lock file `handle` open: lock it, write our pid, clean, refuse."""
    out = args.out
    if fcntl is not None:  # POSIX; elsewhere runs are not locked
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            sys.exit(f"error: the run folder {out} is in use by another run (process {holder}); wait for it to end "
                     "or give another --out")
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    for stale in sorted(out.glob("*.tmp")):  # the folder is ours now: no other save is under way in it
        stale.unlink(missing_ok=True)
        print(f"removed {stale}: a temporary left by an interrupted save", flush=True)
    last = out / "last.pt"
    if training and not args.resume and (last.exists() or (out / "metrics.jsonl").exists()):
        try:
            state = torch.load(last, map_location="cpu", weights_only=False)
            held = f"{describe_run(state['args'])}, epoch {state['epoch']} of {state['args']['epochs']}"
        except FileNotFoundError:
            held = "the log of a run that saved no checkpoint, or of an evaluation"
        except Exception as err:  # an unreadable file is a run too: say so, and still refuse
            held = f"a last.pt that cannot be read: {' '.join(str(err).split())[:200]}"
        if not args.overwrite:
            sys.exit(f"error: {out} holds a run already ({held}): continue it with --resume, replace it with "
                     "--overwrite, or give another --out")
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        print(f"--overwrite: removed the run that was in {out} ({held})", flush=True)


def read_resumable(args):
    """OUT/last.pt for --resume, refused with a message when it belongs to another run than the one asked for."""
    last = args.out / "last.pt"
    if not last.exists():
        sys.exit(f"error: --resume: {args.out} has no last.pt to continue (start the run without --resume)")
    state = read_checkpoint(last)
    saved, asked = state["args"], {**vars(args), "model": args.model}
    differ = [k for k in ("model", "dataset", "fold", "test_classes", "shot", "coco_split", "backbone")
              if (Path(str(saved.get(k))).stem if k == "model" else saved.get(k, asked[k])) !=
              (Path(str(asked[k])).stem if k == "model" else asked[k])]
    if differ:
        sys.exit(f"error: --resume: {last} is a checkpoint of {describe_run(saved)}, not of {describe_run(asked)} "
                 f"({', '.join(differ)} differ): give the flags it was trained with, or another --out")
    return state


def truncate_log(log_file, epoch):
    """--resume: drop the records of epochs after the checkpoint's (an interrupted epoch's, which the resumed run
    writes again) and mark the resume point, so that metrics.jsonl reads as one run."""
    if not log_file.exists():
        return
    records = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    kept = [r for r in records if not (r.get("event") in ("train", "val") and r.get("epoch", 0) > epoch)]
    tmp = log_file.with_name(f".{log_file.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept + [{"event": "resume", "epoch": epoch}]))
    os.replace(tmp, log_file)


def stop_interrupted(args, argv):
    """Ctrl-C: one line that says what was kept and how to continue; exit status 130."""
    last = args.out / "last.pt"
    if args.eval_only or args.stage or args.bench or args.predict or args.bench_data:
        message = "interrupted"
    elif last.exists():
        command = " ".join(["python train.py", *[shlex.quote(a) for a in argv if a != "--overwrite"]]
                           + ([] if "--resume" in argv else ["--resume"]))
        message = f"interrupted: {last} holds the last finished epoch; continue with: {command}"
    else:
        message = "interrupted before the first epoch ended: nothing was saved"
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"\n{message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_INTERRUPTED)


def original_message(err):
    """The message of err; for one a DataLoader worker re-raised (its text is "Caught X in DataLoader worker
    process N. Original Traceback ..."), the original exception's own last line."""
    text = str(err).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def describe_run(saved):
    """The run that saved arguments `saved` (a checkpoint's "args") belong to, in words."""
    return (f"{Path(saved['model']).stem} on {saved['dataset']} {split_text(saved)}, {saved['shot']}-shot, "
            f"{saved.get('backbone', 'resnet50')}")


def split_text(run):
    """"fold K", or "classes 3,7,9" for --test-classes: which novel classes a run (its arguments as a dict) tests."""
    classes = run.get("test_classes")
    return f"classes {','.join(map(str, classes))}" if classes else f"fold {run['fold']}"


# ----------------------------------------------------------------------------------------------------------
# Devices and processes


def setup_device():
    """(device, rank, world). Under torchrun every process takes its own GPU (or CPU with gloo)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world


def log(rank, *msg):
    if rank == 0:
        print(*msg, flush=True)


def autocast(device, bf16):
    """bf16 autocast on CUDA where bf16 is set (training, unless --fp32), else fp32 (evaluation, unless --bf16-eval)."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def to_device(batch, device):
    return data.to_device(batch, device)


def unwrap(model):
    model = model.module if isinstance(model, DDP) else model
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module


def count_parameters(model):
    learnable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return learnable, sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# Tools: --bench (speed, host syncs, work) and --bench-data


def bench(model, optimizer, args, device):
    """Training steps and inference on random episodes at the configured size; no data loading in the timing."""
    B, S, size = args.batch_size, args.shot, args.img_size
    img_q, img_s = torch.randn(B, 3, size, size, device=device), torch.randn(B, S, 3, size, size, device=device)
    m_q = torch.zeros(B, size, size, dtype=torch.long, device=device)
    m_q[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    m_s = m_q[:, None].expand(B, S, size, size).contiguous()
    class_ids = torch.ones(B, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def timed(fn, steps):
        for _ in range(max(2, steps // 5)):  # warm-up (and compilation)
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        return (time.perf_counter() - t0) / steps

    def train_step(net=model):
        with autocast(device, not args.fp32):
            out = net(img_q, img_s, m_s, class_ids, **query_mask(net, {"m_q": m_q}))
            loss, _ = unwrap(net).loss(out, m_q, m_s)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def infer():
        with autocast(device, args.bf16_eval):
            model(img_q[:1], img_s[:1], m_s[:1], class_ids[:1])

    learnable, total = count_parameters(model)
    model.train()
    t_train = timed(train_step, args.bench_steps) if learnable else float("nan")
    syncs = host_syncs(train_step) if learnable else []
    flops, backbone_flops = count_flops(unwrap(model), lambda: train_step(unwrap(model))) if learnable else (0, 0)
    model.eval()
    t_infer = timed(infer, args.bench_steps)
    if device.type == "cuda":
        peak, memory = torch.cuda.max_memory_allocated() / 2**30, "peak GPU memory: {:.2f} GiB"
    else:
        peak, memory = peak_rss_gib(), "peak process memory: {:.2f} GiB (resident, since the program started)"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"bench {Path(args.model).stem} on {name}, torch {torch.__version__}, {size}x{size}, {S}-shot, "
          f"batch {B}, training {'fp32' if args.fp32 or device.type != 'cuda' else 'bf16 autocast'}, inference "
          f"{'bf16 autocast' if args.bf16_eval and device.type == 'cuda' else 'fp32'}")
    print(f"  train: {1000 * t_train:.1f} ms/step, {B / t_train:.1f} episodes/s")
    tflops = bf16_peak_tflops(device, args)
    achieved = 100 * flops / t_train / (tflops * 1e12) if flops and tflops else float("nan")
    floor = backbone_flops / (tflops * 1e12) if tflops else float("nan")  # s: the backbone alone at the peak
    if flops:
        print(f"  work: {flops / 1e12:.3f} TFLOP/step (convolutions and matrix products, forward and backward), "
              f"{backbone_flops / 1e12:.3f} of them in the frozen backbone; {flops / t_train / 1e12:.2f} TFLOP/s")
        if tflops:
            print(f"  bf16 peak {tflops:.0f} TFLOP/s: {achieved:.1f}% achieved; "
                  f"the backbone alone at peak takes {1000 * floor:.1f} ms, {100 * floor / t_train:.1f}% of the step")
    if learnable:
        print(f"  host syncs: {len(syncs)} per training step{': ' + ', '.join(sorted(set(syncs))) if syncs else ''} "
              f"(operations that make the CPU wait for a GPU; with none it queues the next step while one runs)")
    print(f"  inference: {1000 * t_infer:.1f} ms/episode")
    print(f"  {memory.format(peak)}")
    print(f"  parameters: {learnable / 1e6:.2f}M learnable, {total / 1e6:.2f}M total")
    print(f"BENCH model={Path(args.model).stem} device={name.replace(' ', '_')} size={size} shot={S} batch={B} "
          f"train_ms={1000 * t_train:.1f} episodes_per_s={B / t_train:.1f} infer_ms={1000 * t_infer:.1f} "
          f"peak_gib={peak:.2f} tflop_per_step={flops / 1e12:.3f} bf16_peak_pct={achieved:.1f} "
          f"backbone_floor_pct={100 * floor / t_train:.1f} learnable_m={learnable / 1e6:.2f} "
          f"total_m={total / 1e6:.2f} host_syncs={len(syncs)}", flush=True)  # one line for scripts, as RESULT


# Operations after which the host must wait for a GPU: a value read back (.item(), float(t), `if t:`), an output
# whose size depends on the values (nonzero, torch.where(c), unique, masked_select, repeat_interleave by a tensor).
# Boolean indexing and copies to the CPU are recognised by their arguments (sync_op).
HOST_SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
                           "unique_consecutive", "equal", "is_nonzero", "bincount"})


def sync_op(func, args, kwargs):
    """The name of the aten operation func(*args, **kwargs) if it makes the host wait for a GPU, else None."""
    name = func._overloadpacket.__name__
    tensors = [a for a in args if torch.is_tensor(a)]
    if name in HOST_SYNC_OPS or (name == "repeat_interleave" and func._overloadname == "Tensor"
                                 and kwargs.get("output_size") is None):  # repeats given as a tensor
        return name
    if name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
            torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ()):
        return f"{name} (boolean mask)"
    if name == "_to_copy" and tensors and tensors[0].device.type != "cpu" and \
            torch.device(kwargs.get("device") or tensors[0].device).type == "cpu":
        return "_to_copy (to the CPU)"
    if name == "copy_" and len(tensors) == 2 and tensors[0].device.type == "cpu" and tensors[1].device.type != "cpu":
        return "copy_ (to the CPU)"
    return None


def host_syncs(fn):
    """The operations of fn() that make the host wait for a GPU (sync_op), by name, in the order they ran. Found
    by what they are, not by timing, so a CPU run finds them too; forward and backward both."""
    found = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = sync_op(func, args, kwargs or {})
            if name is not None:
                found.append(name)
            return func(*args, **(kwargs or {}))

    with Watch():
        fn()
    return found


def peak_rss_gib():
    """The process's peak resident memory in GiB (Linux and macOS; NaN where the OS does not say)."""
    try:
        import resource  # POSIX only
    except ImportError:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def count_flops(net, step):
    """(all, backbone) floating-point operations of step(): convolutions and matrix products (attention
    included), forward and backward, 2 per multiply-add, by torch.utils.flop_counter's formulas; elementwise
    work is not counted. The backbone's are those run inside any common.Backbone of net. Counted by a dispatch
    mode and forward hooks rather than FlopCounterMode, whose backward hooks break OCNet's torch.autograd.grad."""
    counted = {"all": 0, "backbone": 0, "inside": 0}

    def enter(module, inputs):
        counted["inside"] += 1

    def leave(module, inputs, output):
        counted["inside"] -= 1

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                flops = formula(*args, **(kwargs or {}), out_val=out)
                counted["all"] += flops
                counted["backbone"] += flops if counted["inside"] else 0
            return out

    backbones = [m for m in net.modules() if isinstance(m, common.Backbone)]
    handles = [h for m in backbones for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with Count():
            step()
    finally:
        for handle in handles:
            handle.remove()
    return counted["all"], counted["backbone"]


def bf16_peak_tflops(device, args):
    """--peak-tflops, else the data-sheet rate of a known GPU (BF16_PEAK_TFLOPS), else None."""
    if args.peak_tflops or device.type != "cuda":
        return args.peak_tflops
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in BF16_PEAK_TFLOPS if re.search(rf"\b{key}\b", name)), None)


def bench_data(args, device):
    """Training episodes/s that data.py delivers to the device (decode, augment, collate, to_device) with 0, 1, 2,
    4, ... --workers DataLoader workers, per worker, and the bytes of one batch, which cross from a worker to the
    main process. PASCAL without --data-root: BENCH_DATA_IMAGES generated JPEGs in a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        if args.dataset == "pascal" and args.data_root is None:
            print(f"bench-data: writing {BENCH_DATA_IMAGES} PASCAL-sized JPEGs to {tmp}", flush=True)
            args.data_root = tmp
            write_pascal_like(Path(tmp), BENCH_DATA_IMAGES)
        dataset = build_dataset(args, "train")
        if len(dataset) < args.batch_size:
            sys.exit(f"error: {len(dataset)} training episodes do not fill one batch of {args.batch_size}")
        print(f"bench-data {args.dataset}, {args.img_size}x{args.img_size}, {args.shot}-shot, batch "
              f"{args.batch_size}, {os.cpu_count()} CPU cores", flush=True)
        counts = sorted({0, args.workers} | {2 ** k for k in range(8) if 2 ** k < args.workers})
        for workers in counts:
            args.workers = workers
            sampler = EpisodeSampler(len(dataset), shuffle=True, seed=args.seed, batch_size=args.batch_size)
            loader = make_loader(dataset, sampler, args.batch_size, args, device, drop_last=True)
            first = next(iter(loader))  # the workers start; persistent, they stay for the epochs below
            size = sum(t.nbytes for v in first.values() for t in (v if isinstance(v, list) else [v]))
            t0, episodes, epoch = time.perf_counter(), 0, 0
            while time.perf_counter() - t0 < BENCH_DATA_SECONDS:
                epoch += 1
                sampler.set_stream(epoch)
                for batch in loader:
                    episodes += len(to_device(batch, device)["class_id"])
                    if time.perf_counter() - t0 > BENCH_DATA_SECONDS:
                        break
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rate = episodes / (time.perf_counter() - t0)
            print(f"  {workers:2d} workers: {rate:7.1f} episodes/s ({rate / max(workers, 1):.1f} per worker, "
                  f"{size / 2 ** 20:.1f} MiB a batch, {1000 * max(workers, 1) / rate / (1 + args.shot):.1f} ms of "
                  "one process per image)", flush=True)
            del loader


def write_pascal_like(root, n, seed=0):
    """n PASCAL-sized (500x375) JPEGs with their label PNGs and VOC's list files under root, for --bench-data
    without the dataset: the synthetic renderer's objects (its 20 classes stand in for VOC's 20)."""
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng, names = np.random.default_rng(seed), [f"{i:06d}" for i in range(n)]
    for i, name in enumerate(names):
        img, label = data.render_synthetic(rng, 1 + i % 20, np.arange(1, 21), 500)  # (3,500,500), (500,500)
        rgb = (img[:, :375] * 255).round().byte().permute(1, 2, 0).numpy()  # (375,500,3): landscape, as VOC's
        Image.fromarray(rgb).save(root / "JPEGImages" / f"{name}.jpg", quality=90)
        Image.fromarray(label[:375].numpy().astype(np.uint8)).save(root / "SegmentationClassAug" / f"{name}.png")
    sets = root / "ImageSets" / "Segmentation"
    (sets / "train.txt").write_text("\n".join(names[: n * 4 // 5]) + "\n")
    (sets / "sbd_train_noval.txt").write_text("")
    (sets / "val.txt").write_text("\n".join(names[n * 4 // 5:]) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Tools: --vis and --predict


def overlay(img, mask, colour):
    """img uint8 (3,H,W), mask (H,W) in {0,1,255} -> uint8 (H,W,3): object tinted, ignore pixels greyed."""
    out = img.permute(1, 2, 0).float()
    tint = torch.tensor(colour, dtype=torch.float32)
    out[mask == 1] = 0.5 * out[mask == 1] + 0.5 * tint
    out[mask == 255] = 0.5 * out[mask == 255] + 64
    return out.clamp(0, 255).to(torch.uint8).numpy()


def visualise(model, args, device, rank):
    """N PNGs of test episodes (seed 0): supports with their masks | query with ground truth | prediction."""
    net = unwrap(model).eval()
    infer = getattr(net, "predict", None) or (lambda *a: net(*a)["logits"])
    dataset = build_dataset(args, "test")
    folder = args.out / "vis"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(min(args.vis, len(dataset))):
        ep = dataset[(0, i)]
        with torch.no_grad(), autocast(device, args.bf16_eval):
            logits = infer(ep["img_q"][None].to(device), ep["img_s"][None].to(device),
                           ep["m_s"][None].to(device), torch.tensor([ep["class_id"]], device=device))
        pred = logits[0].float().argmax(0).cpu()
        pred[ep["m_q"] == 255] = 255
        panels = [overlay(data.denormalize(x), m, (0, 0, 255)) for x, m in zip(ep["img_s"], ep["m_s"])]
        panels += [overlay(data.denormalize(ep["img_q"]), ep["m_q"], (0, 255, 0)),
                   overlay(data.denormalize(ep["img_q"]), pred, (255, 0, 0))]
        name = dataset.class_names.get(ep["class_id"], str(ep["class_id"])).replace(" ", "_")
        Image.fromarray(np.concatenate(panels, 1)).save(folder / f"episode{i:04d}_{name}.png")
    log(rank, f"wrote {min(args.vis, len(dataset))} episodes to {folder} "
              f"(supports in blue | query ground truth in green | prediction in red)")


def read_user_mask(path):
    """A user's mask file, any mode (grayscale, palette, RGB, RGBA): 1 where a pixel is nonzero -> int64 (H,W)."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)  # upright, as its image is read
            pixels = np.array(im if im.mode in ("1", "L", "P", "I", "I;16") else im.convert("RGB"))
    except OSError as err:
        sys.exit(f"error: cannot read mask {path}: {err}")
    return torch.from_numpy((pixels.reshape(*pixels.shape[:2], -1) != 0).any(-1).astype(np.int64))


@torch.no_grad()
def predict(model, args, device):
    """A trained model on the user's own images: writes QUERY_mask.png (0/255) and QUERY_overlay.png."""
    net = unwrap(model).eval()
    infer = getattr(net, "predict", None) or (lambda *a: net(*a)["logits"])
    try:
        images = [data.load_image(path, upright=True) for path in [*args.support, *args.query]]  # as shown
    except OSError as err:  # names the file
        sys.exit(f"error: {err}")
    masks = [read_user_mask(m) for m in args.support_mask]
    for img, mask, img_path, mask_path in zip(images, masks, args.support, args.support_mask):
        if mask.shape != img.shape[1:]:
            sys.exit(f"error: --support-mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} pixels but its image "
                     f"{img_path} is {img.shape[2]}x{img.shape[1]} (as displayed): draw the mask on the image itself")
    supports = [data.test_transform(img, mask, args.img_size) for img, mask in zip(images, masks)]
    img_s = torch.stack([s[0] for s in supports])[None].to(device)  # (1,S,3,H,W)
    m_s = torch.stack([s[1] for s in supports])[None].to(device)  # (1,S,H,W)
    if (m_s == 1).sum() == 0:
        sys.exit("error: every --support-mask is empty: mark the object with nonzero pixels")
    args.out.mkdir(parents=True, exist_ok=True)
    for path, img in zip(args.query, images[len(args.support):]):
        img_q, _ = data.test_transform(img, torch.zeros(img.shape[1:], dtype=torch.long), args.img_size)
        with autocast(device, args.bf16_eval):
            logits = infer(img_q[None].to(device), img_s, m_s, None)
        pred = data.logits_to_original(logits[0].float().cpu(), img.shape[1:]).argmax(0)  # (H0,W0)
        stem = args.out / Path(path).stem
        Image.fromarray((pred * 255).to(torch.uint8).numpy()).save(f"{stem}_mask.png")
        Image.fromarray(overlay(img, pred, (255, 0, 0))).save(f"{stem}_overlay.png")
        print(f"{path}: {100 * pred.float().mean():.1f}% of the pixels -> {stem}_mask.png, {stem}_overlay.png")


if __name__ == "__main__":
    main()
