"""Skip a finished stage: each stage folder records the key of the inputs it was built from.

The key hashes the stage's settings together with the content hashes of the stage folders it
reads, so a rerun after a finished stage skips it, and a config change reruns exactly the
stages that depend on it. A stage that died half-way has no record and runs again (stages
resume from their own checkpoints and shards where they have them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aerosynth.data.atomic import atomic_write_json, remove_partial_files
from aerosynth.data.manifest import tree_sha256
from aerosynth.flows import progress

STAGE_RECORD = "stage_done.json"
log = logging.getLogger("aerosynth.flows")


def stage_key(settings: Any, upstream: dict[str, str]) -> str:
    """Hash of a stage's settings and its inputs' content hashes."""
    doc = json.dumps({"settings": settings, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()


def stage_record(out_dir: Path) -> dict | None:
    path = Path(out_dir) / STAGE_RECORD
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def stage_hash(out_dir: Path) -> str:
    """The content hash a finished stage recorded (what downstream keys are built from)."""
    record = stage_record(out_dir)
    if record is None:
        raise RuntimeError(f"{out_dir}: stage has not finished")
    return record["content_sha256"]


def stage_is_current(out_dir: Path, settings: Any, upstream: dict[str, Path]) -> bool:
    """Whether ``out_dir`` holds a finished stage built from exactly these inputs."""
    record = stage_record(Path(out_dir))
    return record is not None and record.get("key") == stage_key(
        settings, {k: stage_hash(v) for k, v in sorted(upstream.items())}
    )


def clear_stale_stage(out_dir: Path) -> None:
    """Remove a stage folder finished from other inputs (keep an unfinished one: it may resume)."""
    if stage_record(Path(out_dir)) is not None:
        shutil.rmtree(out_dir, ignore_errors=True)


def run_stage(
    name: str,
    out_dir: Path,
    settings: Any,
    upstream: dict[str, Path],
    build: Callable[[Path], Any],
    logger: logging.Logger | None = None,
    headline: Callable[[Path], str | None] | None = None,
) -> tuple[Path, bool]:
    """Run ``build(out_dir)`` unless ``out_dir`` already holds its result for these inputs.

    The stage runs inside :func:`aerosynth.flows.progress.stage`: under a command, its start and end
    (with ``headline``) become its terminal line and what it writes to stdout and stderr goes to
    ``WORK/logs/<name>.log``.

    Args:
        name: stage name for the log.
        out_dir: the stage's folder.
        settings: JSON-able settings of the stage.
        upstream: the finished stage folders it reads (their recorded hashes join the key).
        build: writes the stage's outputs into ``out_dir`` (it may resume from what is there).
        logger: where to say ``cached``/``done``.
        headline: the stage's headline figure read from its finished folder (``AP50 0.336``), for its
            terminal line; also asked of a stage finished earlier. Any error reading it leaves the line without.

    Returns:
        ``(out_dir, ran)``; ``ran`` is False when the stage was skipped.
    """
    with progress.stage(name) as running:
        result = _run_stage(name, Path(out_dir), settings, upstream, build, logger or log)
        running.cached = not result[1]
        if headline is not None:
            try:
                progress.set_headline(headline(result[0]))
            except Exception as exc:  # a figure for the terminal line, never a failure
                (logger or log).debug("stage %s: no headline (%s)", name, exc)
    return result


def _run_stage(
    name: str,
    out_dir: Path,
    settings: Any,
    upstream: dict[str, Path],
    build: Callable[[Path], Any],
    logger: logging.Logger,
) -> tuple[Path, bool]:
    key = stage_key(settings, {k: stage_hash(v) for k, v in sorted(upstream.items())})
    record = stage_record(out_dir)
    if record is not None and record.get("key") == key:
        logger.info("stage %s: finished earlier, skipped (%s)", name, out_dir)
        return out_dir, False
    if record is not None:  # built from other inputs: start clean
        logger.info("stage %s: inputs changed, rebuilding", name)
        shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    if remove_partial_files(out_dir):
        logger.info("stage %s: removed partial files of an interrupted run; resuming", name)
    logger.info("stage %s: running", name)
    t0 = time.perf_counter()
    with PeakMemory() as peak:
        build(out_dir)
    seconds = time.perf_counter() - t0
    atomic_write_json(
        out_dir / STAGE_RECORD,
        {
            "stage": name,
            "key": key,
            "content_sha256": tree_sha256(out_dir, exclude=(STAGE_RECORD,)),
            "seconds": round(seconds, 2),
            "peak_rss_mb": round(peak.mb, 1),
        },
    )
    logger.info("stage %s: done in %.1f s (peak memory %.0f MB)", name, seconds, peak.mb)
    return out_dir, True


class PeakMemory:
    """Peak resident memory of this process (and its children) while a block runs, sampled every 0.2 s."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        import psutil

        proc = psutil.Process()
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakMemory:
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mb(self) -> float:
        return self.peak / 2**20
