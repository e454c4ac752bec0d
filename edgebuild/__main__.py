"""`python -m edgebuild recipe=NAME [overrides] [-m]`: compose with Hydra, build, report.

In a multirun (-m) every job is tagged with one `sweep_id` and returns its `sweep.objectives`
(what the Optuna sweeper optimizes); `edgebuild.sweep.SweepEnd` records the Pareto front at the end.

Exit codes: 0 built and within budget; 1 budget violated (artifacts and runs are kept as evidence);
2 a problem in the input (message names it and the fix), including a config Hydra cannot compose
(unknown key, config group option or override syntax); 130 interrupted (finished stages stay cached).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from edgebuild.config import CONF_DIR, register_configs
from edgebuild.errors import BudgetExceeded, EdgebuildError
from edgebuild.openmp import limit_spinning  # noqa: E402

limit_spinning()  # before torch loads

QUIET = ("pytorch_lightning", "pytorch_lightning.utilities.rank_zero", "lightning", "lightning.pytorch",
         "lightning_fabric", "lightning.fabric.utilities.rank_zero", "nncf", "alembic", "mlflow")


COMPOSED = {"task_started": False}  # Hydra exits 1 on any error; before the task ran, it was the config's


def run(cfg: Any) -> dict[str, Any] | list[float]:
    COMPOSED["task_started"] = True
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from edgebuild.pipeline import build
    from edgebuild.sweep import objective_values, sweep_id

    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|treespec|litlogger).*")
    hc = HydraConfig.get()
    recipe = hc.runtime.choices.get("recipe", "default")
    multirun = hc.mode == RunMode.MULTIRUN
    tags = {"sweep_id": sweep_id(str(hc.sweep.dir)), "sweep_job": hc.job.num} if multirun else {}
    try:
        summary = build(cfg, Path(hc.runtime.output_dir), recipe, tags)
    except EdgebuildError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"\nedgebuild: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except BudgetExceeded as e:
        print("\nedgebuild: budget violated (see the table above); artifacts and runs are kept", file=sys.stderr)
        if not multirun:  # in a sweep, one job over budget must not stop the others
            sys.exit(BudgetExceeded.exit_code)
        summary = e.args[0]  # its numbers still inform the search
    except KeyboardInterrupt:
        print("\nedgebuild: interrupted; finished stages stay cached and the next build resumes from them",
              file=sys.stderr)
        sys.exit(130)
    if not multirun:
        return summary
    print(f"sweep id: {tags['sweep_id']}")
    try:  # the sweeper (Optuna) optimizes what the task function returns
        return objective_values(summary, list(cfg.sweep.objectives))
    except EdgebuildError as e:
        print(f"\nedgebuild: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def main() -> None:
    import hydra

    register_configs()
    try:
        hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(run)()
    except SystemExit as e:
        if e.code == 1 and not COMPOSED["task_started"]:  # Hydra printed what it could not compose
            print("edgebuild: error: the config above could not be composed (exit 2); `python -m edgebuild "
                  "--help` lists the config groups and their options", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
