"""aerosynth detection stage: train, augment, predict, evaluate, report, sliced GeoTIFF detection.

Modules (import what you need; none imports ultralytics at package import):

- :mod:`aerosynth.detection.datasets`: :class:`DatasetSpec`, mixing several datasets into a YOLO view.
- :mod:`aerosynth.detection.augment`: albumentations transforms for overhead imagery, :class:`Augmenter`.
- :mod:`aerosynth.detection.training`: :func:`train_detector` (Ultralytics YOLO, offline).
- :mod:`aerosynth.detection.prediction`: :func:`predict`, :func:`predict_split`.
- :mod:`aerosynth.detection.evaluation`: COCO AP50, AP50:95, F1-optimal P/R, PR curves (pycocotools).
- :mod:`aerosynth.detection.report`: markdown/JSON/PNG report with gap closure.
- :mod:`aerosynth.detection.slicing`: :func:`detect_raster` over a GeoTIFF to GeoJSON.
- :mod:`aerosynth.detection.toydata`: toy scenes with planted vehicles (smoke runs and tests).
"""
