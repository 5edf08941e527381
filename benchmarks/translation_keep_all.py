"""Extra aerial-v1 measurement: source-guided translation keeping every source box (keep_threshold 0).

Run after ``benchmarks/run_aerial_v1.py`` (it reuses that run's stage-C model and tiles); same
detector budget as cpu-bench (8 epochs x 800 images, seed 0). Writes
``benchmarks/results/aerial-v1-independent/aerial-v1-translation-keep-all.json``.

    python benchmarks/translation_keep_all.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "aerial-v1-cpu"


def main() -> None:
    from aerosynth.data.offline import apply_offline_settings

    apply_offline_settings()
    from aerosynth.data.tileset import open_evaluation_split
    from aerosynth.detection.augment import AugmentConfig
    from aerosynth.detection.datasets import DatasetSpec
    from aerosynth.detection.evaluation import evaluate_split
    from aerosynth.detection.prediction import predict
    from aerosynth.detection.training import DetectorTrainConfig, train_detector
    from aerosynth.generation.sampling import TranslationConfig, translate_split

    out = WORK / "extra-translation-keep-all"
    t0 = time.time()
    cfg = TranslationConfig(
        steps=10,
        guidance_scale=4.0,
        batch_size=16,
        shard_size=64,
        use_learned_tokens=True,
        gsd=0.125,
        progress=False,
        strength=0.5,
        keep_threshold=0.0,
        max_tiles=512,
    )
    tiles = WORK / "tiles"
    s = translate_split(
        WORK / "ldm/stageC/model",
        tiles / "source-train",
        out / "translation",
        "kit_munich_aerial",
        base_seed=0,
        config=cfg,
    )
    t1 = time.time()
    dcfg = DetectorTrainConfig(
        model="yolov8n.yaml", epochs=8, imgsz=128, batch=32, seed=0, patience=4, augment=AugmentConfig(), mix_total=800
    )
    weights = train_detector(
        dcfg,
        [DatasetSpec(s, name="translation", fraction=1.0)],
        DatasetSpec(tiles / "source-val", name="val"),
        out / "det",
    )
    test = open_evaluation_split(tiles, "target-test")
    r = evaluate_split(test, predict(weights, [test.image_path(t.tile_id) for t in test], conf=0.001, imgsz=128))
    doc = {
        "variant": "translation, keep_threshold 0 (all source boxes kept)",
        "seed": 0,
        "ap50": r.ap50,
        "ap50_95": r.ap50_95,
        "precision": r.precision,
        "recall": r.recall,
        "translation_s": round(t1 - t0, 1),
        "detector_s": round(time.time() - t1, 1),
    }
    result = HERE / "results" / "aerial-v1-independent" / "aerial-v1-translation-keep-all.json"
    result.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
