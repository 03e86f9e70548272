"""Tests of info_analysis.py: the information proxy (paper Sec. 3.2, Fig. 2; METHOD.md §6) and the closed-form
recoverability on Gaussian data."""
import argparse
import math
import os
import re

import numpy as np
import pytest
import torch

from data import load_dataset
from degrade import Separable, downsample_operator, information_proxy, level_transitions, make_alphas_cumprod
import info_analysis
from info_analysis import (PAPER_INFO, T, explained_variance, first_crossing, image_covariance, level_spectrum,
                           matched_transitions, measure, mutual_information_bits, proxy_crossings)

ABAR = make_alphas_cumprod(T, "linear")
INFO = information_proxy(ABAR)


# --- the proxy ----------------------------------------------------------------


def test_proxy_reproduces_the_paper_values():
    for t, paper in PAPER_INFO.items():
        assert float(INFO[t]) == pytest.approx(paper, abs=5e-4), t
    assert round(float(INFO[0]), 3) == 0.992 and round(float(INFO[999]), 4) == 0.0025


@pytest.mark.parametrize("t", [0, 150, 437, 750, 999])
def test_proxy_closed_form_equals_integral_and_monte_carlo(t):
    a, sigma = math.sqrt(ABAR[t]), math.sqrt(1 - ABAR[t])
    x = torch.linspace(0, 1, 20001, dtype=torch.float64)
    integral = 1 - 2 * torch.trapezoid(torch.special.ndtr(-a / sigma * x), x)
    assert float(INFO[t]) == pytest.approx(float(integral), abs=1e-7)

    n = 400_000
    gen = torch.Generator().manual_seed(t)
    x0 = 2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1
    eps = torch.randn(n, generator=gen, dtype=torch.float64)
    p = float(((sigma * eps).abs() <= (a * x0).abs()).double().mean())
    assert abs(p - float(INFO[t])) < 5 * math.sqrt(p * (1 - p) / n) + 1e-5


def test_proxy_crossings_are_the_papers():
    crossings = proxy_crossings("linear")
    assert crossings[:3] == [344, 606, 800]
    for k, t in enumerate(crossings[:4], start=1):
        assert INFO[t] <= 4.0 ** -k < INFO[t - 1]
    assert crossings[4] is None  # Info(999) = 0.0025 > 4^-5: no 6th level is information-matched under linear betas


@pytest.mark.parametrize("levels", [2, 3, 4, 5])
def test_info_schedule_of_degrade_starts_level_k_where_info_crosses_4_to_the_minus_k(levels):
    expected = [first_crossing(INFO, 4.0 ** -k) for k in range(1, levels)]
    assert level_transitions(levels, T, "info") == expected


# --- the closed forms on Gaussian data ------------------------------------------


def test_image_covariance_flattens_channels_first():
    images = np.random.default_rng(0).integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
    x = images.transpose(0, 3, 1, 2).reshape(50, -1) / 127.5 - 1
    assert torch.allclose(image_covariance(images), torch.from_numpy(np.cov(x, rowvar=False)), atol=1e-12)


@pytest.mark.parametrize("op", ["bilinear", "box"])
def test_white_data_has_the_known_answers(op):
    """C = I: EV from x_t is abar_t per pixel; from any full-rank R to 1/2^k it is the rank fraction 4^-k."""
    res, levels = 16, 4
    result = measure(torch.eye(res * res, dtype=torch.float64), (1, res, res), levels, op)
    assert torch.allclose(result["state"][0], ABAR, atol=1e-12)
    assert torch.allclose(result["bits"][0], res * res / 2 * torch.log2(1 / (1 - ABAR)), rtol=1e-10)
    assert torch.allclose(result["clean"], 4.0 ** -torch.arange(levels, dtype=torch.float64), atol=1e-10)
    assert matched_transitions(result) == [int(torch.nonzero(ABAR <= 4.0 ** -k)[0]) for k in range(1, levels)]
    if op == "box":  # R R^T = I/4 per halving: the coarse state keeps its pixels at a quarter of the SNR
        quarter = ABAR / 4
        assert torch.allclose(result["state"][1], quarter / (quarter + 1 - ABAR) / 4, atol=1e-12)


@pytest.mark.parametrize("down", [False, True])
def test_spectral_forms_equal_the_dense_lmmse(down):
    shape, gen = (2, 8, 8), torch.Generator().manual_seed(0)
    d = 2 * 8 * 8
    a = torch.randn(d, 2 * d, generator=gen, dtype=torch.float64)
    cov = a @ a.T / (2 * d)
    R = downsample_operator(4, 2) @ downsample_operator(8, 4) if down else Separable.identity(8)
    dense = torch.block_diag(R.dense(), R.dense())  # R acts on each channel of the (C, H, W) vector
    spectrum = level_spectrum(cov, R, shape)
    total = cov.trace()
    for abar in (0.999, 0.5, 0.01):
        y_cov = abar * dense @ cov @ dense.T + (1 - abar) * torch.eye(len(dense), dtype=torch.float64)
        cross = math.sqrt(abar) * cov @ dense.T  # Cov(x_0, y)
        lmmse = torch.trace(cross @ torch.linalg.solve(y_cov, cross.T)) / total
        assert float(explained_variance(spectrum, total, abar, 1 - abar)) == pytest.approx(float(lmmse), rel=1e-9)
        bits = 0.5 * torch.logdet(y_cov / (1 - abar)) / math.log(2)
        ours = mutual_information_bits(spectrum, torch.tensor([abar], dtype=torch.float64))
        assert float(ours) == pytest.approx(float(bits), rel=1e-9)
    noiseless = torch.trace(cov @ dense.T @ torch.linalg.solve(dense @ cov @ dense.T, dense @ cov)) / total
    assert float(explained_variance(spectrum, total)) == pytest.approx(float(noiseless), rel=1e-8)


# --- real data ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion_mnist_result(tmp_path_factory):
    data = load_dataset("fashion_mnist", 16, cache_dir=str(tmp_path_factory.mktemp("cache")))
    images = np.asarray(data.images[:3000])
    return measure(image_covariance(images), (1, 16, 16), levels=5)


def test_real_recoverability_is_monotone_in_t_and_in_resolution(fashion_mnist_result):
    result = fashion_mnist_result
    assert float(result["clean"][0]) == pytest.approx(1.0, abs=1e-9)  # x_0 from itself
    assert (result["clean"].diff() < 0).all()  # each halving loses some of the image
    for key in ("state", "bits"):
        assert (result[key].diff(dim=1) <= 1e-12).all()  # more noise, less recoverable
        assert (result[key].diff(dim=0) <= 1e-9).all()  # the coarser state is a degraded copy of the finer one
    matched = matched_transitions(result)
    assert all(0 < t < T for t in matched) and matched == sorted(set(matched))
    # real images are smooth: a halving keeps far more than the proxy's 1/4, so parity comes much earlier than t = 344
    assert float(result["clean"][1]) > 0.9 and matched[0] < 200


# --- the script ------------------------------------------------------------------


def test_figures_go_to_out_by_default_and_parity_transitions_are_printed_as_analysis(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fast = ["--res", "16", "--images", "600", "--cache_dir", str(tmp_path / "cache")]
    info_analysis.main(fast)
    assert sorted(os.listdir(tmp_path / "out")) == ["info_empirical_fashion_mnist.png", "info_proxy.png"]
    assert not (tmp_path / "assets").exists()
    text = capsys.readouterr().out
    assert "analysis, not a recommended schedule" in text and info_analysis.PARITY_CAVEAT in text
    assert "FID 350.6 against 61.0" in info_analysis.PARITY_CAVEAT
    commands = [line.strip() for line in text.splitlines() if "python train.py" in line]
    assert commands  # a printed command is complete: dataset, resolution, levels and the steps
    for command in commands:
        assert re.fullmatch(r"python train.py --dataset fashion_mnist --res 16 --levels 4 --transitions \d+,\d+,\d+",
                            command)
    written = []  # an explicit folder, as for the README's figures; drawn once above, so only the paths now
    monkeypatch.setattr(info_analysis, "plot_proxy", lambda path: written.append(path))
    monkeypatch.setattr(info_analysis, "plot_empirical", lambda path, *args: written.append(path))
    info_analysis.main(fast + ["--out", str(tmp_path / "figures")])
    names = ("info_proxy.png", "info_empirical_fashion_mnist.png")
    assert written == [str(tmp_path / "figures" / name) for name in names]


def test_a_dataset_that_needs_a_folder_gets_a_data_dir_placeholder(capsys):
    args = argparse.Namespace(dataset="celeba", data_dir="my/celeba", res=64)
    info_analysis.print_parity_schedule([48, 188, 395, 600], args, levels=6)
    lines = capsys.readouterr().out.splitlines()
    command = next(line.strip() for line in lines if "python train.py" in line)
    assert command.startswith("python train.py --dataset celeba --data_dir PATH --res 64 --levels 4 "
                              "--transitions 48,188,395")
    assert "my/celeba" not in "\n".join(lines)


def test_the_module_cites_the_paper_and_method_not_spec():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in ("info_analysis.py", "tests/test_info_analysis.py"):
        assert "SP" + "EC" not in open(os.path.join(root, path), encoding="utf-8").read(), path  # split: this line must not match
