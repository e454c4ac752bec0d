"""Compile an MCU build's firmware files against the real TensorFlow Lite Micro headers (issue 18).

    python benchmarks/mcu_firmware_check.py --tflm DIR --flatbuffers DIR --gemmlowp DIR [--deploy DIR]

DIR for --tflm: a tflite-micro source tree (github.com/tensorflow/tflite-micro: tensorflow/lite/..., signal/...,
tensorflow/compiler/mlir/lite/...); --flatbuffers: flatbuffers' `include` folder (the version TFLM pins,
tensorflow/lite/micro/tools/make/flatbuffers_download.sh); --gemmlowp: gemmlowp's root (fixedpoint/). Without
--deploy, recipe tiny_mcu is built first (1 epoch, synthetic data, tracking off) in a temporary folder.

A main.cc does what README's snippet does (include model_data.h and model_ops.h, a 16-byte aligned arena of
kTensorArenaSize, an OpResolver filled by RegisterOps, a MicroInterpreter over g_model_data) and is compiled with
`g++ -std=c++17 -fsyntax-only`, then model_data.cc with `-c` (an object whose .rodata holds the model). A syntax
check: the TFLM library is not built or linked here (that needs its Makefile and an Arm toolchain). Prints a table.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

MAIN = """// edgebuild firmware check: the README's snippet, compiled against TensorFlow Lite Micro's headers.
#include <cstdint>

#include "model_data.h"
#include "model_ops.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/schema/schema_generated.h"

alignas(16) static uint8_t arena[edgebuild_model::kTensorArenaSize];

int main() {
  edgebuild_model::OpResolver resolver;
  if (edgebuild_model::RegisterOps(resolver) != kTfLiteOk) return 1;
  tflite::MicroInterpreter interpreter(tflite::GetModel(g_model_data), resolver, arena, sizeof(arena));
  if (interpreter.AllocateTensors() != kTfLiteOk) return 2;
  TfLiteTensor* input = interpreter.input(0);
  const float x = 0.5f;  // quantize one value with the model's own input scale and zero point
  input->data.int8[0] = static_cast<int8_t>(x / edgebuild_model::kInputScale + edgebuild_model::kInputZeroPoint);
  if (interpreter.Invoke() != kTfLiteOk) return 3;
  const TfLiteTensor* output = interpreter.output(0);
  const float y = (output->data.int8[0] - edgebuild_model::kOutputZeroPoint) * edgebuild_model::kOutputScale;
  return y > 1e9f ? 4 : 0;
}
"""


def deploy_of_a_build(tmp: Path) -> Path:
    from edgebuild import testing

    overrides = testing.shrink(tmp) + ["data=synthetic", "stages.train.epochs=1", "budget.min_acc=null"]
    return Path(testing.build(overrides, tmp, recipe="tiny_mcu")["deploy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tflm", type=Path, required=True)
    parser.add_argument("--flatbuffers", type=Path, required=True)
    parser.add_argument("--gemmlowp", type=Path, required=True)
    parser.add_argument("--deploy", type=Path, default=None)
    args = parser.parse_args()
    compiler = shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise SystemExit("no C++ compiler (g++ or c++) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    with tempfile.TemporaryDirectory() as tmp:
        deploy = args.deploy or deploy_of_a_build(Path(tmp))
        (Path(tmp) / "main.cc").write_text(MAIN)
        includes = [f"-I{deploy}", f"-I{args.tflm}", f"-I{args.flatbuffers}", f"-I{args.gemmlowp}"]
        steps = [("main.cc: model_ops.h + model_data.h + MicroInterpreter", [compiler, "-std=c++17", "-fsyntax-only",
                  "-Wall", *includes, str(Path(tmp) / "main.cc")]),
                 ("model_data.cc -> object", [compiler, "-std=c++17", "-c", "-Wall", *includes,
                  str(deploy / "model_data.cc"), "-o", str(Path(tmp) / "model_data.o")])]
        rows = []
        for name, cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            first = (proc.stderr.strip().splitlines() or [""])[0][:160]
            rows.append((name, "ok" if proc.returncode == 0 else f"FAILED: {first}"))
            if proc.returncode:
                print(proc.stderr[-4000:])
        ops = (deploy / "model_ops.h").read_text().count("resolver.Add")
    where = deploy if args.deploy else "a tiny_mcu build"
    print(f"compiler: {version}; TFLM headers: {args.tflm}; deploy: {where}")
    print(f"model_ops.h registers {ops} ops\n")
    print("| step | result |\n|---|---|")
    for name, result in rows:
        print(f"| {name} | {result} |")
    if any(r != "ok" for _, r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
