"""Where a stream's frames come from: a generated moving-shapes video with exact boxes (the default,
`--source shapes`), a folder of image files, a video file (PyAV / FFmpeg) or a V4L2 camera (`/dev/videoN`).

A source yields `Frame`s in order: uint8 RGB pixels [H, W, 3] and, for the generated video, the ground
truth ({"boxes" float32 [k, 4] x1 y1 x2 y2 in frame pixels, "labels" int64 [k]}). `read()` is what the
capture thread times as decode. Every problem opening a source is an `EdgebuildError` (exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.errors import EdgebuildError

SHAPES_SOURCE = "shapes"
VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".gif")


@dataclass
class Frame:
    index: int
    pixels: np.ndarray  # uint8 [H, W, 3] RGB
    truth: dict[str, np.ndarray] | None = None


class ShapesVideo:
    """Seeded moving shapes on a noisy colour gradient, drawn like data=shapes (edgebuild.detection.data), so a
    detector trained on that data sees its own kind of image. Each object has a lane (a horizontal band of its
    own) and bounces at constant velocity inside it: objects never overlap, so every box is exact. Frame i is a
    pure function of (seed, i): positions follow a closed-form bounce and the pixel noise is seeded by i, so a
    frame can be drawn again later (the offline reference for frame reuse) bit for bit.

    Still periods and slow motion (`still`, `slow`: fractions in [0, 1], default 0 = every object moves every frame,
    as before): a fixed surveillance or inspection camera sees stretches where nothing moves. The video is then cut
    into seeded segments of SEGMENT_FRAMES frames; each segment is still with probability `still`, slow motion
    (SLOW_SPEED x the objects' speed) with probability `slow`, else normal motion. Positions follow the scene's
    clock (the sum of the segments' speeds up to the frame), so a still segment holds every object exactly where it
    was. The pixel noise stays new in every frame, as a sensor's does: a still frame differs from the one before
    only by noise. The segment draw is seeded by (seed, 31): `still`/`slow` are the expected fractions of frames,
    `speed(i)` the draw."""

    name = SHAPES_SOURCE
    SEGMENT_FRAMES = (15, 45)  # segment lengths, uniform (0.5-1.5 s at 30 FPS)
    SLOW_SPEED = 0.25

    def __init__(self, width: int, height: int, num_classes: int = 3, seed: int = 0, frames: int | None = None,
                 still: float = 0.0, slow: float = 0.0):
        from edgebuild.detection.data import SHAPES

        if not (0.0 <= still <= 1.0 and 0.0 <= slow <= 1.0 and still + slow <= 1.0):
            raise EdgebuildError(f"generated video: still {still:g} and slow {slow:g} must be fractions of the time "
                                 "in [0, 1] with still + slow <= 1", "give e.g. --still 0.5 --slow 0.2")
        self.width, self.height, self.seed, self.frames = width, height, seed, frames
        self.still, self.slow = float(still), float(slow)
        self._segment: tuple[int, int, float, float] | None = None  # (first frame, frames, speed, scene time then)
        self.num_classes = max(1, min(num_classes, len(SHAPES)))
        self.kinds = SHAPES
        rng = np.random.default_rng([seed, 17])
        self.c0, self.c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
        self.xx, self.yy = xx, yy
        angle = rng.uniform(0, 2 * np.pi)
        ramp = ((xx * np.cos(angle) + yy * np.sin(angle)) / max(width, height) + 1) / 2
        self.background = self.c0[:, None, None] + (self.c1 - self.c0)[:, None, None] * ramp
        lanes = int(rng.integers(1, 4))
        lane_h = height / lanes
        size = min(width, height)
        self.objects = []
        for lane in range(lanes):
            r = rng.uniform(0.08, 0.2) * size
            r = min(r, lane_h / 2 - 1.5)  # the shape fits its lane
            if r < 2:
                continue
            colour = rng.uniform(0, 255, 3)
            while min(np.abs(colour - self.c0).sum(), np.abs(colour - self.c1).sum()) < 150:  # visible on both ends
                colour = rng.uniform(0, 255, 3)
            speed = rng.uniform(0.01, 0.03) * size  # pixels per frame: a moving camera scene, not a jump cut
            heading = rng.uniform(0, 2 * np.pi)
            self.objects.append({
                "kind": self.kinds[int(rng.integers(self.num_classes))], "label": None, "r": r, "colour": colour,
                "x": (r + 1, width - r - 1), "y": (lane * lane_h + r + 1, (lane + 1) * lane_h - r - 1),
                "p0": (rng.uniform(0, 1), rng.uniform(0, 1)),
                "v": (speed * np.cos(heading), speed * 0.5 * np.sin(heading)),
            })
        for o in self.objects:
            o["label"] = self.kinds.index(o["kind"])
        self._next = 0

    def describe(self) -> str:
        motion = f", still {self.still:.0%} / slow {self.slow:.0%} of the time (seeded)" if self.still or self.slow \
            else ""
        return (f"generated moving shapes {self.width}x{self.height}, {len(self.objects)} objects, seed "
                f"{self.seed}{motion}")

    def _segment_of(self, i: int) -> tuple[int, int, float, float]:
        """The segment holding frame i. Segments are drawn in order from the seed, whatever order frames are asked
        in; only the current one is kept (memory does not grow with the stream): asking for an earlier frame draws
        again from the start (a few microseconds per segment)."""
        seg = self._segment
        if seg is None or i < seg[0]:
            self._segments = np.random.default_rng([self.seed, 31])
            seg = (0, 0, 0.0, 0.0)
        while i >= seg[0] + seg[1]:
            n = int(self._segments.integers(self.SEGMENT_FRAMES[0], self.SEGMENT_FRAMES[1] + 1))
            u = float(self._segments.uniform())
            v = 0.0 if u < self.still else self.SLOW_SPEED if u < self.still + self.slow else 1.0
            # speeds are multiples of 1/4: the scene clock is an exact float sum, however it is added up
            seg = (seg[0] + seg[1], n, v, seg[3] + seg[1] * seg[2])
        self._segment = seg
        return seg

    def speed(self, i: int) -> float:
        """How far the scene moves from frame i to i + 1, in frames of normal motion: 0 still, SLOW_SPEED, or 1."""
        if not (self.still or self.slow):
            return 1.0
        return self._segment_of(i)[2]

    def scene_time(self, i: int) -> float:
        """Frame i's position on the scene's clock (= i without still or slow periods)."""
        if not (self.still or self.slow):
            return i
        start, _, v, t = self._segment_of(i)
        return t + (i - start) * v

    @staticmethod
    def _bounce(lo: float, hi: float, start: float, offset: float) -> float:
        """Position after moving `offset` pixels from `start` (a fraction of the range) between walls lo..hi."""
        span = hi - lo
        if span <= 0:
            return lo
        t = (start * span + offset) % (2 * span)
        return lo + (t if t <= span else 2 * span - t)

    def frame(self, i: int) -> Frame:
        from edgebuild.detection.data import shape_mask

        rng = np.random.default_rng([self.seed, 29, i])
        img = self.background + rng.normal(0, 12, self.background.shape)
        boxes, labels = [], []
        t = self.scene_time(i)
        for o in self.objects:
            cx = self._bounce(*o["x"], o["p0"][0], o["v"][0] * t)
            cy = self._bounce(*o["y"], o["p0"][1], o["v"][1] * t)
            mask = shape_mask(o["kind"], self.xx, self.yy, cx, cy, o["r"])
            if not mask.any():
                continue
            img[:, mask] = o["colour"][:, None] + rng.normal(0, 8, (3, int(mask.sum())))
            ys, xs = np.nonzero(mask)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            labels.append(o["label"])
        pixels = img.clip(0, 255).round().astype(np.uint8).transpose(1, 2, 0)
        return Frame(i, np.ascontiguousarray(pixels), {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
                                                       "labels": np.asarray(labels, np.int64)})

    def read(self) -> Frame | None:
        if self.frames is not None and self._next >= self.frames:
            return None
        self._next += 1
        return self.frame(self._next - 1)

    def close(self) -> None:
        pass


class MemorySource:
    """Frames already decoded, in memory (e.g. `ShapesVideo(...).frame(i)` drawn beforehand): capture costs a list
    lookup, so the stream measures the model's side alone and a fast producer is guaranteed."""

    def __init__(self, frames: list[Frame], name: str = "frames in memory"):
        self.frames, self.name, self._next = frames, name, 0

    def describe(self) -> str:
        return f"{len(self.frames)} {self.name}"

    def frame(self, i: int) -> Frame:
        return self.frames[i]

    def read(self) -> Frame | None:
        if self._next >= len(self.frames):
            return None
        self._next += 1
        return self.frames[self._next - 1]

    def close(self) -> None:
        pass


class LabelledFrames(MemorySource):
    """A classifier's stream: n frames cycling through uint8 [N, C, H, W] images (grey repeated to RGB), each with
    its label as ground truth ({"label": int}): the stream's top-1 accuracy and, for a cascade, its escalations are
    measured on the data the model was built for, not on shapes it never saw. Frames are made as they are read
    (a view of the images): a long stream holds no more than the images themselves."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, n: int, name: str = "held-out images"):
        self.images, self.labels, self.n, self.name, self._next = images, labels, n, name, 0

    def describe(self) -> str:
        return f"{self.n} {self.name}"

    def frame(self, i: int) -> Frame:
        chw = self.images[i % len(self.images)]
        hwc = np.repeat(chw, 3, axis=0) if chw.shape[0] == 1 else chw[:3]
        return Frame(i, np.ascontiguousarray(hwc.transpose(1, 2, 0)),
                     {"label": np.asarray(int(self.labels[i % len(self.labels)]), np.int64)})

    def read(self) -> Frame | None:
        if self._next >= self.n:
            return None
        self._next += 1
        return self.frame(self._next - 1)


def labelled_frames(images: np.ndarray, labels: np.ndarray, n: int, name: str = "held-out images") -> LabelledFrames:
    return LabelledFrames(images, labels, n, name)


class FolderSource:
    """Image files of a folder, in name order (decoded with PIL as edgebuild's data loaders do)."""

    def __init__(self, root: Path):
        from edgebuild.data import IMAGE_SUFFIXES

        self.root = root
        self.files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise EdgebuildError(f"stream source {root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder",
                                 "give a folder of frames (e.g. frame_0001.png ...), a video file, or --source shapes")
        self._next = 0

    def describe(self) -> str:
        return f"{len(self.files)} image files of {self.root}"

    def read(self) -> Frame | None:
        from edgebuild.data import _decode

        if self._next >= len(self.files):
            return None
        path = self.files[self._next]
        self._next += 1
        return Frame(self._next - 1, _decode(path.read_bytes(), str(path)))

    def close(self) -> None:
        pass


class VideoSource:
    """A video file or a V4L2 camera, decoded by PyAV (FFmpeg): frames converted to RGB as they arrive."""

    def __init__(self, path: str, camera: bool = False):
        import av

        self.path, self.camera = path, camera
        fix = ("give a readable video file (any format FFmpeg decodes: mp4, mkv, avi, ...), a folder of frames, "
               "or --source shapes")
        try:
            self.container = av.open(path, format="v4l2" if camera else None)
            self.stream = self.container.streams.video[0]
        except IndexError:
            raise EdgebuildError(f"stream source {path}: no video stream in the file", fix) from None
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise EdgebuildError(f"stream source {path} cannot be opened as video: {e}", fix) from None
        self.stream.thread_type = "AUTO"
        self.native_fps = float(self.stream.average_rate) if self.stream.average_rate else None
        self._frames = self.container.decode(self.stream)
        self._next = 0
        try:  # decode the first frame now: a corrupt file fails before the stream starts, with exit 2
            self._first: Any = next(self._frames)
        except StopIteration:
            raise EdgebuildError(f"stream source {path}: the video has no frames", fix) from None
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise EdgebuildError(f"stream source {path}: cannot decode its first frame: {e}", fix) from None

    def describe(self) -> str:
        what = "camera" if self.camera else "video"
        return f"{what} {self.path} ({self.stream.codec_context.name}, {self.stream.width}x{self.stream.height})"

    def read(self) -> Frame | None:
        import av

        if self._first is not None:
            frame, self._first = self._first, None
        else:
            try:
                frame = next(self._frames)
            except StopIteration:
                return None
            except av.error.FFmpegError:  # a damaged tail ends the stream like the end of the file
                return None
        self._next += 1
        return Frame(self._next - 1, frame.to_ndarray(format="rgb24"))

    def close(self) -> None:
        self.container.close()


def open_source(source: str, width: int, height: int, frames: int | None, seed: int = 0,
                num_classes: int = 3, still: float = 0.0, slow: float = 0.0) -> Any:
    """`shapes` (generated at width x height; `still`/`slow` its still and slow-motion fractions), a /dev/video*
    camera, a folder of frames, or a video file."""
    if source == SHAPES_SOURCE:
        return ShapesVideo(width, height, num_classes=num_classes, seed=seed, frames=frames, still=still, slow=slow)
    if still or slow:
        raise EdgebuildError(f"--still / --slow shape the generated video; the source {source} is recorded",
                             "drop --still and --slow, or use --source shapes")
    if source.startswith("/dev/video"):
        if not Path(source).exists():
            raise EdgebuildError(f"stream source {source}: no such camera device",
                                 "plug in a camera (ls /dev/video*), or use a video file or --source shapes")
        return VideoSource(source, camera=True)
    path = Path(source).expanduser()
    if not path.exists():
        raise EdgebuildError(f"stream source {source} does not exist",
                             "give an existing video file, a folder of frames, or --source shapes (generated)")
    if path.is_dir():
        return FolderSource(path)
    return VideoSource(str(path))
