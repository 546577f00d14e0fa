"""`ladder estimate`: the per-step and per-evaluation timing of a run and the projected wall time of `ladder run`
(a tiny plan on a slice of the embedded corpus; a few seconds on 2 CPU cores)."""

from __future__ import annotations

import pytest

from hybridlm.cli.main import main
from hybridlm.scaling import ladder


def fake_estimate(name: str, N: int, steps: int, step_seconds: float, eval_seconds: float = 0.0):
    point = ladder.LadderPoint(1.0, steps, steps, steps * 100, steps - 1, f"configs/{name}-x1.yaml")
    run = ladder.LadderRun(name, "olmo3", "d16", N, 32, 100, 1, 100, 1e-3, 0.99, 1, (point,))
    return ladder.RunEstimate(run, step_seconds, eval_seconds)


def test_run_seconds_and_projected_wall_time_by_hand():
    # One point: 10 steps of 2 s and two evaluations (before and after its decay) of 0.5 s.
    assert fake_estimate("a", 1000, 10, 2.0, 0.5).seconds == pytest.approx(21.0)
    # Largest 6ND first, each to the first free worker: with 2 workers c (50 s) and b (40 s) start at once; b's
    # worker frees first, at 40 s, so a (30 s) ends at 70 s, after c (50 s).
    a, b, c = fake_estimate("a", 1000, 20, 1.5), fake_estimate("b", 2000, 20, 2.0), fake_estimate("c", 3000, 20, 2.5)
    assert [e.run.flops for e in (a, b, c)] == [6 * 1000 * 2000, 6 * 2000 * 2000, 6 * 3000 * 2000]
    assert ladder.projected_wall_seconds([a, b, c], workers=2) == pytest.approx(70.0)
    assert ladder.projected_wall_seconds([a, b, c], workers=1) == pytest.approx(120.0)
    assert ladder.projected_wall_seconds([a, b, c], workers=3) == pytest.approx(50.0)
    with pytest.raises(ladder.LadderError, match="workers must be at least 1"):
        ladder.projected_wall_seconds([a], workers=0)


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    from hybridlm.data import ensure_embedded_dataset

    dataset = ensure_embedded_dataset(tmp_path_factory.mktemp("data"), max_files=24, vocab_size=512, progress=False)
    out = tmp_path_factory.mktemp("plan")
    assert main(["ladder", "plan", "--arch", "olmo3,hybrid", "--sizes", "d16", "--multipliers", "0.5,1",
                 "--out", str(out), "--dataset", str(dataset), "--seq-len", "32", "--tokens-per-param", "0.5",
                 "--eval-sequences", "8", "--set", "schedule.warmup_steps=2", "--set", "trainer.device=cpu"]) == 0
    return out


def test_estimate_times_steps_without_touching_the_plan(tiny_plan, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        estimates = ladder.estimate_ladder(tiny_plan, steps=3, threads=1, echo=lambda line: None)
    finally:
        torch.set_num_threads(before)
    plan = ladder.load_plan(tiny_plan)
    assert [e.run.name for e in estimates] == [run.name for run in plan.runs]
    for estimate in estimates:
        assert 0 < estimate.step_seconds < 30 and 0 <= estimate.eval_seconds < 30
        run = estimate.run
        assert estimate.seconds == pytest.approx(run.steps * estimate.step_seconds + 4 * estimate.eval_seconds)
    assert not (tiny_plan / ladder.RUNS_DIR).exists()  # timing trains in a scratch directory, never in the plan's

    with pytest.raises(ladder.LadderError, match="at least 2"):
        ladder.estimate_run(tiny_plan, plan.runs[0], steps=1)
    with pytest.raises(ladder.LadderError, match="not runs of"):
        ladder.estimate_ladder(tiny_plan, only=["olmo3-d999"])

    capsys.readouterr()
    assert main(["ladder", "estimate", str(tiny_plan), "--workers", "2", "--threads", "1", "--steps", "2",
                 "--only", "olmo3-d16"]) == 0
    out = capsys.readouterr().out
    assert "olmo3-d16:" in out and "s/step" in out and "1 runs:" in out and "with 2 worker(s)" in out
    assert main(["ladder", "estimate", str(tiny_plan), "--workers", "0"]) == 2
    torch.set_num_threads(before)
