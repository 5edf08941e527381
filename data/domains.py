"""Domains: named imagery with a ground sample distance and optional labels, and their loaders.

Three loaders cover the formats users bring:

* :func:`yolo_folder_domain` — ``images/`` + ``labels/`` (YOLO txt) + optional ``groups.json``;
* :func:`coco_domain` — a COCO json and its image folder;
* :func:`geotiff_domain` — GeoTIFF rasters (any CRS) with GeoJSON labels (boxes, polygons or
  vehicle-centre points, in any CRS) beside them as ``<raster stem>.geojson``.

Loaders check pairing and labels up front (no pixel is decoded) so that a bad file is
reported before any work starts.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from affine import Affine

from aerosynth.data.classes import NAMES_FILE, first_yolo_line, read_yolo_names
from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.flags import FLAGS_GEOJSON, TargetFlags, read_target_flags
from aerosynth.data.geo import geojson_to_detections, read_geojson
from aerosynth.data.imageio import IMAGE_SUFFIXES, image_size, read_rgb
from aerosynth.data.rasters import read_raster

RASTER_SUFFIXES = (".tif", ".tiff")


@dataclass
class DomainImage:
    """One image of a domain and where its labels come from.

    Attributes:
        image_id: unique name in the domain (file stem).
        path: the image or raster file.
        group: video clip / sequence / scene; splits are made by group.
        label_path: YOLO txt or GeoJSON file, or ``None``.
        coco_annotations: COCO annotation dicts (COCO domains), or ``None``.
    """

    image_id: str
    path: Path
    group: str
    label_path: Path | None = None
    coco_annotations: list[dict] | None = None

    @property
    def labelled(self) -> bool:
        return self.label_path is not None or self.coco_annotations is not None


@dataclass
class LoadedImage:
    """Pixels, boxes and georeference of one domain image."""

    rgb: np.ndarray
    valid: np.ndarray | None
    detections: Detections | None
    transform: Affine | None
    crs: object | None
    gsd: float | None


@dataclass
class Domain:
    """Named imagery with a ground sample distance and optional labels.

    Attributes:
        name: domain name used in prompts and manifests (letters, digits, ``_``, ``-``).
        images: its images.
        gsd: metres per pixel of plain images; ``None`` to take it from each raster's transform.
        class_names: label classes.
        bands: 1-based band selection for rasters with other than three bands.
        point_box_m: side in metres of the box made from a point label.
        missing_labels: what an image without a label file means: ``"error"`` or ``"negative"``.
        class_vocabulary: label id -> class name (a YOLO folder's ``data.yaml``, COCO categories), to
            resolve ``--classes`` names and to name classes in messages.
        classes: the label ids that are vehicles, chosen by the user or a preset (boxes of other
            classes are dropped); ``None``: only :attr:`default_class` is, and other classes are refused
            (see :mod:`aerosynth.data.classes`).
        label_ids: label id of each class index of the loaded boxes (COCO: the sorted category ids);
            ``None``: class index and label id are the same.
        label_file: the file holding every image's labels (a COCO json), named in messages.
        has_labels: whether the domain comes with boxes at all (a ``labels/`` folder, GeoJSON labels, COCO
            annotations); without them an image without labels is not a negative, and a target needs flags.
        flags: the weak flags given with the domain (:mod:`aerosynth.data.flags`), or ``None``.
        root: the folder the domain was opened from (its flag files are there), named in messages.
        classes_asked: what ``--classes`` (or ``data.classes``) gave when none of it named a class of this
            domain (which then keeps the default), for the message refusing another class.
    """

    name: str
    images: list[DomainImage]
    gsd: float | None = None
    class_names: list[str] = field(default_factory=lambda: ["vehicle"])
    bands: list[int] | None = None
    point_box_m: float = 5.3
    missing_labels: str = "error"
    class_vocabulary: dict[int, str] = field(default_factory=dict)
    classes: frozenset[int] | None = None
    label_ids: list[int] | None = None
    label_file: Path | None = None
    classes_asked: tuple[str, ...] = ()
    has_labels: bool = True
    flags: TargetFlags | None = None
    root: Path | None = None

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise InputError("domain.name", f"{self.name!r} must be letters, digits, '_' or '-'")
        if not self.images:
            raise InputError(self.name, "empty domain: no images found")

    @property
    def groups(self) -> list[str]:
        return sorted({im.group for im in self.images})

    @property
    def default_class(self) -> int:
        """The label id that is a vehicle when no classes were chosen: 0, or the lowest COCO category."""
        return self.label_ids[0] if self.label_ids else 0

    @property
    def vehicle_classes(self) -> list[int]:
        """The label ids whose boxes are vehicles (chosen, or the default one)."""
        return sorted(self.classes) if self.classes is not None else [self.default_class]

    def keep_vehicles(self, item: DomainImage, detections: Detections) -> tuple[Detections, int]:
        """The boxes of vehicle classes and how many of other classes were dropped.

        Raises:
            InputError: a box of another class when no classes were chosen (naming the file, the line or
                annotation, and the class).
        """
        ids = detections.class_id if self.label_ids is None else np.array(self.label_ids)[detections.class_id]
        keep = np.isin(ids, self.vehicle_classes)
        if keep.all():
            return detections, 0
        if self.classes is None:
            raise self._class_error(item, int(ids[~keep][0]))
        return detections[keep], int((~keep).sum())

    def known_class_ids(self) -> set[int]:
        """The label ids of this domain: its named classes, or else the ids its label files hold.

        A domain without names (no ``data.yaml``) has the class ids of its YOLO rows and GeoJSON
        ``class_id`` properties (0 when a feature has none); rows that do not parse are skipped here (they
        are refused when the image is loaded).
        """
        if self.class_vocabulary:
            return set(self.class_vocabulary)
        if self.label_ids is not None:
            return set(self.label_ids)
        ids: set[int] = set()
        for item in self.images:
            path = item.label_path
            if path is None or not path.is_file():
                continue
            try:
                if path.suffix.lower() == ".txt":
                    rows = (line.split() for line in path.read_text(encoding="utf-8-sig").splitlines())
                    values: list = [row[0] for row in rows if row]
                else:
                    values = [(f.get("properties") or {}).get("class_id", 0) for f in read_geojson(path)["features"]]
            except (OSError, UnicodeDecodeError, InputError, AttributeError):
                continue
            for value in values:
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    continue
                if number.is_integer() and number >= 0 and not isinstance(value, bool):
                    ids.add(int(number))
        return ids

    def check_classes(self, items: Sequence[DomainImage]) -> None:
        """Refuse boxes of other classes before any pixel is decoded when no classes were chosen.

        YOLO files and COCO annotations are checked (GeoJSON when the raster is loaded).
        """
        if self.classes is not None:
            return
        for item in items:
            if item.coco_annotations is not None:
                self.keep_vehicles(item, Detections.from_coco(item.coco_annotations))
            elif item.label_path is not None and item.label_path.suffix.lower() == ".txt":
                self.keep_vehicles(item, read_yolo_labels(item.label_path, 1, 1))

    def _class_name(self, class_id: int) -> str:
        name = self.class_vocabulary.get(class_id)
        return f" ({name!r})" if name is not None else ""

    def _class_error(self, item: DomainImage, class_id: int) -> InputError:
        where: str | Path
        if item.coco_annotations is not None and self.label_ids is not None:
            index = self.label_ids.index(class_id)
            ann = next((a for a in item.coco_annotations if a.get("category_id") == index + 1), {})
            where = self.label_file or item.path
            what = f"annotation {ann.get('id')} has category {class_id}{self._class_name(class_id)}"
        elif item.label_path is not None and item.label_path.suffix.lower() == ".txt":
            line = first_yolo_line(item.label_path.read_text(encoding="utf-8-sig"), class_id)
            where, what = f"{item.label_path}:{line}", f"class id {class_id}{self._class_name(class_id)}"
        else:
            where, what = item.label_path or item.path, f"class_id {class_id}{self._class_name(class_id)}"
        default = self.default_class
        if self.classes_asked:  # a choice was made, but it named none of this domain's classes
            asked = ",".join(self.classes_asked)
            return InputError(
                where,
                f"{what} is not a vehicle class: --classes {asked} names no class of domain {self.name!r}, which "
                f"keeps the default ({default}{self._class_name(default)} only); add this domain's vehicle classes "
                f"to --classes (e.g. --classes {asked},{class_id} if it is a vehicle too)",
            )
        return InputError(
            where,
            f"{what} is not a vehicle class (unless chosen, only {default}{self._class_name(default)} is); "
            f"pass --classes with the ids or names of the vehicle classes (e.g. --classes {default},{class_id} "
            "if it is a vehicle too); boxes of classes not chosen are then dropped",
        )

    def load(self, item: DomainImage) -> LoadedImage:
        """Decode one image and its labels (validated against the image size)."""
        if item.path.suffix.lower() in RASTER_SUFFIXES:
            raster = read_raster(item.path, self.bands)
            rgb, valid, transform, crs, gsd = raster.rgb, raster.valid, raster.transform, raster.crs, raster.gsd
        else:
            rgb, valid, transform, crs, gsd = read_rgb(item.path), None, None, None, None
        gsd = self.gsd if self.gsd is not None else gsd
        h, w = rgb.shape[:2]
        return LoadedImage(rgb, valid, self.load_labels(item, w, h, transform, crs, gsd), transform, crs, gsd)

    def load_labels(
        self,
        item: DomainImage,
        width: int,
        height: int,
        transform: Affine | None,
        crs: object | None,
        gsd: float | None,
    ) -> Detections | None:
        """The boxes of one image of ``width`` x ``height`` pixels (validated against that size), without its pixels.

        Args:
            item: the image.
            width: its width in pixels.
            height: its height.
            transform: its pixel -> map transform (GeoJSON labels), or ``None``.
            crs: the CRS of ``transform``, or ``None``.
            gsd: metres per pixel (the domain's, else the raster's), or ``None``.

        Returns:
            The boxes, empty for a negative, or ``None`` when the image has no labels.
        """
        if item.coco_annotations is not None:
            return Detections.from_coco(item.coco_annotations, category_to_class=None).validate(
                str(item.path), width, height
            )
        if item.label_path is not None and item.label_path.suffix.lower() in (".geojson", ".json"):
            if transform is None or crs is None:
                raise InputError(item.path, "raster has no CRS/transform: cannot place GeoJSON labels on it")
            if gsd is None:
                raise InputError(item.path, "no ground sample distance: give the domain a gsd")
            doc = read_geojson(item.label_path)
            return geojson_to_detections(
                doc, str(item.label_path), transform, crs, width, height, gsd, self.point_box_m
            )
        if item.label_path is not None:
            return read_yolo_labels(item.label_path, width, height)
        if self.missing_labels == "negative" and self.has_labels:
            return Detections.empty()
        return None


def read_yolo_labels(path: Path, width: int, height: int) -> Detections:
    """Read a YOLO label file (a zero-byte file is a negative image; a UTF-8 BOM and CRLF are fine)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(path, "label file is not text") from None
    return Detections.from_yolo(text, width, height, where=str(path))


def read_groups(path: Path) -> dict[str, str]:
    """``groups.json``: image file name -> group."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise InputError(path, f"unreadable groups file ({exc.__class__.__name__})") from None
    if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
        raise InputError(path, "groups.json must map image file names to group names")
    return doc


def _images_in(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    if not folder.is_dir():
        raise InputError(folder, "folder not found")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes and not p.name.startswith("."))


def yolo_folder_domain(
    root: str | Path,
    name: str | None = None,
    gsd: float | None = None,
    missing_labels: str = "error",
    class_names: list[str] | None = None,
    classes: Collection[int] | None = None,
) -> Domain:
    """A folder with ``images/``, ``labels/`` (YOLO txt) and optional ``groups.json`` and flag files.

    Without a ``labels/`` folder the domain has no boxes (:attr:`Domain.has_labels` false): a target then
    takes its weak flags from ``flags.json``/``flags.csv``/``flags.geojson`` (:mod:`aerosynth.data.flags`).

    Args:
        root: the folder.
        name: domain name (default: the folder name).
        gsd: metres per pixel of the images.
        missing_labels: ``"error"`` (default) or ``"negative"``: an image without a label
            file is a tile with no vehicle.
        class_names: class names (default ``["vehicle"]``).
        classes: the YOLO class ids that are vehicles (default: class 0 only, others refused); the
            folder's ``data.yaml`` ``names:`` name them for ``--classes``.

    Raises:
        InputError: missing folders, a label file without image, an image without label file in a
            ``labels/`` folder (unless negatives are allowed), no images, an unreadable ``data.yaml`` or flag file.
    """
    root = Path(root)
    images = _images_in(root / "images", IMAGE_SUFFIXES)
    labels_dir = root / "labels"
    label_files = {p.stem: p for p in labels_dir.glob("*.txt")} if labels_dir.is_dir() else {}
    stems = [p.stem for p in images]
    if len(set(stems)) != len(stems):
        raise InputError(root / "images", "two images share a file stem")
    orphans = sorted(set(label_files) - set(stems))
    if orphans:
        raise InputError(label_files[orphans[0]], "label file without image")
    groups = read_groups(root / "groups.json") if (root / "groups.json").is_file() else {}
    items = []
    for p in images:
        lab = label_files.get(p.stem)
        if lab is None and missing_labels != "negative" and labels_dir.is_dir():
            raise InputError(p, "image without label file (set missing_labels='negative' if it has no vehicle)")
        items.append(DomainImage(p.stem, p, groups.get(p.name, p.stem), lab))
    names_file = root / NAMES_FILE
    return Domain(
        name or root.name,
        items,
        gsd=gsd,
        class_names=class_names or ["vehicle"],
        missing_labels=missing_labels,
        class_vocabulary=read_yolo_names(names_file) if names_file.is_file() else {},
        classes=frozenset(classes) if classes is not None else None,
        has_labels=labels_dir.is_dir(),
        flags=read_target_flags(root),
        root=root,
    )


def coco_domain(
    coco_json: str | Path,
    image_dir: str | Path | None = None,
    name: str | None = None,
    gsd: float | None = None,
    classes: Collection[int] | None = None,
) -> Domain:
    """A COCO json and its images (``file_name`` relative to ``image_dir``, default the json's folder).

    Groups come from an image's ``group`` field when present, else its file stem. ``classes`` are the
    category ids that are vehicles (default: the lowest category id only, others refused).
    """
    coco_json = Path(coco_json)
    try:
        doc = json.loads(coco_json.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise InputError(coco_json, "file not found") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(coco_json, f"not valid JSON ({exc.__class__.__name__})") from None
    try:
        domain = _coco_domain(doc, coco_json, image_dir, name, gsd)
    except InputError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise InputError(coco_json, f"not a COCO json ({exc.__class__.__name__}: {str(exc)[:60]})") from None
    domain.classes = frozenset(classes) if classes is not None else None
    return domain


def _coco_domain(
    doc: dict, coco_json: Path, image_dir: str | Path | None, name: str | None, gsd: float | None
) -> Domain:
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise InputError(coco_json, "not a COCO json (no 'images' list)")
    images = doc["images"]
    anns = doc.get("annotations", [])
    cats = doc.get("categories", [{"id": 1, "name": "vehicle"}])
    if (
        not isinstance(anns, list)
        or not isinstance(cats, list)
        or not all(isinstance(c, dict) for c in cats + anns + images)
    ):
        raise InputError(coco_json, "not a COCO json ('annotations', 'categories' must be lists of objects)")
    for c in cats:
        if isinstance(c.get("id"), bool) or not isinstance(c.get("id"), int):
            raise InputError(coco_json, f"category {c.get('id')!r} has no integer id")
    cats = sorted(cats, key=lambda c: c["id"])
    image_dir = Path(image_dir) if image_dir is not None else coco_json.parent
    cat_to_class = {c["id"]: i for i, c in enumerate(cats)}
    by_image: dict[int, list[dict]] = {}
    for a in anns:
        if a.get("category_id") not in cat_to_class:
            raise InputError(coco_json, f"annotation {a.get('id')} has unknown category {a.get('category_id')}")
        bbox = a.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
            raise InputError(coco_json, f"annotation {a.get('id')} has a malformed bbox")
        a = dict(a, category_id=cat_to_class[a["category_id"]] + 1)
        by_image.setdefault(a.get("image_id"), []).append(a)
    ids = {im["id"] for im in images}
    stray = [a for i, lst in by_image.items() if i not in ids for a in lst]
    if stray:
        raise InputError(coco_json, f"annotation {stray[0].get('id')} refers to a missing image")
    items = []
    for im in images:
        if not isinstance(im.get("file_name"), str):
            raise InputError(coco_json, f"image {im.get('id')} has no file_name")
        path = image_dir / im["file_name"]
        if not path.is_file():
            raise InputError(path, "image listed in the COCO json not found")
        anns_of = by_image.get(im["id"], []) if "annotations" in doc else None
        items.append(DomainImage(path.stem, path, str(im.get("group", path.stem)), None, anns_of))
    return Domain(
        name or coco_json.stem,
        items,
        gsd=gsd,
        class_names=[c["name"] for c in cats],
        class_vocabulary={c["id"]: str(c["name"]) for c in cats},
        label_ids=[c["id"] for c in cats],
        label_file=coco_json,
        has_labels="annotations" in doc,
        flags=read_target_flags(coco_json.parent),
        root=coco_json.parent,
    )


def geotiff_domain(
    folder: str | Path,
    name: str | None = None,
    bands: list[int] | None = None,
    point_box_m: float = 5.3,
    missing_labels: str = "negative",
    gsd: float | None = None,
    classes: Collection[int] | None = None,
) -> Domain:
    """GeoTIFF rasters in a folder, each with an optional ``<stem>.geojson`` of labels.

    The GSD comes from each raster's transform unless ``gsd`` is given. Groups come from
    ``groups.json`` when present, else each raster is its own group. ``classes`` are the
    ``class_id`` values that are vehicles (default: 0 only, others refused). A folder without any label
    file has no boxes (its weak flags come from ``flags.json``/``flags.csv``/``flags.geojson``).
    """
    folder = Path(folder)
    rasters = _images_in(folder, RASTER_SUFFIXES)
    groups = read_groups(folder / "groups.json") if (folder / "groups.json").is_file() else {}
    stems = {p.stem for p in rasters}
    for lab in folder.glob("*.geojson"):
        if lab.name == FLAGS_GEOJSON:  # weak flags (aerosynth.data.flags), not labels
            continue
        if lab.stem not in stems:
            raise InputError(lab, "label file without raster")
    labelled = any(p.with_suffix(".geojson").is_file() for p in rasters)
    items = []
    for p in rasters:
        lab = p.with_suffix(".geojson")
        if not lab.is_file():
            if missing_labels != "negative" and labelled:
                raise InputError(p, "raster without label file")
            lab = None
        items.append(DomainImage(p.stem, p, groups.get(p.name, p.stem), lab))
    return Domain(
        name or folder.name,
        items,
        gsd=gsd,
        bands=bands,
        point_box_m=point_box_m,
        missing_labels=missing_labels,
        classes=frozenset(classes) if classes is not None else None,
        has_labels=labelled,
        flags=read_target_flags(folder),
        root=folder,
    )


def check_image_headers(domain: Domain) -> None:
    """Read every image header once (cheap): corrupt or oversized files fail before work starts."""
    for item in domain.images:
        if item.path.suffix.lower() not in RASTER_SUFFIXES:
            image_size(item.path)


def open_domain(
    path: str | Path, gsd: float | None = None, bands: list[int] | None = None, name: str | None = None
) -> Domain:
    """Open a domain by what ``path`` is: a COCO json, a folder with ``images/`` (YOLO), or a folder of
    GeoTIFFs. In YOLO folders an image without a label file is a negative."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".json":
        return coco_domain(path, name=name, gsd=gsd)
    if not path.is_dir():
        raise InputError(
            path, "domain not found (a folder with images/ and labels/, a folder of GeoTIFFs, or a COCO json)"
        )
    if (path / "images").is_dir():
        return yolo_folder_domain(path, name=name, gsd=gsd, missing_labels="negative")
    return geotiff_domain(path, name=name, bands=bands, gsd=gsd)
