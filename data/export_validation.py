"""Offline validation of a tile export's STAC catalog: core schemas, label Items, hrefs and files.

pystac ships the STAC core JSON schemas (``pystac/validation/jsonschemas``) but fetches extension
schemas from the web, which fails offline: :class:`OfflineSTACValidator` never fetches, and the label
extension is checked in Python (:func:`aerosynth.data.stac_labels.check_label_item`).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

import pystac
from pystac.errors import STACValidationError
from pystac.validation.stac_validator import GetSchemaError, JsonSchemaSTACValidator

from aerosynth.data.errors import InputError
from aerosynth.data.json_input import read_json_object
from aerosynth.data.stac_labels import LABEL_SCHEMA_PREFIX, check_label_item


class OfflineSTACValidator(JsonSchemaSTACValidator):
    """pystac's JSON-schema validator limited to the schemas bundled with pystac (never fetches).

    Core Catalog/Collection/Item schemas (and the GeoJSON schemas they reference) come from
    ``pystac/validation/jsonschemas``; any other schema URI is refused instead of fetched. The
    label extension is checked by :func:`check_label_item` instead of its web-hosted schema; any
    other extension is an error.
    """

    def _get_schema(self, schema_uri: str) -> dict[str, Any]:
        if schema_uri not in self.schema_cache:
            raise GetSchemaError(schema_uri, LookupError("not bundled with pystac (offline validation)"))
        return self.schema_cache[schema_uri]

    def validate_extension(self, stac_dict, stac_object_type, stac_version, extension_id, href=None) -> str:
        if extension_id.startswith(LABEL_SCHEMA_PREFIX):
            try:
                check_label_item(stac_dict, href or "?")
            except InputError as exc:
                raise STACValidationError(str(exc)) from None
            return extension_id
        raise STACValidationError(f"{href}: extension {extension_id} cannot be validated offline")


def _is_relative(href: str) -> bool:
    return "://" not in href and not href.startswith("/") and not re.match(r"^[A-Za-z]:[\\/]", href)


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _href_target(root: Path, path: Path, href: str) -> Path | None:
    """The file that the relative ``href`` of the STAC file ``path`` names, or ``None`` when it leaves ``root``.

    The href is joined to ``path``'s place inside ``root`` as text, not through the file system, so an href
    that climbs out of the folder and back in by its name (``../../<folder>/tiles/a.tif``) is refused too:
    it resolves while the folder has that name and breaks once the folder is renamed (as a temporary
    export folder is when it is published) or moved.
    """
    where = path.parent.relative_to(root).as_posix()
    joined = posixpath.normpath(posixpath.join(where, href))
    if joined == ".." or joined.startswith("../") or posixpath.isabs(joined):
        return None
    target = root / joined
    return target if _inside(root, target) else None


def validate_export(folder: str | Path) -> dict[str, int]:
    """Validate a tile export offline: STAC core schemas, label extension, hrefs, files.

    Every Catalog and Item file is validated against the bundled core schemas with
    :class:`OfflineSTACValidator` (no URI is ever fetched), and the label extension is checked in
    Python by :func:`check_label_item` (its schema's rules) plus what the schema cannot see: a
    ``source`` link that resolves to an Item of this catalog whose assets include those named in
    ``label:assets``; a ``labels`` GeoJSON asset that exists, is a FeatureCollection whose features
    carry each ``label:properties`` key with a value from ``label:classes``, and matches the
    ``label:overviews`` counts. Every link and asset href must be relative and point to an existing
    file inside ``folder`` without leaving it on the way (self-contained catalog: it validates the same
    before and after the folder is renamed or moved, so a temporary export folder can be checked before it
    is published).

    Args:
        folder: the export folder (with ``catalog.json``).

    Returns:
        Counts: ``catalogs``, ``items``, ``label_items``.

    Raises:
        InputError: the first problem, naming the file.
    """
    root = Path(folder).resolve()
    catalog_path = root / "catalog.json"
    if not catalog_path.is_file():
        raise InputError(Path(folder) / "catalog.json", "no STAC catalog")
    validator = OfflineSTACValidator()
    seen: set[Path] = set()
    docs: dict[Path, dict] = {}
    todo = [catalog_path.resolve()]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if not _inside(root, path) or not path.is_file():
            raise InputError(path, "linked STAC file missing or outside the export")
        doc = read_json_object(path)
        docs[path] = doc
        kind = doc.get("type")
        if kind not in ("Catalog", "Collection", "Feature"):
            raise InputError(path, f"not a STAC Catalog, Collection or Item (type {kind!r})")
        try:
            validator.validate(
                doc,
                pystac.STACObjectType(kind),
                doc.get("stac_version", ""),
                list(doc.get("stac_extensions") or []),
                href=str(path),
            )
        except STACValidationError as exc:
            raise InputError(path, str(exc).splitlines()[0] + " " + " ".join(str(exc).splitlines()[1:2])) from None
        for link in doc.get("links") or []:
            href = str(link.get("href", ""))
            if not _is_relative(href):
                raise InputError(path, f"link {link.get('rel')} has a non-relative href {href!r}")
            if link.get("rel") in ("child", "item", "source", "parent", "root"):
                target = _href_target(root, path, href)
                if target is None:
                    raise InputError(path, f"link {link.get('rel')} href {href!r} leaves the export folder")
                todo.append(target.resolve())
        for key, asset in (doc.get("assets") or {}).items():
            href = str(asset.get("href", ""))
            target = _href_target(root, path, href) if _is_relative(href) else None
            if target is None or not target.is_file():
                raise InputError(path, f"asset {key} href {href!r} is not a relative path to a file of the export")
    counts = {"catalogs": 0, "items": 0, "label_items": 0}
    for path, doc in docs.items():
        if doc["type"] != "Feature":
            counts["catalogs"] += 1
            continue
        counts["items"] += 1
        if any(str(u).startswith(LABEL_SCHEMA_PREFIX) for u in doc.get("stac_extensions") or []):
            counts["label_items"] += 1
            _check_label_semantics(path, doc, docs)
    # and the catalog loads with pystac itself
    try:
        loaded = pystac.Catalog.from_file(str(catalog_path))
        n_items = sum(1 for _ in loaded.get_items(recursive=True))
    except Exception as exc:
        raise InputError(catalog_path, f"pystac cannot read the catalog ({type(exc).__name__}: {exc})") from None
    if n_items != counts["items"]:
        raise InputError(catalog_path, f"pystac finds {n_items} items, the files hold {counts['items']}")
    return counts


def _check_label_semantics(path: Path, doc: dict, docs: dict[Path, dict]) -> None:
    """What the label schema cannot see: the source link, the GeoJSON asset, its classes and counts."""
    props = doc["properties"]
    sources = [link for link in doc.get("links") or [] if link.get("rel") == "source"]
    if not sources:
        raise InputError(path, "label item without a source link to its image item")
    for link in sources:
        target = (path.parent / link["href"]).resolve()
        src = docs.get(target)
        if src is None or src.get("type") != "Feature":
            raise InputError(path, f"source link {link['href']!r} is not an item of this catalog")
        missing = [a for a in link.get("label:assets", []) if a not in (src.get("assets") or {})]
        if missing:
            raise InputError(path, f"label:assets names {missing[0]!r}, which the source item lacks")
    label_assets = [a for a in (doc.get("assets") or {}).values() if "labels" in (a.get("roles") or [])]
    if props["label:type"] == "vector":
        if not label_assets:
            raise InputError(path, "vector label item without a 'labels' asset")
        geo = read_json_object((path.parent / label_assets[0]["href"]).resolve())
        if geo.get("type") != "FeatureCollection" or not isinstance(geo.get("features"), list):
            raise InputError(path, "labels asset is not a GeoJSON FeatureCollection")
        allowed = {c["name"]: set(c["classes"]) for c in props.get("label:classes") or []}
        tally: dict[str, dict[str, int]] = {}
        for i, feat in enumerate(geo["features"]):
            fprops = feat.get("properties") or {}
            for key in props["label:properties"] or []:
                value = fprops.get(key)
                if key in allowed and value not in allowed[key]:
                    raise InputError(path, f"label feature {i}: {key}={value!r} is not one of {sorted(allowed[key])}")
                tally.setdefault(key, {}).setdefault(str(value), 0)
                tally[key][str(value)] += 1
        for ov in props.get("label:overviews") or []:
            for c in ov.get("counts") or []:
                found = tally.get(ov.get("property_key", ""), {}).get(c["name"], 0)
                if found != c["count"]:
                    raise InputError(path, f"label:overviews says {c['count']} {c['name']!r}, the GeoJSON has {found}")
