"""Set synthesis and source-guided translation: format, determinism, shards, bad inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from aerosynth.data.detections import Detections
from aerosynth.data.errors import InputError
from aerosynth.data.imageio import read_rgb
from aerosynth.generation.models import load_ldm
from aerosynth.generation.sampling import (
    SamplingConfig,
    TranslationConfig,
    box_heat,
    generate_set,
    heatmaps,
    shard_done,
    translate_split,
)
from aerosynth.generation.training import StageAConfig, train_stage
from tests.test_generation_helpers import make_split

torch.set_num_threads(1)

FAST = SamplingConfig(steps=3, batch_size=2, shard_size=3, use_learned_tokens=True, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sampling")
    source = make_split(root, "source-train", "madison_drone", weak=False)
    target = make_split(root, "target-train", "kit_munich_aerial", seed=1)
    model = train_stage("A", StageAConfig(steps=3, batch_size=2, progress=False), [source, target], root / "A")
    return {"root": root, "source": source, "target": target, "model": model}


def _files(set_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(set_dir)): p.read_bytes() for p in sorted(set_dir.rglob("*")) if p.is_file()}


def test_set_format_and_same_seed_same_bytes(world, tmp_path):
    cfg = SamplingConfig(**{**FAST.__dict__, "save_raw_maps": True})
    a = generate_set(world["model"], tmp_path / "a", "target_cars", "kit_munich_aerial", 5, base_seed=7, config=cfg)
    b = generate_set(world["model"], tmp_path / "b", "target_cars", "kit_munich_aerial", 5, base_seed=7, config=cfg)
    assert _files(a) == _files(b)
    header = json.loads((a / "synthetic.json").read_text())
    assert header["set"] == "target_cars" and header["with_vehicles"] is True and header["count"] == 5
    assert header["heatmap_channels"] == ["cars", "V1", "255-background"] and header["base_seed"] == 7
    assert "[v1] cars in <bg-kit_munich_aerial>" in header["prompt"]
    assert sorted(os.listdir(a / "shards")) == ["000000-000002.json", "000003-000004.json"]
    for i in range(5):
        img, heat = read_rgb(a / "images" / f"{i:06d}.png"), read_rgb(a / "heatmaps" / f"{i:06d}.png")
        assert img.shape == heat.shape == (32, 32, 3)
        assert heat[..., 0].min() == 0 and heat[..., 0].max() == 255  # min-max normalised
        raw = np.load(a / "maps" / f"{i:06d}.npy")
        assert raw.shape == (3, 32, 32) and raw.dtype == np.float32
    # a stage-A model (tokens not trained) samples without learned tokens by default
    plain = SamplingConfig(steps=3, batch_size=2, progress=False)
    d = generate_set(world["model"], tmp_path / "d", "target_cars", "kit_munich_aerial", 1, config=plain)
    assert (
        json.loads((d / "synthetic.json").read_text())["prompt"]
        == "an aerial view image with cars in kit munich aerial"
    )
    assert read_rgb(d / "heatmaps" / "000000.png")[..., 1].max() == 0
    # image i depends on base_seed + i only: image 2 of seed 7 is image 0 of seed 9
    c = generate_set(world["model"], tmp_path / "c", "target_cars", "kit_munich_aerial", 1, base_seed=9, config=FAST)
    assert (c / "images/000000.png").read_bytes() == (a / "images/000002.png").read_bytes()


def test_empty_set_has_no_vehicle_channels(world, tmp_path):
    s = generate_set(world["model"], tmp_path / "e", "target_empty", "kit_munich_aerial", 2, config=FAST)
    header = json.loads((s / "synthetic.json").read_text())
    assert header["with_vehicles"] is False and "cars" not in header["prompt"]
    heat = read_rgb(s / "heatmaps" / "000000.png")
    assert heat[..., 0].max() == 0 and heat[..., 1].max() == 0 and heat[..., 2].min() == 0


def test_shard_resume_has_no_gap_and_no_duplicate(world, tmp_path):
    full = generate_set(world["model"], tmp_path / "full", "source_cars", "madison_drone", 7, config=FAST)
    part = tmp_path / "part"
    generate_set(world["model"], part, "source_cars", "madison_drone", 7, config=FAST, shards=[2])  # another process
    generate_set(world["model"], part, "source_cars", "madison_drone", 7, config=FAST, shards=[0])
    # an interrupted shard: images without a manifest, one of them damaged
    generate_set(world["model"], part, "source_cars", "madison_drone", 7, config=FAST, shards=[1])
    (part / "shards" / "000003-000005.json").unlink()
    (part / "images" / "000004.png").write_bytes(b"broken")
    stamp = (part / "images" / "000000.png").stat().st_mtime_ns
    generate_set(world["model"], part, "source_cars", "madison_drone", 7, config=FAST)
    assert (part / "images" / "000000.png").stat().st_mtime_ns == stamp  # finished shard skipped
    assert _files(part) == _files(full)
    assert sorted(os.listdir(part / "images")) == [f"{i:06d}.png" for i in range(7)]
    assert all(shard_done(part, a, b) for a, b in [(0, 3), (3, 6), (6, 7)])


def test_translation_keeps_labels_where_cars_survive(world, tmp_path):
    cfg = TranslationConfig(steps=4, batch_size=4, shard_size=8, strength=0.5, keep_threshold=0.0, progress=False)
    out = translate_split(world["model"], world["source"], tmp_path / "tr", "kit_munich_aerial", config=cfg)
    header = json.loads((out / "synthetic.json").read_text())
    assert header["set"] == "translation" and header["count"] == 8 and header["source_domain"] == "madison_drone"
    sources = json.loads((out / "sources.json").read_text())
    assert sources["000000"] == "t000"
    source_labels = (world["source"] / "labels" / "t000.txt").read_text()
    assert (out / "labels" / "000000.txt").read_text() == source_labels  # threshold 0 keeps every box
    strict = TranslationConfig(**{**cfg.__dict__, "keep_threshold": 1.01})
    out2 = translate_split(world["model"], world["source"], tmp_path / "tr2", "kit_munich_aerial", config=strict)
    assert all((out2 / "labels" / f"{i:06d}.txt").read_text() == "" for i in range(8))
    with pytest.raises(InputError, match="labelled source split"):
        translate_split(world["model"], world["target"], tmp_path / "tr3", "kit_munich_aerial", config=cfg)


def test_box_heat_and_heatmap_channels():
    heat = np.zeros((8, 8))
    heat[2:4, 2:4] = 1.0
    boxes = Detections(np.array([[2, 2, 4, 4], [5, 5, 8, 8]], dtype=float))
    assert box_heat(heat, boxes).tolist() == [1.0, 0.0]
    maps = torch.zeros(1, 3, 4, 4)
    maps[0, 0, 1, 1] = 2.0
    maps[0, 2] = 1.0
    maps[0, 2, 0, 0] = 3.0
    png, raw = heatmaps(maps, 8)
    assert png[0, ..., 0].max() == 255 and png[0, ..., 0].min() == 0
    assert png[0, ..., 1].max() == 0  # absent token
    assert png[0, 0, 0, 2] == 0 and png[0, 7, 7, 2] == 255  # 255 - background
    assert raw.shape == (1, 3, 8, 8)


def test_bad_inputs(world, tmp_path):
    ldm = load_ldm(world["model"])
    with pytest.raises(InputError, match="unknown domain"):
        generate_set(ldm, tmp_path / "x", "target_cars", "atlantis", 2, config=FAST)
    with pytest.raises(InputError, match="unknown set"):
        generate_set(ldm, tmp_path / "x", "target_trucks", "kit_munich_aerial", 2, config=FAST)
    bad_tokens = SamplingConfig(**{**FAST.__dict__, "capture_tokens": ("cars", "[v2]", "<bg-x>")})
    with pytest.raises(InputError, match="single token"):
        generate_set(ldm, tmp_path / "x", "target_cars", "kit_munich_aerial", 2, config=bad_tokens)
    odd = SamplingConfig(**{**FAST.__dict__, "image_size": 30})
    with pytest.raises(InputError, match="multiple of the autoencoder factor"):
        generate_set(ldm, tmp_path / "x", "target_cars", "kit_munich_aerial", 2, config=odd)
    with pytest.raises(InputError, match="unknown scheduler"):
        generate_set(
            ldm, tmp_path / "x", "target_cars", "kit_munich_aerial", 2, config=SamplingConfig(scheduler="magic")
        )
    generate_set(ldm, tmp_path / "y", "target_cars", "kit_munich_aerial", 2, config=FAST)
    with pytest.raises(InputError, match="different settings"):
        generate_set(ldm, tmp_path / "y", "target_cars", "kit_munich_aerial", 3, config=FAST)
    with pytest.raises(InputError, match="strength"):
        translate_split(ldm, world["source"], tmp_path / "z", "kit_munich_aerial", config=TranslationConfig(strength=0))


def test_guidance_rescale_pulls_the_guided_spread_back_and_is_recorded(world, tmp_path):
    from aerosynth.generation.sampling import rescale_guided

    gen = torch.Generator().manual_seed(0)
    cond = torch.randn(3, 4, 8, 8, generator=gen)
    guided = 3.0 * cond + torch.randn(3, 4, 8, 8, generator=gen)
    full = rescale_guided(guided, cond, 1.0)
    np.testing.assert_allclose(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), rtol=1e-5)
    assert torch.equal(rescale_guided(guided, cond, 0.0), guided)
    # per image: an image's rescaled prediction does not depend on the others in the batch
    assert torch.allclose(rescale_guided(guided[:1], cond[:1], 0.7), rescale_guided(guided, cond, 0.7)[:1])
    cfg = SamplingConfig(**{**FAST.__dict__, "guidance_scale": 4.0, "guidance_rescale": 0.7})
    a = generate_set(world["model"], tmp_path / "a", "target_cars", "kit_munich_aerial", 2, config=cfg)
    plain = generate_set(
        world["model"],
        tmp_path / "b",
        "target_cars",
        "kit_munich_aerial",
        2,
        config=SamplingConfig(**{**FAST.__dict__, "guidance_scale": 4.0}),
    )
    assert json.loads((a / "synthetic.json").read_text())["sampling"]["guidance_rescale"] == 0.7
    assert "guidance_rescale" not in json.loads((plain / "synthetic.json").read_text())["sampling"]
    assert (a / "images/000000.png").read_bytes() != (plain / "images/000000.png").read_bytes()
    with pytest.raises(InputError, match="guidance_rescale"):
        translate_split(
            world["model"],
            world["source"],
            tmp_path / "t",
            "kit_munich_aerial",
            config=TranslationConfig(guidance_rescale=-0.1),
        )
    with pytest.raises(InputError, match="guidance_rescale"):
        generate_set(
            world["model"],
            tmp_path / "c",
            "target_cars",
            "kit_munich_aerial",
            1,
            config=SamplingConfig(**{**FAST.__dict__, "guidance_rescale": 1.5}),
        )


def test_copy_paste_composites_harmonised_by_the_ldm_keep_the_pasted_boxes(world, tmp_path):
    from aerosynth.annotation.copy_paste import CopyPasteConfig, copy_paste_set
    from aerosynth.data.tileset import open_split

    composites = copy_paste_set(world["source"], world["target"], tmp_path / "cp", CopyPasteConfig(seed=1))
    split = open_split(composites)  # the composites are a labelled split of the target domain
    assert split.info.domain == "kit_munich_aerial" and not split.info.weak
    ids = sorted(t.tile_id for t in split.tiles)
    for tile_id in ids:
        yolo = Detections.from_yolo((composites / "labels" / f"{tile_id}.txt").read_text(), 32, 32)
        assert np.allclose(split.labels(tile_id).xyxy, yolo.xyxy, atol=1e-3)
    cfg = TranslationConfig(steps=4, batch_size=4, shard_size=8, strength=0.25, keep_threshold=0.0, progress=False)
    out = translate_split(world["model"], composites, tmp_path / "h", "kit_munich_aerial", config=cfg)
    sources = json.loads((out / "sources.json").read_text())
    assert sorted(sources.values()) == ids
    for name, tile_id in sources.items():
        assert (out / "labels" / f"{name}.txt").read_text() == (composites / "labels" / f"{tile_id}.txt").read_text()
        assert not np.array_equal(read_rgb(out / "images" / f"{name}.png"), split.image(tile_id))  # redrawn
    # blended: the harmonised pixels around the pasted boxes, the real composite everywhere else
    from aerosynth.annotation.copy_paste import blend_set, box_mask
    from aerosynth.annotation.synthetic_set import SyntheticSet

    blended = blend_set(composites, out, tmp_path / "b", margin=1.0, feather=0.0)
    assert len(SyntheticSet(blended)) == len(ids)
    assert json.loads((blended / "synthetic.json").read_text())["blend"]["margin_px"] == 1.0
    for name, tile_id in sources.items():
        labels = (blended / "labels" / f"{name}.txt").read_text()
        assert labels == (out / "labels" / f"{name}.txt").read_text()
        mask = box_mask((32, 32), Detections.from_yolo(labels, 32, 32), margin=1.0, feather=0.0) > 0
        assert mask.any() and not mask.all()
        image = read_rgb(blended / "images" / f"{name}.png")
        assert np.array_equal(image[~mask], split.image(tile_id)[~mask])  # real background kept
        assert np.array_equal(image[mask], read_rgb(out / "images" / f"{name}.png")[mask])  # harmonised cars
    soft = box_mask((32, 32), Detections(np.array([[8.0, 8.0, 20.0, 20.0]])), margin=2.0, feather=1.5)
    assert soft[14, 14] == pytest.approx(1.0, abs=1e-3) and soft[0, 31] == 0.0 and 0 < soft[6, 14] < 1
    with pytest.raises(InputError, match="not a synthetic set"):
        blend_set(composites, composites, tmp_path / "x")
