"""Run one training stage from a config file: the entry point for ``accelerate launch``.

Usage::

    python -m aerosynth.generation.train_cli --stage A --config stage.yaml \\
        --split tiles/source-train --split tiles/target-train --out runs/ldm/stageA
    accelerate launch --multi_gpu --num_processes 4 -m aerosynth.generation.train_cli --stage A --config stage.yaml ...
    torchrun --standalone --nproc_per_node 2 -m aerosynth.generation.train_cli ...  # DDP over gloo on CPU too

``stage.yaml`` (or ``.json``) is a mapping of :class:`aerosynth.generation.training.StageConfig` fields (plus
``kl_weight`` for stage 0), for example ``{steps: 2000, batch_size: 8, device: cuda,
mixed_precision: fp16, init_model: runs/ldm/stageA/model}``. See :mod:`aerosynth.generation.training` for
what a multi-process launch does. Exit status 2 on a bad input (the message names the field).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from aerosynth.data.errors import InputError

_PATH_FIELDS = {"init_model", "pretrained_dir", "autoencoder_dir"}


def load_stage_config(stage: str, path: str | Path | None, overrides: dict | None = None):
    """The stage's config dataclass from a YAML/JSON mapping (unknown fields are refused).

    Raises:
        InputError: unreadable file, not a mapping, unknown stage or field.
    """
    from aerosynth.generation import training

    classes = {
        "0": training.Stage0Config,
        "A": training.StageAConfig,
        "B": training.StageBConfig,
        "C": training.StageCConfig,
    }
    stage = str(stage).upper()
    if stage not in classes:
        raise InputError("--stage", f"unknown training stage {stage!r}; choose one of {list(classes)}")
    values: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text()
            if str(path).endswith(".json"):
                values = json.loads(text)
            else:
                import yaml

                values = yaml.safe_load(text) or {}
        except Exception as exc:  # OSError, ValueError, yaml.YAMLError
            raise InputError(path, f"unreadable stage config ({type(exc).__name__})") from None
        if not isinstance(values, dict):
            raise InputError(path, "a stage config is a mapping of StageConfig fields")
    values = {**values, **(overrides or {})}
    cls = classes[stage]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(path or "config", f"unknown field(s) {', '.join(unknown)} for {cls.__name__}")
    for name in _PATH_FIELDS & set(values):
        if values[name] is not None:
            values[name] = Path(values[name])
    return cls(**values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aerosynth.generation.train_cli", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--stage", required=True, help="0, A, B or C")
    parser.add_argument("--config", help="YAML/JSON mapping of StageConfig fields")
    parser.add_argument("--split", action="append", required=True, help="a tile split folder (repeat)")
    parser.add_argument("--out", required=True, help="the stage's output folder")
    parser.add_argument("--device", help="override the config's device (cpu, cuda, cuda:N, N)")
    parser.add_argument("--no-resume", action="store_true", help="start over instead of resuming")
    args = parser.parse_args(argv)
    from aerosynth.generation.device import world_size
    from aerosynth.generation.training import train_stage

    overrides = {"device": args.device} if args.device else {}
    try:
        config = load_stage_config(args.stage, args.config, overrides)
        if world_size() > 1:
            config.progress = False
        result = train_stage(args.stage, config, [Path(s) for s in args.split], Path(args.out), not args.no_resume)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
