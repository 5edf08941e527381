"""STAC label-extension Items: one per exported tile (:func:`add_label_item`) and their structural check.

A label Item describes the vector boxes of one tile: ``label:type`` ``vector``, task ``detection``,
one class property (``class_name``), a ``labels`` asset pointing at the tile's GeoJSON and a
``source`` link to the tile's image Item. :func:`check_label_item` writes out the rules of the
label extension's JSON schema (v1.0.x) so that exports can be validated offline.
"""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Sequence
from pathlib import Path

import pystac

from aerosynth.data.errors import InputError

LABEL_SCHEMA_PREFIX = "https://stac-extensions.github.io/label/"
CLASS_PROPERTY = "class_name"


def add_label_item(
    labels: pystac.Catalog,
    image_item: pystac.Item,
    geojson: Path,
    boxes: int,
    created: dt.datetime,
    label_method: str,
    class_names: Sequence[str],
    self_href: Path,
) -> pystac.Item:
    """Add the label Item of one tile to ``labels``.

    Args:
        labels: the catalog of label Items.
        image_item: the tile's image Item (geometry, bbox and the ``source`` link; asset ``image``).
        geojson: the tile's GeoJSON boxes (the ``labels`` asset).
        boxes: how many boxes it holds (``label:overviews``).
        created: the Item datetime.
        label_method: where the boxes came from, in words.
        class_names: the classes of ``class_name``; the overview counts all boxes as the first.
        self_href: where the Item is saved.

    Returns:
        The label Item.
    """
    with warnings.catch_warnings():  # pystac flags its label helpers as deprecated (the extension is "pilot")
        warnings.simplefilter("ignore", DeprecationWarning)
        from pystac.extensions.label import (
            LabelClasses,
            LabelCount,
            LabelExtension,
            LabelMethod,
            LabelOverview,
            LabelTask,
            LabelType,
        )

    label = pystac.Item(
        id=f"{image_item.id}-labels",
        geometry=image_item.geometry,
        bbox=image_item.bbox,
        datetime=created,
        properties={"aerosynth:boxes": boxes},
    )
    ext = LabelExtension.ext(label, add_if_missing=True)
    ext.apply(
        label_description=f"Vehicle boxes of tile {image_item.id}, read from {label_method}.",
        label_type=LabelType.VECTOR,
        label_properties=[CLASS_PROPERTY],
        label_classes=[LabelClasses.create(classes=list(class_names), name=CLASS_PROPERTY)],
        label_tasks=[LabelTask.DETECTION],
        label_methods=[LabelMethod.AUTOMATED],
        label_overviews=[
            LabelOverview.create(property_key=CLASS_PROPERTY, counts=[LabelCount.create(class_names[0], boxes)])
        ],
    )
    ext.add_source(image_item, title="the labelled tile", assets=["image"])
    ext.add_geojson_labels(href=str(geojson), title="vehicle boxes")
    label.assets["labels"].roles = ["labels", "labels-vector"]
    labels.add_item(label)
    label.set_self_href(str(self_href))
    return label


def _check_label_field(props: dict, key: str, ok: bool, expected: str, where: str) -> None:
    if not ok:
        raise InputError(where, f"label extension: {key} is {props.get(key)!r}, expected {expected}")


def check_label_item(item: dict, where: str) -> None:
    """Structural check of a label-extension Item (the rules of label schema v1.0.x, written out here).

    Properties ``label:properties`` (non-empty list of strings, or null), ``label:description``
    (non-empty string) and ``label:type`` (``vector``/``raster``) are required; ``label:classes``
    entries have ``name`` (a non-empty string for vector labels, null for raster) and ``classes``
    (all strings or all numbers); ``label:tasks``/``label:methods`` are lists of strings;
    ``label:overviews`` entries have a string ``property_key`` and ``counts`` of ``{name: str,
    count: int}``; no other ``label:`` field exists; link ``label:assets`` are lists of strings.

    Args:
        item: the Item as a JSON dict.
        where: its file, for error messages.

    Raises:
        InputError: the first violation.
    """
    props = item.get("properties")
    if not isinstance(props, dict):
        raise InputError(where, "label extension: no properties object")
    if not any(str(u).startswith(LABEL_SCHEMA_PREFIX) for u in item.get("stac_extensions") or []):
        raise InputError(where, "label extension: not listed in stac_extensions")
    known = {
        "label:properties",
        "label:classes",
        "label:description",
        "label:type",
        "label:tasks",
        "label:methods",
        "label:overviews",
    }
    extra = sorted(k for k in props if k.startswith("label:") and k not in known)
    if extra:
        raise InputError(where, f"label extension: unknown field {extra[0]}")
    for key in ("label:properties", "label:description", "label:type"):
        if key not in props:
            raise InputError(where, f"label extension: required field {key} missing")
    lp = props["label:properties"]
    _check_label_field(
        props,
        "label:properties",
        lp is None or (isinstance(lp, list) and len(lp) >= 1 and all(isinstance(p, str) for p in lp)),
        "a non-empty list of strings or null",
        where,
    )
    desc = props["label:description"]
    _check_label_field(
        props, "label:description", isinstance(desc, str) and len(desc) >= 1, "a non-empty string", where
    )
    _check_label_field(props, "label:type", props["label:type"] in ("vector", "raster"), "vector or raster", where)
    raster = props["label:type"] == "raster"
    classes = props.get("label:classes", [])
    _check_label_field(props, "label:classes", isinstance(classes, list), "a list", where)
    for entry in classes:
        ok = isinstance(entry, dict) and "name" in entry and "classes" in entry
        _check_label_field(props, "label:classes", ok, "objects with name and classes", where)
        name, values = entry["name"], entry["classes"]
        ok_name = name is None if raster else (isinstance(name, str) and len(name) >= 1)
        _check_label_field(props, "label:classes", ok_name, "null names (raster) or non-empty names (vector)", where)
        ok_values = isinstance(values, list) and (
            all(isinstance(v, str) for v in values)
            or all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        )
        _check_label_field(props, "label:classes", ok_values, "classes all strings or all numbers", where)
    for key in ("label:tasks", "label:methods"):
        value = props.get(key, [])
        _check_label_field(
            props, key, isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of strings", where
        )
    for ov in props.get("label:overviews", []) or []:
        ok = isinstance(ov, dict) and isinstance(ov.get("property_key", ""), str)
        counts = ov.get("counts", []) if isinstance(ov, dict) else None
        ok = (
            ok
            and isinstance(counts, list)
            and all(
                isinstance(c, dict)
                and isinstance(c.get("name", ""), str)
                and isinstance(c.get("count", 0), int)
                and not isinstance(c.get("count", 0), bool)
                for c in counts
            )
        )
        _check_label_field(props, "label:overviews", ok, "objects with property_key and counts {name, count}", where)
    for link in item.get("links") or []:
        extra = [k for k in link if k.startswith("label:") and k != "label:assets"]
        if extra:
            raise InputError(where, f"label extension: unknown link field {extra[0]}")
        la = link.get("label:assets", [])
        if not (isinstance(la, list) and all(isinstance(a, str) for a in la)):
            raise InputError(where, "label extension: link label:assets must be a list of strings")
