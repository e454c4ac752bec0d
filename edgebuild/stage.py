"""The stage contract: a typed config, a registry `kind`, a manual `version`, `run(ctx) -> StageResult`.

A stage writes only into `ctx.workdir` (a fresh folder), never mutates its input artifacts, never
records anything itself (it returns metrics; the pipeline measures and records), and imports heavy
libraries inside `run`. Every field changes the cache key, so everything that changes the output
must be a field.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from edgebuild.config import check_ranges
from edgebuild.errors import EdgebuildError

if TYPE_CHECKING:
    from edgebuild.artifact import Artifact

# kind -> "module:Class"; imported lazily so an unused stage costs nothing
REGISTRY: dict[str, str] = {
    "train": "edgebuild.stages.train:Train",
    "export": "edgebuild.stages.export:Export",
    "quantize": "edgebuild.stages.quantize:Quantize",
    "qat": "edgebuild.stages.qat:QAT",
    "fp16": "edgebuild.stages.fp16:FP16",
    "prune": "edgebuild.stages.prune:Prune",
    "cluster": "edgebuild.stages.cluster:Cluster",
    "separable": "edgebuild.stages.separable:Separable",
    "distill": "edgebuild.stages.distill:Distill",
    "resolution": "edgebuild.stages.resolution:Resolution",
    "cascade": "edgebuild.stages.cascade:Cascade",
    "shootout": "edgebuild.stages.shootout:Shootout",
    "gate": "edgebuild.stages.gate:Gate",
    "decompose": "edgebuild.stages.decompose:Decompose",
}


@dataclass
class StageResult:
    artifact: Artifact
    metrics: dict[str, Any] = field(default_factory=dict)  # stage-specific numbers (sparsity, ...)
    files: dict[str, str] = field(default_factory=dict)  # extra report files in the workdir: name -> relpath
    steps: list[dict[str, Any]] = field(default_factory=list)  # sub-steps: {"name", "params", "metrics"}
    notes: list[str] = field(default_factory=list)  # plain-language findings for the summary


@dataclass
class Stage:
    kind: ClassVar[str] = ""
    version: ClassVar[int] = 1
    # which parts of the build config change this stage's output (they enter its cache key)
    uses: ClassVar[tuple[str, ...]] = ("data", "task")
    tasks: ClassVar[tuple[str, ...]] = ("classification", "detection", "multihead")
    # precision flow, checked at plan time: the precision of this stage's output (None: its input's), and
    # whether it needs fp32 weights (so an INT8 or FP16 input is refused before any work)
    output_precision: ClassVar[str | None] = None
    needs_float_input: ClassVar[bool] = False

    input: str | None = None  # the stage whose artifact this one consumes; default: the previous

    def references(self) -> list[str]:
        """Other stages this one reads besides its input (e.g. a distillation teacher)."""
        return []

    def check(self, cfg: Any) -> None:
        """Compose-time validation against the whole build config; raise EdgebuildError."""

    def cache_inputs(self, cfg: Any) -> dict[str, Any]:
        """What else decides this stage's output besides its fields, inputs and `uses` (e.g. which runtimes
        are installed, at which versions); it enters the cache key. Light: no heavy imports."""
        return {}

    def run(self, ctx: Any) -> StageResult:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "input"}


def check_patterns(stage: Stage, **options: list[str]) -> None:
    """Plan time: every layer-name regex of a stage option compiles (else one clear message, exit 2)."""
    import re

    for option, patterns in options.items():
        for pattern in patterns or []:
            try:
                re.compile(pattern)
            except re.error as e:
                raise EdgebuildError(f"{stage.kind}: {option} entry {pattern!r} is not a regex: {e}",
                                     "give module names (e.g. features.3) or valid regular expressions") from None


def stage_class(kind: str) -> type[Stage]:
    if kind not in REGISTRY:
        raise EdgebuildError(
            f"unknown stage kind {kind!r}",
            f"use one of: {', '.join(sorted(REGISTRY))}",
        )
    module, cls = REGISTRY[kind].split(":")
    return getattr(importlib.import_module(module), cls)


def build_stage(name: str, node: Any) -> Stage:
    """Validate one `stages.NAME` config node against its stage's dataclass."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(node, (dict, DictConfig)) or "kind" not in node:
        raise EdgebuildError(f"stage {name!r} has no 'kind'", f"add 'kind: <stage kind>' under stages.{name}")
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    kind = values.pop("kind")
    cls = stage_class(kind)
    schema = OmegaConf.structured(cls)
    try:
        merged = OmegaConf.merge(schema, values)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        problem = f"unknown option {key!r}" if "not in struct" in str(e) or "not found" in str(e) else str(e)
        raise EdgebuildError(f"stages.{name} (kind {kind}): {problem}", f"valid options: {known}") from None
    stage = OmegaConf.to_object(merged)
    assert isinstance(stage, Stage)
    check_ranges(cls, stage, f"stages.{name}")
    return stage
