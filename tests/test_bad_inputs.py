"""Hostile input across the data, config, CLI and request layers.

Each case: exit status 2, one error line naming the file or field, and no output folder
(not even a half-written temporary one) left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from aerosynth.flows.cli import main

FIXTURES = Path(__file__).parent / "data"
T = Affine(0.25, 0, 690_000.0, 0, -0.25, 5_336_000.0)


def _yolo(tmp: Path) -> Path:
    dst = tmp / "src"
    shutil.copytree(FIXTURES / "yolo_domain", dst)
    return dst


def _geo(tmp: Path) -> Path:
    dst = tmp / "tgt"
    shutil.copytree(FIXTURES / "geotiff_domain", dst)
    return dst


def _prepare(tmp: Path, src: Path, tgt: Path, *extra: str) -> list[str]:
    return [
        "data",
        "prepare",
        "--source",
        str(src),
        "--target",
        str(tgt),
        "--source-gsd",
        "0.125",
        "--test-groups",
        "scene_1",
        "--out",
        str(tmp / "out"),
        *extra,
    ]


def _png_header(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))


# Each case builds its broken input under tmp and returns (CLI args, text the error must contain).
Case = Callable[[Path], tuple[list[str], str]]


def corrupt_png(tmp):
    src = _yolo(tmp)
    (src / "images" / "a_0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return _prepare(tmp, src, FIXTURES / "geotiff_domain"), "a_0.png"


def truncated_png(tmp):
    src = _yolo(tmp)
    p = src / "images" / "a_1.png"
    p.write_bytes(p.read_bytes()[:300])
    return _prepare(tmp, src, FIXTURES / "geotiff_domain"), "a_1.png"


def truncated_jpeg(tmp):
    import cv2

    src = _yolo(tmp)
    img = cv2.imread(str(src / "images" / "b_0.png"))
    (src / "images" / "b_0.png").unlink()
    ok, buf = cv2.imencode(".jpg", img)
    (src / "images" / "b_0.jpg").write_bytes(buf.tobytes()[: len(buf) // 2])
    return _prepare(tmp, src, FIXTURES / "geotiff_domain"), "b_0.jpg"


def png_bomb(tmp):
    src = _yolo(tmp)
    (src / "images" / "a_0.png").write_bytes(_png_header(100_000, 100_000) + b"\0" * 64)
    return _prepare(tmp, src, FIXTURES / "geotiff_domain"), "a_0.png"


def corrupt_geotiff(tmp):
    tgt = _geo(tmp)
    (tgt / "scene_0.tif").write_bytes(b"II*\x00" + os.urandom(200))
    return _prepare(tmp, FIXTURES / "yolo_domain", tgt), "scene_0.tif"


def truncated_geotiff(tmp):
    tgt = _geo(tmp)
    p = tgt / "scene_0.tif"
    p.write_bytes(p.read_bytes()[:1000])
    return _prepare(tmp, FIXTURES / "yolo_domain", tgt), "scene_0.tif"


def geotiff_bomb(tmp):
    tgt = _geo(tmp)
    (tgt / "scene_0.tif").unlink()
    profile = {
        "driver": "GTiff",
        "width": 100_000,
        "height": 100_000,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32632",
        "transform": T,
        "tiled": True,
        "sparse_ok": True,
    }
    with rasterio.open(tgt / "scene_0.tif", "w", **profile):
        pass
    return _prepare(tmp, FIXTURES / "yolo_domain", tgt), "scene_0.tif"


def single_band_16bit_without_bands(tmp):
    tgt = _geo(tmp)
    shutil.copy(FIXTURES / "rasters" / "single_band_16bit.tif", tgt / "scene_0.tif")
    return _prepare(tmp, FIXTURES / "yolo_domain", tgt), "1 band"


def four_band_without_bands(tmp):
    tgt = _geo(tmp)
    shutil.copy(FIXTURES / "rasters" / "four_band.tif", tgt / "scene_0.tif")
    return _prepare(tmp, FIXTURES / "yolo_domain", tgt), "4 band"


def band_index_out_of_range(tmp):
    return _prepare(tmp, FIXTURES / "yolo_domain", FIXTURES / "geotiff_domain", "--bands", "5,6,7"), "band 5"


def missing_crs(tmp):
    tgt = _geo(tmp)
    shutil.copy(FIXTURES / "rasters" / "no_crs.tif", tgt / "scene_0.tif")
    return _prepare(tmp, FIXTURES / "yolo_domain", tgt), "no CRS"


def wrong_crs_labels(tmp):
    tgt = _geo(tmp)
    g = tgt / "scene_0.geojson"
    g.write_text(g.read_text().replace("EPSG::32632", "EPSG::3857"))
    return _prepare(tmp, FIXTURES / "yolo_domain", tgt), "scene_0.geojson"


def zero_byte_geojson(tmp):
    tgt = _geo(tmp)
    (tgt / "scene_0.geojson").write_bytes(b"")
    return _prepare(tmp, FIXTURES / "yolo_domain", tgt), "scene_0.geojson"


def geojson_not_a_collection(tmp):
    tgt = _geo(tmp)
    (tgt / "scene_0.geojson").write_text('{"type": "Point", "coordinates": [0, 0]}')
    return _prepare(tmp, FIXTURES / "yolo_domain", tgt), "FeatureCollection"


def nan_geojson_coordinates(tmp):
    tgt = _geo(tmp)
    doc = json.loads((tgt / "scene_0.geojson").read_text())
    doc["features"][0]["geometry"]["coordinates"][0][1] = [float("nan"), 5.0]
    (tgt / "scene_0.geojson").write_text(json.dumps(doc))
    return _prepare(tmp, FIXTURES / "yolo_domain", tgt), "non-finite"


def nan_yolo_box(tmp):
    src = _yolo(tmp)
    (src / "labels" / "b_0.txt").write_text("0 nan 0.5 0.1 0.1\n")
    return _prepare(tmp, src, FIXTURES / "geotiff_domain"), "b_0.txt:1"


def negative_yolo_size(tmp):
    src = _yolo(tmp)
    (src / "labels" / "b_0.txt").write_text("0 0.5 0.5 -0.1 0.1\n")
    return _prepare(tmp, src, FIXTURES / "geotiff_domain"), "b_0.txt:1"


def binary_label_file(tmp):
    src = _yolo(tmp)
    (src / "labels" / "b_0.txt").write_bytes(b"\xff\xfe\x00\x81garbage")
    return _prepare(tmp, src, FIXTURES / "geotiff_domain"), "b_0.txt"


def inverted_coco_box(tmp):
    dst = tmp / "coco"
    shutil.copytree(FIXTURES / "coco_domain", dst)
    doc = json.loads((dst / "annotations.json").read_text())
    doc["annotations"][0]["bbox"] = [40, 30, -20, 10]
    (dst / "annotations.json").write_text(json.dumps(doc))
    return _prepare(tmp, dst / "annotations.json", FIXTURES / "geotiff_domain"), "inverted"


def zero_byte_coco(tmp):
    (tmp / "empty.json").write_bytes(b"")
    return _prepare(tmp, tmp / "empty.json", FIXTURES / "geotiff_domain"), "empty.json"


def coco_missing_image(tmp):
    dst = tmp / "coco"
    shutil.copytree(FIXTURES / "coco_domain", dst)
    (dst / "a_0.png").unlink()
    return _prepare(tmp, dst / "annotations.json", FIXTURES / "geotiff_domain"), "a_0.png"


def label_without_image(tmp):
    src = _yolo(tmp)
    (src / "labels" / "zz.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    return _prepare(tmp, src, FIXTURES / "geotiff_domain"), "zz.txt"


def empty_domain(tmp):
    (tmp / "empty" / "images").mkdir(parents=True)
    return _prepare(tmp, tmp / "empty", FIXTURES / "geotiff_domain"), "empty domain"


def missing_source_folder(tmp):
    return _prepare(tmp, tmp / "nowhere", FIXTURES / "geotiff_domain"), "nowhere"


def unknown_group(tmp):
    return _prepare(tmp, FIXTURES / "yolo_domain", FIXTURES / "geotiff_domain", "--val-groups", "clipZ"), "clipZ"


def tile_larger_than_image(tmp):
    return _prepare(tmp, FIXTURES / "yolo_domain", FIXTURES / "geotiff_domain", "--tile-size", "2048"), "larger than"


def unknown_preset(tmp):
    return ["data", "prepare", "--preset", "nope", "--out", str(tmp / "out")], "--preset"


def _adapt(tmp: Path, text: str) -> list[str]:
    (tmp / "config.yaml").write_text(text)
    return ["adapt", "--config", str(tmp / "config.yaml"), "--work-dir", str(tmp / "out")]


def unknown_config_key(tmp):
    return _adapt(tmp, "preset: demo\ndetection:\n  epochz: 3\n"), "config.detection.epochz: unknown key"


def config_wrong_type(tmp):
    return _adapt(tmp, "preset: demo\ndetection:\n  epochs: many\n"), "config.detection.epochs"


def config_out_of_range(tmp):
    return _adapt(
        tmp, "preset: demo\ngeneration:\n  translation:\n    strength: 1.5\n"
    ), "config.generation.translation.strength"


def config_finetune_without_budget(tmp):
    # null would make each variant's budget its dataset's size: the paired design needs one budget
    return _adapt(tmp, "preset: demo\ndetection:\n  finetune:\n    images: null\n"), "config.detection.finetune.images"


def config_not_a_mapping(tmp):
    return _adapt(tmp, "- just\n- a list\n"), "mapping"


def config_bad_yaml(tmp):
    return _adapt(tmp, "preset: demo\n  bad: [indent\n"), "YAML"


def config_unknown_preset(tmp):
    return _adapt(tmp, "preset: turbo\n"), "unknown preset"


def config_missing_file(tmp):
    return ["adapt", "--config", str(tmp / "missing.yaml")], "missing.yaml"


def config_recommend_typo(tmp):
    return _adapt(tmp, "preset: demo\ndetection:\n  recommend: [real-self-training+source, bogus]\n"), (
        "config.detection.recommend[1]: 'bogus' is not a variant any run can build"
    )


def config_recommend_near_miss(tmp):
    return _adapt(tmp, "preset: demo\ndetection:\n  recommend: [real-heatmap-r3+sources]\n"), (
        "'real-heatmap-r3+sources' is not a variant any run can build (did you mean 'real-heatmap-r3+source'?"
    )


def config_empty_classes(tmp):
    return _adapt(tmp, "preset: demo\ndata:\n  classes: []\n"), "config.data.classes: List should have at least 1 item"


def config_mix_of_unknown_sets(tmp):
    return _adapt(tmp, "preset: demo\ndetection:\n  mixes: [[nope, alsonope]]\n"), (
        "config.detection.mixes[0]: 'nope': no method builds a set so named; the sets this config builds: "
        "real-self-training"
    )


def config_mix_of_a_set_not_enabled(tmp):
    return _adapt(tmp, "preset: demo\ndetection:\n  mixes: [{real-self-training: 0.4, copy-paste: 0.2}]\n"), (
        "config.detection.mixes[0]: 'copy-paste': this config does not build it "
        "(needs annotation.copy_paste.enabled); the sets this config builds: real-self-training"
    )


def unknown_runner(tmp):
    return ["adapt", "--preset", "demo", "--runner", "spark", "--work-dir", str(tmp / "out")], "--runner"


def unknown_until_step(tmp):
    return ["adapt", "--preset", "demo", "--until", "detectors", "--work-dir", str(tmp / "out")], "--until"


def _map_quality(tmp: Path, *extra: str) -> list[str]:
    from aerosynth.annotation.fake_data import write_fake_root

    tiles = write_fake_root(tmp / "tiles", count=4, size=64)
    (tmp / "model").mkdir()
    (tmp / "model" / "notes.txt").write_text("not an LDM")
    return ["map-quality", "--model", str(tmp / "model"), "--tiles", str(tiles), "--out", str(tmp / "q.json"), *extra]


def map_quality_unknown_split(tmp):
    return _map_quality(tmp, "--split", "target-val"), "target-val"


def map_quality_not_a_model(tmp):
    return _map_quality(tmp, "--split", "target-test"), "not a model folder"


def map_quality_bad_noise(tmp):
    return _map_quality(tmp, "--noise", "0.1,1.5"), "--noise"


def read_only_output(tmp):
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    args = _prepare(tmp, FIXTURES / "yolo_domain", FIXTURES / "geotiff_domain")
    args[-1] = str(ro / "out")
    return args, "ro"


def _notes(tmp: Path, name: str = "notes.txt") -> Path:
    path = tmp / name
    path.write_text("not a model, just notes\n")
    return path


def _detect(tmp: Path, model: Path) -> list[str]:
    raster = FIXTURES / "geotiff_domain" / "scene_0.tif"
    return ["detect", str(raster), "--model", str(model), "--out", str(tmp / "cars.geojson")]


def detect_with_text_file_as_model(tmp):
    return _detect(tmp, _notes(tmp)), "notes.txt: not a detector"


def detect_with_torch_file_without_detector(tmp):
    import torch

    torch.save({"weights": torch.zeros(4)}, tmp / "weights.pt")
    return _detect(tmp, tmp / "weights.pt"), "weights.pt: not a detector"


def detect_with_folder_as_model(tmp):
    (tmp / "model").mkdir()
    return _detect(tmp, tmp / "model"), "not a detector"


def evaluate_with_text_file_as_model(tmp):
    return ["evaluate", "--model", str(_notes(tmp)), "--tiles", str(tmp / "tiles")], "notes.txt: not a detector"


def _train(tmp: Path, model: str) -> list[str]:
    src = FIXTURES / "yolo_domain"
    return ["train", "--data", str(src), "--val", str(src), "--model", model, "--out", str(tmp / "out")]


def train_from_text_file_as_pt(tmp):
    return _train(tmp, str(_notes(tmp, "start.pt"))), "start.pt: not a detector"


def train_from_unknown_model_yaml(tmp):
    return _train(tmp, "nosuchnet.yaml"), "model=nosuchnet.yaml"


def request_with_text_file_as_detector(tmp):
    args = ["request", "--run", str(tmp / "run"), "--domain", "target", "--count", "2", "--name", "cars"]
    return [*args, "--out", str(tmp / "exports"), "--detector", str(_notes(tmp, "det.pt"))], "det.pt: not a detector"


def retrain_with_text_file_as_baseline(tmp):
    args = ["retrain", "--registry", str(tmp / "registry"), "--watch", str(tmp / "incoming")]
    return [*args, "--baseline", str(_notes(tmp, "base.pt"))], "base.pt: not a detector"


def _generate(tmp: Path, model: Path) -> list[str]:
    args = ["generate", "--model", str(model), "--out", str(tmp / "set"), "--set", "target_cars"]
    return [*args, "--domain", "arid_carpark", "--count", "2"]


def generate_with_text_file_as_ldm(tmp):
    return _generate(tmp, _notes(tmp)), "notes.txt: not a model folder"


def generate_with_malformed_ldm_json(tmp):
    (tmp / "model").mkdir()
    (tmp / "model" / "ldm.json").write_text("{not json")
    return _generate(tmp, tmp / "model"), "ldm.json: malformed model description"


def generate_with_ldm_missing_weights(tmp):
    (tmp / "model").mkdir()
    (tmp / "model" / "ldm.json").write_text(json.dumps({"spec": {}, "format": 1}))
    return _generate(tmp, tmp / "model"), "unet.safetensors: weights file missing"


def map_quality_with_text_file_as_model(tmp):
    args = _map_quality(tmp)
    args[args.index("--model") + 1] = str(_notes(tmp))
    return args, "notes.txt: not a model folder"


CASES: list[Case] = [
    corrupt_png,
    truncated_png,
    truncated_jpeg,
    png_bomb,
    corrupt_geotiff,
    truncated_geotiff,
    geotiff_bomb,
    single_band_16bit_without_bands,
    four_band_without_bands,
    band_index_out_of_range,
    missing_crs,
    wrong_crs_labels,
    zero_byte_geojson,
    geojson_not_a_collection,
    nan_geojson_coordinates,
    nan_yolo_box,
    negative_yolo_size,
    binary_label_file,
    inverted_coco_box,
    zero_byte_coco,
    coco_missing_image,
    label_without_image,
    empty_domain,
    missing_source_folder,
    unknown_group,
    tile_larger_than_image,
    unknown_preset,
    unknown_config_key,
    config_wrong_type,
    config_out_of_range,
    config_finetune_without_budget,
    config_not_a_mapping,
    config_bad_yaml,
    config_unknown_preset,
    config_missing_file,
    config_recommend_typo,
    config_recommend_near_miss,
    config_empty_classes,
    config_mix_of_unknown_sets,
    config_mix_of_a_set_not_enabled,
    unknown_runner,
    unknown_until_step,
    map_quality_unknown_split,
    map_quality_not_a_model,
    map_quality_bad_noise,
    read_only_output,
    detect_with_text_file_as_model,
    detect_with_torch_file_without_detector,
    detect_with_folder_as_model,
    evaluate_with_text_file_as_model,
    train_from_text_file_as_pt,
    train_from_unknown_model_yaml,
    request_with_text_file_as_detector,
    retrain_with_text_file_as_baseline,
    generate_with_text_file_as_ldm,
    generate_with_malformed_ldm_json,
    generate_with_ldm_missing_weights,
    map_quality_with_text_file_as_model,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_hostile_input_fails_cleanly(case, tmp_path, capsys):
    if case is read_only_output and os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    args, expected = case(tmp_path)
    before = {p for p in tmp_path.rglob("*")}
    rc = main(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2, err
    assert len(lines) == 1 and expected in lines[0], err
    after = {p for p in tmp_path.rglob("*")}
    assert not [p for p in after - before if p.name != "config.yaml"], sorted(after - before)


def test_zero_byte_yolo_label_is_a_negative_tile(tmp_path):
    from aerosynth.data.domains import yolo_folder_domain

    src = _yolo(tmp_path)
    (src / "labels" / "b_0.txt").write_bytes(b"")
    dom = yolo_folder_domain(src, gsd=0.1)
    assert len(dom.load(next(i for i in dom.images if i.image_id == "b_0")).detections) == 0


def test_read_only_output_folder_as_user(tmp_path):
    """Root ignores permissions, so check the read-only case with a real unprivileged write attempt."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):
        # running as root: simulate by making the folder a file so that creating children fails
        ro.chmod(0o755)
        ro.rmdir()
        ro.write_text("not a folder")
    args = _prepare(tmp_path, FIXTURES / "yolo_domain", FIXTURES / "geotiff_domain")
    args[-1] = str(ro / "out")
    rc = main(args)
    assert rc == 2
    assert np.all([not p.name.startswith(".out") for p in tmp_path.rglob("*")])
