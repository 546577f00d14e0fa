"""Ladder plans follow the recipe, WSD-S decays sit where they should, and `ladder run` trains, skips, resumes
and collects results.csv (a tiny plan on a slice of the embedded corpus; about 30 s on 2 CPU cores)."""

from __future__ import annotations

import csv
import json
import math

import pytest

from hybridlm.cli.main import main
from hybridlm.scaling import ladder
from hybridlm.train import ScheduleSection, TrainConfig
from hybridlm.train.config import ConfigError
from hybridlm.train.optim import lr_at, wsds_decay_points, wsds_decay_windows

# ----------------------------------------------------------------------------------------------------------------------
# The recipe, checked against numbers worked out by hand


def test_recipe_numbers_by_hand():
    plan, configs = ladder.build_plan(["olmo3", "hybrid"], ["60M", "370M"], [0.5, 1, 2, 4, 8])
    runs = {run.name: run for run in plan.runs}
    assert set(runs) == {"olmo3-60m", "olmo3-370m", "hybrid-60m", "hybrid-370m"}
    # N: non-embedding parameters with the LM head, of the actual architecture (reference table: 57.4M, 371.3M, 72.9M,
    # 523.0M).
    assert [runs[n].N for n in ("olmo3-60m", "olmo3-370m", "hybrid-60m", "hybrid-370m")] == [
        57_422_208, 371_262_464, 72_889_824, 523_022_720]

    run = runs["olmo3-60m"]
    # (57,422,208 / 108e6)^(2/3) = 0.656300 -> 327,680 x that = 215,056.6 -> 215,057 tokens; 26.25 sequences of 8192 ->
    # 26 = 212,992 tokens.
    assert run.recipe_batch_tokens == 215_057
    assert (run.batch_sequences, run.batch_tokens, run.seq_len) == (26, 212_992, 8192)
    # 0.0047 x 0.531687^(-1/3) / 2 = 0.0047 x 1.234389 / 2
    assert run.lr == pytest.approx(0.00290078685, rel=1e-9)
    assert run.beta2 == 0.99  # 212,992 < 524,288
    assert run.warmup_steps == 270  # ceil(57,422,208 / 212,992) = ceil(269.6)
    # D = m x 20 x N rounded up to whole steps: 10 N = 574,222,080 -> 2695.98 -> 2,696 steps.
    assert [p.steps for p in run.points] == [2696, 5392, 10784, 21568, 43136]
    assert [p.target_tokens for p in run.points] == [574_222_080, 1_148_444_160, 2_296_888_320, 4_593_776_640,
                                                     9_187_553_280]
    assert [p.tokens for p in run.points] == [steps * 212_992 for steps in (2696, 5392, 10784, 21568, 43136)]
    # Each period decays over its last 10%: period 1 is 2,696 steps -> 270, period 3 is 5,392 -> 539.
    assert [p.pre_decay_step for p in run.points] == [2426, 5122, 10245, 20490, 40979]

    run = runs["hybrid-370m"]
    # (523,022,720 / 108e6)^(2/3) = 2.862406 -> 937,953 tokens -> 114.5 sequences -> 114 = 933,888 tokens, >= 524,288.
    assert (run.recipe_batch_tokens, run.batch_sequences, run.batch_tokens) == (937_953, 114, 933_888)
    assert run.beta2 == 0.95
    assert run.lr == pytest.approx(0.0047 * (523_022_720 / 108e6) ** (-1 / 3) / 2, rel=1e-12)
    assert run.lr == pytest.approx(0.001389000, rel=1e-6)
    assert run.warmup_steps == math.ceil(523_022_720 / 933_888) == 561

    # The config of each multiplier is the prefix of the largest one's: same everything, fewer periods.
    small, large = configs["configs/olmo3-60m-x1.yaml"], configs["configs/olmo3-60m-x8.yaml"]
    assert small.schedule.period_ends == [2696, 5392] and small.trainer.steps == 5392
    assert large.schedule.period_ends == [2696, 5392, 10784, 21568, 43136] and large.trainer.steps == 43136
    assert small.schedule.name == "wsds" and small.schedule.final_lr_ratio == 0.0
    assert small.schedule.decay_fraction == 0.1 and small.schedule.warmup_steps == 270
    assert small.optimizer.betas == (0.9, 0.99) and small.optimizer.weight_decay == 0.1
    assert (small.optimizer.z_loss, small.optimizer.grad_clip) == (1e-5, 1.0)
    assert (small.model.preset, small.model.vocab_size, small.data.batch_size) == ("olmo3-60m", 100352, 26)
    for config in (small, large):
        assert ladder.non_embedding_parameters(config) == 57_422_208


def test_recipe_formulas_and_micro_shapes():
    for N in (2e4, 1e6, 108e6, 7e9):
        assert ladder.recipe_batch_tokens(N) == round(2048 * 160 * (N / 108e6) ** (2 / 3))
        assert ladder.recipe_lr(N) == pytest.approx(0.0047 * (N / 108e6) ** (-1 / 3) / 2, rel=1e-15)
    assert ladder.recipe_batch_tokens(108e6) == 327_680 and ladder.recipe_lr(108e6) == 0.00235
    assert ladder.recipe_beta2(524_288) == 0.95 and ladder.recipe_beta2(524_287) == 0.99
    assert ladder.batch_sequences(1000, 128) == 8 and ladder.batch_sequences(10, 128) == 1
    assert ladder.batch_sequences(215_057, 8192, multiple=8) == 24

    plan, configs = ladder.build_plan(["olmo3", "hybrid"], ["d32"], [1, 2], dataset="embedded", seq_len=128)
    hybrid = configs["configs/hybrid-d32-x2.yaml"].model_config()
    olmo3 = configs["configs/olmo3-d32-x2.yaml"].model_config()
    assert hybrid.layout == "GGGA" and olmo3.layout == "SSSA"
    assert (hybrid.d_model, hybrid.n_heads, hybrid.head_dim, hybrid.mlp_hidden, hybrid.vocab_size) == (32, 2, 16, 128, 8192)
    assert (hybrid.gdn_key_head_dim, hybrid.gdn_value_head_dim) == (16, 32)
    assert olmo3.sliding_window == 64  # half the sequence, as the ladder's 4096 of 8192
    # N counted by hand for olmo3-d32 (d 32, 4 layers, MLP 128, vocab 8192): per layer q,k,v,o 4 x 32 x 32, q/k norms
    # 2 x 32, 2 block norms 2 x 32, SwiGLU 3 x 32 x 128; plus the final norm and the 8192 x 32 LM head.
    per_layer = 4 * 32 * 32 + 2 * 32 + 2 * 32 + 3 * 32 * 128
    assert plan.runs[0].N == 4 * per_layer + 32 + 8192 * 32


def test_plan_errors():
    with pytest.raises(ladder.LadderError, match="unknown ladder size"):
        ladder.build_plan(["olmo3"], ["61m"])
    with pytest.raises(ladder.LadderError, match="unknown architecture"):
        ladder.build_plan(["gpt"], ["60m"])
    with pytest.raises(ladder.LadderError, match="mix"):
        ladder.build_plan(["olmo3"], ["60m", "d32"])
    with pytest.raises(ladder.LadderError, match="repeat"):
        ladder.build_plan(["olmo3"], ["60m"], [1, 1])
    with pytest.raises(ladder.LadderError, match="positive"):
        ladder.build_plan(["olmo3"], ["60m"], [0, 1])
    with pytest.raises(ladder.LadderError, match="fixed by the ladder recipe"):
        ladder.build_plan(["olmo3"], ["60m"], overrides=["data.batch_size=4"])
    with pytest.raises(ladder.LadderError, match="same step"):
        ladder.build_plan(["olmo3"], ["60m"], [1, 1.000001])
    with pytest.raises(ladder.LadderError, match="warmup"):  # warmup (N tokens) past the first decay (at ~0.9 N)
        ladder.build_plan(["olmo3"], ["60m"], [0.05, 1])


# ----------------------------------------------------------------------------------------------------------------------
# WSD-S


def test_wsds_decay_points_match_the_reference():
    # Reference section 15.4: D/N = 10, 20, 40, 80, 160 after decay, pre-decay checkpoints at 9, 19, 38, 76, 152.
    schedule = ScheduleSection(name="wsds", warmup_steps=2, final_lr_ratio=0.0, decay_fraction=0.1,
                               period_ends=[10, 20, 40, 80, 160])
    assert wsds_decay_windows(schedule) == [(9, 10), (19, 20), (38, 40), (76, 80), (152, 160)]
    points = wsds_decay_points(schedule)
    assert points == {9: ("pre_decay", 0), 10: ("post_decay", 0), 19: ("pre_decay", 1), 20: ("post_decay", 1),
                      38: ("pre_decay", 2), 40: ("post_decay", 2), 76: ("pre_decay", 3), 80: ("post_decay", 3),
                      152: ("pre_decay", 4), 160: ("post_decay", 4)}
    lr = [lr_at(step, 1.0, 160, schedule) for step in range(160)]
    assert lr[:2] == [0.5, 1.0]  # warmup
    assert lr[2:9] == [1.0] * 7 and lr[9] == 0.0  # one decay step
    assert lr[10:19] == [1.0] * 9  # back to the peak after the decay
    assert lr[36:40] == [1.0, 1.0, 0.5, 0.0]
    assert lr[72:80] == [1.0] * 4 + [0.75, 0.5, 0.25, 0.0]
    assert lr[80] == 1.0 and lr[151] == 1.0 and lr[152:160] == [0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]
    # A floor other than 0, and a prefix schedule gives the same learning rates over its steps.
    floored = ScheduleSection(name="wsds", warmup_steps=2, final_lr_ratio=0.1, period_ends=[10, 20])
    assert lr_at(9, 2.0, 20, floored) == pytest.approx(0.2)
    prefix = ScheduleSection(name="wsds", warmup_steps=2, final_lr_ratio=0.0, period_ends=[10, 20, 40])
    assert [lr_at(s, 1.0, 40, prefix) for s in range(40)] == lr[:40]
    # Other schedules have no decay points.
    assert wsds_decay_points(ScheduleSection(name="wsd")) == {}


def test_wsds_config_validation():
    base = ["schedule.name=wsds", "trainer.steps=20", "schedule.warmup_steps=2"]
    config = TrainConfig.from_yaml(None, base + ["schedule.period_ends=[5, 20]"])
    assert config.schedule.period_ends == [5, 20]
    assert "period_ends: [5, 20]" in config.to_yaml()
    for ends, message in (("[5, 19]", "ending at trainer.steps=20"), ("[]", "ending at"), ("[10, 5, 20]", "increasing"),
                          ("[0, 20]", "positive")):
        with pytest.raises(ConfigError, match=message):
            TrainConfig.from_yaml(None, base + [f"schedule.period_ends={ends}"])
    with pytest.raises(ConfigError, match="warmup_steps"):
        TrainConfig.from_yaml(None, base + ["schedule.period_ends=[5, 20]", "schedule.warmup_steps=5"])
    with pytest.raises(ConfigError, match="only used by the wsds schedule"):
        TrainConfig.from_yaml(None, ["schedule.name=wsd", "schedule.period_ends=[5]"])


# ----------------------------------------------------------------------------------------------------------------------
# Running a tiny plan


@pytest.fixture
def one_thread():
    """Tiny models train much faster on one thread (and are not slowed by other processes competing for cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from hybridlm.data import ensure_embedded_dataset

    return ensure_embedded_dataset(tmp_path_factory.mktemp("data"), max_files=24, vocab_size=512, progress=False)


def tiny_plan_args(dataset, out, multipliers="0.5,1", *extra):
    # d16 at vocab 512: N = 24,848 (olmo3), a 1,216-token batch (38 x 32); 0.5 tokens/param gives 6 and 11 steps.
    return ["ladder", "plan", "--arch", "olmo3,hybrid", "--sizes", "d16", "--multipliers", multipliers,
            "--out", str(out), "--dataset", str(dataset), "--seq-len", "32", "--tokens-per-param", "0.5",
            "--eval-sequences", "8", "--set", "schedule.warmup_steps=2", "--set", "trainer.device=cpu", *extra]


def test_ladder_run_trains_skips_resumes_and_collects(tiny_dataset, tmp_path, monkeypatch, capsys, one_thread):
    from hybridlm.train import train
    from hybridlm.train.checkpoint import list_checkpoints
    from hybridlm.train.logging import read_metrics

    out = tmp_path / "plan"
    assert main(tiny_plan_args(tiny_dataset, out)) == 0
    plan = ladder.load_plan(out)
    assert [run.name for run in plan.runs] == ["olmo3-d16", "hybrid-d16"]
    olmo3, hybrid = plan.runs
    assert olmo3.N == 24_848 and (olmo3.batch_sequences, olmo3.batch_tokens) == (38, 1216)
    assert [(p.steps, p.pre_decay_step) for p in olmo3.points] == [(6, 5), (11, 10)]
    assert sorted(p.name for p in (out / "configs").iterdir()) == [
        "hybrid-d16-x0.5.yaml", "hybrid-d16-x1.yaml", "olmo3-d16-x0.5.yaml", "olmo3-d16-x1.yaml"]
    assert json.loads((out / "plan.json").read_text())["command"] is None  # main() was called, not the console script

    # The smaller multiplier trained on its own (the hybrid) ...
    alone = train(TrainConfig.from_yaml(out / hybrid.points[0].config), tmp_path / "alone", echo=lambda *a: None)
    # ... and an olmo3 run that an earlier, shorter plan left behind: `ladder run` must extend it, not restart it.
    seeded_dir = ladder.run_directory(out, olmo3)
    seeded = train(TrainConfig.from_yaml(out / olmo3.points[0].config), seeded_dir, echo=lambda *a: None)
    assert [step for step, _ in list_checkpoints(seeded_dir)] == [5, 6]

    lines = []
    statuses = ladder.run_ladder(out, echo=lines.append)
    assert any("olmo3-d16" in line and "resuming from step 6" in line for line in lines)
    assert all(status.done for status in statuses)

    # Checkpoints and evaluations before and after each decay.
    for run in plan.runs:
        run_dir = ladder.run_directory(out, run)
        assert [step for step, _ in list_checkpoints(run_dir)] == [5, 6, 10, 11]
        labelled = [(r["step"], r["decay_point"], r["period"]) for r in read_metrics(run_dir) if "decay_point" in r]
        assert labelled == [(5, "pre_decay", 0), (6, "post_decay", 0), (10, "pre_decay", 1), (11, "post_decay", 1)]
    hybrid_result = statuses[1].results[0]
    # WSD-S prefix property: the long run's post-decay evaluation at x0.5 is the x0.5 config's own result, bit for bit.
    assert hybrid_result.loss == alone.val_loss
    assert statuses[0].results[0].loss == seeded.val_loss

    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:4] == ["arch", "N", "D", "loss"]
    assert set(ladder.RESULT_COLUMNS) == set(rows[0])
    assert [(r["arch"], int(r["N"]), int(r["D"]), r["multiplier"]) for r in rows] == [
        ("olmo3", 24_848, 6 * 1216, "0.5"), ("olmo3", 24_848, 11 * 1216, "1"),
        ("hybrid", hybrid.N, 6 * hybrid.batch_tokens, "0.5"), ("hybrid", hybrid.N, 11 * hybrid.batch_tokens, "1")]
    assert float(rows[2]["loss"]) == pytest.approx(alone.val_loss, abs=1e-6)
    assert all(float(r["pre_decay_loss"]) > 0 and float(r["val_bpb"]) > 0 for r in rows)
    results_before = (out / "results.csv").read_text()

    # Finished runs are skipped: no training happens, and results.csv is the same.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("hybridlm.train.train", no_training)
    lines.clear()
    ladder.run_ladder(out, echo=lines.append)
    assert lines == ["olmo3-d16: done, skipped", "hybrid-d16: done, skipped"]
    assert (out / "results.csv").read_text() == results_before
    capsys.readouterr()
    assert main(["ladder", "status", str(out)]) == 0
    assert capsys.readouterr().out.count(" done ") == 2

    monkeypatch.undo()

    # A larger multiplier extends both runs, here in two worker processes: they resume after the old last decay.
    assert main(tiny_plan_args(tiny_dataset, out, "0.5,1,2")) == 0
    lines.clear()
    statuses = ladder.run_ladder(out, workers=2, threads=1, echo=lines.append)
    assert sum("finished" in line for line in lines) == 2, lines
    assert [p.steps for p in statuses[0].run.points] == [6, 11, 21] and all(s.done for s in statuses)
    assert "resuming from step 11" in (out / "logs" / "hybrid-d16.log").read_text()
    with (out / "results.csv").open() as handle:
        extended = list(csv.DictReader(handle))
    assert [r["multiplier"] for r in extended] == ["0.5", "1", "2"] * 2
    assert [r["loss"] for r in extended if r["multiplier"] != "2"] == [r["loss"] for r in rows]

    # One run is never trained by two processes at once.
    with ladder._run_lock(ladder.run_directory(out, hybrid)):
        with pytest.raises(ladder.LadderError, match="another `hybridlm ladder run` process"):
            with ladder._run_lock(ladder.run_directory(out, hybrid)):
                pass

    # Re-planning the same directory with another config (but more multipliers, so there is work to do) is refused.
    assert main(tiny_plan_args(tiny_dataset, out, "0.5,1,2,4", "--set", "optimizer.weight_decay=0.05")) == 0
    with pytest.raises(ladder.LadderError, match="optimizer.weight_decay"):
        ladder.run_ladder(out, only=["olmo3-d16"], echo=lines.append)
    with pytest.raises(ladder.LadderError, match="not runs of"):
        ladder.run_ladder(out, only=["olmo3-d99"])
