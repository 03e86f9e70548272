"""
Training images: prepared once into a flat uint8 file at the target resolution, then memory-mapped.

Decoding 200K JPEGs every epoch would dominate training, so (as nanoGPT does with tokens) each dataset is
converted once to an (N, res, res, C) uint8 array on disk and every run, and every DDP rank, maps that file.

    data = load_dataset("celeba", 64, data_dir="path/to/celeba")   # prepares the cache on the first call
    x, y = get_batch(data, 128, generator, "cuda")                 # x in [-1, 1], NCHW, randomly flipped

Under DDP, call prepare_dataset(...) on rank 0 alone, then a barrier, then load_dataset(...) on every rank.

A cache is reused only while the files it was made from are unchanged: its metadata holds a fingerprint of the
sorted file names with their sizes and modification times (zip members: sizes and CRCs), taken by stat alone, so
replacing, adding or removing an image rebuilds it, in place. The fingerprint is also part of ImageData.key, so
FID statistics keyed by it follow the images.

User errors (a missing or misnamed dataset, damaged files, a cache that cannot be written) are raised as
ValueError or FileNotFoundError with a one-line message saying what to do; the scripts print it without a
traceback. Warnings (warnings.warn, once per case): unreadable images skipped and images upscaled, when a cache
is built; fewer than MIN_IMAGES images, at every load.
"""

import gzip
import hashlib
import io
import json
import math
import os
import re
import shutil
import struct
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

DATASETS = ("celeba", "imagenet", "folder", "mnist", "fashion_mnist")
PREP_VERSION = 1  # part of every cache key: bump it whenever the preprocessing changes, so old caches rebuild
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MIN_IMAGES = 100  # fewer images warn at every load: a diffusion model trained on so few memorises them
BUNDLED_FASHION_MNIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "fashion_mnist")
MNIST_DOWNLOAD_DIR = os.path.join("cache", "mnist")  # where MNIST goes when no data_dir is given
MNIST_URLS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}
HINTS = {  # how to get each dataset: appended to every "not found" message
    "celeba": "download 'Align&Cropped Images' (img_align_celeba.zip) and, for the official train split, "
    "list_eval_partition.txt from the official CelebA site (mmlab.ie.cuhk.edu.hk/projects/CelebA.html), then "
    "point data_dir at the folder holding them: DIR/img_align_celeba/000001.jpg ... (or DIR/img_align_celeba.zip) "
    "and DIR/list_eval_partition.txt",
    "imagenet": "point data_dir at an ImageNet folder laid out as train/<class>/*.JPEG (or at train/ itself)",
    "folder": "point data_dir at a folder of images (" + ", ".join(IMAGE_EXTENSIONS) + "; subfolders are searched)",
    "mnist": "put train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz (or the t10k-... pair) from "
    + MNIST_URLS["mnist"] + " in data_dir",
    "fashion_mnist": "put train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz (or the t10k-... pair) from "
    + MNIST_URLS["fashion_mnist"] + " in data_dir",
}


# -----------------------------------------------------------------------------
# the prepared data and batches from it


@dataclass
class ImageData:
    images: np.ndarray  # (N, res, res, C) uint8, memory-mapped
    labels: np.ndarray | None  # (N,) int64 class labels, or None when unlabelled
    num_classes: int  # 0 when unlabelled
    key: str  # names dataset, split, size, resolution, preprocessing version and the files' fingerprint (see the
    # header); also keys FID statistics, so they are recomputed when the images change

    @property
    def res(self):
        return self.images.shape[1]

    @property
    def channels(self):
        return self.images.shape[3]

    def __len__(self):
        return len(self.images)


def get_batch(data, batch_size, generator, device):
    """Random images (with replacement) as float32 NCHW in [-1, 1], each flipped left-right with chance 1/2.
    generator is a CPU torch.Generator; give each DDP rank its own seed."""
    # sorted indices read the memory-mapped file nearly sequentially; batch order does not matter for training
    index = torch.randint(len(data), (batch_size,), generator=generator).sort().values.numpy()
    flip = torch.rand(batch_size, generator=generator) < 0.5
    x = torch.from_numpy(data.images[index])
    y = None if data.labels is None else torch.from_numpy(data.labels[index])
    cuda = torch.device(device).type == "cuda"
    if cuda:  # pinned memory lets the copy run asynchronously; uint8 is a quarter of the bytes of float32
        x = x.pin_memory()
    x = x.to(device, non_blocking=cuda)
    x = torch.where(flip.to(device)[:, None, None, None], x.flip(2), x)  # dim 2 is the width in NHWC
    if y is not None:
        y = y.to(device, non_blocking=cuda)
    return from_uint8_images(x), y


def spread_indices(size, n):
    """n indices spread evenly over 0 .. size-1, the first and last included (at most size of them)."""
    return np.linspace(0, size - 1, min(n, size)).round().astype(np.int64)


def from_uint8_images(x):
    """uint8 NHWC images (a tensor) -> float32 NCHW in [-1, 1], the scale the models work in."""
    return x.permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1


def to_uint8_images(x):
    """Inverse of get_batch's scaling: [-1, 1] NCHW tensor -> uint8 NHWC numpy array (values outside are clipped)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(x, path, nrow=None):
    """Save a [-1, 1] NCHW batch as one PNG grid (nrow images per row, square by default), 2-px gaps."""
    images = to_uint8_images(x)
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + 2) + 2, nrow * (w + 2) + 2, c), 255, np.uint8)
    for k, image in enumerate(images):
        top, left = 2 + (k // nrow) * (h + 2), 2 + (k % nrow) * (w + 2)
        grid[top:top + h, left:left + w] = image
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


# -----------------------------------------------------------------------------
# preprocessing


def center_crop(image, res):
    """ADM's centre crop: BOX-halve while the short side stays >= 2*res (cheap, alias-free), then one BICUBIC
    resize bringing the short side to res, then cut the central res x res square."""
    while min(image.size) >= 2 * res:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = res / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    left, top = (image.width - res) // 2, (image.height - res) // 2
    return image.crop((left, top, left + res, top + res))


_archive = None  # the zip the images are read from, opened once per worker process (a ZipFile can't be shared)


def _open_archive(path):
    global _archive
    _archive = zipfile.ZipFile(path) if path else None


def _image_from_file(item, res, mode):
    """Decode one image file (a path, or a member of the open zip) and centre-crop it: (pixels, (width, height) of
    the file), or None if unreadable."""
    try:
        with Image.open(io.BytesIO(_archive.read(item)) if _archive else item) as image:
            return np.asarray(center_crop(image.convert(mode), res)), image.size
    except Exception:  # decoders raise many kinds of error on corrupt files; the caller reports which were skipped
        return None


def _image_from_pixels(pixels, res, mode):
    image = Image.fromarray(pixels)
    return np.asarray(center_crop(image.convert(mode), res)), image.size


# -----------------------------------------------------------------------------
# where each dataset's images come from


@dataclass
class Source:
    split: str  # which subset: "train", "all", "t10k", or the folder's name
    root: str  # the data folder; the default cache goes inside it
    items: list  # what convert takes: file paths, zip member names or pixel arrays
    names: list  # a readable name per item (its file, relative to root), for messages and the cache metadata
    convert: Callable  # (item, res, mode) -> ((res, res[, C]) uint8 array, (width, height) before), None if unreadable
    fingerprint: str  # hash of the source files' names, sizes and versions (see _fingerprint); the cache checks it
    mode: str = "RGB"  # PIL mode of the prepared images: "RGB" or "L"
    labels: np.ndarray | None = None
    num_classes: int = 0
    archive: str | None = None  # the zip holding the items
    note: str = ""  # told to the user when the cache is built
    usual_res: int = 0  # the res this dataset's small images are normally upscaled to (MNIST: 28 -> 32 px): no warning


def _is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _list_images(folder):
    """Image files under folder (recursively) as relative paths, in a stable sorted order."""
    names = []
    for parent, _, files in os.walk(folder):
        names += [os.path.relpath(os.path.join(parent, f), folder) for f in files if _is_image(f)]
    return sorted(names)


def _require_folder(dataset, data_dir):
    if data_dir is None:
        raise ValueError(f"dataset {dataset!r} needs data_dir (--data_dir): {HINTS[dataset]}")
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise _not_a_folder(dataset, data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data folder {data_dir} does not exist: {HINTS[dataset]}")


def _not_a_folder(dataset, data_dir):
    """The error for a data_dir that is a file: say so, and name the folder it lies in."""
    parent = os.path.dirname(os.path.abspath(data_dir))
    if dataset == "celeba" and data_dir.lower().endswith(".zip"):
        return FileNotFoundError(f"data_dir {data_dir} is a file but not a readable zip archive (an incomplete "
                                 f"download?): download it again, or point data_dir at a folder; {HINTS[dataset]}")
    return FileNotFoundError(f"data_dir {data_dir} is a file, not a folder: point data_dir at a folder (this file "
                             f"lies in {parent}); {HINTS[dataset]}")


def _one_line(error):
    """An exception's text on one line, for messages that quote it."""
    return " ".join(str(error).split())


def _fingerprint(rows):
    """A short hash of (name, size, version) rows in a stable order: what the cache checks its files against."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(("\t".join(map(str, row)) + "\n").encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]


def _file_stamps(paths, names):
    """(name, size, modification time in ns) of each file, by stat alone: about a second for 200K files, and any
    replaced, added or removed file changes the list."""
    rows = []
    for path, name in zip(paths, names):
        try:
            info = os.stat(path)
            rows.append((name, info.st_size, info.st_mtime_ns))
        except OSError:  # a broken link: preparation skips it as unreadable, and its name still counts
            rows.append((name, -1, -1))
    return rows


def _open_zip(path):
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path} is not a readable zip archive ({_one_line(e)}): download it again; "
                         f"{HINTS['celeba']}") from None


def _celeba_source(data_dir):
    root, folder, archive = _celeba_location(data_dir)
    if archive:
        with _open_zip(archive) as z:
            members = {info.filename: info for info in z.infolist() if _is_image(info.filename)}
        names = sorted(members)
    else:
        names = _list_images(folder)
    partition_file = os.path.join(root, "list_eval_partition.txt")
    if os.path.isfile(partition_file):
        train = _celeba_train_files(partition_file)
        split, kept = "train", [n for n in names if os.path.basename(n) in train]
        note = f"celeba: official train split from list_eval_partition.txt, {len(kept)} of {len(names)} images"
    else:
        split, kept = "all", names
        note = f"celeba: no list_eval_partition.txt in {root}, so using every image ({len(names)})"
    if archive:  # the CRCs of the central directory identify each member without decompressing it
        items, stamps = kept, [(n, members[n].file_size, members[n].CRC) for n in kept]
    else:
        items = [os.path.join(folder, n) for n in kept]
        stamps = _file_stamps(items, kept)
    return Source(split, root, items, kept, _image_from_file, _fingerprint(stamps), archive=archive, note=note)


def _celeba_location(data_dir):
    """(root, image folder, zip) for a data_dir naming the zip, the image folder, or the folder holding either;
    root is where list_eval_partition.txt would be."""
    if data_dir is not None and os.path.isfile(data_dir) and zipfile.is_zipfile(data_dir):
        return os.path.dirname(os.path.abspath(data_dir)), None, data_dir
    _require_folder("celeba", data_dir)
    if os.path.isdir(os.path.join(data_dir, "img_align_celeba")):
        return data_dir, os.path.join(data_dir, "img_align_celeba"), None
    if os.path.isfile(os.path.join(data_dir, "img_align_celeba.zip")):
        return data_dir, None, os.path.join(data_dir, "img_align_celeba.zip")
    return os.path.dirname(os.path.abspath(data_dir)), data_dir, None  # data_dir is the image folder itself


def _celeba_train_files(partition_file):
    """File names in partition 0 (train) of list_eval_partition.txt, whose lines read '000001.jpg 0'."""
    train = set()
    with open(partition_file, errors="replace") as f:
        for number, line in enumerate(f, start=1):
            row = line.split()
            if row and (len(row) != 2 or row[1] not in ("0", "1", "2")):
                raise ValueError(f"{partition_file} line {number} reads {line.strip()[:60]!r}, not "
                                 f"'<file> <partition>' such as '000001.jpg 0': replace it with the official file; "
                                 f"{HINTS['celeba']}")
            if row and row[1] == "0":
                train.add(row[0])
    return train


def _imagenet_source(data_dir):
    _require_folder("imagenet", data_dir)
    train = os.path.join(data_dir, "train") if os.path.isdir(os.path.join(data_dir, "train")) else data_dir
    classes = sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d)))
    names, labels = [], []
    for label, name in enumerate(classes):
        files = _list_images(os.path.join(train, name))
        names += [os.path.join(name, f) for f in files]
        labels += [label] * len(files)
    items = [os.path.join(train, n) for n in names]
    root = os.path.dirname(os.path.abspath(train))
    return Source("train", root, items, names, _image_from_file, _fingerprint(_file_stamps(items, names)),
                  labels=np.array(labels, np.int64), num_classes=len(classes))


def _folder_source(data_dir):
    _require_folder("folder", data_dir)
    names = _list_images(data_dir)
    split = re.sub(r"[^A-Za-z0-9_.]+", "_", os.path.basename(os.path.abspath(data_dir)))  # "-" separates key parts
    items = [os.path.join(data_dir, n) for n in names]
    return Source(split, data_dir, items, names, _image_from_file, _fingerprint(_file_stamps(items, names)))


def _idx_source(dataset, data_dir):
    """MNIST-style idx.gz files: the train pair when present, else the t10k pair, else download the train pair."""
    default = BUNDLED_FASHION_MNIST if dataset == "fashion_mnist" else MNIST_DOWNLOAD_DIR
    folder = data_dir or default
    if data_dir is not None and os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise _not_a_folder(dataset, data_dir)
    for split in ("train", "t10k"):
        paths = _idx_paths(folder, split)
        if all(os.path.isfile(p) for p in paths):
            break
    else:
        split, paths = "train", _download_idx(dataset, folder)
    pixels, labels = (_read_idx(p) for p in paths)
    if pixels.ndim != 3 or labels.ndim != 1:
        raise ValueError(f"{paths[0]} holds an array of shape {pixels.shape} and {paths[1]} one of {labels.shape}, "
                         f"not (N, height, width) images and (N,) labels; {HINTS[dataset]}")
    if len(pixels) != len(labels):
        raise ValueError(f"{paths[0]} has {len(pixels)} images but {paths[1]} has {len(labels)} labels: "
                         f"the two files belong to different sets; {HINTS[dataset]}")
    image_file = os.path.basename(paths[0])
    note = "" if split == "train" else f"{dataset}: no train files in {folder}, so using the {len(pixels)} t10k images"
    stamps = _file_stamps(paths, [os.path.basename(p) for p in paths])
    return Source(split, folder, list(pixels), [f"{image_file}[{i}]" for i in range(len(pixels))],
                  _image_from_pixels, _fingerprint(stamps), mode="L", labels=labels.astype(np.int64),
                  num_classes=int(labels.max()) + 1 if len(labels) else 0, note=note, usual_res=32)


def _idx_paths(folder, split):
    return tuple(os.path.join(folder, f"{split}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1"))


def _download_idx(dataset, folder):
    paths = _idx_paths(folder, "train")
    try:
        os.makedirs(folder, exist_ok=True)
        for path in paths:
            if not os.path.isfile(path):
                url = MNIST_URLS[dataset] + os.path.basename(path)
                print(f"downloading {url}")
                _download(url, path)
    except OSError as e:  # also catches urllib's URLError when offline
        raise FileNotFoundError(f"no {dataset} files in {folder} and downloading them failed ({_one_line(e)}): "
                                f"{HINTS[dataset]}") from e
    return paths


def _download(url, path):
    part = path + ".part"  # never leave a half-downloaded file under the real name
    with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
        shutil.copyfileobj(response, f)
    os.replace(part, path)


def _read_idx(path):
    """An idx.gz file of unsigned bytes as an array: 2 zero bytes, type 0x08, ndim, then ndim big-endian sizes."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except PermissionError:
        raise  # not damage: _find_source reports it
    except (OSError, EOFError) as e:
        raise ValueError(f"{path} is damaged ({_one_line(e)}); delete it and download it again") from e
    ndim = raw[3] if len(raw) > 4 else 0
    if raw[:3] != b"\x00\x00\x08" or ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path} is not an idx file of unsigned bytes; delete it and download it again")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    if len(raw) - 4 - 4 * ndim != np.prod(shape):
        raise ValueError(f"{path} is truncated (header says {shape}); delete it and download it again")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_source(name, data_dir):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; the known datasets are: {', '.join(DATASETS)}")
    try:
        if name in ("mnist", "fashion_mnist"):
            source = _idx_source(name, data_dir)
        else:
            source = {"celeba": _celeba_source, "imagenet": _imagenet_source, "folder": _folder_source}[name](data_dir)
    except PermissionError as e:
        raise ValueError(f"no permission to read {e.filename}: make the {name} files readable; {HINTS[name]}") from None
    if not source.items:
        raise FileNotFoundError(f"no {name} images found in {data_dir or source.root}: {HINTS[name]}")
    return source


# -----------------------------------------------------------------------------
# the cache: <name>.uint8 (the images), <name>.labels.npy, and <name>.json, written last, which marks it complete.
# <name> is the key without the fingerprint, so a rebuild for changed files replaces the old cache instead of
# leaving it beside the new one (CelebA at 256 px is 39 GB).


def prepare_dataset(name, res, data_dir=None, cache_dir=None, workers=None):
    """Build the cache for this dataset at res x res unless a current one exists (see the header); return the path
    of its JSON.
    cache_dir defaults to cache/ inside the data folder when that is writable, else ./cache.
    workers: processes decoding images (None: one per CPU; 0 or 1: decode in this process)."""
    if not isinstance(res, int) or res < 1 or res & (res - 1):
        raise ValueError(f"resolution {res!r} is not a power of two; use one such as 32, 64, 128 or 256")
    source = _find_source(name, data_dir)
    stem = f"{name}-{source.split}-{len(source.items)}-{res}px-v{PREP_VERSION}"
    meta_path = os.path.join(cache_dir or _default_cache_dir(source.root), stem + ".json")
    if not _is_current(meta_path, source.fingerprint):
        key = f"{stem}-{source.fingerprint}"
        _build_cache(source, res, meta_path, key, os.cpu_count() if workers is None else workers)
    return meta_path


def load_dataset(name, res, data_dir=None, cache_dir=None, workers=None):
    """The dataset at res x res as memory-mapped uint8 images (prepared on the first call, see prepare_dataset)."""
    meta_path = prepare_dataset(name, res, data_dir, cache_dir, workers)
    meta = _read_meta(meta_path)
    folder = os.path.dirname(meta_path)
    images = np.memmap(os.path.join(folder, meta["images"]), np.uint8, mode="r", shape=tuple(meta["shape"]))
    labels = np.load(os.path.join(folder, meta["labels"])) if meta["labels"] else None
    # every rank of a torchrun job loads the data: one warning is enough
    if len(images) < MIN_IMAGES and os.environ.get("RANK", "0") == "0":
        warnings.warn(f"only {len(images)} image{'s' if len(images) != 1 else ''} in {meta['source']} (fewer than "
                      f"{MIN_IMAGES}): a diffusion model trained on so few memorises them; use a larger dataset for "
                      f"samples that generalise")
    return ImageData(images, labels, meta["num_classes"], meta["key"])


def _read_meta(meta_path):
    """The cache's metadata, or None when it is missing or not readable JSON."""
    try:
        with open(meta_path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_current(meta_path, fingerprint):
    """Whether the cache at meta_path is complete and was made from the files that fingerprint describes."""
    meta = _read_meta(meta_path)
    try:
        if meta.get("fingerprint") != fingerprint:
            return False
        folder = os.path.dirname(meta_path)
        images, labels = os.path.join(folder, meta["images"]), meta["labels"]
        return (os.path.isfile(images) and os.path.getsize(images) == math.prod(meta["shape"])
                and (labels is None or os.path.isfile(os.path.join(folder, labels))))
    except (AttributeError, KeyError, TypeError):  # not metadata this module wrote
        return False


def _default_cache_dir(root):
    inside = os.path.join(root, "cache")
    return inside if _is_writable(inside if os.path.isdir(inside) else root) else "cache"


def _is_writable(folder):
    # root passes os.access everywhere, so also honour the folder's own write bits (a shared read-only data set)
    return os.access(folder, os.W_OK) and bool(os.stat(folder).st_mode & 0o222)


def _convert_all(source, res, workers):
    """Each item as a uint8 array (None where unreadable), in order; decoded by a process pool when workers > 1."""
    convert = partial(source.convert, res=res, mode=source.mode)
    if workers <= 1:
        _open_archive(source.archive)
        yield from map(convert, source.items)
        _open_archive(None)
        return
    # fork, not spawn: spawned workers would re-run the caller's script (train.py) from the top
    with get_context("fork").Pool(workers, initializer=_open_archive, initargs=(source.archive,)) as pool:
        yield from pool.imap(convert, source.items, chunksize=64)


def _build_cache(source, res, meta_path, key, workers):
    if source.note:
        print(source.note)
    base = meta_path[: -len(".json")]
    temp = f".tmp{os.getpid()}"  # work under temporary names, renamed only once complete
    try:
        os.makedirs(os.path.dirname(meta_path) or ".", exist_ok=True)
        if os.path.isfile(meta_path):  # a stale cache: unmark it first, so that no crash leaves it beside new pixels
            os.remove(meta_path)
        meta = _write_cache(source, res, base, key, temp, workers)
        with open(meta_path + temp, "w") as f:
            json.dump(meta, f)
        os.replace(meta_path + temp, meta_path)
    except OSError as e:  # no room, no write access, or a file where the folder should be
        for path in (base + ".uint8" + temp, base + ".labels.npy" + temp, meta_path + temp):
            if os.path.isfile(path):
                os.remove(path)
        raise ValueError(f"could not write the cache {base}.uint8 ({_one_line(e)}): free some space or pass a "
                         f"writable cache_dir (--cache_dir)") from None


def _write_cache(source, res, base, key, temp, workers):
    """Convert every item into base.uint8 (and base.labels.npy); warn about what was skipped or upscaled; return
    the metadata."""
    kept, skipped, upscaled, smallest = [], [], 0, None
    with open(base + ".uint8" + temp, "wb") as f:  # streamed to disk: full CelebA at 256 px is 39 GB
        images = _convert_all(source, res, workers)
        for i, image in enumerate(tqdm(images, total=len(source.items), desc=f"preparing {key}", unit="img")):
            if image is None:
                skipped.append(source.names[i])
                continue
            pixels, size = image
            f.write(pixels.tobytes())
            kept.append(i)
            if min(size) < res:  # center_crop upsamples its short side to res: softer than the other images
                upscaled += 1
                smallest = size if smallest is None or (min(size), size) < (min(smallest), smallest) else smallest
    if not kept:
        os.remove(base + ".uint8" + temp)
        raise ValueError(f"none of the {len(skipped)} images in {source.root} could be read "
                         f"(e.g. {', '.join(skipped[:3])}); check that they are complete image files")
    if skipped:
        more = ", ..." if len(skipped) > 5 else ""
        warnings.warn(f"skipped {len(skipped)} unreadable images of {len(source.items)} in {source.root}: "
                      f"{', '.join(skipped[:5])}{more}")
    if upscaled and res != source.usual_res:
        warnings.warn(f"upscaled {upscaled} of {len(kept)} images in {source.root} whose short side is below {res} px "
                      f"(smallest {smallest[0]}x{smallest[1]}); they come out blurred: prepare a lower res or use "
                      f"larger images")
    os.replace(base + ".uint8" + temp, base + ".uint8")
    if source.labels is not None:
        with open(base + ".labels.npy" + temp, "wb") as f:
            np.save(f, source.labels[kept])
        os.replace(base + ".labels.npy" + temp, base + ".labels.npy")
    name = os.path.basename(base)
    channels = 1 if source.mode == "L" else 3
    return dict(key=key, fingerprint=source.fingerprint, shape=[len(kept), res, res, channels],
                images=name + ".uint8", labels=name + ".labels.npy" if source.labels is not None else None,
                num_classes=source.num_classes, source=os.path.abspath(source.root),
                files=[source.names[i] for i in kept], skipped=skipped, upscaled=upscaled)
