"""Long-context extension options: trainer.init_from and model.rope (keep / drop / yarn)."""

from __future__ import annotations

import json

import pytest
import torch

from hybridlm.models import get_preset
from hybridlm.train import ConfigError, TrainConfig, train
from hybridlm.train.checkpoint import load_model_from_run_dir
from hybridlm.train.extend import apply_rope_mode, inspect_init_source, load_initial_weights


@pytest.fixture(scope="module")
def source_run(tiny_config, tmp_path_factory):
    """A 3-step run of the tiny hybrid (RoPE theta 10000) at seq_len 32."""
    config = tiny_config("trainer.steps=3", "trainer.eval_every=0", "trainer.checkpoint_every=0",
                         "model.overrides.rope_theta=10000.0")
    run_dir = tmp_path_factory.mktemp("source") / "run"
    train(config, run_dir, progress=False, echo=lambda *a: None)
    return run_dir


def test_apply_rope_mode():
    config = get_preset("hybrid-tiny", rope_theta=10000.0)
    assert apply_rope_mode(config, "keep", seq_len=64, source=None) == config
    dropped = apply_rope_mode(config, "drop", seq_len=64, source=None)
    assert dropped.rope_theta is None and dropped.rope_scaling is None
    source = type("Source", (), {"trained_seq_len": 16})()
    yarn = apply_rope_mode(config, "yarn", seq_len=64, source=source)
    assert yarn.rope_theta == 10000.0
    assert yarn.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                 "beta_fast": 32.0, "beta_slow": 1.0}
    with pytest.raises(ConfigError, match="needs the length the model was trained at"):
        apply_rope_mode(config, "yarn", seq_len=64, source=None)
    with pytest.raises(ConfigError, match="has no RoPE"):
        apply_rope_mode(dropped, "yarn", seq_len=64, source=source)
    with pytest.raises(ConfigError, match="not longer than the source's training length 16"):
        apply_rope_mode(config, "yarn", seq_len=16, source=source)
    with pytest.raises(ConfigError, match="remove model.overrides.rope_scaling"):
        apply_rope_mode(config, "yarn", seq_len=64, source=source, explicit_scaling=True)
    with pytest.raises(ConfigError, match="model.rope must be one of"):
        apply_rope_mode(config, "nope", seq_len=64, source=None)


def test_config_takes_the_source_architecture(source_run, tiny_config):
    source = inspect_init_source(source_run)
    assert source.kind == "run" and source.trained_seq_len == 32
    config = tiny_config(f"trainer.init_from={source_run}", "model.preset=hybrid-mini", "data.seq_len=128",
                         "model.rope=drop", "model.overrides.max_seq_len=4096")
    model_config = config.model_config(vocab_size=99999)
    assert model_config.d_model == source.config.d_model and model_config.vocab_size == source.config.vocab_size
    assert model_config.rope_theta is None and model_config.max_seq_len == 4096
    yarn = tiny_config(f"trainer.init_from={source_run}", "data.seq_len=128", "model.rope=yarn").model_config()
    assert yarn.rope_scaling["factor"] == 4.0 and yarn.rope_scaling["original_max_position_embeddings"] == 32
    with pytest.raises(ConfigError, match="is not a directory"):
        tiny_config("trainer.init_from=/nonexistent/run")
    with pytest.raises(ConfigError, match="model.rope must be one of"):
        tiny_config("model.rope=rope")


def test_initial_weights_are_the_source_weights(source_run, tiny_config, tmp_path):
    source_model = load_model_from_run_dir(source_run)
    config = tiny_config(f"trainer.init_from={source_run}", "data.seq_len=64", "model.rope=drop")
    model = type(source_model)(config.model_config())
    message = load_initial_weights(model, source_run)
    assert "NoPE" in message
    for (name, mine), (_, theirs) in zip(model.state_dict().items(), source_model.state_dict().items()):
        assert torch.equal(mine, theirs), name
    # The same weights from a Hugging Face export.
    hf_dir = tmp_path / "hf"
    source_model.save_pretrained(hf_dir)
    model = type(source_model)(source_model.config)
    load_initial_weights(model, hf_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source_model.state_dict().values()))


@pytest.mark.parametrize("rope", ["drop", "yarn"])
def test_continue_training_at_a_longer_length(source_run, tiny_config, tmp_path, rope):
    config = tiny_config(f"trainer.init_from={source_run}", "data.seq_len=64", "data.batch_size=2",
                         f"model.rope={rope}", "trainer.steps=2", "trainer.eval_every=0", "trainer.checkpoint_every=0")
    lines = []
    result = train(config, tmp_path / "run", progress=False, echo=lines.append)
    assert result.step == 2 and any(line.startswith(f"initialised from {source_run}") for line in lines)
    saved = json.loads((tmp_path / "run" / "model_config.json").read_text())
    if rope == "drop":
        assert saved["rope_theta"] is None and saved["rope_scaling"] is None
    else:
        assert saved["rope_theta"] == 10000.0 and saved["rope_scaling"]["factor"] == 2.0
    assert TrainConfig.from_yaml(tmp_path / "run" / "config.yaml").trainer.init_from == str(source_run)


def test_a_different_tokenizer_is_refused(source_run, tiny_config, tmp_path):
    (tmp_path / "other.json").write_text((source_run / "tokenizer.json").read_text().replace('"<|pad|>"', '"<|PAD|>"'))
    from hybridlm.data.tokenizer import Tokenizer

    model = load_model_from_run_dir(source_run)
    with pytest.raises(ConfigError, match="differs from the dataset's tokenizer"):
        load_initial_weights(model, source_run, Tokenizer(tmp_path / "other.json"))
