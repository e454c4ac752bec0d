"""Artifact: the immutable output of a stage (a torch model or a runtime's deployable format)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TORCH_FILE = "model.pt"
# Artifact kinds: torch, plus each runtime's format, registered when its Runtime class is defined
# (targets/base.py). Kind -> file suffixes.
KINDS: dict[str, tuple[str, ...]] = {"torch": (".pt",)}
# What a user folder may hold: runtime formats only, by their model.json "format" (or an alias) and
# file suffixes. A torch pickle runs code when loaded, so "torch" is never read from a user path.
USER_FORMATS: dict[str, str] = {}  # model.json format name -> kind


def register_kind(kind: str, suffixes: tuple[str, ...], aliases: tuple[str, ...] = ()) -> None:
    KINDS[kind] = tuple(suffixes)
    USER_FORMATS.update({name: kind for name in (kind, *aliases)})


def _load_kinds() -> None:
    """Import every registered runtime module (light: heavy imports live in their methods), so their
    formats are known kinds, e.g. when a cached artifact is read before any target was built."""
    from edgebuild.targets import load_runtimes

    load_runtimes()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(root: Path, files: list[str]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + file_digest(root / name).encode() + b"\n")
    return h.hexdigest()


@dataclass
class Artifact:
    """Files of one model in one folder.

    `meta` carries what a deployable needs to be used without edgebuild and what measurement needs:
    input_shape [1,C,H,W], layout, mean, std, class_names, task, precision, macs, params.
    """

    kind: str
    root: Path
    files: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    digest: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            _load_kinds()
        if self.kind not in KINDS:
            raise ValueError(f"artifact kind {self.kind!r} is not one of {tuple(KINDS)}")
        self.root = Path(self.root)
        if not self.digest:
            self.digest = tree_digest(self.root, self.files)

    @property
    def main_file(self) -> Path:
        return self.root / self.files[0]

    @property
    def size_bytes(self) -> int:
        return sum((self.root / f).stat().st_size for f in self.files)

    def verify(self) -> bool:
        """True when every file is present and unchanged since the artifact was written."""
        try:
            return tree_digest(self.root, self.files) == self.digest
        except OSError:
            return False

    def to_json(self, relative_to: Path | None = None) -> dict[str, Any]:
        d = asdict(self)
        d["root"] = str(self.root.relative_to(relative_to) if relative_to else self.root)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], relative_to: Path | None = None) -> Artifact:
        root = Path(d["root"])
        if relative_to is not None and not root.is_absolute():
            root = relative_to / root
        return cls(kind=d["kind"], root=root, files=list(d["files"]), meta=dict(d["meta"]), digest=d["digest"])

    # torch artifacts hold whole pickled modules: structured pruning and QAT change the class
    # layout, so a state_dict for the original class cannot restore them. Only edgebuild's own cache
    # is unpickled this way; user-supplied files go through models.load_weights (weights_only=True).
    @classmethod
    def save_torch(cls, model: Any, root: Path, meta: dict[str, Any]) -> Artifact:
        import torch

        root.mkdir(parents=True, exist_ok=True)
        torch.save(model, root / TORCH_FILE)
        return cls(kind="torch", root=root, files=[TORCH_FILE], meta=dict(meta))

    def load_torch(self) -> Any:
        import torch

        if self.kind != "torch":
            from edgebuild.errors import EdgebuildError

            raise EdgebuildError(f"this stage needs a torch model, but its input is already {self.kind}",
                                 "set the stage's `input:` to a stage that outputs a torch model (train, prune, ...)")
        model = torch.load(self.main_file, weights_only=False)  # trusted: edgebuild's own cache
        model.eval()
        return model


def read_deploy_folder(path: str | Path, what: str = "deploy folder") -> Artifact:
    """A user's edgebuild deploy/ folder (model files + model.json) as an artifact, checked before use:
    a runtime format, files inside the folder with that format's suffixes, and a 4-d input shape."""
    from edgebuild.errors import EdgebuildError

    root = Path(path).expanduser()
    _load_kinds()
    kinds = " or ".join(sorted(set(USER_FORMATS.values())))
    fix = f"give the deploy/ folder of an edgebuild build (model.json with format {kinds}, files, input_shape)"

    def bad(problem: str) -> EdgebuildError:
        return EdgebuildError(f"{what} {root}: {problem}", fix)

    try:
        spec = json.loads((root / "model.json").read_text())
    except FileNotFoundError:
        raise bad("has no model.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"model.json cannot be read ({e})") from None
    if not isinstance(spec, dict):
        raise bad("model.json is not a JSON object")
    missing = [k for k in ("format", "files", "input_shape") if k not in spec]
    if missing:
        raise bad(f"model.json has no {', '.join(missing)}")
    fmt = spec["format"]
    if fmt not in USER_FORMATS:
        raise bad(f"format {fmt!r} is not a runtime format ({', '.join(sorted(set(USER_FORMATS.values())))});"
                  " edgebuild never loads torch pickles or other code-bearing files from user folders")
    files = spec["files"]
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise bad("model.json files is not a non-empty list of file names")
    for name in files:
        file = (root / name).resolve()
        if not file.is_relative_to(root.resolve()):
            raise bad(f"file {name!r} lies outside the folder")
        suffixes = KINDS[USER_FORMATS[fmt]]
        if not name.endswith(suffixes):
            raise bad(f"file {name!r} is not a {fmt} file ({', '.join(suffixes)})")
        if not file.is_file():
            raise bad(f"file {name!r} does not exist")
    shape = spec["input_shape"]
    if not (isinstance(shape, list) and len(shape) == 4 and all(type(d) is int and d > 0 for d in shape)):
        raise bad(f"input_shape {shape!r} is not [N, C, H, W] of positive integers")
    pre = spec.get("preprocess") or {}
    meta = {"input_shape": shape, "layout": spec.get("layout", "NCHW"), "mean": pre.get("mean"),
            "std": pre.get("std"), "scale": pre.get("scale", 255.0), "class_names": spec.get("class_names"),
            "task": spec.get("task"), "outputs": spec.get("outputs"), "postprocess": spec.get("postprocess")}
    return Artifact(USER_FORMATS[fmt], root, list(files), meta=meta, digest=tree_digest(root, list(files)))


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
