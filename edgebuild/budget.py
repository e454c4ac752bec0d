"""Budgets: limits from the recipe and the target, checked on the final artifact's metrics."""

from __future__ import annotations

import operator
from typing import Any

# budget key -> (metric, comparison, scale applied to the metric before comparing)
LIMITS: dict[str, tuple[str, str, float]] = {
    "min_acc": ("acc/top1", ">=", 1.0),
    "max_acc_drop": ("acc/drop", "<=", 1.0),
    "min_map": ("map/50_95", ">=", 1.0),
    "max_map_drop": ("map/drop", "<=", 1.0),
    "max_latency_ms": ("latency/p50_ms", "<=", 1.0),
    "max_size_bytes": ("size/bytes", "<=", 1.0),
    "max_zip_bytes": ("size/zip_bytes", "<=", 1.0),
    "max_macs": ("macs", "<=", 1.0),
    "max_params": ("params", "<=", 1.0),
    "max_ram_bytes": ("memory/peak_ram_bytes", "<=", 1.0),
    "max_flash_bytes": ("memory/flash_bytes", "<=", 1.0),
    "min_npu_ops_fraction": ("ethos_u/npu_ops_fraction", ">=", 1.0),
    # measured by the stream (eval.stream.enabled; plan time refuses them otherwise)
    "min_fps": ("stream/fps", ">=", 1.0),
    "max_e2e_latency_ms": ("stream/e2e_p90_ms", "<=", 1.0),
    "max_energy_mj": ("energy/mj_per_inference", "<=", 1.0),
    "min_battery_hours": ("battery/hours", ">=", 1.0),
}
# a violated check names what violated it, from this metric (Vela's CPU fallbacks)
DETAILS = {"ethos_u/npu_ops_fraction": "ethos_u/cpu_ops"}
# a runtime whose host timing is not its device's (an MCU, an NPU) names its device latency in runtime_info:
# `latency/device_metric` (e.g. "latency/estimate_ms") and how it was got, `latency/device_source`; the latency
# limit then checks that figure instead of the host's p50
DEVICE_METRIC, DEVICE_SOURCE = "latency/device_metric", "latency/device_source"
STREAM_LIMITS = ("min_fps", "max_e2e_latency_ms", "max_energy_mj", "min_battery_hours")
OPS = {"<=": operator.le, ">=": operator.ge}


def check(metrics: dict[str, Any], budgets: list[tuple[str, Any]]) -> dict[str, Any]:
    """budgets: (source, BudgetConf) pairs, e.g. ("recipe", cfg.budget), ("target", cfg.target.budget)."""
    checks = []
    for source, budget in budgets:
        for key, (metric, op, scale) in LIMITS.items():
            limit = getattr(budget, key, None)
            if limit is None:
                continue
            device = key == "max_latency_ms" and bool(metrics.get(DEVICE_METRIC))
            if device:
                metric = str(metrics[DEVICE_METRIC])
            value = metrics.get(metric)
            ok = value is not None and OPS[op](value * scale, limit)
            checks.append({"budget": key, "source": source, "metric": metric, "op": op, "limit": limit,
                           "value": value, "ok": bool(ok)})
            if not ok and metrics.get(DETAILS.get(metric, "")):
                checks[-1]["detail"] = metrics[DETAILS[metric]]
            if device:  # shown beside a violation: which figure was checked, and that it is an estimate
                checks[-1]["detail"] = f"device latency, {metrics.get(DEVICE_SOURCE, metric)}"
    return {"ok": all(c["ok"] for c in checks), "checks": checks}


def check_pick(checked: dict[str, Any], pick: dict[str, Any] | None) -> dict[str, Any]:
    """A stage that chose among candidates by the budget (summary "pick") and found none within it fails
    the build, whatever the kept candidate's own check says (its latency, timed apart, may pass a limit
    every candidate missed when timed together)."""
    if not pick:
        return checked
    met = sum(bool(c.get("budget_ok")) for c in pick["candidates"])
    check = {"budget": "candidates", "source": pick["stage"], "metric": "candidates within budget", "op": ">=",
             "limit": 1, "value": met, "ok": met >= 1}
    checks = [*checked["checks"], check]
    return {"ok": all(c["ok"] for c in checks), "checks": checks}
