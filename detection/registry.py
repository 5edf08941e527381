"""A folder of detector versions, the one in production, and the imagery already used.

Layout::

    REGISTRY/
      registry.json             what the registry evaluates on: the prepared tiles folder and the split
                                (with boxes, e.g. ``target-test``) every version is compared on, the
                                source splits a retrain adapts from
      versions/v0001/           one immutable version (never overwritten, never edited)
        detector.pt             the weights
        detector.json           the training manifest (when the detector came with one)
        config.yaml             the config it was trained with (when given)
        metrics.json            its evaluation, and the decision taken when it was registered
        provenance.json         which run, which data (manifest hashes, new imagery sha256), parent version
        report.md report.json   the run's report (when given)
        version.json            written last: name, time, sha256 of every file (a version without it is
                                unfinished and is not listed)
      production.json           the production version (rewritten atomically by :meth:`Registry.promote`)
      seen.json                 sha256 -> raster name, first time seen, version: imagery already used
      decisions.jsonl           one JSON line per promotion decision

A version is built in a hidden temporary folder and moved into place under the next free number,
claimed with an atomic ``mkdir`` (two processes registering at once get two numbers). Updates of
``production.json`` and ``seen.json`` happen under an exclusive ``flock`` on ``REGISTRY/.lock``.

Which candidate becomes production (the promotion rule) is :mod:`aerosynth.detection.promotion`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aerosynth.data.atomic import atomic_write_json, atomic_write_text
from aerosynth.data.errors import InputError
from aerosynth.data.manifest import file_sha256

REGISTRY_FILE = "registry.json"
VERSIONS_DIR = "versions"
PRODUCTION_FILE = "production.json"
SEEN_FILE = "seen.json"
DECISIONS_FILE = "decisions.jsonl"
VERSION_FILE = "version.json"
DETECTOR_FILE = "detector.pt"
METRICS_FILE = "metrics.json"
PROVENANCE_FILE = "provenance.json"
CONFIG_FILE = "config.yaml"
_VERSION_RE = re.compile(r"^v(\d{4,})$")


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def version_name(number: int) -> str:
    """``3 -> "v0003"``."""
    return f"v{number:04d}"


@dataclass(frozen=True)
class Version:
    """One registered detector version.

    Attributes:
        name: ``v0001`` ...
        path: its folder.
        record: the content of ``version.json`` (name, created_at, files with sha256).
    """

    name: str
    path: Path
    record: dict

    @property
    def number(self) -> int:
        return int(self.name[1:])

    @property
    def detector(self) -> Path:
        return self.path / DETECTOR_FILE

    @property
    def metrics(self) -> dict:
        p = self.path / METRICS_FILE
        return json.loads(p.read_text()) if p.is_file() else {}

    @property
    def provenance(self) -> dict:
        p = self.path / PROVENANCE_FILE
        return json.loads(p.read_text()) if p.is_file() else {}


@dataclass(frozen=True)
class EvaluationSet:
    """The split every version is compared on, and the tiles a retrain adapts from.

    Attributes:
        tiles: a prepared tiles folder (``aerosynth.data.prepare``): source splits and the evaluation split.
        split: the evaluation split (it must have boxes, e.g. ``target-test`` via ``evaluation/``).
    """

    tiles: Path
    split: str = "target-test"


class Registry:
    """A registry folder (see the module docstring).

    Args:
        root: the folder; it must have been made by :meth:`create`.

    Raises:
        InputError: the folder is not a registry.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        path = self.root / REGISTRY_FILE
        if not path.is_file():
            raise InputError(
                self.root, f"not a model registry (no {REGISTRY_FILE}; create one from prepared tiles, e.g. --tiles)"
            )
        try:
            self.doc = json.loads(path.read_text())
            self.evaluation = EvaluationSet(Path(self.doc["evaluation"]["tiles"]), self.doc["evaluation"]["split"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(path, f"malformed registry file ({exc.__class__.__name__}: {exc})") from None

    # ----------------------------------------------------------------- creation
    @classmethod
    def create(
        cls, root: str | Path, tiles: str | Path, split: str = "target-test", exist_ok: bool = False
    ) -> Registry:
        """Make an empty registry that evaluates on ``tiles/<split>`` (a split with boxes).

        Args:
            root: the registry folder.
            tiles: a prepared tiles folder with ``source-train`` and the evaluation split.
            split: the evaluation split; never trained on.
            exist_ok: open an existing registry with the same evaluation set instead of failing.

        Raises:
            InputError: the evaluation split has no boxes, or the registry exists (with another
                evaluation set, or at all when not ``exist_ok``).
        """
        from aerosynth.data.tileset import open_evaluation_split

        root, tiles = Path(root), Path(tiles).resolve()
        open_evaluation_split(tiles, split)  # it must have boxes
        if not (tiles / "source-train" / "tiles.json").is_file():
            raise InputError(tiles, "the registry's tiles need a source-train split to adapt from")
        if (root / REGISTRY_FILE).is_file():
            reg = cls(root)
            if not exist_ok:
                raise InputError(root, "registry already exists")
            if reg.evaluation != EvaluationSet(tiles, split):
                raise InputError(
                    root, f"registry evaluates on {reg.evaluation.tiles}/{reg.evaluation.split}, not {tiles}/{split}"
                )
            return reg
        (root / VERSIONS_DIR).mkdir(parents=True, exist_ok=True)
        manifest = tiles / "manifest.json"
        doc = {
            "kind": "aerosynth.registry",
            "created_at": now_iso(),
            "evaluation": {"tiles": str(tiles), "split": split},
            "tiles_manifest_sha256": file_sha256(manifest) if manifest.is_file() else None,
        }
        with _locked(root):
            if not (root / REGISTRY_FILE).is_file():
                atomic_write_json(root / REGISTRY_FILE, doc)
        return cls(root)

    # ----------------------------------------------------------------- versions
    def list_versions(self) -> list[Version]:
        """Finished versions, oldest first (unfinished or foreign folders are left out)."""
        out = []
        vdir = self.root / VERSIONS_DIR
        for p in sorted(vdir.iterdir()) if vdir.is_dir() else []:
            m = _VERSION_RE.match(p.name)
            if not m or not (p / VERSION_FILE).is_file():
                continue
            try:
                out.append(Version(p.name, p, json.loads((p / VERSION_FILE).read_text())))
            except ValueError:
                continue
        return sorted(out, key=lambda v: v.number)

    def version(self, name: str) -> Version:
        """One finished version by name.

        Raises:
            InputError: no such version.
        """
        for v in self.list_versions():
            if v.name == name:
                return v
        raise InputError(self.root / VERSIONS_DIR / name, "no such registered version")

    def register(
        self,
        detector: str | Path,
        metrics: Mapping[str, Any],
        provenance: Mapping[str, Any],
        config_yaml: str | None = None,
        files: Mapping[str, str | Path] | None = None,
    ) -> Version:
        """Add a new version (the next free number); an existing version is never touched.

        Args:
            detector: weights ``.pt``; a ``detector.json`` beside it is copied too.
            metrics: its evaluation and the decision (``metrics.json``).
            provenance: run, data manifest hashes, imagery (``provenance.json``).
            config_yaml: the config it was trained with (``config.yaml``).
            files: more files to copy, by name in the version folder (``{"report.md": path}``).

        Returns:
            The new version.

        Raises:
            InputError: the detector (or another file) does not exist.
        """
        detector = Path(detector)
        if not detector.is_file():
            raise InputError(detector, "detector weights not found")
        extra = {DETECTOR_FILE: detector}
        if (detector.parent / "detector.json").is_file():
            extra["detector.json"] = detector.parent / "detector.json"
        for name, src in (files or {}).items():
            if Path(name).name != name or name in (VERSION_FILE, METRICS_FILE, PROVENANCE_FILE):
                raise InputError(f"files[{name}]", "must be a plain file name other than the registry's own")
            if not Path(src).is_file():
                raise InputError(src, "file to register not found")
            extra[name] = Path(src)
        vdir = self.root / VERSIONS_DIR
        vdir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".register.", suffix=".partial", dir=vdir))
        try:
            for name, src in extra.items():
                shutil.copyfile(src, tmp / name)
            atomic_write_json(tmp / METRICS_FILE, dict(metrics))
            atomic_write_json(tmp / PROVENANCE_FILE, dict(provenance))
            if config_yaml is not None:
                atomic_write_text(tmp / CONFIG_FILE, config_yaml)
            name = self._claim_next_number(vdir)
            files_sha = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            atomic_write_json(tmp / VERSION_FILE, {"name": name, "created_at": now_iso(), "files": files_sha})
            os.replace(tmp, vdir / name)  # onto the empty folder claimed above: atomic
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return self.version(name)

    @staticmethod
    def _claim_next_number(vdir: Path) -> str:
        """``mkdir`` the next free ``vNNNN``: atomic, so concurrent registrations get distinct numbers."""
        used = [int(m.group(1)) for p in vdir.iterdir() if (m := _VERSION_RE.match(p.name))]
        n = max(used, default=0) + 1
        while True:
            try:
                os.mkdir(vdir / version_name(n))
                return version_name(n)
            except FileExistsError:
                n += 1

    # --------------------------------------------------------------- production
    def production(self) -> Version | None:
        """The production version, or ``None`` before the first promotion."""
        path = self.root / PRODUCTION_FILE
        if not path.is_file():
            return None
        return self.version(json.loads(path.read_text())["version"])

    def promote(self, name: str, reason: str = "") -> Version:
        """Make a finished version the production one (``production.json``, atomically).

        Raises:
            InputError: no such version.
        """
        version = self.version(name)
        with _locked(self.root):
            previous = self.production()
            atomic_write_json(
                self.root / PRODUCTION_FILE,
                {
                    "version": version.name,
                    "detector": str(version.detector),
                    "promoted_at": now_iso(),
                    "previous": previous.name if previous else None,
                    "reason": reason,
                },
            )
        return version

    # ------------------------------------------------------------ decisions, seen
    def log_decision(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line to ``decisions.jsonl`` (under the lock, fsynced)."""
        line = json.dumps({"time": now_iso(), **record}, sort_keys=True, default=str) + "\n"
        with _locked(self.root), open(self.root / DECISIONS_FILE, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def decisions(self) -> list[dict]:
        """Every logged decision, oldest first."""
        path = self.root / DECISIONS_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def seen(self) -> dict[str, dict]:
        """sha256 -> ``{"name", "first_seen", "version"}`` of every raster already used."""
        path = self.root / SEEN_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def mark_seen(self, entries: Mapping[str, str], version: str | None) -> None:
        """Record rasters (sha256 -> file name) as used by ``version`` (first sighting kept)."""
        with _locked(self.root):
            seen = self.seen()
            for sha, name in entries.items():
                seen.setdefault(sha, {"name": name, "first_seen": now_iso(), "version": version})
            atomic_write_json(self.root / SEEN_FILE, seen)


def version_rows(registry: Registry) -> list[dict]:
    """One row per finished version for listings: name, time, AP50, decision, parent, run, production mark."""
    prod = registry.production()
    rows = []
    for v in registry.list_versions():
        m, p = v.metrics, v.provenance
        rows.append(
            {
                "version": v.name,
                "created_at": v.record.get("created_at"),
                "ap50": m.get("ap50"),
                "production_ap50": (m.get("production") or {}).get("ap50"),
                "promoted": (m.get("decision") or {}).get("promote"),
                "parent": p.get("parent_version"),
                "run": p.get("run_id") or p.get("kind"),
                "production": prod is not None and prod.name == v.name,
            }
        )
    return rows


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``root/.lock`` for read-modify-write of the registry's files."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
