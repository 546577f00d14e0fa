"""Held-out loss, bits per byte and loss by position against a direct computation; the CLI; bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybridlm.cli.main import main
from hybridlm.data import TokenDataset, document_ids
from hybridlm.evaluate import evaluate_loss, plot_loss_by_position
from hybridlm.evaluate import limits as limits_module
from hybridlm.evaluate.loss import binned_position_loss


def direct_losses(model, dataset, seq_len, indices, document_masking=False):
    """Per-position cross-entropy [n, seq_len] and predicted-text bytes, one window at a time."""
    split = dataset.split("val")
    byte_lengths = dataset.tokenizer.token_byte_lengths
    losses, n_bytes = [], 0
    for index in indices:
        window = torch.from_numpy(split.instance(int(index), seq_len).astype(np.int64))[None]
        inputs, labels = window[:, :-1], window[:, 1:]
        doc_ids = document_ids(inputs, dataset.eos_id) if document_masking else None
        with torch.no_grad():
            logits = model(inputs, doc_ids=doc_ids).logits
        losses.append(F.cross_entropy(logits[0].double(), labels[0], reduction="none"))
        n_bytes += int(byte_lengths[labels[0].numpy()].sum())
    return torch.stack(losses), n_bytes


@pytest.mark.parametrize("document_masking", [False, True])
def test_loss_and_bpb_equal_a_direct_computation(make_eval_model, eval_dataset, document_masking):
    model = make_eval_model()
    dataset = TokenDataset(eval_dataset)
    seq_len, max_instances = 96, 5
    result = evaluate_loss(model, dataset, seq_len=seq_len, batch_size=2, max_instances=max_instances,
                           document_masking=document_masking)
    available = dataset.split("val").num_instances(seq_len)
    indices = np.arange(max_instances) * available // max_instances  # EvalLoader's spread
    losses, n_bytes = direct_losses(model, dataset, seq_len, indices, document_masking)
    assert result.instances == max_instances and result.tokens == max_instances * seq_len
    assert result.bytes == n_bytes
    assert result.loss == pytest.approx(float(losses.mean()), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(float(losses.sum()) / (math.log(2) * n_bytes), rel=1e-5)
    np.testing.assert_allclose(result.position_loss, losses.mean(0).numpy(), rtol=1e-4, atol=1e-5)
    assert result.position_loss.shape == (seq_len,)


def test_uniform_model_has_loss_log_vocab_at_every_position(eval_dataset):
    """Near-zero weights predict uniformly: the loss is ln(vocab) at every position and bpb follows from it."""
    from hybridlm.models import HybridConfig, HybridLM

    dataset = TokenDataset(eval_dataset)
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(vocab_size=384, d_model=16, n_layers=1, n_heads=1, mlp_hidden=16, layer_pattern="A",
                                  rope_theta=None, init_std=1e-4, max_seq_len=256, eos_token_id=0, pad_token_id=1))
    result = evaluate_loss(model.eval(), dataset, seq_len=64, batch_size=4, max_instances=8)
    np.testing.assert_allclose(result.position_loss, math.log(384), rtol=1e-3)
    assert result.bits_per_byte == pytest.approx(result.tokens * math.log(384) / (math.log(2) * result.bytes), rel=1e-3)


def test_binned_position_loss_and_plot(tmp_path, make_eval_model, eval_dataset):
    position_loss = np.linspace(5.0, 3.0, 300)
    xs, ys = binned_position_loss(position_loss, bins=20)
    assert np.all(np.diff(xs) > 0) and np.all(np.diff(ys) < 0)
    assert xs[0] == 1 and xs[-1] <= 300 and ys[0] == pytest.approx(5.0)
    result = evaluate_loss(make_eval_model(), TokenDataset(eval_dataset), seq_len=64, batch_size=4, max_instances=4)
    path = plot_loss_by_position({"a": result, "b": result}, tmp_path / "plots" / "loss.png", train_lengths={"a": 32})
    assert path.is_file() and path.stat().st_size > 5000


def test_eval_loss_command_writes_results(tmp_path, hf_checkpoint, eval_dataset, capsys):
    out = tmp_path / "out"
    code = main(["eval", "loss", str(hf_checkpoint), str(hf_checkpoint), "--data", str(eval_dataset), "--seq-len", "64",
                 "--max-instances", "6", "--batch-size", "3", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "loss.json").read_text())
    assert summary["seq_len"] == 64 and set(summary["models"]) == {"tiny-hybrid", "tiny-hybrid-1"}
    first = summary["models"]["tiny-hybrid"]
    from hybridlm.models import HybridLM

    expected = evaluate_loss(HybridLM.from_pretrained(hf_checkpoint), TokenDataset(eval_dataset), seq_len=64,
                             batch_size=2, max_instances=6)
    assert first["loss"] == pytest.approx(expected.loss, rel=1e-5)
    assert first["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-5)
    csv = np.loadtxt(out / "loss_by_position.csv", delimiter=",", skiprows=1)
    assert csv.shape == (64, 3) and csv[0, 0] == 1 and csv[-1, 0] == 64
    assert (out / "loss_by_position.png").stat().st_size > 5000
    assert "bits per byte" in capsys.readouterr().out


def test_bad_input_fails_before_any_work(tmp_path, make_eval_model, eval_dataset, hf_checkpoint, capsys, monkeypatch):
    dataset = TokenDataset(eval_dataset)
    model = make_eval_model()
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 1024"):
        evaluate_loss(model, dataset, seq_len=4096)
    monkeypatch.setattr(limits_module, "available_memory", lambda device: 10 * 2**20)
    with pytest.raises(ValueError, match="lower --batch-size or --seq-len"):
        evaluate_loss(model, dataset, seq_len=1024, batch_size=64)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="different tokenizer"):
        evaluate_loss(make_eval_model(vocab_size=256, eos_token_id=0, pad_token_id=1), dataset, seq_len=32)

    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text((hf_checkpoint / "config.json").read_text())
    assert main(["eval", "loss", str(empty), "--data", str(eval_dataset)]) == 2
    assert "no weights" in capsys.readouterr().err
    run_dir = tmp_path / "run-without-checkpoints"
    run_dir.mkdir()
    (run_dir / "model_config.json").write_text("{}")
    assert main(["eval", "loss", str(run_dir), "--data", str(eval_dataset)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main(["eval", "loss", str(hf_checkpoint), "--data", str(eval_dataset), "--seq-len", "5000"]) == 2
    assert "--max-seq-len 5000" in capsys.readouterr().err
    assert main(["eval", "loss", str(hf_checkpoint), "--data", str(tmp_path / "missing")]) == 2
    assert "no dataset directory" in capsys.readouterr().err
