"""The typed training config: YAML, overrides, validation, and the shipped recipes."""

from pathlib import Path

import pytest
import yaml

from hybridlm.models import FAMILIES
from hybridlm.train.config import ConfigError, TrainConfig, apply_override, tokenizer_vocab_to_model_vocab
from hybridlm.train.recipes import LADDER_SIZES, all_recipes, ladder_recipe, olmo_hybrid_7b_recipe, render

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_validate_and_round_trip(tmp_path):
    config = TrainConfig.from_yaml(None)
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml())
    assert TrainConfig.from_yaml(path) == config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 1e-3\ntrainer:\n  steps: 7\n")
    config = TrainConfig.from_yaml(
        path,
        [
            "optimizer.betas=[0.8, 0.9]",
            "trainer.compile=true",
            "model.overrides.n_layers=2",
            "trainer.wandb_project=demo",
            "schedule.name=wsd",
            "schedule.warmup_steps=3",
        ],
    )
    assert config.optimizer.lr == 1e-3  # YAML 1.1 reads "1e-3" as a string; the typed reader converts it
    assert config.optimizer.betas == (0.8, 0.9)
    assert config.trainer.steps == 7 and config.trainer.compile is True
    assert config.model.overrides == {"n_layers": 2}
    assert config.model_config().n_layers == 2
    assert config.schedule.name == "wsd"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr", "section.key=value"),
        ("lr=1", "section.key=value"),
        ("optim.lr=1", "unknown section 'optim'"),
        ("optimizer.learning_rate=1", "unknown keys in section 'optimizer'"),
        ("trainer.steps=ten", "trainer.steps must be an integer"),
        ("trainer.compile=maybe", "trainer.compile must be true or false"),
        ("optimizer.betas=[0.9]", "optimizer.betas must be a list of 2 values"),
        ("optimizer.lr=-1", "optimizer.lr must be positive"),
        ("schedule.name=exponential", "schedule.name must be one of"),
        ("trainer.precision=fp8", "trainer.precision must be one of"),
        ("model.preset=hybrid-3t", "unknown preset 'hybrid-3t'"),
        ("model.overrides.n_layerz=3", "unknown HybridConfig fields"),
        ("trainer.micro_batch_size=5", "must be a multiple of trainer.micro_batch_size"),
        ("trainer.device=tpu", "trainer.device must be"),
        ("trainer.gdn_impl=cuda-magic", "trainer.gdn_impl must be one of"),
    ],
)
def test_bad_config_is_a_clear_error(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        TrainConfig.from_yaml(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        TrainConfig.from_yaml(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("model: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "section.yaml").write_text("model:\n  - 1\n")
    with pytest.raises(ConfigError, match="section 'model' must be a mapping"):
        TrainConfig.from_yaml(tmp_path / "section.yaml")


def test_several_problems_are_listed_together():
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_yaml(None, ["optimizer.lr=0", "trainer.steps=0", "data.seq_len=0"])
    text = str(info.value)
    assert "optimizer.lr" in text and "trainer.steps" in text and "data.seq_len" in text


def test_override_into_a_value_is_refused():
    values = {"trainer": {"steps": 3}}
    with pytest.raises(ConfigError, match="holds a value"):
        apply_override(values, "trainer.steps.deeper=1")


def test_model_vocab_from_tokenizer():
    assert tokenizer_vocab_to_model_vocab(8000) == 8064
    assert tokenizer_vocab_to_model_vocab(8064) == 8064
    config = TrainConfig()
    model = config.model_config(vocab_size=8064, eos_token_id=0, pad_token_id=1)
    assert (model.vocab_size, model.eos_token_id, model.pad_token_id) == (8064, 0, 1)
    pinned = TrainConfig.from_yaml(None, ["model.vocab_size=4096"]).model_config(vocab_size=8064, eos_token_id=0)
    assert pinned.vocab_size == 4096


def test_ladder_recipe_numbers():
    recipe = ladder_recipe("hybrid", "60m")
    # N = 72.9M non-embedding parameters (reference 15.3): batch round(2048*160*(N/108M)^(2/3)) tokens.
    assert recipe.data.seq_len == 8192 and recipe.data.batch_size == 31
    assert recipe.optimizer.betas == (0.9, 0.99)  # batch under 524,288 tokens
    assert recipe.optimizer.lr == pytest.approx(0.0047 * (72.9 / 108) ** (-1 / 3) / 2, rel=2e-3)
    assert recipe.schedule.name == "wsd"
    big = ladder_recipe("olmo3", "1b")
    assert big.optimizer.betas == (0.9, 0.95)  # batch over 524,288 tokens
    seven = olmo_hybrid_7b_recipe()
    assert seven.optimizer.lr == 3e-4 and seven.schedule.warmup_steps == 2000
    assert seven.schedule.name == "cosine" and seven.schedule.final_lr_ratio == 0.1
    assert seven.data.seq_len * seven.data.batch_size == 4194304
    assert (seven.optimizer.weight_decay, seven.optimizer.z_loss, seven.optimizer.grad_clip) == (0.1, 1e-5, 1.0)


def test_shipped_configs_are_current_and_valid():
    recipes = all_recipes()
    assert len(recipes) == 2 + len(FAMILIES) * len(LADDER_SIZES)
    assert recipes["default.yaml"] == TrainConfig()
    for relative, config in recipes.items():
        path = CONFIGS / relative
        assert path.is_file(), f"{path} is missing: run `python -m hybridlm.train.recipes configs/`"
        assert path.read_text() == render(relative, config), f"{path} is stale: regenerate the configs"
        loaded = TrainConfig.from_yaml(path)
        assert loaded == config
        assert yaml.safe_load(path.read_text())["model"]["preset"] == config.model.preset
    for path in CONFIGS.rglob("*.yaml"):
        TrainConfig.from_yaml(path)  # every shipped config (hand-written ones too) validates
