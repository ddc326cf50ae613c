"""Train and evaluate every few-shot segmentation model of this repository under one protocol.

    python train.py --model symnet --dataset synthetic --fold 0      # quick start, CPU, a few minutes
    python train.py --model qpenet --fold all --data-root ~/data/VOC2012          # PASCAL-5i: four folds, a table
    python train.py --model ocnet --fold all --set ccm=false --data-root ~/data/VOC2012   # an ablation row
    python train.py --eval-only --checkpoint runs/x/last.pt --shot 5 --data-root ~/data/VOC2012
    torchrun --nproc_per_node 4 train.py --model ocnet --dataset coco --fold 2 --data-root ~/data/coco

A run, top to bottom: main parses the flags and fills every value they leave open (resolve), then
train_and_evaluate locks the run folder, checks the data, builds the model, trains it (train, fit: episodic SGD on
PFENet's poly schedule), evaluates every test seed (evaluate_protocol) and reports. Below: the arguments, the pieces
of a run, run folders and stops, and the tools main runs instead. The protocol: README.md, "Protocol".

A model is one of the five paper files, `baseline` (the parameter-free floor every model must beat), or the
path of your own `.py` file with this interface, which then gets exactly the same protocol:

    Config                 dataclass: the paper's values, `backbone`, `pretrained` (True, False or a weight file);
                           --set FIELD=VALUE sets any field (typed by it: bool, int, float, str, Literal, tuple)
    Model(cfg[, setting])  nn.Module; setting: common.Setting, the run's dataset, fold, shots, crop, backbone.
                           forward(img_q, img_s, m_s, class_ids=None) -> dict with "logits" (B,2,H,W) and whatever
                           loss(out, m_q, m_s) -> (total, {name: term}) needs. Optional: query_mask_in_training =
                           True (forward gets m_q= in training), infer(img_q, img_s, m_s, class_ids) -> logits (what
                           evaluation calls instead), "region_maps" {name: (B,1,h,w)} in forward's dict
                           (--region-recall)
    build(cfg, setting)    optional: the model with the files its stages wrote (none read if setting.from_checkpoint)
    DEFAULTS               optional {dataset: {flag: value}}: the paper's recipe (lr, batch_size, epochs, img_size,
                           augment, the model's flags); a value may be keyed by fold ({0: 100, 3: 50}), by a --set
                           value ({"network=pfenet": ..}) or by backbone ({"resnet101": ..})
    add_args(parser)       optional: the model's own flags; EVALUATION_FLAGS: the flags and fields --resume lets change
    STAGES                 optional {name: fn(setting, schedule, options)}: extra training stages (--stage NAME);
                           STAGE_FILES {name: fn(setting, options) -> Path}: the file each writes (its folder is held
                           as a run folder is); STAGE_DEFAULTS {name: {dataset: recipe}}; STAGE_CONFIGS {name:
                           dataclass}: the fields --set takes with --stage NAME; options: own flags and --set
"""
import argparse
import ast
import copy
import dataclasses
import importlib.util
import inspect
import math
import os
import re
import shlex
import signal
import sys
import tempfile
import threading
import time
import traceback
import types
import typing
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps

try:  # POSIX: the run folder's lock, --bench's peak memory on a CPU
    import fcntl
    import resource
except ImportError:
    fcntl = resource = None
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import common
import data

MODELS = ("ocnet", "qgnet", "crcnet", "symnet", "qpenet", "baseline")
MOMENTUM, WEIGHT_DECAY, POLY_POWER = 0.9, 1e-4, 0.9  # PFENet train.py and util.poly_learning_rate, as its lineage
MAX_LR = 10.0  # --lr above this is a typo (the recipes run 0.0025-0.05)
MIN_IMG_SIZE = 32  # a 4x4 grid at output stride 8: the least on which every model's windows see some context
# The recipe where a model file gives none for a dataset (the baseline, your own model). PASCAL and COCO: PFENet's
# configs as its code runs them, learning rates x10 (scale_lr=10): PASCAL 0.0025 -> 0.025 at batch 4, COCO its
# one-GPU setting 0.005 -> 0.05 at batch 8. Synthetic: the quick start (README). Folder and FSS-1000: PASCAL's.
HARNESS_DEFAULTS = {
    "pascal": dict(lr=0.025, batch_size=4, epochs=200, img_size=473, augment="pfenet"),
    "folder": dict(lr=0.025, batch_size=4, epochs=200, img_size=473, augment="pfenet"),
    "coco": dict(lr=0.05, batch_size=8, epochs=50, img_size=641, augment="pfenet"),
    "synthetic": dict(lr=0.05, batch_size=8, epochs=2, img_size=128, augment="pfenet", test_seeds=1),
    "fss1000": dict(lr=0.025, batch_size=4, epochs=200, img_size=473, augment="pfenet"),
}
EPISODE_DEFAULTS = dict(dataset="pascal", fold=0, coco_split="interleaved")  # unless a checkpoint has its own
# The recipe --resume restores and --fold all checks (with the model's own flags and --set, but EVALUATION_FLAGS):
# a run trained with other values would not be the run it continues. Everything else may change.
RESUME_RECIPE = ("epochs", "batch_size", "lr", "img_size", "train_length", "seed", "augment", "bf16",
                 "support_boxes", "backbone_weights", "no_pretrained", "select_best", "val_every")
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")  # a training run's files in its folder (--overwrite removes)
EXIT_NONFINITE, EXIT_INTERRUPTED, EXIT_TERMINATED = 3, 130, 143  # NaN loss; Ctrl-C and SIGTERM, as shells report
WORKER_GRACE = 2.0  # seconds a DataLoader worker outlives a SIGTERM: the main process stops first


# ====== The run, top to bottom: arguments, device, data, model, optimiser, training, evaluation, report


def main(argv=None):
    """Parse the command line and run it, or the tool it names; a bad end is one line and a non-zero exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, module = parse_args(argv)
    tools = ((args.fold == "all", run_all_folds), (args.bench_data, bench_data), (args.stage, train_stage),
             (args.bench, bench), (args.predict, predict_files))
    run = next((tool for asked, tool in tools if asked), train_and_evaluate)
    with stops_cleanly(args, argv):
        return run(args, module)


def train_and_evaluate(args, module):
    """One run: train (unless --eval-only or there is nothing to learn), evaluate, report. -> (mIoU, FB-IoU)."""
    device, rank, world = setup_device(args)
    training = not args.eval_only and module.Model is not PrototypeBaseline  # the baseline has nothing to learn
    with hold_run_folder(args, training, RUN_FILES) if rank == 0 else nullcontext():
        splits = ("train", "test") if training else ("test",)
        if training and args.select_best and validation_split(args) != "test":
            splits += (validation_split(args),)
        check_data(args, splits)  # every listed file, before the model
        model, optimizer, cfg, resumed = build_model(module, args, device, rank, world)
        learnable, total = count_parameters(model)
        log_file = args.out / "metrics.jsonl" if rank == 0 else None
        if rank == 0 and args.resume:  # the log as the checkpoint's run left it, then a resume mark
            common.cut_log(log_file, resumed["epoch"] if resumed else 0, note=warn)
        log(rank, f"{Path(args.model).stem}{' --set ' + show(args.set) if args.set else ''} on {args.dataset} "
                  f"{split_text(vars(args))}, {args.shot}-shot, {args.img_size}px, {device}, {world} process(es), "
                  f"{'bf16' if args.bf16 and device.type == 'cuda' else 'fp32'}; {learnable:,} learnable / "
                  f"{total:,} parameters\nrun folder {args.out}")
        write_log(log_file, {"event": "start", "args": saved_args(args)})
        if training and learnable:
            train(model, optimizer, args, cfg, device, rank, world, log_file, resumed)
            if args.select_best and (args.out / "best.pt").exists():
                load_weights(unwrap(model), read_checkpoint(args.out / "best.pt"), args.out / "best.pt")
                on = "the validation classes" if validation_split(args) == "val" else "the test fold: optimistic"
                log(rank, f"evaluating best.pt (chosen on {on})")
        if args.vis and rank == 0:
            visualise(model, args, device, rank)
        scores = evaluate_protocol(model, args, device, rank, world)
        report(args, scores, rank, log_file)
    return scores["miou"], scores["fbiou"]


def train(model, optimizer, args, cfg, device, rank, world, log_file, resumed=None):
    """Epochs of episodic SGD (fit) on PFENet's poly schedule, the checkpoint after each (--select-best: best.pt)."""
    dataset = episodes(args, "train")
    per_rank = args.batch_size // world
    sampler = data.EpisodeSampler(len(dataset), rank, world, shuffle=True, seed=args.seed, batch_size=per_rank)
    loader = data.make_loader(dataset, sampler, per_rank, args.workers, device, drop_last=True,
                              worker_init_fn=ignore_stop_signals)
    steps, net, start, best = len(loader), unwrap(model), 0, -1.0
    if steps == 0:
        sys.exit(f"error: {len(dataset)} training episodes do not fill one batch of {args.batch_size}")
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        start, best = resumed["epoch"], resumed["best"]
        log(rank, f"resumed from {args.out / 'last.pt'} after epoch {start}")
    log(rank, f"training: {len(dataset)} episodes/epoch, {steps} steps of {args.batch_size}, {args.epochs} epochs, "
              f"lr {args.lr}")

    def batches(epoch):
        sampler.set_stream(epoch)  # the epoch's episodes
        epoch_batches = iter(loader)  # starting the workers draws from the global RNG, so the seed comes after:
        torch.manual_seed(args.seed * 100003 + epoch * 101 + rank)  # the same dropout, resumed or not
        model.train()
        return epoch_batches

    def loss_of(batch):
        batch = data.to_device(batch, device)
        with autocast(device, args.bf16):
            out = model(batch["img_q"], batch["img_s"], batch["m_s"], batch["class_id"], **query_mask(net, batch))
            return net.loss(out, batch["m_q"], batch["m_s"])  # (loss, {name: term})

    def end_epoch(epoch):
        nonlocal best
        if args.select_best and ((epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs):
            scores = evaluate_protocol(model, args, device, rank, world, validation_split(args))
            write_log(log_file, {"event": "val", "epoch": epoch + 1, "miou": scores["miou"], "fbiou": scores["fbiou"],
                                 "fg_prob_object": scores["fg_prob"][1], "fg_prob_background": scores["fg_prob"][0]})
            if scores["miou"] > best:
                best = scores["miou"]
                if rank == 0:
                    save_checkpoint(args.out / "best.pt", model, optimizer, epoch + 1, cfg, args, best)
        if rank == 0:
            save_checkpoint(args.out / "last.pt", model, optimizer, epoch + 1, cfg, args, best)
        if world > 1:
            dist.barrier()

    poly = lambda it: args.lr * (1 - it / (args.epochs * steps)) ** POLY_POWER  # noqa: E731
    fit(loss_of, optimizer, batches, poly, args.epochs, steps, start_epoch=start, log_every=args.log_every,
        per_step=args.batch_size, unit="episodes", log=lambda line: log(rank, line), log_file=log_file,
        end_epoch=end_epoch)


def fit(loss_of, optimizer, batches, lr_at, epochs, steps_per_epoch, *, start_epoch=0, log_every=20, per_step=1,
        unit="images", tag="", log=print, log_file=None, event="train", end_epoch=None):
    """The training loop of every run and extra stage (schedule.fit): epochs start_epoch..epochs-1 of
    steps_per_epoch batches(epoch), lr = lr_at(step count); (loss, terms) = loss_of(batch); every log_every steps a
    line and a log record of the means since the last (report: the loop's one host sync); end_epoch(epoch) after
    each epoch (checkpoints). A step whose loss or gradient is NaN or infinite is skipped on the device
    (step_if_finite); a non-finite loss then stops the loop at the next report (NonFiniteLossError)."""
    if not optimizer.defaults.get("fused"):  # found_inf, below, is the fused kernels' protocol
        raise ValueError("fit skips non-finite steps on the device: it needs torch.optim.SGD(..., fused=True)")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    t_start = t0 = time.perf_counter()
    sums, seen = {}, 0  # the loss and its terms, summed on the device since the last report

    def progress(epoch, s, lr):  # the means since the last report, a line and a log record
        nonlocal sums, seen, t0
        means = torch.stack(list(sums.values())) / seen  # (terms,)
        if dist.is_available() and dist.is_initialized():  # every rank logs, and stops, alike
            dist.all_reduce(means)
            means /= dist.get_world_size()
        means = dict(zip(sums, means.tolist()))  # the host sync
        now = time.perf_counter()
        rate, done = seen * per_step / (now - t0), epoch * steps_per_epoch + s + 1
        eta = (now - t_start) / (done - start_epoch * steps_per_epoch) * (epochs * steps_per_epoch - done)
        terms = " ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "loss")
        log(f"{tag}epoch {epoch + 1}/{epochs} step {s + 1}/{steps_per_epoch} loss {means['loss']:.4f}"
            f"{f' ({terms})' if terms else ''} lr {lr:.2e} {rate:.1f} {unit}/s "
            f"ETA {eta // 3600:.0f}:{eta // 60 % 60:02.0f}:{eta % 60:02.0f}")
        write_log(log_file, {"event": event, "epoch": epoch + 1, "step": s + 1, **means, "lr": lr,
                             f"{unit}_per_s": rate})
        sums, seen, t0 = {}, 0, now
        return means

    for epoch in range(start_epoch, epochs):
        for s, batch in enumerate(batches(epoch)):
            lr = lr_at(epoch * steps_per_epoch + s)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, terms = loss_of(batch)  # the forward pass and the loss; the update is step_if_finite's
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            step_if_finite(optimizer, params, loss)  # a NaN or infinite loss never reaches the weights
            for name, value in {"loss": loss, **terms}.items():
                sums[name] = sums.get(name, 0) + value.detach().float()
            seen += 1
            if (s + 1) % log_every == 0 or s + 1 == steps_per_epoch:
                means = progress(epoch, s, lr)  # the loop's one host sync
                if not math.isfinite(means["loss"]):
                    raise NonFiniteLossError(means["loss"], epoch, s)
        if end_epoch is not None:
            end_epoch(epoch)


class NonFiniteLossError(ArithmeticError):
    """The training loss became NaN or infinite: the run stops with exit status 3 and says what was kept."""

    def __init__(self, value, epoch, step):
        super().__init__(f"the loss became {value} in epoch {epoch + 1} at step {step + 1}")


def step_if_finite(optimizer, params, loss):
    """optimizer.step() unless the loss or a gradient is NaN or infinite, decided on the device (the fused SGD skips
    its step where found_inf is 1, as under AMP's GradScaler): the host never waits. Every rank skips where one does."""
    grads = [p.grad for p in params if p.grad is not None]
    largest = torch.nn.utils.get_total_norm(grads, math.inf) if grads else loss.new_zeros(())  # an L2 norm overflows
    found = ~torch.isfinite(loss.detach()) | ~largest.isfinite()
    optimizer.found_inf = found.float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(optimizer.found_inf, op=dist.ReduceOp.MAX)
    optimizer.step()


@torch.no_grad()
def evaluate(model, loader, dataset, device, args, seed, recall=None):
    """One test seed's common.IoUMeter at the original resolution (and the region maps' recall, --region-recall)."""
    net = unwrap(model).eval()
    infer = inference(net)
    meter = common.IoUMeter(dataset.num_classes, device=device)
    loader.sampler.set_stream(seed)
    for batch in loader:
        batch = data.to_device(batch, device)
        inputs = (batch["img_q"], batch["img_s"], batch["m_s"], batch["class_id"])
        with autocast(device, args.bf16_eval):
            if recall is None:
                logits = infer(*inputs)  # (B,2,H,W)
            else:  # forward's dict: its region maps scored against the query mask, then its logits
                out = net(*inputs)
                if "region_maps" not in out or hasattr(net, "infer"):
                    sys.exit(f"error: --region-recall: {Path(args.model).stem} returns no region maps from forward "
                             "(the dict entry region_maps: {name: (B,1,h,w) in [0, 1]}; QGNet has them)")
                recall.update(out["region_maps"], batch["m_q"])
                logits = out["logits"]
        for b, target in enumerate(batch["m_q_orig"]):  # each query at its own original size (H0,W0)
            probs = data.logits_to_original(logits[b].float(), target.shape[-2:]).softmax(0)  # (2,H0,W0)
            meter.update(probs.argmax(0)[None], target[None].to(device), batch["class_id"][b:b + 1], probs[1][None])
    meter.all_reduce()
    return meter


def evaluate_protocol(model, args, device, rank, world, split="test"):
    """Every test seed of `split` -> miou, fbiou, their std over the seeds, per_class, fg_prob (the mean p(object) on
    [background, object] pixels), seeds (each seed's scores), dataset, recall (--region-recall's, else None)."""
    dataset = episodes(args, split)
    loader = data.make_loader(dataset, data.EpisodeSampler(len(dataset), rank, world), args.eval_batch_size,
                              args.workers, device, drop_last=False, worker_init_fn=ignore_stop_signals)
    mious, fbious, per_class, probs = [], [], {}, []
    recall = common.RecallMeter(device) if args.region_recall else None
    classes = [int(c) for c in dataset.classes]
    for seed in range(args.test_seeds):
        t0 = time.perf_counter()
        meter = evaluate(model, loader, dataset, device, args, seed, recall)
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
            "seeds": {"miou": mious, "fbiou": fbious}, "dataset": dataset,
            "recall": recall.all_reduce().recall() if recall else None}


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
              f"over {args.test_seeds} test seeds of {len(dataset)} episodes)")
    else:
        print(f"\nmIoU {100 * scores['miou']:.2f}  FB-IoU {100 * scores['fbiou']:.2f}  (one test seed of "
              f"{len(dataset)} episodes, so no spread: --test-seeds 5 gives one)")
    print(f"mean p(foreground): {probs[1]:.3f} on object pixels, {probs[0]:.3f} on background (a diagnostic: a "
          "pixel counts as foreground from 0.5 on)")
    if scores["recall"]:  # --region-recall: QGNet's Table 7
        print("\nrecall of the region maps against the query mask, |{map > t} & mask| / |mask|, over every test seed")
        print(f"{'t':>8}  " + "  ".join(f"{t:5.1f}" for t in common.RecallMeter.THRESHOLDS))
        for name, values in scores["recall"].items():
            print(f"{name:>8}  " + "  ".join(f"{100 * v:5.1f}" for v in values))
    run = ("dataset", "fold", "test_classes", "shot", "img_size", "coco_split", "backbone", "set")
    record = {"event": "result", "model": Path(args.model).stem, **{k: getattr(args, k) for k in run},
              **{k: scores[k] for k in ("miou", "miou_std", "fbiou", "fbiou_std", "per_class")},
              "seed_miou": scores["seeds"]["miou"], "seed_fbiou": scores["seeds"]["fbiou"],
              "fg_prob_object": probs[1], "fg_prob_background": probs[0], "recall": scores["recall"],
              "episodes": args.test_episodes, "seeds": args.test_seeds}
    write_log(log_file, record)
    print(result_line(record), flush=True)


def result_line(record):
    """The line for scripts: RESULT model=.. dataset=.. fold=.. shot=.. miou=.. miou_std=.. fbiou=.. fbiou_std=.."""
    scores = " ".join(f"{k}={100 * record[k]:.2f}" for k in ("miou", "miou_std", "fbiou", "fbiou_std"))
    split = split_text(record).replace(" ", "=", 1)  # fold=K, or classes=3,7,9
    return f"RESULT model={record['model']} dataset={record['dataset']} {split} shot={record['shot']} {scores}"


def spread(values):
    """(mean, sample standard deviation); the deviation is NaN for a single value."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


# ====== Arguments: the flags, --set, and the one order in which a run's values are chosen (resolve)


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose error is one line (and exit status 2), not its usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (--help lists the flags)\n")


def build_parser(add_help=True):
    p = Parser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter, add_help=add_help)
    add = p.add_argument
    add("--model", default=None,
        help=f"{', '.join(MODELS)}, or path/to/your_model.py (default: the --checkpoint's, else baseline)")
    add("--dataset", default=None, choices=["pascal", "coco", "synthetic", "folder", "fss1000"],
        help="default: the --checkpoint's, else pascal; folder: your own data under --data-root")
    add("--data-root", default=None, help="dataset folder (README: 'Datasets' gives the layouts)")
    add("--fold", type=fold_arg, default=None, metavar="{0,1,2,3,all}",
        help="test fold (default: the --checkpoint's, else 0); all: the four folds, then their table")
    add("--test-classes", type=class_ids_arg, default=None, metavar="IDS",
        help="--dataset folder: the novel class ids (e.g. 3,7,9), in place of --fold")
    add("--shot", type=positive_int, default=1)
    add("--coco-split", default=None, choices=["interleaved", "contiguous"],
        help="COCO-20i's folds: interleaved (PFENet's: fold i tests 4k+i+1) or contiguous (20i+1..20i+20)")
    add("--support-boxes", action="store_true", help="support masks become their objects' boxes (CRCNet §5.4)")
    add("--backbone", default="resnet50", choices=sorted(common.BACKBONES),
        help="the *_deep ones (the papers' deep stem) need --backbone-weights")
    add("--backbone-weights", default=None, metavar="PATH", help="backbone weights (PFENet's resnet50_v2.pth, ...)")
    add("--no-pretrained", action="store_true", help="random backbone weights (no ImageNet download)")
    add("--epochs", type=positive_int, default=None, help="default: the model's recipe, per dataset")
    add("--batch-size", type=positive_int, default=None, help="global batch, split across processes")
    add("--lr", type=learning_rate, default=None, help="base learning rate of the poly schedule")
    add("--img-size", type=img_size_arg, default=None, help=f"train crop and test canvas (at least {MIN_IMG_SIZE})")
    add("--train-length", type=positive_int, default=None, help="training episodes per epoch (default: every image)")
    add("--workers", type=non_negative_int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    add("--seed", type=non_negative_int, default=0, help="training seed (test episodes do not depend on it)")
    add("--bf16", action="store_true", help="train under bf16 autocast on CUDA (default fp32)")
    add("--bf16-eval", action="store_true", help="evaluate under bf16 autocast on CUDA (default fp32)")
    add("--augment", default=None, choices=sorted(data.AUGMENTATIONS), help="default: the model's (most: pfenet)")
    add("--compile", action="store_true", help="torch.compile the model for training")
    add("--out", default=None, help="run folder (default runs/MODEL-DATASET-foldK-Sshot[-...])")
    add("--resume", action="store_true", help="continue OUT/last.pt with the recipe it was trained with")
    add("--overwrite", action="store_true", help="start over in an OUT that holds a run (its files go)")
    add("--eval-only", action="store_true", help="evaluate --checkpoint, do not train")
    add("--checkpoint", default=None, help="weights for --eval-only, --predict, --vis ({fold} in it: per fold)")
    add("--eval-batch-size", type=positive_int, default=1, help="test episodes evaluated at once (same scores)")
    add("--select-best", action="store_true",
        help="validate during training, evaluate the best (on the test fold: optimistic; FSS-1000: its val classes)")
    add("--val-every", type=positive_int, default=5, help="epochs between validations for --select-best")
    add("--test-episodes", type=positive_int, default=None, help="episodes per seed (PASCAL 1000, COCO 5000)")
    add("--test-seeds", type=positive_int, default=None, help=f"test seeds (default {data.TEST_SEEDS})")
    add("--log-every", type=positive_int, default=20, help="optimizer steps between progress lines")
    add("--region-recall", action="store_true", help="also the recall of the model's region maps (QGNet's Table 7)")
    add("--set", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
        help="the model's Config fields (--set gomm=false ccm=false): an ablation row; --model X --help lists them")
    add("--stage", default=None, help="run a model's extra training stage (Sym-Net: base, QGNet: prior)")
    add("--bench", action="store_true", help="time training steps and inference, then exit")
    add("--bench-steps", type=positive_int, default=10, help="--bench: training steps timed")
    add("--peak-tflops", type=float, default=None, help="--bench: the GPU's dense bf16 TFLOP/s, if not known")
    add("--bench-data", action="store_true", help="episodes/s of the data path with 0..--workers workers, then exit")
    add("--vis", type=non_negative_int, default=0, metavar="N", help="write N pictures of test episodes")
    add("--predict", action="store_true", help="segment --query with --support/--support-mask into --out")
    add("--support", action="append", default=[], help="support image (repeat for K shots)")
    add("--support-mask", action="append", default=[], help="its mask: nonzero pixels = object")
    add("--query", action="append", default=[], help="query image (repeatable)")
    return p


def full_parser(module):
    """train.py's flags and the model file's own (add_args), its help listing the fields --set takes."""
    parser = build_parser()
    fields = lambda stage=None: " ".join(f"{f.name}={format_value(f.default)}"  # noqa: E731
                                         for f in settable_fields(module, stage).values())
    stages = "".join(f"; with --stage {name}: {fields(name)}" for name in getattr(module, "STAGE_CONFIGS", {}))
    group = parser.add_argument_group(f"{getattr(module, '__name__', 'model')} options",
                                      f"--set takes these Config fields (the defaults shown): {fields()}{stages}")
    if hasattr(module, "add_args"):
        module.add_args(group)
    return parser


def parse_args(argv=None):
    """The command line -> (args, module), every value resolved. Two passes: --model (or the checkpoint's) first, so
    that the model file can add its own flags. --fold all: args.folds holds each fold's resolved arguments."""
    argv = sys.argv[1:] if argv is None else list(argv)
    known, _ = build_parser(add_help=False).parse_known_args(argv)  # --help waits for the model's own flags
    if known.checkpoint and "{fold}" in known.checkpoint and known.fold not in (None, "all"):
        known.checkpoint = known.checkpoint.replace("{fold}", str(known.fold))  # one fold of a pattern
    trained = read_checkpoint(known.checkpoint.replace("{fold}", "0"))["args"] if known.checkpoint else {}
    if known.checkpoint and "{fold}" in known.checkpoint:
        trained["fold"] = "all"  # a pattern names the four folds' checkpoints
    if known.model is None:  # --predict and --eval-only need not repeat the checkpoint's
        known.model = trained.get("model", "baseline")
    module = load_model_module(known.model)
    parser = full_parser(module)
    args = parser.parse_args(argv)
    args.model, args.checkpoint = known.model, known.checkpoint
    args.own_flags = sorted(set(vars(args)) - set(vars(build_parser().parse_args([]))))  # add_args's dests
    quiet = copy.deepcopy(parser)  # the flags argv itself gives, not their defaults
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    args.given = set(vars(quiet.parse_known_args(argv)[0]))
    args.set = config_values(parser, module, args.set, args)
    check_flags(parser, args, module)
    if args.fold == "all":  # each fold's own arguments: its folder, its checkpoint, its recipe
        parent = Path(args.out) if args.out else None
        args.folds = [resolve(argparse.Namespace(**{
            **vars(args), "fold": k, "out": parent / f"fold{k}" if parent else None,
            "checkpoint": args.checkpoint.replace("{fold}", str(k)) if args.checkpoint else None}), module, trained)
            for k in range(data.NUM_FOLDS)]
        args.out = parent
    resolve(args, module, trained)
    if args.test_classes and args.dataset != "folder":
        parser.error(f"--test-classes chooses the novel classes of --dataset folder; {args.dataset}'s are its folds "
                     "(--fold)")
    if args.dataset == "fss1000" and args.fold != 0:
        parser.error(f"FSS-1000 has one class split, no folds: drop --fold {args.fold} (its test classes are fold 0)")
    was = {**EPISODE_DEFAULTS, **trained}  # a checkpoint tested on classes it was trained on: said, not refused
    if trained and "all" not in (was["fold"], args.fold) and was["dataset"] == args.dataset and (
            was["fold"] != args.fold or args.dataset == "coco" and was["coco_split"] != args.coco_split):
        warn(f"WARNING: {known.checkpoint} was trained on {args.dataset} fold {was['fold']}: the test classes of "
             f"fold {args.fold} are among those it was trained on")
    return args, module


def resolve(args, module, trained):
    """Fill every value the command line left open (None) from the first of these that gives it: 1. the command
    line; 2. with --resume, OUT/last.pt's recipe (restore_recipe refuses a flag given now with another value);
    3. --checkpoint's arguments `trained`: its classes, dataset, fold, split, and on its own dataset its data root
    and crop; 4. the stage's recipe (STAGE_DEFAULTS); 5. the paper's (DEFAULTS); 6. the harness's. A recipe value
    may depend on the fold, a --set value or the backbone (recipe_value); one that names no flag stops the run."""
    if args.test_classes is None and args.fold is None:  # 3. (--fold overrides a checkpoint's --test-classes)
        args.test_classes = trained.get("test_classes")
    for key, default in EPISODE_DEFAULTS.items():  # 3., else 6.
        if getattr(args, key) is None:
            setattr(args, key, trained.get(key, default))
    if trained.get("dataset") == args.dataset:  # 3. the files it was trained on
        args.data_root = args.data_root or trained.get("data_root")
    if trained.get("dataset") == args.dataset or args.predict:  # 3. tested at the size it was trained at
        args.img_size = args.img_size or trained.get("img_size")
    if args.fold != "all":
        args.out = Path(args.out) if args.out else default_out(args, args.fold, module)
        if args.resume and not args.stage:  # 2. (a stage's file keeps its own recipe, which the stage checks)
            restore_recipe(args, module)
    stage = getattr(module, "STAGE_DEFAULTS", {}).get(args.stage, {}) if args.stage else {}
    harness = {"test_episodes": data.TEST_EPISODES[args.dataset], "test_seeds": data.TEST_SEEDS,
               "train_length": data.SYNTHETIC_TRAIN_LENGTH if args.dataset == "synthetic" else None,
               **HARNESS_DEFAULTS[args.dataset]}
    for recipe in (stage.get(args.dataset, {}), getattr(module, "DEFAULTS", {}).get(args.dataset, {}), harness):
        for key, value in recipe.items():  # 4., 5., 6.
            if not hasattr(args, key):
                sys.exit(f"error: {args.model}: recipe value {key}={value!r} names no flag of train.py or the model")
            if getattr(args, key) is None:
                setattr(args, key, recipe_value(value, args))
    return args


def recipe_value(value, args):
    """A recipe's value for this run: a dict is keyed by fold ({0: 100, 3: 50}; --test-classes: the first fold's),
    by a --set value ({"network=pfenet": ..}: the one --set gives, else the first entry, the default's) or by
    backbone ({"resnet101": ..}: a *_deep one by its plain name, one it does not name by its first), and may nest."""
    while isinstance(value, dict):
        keys = list(value)
        if all(isinstance(k, int) for k in keys):
            value = value[args.fold if isinstance(args.fold, int) else min(value)]
        elif all("=" in k for k in keys):
            given = [f"{k}={format_value(v)}" for k, v in args.set.items()]
            value = value[next((k for k in keys if k in given), keys[0])]
        else:
            value = value.get(args.backbone.replace("_deep", ""), value[keys[0]])
    return value


def restore_recipe(args, module):
    """--resume: the recipe of OUT/last.pt, refusing another run's checkpoint or a flag given now with another
    value (recipe_differences). Without OUT/last.pt (stopped before its first checkpoint) it starts from the start."""
    last = args.out / "last.pt"
    if not last.exists() and not (args.out / "metrics.jsonl").exists():  # its folder is named by its flags
        sys.exit(f"error: --resume: {args.out} holds no run to continue: give the flags the run was started with, "
                 "or its --out")
    if not last.exists():
        print(f"--resume: {args.out} has no checkpoint yet: the run starts from its first epoch", flush=True)
        return
    saved = read_checkpoint(last)["args"]
    asked = {**vars(args), "model": Path(args.model).stem}  # a model file by its name, wherever it lies
    then = {**saved, "model": Path(saved["model"]).stem}
    differ = [k for k in ("model", "dataset", "fold", "test_classes", "shot", "coco_split", "backbone")
              if not same_value(then.get(k, asked[k]), asked[k])]
    if differ:
        sys.exit(f"error: --resume: {last} is a checkpoint of {describe_run(saved)}, not of {describe_run(asked)} "
                 f"({', '.join(differ)} differ): give the flags it was trained with, or another --out")
    keys, saved, differ = recipe_differences(args, module, saved, resuming=True)
    if differ:
        flags = ", ".join(option(full_parser(module), k) for k in keys)
        sys.exit(f"error: --resume: {last} was trained with {differ}: a resumed run keeps its recipe ({flags}); drop "
                 "the flag, or start another run with another --out")
    evaluation = {k: v for k, v in args.set.items() if k in getattr(module, "EVALUATION_FLAGS", ())}
    for k in keys:
        setattr(args, k, saved[k])
    args.set = {**saved["set"], **evaluation}  # the recipe's fields as trained, the evaluation's as given now


def recipe_differences(args, module, saved, resuming):
    """(keys, then, differ): the recipe keys a checkpoint's args `saved` hold (EVALUATION_FLAGS aside), that recipe,
    and where args asks otherwise, as flags ('--lr 0.025 (now 0.05), --set ccm=false (now (none))') or ''. Resuming:
    only the flags given now, --set naming only its own fields; else (a finished fold) all of them and the backbone."""
    free = set(getattr(module, "EVALUATION_FLAGS", ()))
    keys = [k for k in (*RESUME_RECIPE, *args.own_flags) if k in saved and k not in free] + ["set"]
    recipe_set = lambda values: {k: v for k, v in values.items() if k not in free}  # noqa: E731
    then, now = {**saved, "set": recipe_set(saved.get("set", {}))}, {**vars(args), "set": recipe_set(args.set)}
    compared = ["backbone", *keys]
    if resuming:  # --set names its own fields: the others stay as trained
        now["set"] = {**then["set"], **now["set"]}
        compared = [k for k in keys if k in args.given]
    parser = full_parser(module)
    differ = [k for k in compared if not same_value(now[k], then.get(k, now[k]))]
    return keys, then, ", ".join(f"{option(parser, k)} {show(then[k])} (now {show(now[k])})" for k in differ)


def check_flags(parser, args, module):
    """Flags that exclude each other, or that a run cannot do: argparse's error (exit 2) with the reason."""
    if args.test_classes and args.fold is not None:
        parser.error(f"--test-classes names the novel classes itself: drop --fold {args.fold} (--fold K and --fold "
                     "all take a folder dataset's folds from its folds.txt)")
    if args.fold == "all" and (args.bench or args.bench_data or args.predict or args.resume):
        parser.error("--fold all trains and evaluates (or runs a --stage) for each fold, and resumes by itself")
    needs_checkpoint = args.eval_only and args.fold != "all" or args.predict
    if needs_checkpoint and not args.checkpoint and module.Model is not PrototypeBaseline:
        parser.error(f"{'--predict' if args.predict else '--eval-only'} needs --checkpoint (only the parameter-free "
                     "baseline has none)")
    if args.predict and not (args.support and args.query and len(args.support) == len(args.support_mask)):
        parser.error("--predict needs --query, and one --support-mask for every --support")
    if args.backbone_weights and args.no_pretrained:
        parser.error("--backbone-weights and --no-pretrained exclude each other")
    if args.resume and (args.eval_only or args.overwrite):
        parser.error("--resume excludes --eval-only and --overwrite")


def settable_fields(module, stage=None):
    """{name: Field} --set takes: the Config's (--stage: STAGE_CONFIGS's) but the backbone's, which have flags."""
    config = getattr(module, "STAGE_CONFIGS", {}).get(stage, module.Config)
    return {f.name: f for f in dataclasses.fields(config) if f.name not in ("backbone", "pretrained")}


def config_values(parser, module, items, args):
    """--set FIELD=VALUE ... -> {field: value}, each typed by its field; a bad one is argparse's one-line error."""
    fields, values = settable_fields(module, args.stage), {}
    for item in items:
        name, equals, text = item.partition("=")
        if name in ("backbone", "pretrained"):
            parser.error(f"--set {item}: the backbone has flags of its own: --backbone, --backbone-weights, "
                         "--no-pretrained")
        if not equals or name not in fields:
            config = getattr(module, "STAGE_CONFIGS", {}).get(args.stage, module.Config).__name__
            parser.error(f"--set {item}: {Path(args.model).stem}'s {config} has no field {name!r} (FIELD=VALUE; its "
                         f"fields: {', '.join(fields)})")
        try:
            values[name] = field_value(fields[name], text)
        except ValueError as err:
            parser.error(f"--set {item}: {err}")
        if name in args.given and name in args.own_flags:
            parser.error(f"--set {item} and {option(parser, name)} both set {name}: give one")
    return values


def field_value(field, text):
    """A --set value as its field's type: bool (true/false, yes/no, on/off, 1/0), int, float, str (none: None where the
    default is None), a Literal's choice, a tuple (0.75,1,1.25 or a Python literal). ValueError says what fits."""
    kind, default = field.type, field.default
    if typing.get_origin(kind) is typing.Literal:
        choices = {str(c): c for c in typing.get_args(kind)}
        if text not in choices:
            raise ValueError(f"{field.name} is one of {', '.join(choices)}")
        return choices[text]
    if default is None and text.lower() == "none":
        return None
    if kind is bool or isinstance(default, bool):
        words = {**dict.fromkeys(("true", "yes", "on", "1"), True), **dict.fromkeys(("false", "no", "off", "0"), False)}
        if text.lower() not in words:
            raise ValueError(f"{field.name} is true or false")
        return words[text.lower()]
    if kind is tuple or isinstance(default, tuple):
        try:
            value = ast.literal_eval(text)  # numbers, strings and tuples only: no code runs
        except (ValueError, SyntaxError):
            value = tuple(word.strip() for word in text.split(","))
        value = value if isinstance(value, tuple) else (value,)
        if default and not isinstance(default[0], tuple):  # elements of the default's type (1 -> 1.0 for floats)
            value = tuple(scalar(v, type(default[0]), field.name) for v in value)
        return value
    return scalar(text, kind if kind in (int, float, str) else type(default), field.name)


def scalar(value, kind, name):
    """value (text, or a literal's number) as an int, float or str; ValueError when it is not one."""
    try:
        if kind is int and not isinstance(value, float) and str(value).lstrip("-").isdigit():
            return int(value)
        if kind is float and not isinstance(value, bool) and math.isfinite(float(value)):
            return float(value)
    except ValueError:
        pass
    if kind is str:
        return str(value)
    wanted = {int: "an integer", float: "a finite number"}.get(kind, kind)
    raise ValueError(f"{name} takes {wanted}, not {value!r}")


def format_value(value):
    """A Config value as --set writes it: false, 0.5, 0.75,1.0, none."""
    if isinstance(value, tuple):
        flat = not any(isinstance(v, tuple) for v in value)
        return ",".join(map(format_value, value)) if flat else repr(value).replace(" ", "")
    if value is None:
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


def show(value):
    """A flag's value in a message: --set's as FIELD=VALUE words, others as Python writes them."""
    if isinstance(value, dict):
        return " ".join(f"{k}={format_value(v)}" for k, v in sorted(value.items())) or "(none)"
    return repr(value)


def same_value(a, b):
    """Whether a value now and as a checkpoint saved it (lists for tuples, strings for paths) are one."""
    def norm(v):
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        return [norm(x) for x in v] if isinstance(v, (list, tuple)) else str(v) if isinstance(v, Path) else v
    return norm(a) == norm(b)


def option(parser, dest):
    """The command-line spelling of a dest: --batch-size for batch_size."""
    return next((a.option_strings[0] for a in parser._actions if a.dest == dest and a.option_strings), dest)


def default_out(args, fold, module):
    """runs/MODEL-SPLIT-Sshot[-BACKBONE][-FLAG=VALUE...][-FIELD=VALUE...]: every recipe flag given and --set field,
    so that a table's rows never share a folder. --eval-only of a --checkpoint: beside it, CHECKPOINT_FOLDER/eval-..."""
    split = data.split_name(args.dataset, fold, args.data_root, args.test_classes, args.coco_split)
    free = set(getattr(module, "EVALUATION_FLAGS", ()))
    given = sorted(k for k in (*RESUME_RECIPE, *args.own_flags) if k in args.given and k not in free)

    def word(value):  # a file by its stem (word2vec.pt: word2vec), a list as a tuple, the rest as --set writes it
        if isinstance(value, str) and (os.sep in value or "." in value):
            return Path(value).stem
        return format_value(tuple(value) if isinstance(value, list) else value)

    backbone = [args.backbone] if args.backbone != "resnet50" else []
    parts = [Path(args.model).stem, split, f"{args.shot}shot", *backbone,
             *(f"{k}={word(getattr(args, k))}" for k in given),
             *(f"{k}={format_value(v)}" for k, v in sorted(args.set.items()))]
    if args.eval_only and args.checkpoint:
        checkpoint = Path(args.checkpoint)
        return checkpoint.parent / "-".join([f"eval-{checkpoint.stem}", *parts[1:]])
    return Path(common.RUNS_DIR) / "-".join(parts)


def fold_arg(text):
    """argparse type of --fold: 0..3, or "all"."""
    if text not in ("0", "1", "2", "3", "all"):
        raise argparse.ArgumentTypeError(f"must be 0, 1, 2, 3 or all, got {text!r}")
    return text if text == "all" else int(text)


def class_ids_arg(text):
    """argparse type of --test-classes: comma-separated class ids >= 1 -> their sorted tuple, each once."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words or not all(w.isascii() and w.isdigit() and int(w) >= 1 for w in words):
        raise argparse.ArgumentTypeError(f"must be class ids >= 1 separated by commas (e.g. 3,7,9), got {text!r}")
    return tuple(sorted({int(w) for w in words}))


def at_least(low, name, why=""):
    """An argparse type: an integer >= low (0 shots or steps would divide by zero or mean a default silently)."""
    def parse(text):
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}{why}, got {value}")
        return value
    parse.__name__ = name  # argparse's "invalid NAME value"
    return parse


positive_int, non_negative_int = at_least(1, "positive_int"), at_least(0, "non_negative_int")
img_size_arg = at_least(MIN_IMG_SIZE, "img_size", " (a 4x4 feature grid at the backbones' output stride 8)")


def learning_rate(text):
    """argparse type of --lr: a number in (0, MAX_LR]."""
    value = float(text)
    if not 0 < value <= MAX_LR:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be a number above 0 and at most {MAX_LR:g}, got {text!r}")
    return value


# ====== The pieces of a run: data, the model file, the model and its checkpoints, the built-in baseline, devices


def episodes(args, split):
    """The run's episodes of `split` ("train", "test", "val")."""
    try:
        return data.build_dataset(args.dataset, split, args.fold, shot=args.shot, img_size=args.img_size,
                                  root=args.data_root, seed=args.seed if split == "train" else 0,
                                  episodes=args.test_episodes, coco_split=args.coco_split,
                                  train_length=args.train_length, support_boxes=args.support_boxes,
                                  augment=args.augment, test_classes=args.test_classes)
    except FileNotFoundError as err:  # a missing or incomplete data root: the message names the layout
        sys.exit(f"error: {err}")


def validation_split(args):
    """Where --select-best validates: FSS-1000's val classes, else the test fold (PASCAL, COCO have no val classes)."""
    return "val" if args.dataset == "fss1000" else "test"


def check_data(args, splits):
    """Build every split's episodes first, which checks every listed file: the bad files of all splits in one go."""
    problems = []
    for split in splits:
        try:
            episodes(args, split)
        except data.DatasetFileError as err:
            problems.append(str(err))
    if problems:
        raise data.DatasetFileError("\n".join(problems))


def ignore_stop_signals(worker_id):
    """A DataLoader worker leaves SIGINT to the main process and ends WORKER_GRACE seconds after a SIGTERM (a
    scheduler signals the whole group: a worker that died first would turn a clean stop into a crash; one that
    ignored SIGTERM would be waited for for ever); a handover cut short by the main process's end is not reported."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: (time.sleep(WORKER_GRACE), os._exit(0)))
    report = sys.excepthook
    sys.excepthook = lambda kind, err, tb: None if issubclass(kind, (ConnectionError, EOFError)) else report(
        kind, err, tb)


def load_model_module(name):
    """A model file by name (`symnet`), the built-in `baseline`, or a .py path; one that does not load: one line."""
    if name == "baseline":
        module = types.ModuleType("baseline", PrototypeBaseline.__doc__)  # a model file's interface: the same path
        module.Config, module.Model = BaselineConfig, PrototypeBaseline
        module.add_args = lambda parser: parser.add_argument(
            "--baseline-features", choices=["layer1", "layer2", "layer3", "layer4", "image"], help="default layer3")
        return module
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            sys.exit(f"error: --model {name}: no such file")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module  # so that pickling (DataLoader workers) can find it
        try:
            spec.loader.exec_module(module)
        except SyntaxError as err:
            sys.exit(f"error: --model {name}: line {err.lineno}: {type(err).__name__}: {err.msg}")
        except Exception as err:  # the file's own code failed as it was imported: its message, in one line
            where = next((f" line {f.lineno}" for f in reversed(traceback.extract_tb(err.__traceback__))
                          if Path(f.filename) == path), "")
            sys.exit(f"error: --model {name}:{where}: {type(err).__name__}: {' '.join(str(err).split())}")
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


def make_config(module, args, saved=None):
    """The model's Config: the paper's defaults (or a checkpoint's `saved` Config), the backbone flags (not for a
    checkpoint), the model's own flags and --set. The rest reaches the model as a common.Setting (setting_of)."""
    given = {k: getattr(args, k) for k in args.own_flags if getattr(args, k) is not None}
    pretrained = args.backbone_weights or not args.no_pretrained  # a weight file, True (ImageNet) or False
    backbone = {"pretrained": False} if saved else {"backbone": args.backbone, "pretrained": pretrained}
    names = {field.name for field in dataclasses.fields(module.Config)}
    return module.Config(**{k: v for k, v in {**(saved or {}), **backbone, **given, **args.set}.items() if k in names})


def setting_of(args, from_checkpoint=False):
    """The common.Setting a model and a stage get (num_classes None for a folder dataset that cannot be read)."""
    fold = args.fold if isinstance(args.fold, int) else 0
    try:
        count = data.dataset_classes(args.dataset, fold, args.data_root, args.test_classes, args.coco_split).count
    except (data.DatasetError, ValueError):
        count = None
    return common.Setting(dataset=args.dataset, fold=args.fold, coco_split=args.coco_split, data_root=args.data_root,
                          test_classes=tuple(args.test_classes) if args.test_classes else None, shot=args.shot,
                          img_size=args.img_size, backbone=args.backbone, from_checkpoint=from_checkpoint,
                          pretrained=args.backbone_weights or not args.no_pretrained, num_classes=count)


def construct(module, cfg, setting):
    """The model file's build(cfg, setting) where it has one, else Model(cfg, setting), else Model(cfg)."""
    if hasattr(module, "build"):
        return module.build(cfg, setting)
    takes_setting = len(inspect.signature(module.Model).parameters) > 1
    return module.Model(cfg, setting) if takes_setting else module.Model(cfg)


def build_model(module, args, device, rank, world):
    """(model, optimizer, cfg, resumed): from the flags, --checkpoint or (--resume) OUT/last.pt; in DDP as asked."""
    state = read_checkpoint(args.checkpoint) if args.checkpoint else None
    resumed = read_checkpoint(args.out / "last.pt") if args.resume and (args.out / "last.pt").exists() else None
    cfg = make_config(module, args, state and state["config"])
    if resumed is not None:  # the flags as now; the fields no flag sets (the structure a model recorded) as saved
        flagged = {"backbone", "pretrained", *args.own_flags, *args.set}
        names = {field.name for field in dataclasses.fields(module.Config)} - flagged
        cfg = dataclasses.replace(cfg, **{k: v for k, v in resumed["config"].items() if k in names})
    torch.manual_seed(args.seed)
    try:
        model = construct(module, cfg, setting_of(args, from_checkpoint=state is not None or resumed is not None))
    except ValueError as err:  # a Config the model cannot be built with (--set spm=false with APA on): one line
        sys.exit(f"error: {Path(args.model).stem}: {err}")
    cfg = getattr(model, "cfg", cfg)  # as built: a build(cfg, setting) may record the structure it found (Sym-Net)
    model = model.to(device)
    if state is not None or resumed is not None:
        load_weights(model, state or resumed, args.checkpoint or args.out / "last.pt")
    elif not (args.bench or args.predict):
        calibrate_random_backbones(model, args, device, rank)
    model = model.to(memory_format=torch.channels_last)  # NHWC: cuDNN's and oneDNN's fast convolutions
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, args.lr, MOMENTUM, weight_decay=WEIGHT_DECAY, fused=True) if params else None
    if args.compile:
        model = torch.compile(model)
    if world > 1 and params:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=getattr(unwrap(model), "find_unused_parameters", False))
    return model, optimizer, cfg, resumed


def calibrate_random_backbones(model, args, device, rank):
    """--no-pretrained: random backbones get BatchNorm statistics of the first common.CALIBRATION_IMAGES images."""
    backbones = [m for m in model.modules() if isinstance(m, common.Backbone) and m.needs_statistics]
    if not backbones:
        return
    dataset, images = episodes(args, "train"), []
    for i in range(len(dataset)):
        if len(images) >= common.CALIBRATION_IMAGES:
            break
        episode = dataset[(0, i)]
        images += [episode["img_q"], *episode["img_s"]]
    images = torch.stack(images[:common.CALIBRATION_IMAGES]).to(device)  # (N,3,H,W)
    for backbone in backbones:
        backbone.calibrate(images)
    log(rank, f"random backbone weights: BatchNorm statistics estimated on {len(images)} training images\n"
              "(the models are built for ImageNet features: README's quick start says what to expect on random ones)")


def saved_args(args):
    """The run's arguments as a checkpoint and the log keep them: plain values, paths as text."""
    return common.plain({k: v for k, v in vars(args).items() if k not in ("folds", "given")})  # paths: text


def save_checkpoint(path, model, optimizer, epoch, cfg, args, best):
    """OUT/last.pt (or best.pt), atomically, in plain values (it loads with weights_only); never non-finite weights."""
    net = unwrap(model)
    common.check_finite(net)
    state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "config": dataclasses.asdict(cfg), "args": saved_args(args), "best": best}
    common.save_atomic(state, path)


def read_checkpoint(path):
    """A checkpoint train.py wrote, read with weights_only (no code in it can run); anything else: one line."""
    if not Path(path).is_file():
        sys.exit(f"error: checkpoint {path} does not exist")
    try:
        state = common.read_torch_file(path, f"checkpoint {path}")
    except common.WeightsUnavailableError as err:
        sys.exit(f"error: {err}")
    kinds = {"model": dict, "config": dict, "args": dict, "epoch": int}
    if not (isinstance(state, dict) and all(isinstance(state.get(k), kind) for k, kind in kinds.items())
            and all(isinstance(v, torch.Tensor) for v in state["model"].values())
            and all(isinstance(state["args"].get(k), str) for k in ("model", "dataset"))):
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


def query_mask(net, batch):
    """{"m_q": the query mask} for a model that takes it in training (query_mask_in_training: CRCNet), else {}."""
    return {"m_q": batch["m_q"]} if getattr(net, "query_mask_in_training", False) else {}


def inference(net):
    """What evaluation calls: the model's infer(img_q, img_s, m_s, class_ids) if it has one, else forward's logits."""
    return getattr(net, "infer", None) or (lambda *inputs: net(*inputs)["logits"])


# The built-in parameter-free baseline: the floor that every model must clearly beat (--model baseline)
@dataclasses.dataclass
class BaselineConfig:
    backbone: str = "resnet50"
    pretrained: bool = True
    baseline_features: str = "layer3"  # mid-level features, PFENet's prototype level; "image": the pixels


class PrototypeBaseline(nn.Module):
    """PANet's parameter-free rule: foreground where a query pixel's cosine with the support's foreground prototype
    (masked average pooling, averaged over the shots) beats the background's. Features: a backbone level or "image"."""

    def __init__(self, cfg: BaselineConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.baseline_features != "image":
            self.backbone = common.Backbone(cfg.backbone, pretrained=cfg.pretrained, last=cfg.baseline_features)

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


def setup_device(args=None):
    """(device, rank, world). Under torchrun every process takes its own GPU (or CPU with gloo)."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matrix products: torch's default for convolutions
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args is not None and args.batch_size % world:
        sys.exit(f"error: --batch-size {args.batch_size} is not divisible by {world} processes")
    return device, rank, world


def log(rank, *msg):
    if rank == 0:
        print(*msg, flush=True)


def warn(text):  # warnings and notes (a torn log line dropped) go to stderr
    print(text, file=sys.stderr, flush=True)


def autocast(device, enabled):
    """bf16 autocast on CUDA where enabled (--bf16 training, --bf16-eval evaluation), else fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and enabled else nullcontext()


def unwrap(model):
    model = model.module if isinstance(model, DDP) else model
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module


def count_parameters(model):
    learnable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return learnable, sum(p.numel() for p in model.parameters())


# ====== Run folders and stops: nothing a user made is lost, and every stop says what was kept and what to do next


@contextmanager
def hold_run_folder(args, training, files):
    """Make args.out ready for a run and hold it: it must be writable; a POSIX lock on OUT/.lock (this process's alone,
    released however it ends) refuses a second run, naming the first's process; an interrupted save's temporaries
    go; a training run (or a stage) does not start over the run there (its `files`) without --resume or --overwrite."""
    out = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / ".lock", "a+")
    except OSError as err:
        sys.exit(f"error: cannot write to the run folder {out}: {err.strerror or err} (give a writable --out)")
    with handle:  # closing it releases the lock: the next run (another fold of --fold all) may take the folder
        if fcntl is not None:  # POSIX; elsewhere runs are not locked
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                sys.exit(f"error: the run folder {out} is in use by another run (process "
                         f"{handle.read().strip() or 'unknown'}); wait for it to end or give another --out")
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        for stale in sorted(out.glob(".*.tmp")):  # the folder is ours now: no other save is under way in it
            stale.unlink(missing_ok=True)
            print(f"removed {stale}: a temporary left by an interrupted save", flush=True)
        present = [name for name in files if (out / name).exists()]
        checkpoint = getattr(args, "checkpoint", None)  # a stage's arguments have none
        own = checkpoint and Path(checkpoint).resolve() == (out / "last.pt").resolve()
        if not training and "last.pt" in present and not own:  # its result would join that run's log
            sys.exit(f"error: {out} holds a training run: an evaluation of another checkpoint is not written into "
                     "its log; give another --out")
        if training and not args.resume and present:
            held = describe_folder(out, files)
            if not args.overwrite:
                sys.exit(f"error: {out} holds a run already ({held}): continue it with --resume, replace it with "
                         "--overwrite, or give another --out")
            for name in present:
                (out / name).unlink()
            print(f"--overwrite: removed the run that was in {out} ({held})", flush=True)
        yield


def describe_folder(out, files):
    """What the run in folder `out` is, in words, from its checkpoint (the first of `files`) if it has one."""
    path = out / files[0]
    if not path.exists():
        return "the log of a run that saved no checkpoint, or of an evaluation"
    try:
        state = common.read_torch_file(path, str(path))
    except common.WeightsUnavailableError as err:  # unreadable: still a run; say so, and refuse all the same
        return f"a {files[0]} that cannot be read: {' '.join(str(err).split())[:200]}"
    saved = state.get("args") if isinstance(state, dict) else None
    if isinstance(saved, dict) and {"model", "dataset", "shot", "epochs"} <= set(saved):
        return f"{describe_run(saved)}, epoch {state.get('epoch')} of {saved['epochs']}"
    return f"{files[0]}, epoch {state.get('epoch', '?') if isinstance(state, dict) else '?'}"


def write_log(log_file, record):
    if log_file is not None:
        common.append_jsonl(log_file, record)


def read_result(out):
    """The last result record of OUT/metrics.jsonl (a torn last line dropped, with a note), or None."""
    records = common.read_jsonl(out / "metrics.jsonl", note=warn)
    return next((r for r in reversed(records) if r.get("event") == "result"), None)


class Terminated(Exception):
    """SIGTERM arrived (a scheduler preempts the job or its time is up): stopped as Ctrl-C stops a run."""


@contextmanager
def stops_cleanly(args, argv):
    """Run the block; every bad stop is one line and an exit status: Ctrl-C (130), SIGTERM (143), a NaN loss (3), a bad
    data file or a failed write (1). Inside --fold all an exception carries the fold's arguments (`run`)."""
    def terminate(signum, frame):
        raise Terminated()

    main_thread = threading.current_thread() is threading.main_thread()  # where Python delivers signals
    previous = signal.signal(signal.SIGTERM, terminate) if main_thread else None
    try:
        yield
    except (KeyboardInterrupt, Terminated) as err:
        stop_interrupted(getattr(err, "run", args), argv, isinstance(err, Terminated))
    except (NonFiniteLossError, common.NonFiniteWeightsError) as err:
        stop_nonfinite(getattr(err, "run", args), argv, err)
    except data.DatasetError as err:
        text = str(err).strip()
        if text.startswith("Caught ") and "Original Traceback" in text:  # a DataLoader worker re-raised it
            text = text.splitlines()[-1].split(": ", 1)[-1]  # the original exception's own last line
        sys.exit(f"error: {text}")
    except common.SaveError as err:  # a full disk, a lost mount: what was written before is intact
        run = getattr(err, "run", args)
        training = not (run.eval_only or run.bench or run.predict or run.bench_data)
        again = resume_command(run, argv) if training else "the same command"
        sys.exit(f"error: {err}; free space there (or give another --out), then continue with: {again}")
    except (common.WeightsUnavailableError, common.LogError) as err:
        sys.exit(f"error: {err}")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def kept_file(args):
    """The file a stopped run keeps and continues from: its stage's file, else OUT/last.pt; None for a run that
    continues nothing (--eval-only, --bench, --predict, --bench-data) or where there is none."""
    if args.eval_only or args.bench or args.predict or args.bench_data:
        return None
    if args.stage:
        return getattr(args, "stage_file", None)
    return args.out / "last.pt" if args.out else None


def stop_interrupted(args, argv, terminated=False):
    """Ctrl-C or SIGTERM: one line that says what was kept and how to continue; exit status 130 or 143."""
    last = kept_file(args)
    how = "stopped by SIGTERM" if terminated else "interrupted"
    inside = f" in fold {args.fold} of --fold all" if getattr(args, "in_fold_all", False) else ""
    if last is None:  # nothing to continue
        message = how
    elif last.exists():
        what = "the stage's file" if args.stage else "the last finished epoch"
        message = f"{how}{inside}: {last} holds {what}; continue with: {resume_command(args, argv)}"
    else:
        message = (f"{how}{inside} before {'its file' if args.stage else 'the first epoch'} was saved: "
                   f"nothing was kept; start it again with: {resume_command(args, argv)}")
    if int(os.environ.get("RANK", 0)) == 0:
        warn(f"\n{message}")
    sys.exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)


def stop_nonfinite(args, argv, err):
    """A NaN or infinite loss (or weights): what was kept and how to try again, a new run at half the rate; exit 3."""
    last = kept_file(args)
    kept = (f"the last good {'file' if args.stage else 'checkpoint'} is {last}" if last and last.exists()
            else "nothing was saved")
    if args.stage:
        again = "run the stage again with a lower learning rate and --overwrite"
    else:
        lr = f"{args.lr / 2:g}"
        changes = {"--lr": lr}  # a default folder is named by --lr already; a given --out needs another name
        if "out" in args.given:
            changes["--out"] = f"{args.out.parent if getattr(args, 'in_fold_all', False) else args.out}-lr{lr}"
        again = ("try a lower learning rate (a new run: a run keeps its recipe)"
                 f"{' or no --bf16' if args.bf16 else ''}, e.g. {command(argv, changes)}")
    where = f" in --stage {args.stage}" if args.stage else ""
    log(int(os.environ.get("RANK", 0)), f"error: {err}{where}; stopping. {kept}; {again}")
    sys.exit(EXIT_NONFINITE)


def resume_command(args, argv):
    """The command that continues a stopped run: argv with --resume (not in --fold all, which resumes by itself)."""
    inside = getattr(args, "in_fold_all", False) or args.fold == "all"
    return command([a for a in argv if a != "--overwrite"], {} if "--resume" in argv or inside else {"--resume": None})


def command(argv, flags):
    """'python train.py ...' for argv with `flags` {flag: value, or None for a switch} set in place of its own."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a.split("=")[0] in flags:
            skip = "=" not in a
        else:
            kept.append(a)
    added = [w for flag, value in flags.items() for w in ([flag] if value is None else [flag, str(value)])]
    return " ".join(["python train.py", *map(shlex.quote, kept + added)])


def describe_run(saved):
    """The run that saved arguments `saved` (a checkpoint's "args") belong to, in words."""
    return (f"{Path(saved['model']).stem} on {saved['dataset']} {split_text(saved)}, {saved['shot']}-shot, "
            f"{saved.get('backbone', 'resnet50')}")


def split_text(run):
    """"fold K", or "classes 3,7,9" for --test-classes: which novel classes a run (its arguments as a dict) tests."""
    classes = run.get("test_classes")
    return f"classes {','.join(map(str, classes))}" if classes else f"fold {run['fold']}"


# ====== Tools, each reached from main's dispatch: --fold all, --stage, --bench, --bench-data, --vis, --predict


def run_all_folds(args, module):
    """--fold all: each fold in its own folder with its own recipe (args.folds), then their table. Resumable: a fold
    that is complete is taken as it is, an interrupted one resumes. A stop names the fold it stopped in."""
    rank, records = int(os.environ.get("RANK", 0)), []
    for one in args.folds:
        one.in_fold_all = True
        try:
            records.append(run_fold(one, args, module, rank))
        except BaseException as stop:  # a stop's message names the fold and the command that continues it
            stop.run = one
            raise
    if rank == 0 and not args.stage:
        report_folds(args, records)
    return records


def run_fold(one, args, module, rank):
    """One fold of --fold all (its arguments `one`): its result record (None for a stage, and on ranks > 0)."""
    last = one.out / "last.pt"
    if args.eval_only and not args.checkpoint:
        one.checkpoint = str(last)
    if args.stage:  # a model's extra stage, for every fold (e.g. Sym-Net's four base learners)
        train_stage(one, module)
        return None
    fresh = args.eval_only or args.overwrite
    state = read_checkpoint(last) if last.exists() and not fresh else None
    if state is not None and state["epoch"] >= state["args"]["epochs"]:  # trained to the end
        differ = recipe_differences(one, module, state["args"], resuming=False)[2]
        if differ:
            sys.exit(f"error: fold {one.fold}: {one.out} holds a run trained with {differ}: not the run asked for; "
                     "give another --out, or --overwrite to train it again")
        record = read_result(one.out)
        protocol = ("shot", "img_size", "episodes", "seeds")
        if record is not None and [record.get(k) for k in protocol] == [
                one.shot, one.img_size, one.test_episodes, one.test_seeds]:
            log(rank, f"fold {one.fold}: complete in {one.out}, its result taken from metrics.jsonl")
            return record
        one.eval_only, one.checkpoint = True, str(last)  # evaluated under this protocol
    elif not fresh and (state is not None or (one.out / "metrics.jsonl").exists()):
        one.resume = True  # an interrupted fold continues as it was trained
        restore_recipe(one, module)
    log(rank, f"\n=== fold {one.fold} of --fold all: {one.out}")
    train_and_evaluate(one, module)
    return read_result(one.out) if rank == 0 else None


def report_folds(args, records):
    """The papers' four-fold table as text and as Markdown (+- over the test seeds), then a RESULT line."""
    per_seed = {k: np.array([r[f"seed_{k}"] for r in records]) for k in ("miou", "fbiou")}  # (folds, seeds)
    mean = {k: spread(v.mean(0).tolist()) for k, v in per_seed.items()}
    cell = lambda m, sd: f"{100 * m:.2f}" + ("" if math.isnan(sd) else f" +- {100 * sd:.2f}")  # noqa: E731
    name, seeds = Path(args.model).stem, records[0]["seeds"]
    print(f"\n{name}{' --set ' + show(args.set) if args.set else ''} on {args.dataset}, {args.shot}-shot, four folds "
          f"({seeds} test seed(s) of {records[0]['episodes']} episodes; +- is the standard deviation over the seeds)")
    print(f"{'fold':>6}  {'mIoU':>15}  {'FB-IoU':>15}")
    for fold, r in enumerate(records):
        print(f"{fold:>6}  {cell(r['miou'], r['miou_std']):>15}  {cell(r['fbiou'], r['fbiou_std']):>15}")
    print(f"{'mean':>6}  {cell(*mean['miou']):>15}  {cell(*mean['fbiou']):>15}")
    md = lambda m, sd: f"{100 * m:.1f}" + ("" if math.isnan(sd) else f" ± {100 * sd:.1f}")  # noqa: E731
    print("\n| model | shot | fold 0 | fold 1 | fold 2 | fold 3 | mean mIoU | mean FB-IoU |\n"
          "|---|---|---|---|---|---|---|---|")
    print(f"| {name} | {args.shot} | " + " | ".join(md(r["miou"], r["miou_std"]) for r in records)
          + f" | {md(*mean['miou'])} | {md(*mean['fbiou'])} |\n")
    print(result_line({"model": name, "dataset": args.dataset, "fold": "all", "shot": args.shot,
                       "miou": mean["miou"][0], "miou_std": mean["miou"][1], "fbiou": mean["fbiou"][0],
                       "fbiou_std": mean["fbiou"][1]}), flush=True)


def train_stage(args, module):
    """--stage NAME: the model's STAGES[NAME](setting, schedule, options), options: its own flags and --set. A stage
    is held, kept and resumed as a run is, in the folder of the file it writes (STAGE_FILES[NAME], else OUT)."""
    stages = getattr(module, "STAGES", {})
    if args.stage not in stages:
        sys.exit(f"error: --stage {args.stage}: {args.model} offers {sorted(stages) or 'no extra stage'}")
    _, rank, _ = setup_device(args)
    options, setting = {**{k: getattr(args, k) for k in args.own_flags}, **args.set}, setting_of(args)
    file_of, files = getattr(module, "STAGE_FILES", {}).get(args.stage), ()
    if file_of is not None:
        path = Path(file_of(setting, options))
        args.out, files = path.parent, (path.name, f"{path.stem}_metrics.jsonl")
    args.stage_file = args.out / files[0] if files else None
    schedule = common.Schedule(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               train_length=args.train_length, workers=args.workers, seed=args.seed,
                               log_every=args.log_every, bf16=args.bf16, out=args.out, resume=args.resume, fit=fit,
                               given=frozenset(args.given))
    with hold_run_folder(args, True, files) if rank == 0 else nullcontext():
        return stages[args.stage](setting, schedule, options)


def bench(args, module):
    """--bench: time, memory and parameters of training steps and inference on random episodes, without data
    loading, and what one step runs (count_step): its work, its aten operations and its host syncs."""
    device, rank, world = setup_device(args)
    model, optimizer, *_ = build_model(module, args, device, rank, world)
    B, S, size, E, cuda = args.batch_size, args.shot, args.img_size, args.eval_batch_size, device.type == "cuda"
    img_q, img_s = torch.randn(B, 3, size, size, device=device), torch.randn(B, S, 3, size, size, device=device)
    m_q = torch.zeros(B, size, size, dtype=torch.long, device=device)
    m_q[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    m_s = m_q[:, None].expand(B, S, size, size).contiguous()
    class_ids = torch.ones(B, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    net, params = unwrap(model), [p for p in model.parameters() if p.requires_grad]

    def timed(fn):
        for _ in range(max(2, args.bench_steps // 5)):  # warm-up (and compilation)
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.bench_steps):
            fn()
        sync()
        return (time.perf_counter() - t0) / args.bench_steps

    def train_step(model=model):  # one pass of fit's loop
        with autocast(device, args.bf16):
            loss, _ = net.loss(model(img_q, img_s, m_s, class_ids, **query_mask(net, {"m_q": m_q})), m_q, m_s)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        step_if_finite(optimizer, params, loss)

    @torch.no_grad()
    def infer():
        with autocast(device, args.bf16_eval):
            inference(net)(img_q[:E], img_s[:E], m_s[:E], class_ids[:E])

    learnable, total = count_parameters(model)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model.train()
    t_train = timed(train_step) if learnable else float("nan")
    if cuda:
        train_peak = torch.cuda.max_memory_allocated() / 2**30
    elif resource is not None:  # the process's peak resident memory: KiB on Linux, bytes on macOS
        train_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)
    else:
        train_peak = float("nan")
    counted = count_step(lambda: train_step(net), net) if learnable else dict(ops=0, syncs=[], flops=0, backbone=0)
    flops, syncs = counted["flops"], counted["syncs"]
    net.eval()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t_infer = timed(infer) / E
    eval_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)"
    precision = "bf16" if args.bf16 and cuda else "fp32"
    tflops = bf16_peak_tflops(device, args)
    achieved = 100 * flops / t_train / (tflops * 1e12) if flops and tflops else float("nan")
    floor = counted["backbone"] / (tflops * 1e12) if tflops else float("nan")  # s: the backbone alone at the peak
    peak = (f", {achieved:.1f}% of the bf16 peak {tflops:.0f}; the backbone alone at peak takes "
            f"{100 * floor / t_train:.1f}% of the step") if flops and tflops else ""
    memory = f"peak GPU memory: {train_peak:.2f} GiB training, {eval_peak:.2f} GiB evaluating" if cuda else (
        f"peak process memory: {train_peak:.2f} GiB (resident)")
    print(f"bench {Path(args.model).stem} on {name}, torch {torch.__version__}, {size}x{size}, {S}-shot, batch {B}, "
          f"training {precision}, evaluation {'bf16' if args.bf16_eval and cuda else 'fp32'}, {E} episode(s) at once"
          f"\n  train: {1000 * t_train:.1f} ms/step, {B / t_train:.1f} episodes/s; inference {1000 * t_infer:.1f} "
          f"ms/episode; {memory}")
    if flops:
        print(f"  work: {flops / 1e12:.3f} TFLOP/step (convolutions and matrix products), "
              f"{counted['backbone'] / 1e12:.3f} in the frozen backbone; {flops / t_train / 1e12:.2f} TFLOP/s{peak}")
    if learnable:
        print(f"  operations: {counted['ops']} aten operations per training step; host syncs: {len(syncs)} per "
              f"training step{': ' + ', '.join(sorted(set(syncs))) if syncs else ''} (operations that make the CPU "
              "wait for the GPU)")
    print(f"  parameters: {learnable / 1e6:.2f}M learnable, {total / 1e6:.2f}M total")
    print(f"BENCH model={Path(args.model).stem} device={name.replace(' ', '_')} size={size} shot={S} batch={B} "
          f"precision={precision} train_ms={1000 * t_train:.1f} episodes_per_s={B / t_train:.1f} "
          f"infer_ms={1000 * t_infer:.1f} peak_gib={train_peak:.2f} eval_batch={E} eval_peak_gib={eval_peak:.2f} "
          f"tflop_per_step={flops / 1e12:.3f} bf16_peak_pct={achieved:.1f} "
          f"backbone_floor_pct={100 * floor / t_train:.1f} ops_per_step={counted['ops']} "
          f"learnable_m={learnable / 1e6:.2f} total_m={total / 1e6:.2f} host_syncs={len(syncs)}",
          flush=True)  # one line for scripts, as RESULT


# Dense bf16 tensor-core TFLOP/s from NVIDIA's data sheets, matched in order against whole words of the device name
BF16_PEAK_TFLOPS = (("H200 NVL", 835.5), ("H200", 989.4), ("H100 NVL", 835.5), ("H100 PCIe", 756.5),
                    ("H100", 989.4), ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0),
                    ("A10", 125.0))  # "A10" is not the A10G
BENCH_DATA_IMAGES = 300  # --bench-data without a dataset: this many PASCAL-sized JPEGs in a temporary folder
BENCH_DATA_SECONDS = 10.0  # --bench-data: time spent per worker count
# Operations after which the host waits for a GPU: a value read back (.item(), float(t), `if t:`), an output sized
# by the values (nonzero, unique, ...). Boolean indexing and copies to the CPU are told by their arguments (sync_op).
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


def count_step(fn, net=None):
    """What fn() runs: {"ops": aten operations, "syncs": those that make the host wait (sync_op), "flops": by
    torch.utils.flop_counter's formulas, "backbone": those inside a common.Backbone of `net`}. A dispatch mode: a CPU
    run counts too (torch.profiler finds no sync there), and FlopCounterMode's hooks break OCNet's autograd.grad."""
    counted, inside = dict(ops=0, syncs=[], flops=0, backbone=0), [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            counted["ops"] += 1
            name = sync_op(func, args, kwargs or {})
            counted["syncs"] += [name] if name else []
            formula = flop_registry.get(func._overloadpacket)
            flops = formula(*args, **(kwargs or {}), out_val=out) if formula else 0
            counted["flops"] += flops
            counted["backbone"] += flops if inside[0] else 0
            return out

    def enter(module, inputs):
        inside[0] += 1

    def leave(module, inputs, output):  # a hook's return value would replace the output: none here
        inside[0] -= 1

    backbones = [m for m in net.modules() if isinstance(m, common.Backbone)] if net is not None else []
    handles = [h for m in backbones for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with Count():
            fn()
    finally:
        for handle in handles:
            handle.remove()
    return counted


def bf16_peak_tflops(device, args):
    """--peak-tflops, else the data-sheet rate of a known GPU (BF16_PEAK_TFLOPS), else None."""
    if args.peak_tflops or device.type != "cuda":
        return args.peak_tflops
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in BF16_PEAK_TFLOPS if re.search(rf"\b{key}\b", name)), None)


def bench_data(args, module):
    """Training episodes/s of the data path with 0, 1, 2, 4, ... --workers workers (PASCAL: generated JPEGs)."""
    device, _, _ = setup_device(args)
    with tempfile.TemporaryDirectory() as tmp:
        if args.dataset == "pascal" and args.data_root is None:
            print(f"bench-data: writing {BENCH_DATA_IMAGES} PASCAL-sized JPEGs to {tmp}", flush=True)
            args.data_root = tmp
            write_pascal_like(Path(tmp), BENCH_DATA_IMAGES)
        dataset = episodes(args, "train")
        if len(dataset) < args.batch_size:
            sys.exit(f"error: {len(dataset)} training episodes do not fill one batch of {args.batch_size}")
        print(f"bench-data {args.dataset}, {args.img_size}x{args.img_size}, {args.shot}-shot, batch "
              f"{args.batch_size}, {os.cpu_count()} CPU cores", flush=True)
        for workers in sorted({0, args.workers} | {2 ** k for k in range(8) if 2 ** k < args.workers}):
            sampler = data.EpisodeSampler(len(dataset), shuffle=True, seed=args.seed, batch_size=args.batch_size)
            loader = data.make_loader(dataset, sampler, args.batch_size, workers, device, drop_last=True,
                                      worker_init_fn=ignore_stop_signals)
            first = next(iter(loader))  # the workers start; persistent, they stay for the epochs below
            size = sum(t.nbytes for v in first.values() for t in (v if isinstance(v, list) else [v]))
            t0, count, epoch = time.perf_counter(), 0, 0
            while time.perf_counter() - t0 < BENCH_DATA_SECONDS:
                epoch += 1
                sampler.set_stream(epoch)
                for batch in loader:
                    count += len(data.to_device(batch, device)["class_id"])
                    if time.perf_counter() - t0 > BENCH_DATA_SECONDS:
                        break
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rate = count / (time.perf_counter() - t0)
            print(f"  {workers:2d} workers: {rate:7.1f} episodes/s ({rate / max(workers, 1):.1f} per worker, "
                  f"{size / 2 ** 20:.1f} MiB a batch, {1000 * max(workers, 1) / rate / (1 + args.shot):.1f} ms of "
                  "one process per image)", flush=True)
            del loader


def write_pascal_like(root, n, seed=0):
    """n PASCAL-sized JPEGs, label PNGs and list files under root: the synthetic renderer's objects and classes."""
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


def overlay(img, mask, colour):
    """img uint8 (3,H,W), mask (H,W) in {0,1,255} -> uint8 (H,W,3): object tinted, ignore pixels greyed."""
    out = img.permute(1, 2, 0).float()
    tint = torch.tensor(colour, dtype=torch.float32)
    out[mask == 1] = 0.5 * out[mask == 1] + 0.5 * tint
    out[mask == 255] = 0.5 * out[mask == 255] + 64
    return out.clamp(0, 255).to(torch.uint8).numpy()


def visualise(model, args, device, rank):
    """--vis N: N PNGs of test episodes (seed 0) in OUT/vis: supports | query with ground truth | prediction."""
    infer = inference(unwrap(model).eval())
    dataset = episodes(args, "test")
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
def predict_files(args, module):
    """--predict: QUERY_mask.png and QUERY_overlay.png for each --query in --out (default CHECKPOINT_FOLDER/predict)."""
    device, rank, world = setup_device(args)
    if "out" not in args.given:
        args.out = (Path(args.checkpoint).parent if args.checkpoint else Path(common.RUNS_DIR) / "baseline") / "predict"
    model, *_ = build_model(module, args, device, rank, world)
    infer = inference(unwrap(model).eval())
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
    stems = []
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for path, img in zip(args.query, images[len(args.support):]):
            img_q, _ = data.test_transform(img, torch.zeros(img.shape[1:], dtype=torch.long), args.img_size)
            with autocast(device, args.bf16_eval):
                logits = infer(img_q[None].to(device), img_s, m_s, None)
            pred = data.logits_to_original(logits[0].float().cpu(), img.shape[1:]).argmax(0)  # (H0,W0)
            stems.append(Path(path).stem)  # numbered where queries share one (a/x.jpg, b/x.jpg: x, x-2)
            n = stems.count(stems[-1])
            stem = args.out / (stems[-1] if n == 1 else f"{stems[-1]}-{n}")
            Image.fromarray((pred * 255).to(torch.uint8).numpy()).save(f"{stem}_mask.png")
            Image.fromarray(overlay(img, pred, (255, 0, 0))).save(f"{stem}_overlay.png")
            print(f"{path}: {100 * pred.float().mean():.1f}% of the pixels -> {stem}_mask.png, {stem}_overlay.png")
    except OSError as err:
        sys.exit(f"error: cannot write the predictions to {args.out}: {err.strerror or err} (give a writable --out)")


if __name__ == "__main__":
    main()
