"""Duty-cycle energy estimates from stated device powers (the target spec's `power`, or CLI flags). ESTIMATES:
the busy time is measured here, on this machine; the watts are the device's stated figures (conf/target/*.yaml
cites each), not a measurement of this machine.

For a stream that runs `r` inferences per second, each keeping the device busy `t` seconds (preprocess + inference
+ postprocess of one inferred frame, measured), on a device drawing P_active watts busy and P_idle idle:

    busy fraction      D = min(1, r * t)
    energy/inference   E = P_active * t                  (J; x1000 for mJ)
    average power      P = D * P_active + (1 - D) * P_idle
    battery life       h = (mAh / 1000 * V) / P          (Wh / W)

Example (tests/test_stream.py checks it): t = 20 ms, r = 10/s, P_active = 2 W, P_idle = 0.1 W, 1000 mAh at 3.7 V:
D = 0.2, E = 40 mJ, P = 0.2 * 2 + 0.8 * 0.1 = 0.48 W, h = 3.7 / 0.48 = 7.71 h.
A microcontroller's spec gives currents at a supply voltage instead: P = mA / 1000 * V.
"""

from __future__ import annotations

from typing import Any


def precision_key(runtime_precision: Any) -> str:
    """A runtime's precision words (f32, bf16, u8, i8, int8, FP16...) as the spec's keys: int8 | fp16 | bf16 | fp32."""
    p = str(runtime_precision or "").lower()
    if "8" in p:
        return "int8"
    if "bf16" in p:
        return "bf16"
    if "16" in p:
        return "fp16"
    return "fp32"


def device_powers(power: Any, precision: str) -> tuple[float | None, float | None, str]:
    """(active W, idle W, where from) for `precision` from a target spec's `power` node: watts per precision, or
    milliamps per precision and sleep milliamps at `volts`. A precision the spec lacks uses its fp32 figure."""
    if power is None:
        return None, None, ""

    def pick(table: Any) -> float | None:
        table = dict(table or {})
        return table.get(precision, table.get("fp32", next(iter(table.values()), None)))

    active, idle = pick(power.get("active_watts")), power.get("idle_watts")
    if active is None and power.get("volts"):
        ma = pick(power.get("active_ma"))
        active = ma / 1000.0 * power["volts"] if ma is not None else None
        sleep = power.get("sleep_ma")
        idle = sleep / 1000.0 * power["volts"] if sleep is not None else idle
    return active, idle, str(power.get("source") or "")


def estimate(busy_s: float, inferences_per_s: float, active_w: float, idle_w: float, battery_mah: float,
             battery_v: float) -> dict[str, float]:
    duty = min(1.0, inferences_per_s * busy_s)
    avg = duty * active_w + (1 - duty) * idle_w
    return {"energy/busy_fraction": duty, "energy/mj_per_inference": active_w * busy_s * 1000.0,
            "energy/avg_power_w": avg, "energy/active_w": active_w, "energy/idle_w": idle_w,
            "battery/hours": battery_mah / 1000.0 * battery_v / avg if avg > 0 else float("inf"),
            "battery/mah": battery_mah, "battery/volts": battery_v, "energy/estimated": 1.0}


def for_stream(metrics: dict[str, Any], active_w: float | None, idle_w: float | None, battery_mah: float,
               battery_v: float) -> dict[str, float]:
    """`estimate` from a stream's metrics (busy ms per inference, inferences per second of wall time)."""
    if active_w is None:
        return {}
    rate = metrics["stream/inferences"] / metrics["stream/wall_s"]
    return estimate(metrics["stream/busy_ms_per_inference"] / 1000.0, rate, float(active_w), float(idle_w or 0.0),
                    battery_mah, battery_v)
