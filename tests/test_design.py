"""The design's load-bearing lines, as tests."""

import re
import subprocess
import sys

from tests.conftest import ROOT

PACKAGE = ROOT / "edgebuild"


def sources():
    return {p: p.read_text() for p in PACKAGE.rglob("*.py")}


def test_import_edgebuild_loads_no_heavy_library():
    code = "import sys, edgebuild, edgebuild.config, edgebuild.stage, edgebuild.pipeline; " \
           "heavy = ('torch','openvino','nncf','mlflow','onnxruntime','pytorch_lightning'); " \
           "print(' '.join(m for m in heavy if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_only_tracking_imports_mlflow():
    """tracking/__init__.py only. The logged model's loader module (tracking/edgebuild_pyfunc.py) is plain
    Python that MLflow imports at load time, and no edgebuild module imports it."""
    importers = {p.relative_to(PACKAGE).as_posix() for p, text in sources().items()
                 if re.search(r"^\s*(import mlflow|from mlflow)", text, re.M)}
    assert importers == {"tracking/__init__.py"}
    for p, text in sources().items():
        assert not re.search(r"(import|from) [.a-z_]*edgebuild_pyfunc", text), p
    assert "def _load_pyfunc(" in (PACKAGE / "tracking" / "edgebuild_pyfunc.py").read_text()


def test_stages_never_import_tracking():
    for p in (PACKAGE / "stages").glob("*.py"):
        assert not re.search(r"(from|import) [.a-z_]*tracking", p.read_text()), p


def test_one_helper_calls_instantiate():
    pattern = r"hydra\.utils import .*instantiate|hydra\.utils\.instantiate"
    callers = {p.name for p, text in sources().items() if re.search(pattern, text)}
    assert callers == {"config.py"}


def test_every_torch_load_states_weights_only():
    for p, text in sources().items():
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=" in call, (p, call)


# Adding a runtime touches its module, conf/target/*.yaml, its tests and the docs: nothing here knows one.
RUNTIME_AGNOSTIC = [*(PACKAGE / "stages").glob("*.py"), PACKAGE / "pipeline.py", PACKAGE / "evaluate.py",
                    PACKAGE / "profile.py", PACKAGE / "package.py"]
RUNTIMES = r"openvino|onnxruntime|ort|executorch|litert|tflite|tensorrt|trt|ov|onnx"
FORMAT_FILE = r".*\.(xml|bin|onnx|pte|tflite|engine|plan)"
RUNTIME_IMPORTS = r"^\s*(import|from) (openvino|onnxruntime|nncf|onnx|executorch|ai_edge_litert|tensorrt)\b"
# prune's gain check exports both models to ONNX to count MACs independently of torch: an analysis of the
# torch model, not a deployment format, so it may use ONNX (never a runtime)
ONNX_ANALYSIS = {"prune.py"}


def code_mentions(text: str, allow_onnx: bool) -> list[str]:
    """Runtime/format names the code itself uses: identifiers (openvino.Core, is_quantized_openvino) and
    string literals that ARE a name or a model file ("onnx", "model.xml"). Prose (comments, docstrings,
    user-facing notes that mention runtimes as examples) is not code."""
    import io
    import tokenize

    names = RUNTIMES.replace("|onnx", "") if allow_onnx else RUNTIMES
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.NAME and any(re.fullmatch(names, part, re.I) for part in tok.string.split("_")):
            found.append(tok.string)
        elif tok.type == tokenize.STRING:
            value = tok.string.strip("\"'rbfu")
            if re.fullmatch(names, value, re.I) or (not allow_onnx and re.fullmatch(FORMAT_FILE, value)) \
                    or (allow_onnx and re.fullmatch(r".*\.(xml|pte|tflite|engine)", value)):
                found.append(tok.string)
    return found


def test_stages_and_pipeline_never_name_a_runtime_or_format():
    for p in RUNTIME_AGNOSTIC:
        text = p.read_text()
        found = code_mentions(text, allow_onnx=p.name in ONNX_ANALYSIS)
        assert not found, f"{p.name} names {found}: ask the target's runtime (edgebuild/targets/base.py)"
        imports = [m.group(0) for m in re.finditer(RUNTIME_IMPORTS, text, re.M)
                   if not (p.name in ONNX_ANALYSIS and m.group(2) == "onnx")]
        assert not imports, f"{p.name} imports {imports}: runtime libraries belong in edgebuild/targets/"
        # gating on a runtime's identity instead of its capabilities: comparing with a literal
        assert not re.search(r"\.(runtime|format)\s*(==|!=|in\s*[(\[{])\s*[\"']", text), p.name


def test_the_design_rule_catches_what_it_should():
    assert code_mentions('if ctx.target.format == "onnx": pass\n', False) == ['"onnx"']
    assert re.search(r"\.(runtime|format)\s*(==|!=|in\s*[(\[{])\s*[\"']", 'cfg.target.runtime != "x"')
    assert code_mentions("import x\nx = openvino.Core()\n", False) == ["openvino"]
    assert code_mentions('f = "model.xml"\n', False) == ['"model.xml"']
    assert code_mentions('"""Docs may say OpenVINO."""\n# and ONNX Runtime\nnote = "OpenVINO is fast"\n', False) == []


def test_every_runtime_declares_the_interface():
    from edgebuild.artifact import KINDS, USER_FORMATS
    from edgebuild.targets import RUNTIMES, base, load_runtimes

    runtimes = load_runtimes()
    assert set(runtimes) == set(RUNTIMES)
    for name, cls in runtimes.items():
        assert issubclass(cls, base.Runtime) and cls.name == name, name
        assert cls.format in KINDS and USER_FORMATS[cls.format] == cls.format
        assert cls.files and all(f.endswith(cls.suffixes) for f in cls.files), name
        known = {v for k, v in vars(base).items() if k.isupper() and isinstance(v, str)}
        assert cls.capabilities <= known, (name, cls.capabilities - known)
        for cap, method in [(base.QUANTIZE, "quantize"), (base.QAT, "qat_export"), (base.EXPORT, "export"),
                            (base.WEIGHTS_FP16, "compress_weights"), (base.PROFILE, "profile")]:
            if cls.supports(cap):  # a declared capability is implemented, not the base's NotImplementedError
                assert getattr(cls, method) is not getattr(base.Runtime, method), (name, cap)
        assert cls.packages and isinstance(cls.export_by_default, bool) and isinstance(cls.cpu_proxy, bool), name


def test_the_export_stage_reads_declared_attributes_not_probes():
    source = (ROOT / "edgebuild" / "stages" / "export.py").read_text()
    assert "getattr(" not in source and "hasattr(" not in source
