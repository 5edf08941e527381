"""Data layer: domains, GSD resampling, tiling, weak labels, label and geo IO, the demo data.

It imports no stage: generation, annotation, detection and flows build on it.
"""
