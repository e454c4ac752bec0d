"""Duty-cycle energy estimates from stated device powers (the target spec's `power`, or CLI flags). ESTIMATES:
the busy time is measured here, on this machine; the watts are the device's stated figures (conf/target/*.yaml
cites each), not a measurement of this machine.

For a stream that runs `r` inferences per second, each keeping the device busy `t` seconds (preprocess + inference
+ postprocess of one inferred frame, measured), on a device drawing P_active watts busy and P_idle idle:
(`t` = the union of the inferred frames' [preprocess start, postprocess end] intervals / inferences: with
asynchronous requests two frames' work overlaps, and the overlap is busy time once, not twice)

    busy fraction      D = min(1, r * t)
    energy/inference   E = P_active * t                  (J; x1000 for mJ)
    average power      P = D * P_active + (1 - D) * P_idle
    battery life       h = (mAh / 1000 * V) / P          (Wh / W)

Example (tests/test_stream.py checks it): t = 20 ms, r = 10/s, P_active = 2 W, P_idle = 0.1 W, 1000 mAh at 3.7 V:
D = 0.2, E = 40 mJ, P = 0.2 * 2 + 0.8 * 0.1 = 0.48 W, h = 3.7 / 0.48 = 7.71 h.
A microcontroller's spec gives currents at a supply voltage instead: P = mA / 1000 * V.

A runtime whose device is not this machine (an MCU on TFLite Micro, an Ethos-U NPU through Vela) names its device
latency (`latency/device_metric` in runtime_info, see edgebuild/budget.py): then t is that figure (the MCU's MAC
estimate, Vela's cycles / clock), not this host's busy time, and `energy/busy_from` says so. RAPL measures this
host, not that device, so with a device latency `auto` keeps the model's figures as the headline.

Measured where possible: on Linux with readable RAPL counters (/sys/class/powercap/intel-rapl:N/energy_uj, one
per CPU package; often root-only), `Rapl` reads them before and after the stream. Then (`source` auto or rapl)
the headline figures are measured on THIS machine's CPU packages, everything running on them included:

    energy/inference   E = sum of package energy deltas / inferences
    average power      P = sum of deltas / wall seconds          battery life as above, with this P

and the spec's estimates stay beside them as energy/model_*. `energy/source` says which the headline is:
"rapl" (measured here) or "model" (estimated from the stated powers).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

RAPL_ROOT = "/sys/class/powercap"


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


class Rapl:
    """The machine's RAPL package counters (microjoules, wrapping at max_energy_range_uj); `open` gives None
    where there are none or they cannot be read (no powercap, not Linux, root-only files)."""

    def __init__(self, zones: list[Path]):
        self.zones = zones
        self.ranges = [int((z / "max_energy_range_uj").read_text()) if (z / "max_energy_range_uj").exists()
                       else 2**32 for z in zones]
        self.start: list[int] = []

    @classmethod
    def open(cls, root: str = RAPL_ROOT) -> Rapl | None:
        # top-level package zones only (intel-rapl:0, intel-rapl:1): their subzones (intel-rapl:0:0 core, dram)
        # are parts of them and would count twice
        zones = sorted(Path(p) for p in glob.glob(os.path.join(root, "intel-rapl:*"))
                       if Path(p).name.count(":") == 1 and (Path(p) / "energy_uj").exists())
        try:
            meter = cls(zones) if zones else None
            if meter is not None:
                meter.read()
            return meter
        except (OSError, ValueError):  # e.g. PermissionError: energy_uj is root-only on recent kernels
            return None

    def read(self) -> list[int]:
        return [int((z / "energy_uj").read_text()) for z in self.zones]

    def begin(self) -> None:
        self.start = self.read()

    def joules(self) -> float:
        """Energy of all packages since `begin`, one wrap per counter allowed."""
        total = 0
        for a, b, wrap in zip(self.start, self.read(), self.ranges, strict=True):
            total += b - a if b >= a else b + wrap - a
        return total / 1e6


def device_latency(session: Any) -> tuple[float, str] | None:
    """(ms, where from) of one inference on the runtime's own device, where it names one (else None)."""
    info = session.runtime_info()
    value = info.get(str(info.get("latency/device_metric") or ""))
    return (float(value), str(info.get("latency/device_source") or info["latency/device_metric"])) \
        if value is not None else None


def for_stream(metrics: dict[str, Any], active_w: float | None, idle_w: float | None, battery_mah: float,
               battery_v: float, rapl_j: float | None = None, source: str = "auto",
               device: tuple[float, str] | None = None) -> dict[str, Any]:
    """`estimate` from a stream's metrics (busy ms per inference, inferences per second of wall time); with
    `rapl_j` (measured over the stream) and `source` auto|rapl the headline figures are the measured ones.
    `device` (ms, where from; `device_latency`): the busy time per inference on the target's own device."""
    out: dict[str, Any] = {}
    if active_w is not None:
        rate = metrics["stream/inferences"] / metrics["stream/wall_s"]
        busy_ms = device[0] if device else metrics["stream/busy_ms_per_inference"]
        out = estimate(busy_ms / 1000.0, rate, float(active_w), float(idle_w or 0.0), battery_mah, battery_v)
        out.update({"energy/source": "model", "energy/busy_ms": busy_ms,
                    "energy/busy_from": f"device: {device[1]}" if device else "host: stream/busy_ms_per_inference"})
        for k in ("energy/mj_per_inference", "energy/avg_power_w", "battery/hours"):
            out[k.replace("/", "/model_", 1)] = out[k]
    if rapl_j is not None and (source == "rapl" or (source == "auto" and device is None)):
        avg = rapl_j / metrics["stream/wall_s"]
        out.update({"energy/rapl_j": rapl_j, "energy/mj_per_inference": rapl_j * 1000.0 / max(
            1, metrics["stream/inferences"]), "energy/avg_power_w": avg, "energy/rapl_avg_power_w": avg,
            "battery/hours": battery_mah / 1000.0 * battery_v / avg if avg > 0 else float("inf"),
            "battery/mah": battery_mah, "battery/volts": battery_v, "energy/estimated": 0.0, "energy/source": "rapl"})
    return out
