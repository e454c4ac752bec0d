"""Typed config schemas, the recipe config group, and the one `instantiate` helper.

Values live in YAML under conf/ and recipes/; the dataclasses here give them types so a typo'd key
or a wrong type fails at compose time, naming the key, before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgebuild.errors import EdgebuildError

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
RECIPES_DIR = ROOT / "recipes"


def bounded(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose value (each element, for a list) must lie in a range. OmegaConf types
    the value; `check_ranges` checks the range at plan time, so a nonsense number (epochs -1, a
    negative threshold) stops the build before any work instead of being trained, cached and measured."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, default_factory=factory, metadata={"bounds": bounds})


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_OK = {"ge": float.__ge__, "gt": float.__gt__, "le": float.__le__, "lt": float.__lt__}


def describe_bounds(bounds: dict[str, float]) -> str:
    return " and ".join(f"{_BOUND_TEXT[k]} {v:g}" for k, v in bounds.items())


def check_ranges(schema: type, values: Any, prefix: str) -> None:
    """Every `bounded` field of `schema` (a dataclass), read from `values` (an instance of it or an
    OmegaConf node), lies in its range; nested schemas are checked too. One clear error otherwise."""
    for f in dataclasses.fields(schema):
        value = getattr(values, f.name, None)
        key = f"{prefix}.{f.name}" if prefix else f.name
        nested = f.default_factory if dataclasses.is_dataclass(f.default_factory) else None
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            nested = type(value)
        if nested is not None and value is not None:
            check_ranges(nested, value, key)
            continue
        bounds = f.metadata.get("bounds")
        if not bounds or value is None:
            continue
        is_list = isinstance(value, (list, tuple)) or _is_list_node(value)
        for i, item in enumerate(value if is_list else [value]):
            ok = isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item)
            ok = ok and all(_BOUND_OK[k](float(item), float(v)) for k, v in bounds.items())
            if not ok:
                where = f"{key}[{i}]" if is_list else key
                example = f.default if isinstance(f.default, (int, float)) else None
                raise EdgebuildError(f"{where}={item} is out of range: it must be {describe_bounds(bounds)}",
                                     f"set {where} to a value {describe_bounds(bounds)}"
                                     + (f" (default {example})" if example is not None else ""))


def check_config(cfg: Any) -> None:
    """Plan time: every number of the build config (stages aside: `build_stage` checks each) in range."""
    check_ranges(Config, cfg, "")
    check_targets(cfg)
    from edgebuild.data import DATA_OPTIONS, data_option

    for key in DATA_OPTIONS:  # the typed data.options keys (the others are loader-specific extras)
        data_option(cfg.data, key)
    split = cfg.data.split
    if split.val + split.test >= 1:
        raise EdgebuildError(f"data.split.val + data.split.test = {split.val + split.test:g} leaves no training data",
                             "keep their sum below 1, e.g. data.split.val=0.15 data.split.test=0.2")
    stream = cfg.eval.stream
    if stream.policy not in ("drop_oldest", "block"):  # edgebuild.stream.pipeline.POLICIES (kept light here)
        raise EdgebuildError(f"eval.stream.policy={stream.policy!r} is not a stream policy",
                             "set eval.stream.policy to drop_oldest or block")
    from edgebuild import targets
    from edgebuild.budget import STREAM_LIMITS
    from edgebuild.targets.base import ASYNC

    if stream.requests > 1 and not targets.supports(cfg.target, ASYNC):
        raise EdgebuildError(f"eval.stream.requests={stream.requests} asks for asynchronous inference, which runtime "
                             f"{cfg.target.runtime} does not offer", "set eval.stream.requests=1, or use a target "
                             "whose runtime has asynchronous requests (target=cpu: OpenVINO)")
    for where, budget in (("budget", cfg.budget), ("target.budget", cfg.target.budget)):
        for key in STREAM_LIMITS:
            if budget.get(key) is not None and not stream.enabled:
                raise EdgebuildError(f"{where}.{key}={budget.get(key)} is a stream budget, but the build does not "
                                     "stream (eval.stream.enabled=false)", "add eval.stream.enabled=true, or "
                                     f"remove {where}.{key}")
    data = cfg.data
    pad = max(1, data.image_size // 8) if data.augment_pad is None else data.augment_pad
    if data.augment and cfg.task.name == "classification" and pad >= data.image_size:
        raise EdgebuildError(f"data.augment with a {pad}-pixel crop padding does not fit {data.image_size}x"
                             f"{data.image_size} images: reflect padding must be smaller than the image",
                             f"set data.augment_pad below {data.image_size} (default image_size // 8), "
                             "data.augment_pad=0 for flips only, or data.augment=false")


def _is_list_node(value: Any) -> bool:
    from omegaconf import ListConfig

    return isinstance(value, ListConfig)


@dataclass
class TaskConf:
    name: str = "classification"
    # detection postprocessing; ignored by classification
    score_threshold: float = bounded(0.01, ge=0, le=1)
    nms_iou: float = bounded(0.45, gt=0, le=1)
    top_k: int = bounded(200, ge=1)
    detections_per_image: int = bounded(100, ge=1)
    # task=multihead: the extra heads [{name, classes, map}] (map: data class -> head class), one loss weight
    # per head (the data's labels first), and the first head's name; None elsewhere (and out of cache keys)
    heads: list[Any] | None = None
    loss_weights: list[float] | None = None
    first_name: str | None = None


@dataclass
class ModelConf:
    # built-in name ("cnn"), a torchvision model name ("mobilenet_v2"), or "custom" with _target_
    name: str = "cnn"
    _target_: str | None = None
    num_classes: int | None = bounded(None, ge=1)  # default: the data's class count
    in_channels: int | None = bounded(None, ge=1)  # default: the data's channel count
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments
    small_input: bool = False  # torchvision models: stride-1 stem for 32x32-class inputs
    # every BatchNorm's running-statistics momentum, set after construction (torchvision's MobileNetV3 and
    # EfficientNet use 0.01: a short training leaves eval-mode statistics far from the data's); null = the model's
    bn_momentum: float | None = bounded(None, gt=0, le=1)
    weights: str | None = None  # local state_dict file, or a torchvision weights name (needs network)
    strict_weights: bool = True


@dataclass
class SplitConf:
    val: float = bounded(0.15, ge=0, lt=1)
    test: float = bounded(0.2, ge=0, lt=1)
    seed: int = bounded(0, ge=0)


@dataclass
class CalibrationConf:
    size: int = bounded(300, ge=1)
    seed: int = bounded(0, ge=0)


@dataclass
class DataConf:
    name: str = "digits"  # digits | synthetic | imagefolder | cifar10 (+ task-specific kinds)
    root: str | None = None
    image_size: int = bounded(8, ge=1)
    channels: int = bounded(1, ge=1)
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = bounded(factory=lambda: [0.5], gt=0)
    split: SplitConf = field(default_factory=SplitConf)
    calibration: CalibrationConf = field(default_factory=CalibrationConf)
    batch_size: int = bounded(64, ge=1)
    num_workers: int = bounded(0, ge=0)
    augment: bool = False  # training batches: random pad-crop + horizontal flip, per image, on tensors
    augment_pad: int | None = bounded(None, ge=0)  # crop padding in pixels; null = image_size // 8; 0 = no crop
    augment_flip: bool = True  # horizontal flip (switch off for data where mirroring changes the class)
    limit: int | None = bounded(None, ge=1)  # use at most this many images (quick runs)
    num_samples: int = bounded(600, ge=1)  # generated datasets
    num_classes: int = bounded(10, ge=2)  # generated datasets
    options: dict[str, Any] = field(default_factory=dict)  # loader-specific extras


@dataclass
class BudgetConf:
    min_acc: float | None = bounded(None, ge=0, le=1)  # acc/top1, fraction 0..1
    max_acc_drop: float | None = bounded(None, ge=-100, le=100)  # percentage points vs the first measured stage
    min_map: float | None = bounded(None, ge=0, le=1)
    max_map_drop: float | None = bounded(None, ge=-100, le=100)  # points (x100) of map/50_95 vs the first stage
    # latency/p50_ms, or the device latency the runtime names (latency/device_metric: Ethos-U, TFLM)
    max_latency_ms: float | None = bounded(None, gt=0)
    max_size_bytes: int | None = bounded(None, gt=0)
    max_zip_bytes: int | None = bounded(None, gt=0)
    max_macs: int | None = bounded(None, gt=0)
    max_params: int | None = bounded(None, gt=0)
    max_ram_bytes: int | None = bounded(None, gt=0)
    max_flash_bytes: int | None = bounded(None, gt=0)
    min_npu_ops_fraction: float | None = bounded(None, ge=0, le=1)  # ethos_u/npu_ops_fraction (1: NPU only)
    # stream budgets (need eval.stream.enabled=true): the final deployable streamed as edgebuild/stream measures it
    min_fps: float | None = bounded(None, gt=0)  # stream/fps, processed frames per second
    max_e2e_latency_ms: float | None = bounded(None, gt=0)  # stream/e2e_p90_ms, capture -> result
    max_energy_mj: float | None = bounded(None, gt=0)  # energy/mj_per_inference (an estimate from spec.power)
    min_battery_hours: float | None = bounded(None, gt=0)  # battery/hours at the stream's duty cycle (estimate)


@dataclass
class PowerSpec:
    # the device's stated power draw, for the stream's duty-cycle energy estimate (edgebuild/stream/energy.py):
    # watts busy per precision (fp32, int8, ...) and idle, or, for a microcontroller, milliamps at `volts`
    active_watts: dict[str, float] = field(default_factory=dict)
    idle_watts: float | None = bounded(None, ge=0)
    active_ma: dict[str, float] = field(default_factory=dict)
    sleep_ma: float | None = bounded(None, ge=0)
    volts: float | None = bounded(None, gt=0)
    source: str = ""  # where the figures come from (datasheet, or a stated assumption)


@dataclass
class HardwareSpec:
    name: str = "generic CPU"
    peak_macs_per_s: dict[str, float] = field(default_factory=dict)  # per precision: fp32, int8, ...
    memory_bandwidth_bytes_per_s: float | None = bounded(None, gt=0)
    ram_bytes: int | None = bounded(None, gt=0)
    flash_bytes: int | None = bounded(None, gt=0)
    power: PowerSpec = field(default_factory=PowerSpec)


@dataclass
class TargetConf:
    name: str = "cpu"
    runtime: str = "openvino"  # openvino | onnxruntime
    device: str = "CPU"
    # inference precision for floating-point models; "f32" states true FP32 (OpenVINO's CPU plugin
    # otherwise runs FP32 IRs in bf16 on AVX-512 BF16 CPUs), "auto" leaves the runtime's default
    precision: str = "f32"
    threads: int = bounded(2, ge=0)  # 0: the runtime's default
    require_device: bool = False
    spec: HardwareSpec = field(default_factory=HardwareSpec)
    budget: BudgetConf = field(default_factory=BudgetConf)
    options: dict[str, Any] = field(default_factory=dict)  # runtime-specific compile options


@dataclass
class LatencyConf:
    enabled: bool = True
    warmup: int = bounded(20, ge=0)
    iterations: int = bounded(200, ge=1)
    min_seconds: float = bounded(0.5, ge=0)  # keep iterating until this much time is spent
    # at the end of the build every stage's deployable is timed again, interleaved in this many rounds in
    # one process (latency/interleaved_ms, latency/speedup): stage-to-stage ratios under the same load; 0: off
    rounds: int = bounded(5, ge=0)


@dataclass
class ProfileConf:
    # opt-in (a PERF_COUNT compile + runs per stage): per-layer times on the runtime, and image
    # decode/resize/normalize vs inference for the deployable (edgebuild/profile.py)
    enabled: bool = False
    top: int = bounded(10, ge=1)  # layers listed, slowest first
    images: int = bounded(50, ge=1)  # images timed for preprocessing vs inference


@dataclass
class StreamConf:
    # opt-in: at the end of the build the final deployable streams the generated moving-shapes video through a
    # capture thread and an inference thread over a ring buffer (edgebuild/stream); stream/* metrics on the
    # final stage. The same as `python -m edgebuild.stream DEPLOY_DIR --source shapes`
    enabled: bool = False
    fps: float = bounded(30.0, gt=0)  # offered frame rate
    seconds: float = bounded(10.0, gt=0)  # frames = round(fps * seconds)
    depth: int = bounded(2, ge=1)  # ring buffer capacity (frames)
    policy: str = "drop_oldest"  # drop_oldest | block: what a full ring does
    reuse_threshold: float = bounded(0.0, ge=0, le=1)  # frame reuse below this mean abs difference (of 255); 0: off
    requests: int = bounded(1, ge=1)  # inferences in flight: 1 synchronous, N > 1 async (runtimes with ASYNC)
    keep_records: int = bounded(1800, ge=0)  # the last N processed frames kept for quality (pipeline.KEEP_RECORDS)
    seed: int = bounded(0, ge=0)  # of the generated video
    battery_mah: float = bounded(2000.0, gt=0)  # battery life estimate: capacity ...
    battery_volts: float = bounded(3.7, gt=0)  # ... and voltage


@dataclass
class EvalConf:
    split: str = "test"
    batch_size: int = bounded(64, ge=1)
    limit: int | None = bounded(None, ge=1)  # evaluate on at most this many samples
    latency: LatencyConf = field(default_factory=LatencyConf)
    profile: ProfileConf = field(default_factory=ProfileConf)
    stream: StreamConf = field(default_factory=StreamConf)


@dataclass
class TrainerConf:
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    precision: str = "32-true"
    deterministic: bool = True
    channels_last: bool = True  # train conv models in NHWC memory layout (faster on CPUs); weights come back NCHW
    enable_progress_bar: bool | None = None  # null: a progress bar with images/s when stderr is a terminal
    enable_model_summary: bool = False
    log_every_n_steps: int = bounded(10, ge=1)
    limit_train_batches: Any | None = bounded(None, gt=0)  # int: batches, float: fraction
    limit_val_batches: Any | None = bounded(None, gt=0)
    extra: dict[str, Any] = field(default_factory=dict)  # any other Lightning Trainer argument


@dataclass
class TrackingConf:
    enabled: bool = True
    uri: str = "sqlite:///outputs/mlflow.db"
    experiment: str | None = None  # default: edgebuild/<recipe>
    artifact_location: str = "outputs/mlartifacts"
    log_model: bool = True  # the final deployable as run artifacts and an MLflow logged model (pyfunc)
    register: str | None = None  # register the logged model under this name in the Model Registry


@dataclass
class CacheConf:
    enabled: bool = True
    dir: str = "outputs/cache"


@dataclass
class SweepConf:
    # what each multirun job returns to the sweeper (Optuna) and what the Pareto front is computed
    # over: "metric:max" or "metric:min", read from the final stage's metrics
    objectives: list[str] = field(default_factory=lambda: ["acc/top1:max", "latency/p50_ms:min"])


@dataclass
class Config:
    description: str = ""
    seed: int = bounded(0, ge=0)
    task: TaskConf = field(default_factory=TaskConf)
    model: ModelConf = field(default_factory=ModelConf)
    data: DataConf = field(default_factory=DataConf)
    target: TargetConf = field(default_factory=TargetConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    tracking: TrackingConf = field(default_factory=TrackingConf)
    eval: EvalConf = field(default_factory=EvalConf)
    budget: BudgetConf = field(default_factory=BudgetConf)
    cache: CacheConf = field(default_factory=CacheConf)
    sweep: SweepConf = field(default_factory=SweepConf)
    # named stages, run in declared order; each is validated against its stage's dataclass
    stages: dict[str, Any] = field(default_factory=dict)


def register_configs() -> None:
    """Register the schema and every recipes/NAME.yaml as option NAME of the `recipe` group."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    cs.store(name="edgebuild_schema", node=Config)
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        recipe = OmegaConf.load(path)
        for name, node in (recipe.get("stages") or {}).items():
            recipe.stages[name] = typed_stage(node)
        cs.store(group="recipe", name=path.stem, node=recipe, package="_global_")


def typed_stage(node: Any) -> Any:
    """A recipe's stage node merged onto its stage's dataclass: every option is present (so
    `stages.train.epochs=3` overrides it even when the recipe relies on the default), typed, and an
    unknown key fails at compose time. Nodes that do not validate stay as written; the build's plan
    reports them with the stage's name."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from edgebuild.stage import REGISTRY, stage_class

    if not isinstance(node, DictConfig) or node.get("kind") not in REGISTRY:
        return node
    values = OmegaConf.to_container(node, resolve=False)
    kind = values.pop("kind")
    try:
        typed = OmegaConf.merge(OmegaConf.structured(stage_class(kind)), values)
    except OmegaConfBaseException:
        return node
    return OmegaConf.merge(OmegaConf.create({"kind": kind}), typed)


ALLOWED_TARGETS_ENV = "EDGEBUILD_ALLOWED_TARGETS"
# what edgebuild's own configs name; always importable, whatever the allow-list says
ALWAYS_ALLOWED = ("edgebuild", "torch.optim", "torchvision.models")


def allowed_target_prefixes() -> tuple[str, ...] | None:
    """The `_target_` allow-list from the environment (comma-separated module prefixes), or None:
    any importable path. An environment variable, so a recipe cannot widen the operator's policy."""
    import os

    raw = os.environ.get(ALLOWED_TARGETS_ENV, "")
    prefixes = tuple(p.strip().rstrip(".") for p in raw.split(",") if p.strip())
    return (*ALWAYS_ALLOWED, *prefixes) if prefixes else None


def check_target(path: Any, key: str = "_target_") -> None:
    """Refuse a `_target_` outside the allow-list, before anything is imported."""
    prefixes = allowed_target_prefixes()
    if prefixes is None:
        return
    if not isinstance(path, str) or not any(path == p or path.startswith(p + ".") for p in prefixes):
        raise EdgebuildError(
            f"{key} {path!r} is outside the allowed _target_ prefixes ({', '.join(prefixes)})",
            f"use a class from an allowed package, or add its package to {ALLOWED_TARGETS_ENV} "
            f"(comma-separated, e.g. {ALLOWED_TARGETS_ENV}=mypkg.models)")


def nested_targets(node: Any, key: str = "") -> list[tuple[str, Any]]:
    """Every (`key`, `_target_`) in a config tree, without resolving interpolations."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=False)
    found = []
    if isinstance(node, dict):
        if "_target_" in node:
            found.append((f"{key}._target_" if key else "_target_", node["_target_"]))
        for k, v in node.items():
            found += nested_targets(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += nested_targets(v, f"{key}[{i}]")
    return found


def check_targets(cfg: Any) -> None:
    """Plan time: every `_target_` of the build config is allowed (nothing is imported here)."""
    if allowed_target_prefixes() is None:
        return
    for key, path in nested_targets(cfg):
        if path is not None:
            check_target(path, key)


def resolve_target(path: str, key: str = "_target_") -> Any:
    """Import the object a dotted `_target_` path names, after the allow-list allows it."""
    import importlib

    check_target(path, key)
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise EdgebuildError(f"{key} {path!r} cannot be imported",
                             "give a dotted path to a class or function") from None


def instantiate(node: Any, **kwargs: Any) -> Any:
    """The one place that calls hydra's instantiate; every nested `_target_` passes the allow-list
    first, so a refused module is never imported."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    for key, path in nested_targets(node):
        check_target(path, key)
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as e:
        target = node.get("_target_") if hasattr(node, "get") else node
        raise EdgebuildError(
            f"could not instantiate {target!r}: {e.__cause__ or e}",
            "check the _target_ path and its arguments",
        ) from e
