"""Where an adapted run keeps its model and tiles: what the ``request`` flow reads before synthesising.

:func:`resolve_model` finds the latent diffusion model of an adapted run folder (``WORK/ldm/stageC/model``,
else stage B, else A) or takes a model folder (inside a run or not), reading only JSON;
:func:`resolve_domain` maps ``source``/``target`` to the run's domain names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aerosynth.data.errors import InputError
from aerosynth.data.json_input import read_json_object

MODEL_STAGES = ("stageC", "stageB", "stageA")
DEFAULT_TILE_GSD, DEFAULT_TILE_SIZE = 0.125, 128


@dataclass
class ModelSource:
    """Where a request's model comes from.

    Attributes:
        model_dir: the model folder (``ldm.json``, weights).
        stage: ``stageC``/``stageB``/``stageA`` when taken from a run, else ``None``.
        run_dir: the adapted run folder (``WORK``), when known.
        run_domains: ``{"source": ..., "target": ...}`` of the run's tiles, when known.
        domains: domains the model knows (background tokens).
        image_size: side of the images it makes.
        tile_gsd: metres per pixel of the run's tiles (before resizing to ``image_size``).
        tile_size: side of the run's tiles in pixels.
    """

    model_dir: Path
    stage: str | None
    run_dir: Path | None
    run_domains: dict[str, str]
    domains: list[str]
    image_size: int
    tile_gsd: float = DEFAULT_TILE_GSD
    tile_size: int = DEFAULT_TILE_SIZE


def _run_tiles(run_dir: Path) -> tuple[dict[str, str], float, int]:
    """Domains, tile GSD and tile size of a run's ``tiles/manifest.json`` (defaults when absent)."""
    path = run_dir / "tiles" / "manifest.json"
    if not path.is_file():
        return {}, DEFAULT_TILE_GSD, DEFAULT_TILE_SIZE
    doc = read_json_object(path)
    splits = doc.get("splits") or {}
    domains = {
        role: splits[split]["domain"]
        for role, split in (("source", "source-train"), ("target", "target-train"))
        if isinstance(splits.get(split), dict) and "domain" in splits[split]
    }
    gsd = float(doc.get("target_gsd") or DEFAULT_TILE_GSD)
    size = int(doc.get("tile_size") or DEFAULT_TILE_SIZE)
    return domains, gsd, size


def resolve_model(source: str | Path) -> ModelSource:
    """Find the model of an adapted run folder (``ldm/stageC/model``, else stage B, else A) or a model folder.

    Reads only JSON (no weights are loaded).

    Raises:
        InputError: neither a run folder with a trained model nor a model folder.
    """
    source = Path(source)
    if not source.exists():
        raise InputError(source, "not found (give an adapted run folder or a model folder)")
    run_dir: Path | None = None
    stage: str | None = None
    if (source / "ldm.json").is_file():
        model_dir = source
        # a model inside a run: WORK/ldm/stageX/model
        parents = source.resolve().parents
        if len(parents) >= 3 and parents[1].name == "ldm" and parents[0].name in MODEL_STAGES:
            run_dir, stage = parents[2], parents[0].name
    elif (source / "ldm").is_dir():
        found = [s for s in MODEL_STAGES if (source / "ldm" / s / "model" / "ldm.json").is_file()]
        if not found:
            looked = ", ".join(f"{s}/model" for s in MODEL_STAGES)
            raise InputError(source / "ldm", f"no trained model (looked for {looked})")
        run_dir, stage = source, found[0]
        model_dir = source / "ldm" / stage / "model"
    else:
        raise InputError(source, "neither an adapted run folder (no ldm/) nor a model folder (no ldm.json)")
    spec = read_json_object(model_dir / "ldm.json").get("spec")
    if not isinstance(spec, dict) or "domains" not in spec or "image_size" not in spec:
        raise InputError(model_dir / "ldm.json", "malformed model description (no spec.domains / spec.image_size)")
    run_domains, tile_gsd, tile_size = (
        _run_tiles(run_dir) if run_dir is not None else ({}, DEFAULT_TILE_GSD, DEFAULT_TILE_SIZE)
    )
    return ModelSource(
        model_dir, stage, run_dir, run_domains, sorted(spec["domains"]), int(spec["image_size"]), tile_gsd, tile_size
    )


def resolve_domain(model: ModelSource, domain: str) -> str:
    """The domain name to generate: one the model knows; ``source``/``target`` name the run's domains.

    Raises:
        InputError: a domain the model does not know (the message lists those it knows).
    """
    if domain in model.domains:
        return domain
    if domain in model.run_domains and model.run_domains[domain] in model.domains:
        return model.run_domains[domain]
    aliases = f" (or {', '.join(sorted(model.run_domains))})" if model.run_domains else ""
    raise InputError(
        "domain", f"unknown domain {domain!r}: the model at {model.model_dir} knows {', '.join(model.domains)}{aliases}"
    )
