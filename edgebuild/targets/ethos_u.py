"""Arm Ethos-U microNPUs (`target=ethos_u55`, `target=ethos_u65`): the full-integer INT8 `.tflite` (the
tflm runtime's, i.e. litert's conversion and quantizer) compiled by Arm's Vela (`ethos-u-vela`) for the
configured accelerator (MAC count), system config and memory mode, read from Vela's summary and
per-layer CSVs:

- `ethos_u/cycles` (total), `ethos_u/npu_cycles`, `latency/estimate_ms` = cycles / the stated clock,
  `ethos_u/inferences_per_s` at that clock;
- `ethos_u/sram_bytes`, `ethos_u/flash_bytes` (off-chip flash: the command stream + encoded weights);
- `ethos_u/npu_ops_fraction`, `ethos_u/cpu_ops` (the operators that fall back to the CPU, named);
- the per-operator table as a report file (`ethos_u_per_operator.csv`: stage file and MLflow artifact).

Vela's output runs on the NPU, which is not here: accuracy (and everything TFLM measures: arena,
flash of a CPU build, peak RAM) comes from TensorFlow Lite Micro's interpreter on the same `.tflite`
(the int8 ops the NPU runs are specified to the same arithmetic; Vela's own rounding may differ slightly).
A float model (a float stage of the recipe) is measured by TFLM only; Vela compiles int8 models.
"""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgebuild.artifact import Artifact
from edgebuild.errors import EdgebuildError
from edgebuild.targets import torch_edge
from edgebuild.targets.tflm import Micro, TFLMRuntime, TFLMSession

VELA_PACKAGE = "ethos-u-vela==5.2.0"
ACCELERATORS = ("ethos-u55-32", "ethos-u55-64", "ethos-u55-128", "ethos-u55-256", "ethos-u65-256", "ethos-u65-512")
ETHOS_OPTIONS = ("accelerator_config", "system_config", "memory_mode", "vela_config", "clock_hz")
PER_OPERATOR = "ethos_u_per_operator.csv"
FALLBACK = re.compile(r"Warning \(supported operators\) operator: (\w+), ofm: '([^']*)'")
COUNT = re.compile(r"(CPU|NPU) operators = (\d+)")


def vela_module() -> Any:
    return torch_edge.require("ethosu.vela", VELA_PACKAGE, "ethos_u")


def default_config() -> Path:
    """Vela's own vela.ini (Arm's system configs and memory modes), shipped inside the package."""
    return Path(vela_module().__file__).resolve().parent.parent / "config_files" / "Arm" / "vela.ini"


def sections(ini: Path) -> tuple[set[str], set[str]]:
    """(system configs, memory modes) that a Vela .ini defines."""
    text = ini.read_text()
    return (set(re.findall(r"^\[System_Config\.([\w-]+)\]", text, re.M)),
            set(re.findall(r"^\[Memory_Mode\.([\w-]+)\]", text, re.M)))


def run_vela(tflite: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Vela on `tflite` into `out`; its summary, per-layer rows and console, parsed."""
    ini = Path(str(options.get("vela_config") or default_config()))
    cmd = [sys.executable, "-c", "import sys; from ethosu.vela.vela import main; sys.exit(main())", str(tflite),
           "--accelerator-config", str(options["accelerator_config"]), "--system-config",
           str(options["system_config"]), "--memory-mode", str(options["memory_mode"]), "--config", str(ini),
           "--output-dir", str(out), "--verbose-performance", "--show-cpu-operations"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    console = proc.stdout + proc.stderr
    summaries = sorted(out.glob(f"{tflite.stem}_summary_*.csv"))
    if proc.returncode != 0 or not summaries:
        tail = " | ".join(line for line in console.strip().splitlines()[-3:])
        raise EdgebuildError(f"Vela failed on {tflite.name} for {options['accelerator_config']}: {tail[:400]}",
                             "check target.options (accelerator_config, system_config, memory_mode) and that the "
                             "model is a full-integer INT8 .tflite")
    with open(summaries[0], newline="") as f:
        summary = next(csv.DictReader(f))
    layers_file = out / f"{tflite.stem}_per-layer.csv"
    layers = list(csv.DictReader(open(layers_file, newline=""))) if layers_file.exists() else []
    counts = {k: int(v) for k, v in COUNT.findall(console)}
    fallbacks = list(dict.fromkeys(f"{op} ({name})" for op, name in FALLBACK.findall(console)))
    return {"summary": summary, "layers": layers, "layers_file": layers_file if layers else None,
            "counts": counts, "cpu_ops": fallbacks, "console": console}


class EthosURuntime(TFLMRuntime):
    name = "ethos_u"
    packages = ("litert-torch", "ai-edge-litert", "tflite-micro", "ethos-u-vela")

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        opts = dict(cfg.options or {})
        self.vela = {k: opts.get(k) for k in ETHOS_OPTIONS}
        missing = [k for k in ("accelerator_config", "system_config", "memory_mode", "clock_hz") if not opts.get(k)]
        if missing:
            raise EdgebuildError(f"target {cfg.name!r}: options {missing} are not set",
                                 "see conf/target/ethos_u55.yaml: accelerator_config, system_config, memory_mode, "
                                 "clock_hz")
        if self.vela["accelerator_config"] not in ACCELERATORS:
            raise EdgebuildError(f"target {cfg.name!r}: unknown accelerator config "
                                 f"{self.vela['accelerator_config']!r}", f"use one of: {', '.join(ACCELERATORS)}")
        ini = Path(str(self.vela["vela_config"])) if self.vela["vela_config"] else None
        if ini is None:
            try:
                ini = default_config()
            except EdgebuildError:
                ini = None  # Vela missing: named by available_devices (Target.check), before any work
        elif not ini.exists():
            raise EdgebuildError(f"target {cfg.name!r}: vela_config {ini} does not exist",
                                 "point target.options.vela_config to a Vela .ini, or leave it null for Vela's own")
        if ini is not None:
            systems, modes = sections(ini)
            for key, have in (("system_config", systems), ("memory_mode", modes)):
                if self.vela[key] not in have:
                    raise EdgebuildError(f"target {cfg.name!r}: {key} {self.vela[key]!r} is not in {ini.name}",
                                         f"use one of: {', '.join(sorted(have))}")

    def available_devices(self) -> list[str]:
        super().available_devices()
        vela_module()
        return ["CPU"]

    def absent_device(self, device: str) -> str:
        return (f"no {device} here: Vela compiles for it and reports cycles; accuracy runs on TFLite Micro's "
                "kernels on the host CPU")

    def compile(self, artifact: Artifact, device: str, batch: int) -> EthosUSession:
        micro = Micro(artifact.main_file, int(self.options.get("arena_search_max_bytes", 8 << 20)))
        return EthosUSession(micro, artifact, self)


class EthosUSession(TFLMSession):
    runtime: EthosURuntime

    def __init__(self, micro: Micro, artifact: Artifact, runtime: EthosURuntime):
        super().__init__(micro, artifact, runtime)
        self._vela: dict[str, Any] | None = None
        self._dir: Path | None = None

    def vela(self) -> dict[str, Any] | None:
        """Vela's results for an INT8 model (None for a float one), compiled once per session."""
        if self._vela is None and self.micro.input["dtype"].__name__ in ("int8", "uint8"):
            self._dir = Path(tempfile.mkdtemp(prefix="vela-"))
            self._vela = run_vela(self.artifact.main_file, self._dir, self.runtime.vela)
        return self._vela

    def runtime_info(self) -> dict[str, Any]:
        info = super().runtime_info()
        v = self.vela()
        opts = self.runtime.vela
        if v is None:
            info["ethos_u/skipped"] = "float model: Vela compiles full-integer INT8 models (add a quantize stage)"
            return info
        s = v["summary"]
        cycles = float(s["cycles_total"])
        clock = float(opts["clock_hz"])
        npu, cpu = v["counts"].get("NPU", 0), v["counts"].get("CPU", 0)
        info.update({
            "ethos_u/accelerator": str(opts["accelerator_config"]), "ethos_u/system_config": str(opts["system_config"]),
            "ethos_u/memory_mode": str(opts["memory_mode"]), "ethos_u/clock_hz": clock,
            "ethos_u/vela_clock_hz": float(s["core_clock"]),
            "ethos_u/cycles": cycles, "ethos_u/npu_cycles": float(s["cycles_npu"]),
            "latency/estimate_ms": cycles / clock * 1000.0, "ethos_u/inferences_per_s": clock / cycles,
            "latency/device_metric": "latency/estimate_ms",
            "latency/device_source": f"Vela: {cycles:,.0f} cycles / {clock / 1e6:g} MHz "
                                     f"({opts['accelerator_config']}, Vela's performance estimate)",
            "ethos_u/sram_bytes": float(s["sram_memory_used"]) * 1024.0,  # Vela reports KiB
            "ethos_u/flash_bytes": float(s["off_chip_flash_memory_used"]) * 1024.0
            + float(s["on_chip_flash_memory_used"]) * 1024.0,
            "ethos_u/npu_ops": npu, "ethos_u/cpu_ops_count": cpu,
            "ethos_u/npu_ops_fraction": npu / (npu + cpu) if npu + cpu else 0.0,
            "ethos_u/cpu_ops": ", ".join(v["cpu_ops"]),
            "ethos_u/accuracy_by": "TFLite Micro on the host (Vela's output runs on the NPU, not present here)",
        })
        return info

    def report_files(self, folder: Path) -> dict[str, Path]:
        v = self.vela()
        if not v or not v["layers_file"]:
            return {}
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / PER_OPERATOR
        shutil.copy2(v["layers_file"], dest)
        return {"ethos_u_per_operator": dest}
