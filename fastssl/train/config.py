"""Training configuration: typed sections, shipped recipes (YAML), ``key=value`` overrides, validation up front.

Every key is a dataclass field, so an unknown key, a wrong type or an out-of-range value fails before any data is
read or any model is built, with the dotted key named in the error.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

METHODS = ("mocov2", "isd", "msf", "ressl", "sdssl", "byol", "nnclr")
DATASETS = ("digits", "imagefolder", "synthetic")


class ConfigError(ValueError):
    """A configuration problem, raised before training starts; the message names the key."""


@dataclass
class DataConfig:
    dataset: str = "digits"  # digits | imagefolder | synthetic
    path: str | None = None  # ImageFolder root (imagefolder); synthetic: its folder, written if missing, else reused
    views: str | list[str] = "digits_pair"  # a multi-view recipe name or a list of view presets (teacher view first)
    batch_size: int = 256  # global: split evenly over the ranks (the official scripts' total batch)
    backend: str = "auto"  # auto | dali | torchvision
    num_workers: int | None = 0
    eval_path: str | None = None  # ImageFolder root for the kNN monitor's test split (imagefolder)
    unbalanced_large: int | None = None  # ISD Table 4: this many classes keep all their images ...
    unbalanced_cap: int | None = None  # ... the others are capped at this many images per class ...
    unbalanced_small: int | None = None  # ... this many random other classes (ISD: 8 large + 30 small); None = all
    channels_last: bool = False


@dataclass
class ModelConfig:
    arch: str = "digits_cnn"  # digits_cnn | resnet18 | resnet50 | vit_tiny_digits | vit_small_patch16_224 | ...
    cifar_stem: bool = False  # 3x3 stride-1 first conv, no max-pool (CIFAR-size ResNets)
    projector: list[int] = field(default_factory=lambda: [512, 128])  # hidden..., out; [] = no projector
    projector_bn: bool = True
    projector_out_bn: bool = False  # BN without affine on the projector's output (MoCo v3, SDSSL's MoCo v3 heads)
    layer_projector: list[int] = field(default_factory=list)  # SDSSL: intermediate blocks' projectors; [] = projector
    predictor: list[int] = field(default_factory=list)  # hidden..., out; [] = no predictor
    predictor_bn: bool = True
    sync_bn: bool = False
    shuffle_bn: bool = False  # MoCo's shuffling BN: the teacher runs on the global batch permuted across ranks
    compile: bool = False  # torch.compile the backbone
    vit_mocov3: bool = False  # MoCo v3's ViT stem: fixed 2-D sin-cos position embedding, frozen random patch projection


@dataclass
class MethodConfig:
    name: str = "mocov2"
    bank_size: int = 4096  # rows of the whole bank (split over the ranks with shard_bank)
    bank_dtype: str = "float16"
    shard_bank: bool = False  # each rank holds bank_size / world rows; (LSE, μ) partials merged (ISD, ReSSL, MoCo v2)
    tau: float = 0.2  # InfoNCE temperature (MoCo, NNCLR, ReSSL warm-up, SDSSL)
    tau_student: float = 0.1  # ISD / ReSSL
    tau_teacher: float = 0.01  # ISD 0.01, ReSSL 0.04
    k: int = 5  # MSF neighbours
    warmup_steps: int = 0  # ReSSL InfoNCE warm-up, in steps ...
    warmup_epochs: float = 0.0  # ... plus this many epochs
    momentum: float = 0.99  # teacher EMA momentum m
    momentum_schedule: str = "constant"  # constant | cosine (m -> 1)
    symmetric: bool = False  # also swap the views (BYOL, SDSSL, NNCLR)
    sdssl_ratio: float = 1.0  # final α of the SDSSL cosine schedule
    sdssl_base: str = "mocov3"  # mocov3 | byol
    loss_backend: str = "auto"
    query_precision: str = "float32"  # float32 | bank: queries rounded to the 16-bit bank dtype (ISD, ReSSL, MoCo v2,
    # MSF's neighbour search)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | lars | adamw
    lr: float = 0.06  # at base_batch; scaled linearly with the global batch
    base_batch: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    exclude_bn_bias: bool = False  # no weight decay (and no LARS adaptation) on BN and bias parameters
    warmup_steps: int = 0  # linear lr warm-up, in steps ...
    warmup_epochs: float = 0.0  # ... plus this many epochs
    schedule: str = "cosine"  # cosine | step | constant
    milestones: list[float] = field(default_factory=lambda: [0.6, 0.8])  # step schedule, fractions of training
    gamma: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # adamw


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps in total
    time_budget_s: float | None = None  # stop (and checkpoint) once training has used this many seconds
    stop_at_step: int | None = None  # stop (and checkpoint) at this global step; the schedule still spans the run
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "none"  # none | bf16 | fp16
    threads: int | None = None  # torch intra-op threads on CPU
    checkpoint_every: int = 0  # steps; 0 = only at epoch end and at the end
    keep_last: int = 2
    resume: str | None = None  # auto | PATH
    overwrite: bool = False  # a fresh run replaces an earlier run's outputs in its directory (else it refuses)
    log_every: int = 10
    knn_monitor: bool = True  # kNN accuracy of the backbones before and after training (and every knn_every steps)
    knn_every: int = 0  # steps between kNN monitor evaluations; 0 = before and after training only
    knn_k: int = 20
    knn_teacher: bool = True
    plot: bool = True
    tensorboard: bool = True


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "data.dataset": DATASETS,
    "data.backend": ("auto", "dali", "torchvision"),
    "method.name": METHODS,
    "method.bank_dtype": ("float16", "bfloat16", "float32"),
    "method.query_precision": ("float32", "bank"),
    "method.momentum_schedule": ("constant", "cosine"),
    "method.sdssl_base": ("mocov3", "byol"),
    "method.loss_backend": ("auto", "reference", "streaming", "triton"),
    "optim.name": ("sgd", "lars", "adamw"),
    "optim.schedule": ("cosine", "step", "constant"),
    "run.device": ("auto", "cpu", "cuda"),
    "run.amp": ("none", "bf16", "fp16"),
}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Converts ``value`` (from YAML or a command-line string) to the field's type, or raises ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        looks_like_list = isinstance(value, list | tuple) or (isinstance(value, str) and value.strip().startswith("["))
        args = sorted(args, key=lambda a: typing.get_origin(a) is not list) if looks_like_list else args
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be None")
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _section_types(section: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(section))


def set_key(config: TrainConfig, dotted: str, value: Any) -> None:
    """Sets ``section.key`` from a YAML or command-line value, naming the key on any error."""
    parts = dotted.split(".")
    if len(parts) != 2 or parts[0] not in _section_types(config):
        sections = ", ".join(_section_types(config))
        raise ConfigError(f"unknown key {dotted!r}: keys look like SECTION.KEY with SECTION one of {sections}")
    section = getattr(config, parts[0])
    hints = _section_types(section)
    if parts[1] not in hints:
        raise ConfigError(f"unknown key {dotted!r}; {parts[0]} has: {', '.join(hints)}")
    setattr(section, parts[1], _coerce(dotted, value, hints[parts[1]]))


def apply_mapping(config: TrainConfig, mapping: dict[str, Any], *, origin: str) -> None:
    """Applies a nested {section: {key: value}} mapping (a YAML file's content)."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{origin}: expected a mapping of sections, got {type(mapping).__name__}")
    for section, values in mapping.items():
        if section == "base":
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping")
        for key, value in values.items():
            try:
                set_key(config, f"{section}.{key}", value)
            except ConfigError as error:
                raise ConfigError(f"{origin}: {error}") from None


def shipped_configs() -> list[str]:
    """Names of the recipes shipped in :mod:`fastssl.configs`."""
    return sorted(
        p.name[: -len(".yaml")] for p in resources.files("fastssl.configs").iterdir() if p.name.endswith(".yaml")
    )


def _read_yaml(name_or_path: str) -> tuple[dict[str, Any], str]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {name_or_path!r} does not exist")
        return _parse_yaml(path.read_text(), str(path)), str(path)
    shipped = resources.files("fastssl.configs") / f"{name_or_path}.yaml"
    if not shipped.is_file():
        raise ConfigError(f"unknown config {name_or_path!r}; shipped configs: {', '.join(shipped_configs())}")
    return _parse_yaml(shipped.read_text(), f"config {name_or_path}"), f"config {name_or_path}"


def _parse_yaml(text: str, origin: str) -> Any:
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{origin}: not valid YAML: {' '.join(str(error).split())}") from None


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Builds a config: defaults ← ``base`` chain ← the named recipe or YAML file ← ``key=value`` overrides.

    Raises:
        ConfigError: unknown config, unknown key, bad value; the message names it.
    """
    config = TrainConfig()
    chain: list[tuple[dict[str, Any], str]] = []
    name = name_or_path or "digits_demo"
    seen = set()
    while name is not None:
        if name in seen:
            raise ConfigError(f"config {name!r} inherits from itself")
        seen.add(name)
        mapping, origin = _read_yaml(name)
        chain.append((mapping, origin))
        name = mapping.get("base") if isinstance(mapping, dict) else None
    for mapping, origin in reversed(chain):
        apply_mapping(config, mapping, origin=origin)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like SECTION.KEY=VALUE")
        key, value = item.split("=", 1)
        set_key(config, key.strip(), value.strip())
    validate(config)
    return config


def _count_views(views: str | list[str]) -> int:
    """How many views one image yields (a multi-view recipe counts its views, a single preset one)."""
    from fastssl.data.presets import RECIPES

    return sum(len(RECIPES[name]) if name in RECIPES else 1 for name in ([views] if isinstance(views, str) else views))


def _launch_world_size() -> int:
    """The number of ranks torchrun launched this process with (1 outside torchrun), known before any process group
    exists, so per-step sizes can be checked up front."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _check_views(views: str | list[str]) -> None:
    from fastssl.data.presets import PRESETS, RECIPES

    for name in [views] if isinstance(views, str) else views:
        if name not in PRESETS and name not in RECIPES:
            raise ConfigError(
                f"data.views: unknown view preset {name!r}; views: {', '.join(sorted(PRESETS))}; "
                f"multi-view recipes: {', '.join(sorted(RECIPES))}"
            )


# Methods whose loss is a softmax over the bank, so per-rank (LSE, μ) partials merge exactly (sharded-bank mode).
SHARDABLE_METHODS = ("isd", "ressl", "mocov2")
BANK_METHODS = ("mocov2", "isd", "msf", "ressl", "nnclr")  # the methods with a memory bank (BYOL and SDSSL have none)
QUERY_PRECISION_METHODS = ("isd", "ressl", "mocov2", "msf")  # the methods whose bank ops take query_precision


POSITIVE_KEYS = (
    "data.batch_size",
    "method.bank_size",
    "method.tau",
    "method.tau_student",
    "method.tau_teacher",
    "method.k",
    "optim.lr",
    "optim.base_batch",
    "optim.gamma",
    "run.epochs",
    "run.keep_last",
    "run.knn_k",
    "run.log_every",
)
NON_NEGATIVE_KEYS = (
    "method.warmup_steps",
    "method.warmup_epochs",
    "method.sdssl_ratio",
    "optim.warmup_steps",
    "optim.warmup_epochs",
    "optim.weight_decay",
    "run.checkpoint_every",
    "run.knn_every",
)


def _value(config: TrainConfig, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def validate(config: TrainConfig) -> None:
    """Range and consistency checks that need more than a type."""
    for dotted, choices in CHOICES.items():
        value = _value(config, dotted)
        if value not in choices:
            raise ConfigError(f"{dotted}: must be one of {', '.join(choices)}, got {value!r}")
    for key in POSITIVE_KEYS:
        value = _value(config, key)
        if not 0 < value < float("inf"):
            raise ConfigError(f"{key}: must be positive and finite, got {value}")
    for key in NON_NEGATIVE_KEYS:
        value = _value(config, key)
        if not 0 <= value < float("inf"):  # also rejects NaN
            raise ConfigError(f"{key}: must be ≥ 0 and finite, got {value}")
    for key in (
        "data.num_workers",
        "data.unbalanced_large",
        "data.unbalanced_cap",
        "data.unbalanced_small",
        "run.threads",
    ):
        value = _value(config, key)
        minimum = 0 if key == "data.num_workers" else 1
        if value is not None and value < minimum:
            raise ConfigError(f"{key}: must be ≥ {minimum} when set, got {value}")
    if not 0 <= config.method.momentum <= 1:
        raise ConfigError(f"method.momentum: must be in [0, 1], got {config.method.momentum}")
    if not 0 <= config.optim.momentum < 1:
        raise ConfigError(f"optim.momentum: must be in [0, 1), got {config.optim.momentum}")
    milestones = config.optim.milestones
    increasing = all(a < b for a, b in zip(milestones, milestones[1:], strict=False))
    if not increasing or not all(0 < m < 1 for m in milestones):
        raise ConfigError(f"optim.milestones: fractions of training, increasing, each in (0, 1); got {milestones}")
    if len(config.optim.betas) != 2 or not all(0 <= b < 1 for b in config.optim.betas):
        raise ConfigError(f"optim.betas: two numbers in [0, 1) (AdamW's β1, β2), got {config.optim.betas}")
    for key in ("model.projector", "model.predictor", "model.layer_projector"):
        widths = getattr(config.model, key.split(".")[1])
        if any(w < 1 for w in widths):
            raise ConfigError(f"{key}: layer widths must be positive, got {widths}")
    _check_views(config.data.views)
    views = _count_views(config.data.views)
    if views < 2:
        raise ConfigError(
            f"data.views: {config.method.name} compares at least two views of each image (teacher view first); "
            f"{config.data.views!r} gives {views}"
        )
    world = _launch_world_size()
    if config.data.batch_size % world:
        raise ConfigError(
            f"data.batch_size: the global batch {config.data.batch_size} does not split evenly over {world} ranks"
        )
    # Every bank method enqueues one key per image of the global batch (into the whole bank, or its own shard).
    sharded = config.method.shard_bank and world > 1
    rows = -(-config.method.bank_size // world) if sharded else config.method.bank_size
    keys_per_step = config.data.batch_size // world if sharded else config.data.batch_size
    if config.method.name in BANK_METHODS and keys_per_step > rows:
        where = f"each rank's shard of {rows} rows" if sharded else f"{rows} rows"
        raise ConfigError(
            f"method.bank_size: {where} cannot take the {keys_per_step} keys enqueued per step "
            f"(data.batch_size={config.data.batch_size} over {world} rank{'s' if world > 1 else ''})"
        )
    if config.method.shard_bank and config.method.name not in SHARDABLE_METHODS:
        raise ConfigError(
            f"method.shard_bank: only {', '.join(SHARDABLE_METHODS)} merge bank shards (softmax losses); "
            f"{config.method.name} searches the whole bank for neighbours"
        )
    if config.method.query_precision != "float32" and config.method.name not in QUERY_PRECISION_METHODS:
        raise ConfigError(
            f"method.query_precision: only {', '.join(QUERY_PRECISION_METHODS)} run bank ops whose query precision "
            f"can be lowered; {config.method.name} would ignore it"
        )
    if config.method.k > config.method.bank_size:
        raise ConfigError(f"method.k: {config.method.k} neighbours exceed method.bank_size={config.method.bank_size}")
    for key in ("run.max_steps", "run.time_budget_s", "run.stop_at_step"):
        value = getattr(config.run, key.split(".")[1])
        if value is not None and value <= 0:
            raise ConfigError(f"{key}: must be positive when set, got {value}")
    resume = config.run.resume
    if resume is not None and resume != "auto" and not Path(resume).is_file():
        raise ConfigError(f"run.resume: checkpoint {resume!r} does not exist (use 'auto' for this run's latest)")
    if config.data.dataset == "imagefolder":
        if not config.data.path:
            raise ConfigError("data.path: the imagefolder dataset needs data.path=/path/to/train")
        if not Path(config.data.path).is_dir():
            raise ConfigError(f"data.path: {config.data.path!r} is not a directory")
        if config.data.eval_path and not Path(config.data.eval_path).is_dir():
            raise ConfigError(f"data.eval_path: {config.data.eval_path!r} is not a directory")
    if (config.data.unbalanced_large is None) != (config.data.unbalanced_cap is None):
        raise ConfigError("data.unbalanced_large and data.unbalanced_cap must be set together (ISD Table 4)")
    if config.data.unbalanced_small is not None and config.data.unbalanced_large is None:
        raise ConfigError("data.unbalanced_small: needs data.unbalanced_large and data.unbalanced_cap (ISD Table 4)")
    if config.model.layer_projector and config.method.name != "sdssl":
        raise ConfigError(f"model.layer_projector: only SDSSL has per-block projectors, not {config.method.name}")
    if config.model.layer_projector and config.model.layer_projector[-1] != (config.model.projector or [None])[-1]:
        raise ConfigError(
            f"model.layer_projector: must end at the projector's output width, got {config.model.layer_projector} "
            f"and model.projector={config.model.projector}"
        )
    if config.model.vit_mocov3 and not config.model.arch.startswith("vit"):
        raise ConfigError(f"model.vit_mocov3: MoCo v3's ViT stem needs a ViT, not model.arch={config.model.arch!r}")
    if config.method.name in ("msf", "byol", "sdssl", "nnclr") and not config.model.predictor:
        raise ConfigError(f"model.predictor: method {config.method.name} needs a predictor (e.g. [4096, 256])")
