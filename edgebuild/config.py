"""Typed config schemas, the recipe config group, and the one `instantiate` helper.

Values live in YAML under conf/ and recipes/; the dataclasses here give them types so a typo'd key
or a wrong type fails at compose time, naming the key, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgebuild.errors import EdgebuildError

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
RECIPES_DIR = ROOT / "recipes"


@dataclass
class TaskConf:
    name: str = "classification"
    # detection postprocessing; ignored by classification
    score_threshold: float = 0.01
    nms_iou: float = 0.45
    top_k: int = 200
    detections_per_image: int = 100


@dataclass
class ModelConf:
    # built-in name ("cnn"), a torchvision model name ("mobilenet_v2"), or "custom" with _target_
    name: str = "cnn"
    _target_: str | None = None
    num_classes: int | None = None  # default: the data's class count
    in_channels: int | None = None  # default: the data's channel count
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments
    small_input: bool = False  # torchvision models: stride-1 stem for 32x32-class inputs
    weights: str | None = None  # local state_dict file, or a torchvision weights name (needs network)
    strict_weights: bool = True


@dataclass
class SplitConf:
    val: float = 0.15
    test: float = 0.2
    seed: int = 0


@dataclass
class CalibrationConf:
    size: int = 300
    seed: int = 0


@dataclass
class DataConf:
    name: str = "digits"  # digits | synthetic | imagefolder | cifar10 (+ task-specific kinds)
    root: str | None = None
    image_size: int = 8
    channels: int = 1
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    split: SplitConf = field(default_factory=SplitConf)
    calibration: CalibrationConf = field(default_factory=CalibrationConf)
    batch_size: int = 64
    num_workers: int = 0
    augment: bool = False
    limit: int | None = None  # use at most this many images (quick runs)
    num_samples: int = 600  # generated datasets
    num_classes: int = 10  # generated datasets
    options: dict[str, Any] = field(default_factory=dict)  # loader-specific extras


@dataclass
class BudgetConf:
    min_acc: float | None = None  # acc/top1, fraction 0..1
    max_acc_drop: float | None = None  # percentage points vs the first measured stage
    min_map: float | None = None
    max_map_drop: float | None = None  # points (x100) of map/50_95 vs the first measured stage
    max_latency_ms: float | None = None  # latency/p50_ms
    max_size_bytes: int | None = None
    max_zip_bytes: int | None = None
    max_macs: int | None = None
    max_params: int | None = None
    max_ram_bytes: int | None = None
    max_flash_bytes: int | None = None


@dataclass
class HardwareSpec:
    name: str = "generic CPU"
    peak_macs_per_s: dict[str, float] = field(default_factory=dict)  # per precision: fp32, int8, ...
    memory_bandwidth_bytes_per_s: float | None = None
    ram_bytes: int | None = None
    flash_bytes: int | None = None


@dataclass
class TargetConf:
    name: str = "cpu"
    runtime: str = "openvino"  # openvino | onnxruntime
    device: str = "CPU"
    # inference precision for floating-point models; "f32" states true FP32 (OpenVINO's CPU plugin
    # otherwise runs FP32 IRs in bf16 on AVX-512 BF16 CPUs), "auto" leaves the runtime's default
    precision: str = "f32"
    threads: int = 2
    require_device: bool = False
    spec: HardwareSpec = field(default_factory=HardwareSpec)
    budget: BudgetConf = field(default_factory=BudgetConf)
    options: dict[str, Any] = field(default_factory=dict)  # runtime-specific compile options


@dataclass
class LatencyConf:
    enabled: bool = True
    warmup: int = 20
    iterations: int = 200
    min_seconds: float = 0.5  # keep iterating until this much time is spent


@dataclass
class ProfileConf:
    # opt-in (a PERF_COUNT compile + runs per stage): per-layer times on the runtime, and image
    # decode/resize/normalize vs inference for the deployable (edgebuild/profile.py)
    enabled: bool = False
    top: int = 10  # layers listed, slowest first
    images: int = 50  # images timed for preprocessing vs inference


@dataclass
class EvalConf:
    split: str = "test"
    batch_size: int = 64
    limit: int | None = None  # evaluate on at most this many samples
    latency: LatencyConf = field(default_factory=LatencyConf)
    profile: ProfileConf = field(default_factory=ProfileConf)


@dataclass
class TrainerConf:
    accelerator: str = "cpu"
    devices: Any = 1
    strategy: str = "auto"
    precision: str = "32-true"
    deterministic: bool = True
    enable_progress_bar: bool = False
    enable_model_summary: bool = False
    log_every_n_steps: int = 10
    limit_train_batches: Any | None = None
    limit_val_batches: Any | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # any other Lightning Trainer argument


@dataclass
class TrackingConf:
    enabled: bool = True
    uri: str = "sqlite:///outputs/mlflow.db"
    experiment: str | None = None  # default: edgebuild/<recipe>
    artifact_location: str = "outputs/mlartifacts"
    log_model: bool = True  # the final deployable as run artifacts


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
    seed: int = 0
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


def instantiate(node: Any, **kwargs: Any) -> Any:
    """The one place that calls hydra's instantiate (a future `_target_` allow-list goes here)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as e:
        target = node.get("_target_") if hasattr(node, "get") else node
        raise EdgebuildError(
            f"could not instantiate {target!r}: {e.__cause__ or e}",
            "check the _target_ path and its arguments",
        ) from e
