"""`--annotate out.mp4`: every processed frame with its detections drawn (box, class name, score), encoded by PyAV
(H.264, yuv420p) in a writer thread of its own, so encoding does not sit in the inference thread. It still uses
CPU beside the stream: time a stream without it when the numbers matter."""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.errors import EdgebuildError

COLOURS = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255), (0, 220, 220)]


def draw(pixels: np.ndarray, result: dict[str, Any], class_names: list[str] | None) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.fromarray(pixels)
    d = ImageDraw.Draw(img)
    if "boxes" in result:
        for box, score, label in zip(result["boxes"], result["scores"], result["labels"], strict=True):
            colour = COLOURS[int(label) % len(COLOURS)]
            name = class_names[int(label)] if class_names and int(label) < len(class_names) else str(int(label))
            d.rectangle([float(v) for v in box], outline=colour, width=1)
            d.text((float(box[0]) + 1, float(box[1]) + 1), f"{name} {float(score):.2f}", fill=colour)
    else:  # classification: the top class in the corner
        name = class_names[result["label"]] if class_names else str(result["label"])
        d.text((2, 2), f"{name} {result['score']:.2f}", fill=(255, 255, 0))
    return np.asarray(img)


class Annotator:
    def __init__(self, path: Path, fps: float, class_names: list[str] | None, min_score: float = 0.3):
        self.path, self.fps, self.class_names, self.min_score = Path(path), fps, class_names, min_score
        if not self.path.parent.is_dir():
            raise EdgebuildError(f"--annotate {path}: folder {self.path.parent} does not exist",
                                 "create the folder or give another path for the annotated video")
        self.frames = 0
        # written beside the final name and renamed by close(): never a half-written video at `path`
        self.partial = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix or '.mp4'}")
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=8)  # bounded: a slow encoder slows the stream
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._write, name="stream-annotate", daemon=True)
        self.thread.start()

    def put(self, pixels: np.ndarray, result: dict[str, Any]) -> None:
        if "scores" in result:  # draw what a viewer would act on, not every low-score candidate
            keep = np.asarray(result["scores"]) >= self.min_score
            result = {k: np.asarray(v)[keep] for k, v in result.items()}
        self.queue.put((pixels, result))

    def _write(self) -> None:
        from fractions import Fraction

        import av

        try:
            item: Any = ()
            with av.open(str(self.partial), "w") as out:
                stream = None
                while (item := self.queue.get()) is not None:
                    img = draw(item[0], item[1], self.class_names)
                    if stream is None:
                        h, w = img.shape[:2]
                        stream = out.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1000))
                        stream.width, stream.height = w + w % 2, h + h % 2  # yuv420p needs even sizes
                        stream.pix_fmt = "yuv420p"
                    if img.shape[0] != stream.height or img.shape[1] != stream.width:
                        img = np.pad(img, ((0, stream.height - img.shape[0]), (0, stream.width - img.shape[1]), (0, 0)))
                    for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                        out.mux(packet)
                    self.frames += 1
                if stream is not None:
                    for packet in stream.encode():
                        out.mux(packet)
        except BaseException as e:  # noqa: BLE001 - reported by close()
            self.error = e
            while item is not None:  # drain, so the producer's puts and close() never wait on a dead writer
                item = self.queue.get()
            self.partial.unlink(missing_ok=True)

    def close(self) -> int:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise EdgebuildError(f"--annotate {self.path}: cannot write the video ({self.error})",
                                 "give a writable .mp4 path") from None
        if self.partial.exists():
            os.replace(self.partial, self.path)
        return self.frames
