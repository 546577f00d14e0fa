"""The expressivity experiment runner: matched sizes, the training loop, the grid (results, resume, report), CLI."""

import json

import pytest
import torch

from hybridlm.cli.main import main
from hybridlm.tasks.experiment_estimate import estimate_grid
from hybridlm.tasks.experiments import (
    ARCHITECTURES,
    MAIN_ARCHS,
    Grid,
    ModelSize,
    Recipe,
    RunSpec,
    TaskSetting,
    body_parameters,
    get_grid,
    load_results,
    matched_configs,
    plan_runs,
    run_grid,
    train_run,
)



@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy machine they lose a lot.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = ModelSize(d_model=16, n_layers=2, n_heads=2, gdn_heads=1)
PARITY = TaskSetting("parity", {}, "length", ((2, 3),), lengthen=("length",))


def tiny_grid(archs=("transformer", "gdn"), seeds=(0,), steps=4, workers=1) -> Grid:
    return Grid(name="tiny", tasks=(PARITY,), archs=archs, size=TINY,
                recipe=Recipe(steps=steps, batch_size=8, lr=3e-3, eval_examples=16), seeds=seeds, workers=workers)


@pytest.mark.parametrize("grid_name", ["cpu", "gpu"])
def test_matched_parameter_counts_within_tolerance(grid_name):
    grid = get_grid(grid_name)
    configs = matched_configs(list(ARCHITECTURES), grid.size, vocab_size=40)
    reference = body_parameters(configs["transformer"])
    for arch, config in configs.items():
        assert abs(body_parameters(config) / reference - 1) <= 0.10, arch
        assert config.d_model == grid.size.d_model and config.n_layers == grid.size.n_layers
    # The GDN mixer is larger than attention, so the matching must have narrowed the GDN models' MLPs.
    assert configs["gdn"].mlp_hidden < configs["transformer"].mlp_hidden
    assert configs["hybrid-3to1"].layout == "GGGA" and configs["hybrid-1to1"].layout == "GAGA"
    assert not configs["gdn-noneg"].gdn_neg_eigval and configs["gdn"].gdn_neg_eigval
    assert configs["transformer"].rope_theta and configs["hybrid-1to1"].rope_theta is None


def test_body_parameters_excludes_vocabulary():
    small, large = (matched_configs(["gdn"], TINY, vocab_size=vocab)["gdn"] for vocab in (8, 800))
    assert body_parameters(small) == body_parameters(large)


def test_unmatchable_size_is_refused():
    with pytest.raises(ValueError, match="cannot be matched"):
        matched_configs(["gdn"], TINY, vocab_size=8, tolerance=1e-6)


def test_training_loop_learns_parity_of_three_bits():
    # 8 possible inputs: a working loop gets them all; a broken one stays near chance (0.5).
    setting = TaskSetting("parity", {}, "length", ((3, 3),))
    spec = RunSpec(setting, (3, 3), "transformer", 0, ModelSize(32, 2, 2, 1), Recipe(steps=150, batch_size=32, lr=1e-2))
    record = train_run(spec, "cpu")
    assert record["id_accuracy"] >= 0.95 and record["train_loss"] < 0.1
    assert record["ood_accuracy"] is None


def test_grid_writes_results_tables_plots_and_resumes(tmp_path):
    lines = []
    records = run_grid(tiny_grid(), tmp_path, device="cpu", log=lines.append)
    assert [r["arch"] for r in records] == ["transformer", "gdn"]
    saved = load_results(tmp_path)["runs"]
    assert len(saved) == 2
    for record in saved:
        assert record["task"] == "parity" and record["difficulty"] == "length=2:3" and record["steps"] == 4
        assert record["train_knobs"]["length"] == [2, 3] and record["test_knobs"]["length"] == [4, 6]
        assert 0 <= record["id_accuracy"] <= 1 and 0 <= record["ood_accuracy"] <= 1
        assert record["params_non_embedding"] > 0 and record["cpu_seconds"] > 0 and record["loss_curve"]
    tables = (tmp_path / "tables.md").read_text()
    assert "| transformer | AA | 16 |" in tables and "## Accuracy, longer than training" in tables
    assert "| parity | length=2:3 | length=4:6 |" in tables
    for name in ("accuracy_id.png", "accuracy_ood.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    lines.clear()
    again = run_grid(tiny_grid(), tmp_path, device="cpu", log=lines.append)
    assert "2 already in" in lines[0] and "0 to run" in lines[0]
    assert [r["key"] for r in again] == [r["key"] for r in records]
    assert len(load_results(tmp_path)["runs"]) == 2

    run_grid(tiny_grid(seeds=(0, 1)), tmp_path, device="cpu", log=lines.append, report=False)
    runs = load_results(tmp_path)["runs"]
    assert len(runs) == 4 and sorted(r["seed"] for r in runs) == [0, 0, 1, 1]
    assert len(load_results(tmp_path)["sessions"]) == 3


def test_parallel_workers_give_the_same_results_as_one_process(tmp_path):
    serial = run_grid(tiny_grid(steps=2), tmp_path / "serial", device="cpu", log=lambda _: None, report=False)
    parallel = run_grid(tiny_grid(steps=2, workers=2), tmp_path / "parallel", device="cpu", log=lambda _: None,
                        report=False)
    for one, other in zip(serial, parallel):
        assert one["key"] == other["key"]
        assert one["train_loss"] == pytest.approx(other["train_loss"], rel=1e-4)


def test_bad_results_file_is_reported(tmp_path):
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="'runs' list"):
        run_grid(tiny_grid(), tmp_path, device="cpu", log=lambda _: None)


def test_grid_selection_and_plan():
    grid = get_grid("cpu")
    assert set(grid.archs) == set(MAIN_ARCHS)
    chosen = grid.select(tasks=["parity"], archs=["gdn", "transformer"], seeds=[3], steps=7)
    runs = plan_runs(chosen)
    assert [(r.arch, r.seed, r.recipe.steps) for r in runs] == [("gdn", 3, 7), ("transformer", 3, 7)]
    assert len({r.key for r in plan_runs(grid)}) == len(plan_runs(grid))
    with pytest.raises(ValueError, match="has no task nope"):
        grid.select(tasks=["nope"])
    with pytest.raises(ValueError, match="unknown architecture mamba"):
        grid.select(archs=["mamba"])
    with pytest.raises(ValueError, match="not a length knob"):
        TaskSetting("state_recall", {}, "m", ((8, 16),), lengthen=("k",))


def test_estimate_counts_flops_and_operators():
    estimate = estimate_grid(tiny_grid())
    assert estimate["runs"] == 2 and estimate["total_flops"] > 0
    costs = list(estimate["costs"].values())
    assert all(cost.flops > 0 and cost.operators > 0 for cost in costs)
    assert estimate["serial_seconds"] == pytest.approx(sum(c.gpu_seconds() for c in costs) * 4)


def test_cli_run_and_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["tasks", "run", "--grid", "cpu", "--out", str(out), "--tasks", "parity", "--archs", "transformer",
                 "--seeds", "5", "--steps", "2", "--workers", "1", "--device", "cpu"]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["arch"], r["seed"], r["steps"]) for r in runs] == [("transformer", 5, 2)]
    assert (out / "tables.md").exists()
    assert main(["tasks", "run", "--grid", "cpu", "--out", str(out), "--tasks", "nope"]) == 2
    assert "has no task nope" in capsys.readouterr().out
    assert main(["tasks", "run", "--grid", "cpu", "--out", str(out), "--steps", "0"]) == 2
    assert "steps must be a positive" in capsys.readouterr().out
