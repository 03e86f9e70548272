"""plot_logs.py: per-path panels in resolution order, per-block panels in network order, from the log.jsonl that
train.py writes."""
import json
import os

import pytest

import plot_logs
from plot_logs import block_order, path_order, plot, plot_blocks, read_log


def write_log(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_paths_are_ordered_by_resolution():
    paths = ["8->8", "msf", "32->64", "64->64", "32->32"]
    assert sorted(paths, key=path_order) == ["64->64", "32->32", "32->64", "8->8", "msf"]


def test_blocks_are_ordered_as_the_data_flows():
    blocks = ["head", "time_embed", "decoder.10", "encoder.2", "middle.1", "in_adapters.2", "decoder.2", "stem",
              "encoder.10", "middle.0", "label_embed", "in_adapters.0", "out_adapters.1"]
    assert sorted(blocks, key=block_order) == [
        "stem", "encoder.2", "encoder.10", "middle.0", "middle.1", "decoder.2", "decoder.10", "head",
        "in_adapters.0", "in_adapters.2", "label_embed", "out_adapters.1", "time_embed"]
    msf = ["residual.stem", "base.head", "base.encoder.1", "residual.time_embed", "base.stem"]
    assert sorted(msf, key=block_order) == ["base.stem", "base.encoder.1", "base.head", "residual.stem",
                                            "residual.time_embed"]


def test_losses_and_gradient_norms_are_plotted(tmp_path):
    records = [dict(step=50, loss_per_path={"16->16": 0.1, "8->8": 1e-5}, grad_norm_per_path={"16->16": 0.5}),
               dict(step=100, loss_per_path={"16->16": None}, grad_norm_per_path={"16->16": None})]  # a diverged step
    log = write_log(tmp_path / "run" / "log.jsonl", records)
    assert read_log(log) == records
    for key in ("loss_per_path", "grad_norm_per_path"):
        out = tmp_path / f"{key}.png"
        drawn = plot({"run": read_log(log)}, out, key)
        assert out.stat().st_size > 1000
    assert drawn == {"16->16": {"run": ((50,), (0.5,))}}  # the null is left out


def synthetic_block_log():
    """A run whose decoder.7 spikes first, at step 600, then encoder.3; the block fields are on some lines only,
    and some of their values are null."""
    records = []
    for step in range(100, 900, 100):
        record = dict(step=step, loss=0.1, loss_per_path={"16->16": 0.1})
        if step != 200:  # a line without the block fields
            spike = 50.0 if step >= 600 else 1.0
            record["grad_norm_per_block"] = {"head": 0.2, "decoder.7": 0.3 * spike, "stem": 0.5,
                                             "encoder.3": 0.4 * (spike / 5 if step >= 700 else 1.0), "time_embed": 0.1,
                                             "in_adapters.2": None if step == 300 else 0.05, "middle.0": 0.3}
            record["update_ratio_per_block"] = {"stem": 1e-4, "decoder.7": 1e-3}
            record["act_max_per_block"] = {"encoder.3": 3.0, "middle.0": 7.0}
            record["attn_logit_max_per_block"] = {"middle.0": 4.0} if step != 500 else None  # the field null
        records.append(record)
    return records


def test_block_metrics_get_one_panel_per_run_and_one_line_per_block(tmp_path, capsys):
    logs = {"ssd": synthetic_block_log(), "baseline": [dict(step=100, loss_per_path={"16->16": 0.2})]}
    out = tmp_path / "blocks.png"
    drawn = plot_blocks(logs, out, "grad_norm_per_block", "gradient norm")
    assert out.stat().st_size > 1000
    assert list(drawn) == ["ssd"]  # a run without block fields gets no panel
    assert list(drawn["ssd"]) == ["stem", "encoder.3", "middle.0", "decoder.7", "head", "in_adapters.2",
                                  "time_embed"]
    assert drawn["ssd"]["decoder.7"] == ((100, 300, 400, 500, 600, 700, 800), (0.3,) * 4 + (15.0,) * 3)
    assert drawn["ssd"]["in_adapters.2"][0] == (100, 400, 500, 600, 700, 800)  # absent at 200, null at 300
    assert "ssd: first above 5x its earlier median at step 600: decoder.7 (50x)" in capsys.readouterr().out
    attn = plot_blocks(logs, tmp_path / "attn.png", "attn_logit_max_per_block", "logit")
    assert attn["ssd"]["middle.0"][0] == (100, 300, 400, 600, 700, 800)  # the whole field null at 500
    with pytest.raises(ValueError, match="no act_max_per_block in baseline"):
        plot_blocks({"baseline": logs["baseline"]}, tmp_path / "none.png", "act_max_per_block", "max")


@pytest.mark.parametrize("argv, out", [
    ([], "out/loss_curves.png"),
    (["--grad_norm"], "out/grad_norm_curves.png"),  # the alias of --metric grad_norm
    (["--metric", "block_grad_norm"], "out/block_grad_norm_curves.png"),
    (["--metric", "update_ratio", "--out", "figs/update.png"], "figs/update.png"),
])
def test_the_script_writes_to_out_by_default(tmp_path, monkeypatch, argv, out):
    records = synthetic_block_log()
    for r in records:
        r["grad_norm_per_path"] = {"16->16": 0.4}
    write_log(tmp_path / "runs" / "a" / "log.jsonl", records)
    monkeypatch.chdir(tmp_path)
    plot_logs.main([os.path.join("runs", "a", "log.jsonl")] + argv)
    assert (tmp_path / out).stat().st_size > 1000
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".png")]  # nothing in the current folder itself


def test_bad_logs_are_one_line_errors_and_an_unfinished_last_line_is_left_out(tmp_path, capsys):
    log = tmp_path / "run" / "log.jsonl"
    write_log(log, [dict(step=1, loss_per_path={"8->8": 1.0})])
    with open(log, "a") as f:
        f.write('{"step": 2, "loss_per')  # train.py is still writing this line
    assert read_log(log) == [dict(step=1, loss_per_path={"8->8": 1.0})]
    (tmp_path / "other.jsonl").write_text("step,loss\n1,0.5\n")
    with pytest.raises(SystemExit, match=r"error: .*other.jsonl line 1 is not JSON"):
        plot_logs.main([str(tmp_path / "other.jsonl"), "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="error: no grad_norm_per_block in run"):
        plot_logs.main([str(log), "--metric", "block_grad_norm", "--out", str(tmp_path / "x.png")])


def test_runs_in_folders_of_the_same_name_keep_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert plot_logs.run_names(["a/out/log.jsonl", "b/out/log.jsonl", "c/log.jsonl"]) == [
        os.path.join("a", "out"), os.path.join("b", "out"), "c"]


def test_the_module_cites_the_paper_and_method_not_spec():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in ("plot_logs.py", "tests/test_plot_logs.py"):
        assert "SP" + "EC" not in open(os.path.join(root, path), encoding="utf-8").read(), path  # split: no match
