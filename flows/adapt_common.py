"""Helpers shared by the adapt flow's steps: logger, config paths, stage keys, split names, progress."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prefect import get_run_logger

SOURCE_ONLY, ORACLE, CONTINUED = "source-only", "oracle", "continued"
#: The capped oracle: true boxes on one fine-tune's budget, as every variant gets (the full one is ``oracle``).
ORACLE_PAIRED = "oracle-paired"


def _logger() -> logging.Logger:
    try:
        return get_run_logger()  # type: ignore[return-value]
    except Exception:
        return logging.getLogger("aerosynth.flows")


def _repo_relative(path: Path | None) -> Path | None:
    """Relative paths in a config are read from the current folder, then from the repo's; made absolute."""
    if path is None or path.is_absolute():
        return path
    if path.exists():
        return path.resolve()
    candidate = Path(__file__).resolve().parents[1] / path
    return candidate.resolve() if candidate.exists() else path


def _key_path(path: Path | None, work: Path) -> str:
    """A path as a stage key names it: relative to the work folder when inside it, so a moved run stays current."""
    if path is None:
        return "None"
    try:
        return "work:" + Path(path).resolve().relative_to(Path(work).resolve()).as_posix()
    except ValueError:
        return str(path)


def _step_logger(name: str, total: int):
    """An ``on_step`` callback that logs progress (step, loss, s/step, ETA) about 20 times per stage."""
    import time

    every = max(1, total // 20)
    start = time.perf_counter()
    first: list[int] = []
    artifact: list = []  # the Prefect progress artifact of this stage, made at the first report

    def on_step(step: int, losses: dict) -> None:
        if not first:
            first.append(step)
        if step % every and step != total:
            return
        done = step - first[0] + 1
        rate = (time.perf_counter() - start) / max(done, 1)
        loss = losses.get("loss")
        _logger().info(
            "%s: step %d/%d  loss %s  %.2f s/step  ETA %.0f s",
            name,
            step,
            total,
            f"{loss:.4f}" if isinstance(loss, float) else loss,
            rate,
            rate * (total - step),
        )
        _progress_artifact(artifact, name, step / max(total, 1))

    return on_step


def _progress_artifact(holder: list, name: str, fraction: float) -> None:
    """Create or update a Prefect progress artifact (percent) for a long stage; silent outside a flow run."""
    try:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        if not holder:
            key = "progress-" + "".join(c if c.isalnum() else "-" for c in name.lower())
            holder.append(create_progress_artifact(0.0, key=key, description=f"aerosynth {name}"))
        update_progress_artifact(holder[0], round(100 * fraction, 1))
    except Exception:  # no flow run context (plain function calls, tests)
        pass


def split_domains(tiles: Path) -> tuple[str, str]:
    manifest = json.loads((tiles / "manifest.json").read_text())
    return manifest["splits"]["source-train"]["domain"], manifest["splits"]["target-train"]["domain"]


def _val_split(tiles: Path) -> Path:
    """Early stopping on real source-val when there is one, else on source-train (never on target labels)."""
    return tiles / "source-val" if (tiles / "source-val" / "tiles.json").is_file() else tiles / "source-train"
