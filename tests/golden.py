"""Golden metrics: the numbers each recipe in recipes/ produces, recorded in tests/golden/recipes.json.

Two levels, both cheap enough for the suite:
- every recipe (`test_golden[RECIPE]`): its plan (stage names and kinds, in order), and its source
  model as the pipeline builds it (Builder.source: the data's input shape and classes, MACs and
  parameters at batch 1). Exact: these follow from the config and the code alone.
- a few recipes built end to end, shrunk (`test_golden_build[RECIPE]`, overrides in BUILDS): per stage
  MACs, params, the precision that ran and the INT8 op fraction exactly; accuracy within ACC_TOL and
  the deployable's size within SIZE_TOL. Why those tolerances: trained weights differ between the CPUs
  these machines get (docs: FIELD-NOTES, "the same script on two CPUs"), and a 2-3-epoch build on a
  few hundred test images moves by several images when they do (one digits test image is 0.28 pp);
  10 pp still catches a broken stage (chance is 10 %, a working build 85-100 %). The FP32 file's
  size follows the architecture (a few bytes of text vary); an INT8 file's size depends on which
  layers were quantized, hence 5 %.

A deliberate change regenerates the file in the same commit:

    python -m tests.golden --update            # every recipe (plans, sources, shrunk builds)
    python -m tests.golden --update default    # only these recipes
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "recipes.json"
ACC_TOL = 0.10  # absolute, top-1 as a fraction (10 pp)
SIZE_TOL = 0.05  # relative, size/bytes of the deployable
EXACT = ("macs", "params", "runtime/precision", "int8/ops_fraction")

# cheap data for the plan/source level: the shapes and classes stay, fewer images are generated
SOURCE_OVERRIDES = {"ssd_int8": ["data.num_samples=40"], "ssd_prune_int8": ["data.num_samples=40"]}
# recipes also built end to end (shrunk); what each stage's epochs become
BUILDS: dict[str, list[str]] = {
    "default": ["stages.train.epochs=3", "budget.min_acc=null"],
    "decompose_haar": ["stages.train.epochs=3", "stages.haar.epochs=1", "stages.res4.epochs=1",
                       "budget.max_acc_drop=null"],
    "multitask_shared": ["stages.train.epochs=3", "budget.max_acc_drop=null"],
}


def recipes() -> list[str]:
    return sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


def load() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}


def source_record(recipe: str, tmp: Path) -> dict[str, Any]:
    """The plan and the source model of `recipe`, as the pipeline makes them."""
    from edgebuild import testing
    from edgebuild.evaluate import count_macs
    from edgebuild.pipeline import Builder

    cfg = testing.compose(testing.shrink(tmp) + SOURCE_OVERRIDES.get(recipe, []), recipe)
    builder = Builder(cfg, tmp / f"run-{recipe}", recipe)
    art = builder.source()
    shape = list(art.meta["input_shape"])
    macs, params = count_macs(art.load_torch(), shape)
    return {"stages": [[name, stage.kind] for name, stage, _ in builder.stages], "input_shape": shape,
            "num_classes": int(builder.data.num_classes), "task": str(cfg.task.name),
            "source_macs": int(macs), "source_params": int(params)}


def build_record(recipe: str, tmp: Path) -> dict[str, Any]:
    """Per stage: the exact counts and precision, and accuracy / size (compared within tolerances)."""
    from edgebuild import testing

    s = testing.build(testing.shrink(tmp) + BUILDS[recipe], tmp, recipe=recipe, run_name=f"golden-{recipe}")
    out = {}
    for st in s["stages"]:
        m = st["metrics"]
        row = {k: m[k] for k in (*EXACT, "size/bytes") if k in m}
        row.update({k: m[k] for k in m if k == "acc/top1" or (k.startswith("acc/") and k.endswith("/top1"))
                    or k.startswith("map/")})
        out[st["name"]] = row
    return out


def compare_build(recipe: str, want: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """The differences beyond tolerance, each naming the recipe, stage and metric."""
    problems = []
    for stage, row in want.items():
        if stage not in got:
            problems.append(f"{recipe}: stage {stage!r} is gone")
            continue
        for k, v in row.items():
            g = got[stage].get(k)
            if g is None:
                problems.append(f"{recipe}/{stage}: {k} is no longer reported (golden {v})")
            elif k in EXACT and g != v:
                problems.append(f"{recipe}/{stage}: {k} = {g}, golden {v} (exact)")
            elif k == "size/bytes" and abs(g - v) > SIZE_TOL * v:
                problems.append(f"{recipe}/{stage}: size/bytes = {g}, golden {v} (within {SIZE_TOL:.0%})")
            elif (k.startswith("acc/") or k.startswith("map/")) and abs(g - v) > ACC_TOL:
                problems.append(f"{recipe}/{stage}: {k} = {g:.4f}, golden {v:.4f} (within {ACC_TOL})")
    return problems


def update(names: list[str]) -> None:
    data = load()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for r in names:
            print(f"golden: {r}", flush=True)
            rec = {"source": source_record(r, tmp)}
            if r in BUILDS:
                rec["build"] = build_record(r, tmp)
            data[r] = rec
    data = {r: data[r] for r in sorted(data) if r in recipes()}
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] != "--update":
        raise SystemExit("usage: python -m tests.golden --update [RECIPE ...]")
    from edgebuild.openmp import limit_spinning

    limit_spinning()
    update(args[1:] or recipes())
