"""Stream this deployable over a video or a folder of frames WITHOUT edgebuild: the runtime's own package,
numpy and PyAV (`pip install openvino numpy av`, or onnxruntime). edgebuild copies this file into every deploy/
folder as `stream.py` (detection deployables get `postprocess.py`, the decode + NMS, beside it).

    python deploy/stream.py deploy/ --source video.mp4 [--fps 30] [--depth 2] [--out detections.jsonl]

Two threads, as `python -m edgebuild.stream` runs them: a capture/decode thread (PyAV) and an inference thread,
over a bounded queue of `--depth` frames. With `--fps` the capture is paced like a camera and a full queue drops
its oldest frame (counted); without it every frame is processed in order (the queue blocks the decoder).
Frames are decoded at their own size and converted as `python -m edgebuild.stream` converts them, so both give the
same detections: grey by ITU-R 601 weights in PIL's fixed-point arithmetic, resized to the model's input by PIL's
bilinear filter (antialiased) when Pillow is installed; without Pillow by FFmpeg's swscale (bilinear), which can
differ from PIL by a few grey levels at edges (said on stderr). Then model.json's
`x = (pixels / scale - mean) / std`; detection boxes are scaled back to the frame's pixels. `--out` writes one JSON
line per processed frame: index, boxes, scores, labels (detection) or label, score (classification). Prints
processed FPS, dropped frames and end-to-end p50/p90 (capture -> result). Exit 0; 2 for bad input (one line on
stderr); 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm")


class BadInput(Exception):
    pass


class Quantiles:
    """Percentiles of a stream of positive values (latencies in ms) in bounded memory. The first `exact` values are
    kept and answered exactly (numpy's linear percentile). Beyond them, a fixed log-bucket histogram (DDSketch's
    mapping): bucket i holds (lo g^(i-1), lo g^i] with g = (1 + a) / (1 - a) and answers 2 lo g^i / (g + 1), which is
    within a relative `a` of every value in the bucket; so each percentile (numpy's linear rule on the ranks) is
    within a relative `a` (0.5 %) of the exact one, whatever the distribution, for values in [lo, hi] (below lo:
    within lo absolutely; above hi: the last bucket, clamped to the largest value). A histogram, not a reservoir
    sample: its bound is deterministic and holds in the tail (p99), where a sample of k values is noisy. Count,
    mean, min and max stay exact. edgebuild's stream uses this class too (edgebuild/stream/stats.py): one
    implementation, shipped here because this file runs alone."""

    def __init__(self, exact: int = 10_000, rel_error: float = 0.005, lo: float = 1e-3, hi: float = 1e7):
        self.exact_limit, self.rel_error, self.lo = exact, rel_error, lo
        self.gamma = (1 + rel_error) / (1 - rel_error)
        self._log_g = math.log(self.gamma)
        self.size = int(math.ceil(math.log(hi / lo) / self._log_g)) + 1  # 2,305 buckets (18 KB) at the defaults
        self.values: np.ndarray | None = np.empty(exact)  # None once the histogram took over
        self.counts: np.ndarray | None = None
        self.n, self.total, self.min, self.max = 0, 0.0, math.inf, -math.inf

    @property
    def exact(self) -> bool:
        return self.values is not None

    def _bucket(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            i = np.ceil(np.log(np.maximum(x, 0) / self.lo) / self._log_g)
        return np.clip(i, 0, self.size - 1).astype(np.int64)

    def add(self, x: float) -> None:
        x = float(x)
        if self.values is not None and self.n == self.exact_limit:  # the exact region ends: histogram from here
            self.counts = np.bincount(self._bucket(self.values), minlength=self.size)
            self.values = None
        if self.values is not None:
            self.values[self.n] = x
        else:
            i = math.ceil(math.log(x / self.lo) / self._log_g) if x > self.lo else 0
            self.counts[min(i, self.size - 1)] += 1
        self.n += 1
        self.total += x
        self.min, self.max = min(self.min, x), max(self.max, x)

    def percentile(self, p: float) -> float:
        if self.n == 0:
            return float("nan")
        if self.values is not None:
            return float(np.percentile(self.values[:self.n], p))
        h = (self.n - 1) * p / 100.0
        ranks = np.asarray([math.floor(h), math.ceil(h)])
        i = np.searchsorted(np.cumsum(self.counts), ranks, side="right")  # the buckets holding those order statistics
        v = np.clip(2 * self.lo * self.gamma ** i.astype(np.float64) / (self.gamma + 1), self.min, self.max)
        v[ranks == 0], v[ranks == self.n - 1] = self.min, self.max  # the extremes are known exactly
        return float(v[0] + (h - ranks[0]) * (v[1] - v[0]))

    def mean(self) -> float:
        if self.values is not None and self.n:
            return float(self.values[:self.n].mean())
        return self.total / self.n if self.n else float("nan")


def load_session(root: Path, spec: dict):
    """A callable x -> list of output arrays, on the runtime model.json names."""
    fmt, files = spec["format"], spec["files"]
    target = spec.get("target") or {}
    if fmt == "openvino":
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY"}
        hint = {"fp32": "f32", "fp16": "f16"}.get(target.get("precision_hint"), target.get("precision_hint"))
        if hint in ("f32", "bf16", "f16"):
            config["INFERENCE_PRECISION_HINT"] = hint
        if target.get("threads"):
            config["INFERENCE_NUM_THREADS"] = int(target["threads"])
        core = ov.Core()
        model = core.read_model(str(root / files[0]))
        model.reshape([1, *spec["input_shape"][1:]])
        compiled = core.compile_model(model, "CPU", config)
        request = compiled.create_infer_request()
        n = len(compiled.outputs)

        def run(x):
            request.infer({0: x})
            return [request.get_output_tensor(i).data.copy() for i in range(n)]

        return run
    if fmt == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if target.get("threads"):
            opts.intra_op_num_threads = int(target["threads"])
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(root / files[0]), opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})
    raise BadInput(f"this runner knows the openvino and onnx formats; model.json says {fmt!r} "
                   "(stream it with `python -m edgebuild.stream` instead)")


def grey(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> uint8 [H, W, 1], exactly PIL's convert("L"): (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
    p = pixels.astype(np.uint32)
    return ((p[..., 0] * 19595 + p[..., 1] * 38470 + p[..., 2] * 7471 + 0x8000) >> 16).astype(np.uint8)[..., None]


def converter(channels: int, width: int, height: int, use_pil: bool | None = None):
    """pixels (uint8 RGB [h, w, 3]) -> uint8 [height, width, channels] as edgebuild.stream's preprocess converts them:
    PIL when installed (or `use_pil`), else numpy's grey + swscale's resize."""
    if use_pil is None:
        try:
            import PIL.Image  # noqa: F401

            use_pil = True
        except ImportError:
            use_pil = False
    if use_pil:
        from PIL import Image

        def convert(pixels):
            if pixels.shape[:2] == (height, width) and channels != 1:
                return pixels
            img = Image.fromarray(pixels)
            if channels == 1:
                img = img.convert("L")
            if pixels.shape[:2] != (height, width):
                img = img.resize((width, height), Image.BILINEAR)
            return np.asarray(img).reshape(height, width, -1)

        convert.by = "PIL"
        return convert
    import av

    def convert(pixels):
        if pixels.shape[:2] != (height, width):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            pixels = frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="BILINEAR")
        return grey(pixels) if channels == 1 else pixels

    convert.by = "swscale"
    return convert


def frames(source: Path):
    """(index, uint8 RGB [h, w, 3] at the source's own size) for a video file or a folder of images (PyAV)."""
    import av

    paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if source.is_dir() \
        else [source]
    if not paths:
        raise BadInput(f"{source}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    i = 0
    for path in paths:
        try:
            container = av.open(str(path))
        except (av.FFmpegError, OSError) as e:
            raise BadInput(f"{path} cannot be opened as video or image ({e})") from None
        with container:
            for frame in container.decode(video=0):
                yield i, frame.to_ndarray(format="rgb24")
                i += 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("deploy_dir")
    p.add_argument("--source", required=True, help="a video file or a folder of frames")
    p.add_argument("--fps", type=float, default=None, help="pace the capture at this rate, dropping the oldest "
                   "waiting frame when inference falls behind (default: process every frame)")
    p.add_argument("--depth", type=int, default=2, help="queue capacity in frames (default 2)")
    p.add_argument("--out", default=None, help="write the results as JSON lines")
    a = p.parse_args(argv)
    try:
        root = Path(a.deploy_dir)
        try:
            spec = json.loads((root / "model.json").read_text())
        except (OSError, ValueError) as e:
            raise BadInput(f"{root}/model.json cannot be read ({e})") from None
        source = Path(a.source)
        if not source.exists():
            raise BadInput(f"source {source} does not exist")
        if a.depth < 1 or (a.fps is not None and not a.fps > 0):
            raise BadInput("--depth must be >= 1 and --fps > 0")
        return stream(root, spec, source, a)
    except BadInput as e:
        print(f"stream.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstream.py: interrupted", file=sys.stderr)
        return 130


def stream(root: Path, spec: dict, source: Path, a: argparse.Namespace) -> int:
    _, channels, height, width = spec["input_shape"]
    pre = spec.get("preprocess") or {}
    scale = float(pre.get("scale") or 255.0)
    mean = np.asarray(pre.get("mean") or [0.0], np.float32).reshape(-1, 1, 1)
    std = np.asarray(pre.get("std") or [1.0], np.float32).reshape(-1, 1, 1)
    mul, add = (1.0 / (scale * std)).astype(np.float32), (-mean / std).astype(np.float32)
    detection = spec.get("task") == "detection"
    if detection:
        sys.path.insert(0, str(root))
        from postprocess import options, postprocess  # the deploy folder's own decode + NMS

        pp_options = options(spec)
    infer = load_session(root, spec)
    q: queue.Queue = queue.Queue(maxsize=a.depth)
    # memory stays bounded however long the stream runs: counts, a fixed-size latency histogram, results written
    # as they come (to a temporary file renamed at the end: never half a file under --out)
    stop, errors, dropped, processed = threading.Event(), [], [0], [0]
    e2e = Quantiles()
    tmp = Path(f"{a.out}.{os.getpid()}.tmp") if a.out else None
    out = tmp.open("w") if tmp else None
    convert = converter(channels, width, height)
    if convert.by != "PIL":
        print("stream.py: Pillow is not installed: frames of another size are resized by swscale, which can differ "
              "from edgebuild's PIL resize by a few grey levels", file=sys.stderr)
    gen = frames(source)
    first = next(gen, None)  # a bad source fails here, in the main thread, before the threads start
    if first is None:
        raise BadInput(f"{source}: no frames")

    def capture():
        period, next_t = (1.0 / a.fps if a.fps else 0.0), time.perf_counter()
        try:
            for item in _chain(first, gen):
                if stop.is_set():
                    break
                if period:
                    wait = next_t - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                    next_t = max(next_t + period, time.perf_counter() - period)
                t = time.perf_counter()
                if period:  # a camera: drop the oldest waiting frame rather than wait
                    while True:
                        try:
                            q.put_nowait((item, t))
                            break
                        except queue.Full:
                            try:
                                q.get_nowait()
                                dropped[0] += 1
                            except queue.Empty:
                                pass
                else:
                    while not stop.is_set():
                        try:
                            q.put((item, t), timeout=0.1)
                            break
                        except queue.Full:
                            pass
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            q.put(None)

    def inference():
        try:
            while (got := q.get()) is not None:
                (index, frame), t_capture = got
                pixels = convert(frame)
                x = (pixels.transpose(2, 0, 1).astype(np.float32) * mul + add)[None]
                outputs = infer(x)
                if detection:
                    det = postprocess(outputs[0][0], outputs[1][0], outputs[2][0], **pp_options)
                    fh, fw = frame.shape[:2]
                    if (fh, fw) != (height, width):  # boxes in the frame's pixels, as edgebuild.stream gives them
                        det["boxes"] = det["boxes"] * np.asarray([fw / width, fh / height] * 2, np.float32)
                    result = {k: np.asarray(det[k]).tolist() for k in ("boxes", "scores", "labels")}
                else:
                    z = np.asarray(outputs[0][0], np.float64)
                    pr = np.exp(z - z.max())
                    pr /= pr.sum()
                    result = {"label": int(pr.argmax()), "score": float(pr.max())}
                e2e.add((time.perf_counter() - t_capture) * 1000.0)
                processed[0] += 1
                if out:
                    out.write(json.dumps({"index": index, **result}) + "\n")
                if stop.is_set():
                    break
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            stop.set()
            while q.get() is not None:  # let the capture finish
                pass

    threads = [threading.Thread(target=capture, daemon=True), threading.Thread(target=inference, daemon=True)]
    t0 = time.perf_counter()
    try:
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.1)
        except KeyboardInterrupt:
            stop.set()
            for t in threads:
                t.join(5)
            raise
        if errors:
            raise errors[0]
        wall = time.perf_counter() - t0
        if out:
            out.close()
            os.replace(tmp, a.out)
    finally:
        if out:
            out.close()
            tmp.unlink(missing_ok=True)
    note = "" if e2e.exact else f", within {e2e.rel_error:.1%} (a log-bucket histogram beyond {e2e.exact_limit} frames)"
    print(f"{processed[0]} frames processed, {dropped[0]} dropped, {processed[0] / wall:.1f} FPS processed; "
          f"e2e p50 {e2e.percentile(50):.1f} ms, p90 {e2e.percentile(90):.1f} ms (capture -> result{note})")
    return 0


def _chain(first, rest):
    yield first
    yield from rest


if __name__ == "__main__":
    sys.exit(main())
