"""The runtime interface: everything format-specific lives behind it.

A runtime is one module in edgebuild/targets/ with a `Runtime` subclass, one line in
`targets.RUNTIMES`, a conf/target/*.yaml, its tests and docs. Stages and the pipeline never name a
runtime or a format: they ask the target for capabilities (`Runtime.capabilities`, `targets.supports`)
and call the methods below. Measurement (timing loops, interleaving, scoring) belongs to
`edgebuild.evaluate`; a runtime only compiles and runs one inference.

Rules for implementers
- Import the runtime's heavy libraries inside methods, never at module level (`import edgebuild` and
  plan time stay light; `targets.runtime_class` imports the module at plan time).
- Never mutate an input artifact; write only into the folder you are given.
- Raise `EdgebuildError(what, fix)` for anything a user can fix (missing package: name it; an operator
  the runtime cannot convert: name it and the runtime; a precision it does not have).
- Optional methods raise `NotImplementedError` by default; declare the matching capability when you
  implement one, and the stages that need it are refused at plan time on runtimes that lack it.

Lifecycle as the pipeline drives it::

    runtime = Target(cfg.target).runtime               # Runtime subclass, constructed with cfg.target
    d = runtime.deployable(artifact, folder, outputs)  # any artifact (torch or a runtime format) -> this format
    s = runtime.load(d, target.device, batch)          # compile() timed: s.load_ms = read + compile
    outs = s.infer(x)                                  # list of np arrays, one per model output
    run = s.bind(x); run()                             # what evaluate's timing loop calls (no per-call copies)
    s.runtime_info()                                   # what really ran: RUNTIME_INFO keys
    s.float_layers()                                   # compute layers that did not run INT8
    q = s.async_requests(2); p = q.start(x); p.wait()  # ASYNC only: overlapped requests (the stream)
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgebuild.errors import EdgebuildError

# ---------------------------------------------------------------------------- capabilities
# What a stage may ask a runtime for. A stage checks `targets.supports(cfg.target, CAP)` at plan time.
QUANTIZE = "quantize"  # post-training INT8 from calibration data: Runtime.quantize
QUANTIZE_ACCURACY_CONTROL = "quantize.max_drop"  # QuantizeRequest.max_drop (float layers back until within)
QUANTIZE_BIAS_CORRECTION = "quantize.bias_correction"  # QuantizeRequest.bias_correction
QUANTIZE_MODEL_TYPE = "quantize.model_type"  # QuantizeRequest.model_type ("transformer")
QUANTIZE_SMOOTH_QUANT = "quantize.smooth_quant_alpha"  # QuantizeRequest.smooth_quant_alpha (SmoothQuant)
# Runtime.layers + Runtime.layer_outputs: per-layer float vs INT8 error, layers named as ignored_names takes them
QUANTIZE_SENSITIVITY = "quantize.sensitivity"
QAT = "qat"  # Runtime.qat_prepare + Runtime.qat_export (fine-tuning happens in the stage, in torch)
WEIGHTS_FP16 = "weights.fp16"  # Runtime.compress_weights(weights="fp16")
WEIGHTS_INT8 = "weights.int8"  # Runtime.compress_weights(weights="int8"), data-free weight-only INT8
EXPORT = "export"  # Runtime.export: write this format from a torch model (the export stage)
PROFILE = "profile"  # Runtime.profile: per-layer times
ASYNC = "async"  # Session.async_requests: N inferences in flight at once (the stream's `requests: N`)

# Keys `Session.runtime_info()` may return (any subset beyond the first; the pipeline records them all).
RUNTIME_INFO = {
    "runtime/precision": "precision most compute layers ran in, one vocabulary for every runtime (PRECISION_LABELS)",
    "runtime/precision_raw": "the same in the runtime's own words (OpenVINO: f32, bf16, u8, i8...), where they differ",
    "int8/ops_fraction": "fraction of compute layers that ran INT8 (0..1)",
    "runtime/delegated_fraction": "fraction of compute delegated to an accelerator backend (e.g. XNNPACK)",
    "runtime/compute_ops": "number of compute layers (conv, matmul...) in what ran",
    "runtime/inference_precision_hint": "the precision the runtime was asked for, as it reports it",
}


# What `runtime/precision` says, whatever the runtime calls it: budgets, reports and the shootout compare
# labels across runtimes, so OpenVINO's "u8" and another runtime's "int8" must read the same.
PRECISION_LABELS = {"f32": "fp32", "fp32": "fp32", "float32": "fp32", "f16": "fp16", "fp16": "fp16",
                    "float16": "fp16", "half": "fp16", "float": "fp32", "bf16": "bf16", "bfloat16": "bf16",
                    "u8": "int8", "i8": "int8",
                    "int8": "int8", "uint8": "int8", "qint8": "int8", "quint8": "int8", "u4": "int4", "i4": "int4",
                    "int4": "int4"}


def precision_label(raw: Any) -> str:
    """A runtime's precision name in edgebuild's vocabulary (fp32, fp16, bf16, int8, int4); unknown names as is."""
    return PRECISION_LABELS.get(str(raw).lower(), str(raw))


# ---------------------------------------------------------------------------- quantization
@dataclass
class QuantizeRequest:
    """What the quantize stage asks for; the runtime maps it to its own tool (NNCF, ORT, PT2E...).

    Options the runtime does not declare a capability for are None (refused at plan time)."""

    calibration: np.ndarray  # float32 [N, C, H, W], preprocessed like model input
    output_names: list[str]  # the task's output names (for a torch -> format conversion)
    meta: dict[str, Any]  # meta for the quantized artifact (the stage fills precision, deploy_quantization)
    symmetric: bool = True  # activations: symmetric (preset "performance") or asymmetric ("mixed")
    per_channel: bool = True  # one weight scale per output channel
    ignored_names: list[str] = field(default_factory=list)  # layers kept float (must exist: select_layers)
    ignored_patterns: list[str] = field(default_factory=list)  # regexes over layer names, kept float
    preset: str = "performance"  # the stage's preset name, for tools that take it as is
    bias_correction: str | None = None  # fast | full | none (QUANTIZE_BIAS_CORRECTION)
    model_type: str | None = None  # "transformer" (QUANTIZE_MODEL_TYPE)
    smooth_quant_alpha: float | None = None  # SmoothQuant's migration strength in [0, 1] (QUANTIZE_SMOOTH_QUANT)
    max_drop: float | None = None  # absolute drop of the primary metric (QUANTIZE_ACCURACY_CONTROL)
    # how activation ranges are estimated from the calibration set: one of Runtime.calibration_methods;
    # None = the tool's default
    calibration_method: str | None = None
    validation: list[tuple[np.ndarray, Any]] | None = None  # (x [1,C,H,W], target) pairs, with max_drop
    # score(pairs of (raw outputs, target)) -> primary metric; with max_drop
    score: Callable[[Iterable[tuple[list[np.ndarray], Any]]], float] | None = None


@dataclass
class Quantized:
    """Runtime.quantize's result: the INT8 artifact in the workdir, the float model in the same format
    (for the interleaved INT8-vs-float timing; it lives in the scratch folder), and child-run steps."""

    artifact: Any  # Artifact
    float_model: Any  # Artifact
    steps: list[dict[str, Any]] = field(default_factory=list)
    # what the tool was really asked for: {"target_device": CPU | GPU | NPU, "calibration_method": ...}
    scheme: dict[str, Any] = field(default_factory=dict)


def select_layers(names: list[str], ignored_names: list[str], ignored_patterns: list[str]) -> list[str]:
    """ignored_names (each must exist) plus every layer matching an ignored pattern; for runtimes to
    turn a QuantizeRequest into their tool's ignored scope."""
    missing = [n for n in ignored_names if n not in names]
    if missing:
        raise EdgebuildError(f"quantize: ignored_names {missing} are not layers of this model",
                             f"use names from the model graph, e.g. {names[len(names) // 2]!r}, or a regex in "
                             "ignored_patterns")
    matched = [n for n in names if any(re.search(p, n) for p in ignored_patterns)]
    if ignored_patterns and not matched:
        raise EdgebuildError(f"quantize: ignored_patterns {ignored_patterns} match no layer of this model",
                             f"layer names look like {names[len(names) // 2]!r}")
    return list(dict.fromkeys([*ignored_names, *matched]))


def already_quantized(source: Any) -> EdgebuildError:
    """The error a runtime raises when asked to quantize or compress a model that is already low-bit."""
    return EdgebuildError(f"quantize: its input ({source.kind}, {source.root.name}) is already quantized",
                          "quantize a floating-point model: set the stage's input to a train/prune/export stage")


# ---------------------------------------------------------------------------- session
class Session:
    """One compiled deployable at a fixed batch on one device."""

    load_ms: float = float("nan")  # read + compile, set by Runtime.load

    def infer(self, x: np.ndarray) -> list[np.ndarray]:
        """Raw outputs (copies the caller may keep), one array per model output."""
        raise NotImplementedError

    def bind(self, x: np.ndarray) -> Callable[[], Any]:
        """A zero-argument call running one inference on `x`, with the input bound once and no output
        copies: the unit evaluate's timing loop measures. Override when infer() has per-call overhead."""
        return lambda: self.infer(x)

    def runtime_info(self) -> dict[str, Any]:
        """What really ran (keys from RUNTIME_INFO), read from the compiled model, not from the request."""
        return {}

    def float_layers(self) -> list[str]:
        """Names of the compute layers that do not run INT8 (for quantize's fp_layers.json)."""
        return []

    def report_files(self, folder: Path) -> dict[str, Path]:
        """Tables of what the runtime compiled (e.g. a per-operator CSV), written into `folder`: the stage's
        report files and MLflow artifacts, {name: path}. Default: none."""
        return {}

    def async_requests(self, n: int) -> AsyncRequests:
        """ASYNC: `n` infer requests that run overlapped (e.g. OpenVINO's AsyncInferQueue)."""
        raise NotImplementedError


class Pending:
    """One inference started by `AsyncRequests.start`; `wait()` returns its outputs (copies, like infer)."""

    def wait(self) -> list[np.ndarray]:
        raise NotImplementedError


class AsyncRequests:
    """`n` requests of one session. `start(x)` returns at once while a request is free, otherwise blocks until
    one is; the results are read in any order with `Pending.wait()`. `close()` waits for every started one."""

    n: int = 1

    def start(self, x: np.ndarray) -> Pending:
        raise NotImplementedError

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------- runtime
class Runtime:
    """A runtime: one deployable format, how to produce it, compile it and read what ran.

    Class attributes (declared by every runtime):
    - `name`: the registry name (`target.runtime=`).
    - `format`: the artifact kind it deploys (also model.json "format"); registered as an
      `artifact.KINDS` kind with `suffixes` when the class is defined.
    - `files`: the deployable's file names, main file first (e.g. ("model.xml", "model.bin")).
    - `suffixes`: every file suffix the format may use (trust boundary for user deploy folders).
    - `aliases`: other model.json "format" names accepted for this format (older deploy folders).
    - `capabilities`: the optional methods it implements (constants above).
    - `precisions`: inference precisions `target.precision` may ask for ("auto" always allowed).
    - `packages`: the pip distributions it runs on (their versions enter the cache key of a stage that
      compares runtimes, and name what to install).
    - `export_by_default`: whether the export stage writes this format when its `formats` is empty
      (False for heavy converters: written only when the runtime is the target's or named).
    - `cpu_proxy`: whether an absent target device may be stood in for by the CPU (latency/proxy_device).
      False where CPU numbers would mean nothing for the device (TensorRT): the target is then
      `unmeasured` (no latency or quality recorded) unless `require_device=true` makes it an error.
    """

    name: ClassVar[str] = ""
    format: ClassVar[str] = ""
    files: ClassVar[tuple[str, ...]] = ()
    suffixes: ClassVar[tuple[str, ...]] = ()
    aliases: ClassVar[tuple[str, ...]] = ()
    capabilities: ClassVar[frozenset[str]] = frozenset()
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    packages: ClassVar[tuple[str, ...]] = ()
    export_by_default: ClassVar[bool] = True
    cpu_proxy: ClassVar[bool] = True
    # QuantizeRequest.calibration_method values this runtime's quantizer has (edgebuild's names: minmax,
    # mean_minmax, percentile, entropy), the default first; () = only the tool's default (method null)
    calibration_methods: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.format:  # the format becomes an artifact kind as soon as the runtime exists
            from edgebuild.artifact import register_kind

            register_kind(cls.format, cls.suffixes, cls.aliases)

    def __init__(self, cfg: Any):
        self.cfg = cfg  # the target's config node (runtime, device, precision, threads, options, spec)

    @classmethod
    def supports(cls, capability: str) -> bool:
        return capability in cls.capabilities

    @classmethod
    def versions(cls) -> dict[str, str | None]:
        """{distribution: installed version, None when missing} of `packages` (package metadata only: light)."""
        from importlib import metadata

        out: dict[str, str | None] = {}
        for dist in cls.packages:
            try:
                out[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                out[dist] = None
        return out

    # ------------------------------------------------------------------------ required
    def available_devices(self) -> list[str]:
        """Devices this machine offers the runtime ("CPU", "GPU", "NPU"...); Target picks one or the CPU proxy."""
        raise NotImplementedError

    def absent_device(self, device: str) -> str:
        """Why `device` is not available to this runtime here, in a few words (e.g. "no NVIDIA GPU")."""
        return f"no {device} device"

    def deployable(self, artifact: Any, folder: Path, output_names: list[str]) -> Any:
        """`artifact` (torch or any registered format) as this runtime's deployable Artifact.
        Already in this format: return it with only this format's files (no copy). Otherwise convert into
        `folder` (created by the runtime). Unconvertible: EdgebuildError naming the operator/kind."""
        raise NotImplementedError

    def compile(self, artifact: Any, device: str, batch: int) -> Session:
        """Read and compile the deployable at a static `batch` on `device` with the target's precision
        hint, threads and options. Use `load` to get the time it took."""
        raise NotImplementedError

    def load(self, artifact: Any, device: str, batch: int) -> Session:
        """compile(), timed: the session's `load_ms` is read + compile (`latency/load_ms`)."""
        t0 = time.perf_counter()
        session = self.compile(artifact, device, batch)
        session.load_ms = (time.perf_counter() - t0) * 1000.0
        return session

    def quantization_device(self) -> str:
        """The device whose INT8 scheme quantize and qat use (CPU, GPU or NPU): what `quantize/target_device`
        records. Default: the CPU (the runtime's quantizer has one scheme, its CPU kernels')."""
        return "CPU"

    # ------------------------------------------------------------------------ optional
    def export(self, source: Any, folder: Path, output_names: list[str], dynamic_batch: bool, opset: int) -> list[str]:
        """EXPORT: write this format of the torch artifact `source` into `folder`; return the files written
        (main first). `dynamic_batch` / `opset` apply where the format has them."""
        raise NotImplementedError

    def quantize(self, source: Any, request: QuantizeRequest, workdir: Path, scratch: Path) -> Quantized:
        """QUANTIZE: INT8 post-training quantization of `source` (torch or a runtime format). The INT8
        artifact goes into `workdir`, the float model (same format) into `scratch`. An input that is
        already quantized: raise already_quantized(source). Ignored layers: select_layers()."""
        raise NotImplementedError

    def compress_weights(self, source: Any, weights: str, folder: Path, output_names: list[str],
                         meta: dict[str, Any]) -> Any:
        """WEIGHTS_FP16 / WEIGHTS_INT8: data-free low-precision weights ("fp16" | "int8"), activations stay
        float; the artifact in `folder` with `meta`."""
        raise NotImplementedError

    def qat_prepare(self, model: Any, calibration: np.ndarray, symmetric: bool) -> Any:
        """QAT: a torch module with fake-quantizers initialised from `calibration`, trainable in torch."""
        raise NotImplementedError

    def qat_export(self, model: Any, input_shape: list[int], folder: Path, meta: dict[str, Any]) -> Any:
        """QAT: the fine-tuned fake-quantized torch module as an INT8 deployable Artifact in `folder`."""
        raise NotImplementedError

    def layers(self, artifact: Any) -> list[dict[str, str]]:
        """QUANTIZE_SENSITIVITY: the quantizable (compute) layers of a float deployable, in graph order:
        {"name": as ignored_names accepts it, "type": the runtime's op type}."""
        raise NotImplementedError

    def layer_outputs(self, artifact: Any, names: list[str], inputs: Iterable[np.ndarray]
                      ) -> Iterable[dict[str, np.ndarray]]:
        """QUANTIZE_SENSITIVITY: per input x [1,C,H,W], the outputs of layers `names` (from layers() of the
        float model), computed in float32 on the CPU, in the float or the INT8 deployable alike."""
        raise NotImplementedError

    def profile(self, artifact: Any, device: str, iterations: int) -> list[dict[str, Any]]:
        """PROFILE: per executed layer at batch 1: {name, type, kernel, precision, ms (mean per inference)},
        slowest first."""
        raise NotImplementedError

    # ------------------------------------------------------------------------ hooks with defaults
    @classmethod
    def check_plan(cls, target_cfg: Any, final_precision: str, final_stage: str) -> None:
        """Plan time, after the stages are planned: refuse a recipe this runtime cannot deploy (e.g. an
        int8-only target whose last stage leaves the model float). Default: anything goes."""

    def package(self, deployable: Any, out: Path, metrics: dict[str, Any]) -> dict[str, Any]:
        """Extra files for deploy/ beside the deployable's (e.g. firmware sources), written into `out`;
        returns model.json's "firmware"-style entry ({} when there is nothing to add)."""
        return {}
