"""Typed configuration: dataclass sections, loaded from YAML, overridden with dotted keys.

Layering (lowest first): dataclass defaults, the YAML file, `key.sub=value` overrides.
Every value is type-checked and range-checked; a bad one raises HwrError naming the key.
"""

from __future__ import annotations

import dataclasses
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
class DataConfig:
    name: str = "mnist-sample"
    """Data set from the registry (`hwr data list`)."""
    root: str = "data"
    """Where downloadable data sets live (torchvision layout) or the image folder."""
    download: bool = False
    """Download a missing torchvision data set (needs internet)."""
    val_fraction: float = 0.1
    """Share of the training set held out, stratified and seeded, for validation."""
    batch_size: int = 128
    """Batch size per process; global batch = batch_size x processes x grad_accum_steps."""
    eval_batch_size: int = 1000
    """Batch size per process for evaluation."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)


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
    """vgg: none, torchvision weights (IMAGENET1K_V1: hub cache or download), or a checkpoint / state dict path."""
    input_size: int = 32
    """vgg: side the batch is resized to on the device (>= 32: VGG pools five times)."""
    head: str = "linear"
    """vgg: linear (global pool, standardised, linear), mlp (+ a hidden layer) or vgg (original classifier, new last layer);
    fast_cnn: linear, or mlp (a hidden layer of 128)."""
    freeze: str = "none"
    """vgg: none, or features (the backbone is frozen except its last trainable_blocks blocks)."""
    trainable_blocks: int = 0
    """vgg, freeze=features: how many of the five last conv blocks still train (0 = head only)."""
    unfreeze_after_epochs: int = 0
    """vgg, freeze=features: from this epoch on the whole network trains (0 = never)."""
    backbone_lr_scale: float = 1.0
    """vgg: learning rate of the backbone relative to the head's."""
    cache_features: str = "auto"
    """vgg: compute frozen backbone features once and train the head on them: auto, on or off."""


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
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    mixed_precision: str = "no"
    """no, bf16 or fp16 (fp16 on CUDA only)."""
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
    """Also keep every epoch's checkpoint as epoch-NNN.pt (a hard link, no extra write): the learning
    curve can be scored afterwards, e.g. time to a test accuracy (bench/time_to_accuracy.py)."""


@dataclass
class WandbConfig:
    enabled: bool = False
    """Log to Weights & Biases (needs `pip install 'hwr-dist[wandb]'`); one run per job, main process only."""
    project: str = "hwr-dist"
    entity: str = ""
    """W&B user or team ('' = your default entity)."""
    group: str = ""
    """Groups runs in the W&B UI, e.g. one group per sweep or experiment."""
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)
    notes: str = ""
    mode: str = "online"
    """online, offline or disabled; the WANDB_MODE environment variable, if set, wins."""
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


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotated type `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise HwrError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp is str and isinstance(value, bool):  # YAML 1.1 reads on/off (model.cache_features) as booleans
        return "on" if value else "off"
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise HwrError(f"{key}: expected {_type_name(tp)}, got {value!r}")
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


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=1` strings -> nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or key.startswith("-"):
            raise HwrError(f"bad override '{item}': write it as section.key=value, e.g. optim.lr=0.01")
        try:
            value = yaml.safe_load(raw) if raw else ""
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
    """Defaults <- YAML file <- overrides, then validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise HwrError(f"config file {path} not found; pass a YAML file such as configs/default.yaml")
        try:
            values = yaml.safe_load(path.read_text()) or {}
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
    validate(cfg)
    return cfg


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config saved in a checkpoint or run directory."""
    cfg = Config()
    _merge(cfg, values)
    return cfg


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise HwrError(f"{key}: expected {expected}, got {value!r}")


def _one_of(key: str, value: str, choices) -> None:
    _check(value in choices, key, "one of " + ", ".join(sorted(choices)), value)


def validate(cfg: Config) -> None:
    from hwr_dist.data import DATASETS
    from hwr_dist.models import MODELS

    _one_of("data.name", cfg.data.name, DATASETS)
    _one_of("model.name", cfg.model.name, MODELS)
    _check(0 <= cfg.data.val_fraction < 1, "data.val_fraction", "a number in [0, 1)", cfg.data.val_fraction)
    _check(cfg.data.batch_size > 0, "data.batch_size", "a positive integer", cfg.data.batch_size)
    _check(cfg.data.eval_batch_size > 0, "data.eval_batch_size", "a positive integer", cfg.data.eval_batch_size)
    a = cfg.data.augment
    for key in ("rotation", "scale", "translate", "shear", "elastic_alpha"):
        _check(getattr(a, key) >= 0, f"data.augment.{key}", "a number >= 0", getattr(a, key))
    _check(a.elastic_sigma > 0, "data.augment.elastic_sigma", "a number > 0", a.elastic_sigma)
    _check(0 <= a.erasing <= 1, "data.augment.erasing", "a probability in [0, 1]", a.erasing)
    _check(a.scale < 1, "data.augment.scale", "a number below 1", a.scale)
    _check(0 <= cfg.model.dropout < 1, "model.dropout", "a number in [0, 1)", cfg.model.dropout)
    _check(cfg.model.width > 0, "model.width", "a positive integer", cfg.model.width)
    if cfg.model.name == "vgg":
        _validate_vgg(cfg)
    if cfg.model.name == "fast_cnn":
        _one_of("model.head", cfg.model.head, {"linear", "mlp"})
    _one_of("optim.name", cfg.optim.name, {"sgd", "adam", "adamw"})
    _check(cfg.optim.lr > 0, "optim.lr", "a number > 0", cfg.optim.lr)
    _check(cfg.optim.weight_decay >= 0, "optim.weight_decay", "a number >= 0", cfg.optim.weight_decay)
    _check(0 <= cfg.optim.momentum < 1, "optim.momentum", "a number in [0, 1)", cfg.optim.momentum)
    _check(0 <= cfg.optim.beta2 < 1, "optim.beta2", "a number in [0, 1)", cfg.optim.beta2)
    _check(cfg.optim.grad_clip >= 0, "optim.grad_clip", "a number >= 0", cfg.optim.grad_clip)
    _check(0 <= cfg.optim.label_smoothing < 1, "optim.label_smoothing", "a number in [0, 1)", cfg.optim.label_smoothing)
    _one_of("schedule.name", cfg.schedule.name, {"onecycle", "cosine", "step", "constant"})
    _check(0 <= cfg.schedule.warmup_fraction < 1, "schedule.warmup_fraction", "a number in [0, 1)", cfg.schedule.warmup_fraction)
    _check(0 <= cfg.schedule.min_lr_ratio <= 1, "schedule.min_lr_ratio", "a number in [0, 1]", cfg.schedule.min_lr_ratio)
    _check(cfg.schedule.step_epochs > 0, "schedule.step_epochs", "a positive integer", cfg.schedule.step_epochs)
    _check(0 < cfg.schedule.gamma <= 1, "schedule.gamma", "a number in (0, 1]", cfg.schedule.gamma)
    t = cfg.train
    _check(t.epochs > 0, "train.epochs", "a positive integer", t.epochs)
    _check(t.grad_accum_steps > 0, "train.grad_accum_steps", "a positive integer", t.grad_accum_steps)
    _one_of("train.mixed_precision", t.mixed_precision, {"no", "bf16", "fp16"})
    _check(0 <= t.ema_decay < 1, "train.ema_decay", "a number in [0, 1)", t.ema_decay)
    _check(t.early_stopping_patience >= 0, "train.early_stopping_patience", "an integer >= 0", t.early_stopping_patience)
    _check(t.log_every > 0, "train.log_every", "a positive integer", t.log_every)
    _check(t.max_steps >= 0, "train.max_steps", "an integer >= 0", t.max_steps)
    _one_of("train.device", t.device, {"auto", "cpu", "cuda"})
    _check("/" not in t.name and t.name not in (".", ".."), "train.name", "a plain name without '/'", t.name)
    _check(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "an integer >= 0", cfg.checkpoint.every_steps)
    _check(cfg.checkpoint.keep_last >= 0, "checkpoint.keep_last", "an integer >= 0", cfg.checkpoint.keep_last)
    _one_of("tracking.wandb.mode", cfg.tracking.wandb.mode, {"online", "offline", "disabled"})
    _check(cfg.tracking.wandb.log_every >= 0, "tracking.wandb.log_every", "an integer >= 0", cfg.tracking.wandb.log_every)
    if t.early_stopping_patience and cfg.data.val_fraction == 0:
        raise HwrError("train.early_stopping_patience needs a validation split; set data.val_fraction > 0")


def _validate_vgg(cfg: Config) -> None:
    from hwr_dist.models.vgg import BLOCKS, HEADS, MIN_INPUT, TORCHVISION_WEIGHTS, VARIANTS, looks_like_path

    m = cfg.model
    _one_of("model.variant", m.variant, VARIANTS)
    if m.weights != "none" and not looks_like_path(m.weights):
        _one_of("model.weights", m.weights, {"none", *TORCHVISION_WEIGHTS[m.variant], "a checkpoint path"})
    _check(m.input_size >= MIN_INPUT, "model.input_size", f"an integer >= {MIN_INPUT} (VGG halves the image five times)",
           m.input_size)
    _one_of("model.head", m.head, HEADS)
    _one_of("model.freeze", m.freeze, {"none", "features"})
    _check(0 <= m.trainable_blocks < BLOCKS, "model.trainable_blocks", f"an integer in 0..{BLOCKS - 1}", m.trainable_blocks)
    _check(m.unfreeze_after_epochs >= 0, "model.unfreeze_after_epochs", "an integer >= 0", m.unfreeze_after_epochs)
    _check(m.backbone_lr_scale > 0, "model.backbone_lr_scale", "a number > 0", m.backbone_lr_scale)
    _one_of("model.cache_features", m.cache_features, {"auto", "on", "off"})
    if m.freeze == "none" and (m.trainable_blocks or m.unfreeze_after_epochs):
        raise HwrError("model.trainable_blocks and model.unfreeze_after_epochs need model.freeze=features")
    if m.cache_features == "on" and (m.freeze != "features" or m.trainable_blocks or cfg.data.augment.enabled):
        raise HwrError("model.cache_features=on needs a frozen backbone and fixed inputs: set model.freeze=features, "
                       "model.trainable_blocks=0 and data.augment.enabled=false (or use cache_features=auto)")


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
