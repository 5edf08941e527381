"""aerosynth detection stage: train, augment, predict, evaluate, report, sliced GeoTIFF detection.

Modules (import what you need; none imports ultralytics at package import):

- :mod:`detection.datasets`: :class:`DatasetSpec`, mixing several datasets into a YOLO view.
- :mod:`detection.augment`: albumentations transforms for overhead imagery, :class:`Augmenter`.
- :mod:`detection.training`: :func:`train_detector` (Ultralytics YOLO, offline).
- :mod:`detection.prediction`: :func:`predict`, :func:`predict_split`.
- :mod:`detection.evaluation`: COCO AP50, AP50:95, F1-optimal P/R, PR curves (pycocotools).
- :mod:`detection.report`: markdown/JSON/PNG report with gap closure.
- :mod:`detection.slicing`: :func:`detect_raster` over a GeoTIFF to GeoJSON.
- :mod:`detection.toydata`: toy scenes with planted vehicles (smoke runs and tests).
"""
