"""The training loop end to end on a tiny model: run directory, exact resume, full disk, skipped
steps, bad input, export, and the default command."""

from __future__ import annotations

import errno
import functools
import json
import math

import pytest
import torch
import yaml

from hybridlm.train import CheckpointWriteError, ConfigError, TrainConfig, TrainingError, list_checkpoints, train
from hybridlm.train import checkpoint as checkpoint_module
from hybridlm.train import trainer as trainer_module
from hybridlm.train.checkpoint import load_model_from_run_dir
from hybridlm.train.logging import read_metrics

# Values that must be bit-identical between an uninterrupted and a resumed run on CPU.
EXACT_KEYS = ("step", "tokens", "train_loss", "z_loss", "lr", "grad_norm", "val_loss", "val_bpb", "skipped_steps")


def exact(records):
    return [{k: r[k] for k in EXACT_KEYS if k in r} for r in records]


@pytest.fixture(scope="module")
def reference_run(tiny_config, tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints at steps 3 and 6)."""
    config = tiny_config()
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = train(config, run_dir, progress=False, echo=lambda *a: None)
    return config, run_dir, result


def test_run_directory_layout(reference_run):
    config, run_dir, result = reference_run
    assert (result.step, result.tokens) == (6, 6 * 4 * 32)
    assert TrainConfig.from_yaml(run_dir / "config.yaml") == config
    model_config = json.loads((run_dir / "model_config.json").read_text())
    assert model_config["vocab_size"] == 512  # the tokenizer's 512, already a multiple of 128
    assert (model_config["eos_token_id"], model_config["pad_token_id"]) == (0, 1)  # from the tokenizer
    assert (run_dir / "tokenizer.json").is_file() and (run_dir / "loss_curve.png").stat().st_size > 1000
    assert [step for step, _ in list_checkpoints(run_dir)] == [3, 6]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        assert {"step", "tokens", "train_loss", "lr", "tokens_per_s"} <= set(record)
        assert math.isfinite(record["train_loss"]) and record["tokens_per_s"] > 0
    evaluated = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [3, 6]
    assert all(0 < r["val_bpb"] < r["val_loss"] for r in evaluated)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert result.val_loss < result.first_val_loss
    state = json.loads((run_dir / "checkpoints" / "step0000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["loader"]["position"] > 0 and len(state["skip_guard"]["losses"]) == 6


def test_full_disk_mid_save_leaves_no_checkpoint_and_resume_is_exact(reference_run, tmp_path, monkeypatch):
    config, reference_dir, _ = reference_run
    run_dir = tmp_path / "run"
    real_write = checkpoint_module._write_file

    def full_disk_at_step_6(path, data):
        if path.name == "trainer_state.json" and json.loads(data)["step"] == 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(checkpoint_module, "_write_file", full_disk_at_step_6)
    with pytest.raises(CheckpointWriteError, match="no space left on device") as info:
        train(config, run_dir, progress=False, echo=lambda *a: None)
    assert info.value.errno == errno.ENOSPC
    assert [step for step, _ in list_checkpoints(run_dir)] == [3]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step0000003"], "no temporary left behind"

    monkeypatch.setattr(checkpoint_module, "_write_file", real_write)
    lines = []
    result = train(config, run_dir, resume=True, progress=False, echo=lines.append)
    assert any("resumed from" in line and "step 3" in line for line in lines)
    assert result.step == 6
    assert exact(read_metrics(run_dir)) == exact(read_metrics(reference_dir)), "resumed losses must be bit-identical"
    resumed, uninterrupted = load_model_from_run_dir(run_dir), load_model_from_run_dir(reference_dir)
    for (name, a), (_, b) in zip(resumed.state_dict().items(), uninterrupted.state_dict().items()):
        assert torch.equal(a, b), name


def test_keep_last_and_refuse_to_clobber(tiny_config, tmp_path):
    from hybridlm.cli.main import main

    config = tiny_config("trainer.steps=4", "trainer.checkpoint_every=1", "trainer.keep_last=2", "trainer.eval_every=0")
    run_dir = tmp_path / "run"
    train(config, run_dir, progress=False, echo=lambda *a: None)
    assert [step for step, _ in list_checkpoints(run_dir)] == [3, 4]
    assert main(["train", "--run-dir", str(run_dir), "--set", "trainer.steps=4"]) == 2  # would overwrite a run


def test_non_finite_step_is_skipped_not_applied(tiny_config, tmp_path, monkeypatch):
    real_loss = trainer_module.model_loss_sums
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        sums = real_loss(*args, **kwargs)
        if calls["n"] == 2:  # the second micro-batch = step 2 (one micro-batch per step)
            sums.cross_entropy = sums.cross_entropy * float("nan")
        return sums

    monkeypatch.setattr(trainer_module, "model_loss_sums", poisoned)
    lines = []
    config = tiny_config("trainer.steps=3", "trainer.eval_every=0", "trainer.checkpoint_every=0")
    result = train(config, tmp_path / "run", progress=False, echo=lines.append)
    assert result.skipped_steps == 1
    assert any(line.startswith("step 2: skipped (non-finite loss") for line in lines)
    records = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    assert records[2]["skipped"] is True and "skipped" not in records[3]
    model = load_model_from_run_dir(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["model.vocab_size=256"], ConfigError, "smaller than the tokenizer's vocabulary"),
        (["model.overrides.max_seq_len=16"], ConfigError, "longer than the model supports"),
        (["data.dataset=/nonexistent/dataset"], TrainingError, "no dataset directory"),
        (["data.seq_len=4000"], TrainingError, "too few for one instance"),
    ],
)
def test_bad_input_is_a_clear_error(tiny_config, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        train(tiny_config(*overrides), tmp_path / "run", progress=False, echo=lambda *a: None)
    assert not list_checkpoints(tmp_path / "run")


def test_empty_and_unwritable(tiny_config, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="no meta.json"):
        train(tiny_config(f"data.dataset={tmp_path / 'empty'}"), tmp_path / "run", progress=False)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(TrainingError, match="not writable"):
        train(tiny_config(), tmp_path / "a-file" / "run", progress=False)


def test_export_to_hugging_face_format(reference_run, tmp_path):
    from hybridlm.cli.common import load_model_and_tokenizer
    from hybridlm.cli.main import main
    from hybridlm.models import HybridLM

    _, run_dir, _ = reference_run
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert (tokenizer_config["eos_token"], tokenizer_config["pad_token"]) == ("<|endoftext|>", "<|pad|>")
    exported = HybridLM.from_pretrained(out).eval()
    trained = load_model_from_run_dir(run_dir)
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained(ids).logits, rtol=0, atol=0)
    for path in (run_dir, out, run_dir / "checkpoints" / "step0000003"):
        model, tokenizer = load_model_and_tokenizer(path)
        assert tokenizer is not None and tokenizer.vocab_size == 512
        assert model.config.vocab_size == 512
    assert main(["export", str(run_dir), str(tmp_path / "x"), "--step", "5"]) == 1  # no such checkpoint


def test_default_command_smoke(tmp_path, monkeypatch, capsys):
    """`hybridlm train` with the default config (hybrid-mini on the embedded corpus), 2 steps, on a
    24-file slice of the corpus so the test stays fast."""
    import hybridlm.data.embedded as embedded
    from hybridlm.cli.main import main

    monkeypatch.setattr(
        embedded,
        "ensure_embedded_dataset",
        functools.partial(embedded.ensure_embedded_dataset, tmp_path / "cache", max_files=24, progress=False),
    )
    run_dir = tmp_path / "run"
    code = main(["train", "--run-dir", str(run_dir), "--no-progress", "--set", "trainer.steps=2",
                 "--set", "trainer.eval_sequences=4", "--set", "trainer.sample_tokens=8"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "model hybrid-mini: GGGAGGGA" in out and "sample:" in out
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["preset"] == "hybrid-mini" and saved["trainer"]["steps"] == 2
    assert [step for step, _ in list_checkpoints(run_dir)] == [2]


def test_tensorboard_and_wandb_only_when_installed(tiny_config, tmp_path):
    """Asked-for logging backends either work or fail up front with the pip command that fixes it."""
    import importlib.util

    from hybridlm.train.logging import MetricsLogger

    for override, module, hint in (
        ("trainer.tensorboard=true", "tensorboard", "pip install tensorboard"),
        ("trainer.wandb_project=demo", "wandb", "pip install wandb"),
    ):
        config = tiny_config(override)
        if importlib.util.find_spec(module) is None:
            with pytest.raises(ImportError, match=hint):
                MetricsLogger(tmp_path, config)
        elif module == "tensorboard":
            logger = MetricsLogger(tmp_path, config)
            logger.log(step=1, train_loss=1.0)
            logger.close()
            assert any((tmp_path / "tensorboard").iterdir())


def test_failing_sample_is_reported_after_the_run(tiny_config, tmp_path, monkeypatch, capsys):
    from hybridlm.cli.main import main

    def broken(*args, **kwargs):
        raise RuntimeError("generation broke")

    monkeypatch.setattr(trainer_module, "generate_sample", broken)
    config = tmp_path / "c.yaml"
    config.write_text(tiny_config("trainer.steps=1", "trainer.sample_tokens=4").to_yaml())
    assert main(["train", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "val loss" in captured.out and "checkpoint:" in captured.out  # the summary still comes
    assert "generating the sample" in captured.err and "generation broke" in captured.err
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [1]
