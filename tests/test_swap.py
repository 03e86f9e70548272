"""Swapped chains (swap.py, METHOD.md §4): below SSD's first resolution change its chain is DDPM's, so one model's
network may hand over to another's there; two models of one process may hand over at any step."""
import json

import pytest
import torch

import fid
import methods
import sample
import swap
import train
from degrade import ScaleSpace
from flexi_unet import tiny_config
from helpers import randomized
from sampler_bias import exact_output_moments, ideal_denoiser
from test_ssd import SIZE, gaussian_data


def handed_over(high, low, at):
    return lambda x_t, t: high(x_t, t) if t >= at else low(x_t, t)


@pytest.mark.parametrize("steps", [None, 100])
def test_below_the_first_transition_ssd_and_ddpm_chains_are_one(steps):
    """On Gaussian data the ideal denoisers of a 3-level and a 1-level process, handed over at the first transition
    in either direction, give exactly the output law of the chain without a hand-over."""
    mean, cov = gaussian_data()
    ssd3, ddpm = ScaleSpace(SIZE, 3), ScaleSpace(SIZE, 1)
    ideal3, ideal1 = ideal_denoiser(ssd3, mean, cov), ideal_denoiser(ddpm, mean, cov)
    at = ssd3.transitions[0]
    for chain, high, low in ((ssd3, ideal3, ideal1), (ddpm, ideal1, ideal3)):
        own_mean, own_cov = exact_output_moments(chain, high, steps=steps)
        out_mean, out_cov = exact_output_moments(chain, handed_over(high, low, at), steps=steps)
        assert (out_mean - own_mean).abs().max() < 1e-12 and (out_cov - own_cov).abs().max() < 1e-12
    # The check can fail: a process with another noise schedule is another chain below the transition too.
    ideal_cosine = ideal_denoiser(ScaleSpace(SIZE, 1, noise="cosine"), mean, cov)
    _, out_cov = exact_output_moments(ssd3, handed_over(ideal3, ideal_cosine, at), steps=steps)
    _, own_cov = exact_output_moments(ssd3, ideal3, steps=steps)
    assert (out_cov - own_cov).abs().max() > 1e-3


def tiny_method(levels, seed, **scale_space):
    method = methods.from_spec(methods.ssd_spec("ssd" if levels > 1 else "ddpm_x0", tiny_config(16, levels),
                                                dict(res=16, levels=levels, **scale_space)))
    return method, randomized(method.build_model(), seed).eval()


def test_a_swap_keeps_the_chain_above_and_changes_it_below():
    (ssd2, ssd_net), (ddpm, ddpm_net) = tiny_method(2, 0), tiny_method(1, 1)
    at = swap.swap_step(ssd2, ddpm)
    assert at == ssd2.ss.transitions[0] == 750
    own = sample.generate(ssd2, ssd_net, 3, steps=6)
    assert torch.equal(sample.generate(swap.Swapped(ssd2, ssd2, ssd_net, at), ssd_net, 3, steps=6), own)
    swapped = sample.generate(swap.Swapped(ssd2, ddpm, ddpm_net, at), ssd_net, 3, steps=6)
    assert swapped.shape == own.shape and (swapped - own).abs().max() > 0.1


def test_the_steps_two_processes_share():
    """SSD and DDPM share the steps below SSD's first resolution change; two models of one process share all T;
    another schedule of levels, another resize or another noise schedule ends the sharing where it first tells."""
    ssd3 = ScaleSpace(16, 3)
    assert ssd3.transitions == [555, 889]
    assert swap.shared_steps(ssd3, ScaleSpace(16, 1)) == 555
    assert swap.shared_steps(ssd3, ScaleSpace(16, 3)) == 1000
    assert swap.shared_steps(ssd3, ScaleSpace(16, 3, gamma=0.7)) == 440  # its first change comes first
    assert swap.shared_steps(ssd3, ScaleSpace(16, 3, transitions=[555, 900])) == 889
    assert swap.shared_steps(ssd3, ScaleSpace(16, 3, op="box")) == 555
    assert swap.shared_steps(ssd3, ScaleSpace(16, 3, preserve_snr=True)) == 555  # a gain only above level 0
    assert swap.shared_steps(ssd3, ScaleSpace(16, 1, noise="cosine")) == 0


def test_models_of_one_process_swap_at_any_step():
    (ssd2, net), (other, other_net) = tiny_method(2, 0), tiny_method(2, 1)
    assert swap.swap_step(ssd2, other) == 750  # the default: the first resolution change
    own = sample.generate(ssd2, net, 3, steps=6)
    swapped = sample.generate(swap.Swapped(ssd2, other, other_net, 900), net, 3, steps=6)  # above it
    assert swapped.shape == own.shape and (swapped - own).abs().max() > 0.1
    swap.check_swappable(ssd2, other, 1000)
    with pytest.raises(ValueError, match="only below step 750"):
        swap.check_swappable(ssd2, tiny_method(1, 1)[0], 900)


def test_impossible_swaps_are_refused():
    ssd2, ddpm = tiny_method(2, 0)[0], tiny_method(1, 1)[0]
    with pytest.raises(ValueError, match=r"--at 751: the two forward processes are one \(the size of x_t, its "
                                         r"operator and noise level\) only below step 750: pass --at from 1 to 750"):
        swap.check_swappable(ssd2, ddpm, 751)
    with pytest.raises(ValueError, match=r"the two noise schedules differ \(--noise\): their chains never meet"):
        swap.check_swappable(ssd2, tiny_method(1, 1, noise="cosine")[0], 750)
    other = methods.from_spec(methods.ssd_spec("ddpm_x0", tiny_config(8, 1), dict(res=8, levels=1)))
    with pytest.raises(ValueError, match="do not share T, resolution and channels"):
        swap.check_swappable(ssd2, other, 10)
    labelled = methods.from_spec(methods.ssd_spec("ddpm_x0", tiny_config(16, 1, num_classes=10),
                                                  dict(res=16, levels=1)))
    with pytest.raises(ValueError, match="trained without --class_cond"):
        swap.check_swappable(ssd2, labelled, 10)
    msf = methods.from_spec(train.method_spec(train.parse_config(["--res", "16", "--method", "msf"]), 1, 0))
    with pytest.raises(ValueError, match="swaps the chains of ssd and ddpm models, and got ssd and msf"):
        swap.check_swappable(ssd2, msf, 10)


def test_hand_over_steps_must_be_integers(capsys):
    with pytest.raises(SystemExit):
        swap.main(["a.pt", "b.pt", "--at", "438,late"])
    assert "--at 438,late: give steps such as 438 or 438,750,937" in capsys.readouterr().err


def test_swap_scores_each_own_chain_once_and_two_per_hand_over_step(tmp_path, monkeypatch):
    ckpts = []
    for name, extra in (("ssd", ["--levels", "2"]), ("ddpm", ["--method", "ddpm_x0"])):
        train.main(["--out_dir", str(tmp_path / name), "--res", "16", "--cache_dir", str(tmp_path / "data"),
                    "--max_steps", "2", "--batch_size", "4", "--lr", "1e-2", "--warmup", "0", "--sample_every", "0",
                    "--sample_n", "2", "--sample_steps", "3", *extra])
        ckpts.append(str(tmp_path / name / "ckpt.pt"))
    torch.manual_seed(0)  # a tiny random feature network stands in for Inception
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 13, stride=13), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    monkeypatch.setattr(fid, "load_inception", lambda path, device: fid.InceptionFeatures(net, "tiny", device))
    scoring = [*ckpts, "--n", "6", "--steps", "4", "--batch_size", "4", "--max_ref", "16", "--cache_dir",
               str(tmp_path / "fid_cache"), "--device", "cpu"]
    swap.main([*scoring, "--out", str(tmp_path / "one")])
    result = json.loads((tmp_path / "one" / "swap.json").read_text())
    (a, b), table = ckpts, (tmp_path / "one" / "swap.md").read_text()
    assert result["at"] == [750] and 0 <= result["floor"]  # by default, SSD's first resolution change
    assert [(r["above"], r["below"], r["at"]) for r in result["chains"]] == [
        (a, a, None), (b, b, None), (a, b, 750), (b, a, 750)]
    assert all(r["fid"] > 0 for r in result["chains"]) and f"| {a} | {b} | 750 |" in table
    swap.main([*scoring, "--at", "300,750", "--out", str(tmp_path / "two")])
    rows = json.loads((tmp_path / "two" / "swap.json").read_text())["chains"]
    assert [(r["above"], r["below"], r["at"]) for r in rows] == [
        (a, a, None), (b, b, None), (a, b, 300), (b, a, 300), (a, b, 750), (b, a, 750)]
    assert rows[0]["fid"] == result["chains"][0]["fid"]  # the same own chain, drawn from the same seeds
