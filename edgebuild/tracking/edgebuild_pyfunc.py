"""The MLflow pyfunc of an edgebuild deployable: the model's loader module, plain Python.

MLflow copies this file into the logged model (`code/`) and the deployable folder beside it (`data/`), and
`mlflow.pyfunc.load_model` imports this module and calls `_load_pyfunc(data path)`: nothing is pickled, and
the file imports neither mlflow nor edgebuild, so it also runs on its own (`Deployable(deploy_dir)`).
It reads the deployable folder (`model.json` + the IR or ONNX files) and runs it with its runtime (OpenVINO
or ONNX Runtime) as the build measured it, with the precision hint `model.json` records. It needs no torch
either (torch only for a cascade whose big model takes another input size: the resize).

`predict(x)`: x is float32 NCHW, preprocessed as `model.json` says (`x = (pixels / scale - mean) / std`;
the model's signature states the dtype and shape, any batch size). Returns the model's output
(classification: logits [N, classes]), or {output name: array} for a model with several outputs
(detection: raw heads, see model.json postprocess).
A cascade deployable (model.json `deploy_cascade`) answers as the cascade stage measured it: rows whose
small-model softmax confidence is below the threshold get the big model's logits instead, the big model fed
the same pixels at its own input size and with its own preprocessing. Resizing the small model's input is
not resizing the original image: with two input sizes the pyfunc's big-model input is an approximation of
what the stage measured; with one size it is exact.
Only edgebuild/tracking logs it; no edgebuild module imports this file (its name is the loader module's).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

HINTS = {"f32": "f32", "fp32": "f32", "bf16": "bf16", "f16": "f16", "fp16": "f16"}


class Deployable:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.spec = json.loads((self.root / "model.json").read_text())
        self.small = Runner(self.root / self.spec["files"][0], self.spec)
        self.output_names = self.small.output_names
        self.cascade = self.spec.get("deploy_cascade")
        if self.cascade:
            big_spec = {**self.spec, "input_shape": self.cascade["big_input_shape"]}
            self.big = Runner(self.root / self.cascade["big_model"], big_spec)

    # np.ndarray: a hint MLflow infers no schema from (the logged tensor signature validates the input)
    def predict(self, model_input: np.ndarray, params: dict[str, Any] | None = None) -> Any:
        if isinstance(model_input, dict):  # the signature names the input: MLflow passes {"input": x}
            (model_input,) = model_input.values()
        x = np.ascontiguousarray(model_input, dtype=np.float32)
        outputs = self.small.run(x)
        if self.cascade:
            return self._cascade(x, outputs[0])
        if len(outputs) == 1:
            return outputs[0]
        return dict(zip(self.output_names, outputs, strict=True))

    def _cascade(self, x: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """edgebuild.stages.cascade's rule (kept in step with cascade_curve): float64 softmax, escalate below
        the threshold."""
        z = logits.astype(np.float64)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        escalate = (z / z.sum(axis=1, keepdims=True)).max(axis=1) < float(self.cascade["threshold"])
        out = np.array(logits, copy=True)
        if escalate.any():
            out[escalate] = self.big.run(self._big_input(x[escalate]))[0]
        return out

    def _big_input(self, x: np.ndarray) -> np.ndarray:
        """The small model's input as the big model takes it: back to pixels, resized as edgebuild's data
        resizes images (bilinear, antialiased, rounded to uint8), preprocessed as the big model's
        model.json said (cascades built before `big_preprocess` was recorded used the small one's)."""
        small, big = _preprocess(self.spec.get("preprocess")), _preprocess(self.cascade.get("big_preprocess")
                                                                           or self.spec.get("preprocess"))
        size = list(self.cascade["big_input_shape"][2:])
        if list(x.shape[2:]) == size and all(np.array_equal(a, b) for a, b in zip(small, big, strict=True)):
            return x
        pixels = (x * small[2] + small[1]) * small[0]
        if list(x.shape[2:]) != size:
            import torch
            import torch.nn.functional as F

            pixels = F.interpolate(torch.from_numpy(np.ascontiguousarray(pixels)), size=tuple(size), mode="bilinear",
                                   antialias=True, align_corners=False).numpy()
        pixels = np.clip(np.round(pixels), 0, 255)  # the data's images are uint8
        return np.ascontiguousarray((pixels / big[0] - big[1]) / big[2], dtype=np.float32)


def _preprocess(pre: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale, mean, std) as arrays broadcasting over NCHW: x = (pixels / scale - mean) / std."""
    pre = pre or {}
    return tuple(np.asarray(v, dtype=np.float32).reshape(1, -1, 1, 1) for v in (
        [pre.get("scale") or 255.0], pre.get("mean") or [0.0], pre.get("std") or [1.0]))


class Runner:
    """One model file run with its runtime as the build measured it (OpenVINO: model.json's precision hint,
    the device it was measured on when present; compiled once per batch size)."""

    def __init__(self, main: Path, spec: dict[str, Any]):
        self.main, self.spec, self.format = main, spec, spec["format"]
        self._compiled: dict[int, Any] = {}
        if self.format == "onnx":
            import onnxruntime as ort

            self.session = ort.InferenceSession(str(main), providers=["CPUExecutionProvider"])
            self.output_names = [o.name for o in self.session.get_outputs()]
        elif self.format == "openvino":
            import openvino as ov

            self.core = ov.Core()
            self.output_names = [o.get_any_name() for o in self.core.read_model(str(main)).outputs]
        else:
            raise ValueError(f"unsupported deployable format {self.format!r}")

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        if self.format == "onnx":
            return self.session.run(None, {self.session.get_inputs()[0].name: x})
        compiled = self._openvino(int(x.shape[0]))
        result = compiled(x)
        return [np.asarray(result[o]) for o in compiled.outputs]

    def _openvino(self, batch: int) -> Any:
        if batch not in self._compiled:
            model = self.core.read_model(str(self.main))
            if len(model.inputs) == 1:
                model.reshape([batch, *self.spec["input_shape"][1:]])
            target = self.spec.get("target") or {}
            config = {}
            hint = HINTS.get(str(target.get("precision_hint")))
            if hint:
                config["INFERENCE_PRECISION_HINT"] = hint
            device = target.get("measured_on") if target.get("measured_on") in self.core.available_devices else "CPU"
            self._compiled[batch] = self.core.compile_model(model, device, config)
        return self._compiled[batch]


def _load_pyfunc(data_path: str) -> Deployable:
    """MLflow's loader-module entry point: the deployable folder MLflow copied into the model."""
    return Deployable(Path(data_path))
