"""Targets: where a deployable runs. A target converts artifacts to its runtime's format, compiles
them at an explicit inference precision, says which precision actually ran, measures latency on the
compiled artifact, and estimates latency from its hardware spec (roofline)."""

from __future__ import annotations

import importlib
import logging
from typing import Any

from edgebuild.errors import EdgebuildError

log = logging.getLogger(__name__)

RUNTIMES = {
    "openvino": "edgebuild.targets.openvino:OpenVINORuntime",
    "onnxruntime": "edgebuild.targets.onnxruntime:ONNXRuntime",
    "mcu": "edgebuild.targets.mcu:MCURuntime",  # previous release's MCU estimates on an OpenVINO CPU stand-in
    "executorch": "edgebuild.targets.executorch:ExecuTorchRuntime",  # .pte, XNNPACK (extra: runtimes)
    "litert": "edgebuild.targets.litert:LiteRTRuntime",  # .tflite via litert-torch (extra: runtimes)
    # after litert: the first runtime registering a format owns it (the shootout's candidate for .tflite)
    "tflm": "edgebuild.targets.tflm:TFLMRuntime",  # TFLite Micro on the host: INT8 .tflite (extra: runtimes)
    "ethos_u": "edgebuild.targets.ethos_u:EthosURuntime",  # Vela for Ethos-U55/U65 + TFLM accuracy
    "tensorrt": "edgebuild.targets.tensorrt:TensorRTRuntime",  # NVIDIA GPUs; unmeasured without one
}


def runtime_class(target_cfg: Any) -> Any:
    """The Runtime subclass of a target config (imports its module: light, heavy imports are deferred)."""
    name = target_cfg.runtime
    if name not in RUNTIMES:
        raise EdgebuildError(f"unknown runtime {name!r} in target {target_cfg.name!r}",
                             f"use target.runtime= one of: {', '.join(RUNTIMES)}")
    module, cls = RUNTIMES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def supports(target_cfg: Any, capability: str) -> bool:
    """Plan-time question a stage asks: does this target's runtime have `capability` (targets/base.py)?"""
    return runtime_class(target_cfg).supports(capability)


def require(target_cfg: Any, stage: str, needed: str, options: dict[str, str] | None = None) -> None:
    """Plan time: the target's runtime has capability `needed`, and every capability an option the user
    set needs ({"max_drop=0.01": QUANTIZE_ACCURACY_CONTROL}); otherwise a clear error naming who has it."""
    runtime = runtime_class(target_cfg)

    def able(cap: str) -> str:
        return ", ".join(n for n, cls in load_runtimes().items() if cls.supports(cap)) or "none yet"

    if not runtime.supports(needed):
        raise EdgebuildError(f"{stage}: target {target_cfg.name!r} runs {target_cfg.runtime}, which has no {needed!r}",
                             f"use a target whose runtime has it (target.runtime: {able(needed)}), or remove the stage")
    for option, cap in (options or {}).items():
        if not runtime.supports(cap):
            raise EdgebuildError(f"{stage}: {option} is not supported by target {target_cfg.name!r} "
                                 f"(runtime {target_cfg.runtime})",
                                 f"drop the option, or use a target whose runtime has it ({able(cap)})")


def load_runtimes() -> dict[str, Any]:
    """Every registered runtime class by name (importing them registers their formats as artifact kinds)."""
    out = {}
    for name, ref in RUNTIMES.items():
        module, cls = ref.split(":")
        out[name] = getattr(importlib.import_module(module), cls)
    return out


def formats() -> dict[str, Any]:
    """{format: runtime class} over the registered runtimes (the first runtime declaring a format writes it)."""
    out: dict[str, Any] = {}
    for cls in load_runtimes().values():
        out.setdefault(cls.format, cls)
    return out


class Target:
    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.runtime = runtime_class(cfg)(cfg)
        self._device: str | None = None
        self._unmeasured: str | None = None

    def for_runtime(self, name: str) -> Target:
        """This target (device, threads, spec, budget) on another registered runtime: what a runtime
        shootout compares and how its pick is measured. Compile options are runtime-specific and dropped;
        a precision hint the runtime does not know becomes its first (float) precision."""
        if name == self.cfg.runtime:
            return self
        from omegaconf import OmegaConf

        cls = runtime_class(OmegaConf.create({"runtime": name, "name": self.cfg.name}))
        cfg = OmegaConf.merge(self.cfg, {"runtime": name})
        cfg.options = {}
        if cfg.precision not in cls.precisions:
            cfg.precision = cls.precisions[0]
        return Target(cfg)

    @property
    def format(self) -> str:
        return self.runtime.format

    def supports(self, capability: str) -> bool:
        return self.runtime.supports(capability)

    @property
    def device(self) -> str:
        """The device measurements run on: the target's own, or the CPU as a stated proxy."""
        if self._device is None:
            available = self.runtime.available_devices()
            wanted = self.cfg.device
            if any(d == wanted or d.startswith(wanted + ".") for d in available):
                self._device = wanted
            elif self.cfg.require_device:
                raise EdgebuildError(
                    f"target {self.cfg.name!r} requires device {wanted}, but this machine has only {available} "
                    f"({self.runtime.absent_device(wanted)})",
                    "run on a machine with that device, or drop target.require_device=true to "
                    + ("measure on the CPU as a proxy" if self.runtime.cpu_proxy else
                       "build without measuring (the build then states what went unmeasured)"),
                )
            elif not self.runtime.cpu_proxy:  # CPU numbers would mean nothing for this device: record none
                self._unmeasured = self.runtime.absent_device(wanted)
                log.warning("target %s: unmeasured: %s; no latency or quality is recorded for it", self.cfg.name,
                            self._unmeasured)
                self._device = wanted
            else:
                log.warning("target %s: device %s is not present (have %s); latency is measured on the CPU as "
                            "a proxy and estimated from the target's spec", self.cfg.name, wanted, available)
                self._device = "CPU"
        return self._device

    @property
    def is_proxy(self) -> bool:
        return self.device != self.cfg.device

    @property
    def unmeasured(self) -> str | None:
        """Why nothing can run here (the device is absent and the runtime has no CPU proxy), else None."""
        _ = self.device
        return self._unmeasured

    def check(self) -> None:
        """Fail early (before any work) when the target cannot be used."""
        _ = self.device

    def estimate_ms(self, macs: float | None, weight_bytes: float | None, precision: str) -> float | None:
        """Roofline: max(compute time at peak MAC/s, time to move the weights at the memory bandwidth)."""
        spec = self.cfg.spec
        peak = (spec.peak_macs_per_s or {}).get(precision) or (spec.peak_macs_per_s or {}).get("fp32")
        times = []
        if peak and macs:
            times.append(macs / peak)
        if spec.memory_bandwidth_bytes_per_s and weight_bytes:
            times.append(weight_bytes / spec.memory_bandwidth_bytes_per_s)
        return max(times) * 1000.0 if times else None

    def describe(self) -> dict[str, Any]:
        return {"target": self.cfg.name, "runtime": self.cfg.runtime, "device": self.cfg.device,
                "measured_on": None if self.unmeasured else self.device, "precision_hint": self.cfg.precision,
                "threads": self.cfg.threads, **({"unmeasured": self.unmeasured} if self.unmeasured else {})}


def make_target(cfg: Any) -> Target:
    return Target(cfg)
