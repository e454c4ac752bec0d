"""resolution: change a model's input resolution (e.g. 32 -> 24) and fine-tune it at the new size.

The model is unchanged (convolutions and adaptive pooling take any size); what changes is the size
it is fed, trained, calibrated and measured at: the artifact's `meta["input_shape"]` says so, the
pipeline serves the data resized to it (`data.for_input`), and the deployable's model.json follows.
MACs scale with the pixel count. A model that cannot run at the new size (a flattened Linear head,
a feature map shrinking to nothing) fails before any training, naming the layer that rejected it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from edgebuild.artifact import Artifact
from edgebuild.config import bounded
from edgebuild.errors import EdgebuildError
from edgebuild.finetune import FitConfig, fit
from edgebuild.stage import Stage, StageResult


@dataclass
class Resolution(FitConfig, Stage):
    kind: ClassVar[str] = "resolution"
    needs_float_input: ClassVar[bool] = True
    version: ClassVar[int] = 1
    uses: ClassVar[tuple[str, ...]] = ("data", "task", "trainer")
    tasks: ClassVar[tuple[str, ...]] = ("classification",)  # resizing detection data would also move the boxes

    image_size: int = bounded(0, ge=0)  # the new square input size in pixels (required)
    epochs: int = bounded(3, ge=0)  # fine-tuning at the new size; 0 = none

    def check(self, cfg: Any) -> None:
        if self.image_size < 1:
            raise EdgebuildError(f"resolution image_size={self.image_size} is not a size",
                                 "set stages.<resolution>.image_size to the new input size in pixels, e.g. 24")

    def run(self, ctx: Any) -> StageResult:
        from edgebuild.data import for_input
        from edgebuild.evaluate import count_macs

        model = ctx.input.load_torch()
        old = list(ctx.input.meta["input_shape"])
        new = [1, old[1], self.image_size, self.image_size]
        check_runs_at(model, new, ctx.task)
        data = for_input(ctx.data, new)
        tuned, metrics = fit(model, _with_data(ctx, data), self, name="resolution")
        macs_old, macs_new = count_macs(model, old)[0], count_macs(tuned, new)[0]
        pixels = (new[2] * new[3]) / (old[2] * old[3])
        metrics.update({"resolution/from": old[2], "resolution/to": new[2], "resolution/pixel_ratio": pixels,
                        "resolution/macs_ratio": macs_new / macs_old})
        notes = [f"input {old[2]}x{old[3]} -> {new[2]}x{new[3]}: {pixels:.2f}x the pixels, {macs_new / macs_old:.2f}x "
                 f"the MACs ({macs_old:,} -> {macs_new:,})"]
        meta = {**ctx.input.meta, "input_shape": new, "image_size": self.image_size}
        return StageResult(Artifact.save_torch(tuned, ctx.workdir, meta), metrics, notes=notes)


def _with_data(ctx: Any, data: Any) -> Any:
    import dataclasses

    return dataclasses.replace(ctx, data=data)


def check_runs_at(model: Any, input_shape: list[int], task: Any) -> None:
    """Run the model at `input_shape`; if a layer rejects it, say which layer and with what input."""
    import torch

    entered: list[tuple[str, Any]] = []  # modules whose forward started and has not finished

    def pre(name: str) -> Any:
        def hook(mod: Any, args: Any) -> None:
            entered.append((name, args[0].shape if args and hasattr(args[0], "shape") else None))
        return hook

    def post(mod: Any, args: Any, out: Any) -> None:
        entered.pop()

    hooks = [h for n, m in model.named_modules() if n
             for h in (m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post))]
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(input_shape))
    except Exception as e:  # the layer at the top of the stack is the one that failed
        where = (f"layer {entered[-1][0]!r} ({type(model.get_submodule(entered[-1][0])).__name__}, input "
                 f"{list(entered[-1][1]) if entered[-1][1] is not None else '?'})") if entered else "the model"
        reason = str(e).splitlines()[0][:200]
        raise EdgebuildError(f"the model cannot take input {input_shape}: {where} fails: {reason}",
                             "pick a resolution the model's layers accept (e.g. a multiple of its total stride), or "
                             "a model with adaptive pooling before its classifier") from None
    finally:
        for h in hooks:
            h.remove()
    logits = task.logits(out)
    if logits.ndim != 2:
        raise EdgebuildError(f"at input {input_shape} the model outputs {list(logits.shape)}, not [N, classes]",
                             "pick a resolution the model's head accepts")
