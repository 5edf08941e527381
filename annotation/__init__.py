"""aerosynth annotation stage: synthetic images + heat maps -> a labelled dataset.

- :mod:`aerosynth.annotation.heatmap_boxes`: the direct method (heat map -> boxes), ``annotate_direct``.
- :mod:`aerosynth.annotation.map_quality`: the direct method scored on real (or translated) labelled tiles.
- :mod:`aerosynth.annotation.relay`: AGenDA's relay (F_S -> pseudo-labels -> F_A on heat maps), ``run_relay``.
- :mod:`aerosynth.annotation.refinement`: the refinement CNN deciding the relay's uncertain boxes.
- :mod:`aerosynth.annotation.export`: YOLO, COCO, GeoJSON, preview, summary and manifest of a labelled set.
- :mod:`aerosynth.annotation.synthetic_set`: reading generation's synthetic sets.
"""

from aerosynth.annotation.export import AnnotatedImage, export_dataset
from aerosynth.annotation.heatmap_boxes import HeatmapBoxConfig, annotate_direct, boxes_from_heatmap
from aerosynth.annotation.map_quality import evaluate_map_quality, evaluate_translation_set
from aerosynth.annotation.refinement import RefinementConfig, refine
from aerosynth.annotation.relay import RelayConfig, run_relay
from aerosynth.annotation.synthetic_set import SyntheticSet, open_synthetic_set

__all__ = [
    "AnnotatedImage",
    "HeatmapBoxConfig",
    "RefinementConfig",
    "RelayConfig",
    "SyntheticSet",
    "annotate_direct",
    "boxes_from_heatmap",
    "evaluate_map_quality",
    "evaluate_translation_set",
    "export_dataset",
    "open_synthetic_set",
    "refine",
    "run_relay",
]
