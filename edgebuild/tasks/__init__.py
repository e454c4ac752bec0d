"""Tasks own what differs between problem types: the data format, the loss, the metric, the
postprocessing of raw outputs and what a deployable's model.json carries. Nothing else branches on
the task."""

from __future__ import annotations

import importlib
from typing import Any

from edgebuild.errors import EdgebuildError

TASKS = {
    "classification": "edgebuild.tasks.classification:Classification",
    "detection": "edgebuild.tasks.detection:Detection",
    "multihead": "edgebuild.tasks.multihead:MultiHead",
}


def make_task(cfg: Any) -> Any:
    if cfg.name not in TASKS:
        raise EdgebuildError(f"unknown task {cfg.name!r}", f"use task= one of: {', '.join(sorted(TASKS))}")
    module, cls = TASKS[cfg.name].split(":")
    return getattr(importlib.import_module(module), cls)(cfg)
