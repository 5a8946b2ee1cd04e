"""Typed configuration: dataclass sections, loaded from YAML, overridden with dotted keys.

Layering (lowest first): dataclass defaults, the YAML file, `key.sub=value` overrides. Every value is
type-checked here and range-checked by its section's owner; a bad one raises HwrError naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hwr_dist.errors import HwrError


@dataclass
class AugmentConfig:
    enabled: bool = True
    """Apply the batched random affine (and the extras below) to training batches."""
    rotation: float = 10.0
    """Maximum rotation, in degrees, either way."""
    scale: float = 0.1
    """Maximum relative zoom, either way (0.1 = 90%..110%)."""
    translate: float = 0.1
    """Maximum shift as a fraction of the image side, either way."""
    shear: float = 5.0
    """Maximum shear, in degrees, either way."""
    elastic_alpha: float = 0.0
    """Elastic distortion strength in pixels (0 = off)."""
    elastic_sigma: float = 4.0
    """Smoothness of the elastic displacement field, in pixels."""
    erasing: float = 0.0
    """Probability of erasing one random rectangle per image (0 = off)."""


@dataclass
class StringsConfig:
    """data.name=digit-strings: number images composed from the digits of another data set."""
    source: str = "mnist-sample"
    """The digit data set whose train/val/test splits supply each split's digits."""
    min_length: int = 4
    """Fewest digits in a string."""
    max_length: int = 8
    """Most digits in a string."""
    gap: list[float] = field(default_factory=lambda: [-2.0, 6.0])
    """Range of the space between neighbours' ink, in pixels of a 28-pixel digit (< 0 overlaps, 0 touches)."""
    scale: list[float] = field(default_factory=lambda: [0.85, 1.1])
    """Range of each digit's size factor."""
    jitter: float = 2.0
    """Largest shift of a digit off the baseline, in pixels, either way."""
    slant: float = 10.0
    """Largest slant (shear) of a digit, in degrees, either way."""
    height: int = 32
    """Height of every string image, in pixels."""
    train_size: int = 20000
    """Strings per training epoch (drawn afresh every epoch)."""
    eval_size: int = 1000
    """Strings in each of the validation and test sets (fixed for a given seed)."""


@dataclass
class DataConfig:
    name: str = "mnist-sample"
    """Data set from the registry (`hwr data list`)."""
    root: str = "data"
    """Where downloadable data sets live (torchvision layout) or the image folder."""
    download: bool = False
    """Download a missing torchvision data set (needs internet)."""
    val_fraction: float = 0.1
    """Share of the training set held out, stratified and seeded, for validation."""
    limit_per_class: int | None = None
    """Few-shot: K training images per class, stratified and seeded (val_fraction of them held out); null: all."""
    batch_size: int = 128
    """Batch size per process; global batch = batch_size x processes x grad_accum_steps."""
    eval_batch_size: int = 1000
    """Batch size per process for evaluation."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    strings: StringsConfig = field(default_factory=StringsConfig)


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    """Model from the registry: small_cnn, lenet5, cnn_bn, fast_cnn, vgg."""
    dropout: float = 0.5
    """Dropout before the classifier."""
    width: int = 32
    """Channels of the first convolution (cnn_bn doubles it per stage)."""
    channels_last: bool = False
    """Use the channels_last memory format."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    variant: str = "vgg11"
    """vgg: torchvision variant, vgg11/13/16/19 or their _bn forms."""
    weights: str = "none"
    """none; builtin (the shipped digit model, fast_cnn); a checkpoint or state dict path; vgg also: torchvision
    weights (IMAGENET1K_V1: hub cache or download)."""
    input_size: int = 32
    """vgg: side the batch is resized to on the device (>= 32: VGG pools five times)."""
    head: str = "linear"
    """vgg: linear (global pool, standardised, linear), mlp (+ a hidden layer) or vgg (original classifier, new
    last layer); fast_cnn: linear, or mlp (a hidden layer of 128)."""
    stem: str = "pool"
    """fast_cnn: how the first stage halves the image, pool (a 3x3 conv, then a 2x2 max-pool) or stride2 (one
    4x4 conv with stride 2: about 40% less compute per training image)."""
    pool_first: bool = False
    """fast_cnn: max-pool straight after each conv, then batch norm and ReLU (airbench's order): the same
    convolutions, a quarter of the normalisation's and activation's work (about half the CPU training step)."""
    freeze: str = "none"
    """none, or features: the backbone is frozen (vgg: except its last trainable_blocks blocks)."""
    trainable_blocks: int = 0
    """vgg, freeze=features: how many of the five last conv blocks still train (0 = head only)."""
    unfreeze_after_epochs: int = 0
    """freeze=features: from this epoch on the whole network trains (0 = never)."""
    backbone_lr_scale: float = 1.0
    """Learning rate of the backbone relative to the head's (fine-tuning; crnn: the conv stack against the rest)."""
    cache_features: str = "auto"
    """vgg: compute frozen backbone features once and train the head on them: auto, on or off."""
    encoder: str = "lstm"
    """crnn: the sequence encoder over the columns, lstm (bidirectional) or transformer."""
    hidden: int = 128
    """crnn: the encoder's width (per direction for the LSTM)."""
    layers: int = 2
    """crnn: encoder layers."""
    init_from: str = ""
    """crnn: start the conv stack from a fast_cnn digit classifier: builtin (the shipped one), or its checkpoint."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """sgd, adam or adamw."""
    lr: float = 0.003
    """Peak learning rate."""
    weight_decay: float = 0.0001
    momentum: float = 0.9
    """SGD momentum (adam/adamw: beta1)."""
    nesterov: bool = True
    """SGD only."""
    beta2: float = 0.999
    """adam/adamw second-moment decay."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this (0 = off)."""
    label_smoothing: float = 0.0


@dataclass
class ScheduleConfig:
    name: str = "onecycle"
    """onecycle, cosine (linear warmup then cosine), step, or constant."""
    warmup_fraction: float = 0.2
    """onecycle/cosine: share of all optimizer steps spent warming up."""
    min_lr_ratio: float = 0.01
    """onecycle/cosine: final learning rate as a fraction of the peak."""
    step_epochs: int = 5
    """step: decay every this many epochs."""
    gamma: float = 0.1
    """step: decay factor."""


@dataclass
class TrainConfig:
    epochs: int = 12
    grad_accum_steps: int | None = None
    """Micro-batches per optimizer step; null: the launcher's (ACCELERATE_GRADIENT_ACCUMULATION_STEPS), else 1."""
    mixed_precision: str | None = None
    """no, bf16 or fp16 (CUDA only); null: the launcher's (accelerate flag, config file or environment), else no."""
    seed: int = 0
    ema_decay: float = 0.0
    """Exponential moving average of weights, used for evaluation (0 = off)."""
    early_stopping_patience: int = 0
    """Stop after this many epochs without a better validation accuracy (0 = off)."""
    out_dir: str = "runs"
    name: str = ""
    """Run name; the run directory is out_dir/name (default: the config file's stem)."""
    resume: str = ""
    """'' (start fresh), auto (resume from the run's last.pt if present) or a checkpoint path."""
    resume_changes: str = "refuse"
    """A resume with other data-order or schedule settings than the checkpoint's: refuse, or accept (printed)."""
    log_every: int = 20
    """Optimizer steps between metric lines (and NaN checks)."""
    device: str = "auto"
    """auto, cpu or cuda."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs); for tests and benchmarks."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Also save a step checkpoint every this many optimizer steps (0 = only at epoch end)."""
    keep_last: int = 3
    """Step checkpoints kept besides last.pt and best.pt."""
    keep_epochs: bool = False
    """Also keep every epoch's checkpoint as epoch-NNN.pt (a hard link): to score the learning curve later."""


@dataclass
class WandbConfig:
    """A field left unset (null) follows W&B's own variables (WANDB_PROJECT, ...), then W&B's defaults."""

    enabled: bool | None = None
    """Log to W&B (`pip install 'hwr-dist[wandb]'`); null: on when any tracking.wandb setting or WANDB_MODE is set."""
    project: str | None = None
    entity: str | None = None
    """W&B user or team."""
    group: str | None = None
    """Groups runs in the W&B UI, e.g. one group per sweep or experiment."""
    job_type: str | None = None
    tags: list[str] | None = None
    notes: str | None = None
    mode: str | None = None
    """online, offline or disabled; null: WANDB_MODE, else online."""
    log_every: int = 0
    """Optimizer steps between training rows sent to W&B (0 = every train.log_every log point)."""
    log_model: bool = False
    """Upload the best checkpoint as a model artifact at the end."""


@dataclass
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False
    """Also write TensorBoard event files to RUN_DIR/tensorboard (needs `pip install 'hwr-dist[tensorboard]'`)."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- loading ---------------------------------------------------------------------------


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotated type `tp`; ints are accepted for floats."""
    if type(None) in typing.get_args(tp):  # `X | None`: null means "not set here"
        if value is None:
            return None
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise HwrError(f"{key}: expected a list of {getattr(item_tp, '__name__', item_tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:  # PyYAML reads 1e-3 (no dot) as a string; ints are fine for floats
            number = float(value)
        except ValueError:
            raise HwrError(f"{key}: expected float, got {value!r}") from None
        if not math.isfinite(number):
            raise HwrError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp is str and isinstance(value, bool):  # `true` for an on/off word (model.cache_features)
        return "on" if value else "off"
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise HwrError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    return value


def _merge(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(hints)
            raise HwrError(f"unknown config key '{dotted}'; known keys here: {known}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise HwrError(f"{dotted}: expected a section (mapping), got {value!r}")
            _merge(current, value, dotted + ".")
        else:
            setattr(obj, key, _coerce(dotted, value, hints[key]))


class _Loader(yaml.SafeLoader):
    """safe_load, but a key given twice is an error, and only true/false are booleans (YAML 1.2: `no`, `off` stay words)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
            if key in seen:
                raise HwrError(f"key '{key}' is given twice (lines {seen[key]} and {line}); keep one of them")
            seen[key] = line
        return super().construct_mapping(node, deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=1` strings -> nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or key.startswith("-"):
            raise HwrError(f"bad override '{item}': write it as section.key=value, e.g. optim.lr=0.01")
        try:
            value = _yaml(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise HwrError(f"bad override '{item}': '{p}' is set both as a value and a section")
        node[leaf] = value
    return nested


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- overrides, types checked; ranges are checked by each section's owner
    (`hwr_dist.recipes.load`)."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise HwrError(f"config file {path} not found; pass a YAML file such as configs/default.yaml")
        try:
            values = _yaml(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise HwrError(f"config file {path} is not UTF-8 text; save it as UTF-8 YAML") from None
        except OSError as e:
            raise HwrError(f"cannot read config file {path} ({e.strerror}); check its permissions") from None
        except HwrError as e:
            raise HwrError(f"config file {path}: {e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise HwrError(f"config file {path} is not valid YAML{where}; fix its syntax") from None
        if not isinstance(values, dict):
            raise HwrError(f"config file {path} must hold a mapping of sections (data:, model:, ...)")
        _merge(cfg, values)
        if not cfg.train.name:
            cfg.train.name = path.stem
    _merge(cfg, parse_overrides(list(overrides)))
    if not cfg.train.name:
        cfg.train.name = "run"
    return cfg


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config saved in a checkpoint or run directory."""
    cfg = Config()
    _merge(cfg, values)
    return cfg


def check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise HwrError(f"{key}: expected {expected}, got {value!r}")


def one_of(key: str, value: str, choices) -> None:
    check(value in choices, key, "one of " + ", ".join(sorted(choices)), value)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
