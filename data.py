"""Few-shot segmentation episodes: PASCAL-5i, COCO-20i, FSS-1000, a folder of your own labelled images and a
synthetic set (its renderer is the last section).

The episode, dataset[(stream, index)] (dataset[index] is stream 0), for every dataset: img_q (3,H,W) float32
normalised, m_q (H,W) int64 (1 the episode class, 0 the rest, 255 ignore), img_s (S,3,H,W), m_s (S,H,W), class_id
int; outside "train" also m_q_orig (H0,W0) int64 (the query mask at the image's size, which the scores use) and
index. With dataset.compact (make_loader sets it) images and masks are uint8, a fifth of the bytes to cross from
the workers and to the device, where to_device makes the default episode of it, equal to the bit.

Randomness: an episode draws everything (class, supports, augmentation) from one numpy Generator seeded with
(seed, stream, index), the stream being the epoch or the test seed, so episodes are the same for any worker count
and every model. 8 bits: images are rounded to 8 bits (the JPEG's precision) before normalising (_quantize), so
the uint8 hand-over normalises to the same values on any device. Filters: a class counts in an image from
MIN_FG_PIXELS pixels on (supports pass it, a query needs one pixel); training drops every image with a pixel of a
test-fold class (BAM's rule; PFENet keeps them). Sources cited: PFENet = github.com/dvlab-research/PFENet, BAM =
github.com/chunbolang/BAM (file paths and lines there); the protocol: README.md, "Protocol".
"""
import collections
import colorsys
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import math
import multiprocessing
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, 0-1 scale (PFENet train.py:158-162 uses them x255)
STD = (0.229, 0.224, 0.225)
IGNORE = 255  # VOC's object-border label; also the padding label everywhere
NUM_CLASSES = {"pascal": 20, "coco": 80, "synthetic": 20, "fss1000": 1000}
NUM_FOLDS = 4
MIN_FG_PIXELS = 2 * 32 * 32  # a class counts in an image from this area on (PFENet util/dataset.py:55-61)

Classes = collections.namedtuple("Classes", "count names novel")  # dataset_classes': ids 1..count, {id: name}


class DatasetError(Exception):
    """A problem with the data that the user can fix; the message says what and where (train.py prints it)."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A data root is missing or incomplete; the message names the expected layout."""


class DatasetFileError(DatasetError, OSError):
    """A file cannot be read (or a COCO label written), an image and its label differ in size, or a bad class id."""


class DatasetClassError(DatasetError, ValueError):
    """A folder dataset's classes do not fit its labels or the run (classes.txt, folds.txt, --test-classes, shots)."""


# ----------------------------------------------------------------------------- episodes
# Test episodes per seed: BAM's 1000 x 5 seeds (test.py:36-39, 193-198); COCO 5000 as Sym-Net's paper (~250 per
# class); FSS-1000 (None): one pass over its test images, each the query once, as HSNet (data/fss.py __len__)
TEST_EPISODES = {"pascal": 1000, "coco": 5000, "synthetic": 300, "folder": 1000, "fss1000": None}
TEST_SEEDS = 5
SYNTHETIC_TRAIN_LENGTH = 500  # synthetic episodes per epoch (the quick start: a few CPU minutes per model)
QUERY_ORDER_KEY = 1  # test queries: the order of a pass comes from its own stream, apart from the episodes' draws


class EpisodeDataset(Dataset):
    """Episodes of one split of one fold; subclasses implement _draw (the class, then the query's and the supports'
    raw images) and _transform (an image -> uint8 image and mask). Settable: support_boxes (mask_to_boxes supports,
    CRCNet §5.4), augment (AUGMENTATIONS' recipe), compact (uint8 episodes, to_device's input)."""
    support_boxes = False
    augment = "pfenet"
    compact = False

    def __init__(self, name, split, fold, shot, img_size, classes, class_names, seed, length, num_classes):
        self.name, self.split, self.fold, self.shot, self.img_size = name, split, fold, shot, img_size
        self.classes, self.num_classes, self.class_names = classes, num_classes, class_names
        self.seed, self.length = seed, length

    def __len__(self):
        return self.length

    def _rng(self, index, stream=0):
        return np.random.default_rng((self.seed, stream, index))

    def __getitem__(self, key):
        stream, index = key if isinstance(key, tuple) else (0, key)
        if not 0 <= index < self.length:
            raise IndexError(f"episode {index} out of range {self.length}")
        rng = self._rng(index, stream)
        class_id, pairs = self._draw(index, rng, stream)  # [(img, label (H0,W0))]: the query, then the supports
        masks = [binary_mask(label, class_id, torch.uint8) for _, label in pairs]  # (H0,W0) each
        if self.support_boxes:  # weakly supervised supports (CRCNet §5.4)
            masks[1:] = [mask_to_boxes(mask) for mask in masks[1:]]
        out = [self._transform(img, mask, rng) for (img, _), mask in zip(pairs, masks)]  # uint8 (3,H,W), (H,W)
        episode = {"img_q": out[0][0], "m_q": out[0][1], "img_s": torch.stack([img for img, _ in out[1:]]),
                   "m_s": torch.stack([mask for _, mask in out[1:]]), "class_id": int(class_id)}
        if self.split != "train":
            episode.update(m_q_orig=masks[0], index=index)
        return episode if self.compact else to_device(episode, torch.device("cpu"))


def build_dataset(name, split, fold, shot=1, img_size=473, root=None, seed=0, episodes=None,
                  coco_split="interleaved", train_length=None, support_boxes=False, augment="pfenet",
                  test_classes=None):
    """The episodes of `split` of fold `fold` of dataset `name`. "train": base classes, train_length episodes an
    epoch (default: one per image over the filter); "test" (FSS-1000 also "val"): novel classes, `episodes` episodes
    (default TEST_EPISODES[name]). A folder's test_classes (ids) may replace the fold."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; choose one of {sorted(AUGMENTATIONS)}")
    splits = ("train", "test", "val") if name == "fss1000" else ("train", "test")
    if name not in (*NUM_CLASSES, "folder") or split not in splits or shot < 1:
        raise ValueError(f"bad dataset {name!r}, split {split!r} or shot {shot}")
    if name in ("folder", "fss1000"):
        root = _data_root(name, root)
    if name == "folder":
        files, counts, (num_classes, names, test_classes) = _folder(root, fold, test_classes)
    else:
        num_classes, names, test_classes = dataset_classes(name, fold, root if name == "fss1000" else None,
                                                           test_classes=test_classes, coco_split=coco_split)
    classes = test_classes if split == "test" else [c for c in range(1, num_classes + 1) if c not in test_classes]
    length = (episodes or TEST_EPISODES[name]) if split != "train" else train_length
    exclude = test_classes if split == "train" else ()
    if name == "synthetic":
        dataset = SyntheticEpisodes(name, split, fold, shot, img_size, classes, names, seed,
                                    length or SYNTHETIC_TRAIN_LENGTH, num_classes)
    elif name == "fss1000":  # its classes are its split's, and no image shows a class of another split
        classes = _fss_classes(names, split)
        files, counts = _fss_index(root, split, names)
        dataset = FSSEpisodes(name, split, fold, shot, img_size, classes, names, seed, length, num_classes, files,
                              counts, ())
    else:
        if name == "folder":  # the split's images, then the same filter and episodes as PASCAL's
            files, counts = _folder_split(root, files, counts, test_classes, split, classes, names, shot)
        elif name == "pascal":
            files, counts, names = _pascal_index(_data_root(name, root), split)
        else:
            files, counts, names = _coco_index(_data_root(name, root), "train" if split == "train" else "val")
        dataset = ImageEpisodes(name, split, fold, shot, img_size, classes, names, seed, length, num_classes, files,
                                counts, exclude)
    dataset.support_boxes, dataset.augment = support_boxes, augment
    return dataset


class ImageEpisodes(EpisodeDataset):
    """PASCAL-5i / COCO-20i / folder episodes over files {name: (image, label)} and their class pixel counts."""
    min_pixels = MIN_FG_PIXELS

    def __init__(self, name, split, fold, shot, img_size, classes, class_names, seed, length, num_classes, files,
                 counts, exclude):
        self.files, self.counts, self.scale_range = files, counts, SCALE_RANGE[name]
        self.images, self.class_files = class_file_lists(counts, classes, exclude, self.min_pixels)
        if not self.images:
            raise DatasetError(f"no {name} {split} image has a class of {classes} with >= {self.min_pixels} pixels: "
                               "there is nothing to draw episodes from (are the labels class ids 0..N, 255?)")
        super().__init__(name, split, fold, shot, img_size, classes, class_names, seed, length or len(self.images),
                         num_classes)

    def read_label(self, name):
        return load_mask(self.files[name][1])

    def _load(self, name):
        image_path, label_path = self.files[name]
        img, label = load_image(image_path), self.read_label(name)
        if img.shape[-2:] != label.shape:
            raise DatasetFileError(f"image {image_path} {tuple(img.shape[-2:])} and label {label_path} "
                                   f"{tuple(label.shape)} differ in size")
        return img, label

    def _query(self, index, stream):
        """Training: image `index` (the sampler shuffles). Test: pass index // n over the n images, in an order
        drawn from (seed, stream, pass) alone, so that every model sees the same queries."""
        n = len(self.images)
        if self.split == "train":
            return self.images[index % n]
        order = np.random.default_rng((self.seed, stream, index // n, QUERY_ORDER_KEY)).permutation(n)
        return self.images[order[index % n]]

    def _draw(self, index, rng, stream=0):
        """The class: uniform among the split's classes with a pixel in the query (PFENet util/dataset.py:157-174)."""
        query = self._query(index, stream)
        present = [c for c in self.classes if self.counts[query].get(c, 0) > 0 and self.class_files[c]]
        class_id = present[rng.integers(len(present))]
        supports = _draw_supports(rng, self.class_files[class_id], query, self.shot)
        return class_id, [self._load(name) for name in [query, *supports]]

    def _transform(self, img, mask, rng):
        if self.split == "train":
            return train_transform(img, mask, rng, self.img_size, self.scale_range, self.augment, compact=True)
        return test_transform(img, mask, self.img_size, compact=True)


def class_file_lists(counts, classes, exclude=(), min_pixels=MIN_FG_PIXELS):
    """Counts {name: {class: pixels}} -> the sorted names where one of `classes` has >= min_pixels pixels, and {class:
    the names where it does} (PFENet util/dataset.py:55-69), after dropping names with a pixel of a class in
    `exclude` (BAM's filter_intersection, util/dataset.py:59-67; PFENet relabels those pixels as background)."""
    images, class_files = [], {c: [] for c in classes}
    for name in sorted(counts):
        if any(counts[name].get(c, 0) > 0 for c in exclude):
            continue
        counted = [c for c in classes if counts[name].get(c, 0) >= min_pixels]
        images += [name] if counted else []
        for c in counted:
            class_files[c].append(name)
    return images, class_files


def _draw_supports(rng, class_files, query, shot):
    """`shot` names other than the query, repeating only when the class has too few (PFENet would loop forever)."""
    pool = [name for name in class_files if name != query] or list(class_files)  # only the query: use it
    picks = list(rng.permutation(len(pool)))
    picks += list(rng.integers(0, len(pool), shot - len(picks))) if len(picks) < shot else []
    return [pool[i] for i in picks[:shot]]


class SyntheticEpisodes(EpisodeDataset):
    """Rendered episodes: train images never show a test-fold class (BAM's rule), test images may show any other
    class as a distractor. No augmentation: the renderer already randomises size, position, rotation and aspect."""

    def _draw(self, index, rng, stream=0):
        class_id = int(self.classes[rng.integers(len(self.classes))])
        pool = self.classes if self.split == "train" else range(1, NUM_CLASSES["synthetic"] + 1)
        distractors = np.array([c for c in pool if c != class_id])
        return class_id, [render_synthetic(rng, class_id, distractors, self.img_size) for _ in range(1 + self.shot)]

    def render_episode(self, index):
        """(class_id, [(img (3,H,W) in [0,1], label (H,W) class ids)]) of episode `index`, before binarising."""
        return self._draw(index, self._rng(index))

    def _transform(self, img, mask, rng):
        return _quantize(img), mask


def dataset_classes(name, fold=0, root=None, test_classes=None, coco_split="interleaved"):
    """Classes(count, names, novel) of a run: ids 1..count, {id: name}, the novel ids of fold `fold` (the rest are
    base classes). A folder dataset reads them from its root, and `test_classes` (ids) may replace its fold."""
    if name == "folder":
        return _folder(_data_root(name, root), fold, test_classes)[2]
    if test_classes is not None:
        raise ValueError(f"test_classes choose a folder dataset's novel classes; {name}'s are its folds")
    novel = fold_classes(name, fold, coco_split)
    names = class_names(name, root)
    return Classes(max(names), names, novel)


def fold_classes(dataset, fold, coco_split="interleaved"):
    """Novel class ids of `fold` (PFENet util/dataset.py:85-130). PASCAL-5i (and synthetic) fold i: 5i+1..5i+5.
    COCO-20i fold i: 4k+i+1, k = 0..19, the "interleaved" split of both PFENet COCO configs (use_split_coco);
    "contiguous": 20i+1..20i+20. FSS-1000 has one split, fold 0: its 240 test classes."""
    if dataset == "fss1000":
        if fold != 0:
            raise ValueError(f"FSS-1000 has one class split, no folds: fold 0 only (its 240 test classes), got {fold}")
        return _fss_classes(_fss_names(), "test")
    if fold not in range(NUM_FOLDS):
        raise ValueError(f"fold must be 0..{NUM_FOLDS - 1}, got {fold}")
    if dataset in ("pascal", "synthetic"):
        return list(range(5 * fold + 1, 5 * fold + 6))
    if dataset != "coco":
        raise ValueError(f"unknown dataset {dataset!r} (a folder dataset's folds come from its root: "
                         "dataset_classes)")
    if coco_split == "interleaved":
        return [4 * k + fold + 1 for k in range(20)]
    if coco_split == "contiguous":
        return list(range(20 * fold + 1, 20 * fold + 21))
    raise ValueError(f"coco_split must be 'interleaved' or 'contiguous', got {coco_split!r}")


def class_names(name, root=None):
    """{class id: name}: built in (no files needed), or from the root (a folder dataset, FSS-1000's training)."""
    if name == "folder":
        root = _data_root(name, root)
        return _folder_names(root, *_folder_index(root))
    if name == "fss1000":
        return _fss_names(None if root is None else _data_root(name, root))
    if name == "synthetic":
        return {c: f"{APPEARANCES[look][0]} {shape}" for c, (shape, look) in SYNTHETIC_CLASSES.items()}
    return dict(enumerate({"pascal": PASCAL_NAMES, "coco": COCO_NAMES}[name], 1))


def split_name(name, fold, root=None, test_classes=None, coco_split="interleaved"):
    """A split's name in file names: "pascal-fold0", "coco-contiguous-fold0", "folder-NAME-1a2b3c-fold0" (a hash of
    the root's path), "...-classes3-7-9" (--test-classes 3,7,9), "fss1000" (one split)."""
    if name == "fss1000":
        return name
    dataset = f"coco-{coco_split}" if name == "coco" and coco_split != "interleaved" else name
    if name == "folder" and root:
        path = Path(root).expanduser().resolve()
        dataset = f"folder-{path.name}-{hashlib.sha1(str(path).encode()).hexdigest()[:6]}"
    return f"{dataset}-" + ("classes" + "-".join(map(str, test_classes)) if test_classes else f"fold{fold}")


def _unreadable(path, err, layout):
    return DatasetNotFoundError(f"{path} cannot be read ({err.strerror or err}): its files are needed\n{layout}")


def _data_root(name, root):
    """The data root as a Path; DatasetNotFoundError with the dataset's layout when there is none."""
    layout = {"pascal": PASCAL_LAYOUT, "coco": COCO_LAYOUT, "folder": FOLDER_LAYOUT, "fss1000": FSS_LAYOUT}[name]
    if root is None:
        raise DatasetNotFoundError(f"no data root given for {name}: pass --data-root DIR\n{layout}")
    if not Path(root).expanduser().is_dir():
        raise DatasetNotFoundError(f"{name} data root {root} is not a directory\n{layout}")
    return Path(root).expanduser()


def collate_episodes(batch):
    """Episodes -> a batch: tensors stacked (B,...), class_id and index (B,), m_q_orig a list (sizes differ)."""
    return {key: [episode[key] for episode in batch] if key == "m_q_orig"
            else default_collate([episode[key] for episode in batch]) for key in batch[0]}


def to_device(batch, device):
    """An episode or a batch on `device` as the default one: uint8 images normalised, other uint8 tensors int64."""
    def move(key, value):
        if isinstance(value, list):
            return [move(key, v) for v in value]
        if not torch.is_tensor(value):
            return value
        value = value.to(device, non_blocking=True)
        if value.dtype != torch.uint8:
            return value
        return normalize(value) if key.startswith("img") else value.long()
    return {key: move(key, value) for key, value in batch.items()}


class EpisodeSampler(Sampler):
    """(stream, index) keys, so that persistent workers need not be told the epoch. Training: a permutation seeded by
    (seed, epoch), split across ranks, whole global batches. Test: episodes r, r+world, ... of rank r."""

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


def make_loader(dataset, sampler, batch_size, workers, device, drop_last, worker_init_fn=None):
    """The DataLoader of compact episodes: `workers` persistent processes (0: this one), pinned memory for CUDA."""
    dataset.compact = True
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_episodes, drop_last=drop_last,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None, worker_init_fn=worker_init_fn)


# ----------------------------------------------------------------------------- transforms
# Training augmentation recipes (a model file picks one with AUGMENTATION; --augment overrides): which of PFENet's
# steps run. The scale range is the dataset's; the padded, foreground-keeping crop always runs.
AUGMENTATIONS = {
    "pfenet": dict(scale=True, rotate=True, blur=True, flip=True),  # PFENet util/transform.py, and its descendants
    "crop-scale-flip": dict(scale=True, rotate=False, blur=False, flip=True),  # CRCNet §5.1's list
}
# RandScale (PFENet config/pascal/pascal_split0_resnet50.yaml:14-15, config/coco/coco_split0_resnet101.yaml:13-14)
SCALE_RANGE = {"pascal": (0.9, 1.1), "coco": (0.8, 1.25), "folder": (0.9, 1.1), "fss1000": (0.9, 1.1)}
ROTATE_DEGREES, ROTATE_P = 10.0, 0.5  # RandRotate (util/transform.py:305-330)
BLUR_P = 0.5  # RandomGaussianBlur (util/transform.py:355-362): cv2.GaussianBlur(image, (5, 5), 0)
# cv2.getGaussianKernel(5, sigma=0) takes its fixed table for sizes <= 7, not its sigma formula's Gaussian
BLUR_TAPS = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)
FLIP_P = 0.5  # RandomHorizontalFlip
CROP_KEEP, CROP_TRIES = 0.85, 32  # Crop 'rand': 1 draw + 31 redraws (util/transform.py:277-293)


def binary_mask(label, class_id, dtype=torch.int64):
    """Label (H,W) -> (H,W) dtype: class_id 1, other classes 0, 255 kept (PFENet util/dataset.py:176-181)."""
    mask = (label == class_id).to(dtype)
    mask[label == IGNORE] = IGNORE
    return mask


def mask_to_boxes(mask):
    """Mask (H,W) {0,1,255} -> 1 in each 8-connected object's bounding box, the rest kept (CRCNet §5.4)."""
    fg = (mask == 1).numpy()
    h, w = fg.shape
    none = h * w  # the label of background pixels, above every pixel index
    labels = np.where(fg, np.arange(h * w).reshape(h, w), none)
    while True:  # each pixel takes the smallest label of its 3x3 neighbourhood, then that label's own label
        padded = np.pad(labels, 1, constant_values=none)
        rows = np.minimum(np.minimum(padded[:-2], padded[1:-1]), padded[2:])  # (h, w+2)
        smallest = np.where(fg, np.minimum(np.minimum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:]), none)
        jumped = np.append(smallest.ravel(), none)[smallest]  # pointer jumping: few rounds per object
        if (jumped == labels).all():  # every object carries the index of its first pixel
            break
        labels = jumped
    ys, xs = np.nonzero(fg)
    roots, objects = np.unique(labels[ys, xs], return_inverse=True)
    extent = np.full((len(roots), 4), -none)  # an object's -top, -left, bottom, right: maxima all four
    np.maximum.at(extent, objects.ravel(), np.stack([-ys, -xs, ys, xs], 1))
    boxes = mask.clone()
    for top, left, bottom, right in extent.tolist():
        boxes[-top:bottom + 1, -left:right + 1] = 1
    return boxes


def train_transform(img, mask, rng, size, scale_range, recipe="pfenet", compact=False, base=None):
    """PFENet's training augmentation (util/transform.py, train.py:165-172), the steps AUGMENTATIONS[recipe] names (a
    step left out draws nothing from rng); base: the (h, w) the random scale is centred on (FSS-1000). img uint8
    (3,H0,W0), mask (H0,W0) -> img (3,size,size) normalised, mask int64 (compact: both uint8). Flip, padding and crop
    only move values, so they take the crop window alone, rounded to 8 bits, pasted on a canvas (no full-size copy)."""
    steps = AUGMENTATIONS[recipe]
    image, label = img.float().div_(255), mask  # (3,H0,W0) in [0,1], (H0,W0)
    # 1. RandScale: one isotropic factor (of base, when given), image bilinear, mask nearest
    hw = list(base or mask.shape)
    if steps["scale"]:
        factor = rng.uniform(*scale_range)
        hw = [max(1, round(s * factor)) for s in hw]
    if steps["scale"] or base:
        image = TF.resize(image, hw, antialias=True)  # (3,h,w)
        label = TF.resize(tv_tensors.Mask(label[None]), hw)[0].as_subclass(torch.Tensor)  # (h,w)
    # 2. RandRotate about the centre; corners filled with the mean colour / ignore
    if steps["rotate"] and rng.random() < ROTATE_P:
        image, label = rotate(image, label, rng.uniform(-ROTATE_DEGREES, ROTATE_DEGREES))
    # 3. Gaussian blur of the image only (5x5, cv2's taps for sigma 0: BLUR_TAPS)
    if steps["blur"] and rng.random() < BLUR_P:
        image = gaussian_blur(image)
    # 4. horizontal flip (the image's: of the crop window, below)
    flip = steps["flip"] and rng.random() < FLIP_P
    label = label.flip(-1) if flip else label
    # 5. pad symmetrically to at least size x size (mean colour / ignore), then the foreground-keeping random crop
    h, w = label.shape
    pad_top, pad_left = max(size - h, 0) // 2, max(size - w, 0) // 2
    padded = label.new_full((max(h, size), max(w, size)), IGNORE)  # (H,W) >= (size,size)
    padded[pad_top:pad_top + h, pad_left:pad_left + w] = label
    top, left = _draw_crop(padded == 1, size, rng)
    label = padded[top:top + size, left:left + size].contiguous()  # (size,size)
    y0, x0 = top - pad_top, left - pad_left  # the crop's corner in the (flipped) image; < 0 inside the padding
    r0, r1, c0, c1 = max(y0, 0), min(y0 + size, h), max(x0, 0), min(x0 + size, w)
    window = image[:, r0:r1, w - c1:w - c0].flip(-1) if flip else image[:, r0:r1, c0:c1]  # (3,r1-r0,c1-c0)
    out = _quantize(torch.tensor(MEAN))[:, None, None].repeat(1, size, size)  # (3,size,size) padding colour
    out[:, r0 - y0:r1 - y0, c0 - x0:c1 - x0] = _quantize(window)
    return _compact_or_default(out, label, compact)


def _draw_crop(fg, size, rng):
    """PFENet's 'rand' crop: redraw while the crop keeps < CROP_KEEP of fg, CROP_TRIES draws, the last kept."""
    h, w = fg.shape
    total = int(fg.sum())
    for _ in range(CROP_TRIES):
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        if int(fg[top:top + size, left:left + size].sum()) >= CROP_KEEP * total:
            break
    return top, left


def rotate(image, label, angle, fill=MEAN, ignore=IGNORE):
    """Rotate image (C,H,W) and label (H,W) by `angle` degrees counter-clockwise, as PFENet's cv2.warpAffine: corners
    `fill` and `ignore`; the border blends with the fill by its bilinear weights (torchvision's v2 weights twice)."""
    h, w = image.shape[-2:]
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    # Output -> input map of every pixel centre in grid_sample's -1..1 coordinates: F.affine_grid's, from outer sums
    x = (2 * torch.arange(w, dtype=image.dtype) + 1) / w - 1  # (W,)
    y = (2 * torch.arange(h, dtype=image.dtype) + 1) / h - 1  # (H,)
    grid = torch.stack([cos * x + (-sin * h / w) * y[:, None], (sin * w / h) * x + cos * y[:, None]], -1)[None]
    fill = torch.tensor(fill, dtype=image.dtype)[:, None, None]  # (C,1,1)
    # sampling x - fill with zeros outside, then adding fill back, gives sum_inside(w x) + (1 - sum_inside w) fill
    image = F.grid_sample((image - fill)[None], grid, mode="bilinear", align_corners=False)[0] + fill  # (C,H,W)
    shifted = (label.to(image.dtype) - ignore)[None, None]  # (1,1,H,W), outside samples 0 -> ignore
    label = (F.grid_sample(shifted, grid, mode="nearest", align_corners=False)[0, 0].round() + ignore).to(label.dtype)
    return image, label  # (C,H,W), (H,W)


def gaussian_blur(image, kernel=BLUR_TAPS):
    """cv2.GaussianBlur(image, (5, 5), 0) on (C,H,W): separable, cv2's border (reflect without the edge pixel)."""
    k = len(kernel)
    h, w = image.shape[-2:]
    padded = F.pad(image[None], [k // 2] * 4, mode="reflect")[0]  # (C,H+k-1,W+k-1)
    cols = padded[:, :h] * kernel[0]  # along columns: (C,H,W+k-1), whole contiguous rows at a time
    for i in range(1, k):
        cols.add_(padded[:, i:i + h], alpha=kernel[i])
    out = cols[..., :w] * kernel[0]  # along rows: (C,H,W)
    for i in range(1, k):
        out.add_(cols[..., i:i + w], alpha=kernel[i])
    return out


def test_transform(img_u8, mask, size, compact=False):
    """PFENet's Resize (util/transform.py:70-122), antialiased, sides not floored to a multiple of 8: uint8 (3,H0,W0)
    [+ mask, or None] -> (3,size,size) normalised, content top-left, padded [+ mask int64]; compact: uint8 both."""
    h, w = test_content_size(img_u8.shape[-2], img_u8.shape[-1], size)
    image = _quantize(torch.tensor(MEAN))[:, None, None].repeat(1, size, size)  # (3,size,size) padding colour
    image[:, :h, :w] = _quantize(TF.resize(img_u8.float().div_(255), [h, w], antialias=True))
    label = None
    if mask is not None:
        label = mask.new_full((size, size), IGNORE)
        label[:h, :w] = TF.resize(tv_tensors.Mask(mask[None]), [h, w])[0]
    return _compact_or_default(image, label, compact)


def test_content_size(h0, w0, size):
    """Size (h, w) of an h0 x w0 image inside the size x size test canvas: long side = size, aspect kept."""
    if h0 >= w0:
        return size, max(1, round(w0 * size / h0))
    return max(1, round(h0 * size / w0)), size


def logits_to_original(logits, orig_hw):
    """Undo test_transform: logits (...,2,size,size) -> (...,2,H0,W0) (PFENet's ori_resize, test.py:196-202)."""
    h0, w0 = orig_hw
    h, w = test_content_size(h0, w0, logits.shape[-1])
    content = logits[..., :h, :w]
    out = F.interpolate(content.reshape(-1, *content.shape[-3:]), (h0, w0), mode="bilinear", align_corners=False)
    return out.reshape(*content.shape[:-2], h0, w0)


def _quantize(image):
    """Float image in [0,1] -> uint8, rounded (the padding, the mean colour, normalises to ~0.005, not 0)."""
    return (image * 255).round_().clamp_(0, 255).to(torch.uint8)


def _compact_or_default(image, label, compact):
    if compact:
        return image, None if label is None else label.to(torch.uint8)
    return normalize(image), None if label is None else label.long()


def normalize(img):
    """uint8 image(s) (...,3,H,W) -> float32 (img / 255 - MEAN) / STD on img's device, as a multiply and an add:
    each rounded once by IEEE 754, so a GPU gives the CPU's bits (CUDA divides by multiplying by a reciprocal)."""
    scale, shift = _normalize_factors(img.device)
    return img.to(torch.float32).mul_(scale).add_(shift)


@functools.lru_cache(maxsize=None)
def _normalize_factors(device):
    """1 / (255 STD) and -MEAN / STD (3,1,1), float64 rounded once to float32, kept on each device."""
    mean, std = torch.tensor(MEAN, dtype=torch.float64), torch.tensor(STD, dtype=torch.float64)
    return tuple(t.float().view(3, 1, 1).to(device) for t in (1 / (255 * std), -mean / std))


def denormalize(img):
    """Normalised img (3,H,W) -> uint8 (3,H,W) for visualisation."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return ((img.detach().cpu().float() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- PASCAL-5i
SBD_LIST = "sbd_train_noval.txt"  # under ImageSets/Segmentation: SBD's train_noval ids, PFENet's sbd_data.txt
PFENET_TRAIN_IMAGES = 5953  # VOC2012 train U SBD train_noval: PFENet's lists/pascal/voc_sbd_merge_noduplicate.txt
PASCAL_LAYOUT = """expected PASCAL-5i layout:
  <root>/
    JPEGImages/2007_000032.jpg ...            VOC2012 images (VOCtrainval_11-May-2012.tar, VOC2012 devkit)
    SegmentationClassAug/2007_000032.png ...  VOC+SBD labels, 0 bg, 1..20, 255 ignore (SegmentationClassAug.zip,
                                              the SBD-augmented labels linked from the PFENet and HSNet READMEs)
    ImageSets/Segmentation/train.txt          VOC2012 train ids (1464), from the devkit
    ImageSets/Segmentation/val.txt            VOC2012 val ids (1449), from the devkit
    ImageSets/Segmentation/sbd_train_noval.txt
                                              SBD's train_noval ids (5623) = PFENet's lists/pascal/sbd_data.txt,
                                              its 'JPEGImages/X.jpg SegmentationClassAug/X.png' lines read as they
                                              are; NOT SBD's dataset/train.txt (8498 ids)"""
PASCAL_NAMES = tuple("""aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike
    person pottedplant sheep sofa train tvmonitor""".split())


def _pascal_index(root, split):
    """-> files {id: (jpg, png)}, counts {id: {class: pixels}}, class_names. Test: VOC2012 val (1449). Train:
    VOC2012 train U SBD_LIST minus VOC2012 val, PFENet's 5953 images (a note when the count differs); without
    SBD_LIST, every SegmentationClassAug label outside VOC val (10582, more than PFENet's: a warning says so)."""
    sets = root / "ImageSets" / "Segmentation"
    needed = [root / "JPEGImages", root / "SegmentationClassAug", sets / "train.txt", sets / "val.txt"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise DatasetNotFoundError(f"PASCAL root {root} is missing {', '.join(missing)}\n{PASCAL_LAYOUT}")
    val = _read_ids(sets / "val.txt")
    if split == "test":
        ids = sorted(set(val))
    elif (sets / SBD_LIST).exists():
        ids = sorted((set(_read_ids(sets / "train.txt")) | set(_read_ids(sets / SBD_LIST))) - set(val))
        if len(ids) != PFENET_TRAIN_IMAGES:
            print(f"[data] note: {len(ids)} PASCAL training images from train.txt and {SBD_LIST}; PFENet's list has "
                  f"{PFENET_TRAIN_IMAGES} (VOC2012 train and SBD's 5623-id train_noval)", file=sys.stderr, flush=True)
    else:
        print(f"\n{'!' * 78}\n[data] WARNING: {sets / SBD_LIST} not found. Training on every "
              "SegmentationClassAug label outside VOC val\n(10582 images with the full labels), which is LARGER "
              f"than PFENet's {PFENET_TRAIN_IMAGES}-image list.\n{'!' * 78}\n", file=sys.stderr, flush=True)
        ids = sorted({p.stem for p in (root / "SegmentationClassAug").glob("*.png")} - set(val))
    files = {i: (root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClassAug" / f"{i}.png") for i in ids}
    scan = functools.partial(_scan_pair, max_id=NUM_CLASSES["pascal"])
    counts = _cached_scan(root, f"pascal_{split}_counts.json", [], files, scan, f"PASCAL {split} files",
                          f"the PASCAL {split} list of {root}")
    return files, _int_keys(counts), class_names("pascal")


# ----------------------------------------------------------------------------- COCO-20i
COCO_LAYOUT = """expected COCO-20i layout (COCO 2014, cocodataset.org):
  <root>/
    train2014/COCO_train2014_000000000009.jpg ...   train2014.zip
    val2014/COCO_val2014_000000000042.jpg ...       val2014.zip
    annotations/instances_train2014.json            annotations_trainval2014.zip
    annotations/instances_val2014.json
    labels/{train2014,val2014}/*.png                written here on first use (semantic labels 0..80)"""
# COCO 2014 category names, in the order of their sorted ids (= class ids 1..80 here)
COCO_NAMES = tuple(name.strip() for name in """person, bicycle, car, motorcycle, airplane, bus, train, truck, boat,
    traffic light, fire hydrant, stop sign, parking meter, bench, bird, cat, dog, horse, sheep, cow, elephant, bear,
    zebra, giraffe, backpack, umbrella, handbag, tie, suitcase, frisbee, skis, snowboard, sports ball, kite,
    baseball bat, baseball glove, skateboard, surfboard, tennis racket, bottle, wine glass, cup, fork, knife, spoon,
    bowl, banana, apple, sandwich, orange, broccoli, carrot, hot dog, pizza, donut, cake, chair, couch, potted plant,
    bed, dining table, toilet, tv, laptop, mouse, remote, keyboard, cell phone, microwave, oven, toaster, sink,
    refrigerator, book, clock, vase, scissors, teddy bear, hair drier, toothbrush""".split(","))
# COCO label PNGs: bump when they would be rasterised differently (1: Pillow's polygon fill; 2: pycocotools' rule).
# A label folder's COCO_LABEL_STAMP records the version (no file: 1) and the annotation file's size and mtime.
COCO_LABEL_VERSION = 2
COCO_LABEL_STAMP = "label_version.txt"
POLYGON_UPSAMPLE = 5  # pycocotools' rleFrPoly digitises polygon edges on a grid 5x finer than the pixels


def _coco_index(root, split):
    """split "train" or "val" -> files, counts, class_names of every 2014 image with an annotation (82081 / 40137,
    as PFENet's README), category ids in sorted order. Labels are written once by pycocotools' rules, again when
    stale (_coco_stale); the cache is trusted while every image and label it counted is as it was."""
    ann_path = root / "annotations" / f"instances_{split}2014.json"
    missing = [str(p) for p in (root / f"{split}2014", ann_path) if not p.exists()]
    if missing:
        raise DatasetNotFoundError(f"COCO root {root} is missing {', '.join(missing)}\n{COCO_LAYOUT}")
    cache = _cache_file(root, f"coco_{split}_counts.json")
    ann_stat = ann_path.stat()
    label_dir = _coco_label_dir(root, split, ann_path, ann_stat)
    key = [CACHE_VERSION, COCO_LABEL_VERSION, _stat_key(ann_stat), str(label_dir)]
    payload = _read_cache(cache, key)
    if payload is not None:  # trusted while every image and label it counted is as it was
        pairs = [(root / f"{split}2014" / f"{stem}.jpg", label_dir / f"{stem}.png") for stem in payload["counts"]]
        digest, missing = _fingerprint(root, [path for pair in pairs for path in pair])
        payload = None if missing or digest != payload["files"] else payload
    if payload is None:
        try:
            coco = json.loads(ann_path.read_text())
        except ValueError as err:  # cut short or not JSON (UnicodeDecodeError is one too)
            raise DatasetFileError(f"{ann_path}: not a whole COCO annotation file ({err})") from None
        category_ids = sorted(c["id"] for c in coco["categories"])
        to_class = {cid: i + 1 for i, cid in enumerate(category_ids)}  # 1..90 with gaps -> 1..80
        names = {to_class[c["id"]]: c["name"] for c in coco["categories"]}
        per_image = {}
        for ann in coco["annotations"]:
            per_image.setdefault(ann["image_id"], []).append((to_class[ann["category_id"]], ann["segmentation"]))
        images = sorted((im for im in coco["images"] if im["id"] in per_image), key=lambda im: im["file_name"])
        stems = [Path(im["file_name"]).stem for im in images]
        stamp = label_dir / COCO_LABEL_STAMP  # the label version, the annotation file's size and mtime
        stamp_text = f"{COCO_LABEL_VERSION}\n{ann_stat.st_size} {ann_stat.st_mtime_ns}\n"
        try:  # labels of another label version or annotation file are all rewritten
            stale = _coco_stale(label_dir, ann_path, ann_stat)
            if not stamp.is_file() and not any(label_dir.glob("*.png")):  # stamped at once: a first run resumes
                stamp.write_text(stamp_text)
                stale = None
        except OSError as err:
            raise _label_write_error(label_dir, split, err) from None
        if stale:
            print(f"[data] note: rewriting the COCO {split}2014 labels in {label_dir}: {stale}", file=sys.stderr,
                  flush=True)
        rewrite = stale is not None
        jobs = [(str(root / f"{split}2014" / f"{stem}.jpg"), str(label_dir / f"{stem}.png"), im["height"],
                 im["width"], per_image[im["id"]], rewrite, split, len(to_class)) for stem, im in zip(stems, images)]
        scanned = _parallel_map(_write_and_scan_coco_label, jobs, f"writing COCO {split}2014 labels to {label_dir}",
                                cache is not None)
        counts = check_scan(scanned, f"COCO {split}2014 under {root}")
        try:  # every label is current now; a stamp of before the annotations' line gets it where it can be written
            if not stamp.is_file() or stamp.read_text(errors="replace") != stamp_text:
                stamp.write_text(stamp_text)
        except OSError as err:
            if rewrite:
                raise _label_write_error(label_dir, split, err) from None
        files = [path for stem in stems for path in (root / f"{split}2014" / f"{stem}.jpg", label_dir / f"{stem}.png")]
        payload = {"class_names": names, "counts": dict(zip(stems, counts)), "files": _fingerprint(root, files)[0]}
        _write_cache(cache, key, payload)
    files = {stem: (root / f"{split}2014" / f"{stem}.jpg", label_dir / f"{stem}.png") for stem in payload["counts"]}
    names = {int(c): name for c, name in payload["class_names"].items()}
    return files, _int_keys(payload["counts"]), names


def _coco_label_dir(root, split, ann_path, ann_stat):
    """Where the labels are (or go): <root>/labels/<split>2014 if its stamp is current, else the first writable of it
    and ~/.cache/fss/<hash of root>/labels/<split>2014, else a read-only <root>/labels/<split>2014 (as they are)."""
    places = [root / "labels" / f"{split}2014", _cache_places(root)[1] / "labels" / f"{split}2014"]
    with contextlib.suppress(OSError):  # an unreadable stamp: as none
        if _coco_stale(places[0], ann_path, ann_stat) is None:
            return places[0]
    label_dir = _writable_dir(*places)
    if label_dir is None and not places[0].is_dir():
        raise DatasetFileError(f"cannot write the COCO {split}2014 labels: neither {places[0]} nor {places[1]} can be "
                               "written (they are needed: make one of them writable, and run again)")
    return label_dir or places[0]


def _write_and_scan_coco_label(job):
    """Write one label PNG (unless present and not `rewrite`), then scan it with its image (_scan_pair). Annotations
    are painted in file order, a later one over an earlier one; crowd ones too (COCO has no ignore label)."""
    image_path, path, height, width, annotations, rewrite, split, num_classes = job
    try:
        with Image.open(image_path) as im:  # the header: the whole image is decoded by _scan_pair below
            if im.size != (width, height):
                return None, f"{image_path}: {im.size[0]}x{im.size[1]} pixels, its annotations say {width}x{height}"
    except (OSError, ValueError, SyntaxError) as err:
        return None, f"{image_path}: not a readable image ({err})"
    if rewrite or not Path(path).exists():
        label = np.zeros((height, width), np.uint8)
        for class_id, segmentation in annotations:
            label[segmentation_to_mask(segmentation, height, width)] = class_id
        tmp = f"{path}.{os.getpid()}.tmp.png"
        try:
            Image.fromarray(label).save(tmp)
            os.replace(tmp, path)
        except OSError as err:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
            raise _label_write_error(Path(path).parent, split, err) from None
    return _scan_pair((image_path, path), max_id=num_classes)


def _coco_stale(label_dir, ann_path, ann_stat):
    """Why label_dir's labels are stale by its stamp (none: version 1), else None; a version-only stamp is current."""
    path = label_dir / COCO_LABEL_STAMP
    stamp = path.read_text(errors="replace") if path.is_file() else ""
    version, *annotations = stamp.splitlines() if stamp else ["1"]
    if version.strip() != str(COCO_LABEL_VERSION):
        return (f"they were rasterised under label version {version.strip()}, now {COCO_LABEL_VERSION} "
                "(pycocotools' polygon rule)")
    recorded = annotations[0].split() if annotations else []
    if recorded and recorded != [str(ann_stat.st_size), str(ann_stat.st_mtime_ns)]:
        return f"{ann_path.name} has changed since they were rasterised from it (its size or modification time)"
    return None


def _label_write_error(label_dir, split, err):
    return DatasetFileError(f"cannot write the COCO {split}2014 labels in {label_dir}: {err.strerror or err} (they "
                            "are needed: free space there, or make it writable, and run again)")


def segmentation_to_mask(segmentation, height, width):
    """A COCO `segmentation` -> bool (height,width): RLE decoded, or polygons united (pycocotools' merge)."""
    if isinstance(segmentation, dict):
        return rle_decode(segmentation["counts"], *segmentation["size"])
    mask = np.zeros((height, width), bool)
    for polygon in segmentation:
        if len(polygon) >= 6:  # at least 3 points: fewer enclose nothing
            mask |= polygon_to_mask(polygon, height, width)
    return mask


def polygon_to_mask(polygon, height, width):
    """One COCO polygon [x1, y1, x2, y2, ...] -> bool (height,width), pixel for pixel pycocotools' rleFrPoly
    (common/maskApi.c), vectorised. Pixel (r, c) spans [c, c+1) x [r, r+1); "fine" coordinates are 5x finer.
    1. Vertices snap to the fine grid: X = int(5x + 0.5), C's cast (toward zero: x = -0.15 snaps to 0).
    2. Each edge becomes one fine point a step along its longer axis (x on a tie), the other coordinate rounded
       as in 1 from the end with the smaller coordinate on that axis (alike in either direction).
    3. Where the closed walk steps between fine x = 5c+2 and 5c+3 it cuts column c at V, the smaller fine y, and
       toggles the column's pixels with centre 5r+2.5 below V: rows r >= ceil((V - 2) / 5), clipped to 0..height.
    4. A pixel is inside where an odd number of cuts lie above its centre (even-odd rule)."""
    points = np.asarray(polygon[: len(polygon) // 2 * 2], np.float64).reshape(-1, 2)  # (k,2) x, y
    start = np.trunc(POLYGON_UPSAMPLE * points + 0.5).astype(np.int64)  # (k,2) fine vertices; edge e: start -> end
    end = np.roll(start, -1, axis=0)
    delta = np.abs(end - start)
    steep = delta[:, 1] > delta[:, 0]  # walked along y (else along x)
    steps = np.where(steep, delta[:, 1], delta[:, 0])
    backward = np.where(steep, start[:, 1] > end[:, 1], start[:, 0] > end[:, 0])
    low, high = np.where(backward[:, None], end, start), np.where(backward[:, None], start, end)
    low, high = (np.where(steep[:, None], p[:, ::-1], p) for p in (low, high))  # (k,2) (along, across)
    slope = (high[:, 1] - low[:, 1]) / np.maximum(steps, 1)  # across per step along
    # the walk: steps+1 points per edge, edges in order, each from its start to its end
    edge = np.repeat(np.arange(len(start)), steps + 1)  # (m,)
    walked = np.arange(edge.size) - (np.cumsum(steps + 1) - (steps + 1))[edge]
    t = np.where(backward[edge], steps[edge] - walked, walked)  # steps from the edge's low end
    along = low[edge, 0] + t
    across = np.trunc(low[edge, 1] + slope[edge] * t + 0.5).astype(np.int64)
    fx, fy = np.where(steep[edge], across, along), np.where(steep[edge], along, across)  # (m,) fine points
    # the cuts: consecutive points in different fine columns; the left one of the two columns names the cut
    moved = fx[1:] != fx[:-1]
    left = np.where(fx[1:] < fx[:-1], fx[1:], fx[1:] - 1)[moved]
    top = np.minimum(fy[1:], fy[:-1])[moved]
    half = POLYGON_UPSAMPLE // 2  # fine 5c+2 is the last fine column left of column c's centre line
    col = (left - half) // POLYGON_UPSAMPLE
    keep = ((left - half) % POLYGON_UPSAMPLE == 0) & (col >= 0) & (col < width)
    col, row = col[keep], np.clip(-((half - top[keep]) // POLYGON_UPSAMPLE), 0, height)  # ceil((V - 2) / 5)
    mask = np.zeros((height, width), bool)
    if col.size:  # the toggles in the box the cuts span, then the running parity down each column
        c0, r0 = col.min(), row.min()
        cols, rows = col.max() + 1 - c0, row.max() + 1 - r0
        toggles = np.bincount((col - c0) * rows + row - r0, minlength=cols * rows).reshape(cols, rows)
        # a closed walk cuts every column an even number of times: nothing is inside from the last cut on
        mask[r0:r0 + rows - 1, c0:c0 + cols] = (np.cumsum(toggles, axis=1)[:, :-1] % 2 == 1).T
    return mask


def rle_decode(counts, height, width):
    """COCO RLE (runs, or a compressed string) -> bool (height,width); runs alternate 0,1,0,..., column-major."""
    runs = rle_string_to_counts(counts) if isinstance(counts, str) else list(counts)
    values = np.arange(len(runs)) % 2 == 1  # False, True, False, ...
    flat = np.repeat(values, runs)
    if flat.size != height * width:
        raise ValueError(f"RLE covers {flat.size} pixels, expected {height}x{width}")
    return flat.reshape(width, height).T


def rle_string_to_counts(text):
    """COCO's compressed RLE string -> run lengths (pycocotools rleFrString): 5 bits per character (offset 48),
    0x20 = more characters follow, 0x10 in the last one = negative; from the 3rd run on, a run is stored as the
    difference to the run two places back."""
    counts, i = [], 0
    while i < len(text):
        value, shift, more = 0, 0, True
        while more:
            c = ord(text[i]) - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            i, shift = i + 1, shift + 5
            if not more and c & 0x10:
                value |= -1 << shift  # sign extension
        counts.append(value + (counts[-2] if len(counts) > 2 else 0))
    return counts


# ----------------------------------------------------------------------------- FSS-1000
FSS_LAYOUT = """expected FSS-1000 layout (github.com/HKUSTCV/FSS-1000's fewshot_data, or HSNet's FSS-1000 folder):
  <root>/
    abacus/1.jpg abacus/1.png ... abacus/10.png   a folder a class: its ten images N.jpg (224x224) with their
                                                  masks N.png (the object 255, background 0)
    ... 1000 class folders: the 240 test and 240 validation classes of HSNet's lists (data.FSS_TEST_CLASSES,
        data.FSS_VAL_CLASSES; the test list is FSS-1000's own fss_test_set.txt) and 520 training classes"""
# HSNet's split (data/splits/fss/test.txt, val.txt), the 520 other folders train. Ids: test 1..240, validation
# 241..480, training 481..1000, each in sorted order of the names (test and validation ids never depend on the tree)
FSS_TEST_CLASSES = tuple(sorted("""abe's_flyingfish accordion american_alligator american_chamelon andean_condor anise
    apple_icon arch_bridge arrow astronaut australian_terrier bamboo_dragonfly bamboo_slip banana_boat barber_shaver bat
    bath_ball beet_root bell_pepper big_ben black_bear bloodhound boxing_gloves breast_pump broom bucket bulb burj_al
    bus bustard cabbage_butterfly cablestayed_bridge cantilever_bridge canton_tower captain_america_shield carriage
    cathedrale_paris cd chalk_brush chandelier charge_battery chess_king chess_knight chess_queen chicken chicken_leg
    chiffon_cake chinese_knot church cicada clam clearwing_flyingfish cloud coffee_mug coin combination_lock condor
    cricket crt_screen cuckoo curlew dart_target delta_wing diver doormat doublebus doughnut downy_pitch
    drilling_platform dwarf_beans eagle earphone1 earphone2 echidna egg electronic_stove english_foxhound f1_racing fan
    feather_clothes fennel_bulb ferrari911 fish fish_eagle flamingo fly flying_frog flying_geckos flying_snakes
    flying_squirrel fox french_fries ganeva_chair glider_flyingfish goblet golden_plover goldfinch groenendael guitar
    gym_ball haddock hair_razor hang_glider harmonica hawk helicopter hotel_slipper hover_board iguana indri ipad iphone
    iron_man jet_aircraft kart key knife kunai lapwing leaf_egg leaf_fan leafhopper leather_shoes leggings lemur_catta
    letter_opener little_blue_heron lotus magpie_bird manatee marimba may_bug meatloaf microscope minicooper missile
    mite_predator mitten moist_proof_pad monkey moon motorbike net_surface_shoes nintendo_3ds nintendo_gba nintendo_sp
    nintendo_switch nintendo_wiiu ocarina oiltank_car onion oriole osprey oyster paper_plane parthenon pencil_sharpener1
    peregine_falcon pheasant phonograph photocopier pidan pizza plastic_bag poached_egg polo_shirt porcupine
    potato_chips pspgo pteropus pumpkin_pie pyramid pyramid_cube pyraminx quail quail_egg rally_car reel reflex_camera
    rice_cooker rocking_chair rubber_eraser rubick_cube rugby_ball ruler samarra_mosque santa_sledge screw seagull
    sealion shower_curtain shumai siamang sled snow_leopard snowman snowplow soap soymilk_machine speedboat spiderman
    spinach stealth_aircraft steering_wheel stingray stone_lion stonechat stork strawberry sulphur_butterfly sushi swan
    sydney_opera_house taj_mahal tiltrotor toaster tower_pisa transport_helicopter tredmill truss_bridge tunnel
    twin_tower vacuum_cup villa_savoye vinyl wagtail wandering_albatross warehouse_tray warplane wasp water_buffalo
    water_heater wheelchair whippet white_wolf wig windmill window_screen wooden_boat wooden_spoon""".split()))
FSS_VAL_CLASSES = tuple(sorted("""ab_wheel abacus ac_ground african_crocodile airliner albatross apron arabian_camel
    arctic_fox armadillo artichoke baby badger balance_beam balloon banjo barbell baseball basset beagle bee bee_eater
    beer_bottle beer_glass bell bighorn_sheep bittern blenheim_spaniel bluetick bolete bowtie briard broccoli
    bulbul_bird cabbage cactus calculator camomile carambola cardoon ceiling_fan cheese cheetah cherry chimpanzee cigar
    cigarette coconut coffeepot colubus common_newt consomme conversion_plug conveyor corn cornmeal cpu crab cradle
    crayon crepe cricketball crocodile croquet_ball cup cushion daisy digital_clock dishwasher dowitcher drum eel
    english_setter equestrian_helmet espresso_maker fire_balloon fire_hydrant fire_screen flat-coated_retriever
    folding_chair fox_squirrel french_ball frying_pan gas_tank giant_schnauzer gibbon ginger gyromitra hair_drier
    hami_melon hammer hammerhead_shark handcuff handkerchief har_gow harp hatchet hippo hotdog ice_lolly iceberg
    icecream impala ipod ironing_board jay_bird kazoo kit_fox kobe_logo kwanyin lacewing laptop lemon lettuce lion
    lipstick loggerhead_turtle loguat louvre_pyramid lycaenid_butterfly macaw mango mashed_potato matchstick
    mcdonald_sign microsd monarch_butterfly monocycle mortar nagoya_castle narcissus nike_logo olive orang oscilloscope
    ox panda parachute parking_meter partridge pay_phone peanut pear piano_keyboard pickelhaube pig pillow pinecone
    pingpong_ball plaice platypus pomegranate power_drill pretzel projector pubg_airdrop pubg_lvl3backpack pumpkin
    rabbit raven razor red_fox redshank refrigerator relay_stick revolver rock_snake rose saltshaker sandal sandbar
    saxophone scarerow school_bus schooner scissors sea_cucumber sea_urchin sewing_machine shovel shuriken siamese_cat
    skateboard ski_mask smoothing_iron sniper_rifle soap_dispenser sock soup_bowl spider spider_monkey squirrel_monkey
    stopwatch stretcher strongbox sturgeon suitcase sungnyemun sweatshirt swim_ring syringe tape_player taro television
    thor's_hammer three-toed_sloth thrush tiger_cat tiger_shark timber_wolf toilet_brush toilet_seat tomato totem_pole
    toucan tow_truck tray triumphal_arch tulip turnstile typewriter umbrella upright_piano vacuum vase volleyball
    vulture water_ouzel water_tower weasel whiptail whistle white_stork windsor_tie wine_bottle wolf woodpecker yawl
    yoga_pad yonex_icon""".split()))
FSS_TRAIN_CLASSES = 520
FSS_MASK_THRESHOLD = 128  # HSNet data/fss.py read_mask: grey >= 128 is the object (the masks' edges are anti-aliased)
FSS_IMAGES = (".jpg", ".jpeg")  # N.jpg as distributed; an N.jpeg pairs with N.png only where there is no N.jpg


class FSSEpisodes(ImageEpisodes):
    """FSS-1000 episodes (HSNet data/fss.py): every image shows its class's object, so no filter; a test seed is one
    pass over the test images, each the query once, supports drawn without repeats (HSNet's repeat)."""
    min_pixels = 1

    def read_label(self, name):  # (H,W) the class id on the object
        return load_fss_mask(self.files[name][1]).long() * next(iter(self.counts[name]))

    def _transform(self, img, mask, rng):
        """Training resizes to the test size (224 x 224 -> the crop) before the random scale, as HSNet trains and
        tests at one size (data/dataset.py): else a 473 crop would show the object at a fifth of its test area."""
        if self.split != "train":
            return super()._transform(img, mask, rng)
        base = test_content_size(*mask.shape, self.img_size)
        return train_transform(img, mask, rng, self.img_size, self.scale_range, self.augment, compact=True, base=base)


def _fss_names(root=None):
    """{id: name} of FSS-1000: the test and validation lists', then `root`'s other class folders (no root: numbered)."""
    test, val = len(FSS_TEST_CLASSES), len(FSS_VAL_CLASSES)
    names = {**dict(enumerate(FSS_TEST_CLASSES, 1)), **dict(enumerate(FSS_VAL_CLASSES, test + 1))}
    if root is None:
        return {**names, **{c: str(c) for c in range(test + val + 1, test + val + FSS_TRAIN_CLASSES + 1)}}
    listed = set(names.values())
    try:
        entries = {entry.name: entry.is_dir() for entry in os.scandir(root)}
    except OSError as err:
        raise _unreadable(root, err, FSS_LAYOUT) from None
    folders = sorted(name for name, is_dir in entries.items() if is_dir and not name.startswith(".")
                     and name not in listed)
    if not listed & entries.keys():
        inner = [str(root / sub) for sub in ("FSS-1000", "fewshot_data") if (root / sub).is_dir()]
        raise DatasetNotFoundError(f"FSS-1000 root {root} holds no class folder of the test or validation list (e.g. "
                                   f"{root / FSS_TEST_CLASSES[0]})" + (f": give {inner[0]}" if inner else "")
                                   + f"\n{FSS_LAYOUT}")
    if len(folders) != FSS_TRAIN_CLASSES:
        _note_once(f"[data] note: {root} holds {len(folders)} class folders outside the test and validation lists, "
                   f"the training classes; FSS-1000 has {FSS_TRAIN_CLASSES}")
    return {**names, **dict(enumerate(folders, test + val + 1))}


def _fss_classes(names, split):
    """The class ids of an FSS-1000 split ("train", "val", "test") among names {id: name} (_fss_names)."""
    test, val = len(FSS_TEST_CLASSES), len(FSS_VAL_CLASSES)
    first, end = {"test": (1, test + 1), "val": (test + 1, test + val + 1), "train": (test + val + 1, math.inf)}[split]
    return [c for c in sorted(names) if first <= c < end]


def _fss_index(root, split, names):
    """-> files, counts {"CLASS/N": ...} of `split`'s class folders. A bad file or folder stops the run; what the
    distribution ships wrong is left out with one note: unpaired files, a mask without an object or of another
    size than its image (peregine_falcon/8.png: github.com/HKUSTCV/FSS-1000 issue #23)."""
    classes = _fss_classes(names, split)
    if not classes:  # the training classes are the root's other folders: a download of the test set alone
        raise DatasetNotFoundError(f"FSS-1000 root {root} holds no training class folder: training needs the "
                                   f"{FSS_TRAIN_CLASSES} class folders outside the test and validation lists (the "
                                   f"full FSS-1000 tree; its test classes alone can be tested on)\n{FSS_LAYOUT}")
    files, strays, problems = {}, [], []
    for c in classes:
        folder = root / names[c]
        try:
            if not folder.is_dir():
                problems.append(f"{folder}: no such class folder (FSS-1000's {split} list names it)")
                continue
            pairs, unpaired = _fss_pairs(folder)
        except OSError as err:
            problems.append(f"{folder}: cannot be read ({err.strerror or err})")
            continue
        files.update({f"{names[c]}/{stem}": pair for stem, pair in pairs.items()})
        strays += [f"{names[c]}/{line}" for line in unpaired]
        if not pairs:
            problems.append(f"{folder}: no image N.jpg with its mask N.png")
    class_of = {names[c]: c for c in classes}
    pixels = _cached_scan(root, f"fss1000_{split}_pixels.json", [FSS_MASK_THRESHOLD], files, _scan_fss_pair,
                          f"FSS-1000 {split} files", f"the FSS-1000 {split} classes of {root}", problems)
    left = [f"{name}.png ({why})" for name, why in pixels.items() if isinstance(why, str)]
    if left or strays:
        _note_once(f"[data] note: {root}, FSS-1000 {split} classes: left out {', '.join(left + strays)}")
    kept = {name: n for name, n in pixels.items() if not isinstance(n, str)}
    return {name: files[name] for name in kept}, {name: {class_of[name.split("/")[0]]: n} for name, n in kept.items()}


def _fss_pairs(folder):
    """A class folder's pairs {N: (N.jpg, N.png)}, and ["FILE (why it pairs with nothing)"] (hidden files aside)."""
    images, masks, others = {}, {}, []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = Path(entry.path)
        if entry.name.startswith(".") or not entry.is_file():
            continue
        if path.suffix.lower() in FSS_IMAGES:
            images.setdefault(path.stem, []).append(path)
        elif path.suffix.lower() == ".png":
            masks[path.stem] = path
        else:
            others.append(f"{path.name} (not an image N.jpg or a mask N.png)")
    for found in images.values():
        found.sort(key=lambda p: p.suffix.lower() != ".jpg")  # N.jpg first
    pairs = {stem: (found[0], masks[stem]) for stem, found in images.items() if stem in masks}
    unpaired = [f"{path.name} ({f'beside {found[0].name}' if stem in masks else 'no mask ' + stem + '.png'})"
                for stem, found in images.items() for path in found[stem in masks:]]
    unpaired += [f"{path.name} (no image {stem}.jpg)" for stem, path in masks.items() if stem not in images]
    return pairs, sorted(unpaired + others)


def _scan_fss_pair(pair):
    """(image, mask) -> (object pixels, None), (why it is left out, None), or (None, "path: what is wrong")."""
    try:
        mask, (height, width) = _read_pair(pair, load_fss_mask)
    except DatasetFileError as err:
        return None, str(err)
    if tuple(mask.shape) != (height, width):
        return f"{mask.shape[1]}x{mask.shape[0]}, its image {width}x{height}", None
    pixels = int(mask.sum())
    return (pixels, None) if pixels else (f"no pixel >= {FSS_MASK_THRESHOLD}", None)


def load_fss_mask(path):
    """An FSS-1000 mask PNG -> bool (H,W): grey (PIL's convert("L")) >= FSS_MASK_THRESHOLD, as HSNet reads it."""
    try:
        with Image.open(path) as im:
            grey = np.array(im.convert("L"))
    except (OSError, ValueError, SyntaxError) as err:
        raise DatasetFileError(f"cannot read mask {path}: {err}") from err
    return torch.from_numpy(grey >= FSS_MASK_THRESHOLD)


# ----------------------------------------------------------------------------- folder (your own data)
# A folder dataset runs PASCAL-5i's pipeline on the images of its split, and checks what PASCAL's fixed lists
# guarantee: paired files, class ids that classes.txt names, folds.txt, novel classes in some label, enough shots.
FOLDER_LAYOUT = """expected folder layout (--dataset folder, your own data):
  <root>/
    images/NAME.jpg ...     the images (.jpg, .jpeg or .png)
    labels/NAME.png ...     one per image, same NAME and size, single channel (grayscale or palette): the class
                            id of each pixel, 1..254; 0 background, 255 ignore (a 0/255 mask is all ignore)
    classes.txt             optional: one class name a line, line i naming class id i (default: ids 1..the
                            largest id in the labels, named by their numbers)
    folds.txt               optional: 4 lines, line K the test (novel) class ids of fold K, e.g. "1 5 9" (default:
                            fold K tests the K-th of four contiguous quarters of the ids; --test-classes: any ids)
    train.txt, val.txt      optional, both or neither: the NAMEs of the training and test images, one a line
                            (default: the images with a pixel of a test class are the test images, the rest train)"""
FOLDER_IMAGES = (".jpg", ".jpeg", ".png")  # images/ files of these suffixes (any case) are the images


def _folder(root, fold, test_classes):
    """-> files, counts and Classes of the folder dataset at root; novel: `test_classes`, else fold `fold`'s."""
    files, counts = _folder_index(root)
    names = _folder_names(root, files, counts)
    if test_classes is not None:
        novel, source = sorted(set(test_classes)), f"--test-classes {','.join(map(str, test_classes))}"
        unknown = [c for c in novel if c not in names]
        if unknown:
            raise DatasetClassError(f"{source}: {unknown} are not class ids of {root} (1..{len(names)})")
    elif fold in range(NUM_FOLDS):
        novel, source = list(_folder_folds(root, len(names))[fold]), f"fold {fold}"
    else:
        raise ValueError(f"fold must be 0..{NUM_FOLDS - 1}, got {fold}")
    held = {c for per_image in counts.values() for c in per_image}
    absent = [_class_label(c, names) for c in novel if c not in held]
    if absent:
        raise DatasetClassError(f"{source}: no label in {root / 'labels'} holds test class {', '.join(absent)}: "
                                "there is no image to test it on")
    if len(novel) == len(names):
        raise DatasetClassError(f"{source} makes every class of {root} a test class: none is left to train on")
    return files, counts, Classes(len(names), names, novel)


def _folder_index(root):
    """-> files {stem: (image, label)}, counts {stem: {class: pixels}} of every image of a folder dataset, paired by
    stem. Every bad file is named at once: unpaired, two images of one stem, a train.txt/val.txt name without files."""
    try:
        missing = [str(root / sub) for sub in ("images", "labels") if not (root / sub).is_dir()]
    except OSError as err:  # root unreadable
        raise _unreadable(root, err, FOLDER_LAYOUT) from None
    if missing:
        raise DatasetNotFoundError(f"folder data root {root} is missing {', '.join(missing)}\n{FOLDER_LAYOUT}")
    found = {}
    for sub, suffixes in (("images", FOLDER_IMAGES), ("labels", (".png",))):  # hidden files (macOS's ._NAME) aside
        try:
            paths = [Path(entry.path) for entry in os.scandir(root / sub)]
        except OSError as err:
            raise _unreadable(root / sub, err, FOLDER_LAYOUT) from None
        found[sub] = sorted(p for p in paths if p.suffix.lower() in suffixes and not p.name.startswith("."))
    images, problems = {}, []
    for path in found["images"]:
        if path.stem in images:
            problems.append(f"{path}: a second image named {path.stem} (with {images[path.stem].name}): keep one")
        images.setdefault(path.stem, path)
    labels = {p.stem: p for p in found["labels"]}
    if not images and not labels:
        raise DatasetNotFoundError(f"folder data root {root} holds no image: {root / 'images'} has no "
                                   f"{', '.join(FOLDER_IMAGES)} file and {root / 'labels'} no .png\n{FOLDER_LAYOUT}")
    problems += [f"{images[s]}: no label {root / 'labels' / s}.png" for s in sorted(images.keys() - labels.keys())]
    problems += [f"{labels[s]}: no image {root / 'images' / s}.jpg (or .jpeg, .png)"
                 for s in sorted(labels.keys() - images.keys())]
    for path in (root / "train.txt", root / "val.txt"):  # a listed name with neither file is a missing file
        listed = set(_read_ids(path)) if path.is_file() else set()
        problems += [f"{path}: {s} has no image and no label" for s in sorted(listed - images.keys() - labels.keys())]
    files = {s: (images[s], labels[s]) for s in sorted(images.keys() & labels.keys())}
    counts = _cached_scan(root, "folder_counts.json", [], files, _scan_pair, f"the files of {root}",
                          f"the folder dataset {root}", problems)
    return files, _int_keys(counts)


def _folder_names(root, files, counts):
    """{id: name}: the lines of classes.txt, else ids 1..the largest id in the labels, named by their numbers."""
    found = sorted({c for per_image in counts.values() for c in per_image})
    if not found:
        raise DatasetClassError(f"no label in {root / 'labels'} holds a class id (1..{IGNORE - 1}): every pixel is 0 "
                                f"or {IGNORE}, and {IGNORE} means 'ignore' (write an object mask as 0/1, not 0/255)")
    path = root / "classes.txt"
    if not path.is_file():
        return {c: str(c) for c in range(1, found[-1] + 1)}
    lines = path.read_text(errors="replace").rstrip().splitlines()  # blank lines at the end name nothing
    names = {c: line.strip() for c, line in enumerate(lines, 1)}
    empty = [c for c, name in names.items() if not name]
    if empty or not names:
        raise DatasetClassError(f"{path}: {f'line(s) {empty} are empty' if empty else 'no class name'}; it needs "
                                "one class name a line, line i naming class id i")
    unknown = [c for c in found if c > len(names)]
    if unknown:
        example = next(files[s][1] for s in sorted(counts) if unknown[0] in counts[s])
        raise DatasetClassError(f"the labels of {root} hold class id(s) {unknown}, which {path} does not name (it "
                                f"names {len(names)} classes, ids 1..{len(names)}): e.g. {example} holds {unknown[0]}")
    return names


def _class_label(c, names):
    return str(c) if names[c] == str(c) else f"{c} ({names[c]})"  # '7 (cat)', or '7' when named by its number


def _folder_folds(root, count):
    """The test class ids of the four folds: folds.txt's lines, else four contiguous quarters of 1..count."""
    path = root / "folds.txt"
    if not path.is_file():
        if count < NUM_FOLDS:
            raise DatasetClassError(f"{root} has {count} class(es), too few for {NUM_FOLDS} folds: give "
                                    f"--test-classes, or write {path}")
        folds = tuple(tuple(part.tolist()) for part in np.array_split(np.arange(1, count + 1), NUM_FOLDS))
        parts = [f"fold {k} = {ids[0]}" + (f"..{ids[-1]}" if len(ids) > 1 else "") for k, ids in enumerate(folds)]
        _note_once(f"[data] note: {root} has no folds.txt: fold K tests the K-th of four contiguous quarters of the "
                   f"class ids (PASCAL-5i's rule): {', '.join(parts)}")
        return folds
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if len(lines) != NUM_FOLDS:
        raise DatasetClassError(f"{path} has {len(lines)} line(s); it needs {NUM_FOLDS}, line K the test class ids "
                                f"of fold K (1..{count}, separated by spaces or commas)")
    folds = []
    for k, line in enumerate(lines):
        words = line.replace(",", " ").split()
        if not all(w.isascii() and w.isdigit() and 1 <= int(w) <= count for w in words):
            raise DatasetClassError(f"{path} line {k + 1} {line.strip()!r}: not class ids of {root} (1..{count}, "
                                    "separated by spaces or commas)")
        folds.append(sorted({int(w) for w in words}))
    return folds


def _folder_split(root, files, counts, novel, split, classes, names, shot):
    """The files and counts of `split`: train.txt's minus val.txt's / val.txt's when both exist; else the images
    with a pixel of a novel class (test) / the others (train), so that BAM's filter drops no training image. Every
    test class needs shot + 1 test images over the filter (PASCAL's episodes would repeat supports)."""
    lists = (root / "train.txt", root / "val.txt")
    if lists[0].is_file() != lists[1].is_file():
        have, lack = lists if lists[0].is_file() else lists[::-1]
        raise DatasetNotFoundError(f"{have} without {lack}: give both lists, or neither\n{FOLDER_LAYOUT}")
    if lists[0].is_file():  # every name listed is a pair: _folder_index named the others
        train, val = (set(_read_ids(path)) for path in lists)
        listed = sorted(val) if split == "test" else sorted(train - val)
    else:
        test = {name for name, per_image in counts.items() if any(c in per_image for c in novel)}
        listed = sorted(test) if split == "test" else sorted(counts.keys() - test)
    files, counts = {i: files[i] for i in listed}, {i: counts[i] for i in listed}
    class_files = class_file_lists(counts, classes)[1] if split == "test" else {}
    few = [f"class {_class_label(c, names)} has {len(found)}" for c, found in class_files.items() if len(found) <= shot]
    if few:
        raise DatasetClassError(f"too few test images in {root} for {shot}-shot episodes, which need {shot + 1} "
                                f"images with >= {MIN_FG_PIXELS} pixels of the class (the query and {shot} other "
                                f"images as supports): {'; '.join(few)}. Add images, lower --shot, or choose other "
                                "test classes")
    return files, counts


# ----------------------------------------------------------------------------- files: reading, checking, caches
# bump when the cached per-image counts change meaning (3: every image decoded in full, class ids checked)
CACHE_VERSION = 3
PARALLEL_MIN_FILES = 256  # scan with a process pool from this many files on


def load_image(path, upright=False):
    """RGB image file -> uint8 (3,H,W); DatasetFileError naming a missing, truncated or corrupt file. upright: turned
    as its EXIF orientation says (a user's photos; not the datasets, whose masks were drawn on the stored pixels)."""
    try:
        with Image.open(path) as im:
            rgb = np.array((ImageOps.exif_transpose(im) if upright else im).convert("RGB"))  # decodes it all
    except (OSError, ValueError, SyntaxError) as err:
        raise DatasetFileError(f"cannot read image {path}: {err}") from err
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def load_mask(path):
    """Single-channel label PNG (grayscale or palette indices) -> int64 (H,W)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"mode {im.mode}, expected a single-channel label image")
            label = np.array(im).astype(np.int64)
    except (OSError, ValueError, SyntaxError) as err:
        raise DatasetFileError(f"cannot read label {path}: {err}") from err
    return torch.from_numpy(label)


def _read_ids(path):
    """Ids of a list file: one a line (VOC's lists), or PFENet's 'JPEGImages/X.jpg SegmentationClassAug/X.png'."""
    return [Path(line.split()[0]).stem for line in path.read_text(errors="replace").splitlines() if line.strip()]


def _scan_pair(pair, max_id=IGNORE - 1):
    """(image, label) -> (class pixel counts, None), or (None, "path: what is wrong"): a file does not read, the
    sizes differ, or a class id is outside 1..max_id (0, 255 aside), which would otherwise count as background."""
    image_path, label_path = pair
    try:
        label, (height, width) = _read_pair(pair, load_mask)
    except DatasetFileError as err:
        return None, str(err)
    if tuple(label.shape) != (height, width):
        return None, f"{label_path}: {label.shape[1]}x{label.shape[0]} pixels, its image {image_path} {width}x{height}"
    values = label.numpy().ravel()
    wrong = np.unique(values[(values < 0) | ((values > max_id) & (values != IGNORE))]).tolist()
    if wrong:
        ids = ", ".join(map(str, wrong[:5])) + (", ..." if len(wrong) > 5 else "")
        return None, (f"{label_path}: class id{'s' if len(wrong) > 1 else ''} {ids}; ids are 1..{max_id} "
                      f"(0 background, {IGNORE} ignore)")
    counts = np.bincount(values, minlength=IGNORE + 1)
    return {int(c): int(counts[c]) for c in np.flatnonzero(counts[1:IGNORE]) + 1}, None


def _read_pair(pair, read):
    """(image, label) -> (read(label), the image's (height, width) decoded in full); DatasetFileError "path: why"."""
    image_path, label_path = pair
    try:
        width, height = _decoded_size(image_path)
    except (OSError, ValueError, SyntaxError) as err:
        raise DatasetFileError(f"{image_path}: not a readable image ({err})") from None
    try:
        return read(label_path), (height, width)
    except DatasetFileError as err:
        raise DatasetFileError(re.sub(r"^cannot read \w+ ", "", str(err))) from None


def _decoded_size(path):
    """(width, height) of an image after decoding all its pixels (a header alone would pass a truncated file)."""
    with Image.open(path) as im:
        im.load()
        return im.size


def _cached_scan(root, cache_name, key, files, scan, files_of, what, problems=()):
    """{name: scan(pair)} of files {name: pair}, checked with the `problems` lines (which stop the run, cached or not)
    and cached under `key` and every file's _fingerprint: a changed, added or removed file scans again."""
    digest, missing = _fingerprint(root, [path for pair in files.values() for path in pair])
    cache = _cache_file(root, cache_name)
    key = [CACHE_VERSION, *key, digest]
    found = None if missing else _read_cache(cache, key)
    if found is None:
        whole = {name: pair for name, pair in files.items() if not missing.intersection(pair)}
        scans = _parallel_map(scan, list(whole.values()), f"checking and scanning {files_of}", cache is not None)
        scanned = dict(zip(whole, scans))
        results = [scanned.get(name, (None, [f"{path}: no such file (its list names it)" for path in pair
                                             if path in missing])) for name, pair in files.items()]
        found = dict(zip(files, check_scan(results + [(None, line) for line in problems], what)))
        _write_cache(cache, key, found)
    check_scan([(None, line) for line in problems], what)
    return found


def check_scan(results, what, shown=20):
    """The counts of scan results (counts, problem); DatasetFileError listing every problem (a line, or a list)."""
    bad = [line for _, problem in results if problem for line in ([problem] if isinstance(problem, str) else problem)]
    if bad:
        more = f"\n  ... and {len(bad) - shown} more" if len(bad) > shown else ""
        raise DatasetFileError(f"{len(bad)} bad file(s) in {what}; fix or remove them (and their list entries):\n  "
                               + "\n  ".join(bad[:shown]) + more)
    return [counts for counts, _ in results]


def _parallel_map(fn, items, what, cached):
    """[fn(x) for x in items], over a process pool when there are many, with progress lines."""
    every = max(len(items) // 10, 1)
    print(f"[data] {what}: {len(items)} files" + (" (once; the result is cached)" if cached else ""), flush=True)
    pool = None
    if len(items) >= PARALLEL_MIN_FILES:
        # fork: spawn/forkserver would re-import the caller's __main__ (a flat train.py) in every worker
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        pool = concurrent.futures.ProcessPoolExecutor(min(os.cpu_count() or 1, 16), mp_context=context)
    results = []
    try:
        for i, result in enumerate(pool.map(fn, items, chunksize=32) if pool else map(fn, items), 1):
            results.append(result)
            if i % every == 0:
                print(f"[data] {what}: {i}/{len(items)}", flush=True)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return results


def _cache_places(root):
    """Where a data root's caches go: <root>/.fss_cache, else ~/.cache/fss/<hash of root>."""
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    return root / ".fss_cache", Path.home() / ".cache" / "fss" / digest


def _cache_file(root, name):
    """The cache file `name` in the first writable of _cache_places; None (a note) when neither is writable."""
    places = _cache_places(root)
    folder = _writable_dir(*places)
    if folder is None:
        _note_once(f"[data] note: neither {places[0]} nor {places[1]} can be written: the files are checked again on "
                   "every run (nothing is cached)")
        return None
    return folder / name


@functools.lru_cache(maxsize=None)
def _note_once(line):
    """Print a note on stderr once a process (a run builds its episodes more than once)."""
    print(line, file=sys.stderr, flush=True)


def _writable_dir(*candidates):
    """The first candidate directory that exists (or can be made) and is writable, else None."""
    for path in candidates:
        with contextlib.suppress(OSError):
            path.mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
    return None


def _fingerprint(root, paths):
    """-> (a digest of each file's name under `root`, size, mtime, ctime, inode; {paths not there}). mtime alone would
    not do (cp -p, rsync -a, tar restore it): ctime, which no tool sets, and the inode show a rewrite (as git does)."""
    lines, missing, prefix = [], set(), os.fspath(root)
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError:
            missing.add(path)
            continue
        lines.append(f"{os.fspath(path).removeprefix(prefix)} {_stat_key(stat)}")
    return hashlib.sha1("\n".join(lines).encode()).hexdigest(), missing


def _stat_key(stat):
    return f"{stat.st_size} {stat.st_mtime_ns} {stat.st_ctime_ns} {stat.st_ino}"


def _read_cache(path, key):
    """The cached payload if the file exists and was written under the same key, else None (also for path None)."""
    if path is None:
        return None
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cached, dict) or cached.get("key") != key or "payload" not in cached:
        return None  # another key, or a file that is not a cache: scanned again
    return cached["payload"]


def _write_cache(path, key, payload):
    """Write the cache atomically; one that cannot be written (or path None) stops nothing (a note)."""
    if path is None:
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"key": key, "payload": payload}))
        os.replace(tmp, path)  # atomic: concurrent runs never see half a file
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        print(f"[data] note: could not cache the scan in {path} ({err.strerror or err}): the scan runs again next "
              "time", file=sys.stderr, flush=True)


def _int_keys(counts):
    """JSON turns int keys into strings: {name: {"3": n}} -> {name: {3: n}}."""
    return {name: {int(c): n for c, n in per_image.items()} for name, per_image in counts.items()}


# ----------------------------------------------------------------------------- synthetic images
SHAPES = ("disc", "ring", "triangle", "square", "star", "cross", "crescent", "heart", "hexagon", "bar")
# (name, hue in degrees, texture, texture period as a fraction of the image side)
APPEARANCES = (("red striped", 0, "stripes", 0.05), ("green checkered", 120, "checker", 0.05),
               ("blue dotted", 225, "dots", 0.06), ("yellow graded", 55, "gradient", 0.0),
               ("purple speckled", 280, "speckle", 0.0), ("orange pinstriped", 30, "stripes", 0.03),
               ("cyan checkered", 185, "checker", 0.035), ("magenta dotted", 320, "dots", 0.04),
               ("teal graded", 160, "gradient", 0.0), ("olive wavy", 75, "waves", 0.05))
# class id -> (shape, appearance index). Classes c and c+10 share a shape; every appearance is used by two
# classes of different folds, so only shape AND appearance together identify a class.
SYNTHETIC_CLASSES = {c: (SHAPES[(c - 1) % 10], ((c - 1) % 10 + 3 * ((c - 1) // 10)) % 10) for c in range(1, 21)}
HUE_JITTER = 15.0  # degrees; neighbouring appearance hues overlap a little
RADIUS_RANGE = (0.09, 0.2)  # object radius as a fraction of the image side
MIN_VISIBLE = 0.004  # the episode class covers at least this fraction of every image


def render_synthetic(rng, class_id, distractor_classes, size):
    """One image with 1-3 objects of class_id and 0-2 of distractor_classes, in random order, over a smooth
    background with unlabelled clutter -> img float32 (3,size,size) in [0,1], exact label int64 (size,size)."""
    noise = rng.standard_normal((size, size), dtype=np.float32)  # (H,W) grain and speckle
    # smooth background: a low-saturation base colour plus two separable low-frequency waves per channel
    axis = np.arange(size, dtype=np.float32) / size
    freq = rng.uniform(0.5, 3.0, (2, 3, 2, 1)).astype(np.float32) * 2 * np.pi  # cycles per image side
    phase = rng.uniform(0, 2 * np.pi, (2, 3, 2, 1)).astype(np.float32)
    waves_y, waves_x = np.cos(freq[0] * axis + phase[0]), np.cos(freq[1] * axis + phase[1])  # (3,2,H), (3,2,W)
    amplitude = rng.uniform(0.05, 0.2, (3, 2)).astype(np.float32)
    img = np.einsum("ck,ckh,ckw->chw", amplitude, waves_y, waves_x)  # (3,H,W)
    img += _random_rgb(rng, sat=(0.0, 0.35), val=(0.3, 0.8))[:, None, None]
    for _ in range(rng.integers(1, 4)):  # clutter lines: thin rectangles, half-width >= 0.75 pixel
        sx, sy = rng.uniform(0.15, 0.5) * size, max(0.75, rng.uniform(0.004, 0.012) * size)
        box, du, dv = _object_frame(rng, size, sx, sy, 1.05)
        inside = (np.abs(du) <= sx) & (np.abs(dv) <= sy)
        img[(slice(None), *box)] = np.where(inside, _random_rgb(rng, sat=(0.1, 0.9))[:, None, None],
                                            img[(slice(None), *box)])
    for _ in range(rng.integers(1, 4)):  # clutter ellipses, speckled
        sx, sy = rng.uniform(0.05, 0.15, 2) * size
        box, du, dv = _object_frame(rng, size, sx, sy, 1.05)
        inside = (du / sx) ** 2 + (dv / sy) ** 2 <= 1
        colour = _random_rgb(rng, sat=(0.1, 0.9))[:, None, None] * (0.8 + 0.2 * noise[box])
        img[(slice(None), *box)] = np.where(inside, colour, img[(slice(None), *box)])
    label = np.zeros((size, size), np.int64)
    objects = [class_id] * int(rng.integers(1, 4))
    if len(distractor_classes):
        objects += list(rng.choice(distractor_classes, int(rng.integers(0, 3))))
    for c in rng.permutation(objects):  # random occlusion order
        _paint_object(img, label, noise, int(c), rng)
    for _ in range(10):  # a distractor may hide the episode class: paint one more on top until it shows
        if (label == class_id).sum() >= MIN_VISIBLE * size * size:
            break
        _paint_object(img, label, noise, class_id, rng)
    img = img * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1) + 0.03 * noise  # contrast, brightness, grain
    return torch.from_numpy(np.clip(img, 0, 1).astype(np.float32)), torch.from_numpy(label)


def _paint_object(img, label, noise, class_id, rng):
    """Paint one object of class_id on img (3,H,W) float and label (H,W), in place."""
    size = label.shape[0]
    shape, look = SYNTHETIC_CLASSES[class_id]
    _, hue, kind, period = APPEARANCES[look]
    radius, aspect = rng.uniform(*RADIUS_RANGE) * size, math.exp(rng.uniform(-0.3, 0.3))
    sx, sy = radius * math.sqrt(aspect), radius / math.sqrt(aspect)
    box, du, dv = _object_frame(rng, size, sx, sy, 1.15)
    u, v = du / sx, dv / sy
    inside = _shape_inside(shape, u, v)  # (h,w)
    tu, tv = du / size + rng.uniform(0, 1), dv / size + rng.uniform(0, 1)  # random texture phase
    shade = 0.35 + 0.65 * _texture(kind, period, tu, tv, u, noise[box])  # (h,w)
    colour = _random_rgb(rng, hue)[:, None, None] * shade  # (3,h,w)
    img[(slice(None), *box)] = np.where(inside, colour, img[(slice(None), *box)])
    label[box][inside] = class_id


def _object_frame(rng, size, sx, sy, extent):
    """Random centre and rotation of a shape with semi-axes sx, sy (pixels) -> (box slices, offsets du, dv (h,w)
    along the shape's rotated axes), the box holding everything within extent * max(sx, sy)."""
    angle = rng.uniform(0, 2 * np.pi)
    cx, cy = rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.9) * size
    reach = extent * max(sx, sy)
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, size)
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, size)
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy  # (h,1)
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx  # (1,w)
    du, dv = np.cos(angle) * dx + np.sin(angle) * dy, -np.sin(angle) * dx + np.cos(angle) * dy  # (h,w)
    return (slice(y0, y1), slice(x0, x1)), du, dv

def _random_rgb(rng, hue=None, sat=(0.6, 0.95), val=(0.6, 1.0)):
    hue = rng.uniform(0, 360) if hue is None else hue + rng.uniform(-HUE_JITTER, HUE_JITTER)
    return np.array(colorsys.hsv_to_rgb(hue / 360 % 1, rng.uniform(*sat), rng.uniform(*val)), np.float32)


def _texture(kind, period, tu, tv, u, noise):
    """Brightness pattern in [0,1]; tu, tv are object-frame coordinates in image sides, u the unit frame."""
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(2 * np.pi * tu / period)
    if kind == "checker":
        return ((np.floor(tu / period) + np.floor(tv / period)) % 2).astype(np.float32)
    if kind == "dots":
        du, dv = tu / period - np.round(tu / period), tv / period - np.round(tv / period)
        return 0.25 + 0.75 * (du * du + dv * dv < 0.09)
    if kind == "gradient":
        return np.clip(0.5 + 0.5 * u, 0, 1)
    if kind == "waves":
        return 0.5 + 0.5 * np.sin(2 * np.pi / period * (tu + 0.3 * period * np.sin(2 * np.pi * tv / period)))
    return np.clip(0.5 + 0.35 * noise, 0, 1)  # speckle


def _shape_inside(shape, u, v):
    """Inside test of a unit-size shape in its own frame (u right, v down) -> bool array."""
    rho2 = u * u + v * v
    if shape == "disc":
        return rho2 <= 1
    if shape == "ring":
        return (rho2 <= 1) & (rho2 >= 0.55 ** 2)
    if shape in ("triangle", "square", "hexagon"):  # regular n-gon, circumradius 1
        n = {"triangle": 3, "square": 4, "hexagon": 6}[shape]
        phi = np.arctan2(v, u) % (2 * np.pi / n) - np.pi / n
        return np.sqrt(rho2) * np.cos(phi) <= np.cos(np.pi / n)
    if shape == "star":  # 5 points, inner radius 0.4
        tip = np.abs((np.arctan2(v, u) * 5 / (2 * np.pi)) % 1 - 0.5) * 2  # 1 at a tip, 0 between two tips
        return np.sqrt(rho2) <= 0.4 + 0.6 * tip ** 2
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1))
    if shape == "crescent":
        return (rho2 <= 1) & ((u - 0.45) ** 2 + v * v >= 0.75 ** 2)
    if shape == "heart":
        x, y = 1.1 * u, 0.15 - 1.1 * v
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    return u * u + (v / 0.35) ** 2 <= 1  # bar: an elongated ellipse
