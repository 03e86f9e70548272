"""sampler_bias.py on the bundled Fashion-MNIST at 8 px (seconds)."""
import pytest

import sampler_bias


def table_rows(path):
    """The written table's rows, a dict of {column name: cell} each, the distance as a float."""
    lines = path.read_text().splitlines()
    header = lines[2].strip("|").strip().split(" | ")
    rows = [dict(zip(header, line.strip("|").strip().split(" | "))) for line in lines[4:]]
    return [dict(r, levels=int(r["levels"]), frechet=float(r["Frechet distance"])) for r in rows]


def test_the_table_shows_the_uncertainty_of_x0_closing_the_gap(tmp_path, capsys):
    sampler_bias.main(["--res", "8", "--levels", "1,3", "--steps", "20", "--cache_dir", str(tmp_path / "cache"),
                       "--out", str(tmp_path)])
    text = (tmp_path / "sampler_bias.md").read_text()
    assert capsys.readouterr().out.strip().endswith(text.strip())
    rows = {(r["levels"], r["x_0 uncertainty"]): r["frechet"] for r in table_rows(tmp_path / "sampler_bias.md")}
    settings = ("none", "transitions", "all", "transitions, 1,000 images")
    assert set(rows) == {(levels, at) for levels in (1, 3) for at in settings}
    assert rows[1, "transitions"] == rows[1, "none"]  # one level has no resolution change
    assert rows[3, "all"] < rows[3, "transitions"] < rows[3, "none"]
    assert rows[3, "transitions, 1,000 images"] < rows[3, "none"]
    assert rows[1, "all"] < rows[1, "none"]


def test_scaling_the_signal_at_the_transitions_brings_the_plain_sampler_to_ddpms_error(tmp_path):
    """With preserve_snr a transition takes little from x_hat, so the plug-in costs about what it costs DDPM."""
    args = ["--res", "8", "--steps", "100", "--cache_dir", str(tmp_path / "cache"), "--out", str(tmp_path)]
    rows = {}
    for levels, scaled in (("1", "False"), ("3", "False"), ("3", "True")):
        sampler_bias.main(args + ["--levels", levels, "--preserve_snr", scaled])
        text = (tmp_path / "sampler_bias.md").read_text()
        assert ("preserve_snr" in text.splitlines()[0]) == (scaled == "True")
        rows[levels, scaled] = next(r["frechet"] for r in table_rows(tmp_path / "sampler_bias.md")
                                    if r["x_0 uncertainty"] == "none")
    ddpm = rows["1", "False"]
    assert rows["3", "True"] - ddpm < 0.1 * (rows["3", "False"] - ddpm)  # 0.0004 against 0.0072


def test_ddim_with_the_uncertainty_at_the_transitions_comes_down_to_ddpms_ddim(tmp_path):
    sampler_bias.main(["--res", "8", "--levels", "1,3", "--steps", "100", "--samplers", "ancestral,ddim",
                       "--cache_dir", str(tmp_path / "cache"), "--out", str(tmp_path)])
    rows = {(r["levels"], r["sampler"], r["x_0 uncertainty"]): r["frechet"]
            for r in table_rows(tmp_path / "sampler_bias.md")}
    assert len(rows) == 2 * 2 * 4
    assert rows[1, "ddim", "none"] < rows[1, "ancestral", "none"]
    assert rows[3, "ddim", "transitions"] < rows[3, "ddim", "none"]
    assert rows[3, "ddim", "transitions"] < 1.2 * rows[1, "ddim", "none"]


def test_levels_the_resolution_cannot_hold_are_refused(capsys):
    with pytest.raises(SystemExit):
        sampler_bias.main(["--res", "8", "--levels", "5"])
    assert "8 px has levels 1 to 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sampler_bias.main(["--res", "8", "--samplers", "ancestral,euler"])
    assert "unknown sampler 'euler': choose ancestral or ddim" in capsys.readouterr().err
