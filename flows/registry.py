"""Alias of :mod:`aerosynth.detection.registry`, where the detector registry lives now.

A registry is not orchestration: the flows use it, from the detection stage. This alias keeps
``from aerosynth.flows.registry import ...`` working until its last users import the stage module.
"""

from aerosynth.detection.registry import EvaluationSet, Registry, Version, version_rows

__all__ = ["EvaluationSet", "Registry", "Version", "version_rows"]
