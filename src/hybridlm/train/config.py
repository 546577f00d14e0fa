"""The training configuration: five typed sections read from YAML, overridable on the command line.

    model:      which architecture (a preset plus field overrides); builds a `HybridConfig`
    data:       which dataset, tokenizer, sequence length and global batch
    optimizer:  AdamW, gradient clipping, z-loss and the skip-step rule
    schedule:   the learning-rate schedule (cosine, linear, WSD, constant), with warmup
    trainer:    steps, micro-batch, precision, compile, activation checkpointing, evaluation,
                checkpoints, logging, the final sample

`TrainConfig.from_yaml(path, overrides=["optimizer.lr=1e-3", ...])` reads a file (missing keys keep
their defaults), applies `section.key=value` overrides (values parsed as YAML, so `true`, `1e-3` and
`[0.9, 0.95]` mean what they look like), checks every key and type, and `validate()` checks ranges.
`to_yaml()` writes the resolved config that the run directory keeps.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCHEDULES = ("cosine", "linear", "wsd", "wsds", "constant")
PRECISIONS = ("auto", "float32", "bfloat16")


class ConfigError(ValueError):
    """A configuration that cannot be used, with what was wrong and what was expected."""


@dataclass
class ModelSection:
    """The architecture: a preset (`hybridlm info --list`) and HybridConfig field overrides.

    vocab_size None: the tokenizer's vocabulary rounded up to a multiple of 128 (eos/pad ids from the
    tokenizer too); an explicit vocab_size must hold the tokenizer's vocabulary.
    """

    preset: str = "hybrid-mini"
    vocab_size: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    rope: str = "keep"  # keep | drop (DRoPE) | yarn: positional encoding of attention layers (train/extend.py)


@dataclass
class DataSection:
    """Training data: a prepared dataset directory, or "embedded" for the bundled stdlib corpus.

    batch_size is the global batch in sequences (all ranks and accumulation steps together), so a
    run's result does not depend on how many processes share it.
    """

    dataset: str = "embedded"
    seq_len: int = 256
    batch_size: int = 8
    intra_document_masking: bool = True
    seed: int = 1234


@dataclass
class OptimizerSection:
    """AdamW without weight decay on norms, biases, embeddings, A_log and dt_bias.

    A step whose loss or gradient norm is not finite is always skipped (not applied). skip_step also
    skips spikes: a loss or gradient norm more than skip_sigma standard deviations above the mean of
    the last skip_window applied steps (once skip_min_history of them are known).
    """

    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    z_loss: float = 1e-5  # 0 disables the z-loss
    skip_step: bool = True
    skip_sigma: float = 6.0
    skip_window: int = 128
    skip_min_history: int = 20


@dataclass
class ScheduleSection:
    """Learning rate over the run: linear warmup, then `name`'s shape down to final_lr_ratio * lr.

    cosine: half cosine from lr to the floor; linear: straight line to the floor; wsd: constant,
    then a linear decay over the last decay_fraction of the steps; constant: lr after warmup.
    wsds (WSD-S, Wen et al. 2024): the run is cut into periods ending at the steps `period_ends`
    (the last one is trainer.steps); each period holds lr, then decays linearly to the floor over
    its last decay_fraction, and the next period starts again at lr from the decayed weights. The
    trainer evaluates and checkpoints before and after every decay (the scaling ladder's D points).
    """

    name: str = "cosine"
    warmup_steps: int = 20
    final_lr_ratio: float = 0.1
    decay_fraction: float = 0.1  # wsd and wsds
    period_ends: list[int] = field(default_factory=list)  # wsds only: the step that ends each period


@dataclass
class TrainerSection:
    """The loop: length, batch split, numerics, evaluation, checkpoints, logging and the final sample."""

    steps: int = 250
    micro_batch_size: int | None = None  # sequences per rank per forward; None: batch_size / world size
    device: str = "auto"  # auto: cuda if available, else cpu
    precision: str = "auto"  # auto: bfloat16 autocast on GPU, float32 on CPU
    compile: bool = False
    activation_checkpointing: bool = False
    init_from: str | None = None  # run / checkpoint / HF dir: start from its weights and architecture (train/extend.py)
    gdn_impl: str = "auto"  # gated delta rule backend: auto, chunk (PyTorch), triton-split, ... (hybridlm.ops)
    attn_impl: str = "auto"  # documents / sliding windows in attention: auto (flex on CUDA), flex, sdpa
    seed: int = 0  # model initialisation
    log_every: int = 10
    eval_every: int = 50  # 0: evaluate only at the end
    eval_sequences: int = 64  # held-out sequences per evaluation (rounded down to a multiple of the ranks)
    checkpoint_every: int = 100  # 0: only the final checkpoint
    keep_last: int = 2  # checkpoints kept (the newest); 0 keeps all
    sample_prompt: str = "def "
    sample_tokens: int = 64  # 0: no sample at the end
    tensorboard: bool = False
    wandb_project: str | None = None


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "optimizer": OptimizerSection,
    "schedule": ScheduleSection,
    "trainer": TrainerSection,
}


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)

    # Reading and writing --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "TrainConfig":
        values = values or {}
        if not isinstance(values, dict):
            raise ConfigError(f"a training config must be a mapping of sections; got {type(values).__name__}")
        unknown = sorted(set(values) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown config sections {unknown}; valid sections are {list(SECTIONS)}")
        sections = {}
        for name, section_type in SECTIONS.items():
            section_values = values.get(name) or {}
            if not isinstance(section_values, dict):
                raise ConfigError(f"section {name!r} must be a mapping of keys; got {section_values!r}")
            sections[name] = _build_section(section_type, section_values, name)
        return cls(**sections)

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> "TrainConfig":
        """Read `path` (None: the defaults), apply `section.key=value` overrides and validate."""
        values: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            try:
                values = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as error:
                raise ConfigError(f"{path} is not valid YAML: {error}") from None
            if not isinstance(values, dict):
                raise ConfigError(f"{path} must hold a mapping of sections (model, data, ...); got {values!r}")
        for override in overrides:
            apply_override(values, override)
        config = cls.from_dict(values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        def plain(value):
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        values = {name: plain(dataclasses.asdict(getattr(self, name))) for name in SECTIONS}
        if not values["schedule"]["period_ends"]:  # only wsds has periods; other configs read as they always did
            del values["schedule"]["period_ends"]
        return values

    def to_yaml(self) -> str:
        """Block-style sections, short lists inline (betas: [0.9, 0.95])."""
        return yaml.dump(self.to_dict(), Dumper=_ConfigDumper, sort_keys=False, default_flow_style=False)

    # Validation ------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError listing every value out of range (types were checked on reading)."""
        problems: list[str] = []

        def need(condition: bool, message: str) -> None:
            if not condition:
                problems.append(message)

        model, data, optim, schedule, trainer = self.model, self.data, self.optimizer, self.schedule, self.trainer
        try:
            self.model_config(vocab_size=model.vocab_size or 128)
        except ValueError as error:
            problems.append(f"model: {error}")
        need(model.vocab_size is None or model.vocab_size > 0, f"model.vocab_size must be positive (got {model.vocab_size})")
        need(data.dataset != "", "data.dataset must name a prepared dataset directory or 'embedded'")
        need(data.seq_len > 0, f"data.seq_len must be positive (got {data.seq_len})")
        need(data.batch_size > 0, f"data.batch_size must be positive (got {data.batch_size})")
        need(optim.lr > 0, f"optimizer.lr must be positive (got {optim.lr})")
        need(all(0 <= b < 1 for b in optim.betas), f"optimizer.betas must lie in [0, 1) (got {list(optim.betas)})")
        need(optim.eps > 0, f"optimizer.eps must be positive (got {optim.eps})")
        need(optim.weight_decay >= 0, f"optimizer.weight_decay must be >= 0 (got {optim.weight_decay})")
        need(optim.grad_clip >= 0, f"optimizer.grad_clip must be >= 0 (0 disables it; got {optim.grad_clip})")
        need(optim.z_loss >= 0, f"optimizer.z_loss must be >= 0 (got {optim.z_loss})")
        need(optim.skip_sigma > 0, f"optimizer.skip_sigma must be positive (got {optim.skip_sigma})")
        need(optim.skip_window >= 2, f"optimizer.skip_window must be >= 2 (got {optim.skip_window})")
        need(
            2 <= optim.skip_min_history <= optim.skip_window,
            f"optimizer.skip_min_history must lie in [2, skip_window={optim.skip_window}] (got {optim.skip_min_history})",
        )
        need(schedule.name in SCHEDULES, f"schedule.name must be one of {list(SCHEDULES)} (got {schedule.name!r})")
        need(schedule.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0 (got {schedule.warmup_steps})")
        need(
            0 <= schedule.final_lr_ratio <= 1,
            f"schedule.final_lr_ratio must lie in [0, 1] (got {schedule.final_lr_ratio})",
        )
        need(
            0 < schedule.decay_fraction <= 1,
            f"schedule.decay_fraction must lie in (0, 1] (got {schedule.decay_fraction})",
        )
        need(trainer.steps > 0, f"trainer.steps must be positive (got {trainer.steps})")
        if schedule.name == "wsds":
            ends = list(schedule.period_ends)
            periods_valid = bool(ends) and all(a < b for a, b in zip([0] + ends, ends)) and ends[-1] == trainer.steps
            need(
                periods_valid,
                f"schedule.period_ends must be increasing positive steps ending at trainer.steps={trainer.steps} "
                f"for the wsds schedule (got {ends})",
            )
            if periods_valid:
                from hybridlm.train.optim import wsds_decay_windows

                first_decay = wsds_decay_windows(schedule)[0][0]
                need(
                    schedule.warmup_steps <= first_decay,
                    f"schedule.warmup_steps ({schedule.warmup_steps}) must end before the first decay of the wsds "
                    f"schedule (step {first_decay}); shorten the warmup or lengthen the first period",
                )
        else:
            need(
                not schedule.period_ends,
                f"schedule.period_ends is only used by the wsds schedule (name is {schedule.name!r}); remove it",
            )
        if trainer.micro_batch_size is not None:
            need(trainer.micro_batch_size > 0, f"trainer.micro_batch_size must be positive (got {trainer.micro_batch_size})")
            need(
                data.batch_size % trainer.micro_batch_size == 0,
                f"data.batch_size ({data.batch_size}) must be a multiple of trainer.micro_batch_size "
                f"({trainer.micro_batch_size})",
            )
        need(
            trainer.device == "auto" or trainer.device.split(":")[0] in ("cpu", "cuda"),
            f"trainer.device must be 'auto', 'cpu' or 'cuda[:N]' (got {trainer.device!r})",
        )
        from hybridlm.ops.gated_delta_rule import available_impls

        need(
            trainer.gdn_impl in available_impls(),
            f"trainer.gdn_impl must be one of {available_impls()} (got {trainer.gdn_impl!r})",
        )
        from hybridlm.models.hybrid_lm import ATTN_IMPLS

        need(trainer.attn_impl in ATTN_IMPLS, f"trainer.attn_impl must be one of {list(ATTN_IMPLS)} (got {trainer.attn_impl!r})")
        need(trainer.precision in PRECISIONS, f"trainer.precision must be one of {list(PRECISIONS)} (got {trainer.precision!r})")
        for name in ("log_every",):
            need(getattr(trainer, name) > 0, f"trainer.{name} must be positive (got {getattr(trainer, name)})")
        for name in ("eval_every", "eval_sequences", "checkpoint_every", "keep_last", "sample_tokens"):
            need(getattr(trainer, name) >= 0, f"trainer.{name} must be >= 0 (got {getattr(trainer, name)})")
        if problems:
            raise ConfigError("invalid training config:\n  - " + "\n  - ".join(problems))

    # Building ----------------------------------------------------------------------------------
    def model_config(self, *, vocab_size: int | None = None, eos_token_id: int | None = None, pad_token_id: int | None = None):
        """The HybridConfig: the preset, the overrides, then vocabulary and special ids.

        vocab_size/eos/pad given here (from the tokenizer) apply unless model.vocab_size or an
        override sets them. With a vocabulary given, the preset's eos/pad ids are replaced (they may
        not exist in the new vocabulary). With trainer.init_from, the source checkpoint's architecture and
        vocabulary replace the preset's; model.rope then applies (train/extend.py).
        """
        from hybridlm.models import get_preset
        from hybridlm.train.extend import apply_rope_mode, inspect_init_source

        fields = dict(self.model.overrides)
        source = inspect_init_source(self.trainer.init_from) if self.trainer.init_from else None
        if source is not None:  # the source's architecture and vocabulary; overrides must keep parameter shapes
            config = source.config.replace(**fields) if fields else source.config
        else:
            vocab = self.model.vocab_size or fields.pop("vocab_size", None) or vocab_size
            if vocab is not None:
                fields["vocab_size"] = vocab
                # The preset's special ids may not fit a smaller vocabulary; the tokenizer's ids replace them.
                fields.setdefault("eos_token_id", eos_token_id if eos_token_id is not None and eos_token_id < vocab else None)
                fields.setdefault("pad_token_id", pad_token_id if pad_token_id is not None and pad_token_id < vocab else None)
            config = get_preset(self.model.preset, **fields)
        return apply_rope_mode(config, self.model.rope, seq_len=self.data.seq_len, source=source,
                               explicit_scaling="rope_scaling" in self.model.overrides)


def tokenizer_vocab_to_model_vocab(tokenizer_vocab: int, multiple: int = 128) -> int:
    """The model vocabulary for a tokenizer: its size rounded up to a multiple of 128 (fast matmuls)."""
    return multiple * math.ceil(tokenizer_vocab / multiple)


class _ConfigDumper(yaml.SafeDumper):
    pass


_ConfigDumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)
)


# Overrides -------------------------------------------------------------------------------------
def apply_override(values: dict[str, Any], override: str) -> None:
    """Apply one `section.key=value` (or deeper, `model.overrides.n_layers=4`) to a nested dict."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key or "." not in key:
        raise ConfigError(
            f"override {override!r} must look like section.key=value (e.g. optimizer.lr=1e-3, trainer.steps=100)"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({error})") from None
    parts = key.split(".")
    if parts[0] not in SECTIONS:
        raise ConfigError(f"override {override!r}: unknown section {parts[0]!r}; valid sections are {list(SECTIONS)}")
    node = values
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} holds a value, not a section")
        node = child
    node[parts[-1]] = value


# Typed reading ---------------------------------------------------------------------------------
def _build_section(section_type: type, values: dict[str, Any], section_name: str):
    fields = {f.name: f for f in dataclasses.fields(section_type)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown keys in section {section_name!r}: {unknown}; valid keys are {sorted(fields)}"
        )
    hints = typing.get_type_hints(section_type)
    converted = {name: _convert(value, hints[name], f"{section_name}.{name}") for name, value in values.items()}
    return section_type(**converted)


def _convert(value: Any, annotation: Any, name: str) -> Any:
    """`value` checked against (and lightly coerced to) a type annotation; ConfigError if it cannot be."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, name)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} matches none of {args}")
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false (got {value!r})")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name} must be an integer (got {value!r})")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number (got {value!r})")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string (got {value!r})")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name} must be a list of {len(args)} values (got {value!r})")
        return tuple(_convert(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list (got {value!r})")
        return [_convert(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping (got {value!r})")
        return dict(value)
    raise TypeError(f"unsupported annotation {annotation!r} for {name}")
