"""plot_logs.py: one panel per path, in resolution order, from the log.jsonl that train.py writes."""
import json

from plot_logs import path_order, plot, read_log


def test_paths_are_ordered_by_resolution():
    paths = ["8->8", "msf", "32->64", "64->64", "32->32"]
    assert sorted(paths, key=path_order) == ["64->64", "32->32", "32->64", "8->8", "msf"]


def test_losses_and_gradient_norms_are_plotted(tmp_path):
    records = [dict(step=50, loss_per_path={"16->16": 0.1, "8->8": 1e-5}, grad_norm_per_path={"16->16": 0.5}),
               dict(step=100, loss_per_path={"16->16": None}, grad_norm_per_path={"16->16": None})]  # a diverged step
    log = tmp_path / "run" / "log.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_log(log) == records
    for key in ("loss_per_path", "grad_norm_per_path"):
        out = tmp_path / f"{key}.png"
        plot({"run": read_log(log)}, out, key)
        assert out.stat().st_size > 1000
