import gzip
import io
import json
import os
import re
import struct
import urllib.error
import urllib.request
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import data

RES = 8
# The tests' datasets are tiny and some images small: the tests of those two warnings record them themselves.
pytestmark = [pytest.mark.filterwarnings("ignore:only [0-9]+ images? in"),
              pytest.mark.filterwarnings("ignore:upscaled")]


def noise_image(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_images(folder, names, size=(20, 26)):
    """Noise images at folder/name (format from the extension); returns what preparation should make of each."""
    os.makedirs(folder, exist_ok=True)
    expected = []
    for seed, name in enumerate(names):
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        noise_image(*size, seed).save(path)
        with Image.open(path) as image:  # JPEG is lossy: compare with the decoded file
            expected.append(np.asarray(data.center_crop(image.convert("RGB"), RES)))
    return np.stack(expected)


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_idx_pair(folder, split, pixels, labels):
    os.makedirs(folder, exist_ok=True)
    write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte.gz"), pixels)
    write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte.gz"), labels)


def load(name, data_dir, tmp_path, res=RES, **kwargs):
    data_dir = None if data_dir is None else str(data_dir)
    return data.load_dataset(name, res, data_dir, cache_dir=str(tmp_path / "cache"), workers=1, **kwargs)


# -----------------------------------------------------------------------------
# preprocessing


@pytest.mark.parametrize("size, res, steps", [
    # 178x218 (CelebA's shape) to 32: two BOX halvings (89x109, 44x54), BICUBIC to 32x39, keep rows 3..34
    ((178, 218), 32, lambda im: im.resize((89, 109), Image.BOX).resize((44, 54), Image.BOX)
     .resize((32, 39), Image.BICUBIC).crop((0, 3, 32, 35))),
    # wide 62x30 to 8: one halving (31x15), BICUBIC to 17x8 (16.53 rounds up), keep columns 4..11
    ((62, 30), 8, lambda im: im.resize((31, 15), Image.BOX).resize((17, 8), Image.BICUBIC).crop((4, 0, 12, 8))),
    # MNIST's 28x28 to 32: no halving, BICUBIC upsampling only
    ((28, 28), 32, lambda im: im.resize((32, 32), Image.BICUBIC)),
])
def test_center_crop_matches_direct_pil_steps(size, res, steps):
    image = noise_image(*size, seed=0)
    assert np.array_equal(np.asarray(data.center_crop(image, res)), np.asarray(steps(image)))


# -----------------------------------------------------------------------------
# each format


CELEBA_NAMES = ["000001.jpg", "000002.jpg", "000003.jpg", "000004.jpg"]


def test_celeba_folder_without_partition_uses_every_image(tmp_path, capsys):
    expected = write_images(tmp_path / "celeba" / "img_align_celeba", CELEBA_NAMES)
    d = load("celeba", tmp_path / "celeba", tmp_path)
    assert "every image" in capsys.readouterr().out
    assert d.images.shape == (4, RES, RES, 3) and d.images.dtype == np.uint8
    assert (d.res, d.channels, len(d), d.labels, d.num_classes) == (RES, 3, 4, None, 0)
    assert re.fullmatch(f"celeba-all-4-{RES}px-v{data.PREP_VERSION}-[0-9a-f]{{16}}", d.key)  # the files' fingerprint
    assert np.array_equal(d.images, expected)
    # data_dir may also name the image folder itself
    d2 = data.load_dataset("celeba", RES, str(tmp_path / "celeba" / "img_align_celeba"),
                           cache_dir=str(tmp_path / "cache2"), workers=1)
    assert d2.key == d.key and np.array_equal(d2.images, expected)


def test_celeba_partition_file_keeps_the_train_split(tmp_path):
    expected = write_images(tmp_path / "img_align_celeba", CELEBA_NAMES)
    (tmp_path / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 1\n000003.jpg 0\n000004.jpg 2\n")
    d = load("celeba", tmp_path, tmp_path)
    assert d.key.startswith("celeba-train-2-")
    assert np.array_equal(d.images, expected[[0, 2]])


def test_celeba_zip_matches_the_folder_also_with_a_process_pool(tmp_path):
    folder = tmp_path / "unzipped" / "img_align_celeba"
    expected = write_images(folder, CELEBA_NAMES)
    archive = tmp_path / "zipped" / "img_align_celeba.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as z:
        for name in CELEBA_NAMES:
            z.write(folder / name, f"img_align_celeba/{name}")
    by_folder = data.load_dataset("celeba", RES, str(archive.parent), cache_dir=str(tmp_path / "c1"), workers=1)
    by_file = data.load_dataset("celeba", RES, str(archive), cache_dir=str(tmp_path / "c2"), workers=2)
    assert np.array_equal(by_folder.images, expected) and np.array_equal(by_file.images, expected)


def test_imagenet_labels_come_from_sorted_class_folders(tmp_path):
    expected = write_images(tmp_path / "train", ["zebra/z1.JPEG", "ant/a1.JPEG", "ant/a2.JPEG"])
    d = load("imagenet", tmp_path, tmp_path)
    assert d.labels.dtype == np.int64 and d.labels.tolist() == [0, 0, 1] and d.num_classes == 2
    assert np.array_equal(d.images, expected[[1, 2, 0]])  # ant/a1, ant/a2, zebra/z1
    assert load("imagenet", tmp_path / "train", tmp_path).key == d.key  # data_dir may be train/ itself


def test_folder_finds_images_recursively_and_converts_them_to_rgb(tmp_path):
    folder = tmp_path / "photos"
    expected = write_images(folder, ["b.png", "sub/deeper/a.webp", "sub/c.bmp"])
    Image.new("LA", (12, 10), (40, 200)).save(folder / "sub" / "gray.png")
    (folder / "notes.txt").write_text("not an image")
    d = load("folder", folder, tmp_path)
    assert d.key.startswith("folder-photos-4-") and d.images.shape == (4, RES, RES, 3)
    assert np.array_equal(d.images[[0, 1, 2]], expected[[0, 2, 1]])  # b.png, sub/c.bmp, sub/deeper/a.webp
    assert (d.images[3] == 40).all()  # the gray+alpha image became RGB gray


def test_idx_files_prefer_the_train_split_over_t10k(tmp_path, capsys):
    rng = np.random.default_rng(0)
    t10k = rng.integers(0, 256, (5, 6, 7), dtype=np.uint8)
    write_idx_pair(tmp_path / "mnist", "t10k", t10k, np.arange(5))
    d = load("mnist", tmp_path / "mnist", tmp_path)
    assert "using the 5 t10k images" in capsys.readouterr().out
    assert d.key.startswith("mnist-t10k-5-") and d.images.shape == (5, RES, RES, 1) and d.channels == 1
    assert d.labels.tolist() == [0, 1, 2, 3, 4] and d.num_classes == 5
    assert np.array_equal(d.images[2, :, :, 0], np.asarray(data.center_crop(Image.fromarray(t10k[2]), RES)))
    write_idx_pair(tmp_path / "mnist", "train", rng.integers(0, 256, (7, 6, 7), dtype=np.uint8), np.arange(7) % 3)
    d = load("mnist", tmp_path / "mnist", tmp_path)
    assert d.key.startswith("mnist-train-7-") and d.labels.tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_missing_idx_files_are_downloaded_from_the_official_location(tmp_path, monkeypatch):
    files = {}
    for kind, array in [("images", np.full((3, 28, 28), 9)), ("labels", np.array([4, 1, 4]))]:
        write_idx(tmp_path / kind, array)
        files[kind] = (tmp_path / kind).read_bytes()
    requested = []

    def fake_urlopen(url, timeout):
        requested.append(url)
        return io.BytesIO(files["images" if "images" in url else "labels"])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    d = load("fashion_mnist", tmp_path / "downloads", tmp_path)
    assert all(url.startswith(data.MNIST_URLS["fashion_mnist"] + "train-") for url in requested)
    assert sorted(os.listdir(tmp_path / "downloads")) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    assert d.labels.tolist() == [4, 1, 4] and (d.images == 9).all()


def test_bundled_fashion_mnist_is_the_default(tmp_path):
    d = data.load_dataset("fashion_mnist", 32, cache_dir=str(tmp_path), workers=1)
    assert d.key.startswith(f"fashion_mnist-t10k-10000-32px-v{data.PREP_VERSION}-")
    assert d.images.shape == (10000, 32, 32, 1) and d.num_classes == 10
    assert np.bincount(d.labels).tolist() == [1000] * 10
    assert 20 < d.images[:100].mean() < 200  # real clothes on black, not a blank array


# -----------------------------------------------------------------------------
# the cache


def test_cache_is_reused_and_rebuilt_for_a_new_resolution(tmp_path, monkeypatch):
    write_images(tmp_path / "photos", ["a.png", "b.png"])
    builds = []
    build = data._build_cache
    monkeypatch.setattr(data, "_build_cache", lambda *args: builds.append(args[1]) or build(*args))
    first = load("folder", tmp_path / "photos", tmp_path)
    second = load("folder", tmp_path / "photos", tmp_path)
    assert builds == [RES] and np.array_equal(first.images, second.images)
    bigger = load("folder", tmp_path / "photos", tmp_path, res=16)
    assert builds == [RES, 16] and bigger.images.shape == (2, 16, 16, 3) and bigger.key != first.key
    monkeypatch.setattr(data, "PREP_VERSION", data.PREP_VERSION + 1)  # changed preprocessing: rebuild
    load("folder", tmp_path / "photos", tmp_path)
    assert builds == [RES, 16, RES]


def test_a_partly_written_cache_is_never_used(tmp_path):
    expected = write_images(tmp_path / "photos", ["a.png", "b.png"])
    key = f"folder-photos-2-{RES}px-v{data.PREP_VERSION}"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"{key}.uint8").write_bytes(b"\xff" * 10)  # a crash before the JSON was written
    (tmp_path / "cache" / f"{key}.json.tmp123").write_text("{}")
    assert np.array_equal(load("folder", tmp_path / "photos", tmp_path).images, expected)


def test_default_cache_goes_inside_a_writable_data_folder_else_the_current_one(tmp_path, monkeypatch):
    write_images(tmp_path / "photos", ["a.png"])
    monkeypatch.chdir(tmp_path)
    path = data.prepare_dataset("folder", RES, str(tmp_path / "photos"), workers=1)
    assert os.path.dirname(path) == str(tmp_path / "photos" / "cache")
    write_images(tmp_path / "shared", ["a.png"])
    os.chmod(tmp_path / "shared", 0o555)  # read-only, as shared data sets are (root ignores this in os.access)
    try:
        path = data.prepare_dataset("folder", RES, str(tmp_path / "shared"), workers=1)
    finally:
        os.chmod(tmp_path / "shared", 0o755)
    assert os.path.dirname(path) == "cache" and not os.path.exists(tmp_path / "shared" / "cache")


def count_builds(monkeypatch):
    builds = []
    build = data._build_cache
    monkeypatch.setattr(data, "_build_cache", lambda *args: builds.append(args[1]) or build(*args))
    return builds


def test_replacing_adding_or_removing_an_image_rebuilds_the_cache(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    write_images(folder, ["a.png", "b.png"])
    builds = count_builds(monkeypatch)
    first = load("folder", folder, tmp_path)
    # b.png replaced by another image of the same format: same file count, new pixels
    replaced = write_images(folder, ["a.png", "c.png"])
    os.replace(folder / "c.png", folder / "b.png")
    second = load("folder", folder, tmp_path)
    assert builds == [RES, RES] and np.array_equal(second.images, replaced) and second.key != first.key
    # the same size and contents but a new modification time also counts: the fingerprint reads no pixels
    os.utime(folder / "a.png", ns=(1, 10**18))
    load("folder", folder, tmp_path)
    assert builds == [RES] * 3
    write_images(folder, ["d.png"])
    assert len(load("folder", folder, tmp_path)) == 3 and builds == [RES] * 4
    os.remove(folder / "a.png")
    os.remove(folder / "d.png")
    assert len(load("folder", folder, tmp_path)) == 1 and builds == [RES] * 5
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(f"folder-photos-{n}-{RES}px-v{data.PREP_VERSION}.{ext}"
                                                            for n in (1, 2, 3) for ext in ("json", "uint8"))
    load("folder", folder, tmp_path)
    assert builds == [RES] * 5  # nothing changed: reused


def test_an_unchanged_cache_is_reused_without_decoding_an_image(tmp_path, monkeypatch):
    write_images(tmp_path / "photos", ["a.png", "b.png"])
    first = load("folder", tmp_path / "photos", tmp_path)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image")

    monkeypatch.setattr(Image, "open", no_decoding)
    second = load("folder", tmp_path / "photos", tmp_path)
    assert second.key == first.key and np.array_equal(second.images, first.images)


def test_a_replaced_zip_member_rebuilds_the_cache(tmp_path):
    folder = tmp_path / "unzipped"
    expected = write_images(folder, ["000001.jpg", "000002.jpg", "000003.jpg"])
    archive = tmp_path / "img_align_celeba.zip"
    for members in (["000001.jpg", "000002.jpg"], ["000001.jpg", "000003.jpg"]):
        with zipfile.ZipFile(archive, "w") as z:
            for name, source in zip(["000001.jpg", "000002.jpg"], members):
                z.write(folder / source, f"img_align_celeba/{name}")
        os.utime(archive, ns=(1, 10**18))  # the same time stamp both times: the members' CRCs tell them apart
        d = load("celeba", archive, tmp_path)
    assert np.array_equal(d.images, expected[[0, 2]])


def test_a_cache_without_a_fingerprint_or_its_images_is_rebuilt(tmp_path, monkeypatch):
    write_images(tmp_path / "photos", ["a.png"])
    builds = count_builds(monkeypatch)
    meta_path = data.prepare_dataset("folder", RES, str(tmp_path / "photos"), str(tmp_path / "cache"), workers=1)
    with open(meta_path) as f:
        meta = json.load(f)
    del meta["fingerprint"]  # as written before the cache knew its files
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    load("folder", tmp_path / "photos", tmp_path)
    os.remove(meta_path[:-len(".json")] + ".uint8")
    assert len(load("folder", tmp_path / "photos", tmp_path)) == 1
    assert builds == [RES] * 3


# -----------------------------------------------------------------------------
# warnings


def user_warnings(function):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = function()
    return result, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_upscaled_images_are_counted_in_one_warning_with_the_smallest(tmp_path):
    folder = tmp_path / "photos"
    write_images(folder, ["big.png"])
    write_images(folder, ["small.png"], size=(6, 5))
    write_images(folder, ["tall.png"], size=(7, 30))
    _, messages = user_warnings(lambda: load("folder", folder, tmp_path))
    upscaled = [m for m in messages if m.startswith("upscaled")]
    assert len(upscaled) == 1 and "\n" not in upscaled[0]
    assert re.search(f"upscaled 2 of 3 images .*below {RES} px .*smallest 6x5", upscaled[0])
    _, messages = user_warnings(lambda: load("folder", folder, tmp_path, res=4))
    assert not [m for m in messages if m.startswith("upscaled")]


def test_mnist_28_px_to_32_px_is_the_usual_protocol_and_64_px_warns(tmp_path):
    write_idx_pair(tmp_path / "mnist", "train", np.zeros((100, 28, 28)), np.arange(100) % 10)
    _, messages = user_warnings(lambda: load("mnist", tmp_path / "mnist", tmp_path, res=32))
    assert messages == []
    _, messages = user_warnings(lambda: load("mnist", tmp_path / "mnist", tmp_path, res=64))
    assert len(messages) == 1 and re.search("upscaled 100 of 100 images .*below 64 px .*smallest 28x28", messages[0])


def test_a_small_dataset_warns_at_every_load(tmp_path):
    write_idx_pair(tmp_path / "few", "train", np.zeros((data.MIN_IMAGES - 1, RES, RES)), np.zeros(data.MIN_IMAGES - 1))
    write_idx_pair(tmp_path / "enough", "train", np.zeros((data.MIN_IMAGES, RES, RES)), np.zeros(data.MIN_IMAGES))
    for _ in range(2):  # the second load reuses the cache and still warns
        d, messages = user_warnings(lambda: load("mnist", tmp_path / "few", tmp_path))
        assert len(d) == 99 and len(messages) == 1 and "\n" not in messages[0]
        assert re.search(f"only 99 images .*fewer than {data.MIN_IMAGES}", messages[0])
    d, messages = user_warnings(lambda: load("mnist", tmp_path / "enough", tmp_path))
    assert len(d) == 100 and messages == []
    write_images(tmp_path / "one", ["a.png"])
    _, messages = user_warnings(lambda: load("folder", tmp_path / "one", tmp_path))
    assert len(messages) == 1 and "only 1 image " in messages[0]


# -----------------------------------------------------------------------------
# bad input


def test_corrupt_images_are_skipped_and_named(tmp_path):
    expected = write_images(tmp_path / "photos", ["a.jpg", "c.jpg"])
    (tmp_path / "photos" / "broken.jpg").write_bytes((tmp_path / "photos" / "a.jpg").read_bytes()[:200])
    (tmp_path / "photos" / "empty.png").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable images of 4 .*: broken.jpg, empty.png"):
        d = load("folder", tmp_path / "photos", tmp_path)
    assert np.array_equal(d.images, expected)
    with open(data.prepare_dataset("folder", RES, str(tmp_path / "photos"), str(tmp_path / "cache"))) as f:
        assert json.load(f)["skipped"] == ["broken.jpg", "empty.png"]


def test_no_readable_image_is_an_error(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="none of the 1 images .* could be read .*broken.jpg"):
        load("folder", tmp_path / "photos", tmp_path)
    assert not os.listdir(tmp_path / "cache")  # nothing half-written left behind


@pytest.mark.parametrize("name, res, data_dir, error, message", [
    ("celeba", RES, "photos/a.png", FileNotFoundError, r"data_dir .*a.png is a file, not a folder: .*photos\)"
     r".*DIR/img_align_celeba/000001.jpg"),
    ("celeba", RES, "fake.zip", FileNotFoundError, "fake.zip is a file but not a readable zip archive"),
    ("folder", RES, "photos/a.png", FileNotFoundError, r"a.png is a file, not a folder: .*point data_dir at a folder"),
    ("imagenet", RES, "photos/a.png", FileNotFoundError, r"a.png is a file, not a folder: .*train/<class>"),
    ("mnist", RES, "photos/a.png", FileNotFoundError, r"a.png is a file, not a folder: .*train-images-idx3"),
    ("cifar", RES, "photos", ValueError, "unknown dataset 'cifar'; the known datasets are: celeba, imagenet"),
    ("folder", 48, "photos", ValueError, "resolution 48 is not a power of two"),
    ("folder", RES, "missing", FileNotFoundError, "missing does not exist"),
    ("folder", RES, "empty", FileNotFoundError, "no folder images found in .*empty"),
    ("folder", RES, None, ValueError, "'folder' needs data_dir"),
    ("celeba", RES, None, ValueError, r"Align&Cropped Images' \(img_align_celeba.zip\)"),
    ("celeba", RES, "empty", FileNotFoundError, "no celeba images .*DIR/img_align_celeba/000001.jpg"),
    ("imagenet", RES, "photos", FileNotFoundError, r"no imagenet images .*train/<class>/\*\.JPEG"),
])
def test_bad_input_says_what_is_wrong(tmp_path, name, res, data_dir, error, message):
    write_images(tmp_path / "photos", ["a.png"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "fake.zip").write_bytes(b"PK not really a zip")
    with pytest.raises(error, match=message) as caught:
        load(name, None if data_dir is None else tmp_path / data_dir, tmp_path, res=res)
    assert "\n" not in str(caught.value)  # the scripts print it as one "error: ..." line


def test_a_damaged_celeba_zip_is_reported(tmp_path):
    (tmp_path / "img_align_celeba.zip").write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(ValueError, match="img_align_celeba.zip is not a readable zip archive .*download it again"):
        load("celeba", tmp_path, tmp_path)


def test_a_malformed_partition_file_is_reported(tmp_path):
    write_images(tmp_path / "img_align_celeba", CELEBA_NAMES[:1])
    (tmp_path / "list_eval_partition.txt").write_text("000001.jpg 0\n<html>a download error page</html>\n")
    with pytest.raises(ValueError, match=r"list_eval_partition.txt line 2 .*not '<file> <partition>'"):
        load("celeba", tmp_path, tmp_path)


def test_a_cache_that_cannot_be_written_is_a_user_error(tmp_path):
    write_images(tmp_path / "photos", ["a.png"])
    (tmp_path / "taken").write_text("a file where the cache folder should go")
    with pytest.raises(ValueError, match="could not write the cache .*taken.*cache_dir") as caught:
        data.load_dataset("folder", RES, str(tmp_path / "photos"), cache_dir=str(tmp_path / "taken"), workers=1)
    assert "\n" not in str(caught.value)


def test_missing_idx_files_offline_say_where_to_put_them(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match="downloading them failed .*no network.*put train-images-idx3"):
        load("mnist", tmp_path / "mnist", tmp_path)


def test_damaged_idx_file_is_reported(tmp_path):
    write_idx_pair(tmp_path / "mnist", "train", np.zeros((2, 4, 4)), np.zeros(2))
    (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"garbage!"))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz is not an idx file"):
        load("mnist", tmp_path / "mnist", tmp_path)
    write_idx_pair(tmp_path / "swapped", "train", np.zeros(2), np.zeros(2))  # labels where the images belong
    with pytest.raises(ValueError, match=r"holds an array of shape \(2,\) .* not \(N, height, width\) images"):
        load("mnist", tmp_path / "swapped", tmp_path)
    write_idx_pair(tmp_path / "none", "train", np.zeros((0, 4, 4)), np.zeros(0))
    with pytest.raises(FileNotFoundError, match="no mnist images found"):
        load("mnist", tmp_path / "none", tmp_path)


# -----------------------------------------------------------------------------
# batches


def test_get_batch_scales_and_flips_exact_mirror_images(tmp_path):
    rng = np.random.default_rng(0)
    write_idx_pair(tmp_path / "mnist", "train", rng.integers(0, 256, (4, RES, RES)), np.arange(4))
    d = load("mnist", tmp_path / "mnist", tmp_path)  # label i is image i, so each batch item can be checked
    x, y = data.get_batch(d, 64, torch.Generator().manual_seed(0), "cpu")
    assert x.shape == (64, 1, RES, RES) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.shape == (64,) and y.dtype == torch.int64 and -1 <= x.min() < x.max() <= 1
    images = data.to_uint8_images(x)
    assert images.dtype == np.uint8 and images.shape == (64, RES, RES, 1)
    flipped = []
    for image, label in zip(images, y.tolist()):
        source = d.images[label]
        assert np.array_equal(image, source) != np.array_equal(image, source[:, ::-1])  # one or the other
        flipped.append(np.array_equal(image, source[:, ::-1]))
    assert 10 < sum(flipped) < 54  # about half
    again, _ = data.get_batch(d, 64, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(x, again)  # the generator alone decides the batch


def test_get_batch_of_unlabelled_colour_images(tmp_path):
    write_images(tmp_path / "photos", ["a.png", "b.png"])
    x, y = data.get_batch(load("folder", tmp_path / "photos", tmp_path), 5, torch.Generator(), "cpu")
    assert x.shape == (5, 3, RES, RES) and y is None


def test_to_uint8_images_clips_out_of_range_values():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5)
    assert data.to_uint8_images(x).ravel().tolist() == [0, 0, 128, 255, 255]


def test_the_module_cites_the_paper_and_method_not_spec():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in ("data.py", "tests/test_data.py"):
        assert "SP" + "EC" not in open(os.path.join(root, path), encoding="utf-8").read(), path  # split: no match
