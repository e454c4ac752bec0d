"""Test helpers (like Lightning's BoringModel): compose the real config, shrink it, build it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgebuild.config import CONF_DIR, register_configs


def tiny_model(num_classes: int = 4, in_channels: int = 1) -> Any:
    """A tiny deterministic CNN every stage can use."""
    from edgebuild.models import small_cnn

    return small_cnn(num_classes=num_classes, in_channels=in_channels, width=4)


def shrink(tmp_path: Path, tracking: bool = False) -> list[str]:
    """Overrides that make any recipe fast and self-contained under tmp_path."""
    out = [
        f"cache.dir={tmp_path}/cache",
        "eval=fast",
        "data.calibration.size=32",
    ]
    if tracking:
        out += [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_location={tmp_path}/mlartifacts"]
    else:
        out.append("tracking=none")
    return out


def compose(overrides: list[str] | None = None, recipe: str | None = None) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    ov = list(overrides or [])
    if recipe:
        ov.insert(0, f"recipe={recipe}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=ov)


def build(overrides: list[str], tmp_path: Path, recipe: str = "default", run_name: str = "run") -> dict[str, Any]:
    from edgebuild.pipeline import build as run_build

    cfg = compose(overrides, recipe)
    return run_build(cfg, Path(tmp_path) / run_name, recipe)


def metric(summary: dict[str, Any], stage: str, name: str) -> Any:
    return next(s for s in summary["stages"] if s["name"] == stage)["metrics"].get(name)
