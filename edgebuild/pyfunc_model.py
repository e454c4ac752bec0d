"""The MLflow pyfunc of an edgebuild deployable, logged as a model from code.

MLflow copies this file into the logged model and runs it to load the model (`mlflow.pyfunc.load_model`):
nothing is pickled. It reads the deployable folder (`model.json` + the IR or ONNX files, the artifact
`deploy`) and runs it with its runtime (OpenVINO or ONNX Runtime) as the build measured it, with the
precision hint `model.json` records. It needs neither edgebuild nor torch.

`predict(x)`: x is float32 NCHW, preprocessed as `model.json` says (`x = (pixels / scale - mean) / std`;
the model's signature states the dtype and shape, any batch size). Returns the model's output
(classification: logits [N, classes]), or {output name: array} for a model with several outputs
(detection: raw heads, see model.json postprocess).
Only edgebuild/tracking.py logs it; no edgebuild module imports this file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
from mlflow.models import set_model

HINTS = {"f32": "f32", "fp32": "f32", "bf16": "bf16", "f16": "f16", "fp16": "f16"}


class Deployable(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        self.root = Path(context.artifacts["deploy"])
        self.spec = json.loads((self.root / "model.json").read_text())
        self.main = self.root / self.spec["files"][0]
        self._compiled: dict[int, Any] = {}
        if self.spec["format"] == "onnx":
            import onnxruntime as ort

            self.session = ort.InferenceSession(str(self.main), providers=["CPUExecutionProvider"])
            self.output_names = [o.name for o in self.session.get_outputs()]
        elif self.spec["format"] == "openvino":
            import openvino as ov

            self.core = ov.Core()
            self.output_names = [o.get_any_name() for o in self.core.read_model(str(self.main)).outputs]
        else:
            raise ValueError(f"unsupported deployable format {self.spec['format']!r}")

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

    # np.ndarray: a hint MLflow infers no schema from (the logged tensor signature validates the input)
    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> Any:
        if isinstance(model_input, dict):  # the signature names the input: MLflow passes {"input": x}
            (model_input,) = model_input.values()
        x = np.ascontiguousarray(model_input, dtype=np.float32)
        if self.spec["format"] == "onnx":
            outputs = self.session.run(None, {self.session.get_inputs()[0].name: x})
        else:
            compiled = self._openvino(int(x.shape[0]))
            result = compiled(x)
            outputs = [np.asarray(result[o]) for o in compiled.outputs]
        if len(outputs) == 1:
            return outputs[0]
        return dict(zip(self.output_names, outputs, strict=True))


set_model(Deployable())
