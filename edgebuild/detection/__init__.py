"""Object detection (SSD family) as a swappable task part: data sources with boxes, detectors whose
networks return raw outputs, and the decode + NMS that runs outside the network.

- `data`: the `shapes` generator and YOLO / COCO / Pascal VOC loaders, served by `DetectionDataModule`;
- `models`: `RawSSD` (backbone + head + anchors, raw outputs), the built-in small SSD and torchvision's
  `ssdlite320_mobilenet_v3_large` / `ssd300_vgg16` wrapped the same way;
- `postprocess`: numpy-only decode + NMS for the deployable (runs without edgebuild).

The task itself (loss, metric, model.json contents) is `edgebuild/tasks/detection.py`.
"""
