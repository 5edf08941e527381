"""Vehicle classes are chosen, not assumed (``--classes``); label files with a BOM and CRLF are read.

Every fixture is written here: 256 px PNGs at 0.125 m/px (so no resampling, four 128 px cover tiles
each), YOLO txt, a ``data.yaml`` and a COCO json. A box centred at (0.25, 0.25) lies in tile (0, 0),
one at (0.75, 0.75) in tile (128, 128).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from aerosynth.data.classes import choose_classes, parse_classes, read_yolo_names
from aerosynth.data.demo import demo_spec, write_demo_data
from aerosynth.data.detections import Detections
from aerosynth.data.domains import coco_domain, open_domain, read_yolo_labels, yolo_folder_domain
from aerosynth.data.errors import InputError
from aerosynth.data.imageio import write_png
from aerosynth.data.prepare import custom_spec, prepare_dataset
from aerosynth.data.presets import aerial_v1
from aerosynth.data.tileset import open_evaluation_split, open_split
from aerosynth.flows.cli import main

SIZE = 256
GSD = "0.125"
TOP_LEFT = "{c} 0.25 0.25 0.1 0.1"  # tile 0_0
BOTTOM_RIGHT = "{c} 0.75 0.75 0.1 0.1"  # tile 128_128
TOP_RIGHT = "{c} 0.75 0.25 0.1 0.1"  # tile 128_0


def _png(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    write_png(path, rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


def _yolo(root: Path, labels: dict[str, str | bytes], names: dict | list | None = None) -> Path:
    """A YOLO folder: one image per label file (each its own group), optional data.yaml names."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i, (stem, text) in enumerate(labels.items()):
        _png(root / "images" / f"{stem}.png", i)
        data = text if isinstance(text, bytes) else text.encode()
        (root / "labels" / f"{stem}.txt").write_bytes(data)
    if names is not None:
        (root / "data.yaml").write_text(yaml.safe_dump({"train": "images", "val": "images", "names": names}))
    return root


def _rows(*rows: str) -> str:
    return "".join(r + "\n" for r in rows)


def _target(root: Path) -> Path:
    """A plain single-class target: t1 (test) and t2 (train)."""
    return _yolo(root, {"t1": _rows(TOP_LEFT.format(c=0)), "t2": _rows(BOTTOM_RIGHT.format(c=0))})


def _multi_class_source(root: Path, names=None) -> Path:
    """im0: car + truck; im1: car + plane (class 7, tile 128_128); im2: truck only."""
    return _yolo(
        root,
        {
            "im0": _rows(TOP_LEFT.format(c=0), TOP_RIGHT.format(c=1)),
            "im1": _rows(TOP_LEFT.format(c=0), BOTTOM_RIGHT.format(c=7)),
            "im2": _rows(TOP_RIGHT.format(c=1)),
        },
        names,
    )


def _prepare(tmp_path: Path, source: Path, target: Path, classes: str | None = None, out: str = "out") -> dict:
    src, tgt = open_domain(source, 0.125), open_domain(target, 0.125)
    if classes is not None:
        choose_classes([src, tgt], parse_classes(classes))
    return prepare_dataset(custom_spec(src, tgt, [], ["t1"]), tmp_path / out)


def _cli(tmp_path: Path, source: Path, target: Path, *extra: str, out: str = "cli-out") -> list[str]:
    return [
        "data",
        "prepare",
        "--source",
        str(source),
        "--target",
        str(target),
        "--source-gsd",
        GSD,
        "--target-gsd",
        GSD,
        "--test-groups",
        "t1",
        "--out",
        str(tmp_path / out),
        *extra,
    ]


def _source_boxes(out: Path) -> dict[str, list[int]]:
    """Tile id -> class ids of its boxes in source-train (tiles with boxes only)."""
    split = open_split(out / "source-train")
    return {t.tile_id: split.labels(t.tile_id).class_id.tolist() for t in split if len(split.labels(t.tile_id))}


# ------------------------------------------------------------------ refused unless chosen
def test_class_7_without_classes_is_refused_naming_file_line_and_id(tmp_path):
    source = _multi_class_source(tmp_path / "src")
    (source / "labels" / "im0.txt").write_text(_rows(TOP_LEFT.format(c=0)))  # im0 and im2: class 0 only
    (source / "labels" / "im2.txt").write_text(_rows(TOP_RIGHT.format(c=0)))
    with pytest.raises(InputError) as err:
        _prepare(tmp_path, source, _target(tmp_path / "tgt"))
    msg = str(err.value)
    assert err.value.where == f"{source / 'labels' / 'im1.txt'}:2"
    assert "class id 7" in msg and "--classes" in msg
    assert not (tmp_path / "out").exists()


def test_a_second_vehicle_class_is_refused_too_until_chosen(tmp_path):
    """Class 1 (truck) is not assumed to be a vehicle either; the first file holding one is named."""
    source = _multi_class_source(tmp_path / "src")
    with pytest.raises(InputError, match=r"im0\.txt:2: class id 1 is not a vehicle class"):
        _prepare(tmp_path, source, _target(tmp_path / "tgt"))


def test_refused_before_any_tile_is_written(tmp_path, monkeypatch):
    """The class check runs with the other up-front checks, not after hours of tiling."""
    import aerosynth.data.prepare as prepare_mod

    source = _multi_class_source(tmp_path / "src")
    calls = []
    monkeypatch.setattr(prepare_mod, "build_split", lambda *a, **k: calls.append(a) or {})
    with pytest.raises(InputError, match="class id 1"):
        _prepare(tmp_path, source, _target(tmp_path / "tgt"))
    assert calls == []


def test_class_0_only_works_as_before(tmp_path):
    manifest = _prepare(tmp_path, _target(tmp_path / "src"), _target(tmp_path / "tgt"))
    s = manifest["splits"]["source-train"]
    assert s["boxes"] == 2 and s["dropped_boxes"] == 0 and s["vehicle_classes"] == [0]


def test_unchosen_class_in_target_is_refused(tmp_path):
    target = _target(tmp_path / "tgt")
    (target / "labels" / "t2.txt").write_text(_rows(BOTTOM_RIGHT.format(c=0), TOP_LEFT.format(c=3)))
    with pytest.raises(InputError, match=r"t2\.txt:2: class id 3"):
        _prepare(tmp_path, _target(tmp_path / "src"), target)


# ------------------------------------------------------------------ chosen by id or name
def test_classes_by_id_keep_chosen_and_drop_the_rest(tmp_path):
    manifest = _prepare(tmp_path, _multi_class_source(tmp_path / "src"), _target(tmp_path / "tgt"), "0,1")
    s = manifest["splits"]["source-train"]
    assert s["vehicle_classes"] == [0, 1]
    assert s["boxes"] == 4 and s["dropped_boxes"] == 1  # 2 cars + 2 trucks kept, the plane dropped
    boxes = _source_boxes(tmp_path / "out")
    assert boxes == {"im0_0_0": [0], "im0_128_0": [0], "im1_0_0": [0], "im2_128_0": [0]}  # one class: vehicle
    assert "im1_128_128" not in boxes  # the plane's tile is a negative
    assert manifest["splits"]["target-train"]["dropped_boxes"] == 0


def test_only_the_chosen_classes_are_vehicles(tmp_path):
    manifest = _prepare(tmp_path, _multi_class_source(tmp_path / "src"), _target(tmp_path / "tgt"), "1")
    s = manifest["splits"]["source-train"]
    # the cars are dropped too: only what --classes names is a vehicle
    assert s["boxes"] == 2 and s["dropped_boxes"] == 3
    assert set(_source_boxes(tmp_path / "out")) == {"im0_128_0", "im2_128_0"}


@pytest.mark.parametrize(
    "names", [["car", "truck", "bus", "x", "y", "z", "w", "plane"], {0: "car", 1: "truck", 7: "plane"}]
)
def test_classes_by_name_from_data_yaml(tmp_path, names):
    source, target = _multi_class_source(tmp_path / "src", names), _target(tmp_path / "tgt")
    by_name = _prepare(tmp_path, source, target, "car, Truck", out="by-name")
    by_id = _prepare(tmp_path, source, target, "0,1", out="by-id")
    assert by_name["splits"]["source-train"] == by_id["splits"]["source-train"]
    assert by_name["splits"]["source-train"]["dropped_boxes"] == 1
    # the names reach only the source; ids reach the target too (which has class 0 only either way)
    assert by_name["splits"]["target-train"]["vehicle_classes"] == [0]
    assert by_id["splits"]["target-train"]["vehicle_classes"] == [0, 1]


def test_unknown_class_name_is_an_error_naming_it(tmp_path):
    source, target = _multi_class_source(tmp_path / "src", {0: "car", 1: "truck", 7: "plane"}), _target(tmp_path / "t")
    with pytest.raises(InputError, match=r"'lorry' is not a class of any domain.*0=car, 1=truck, 7=plane"):
        _prepare(tmp_path, source, target, "car,lorry")
    coco = _coco(tmp_path / "coco", CATS, ANNS)
    with pytest.raises(InputError, match="'9' is not a class"):  # neither a data.yaml name nor a category
        _prepare(tmp_path, source, coco, "9")


def test_a_domain_the_names_do_not_reach_keeps_the_default(tmp_path):
    """Names resolve per domain: a target without data.yaml keeps class 0 only, others refused."""
    source = _multi_class_source(tmp_path / "src", {0: "car", 1: "truck", 7: "plane"})
    target = _target(tmp_path / "tgt")
    manifest = _prepare(tmp_path, source, target, "car,truck")
    assert manifest["splits"]["target-test"]["vehicle_classes"] == [0]
    (target / "labels" / "t2.txt").write_text(_rows(BOTTOM_RIGHT.format(c=1)))
    with pytest.raises(InputError, match=r"t2\.txt:1: class id 1"):
        _prepare(tmp_path, source, target, "car,truck", out="again")


def test_data_yaml_names_are_read_as_list_or_mapping(tmp_path):
    (tmp_path / "a.yaml").write_text("names: [car, truck]\n")
    (tmp_path / "b.yaml").write_text("names:\n  0: car\n  '3': ship\n")
    (tmp_path / "c.yaml").write_text("names: car\n")
    assert read_yolo_names(tmp_path / "a.yaml") == {0: "car", 1: "truck"}
    assert read_yolo_names(tmp_path / "b.yaml") == {0: "car", 3: "ship"}
    with pytest.raises(InputError, match="c.yaml: 'names' must be"):
        read_yolo_names(tmp_path / "c.yaml")
    with pytest.raises(InputError, match="give class ids or names"):
        parse_classes(" , ")


# ------------------------------------------------------------------ BOM and CRLF
def test_bom_and_crlf_label_file_reads_like_the_plain_one(tmp_path):
    plain = _rows(TOP_LEFT.format(c=0), BOTTOM_RIGHT.format(c=0))
    windows = b"\xef\xbb\xbf" + plain.replace("\n", "\r\n").encode() + b"\r\n"  # BOM, CRLF, a blank line
    (tmp_path / "plain.txt").write_text(plain)
    (tmp_path / "windows.txt").write_bytes(windows)
    a = read_yolo_labels(tmp_path / "plain.txt", SIZE, SIZE)
    b = read_yolo_labels(tmp_path / "windows.txt", SIZE, SIZE)
    assert len(a) == 2 and a == b
    # the parser itself strips the mark too (other readers hand it decoded text)
    assert Detections.from_yolo(windows.decode("utf-8"), SIZE, SIZE) == a


def test_bom_and_crlf_folder_prepares_identical_tiles(tmp_path):
    plain = {"im0": _rows(TOP_LEFT.format(c=0), TOP_RIGHT.format(c=0)), "im1": _rows(BOTTOM_RIGHT.format(c=0))}
    windows = {k: b"\xef\xbb\xbf" + v.replace("\n", "\r\n").encode() for k, v in plain.items()}
    a = _prepare(tmp_path, _yolo(tmp_path / "a" / "src", plain), _target(tmp_path / "a" / "tgt"), out="out-a")
    b = _prepare(tmp_path, _yolo(tmp_path / "b" / "src", windows), _target(tmp_path / "b" / "tgt"), out="out-b")
    assert a["splits"]["source-train"]["boxes"] == 3
    assert a["splits"] == b["splits"]  # same counts and the same content hashes


# ------------------------------------------------------------------ COCO
def _coco(root: Path, categories: list[dict], anns: list[tuple[int, int, list[float]]]) -> Path:
    root.mkdir(parents=True)
    images = []
    for i, stem in enumerate(("im0", "im1")):
        _png(root / f"{stem}.png", i)
        images.append({"id": i + 1, "file_name": f"{stem}.png", "width": SIZE, "height": SIZE})
    annotations = [
        {"id": 10 + k, "image_id": img, "category_id": cat, "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0}
        for k, (img, cat, bbox) in enumerate(anns)
    ]
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


CATS = [{"id": 5, "name": "ship"}, {"id": 1, "name": "car"}, {"id": 2, "name": "truck"}]
ANNS = [
    (1, 1, [52, 52, 24, 24]),  # car, tile 0_0
    (1, 2, [180, 52, 24, 24]),  # truck, tile 128_0
    (2, 5, [180, 180, 24, 24]),  # ship, tile 128_128
    (2, 1, [52, 52, 24, 24]),  # car
]


def test_coco_multi_category_refused_naming_annotation_and_category(tmp_path):
    path = _coco(tmp_path / "coco", CATS, ANNS)
    with pytest.raises(InputError) as err:
        _prepare(tmp_path, path, _target(tmp_path / "tgt"))
    assert err.value.where == str(path)
    assert "annotation 11 has category 2 ('truck')" in str(err.value) and "--classes" in str(err.value)


@pytest.mark.parametrize("classes", ["car,truck", "1,2"])
def test_coco_classes_by_name_or_category_id(tmp_path, classes):
    path = _coco(tmp_path / "coco", CATS, ANNS)
    manifest = _prepare(tmp_path, path, _target(tmp_path / "tgt"), classes)
    s = manifest["splits"]["source-train"]
    assert s["vehicle_classes"] == [1, 2] and s["boxes"] == 3 and s["dropped_boxes"] == 1
    assert set(_source_boxes(tmp_path / "out")) == {"im0_0_0", "im0_128_0", "im1_0_0"}


def test_coco_single_category_is_the_vehicle_class(tmp_path):
    path = _coco(tmp_path / "coco", [{"id": 3, "name": "vehicle"}], [(1, 3, [52, 52, 24, 24])])
    manifest = _prepare(tmp_path, path, _target(tmp_path / "tgt"))
    assert manifest["splits"]["source-train"]["vehicle_classes"] == [3]
    assert manifest["splits"]["source-train"]["boxes"] == 1


def test_coco_json_with_a_bom_is_read(tmp_path):
    path = _coco(tmp_path / "coco", [{"id": 1, "name": "car"}], [(1, 1, [52, 52, 24, 24])])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert len(coco_domain(path, gsd=0.125).images) == 2


# ------------------------------------------------------------------ presets choose explicitly
def test_presets_choose_their_classes(tmp_path):
    for name in ("madison_drone", "kit_munich_aerial"):
        _yolo(tmp_path / "aerial" / name, {"a": _rows(TOP_LEFT.format(c=1))})
    spec = aerial_v1(tmp_path / "aerial")
    assert all(s.domain.classes == {0, 1} for s in spec.splits)  # car and large vehicle
    write_demo_data(tmp_path / "demo-raw")
    assert all(s.domain.classes == {0} for s in demo_spec(tmp_path / "demo-raw").splits)


def test_yolo_folder_domain_takes_classes(tmp_path):
    dom = yolo_folder_domain(_multi_class_source(tmp_path / "src"), gsd=0.125, classes=[0, 7])
    item = dom.images[0]  # im0: car + truck
    kept, dropped = dom.keep_vehicles(item, dom.load(item).detections)
    assert kept.class_id.tolist() == [0] and dropped == 1


# ------------------------------------------------------------------ through the CLI
def test_cli_refuses_other_classes_and_accepts_chosen(tmp_path, capsys):
    source = _multi_class_source(tmp_path / "src", {0: "car", 1: "truck", 7: "plane"})
    target = _target(tmp_path / "tgt")
    assert main(_cli(tmp_path, source, target)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "im0.txt:2" in err and "class id 1 ('truck')" in err and "--classes" in err
    assert not (tmp_path / "cli-out").exists()

    assert main(_cli(tmp_path, source, target, "--classes", "car,truck")) == 0
    out = capsys.readouterr().out
    assert "dropped: source-train 1" in out
    manifest = json.loads((tmp_path / "cli-out" / "manifest.json").read_text())
    assert manifest["splits"]["source-train"]["boxes"] == 4
    assert manifest["splits"]["source-train"]["dropped_boxes"] == 1
    weak = open_evaluation_split(tmp_path / "cli-out", "target-test")
    assert sum(len(weak.labels(t.tile_id)) for t in weak) == 1


def test_cli_classes_errors(tmp_path, capsys):
    source = _multi_class_source(tmp_path / "src", {0: "car", 1: "truck"})
    target = _target(tmp_path / "tgt")
    assert main(_cli(tmp_path, source, target, "--classes", "car,lorry")) == 2
    assert "--classes: 'lorry' is not a class" in capsys.readouterr().err
    assert main(["data", "prepare", "--preset", "demo", "--out", str(tmp_path / "d"), "--classes", "0"]) == 2
    assert "--classes: a preset chooses its own classes" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_cli_refuses_an_id_no_domain_has(tmp_path, capsys):
    """``--classes 9``: the source names 0 and 1, the target (no data.yaml) holds class 0 only: 9 is no class."""
    source = _multi_class_source(tmp_path / "src", {0: "car", 1: "truck", 7: "plane"})
    target = _target(tmp_path / "tgt")
    assert main(_cli(tmp_path, source, target, "--classes", "9")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: --classes: '9' is not a class of any domain")
    assert "src: 0=car, 1=truck, 7=plane" in err[0] and "tgt: ids 0, no names" in err[0]
    assert not (tmp_path / "cli-out").exists()


@pytest.mark.parametrize("given", ["", " , "])
def test_cli_refuses_empty_classes(tmp_path, capsys, given):
    source = _multi_class_source(tmp_path / "src", {0: "car", 1: "truck"})
    assert main(_cli(tmp_path, source, _target(tmp_path / "tgt"), "--classes", given)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --classes: give class ids or names, e.g. 0,1 or car,truck"]
    assert not (tmp_path / "cli-out").exists()


def test_an_id_only_held_by_an_unnamed_domain_is_a_class(tmp_path):
    """A domain without data.yaml has the ids its label files hold: class 3 of the target may be chosen."""
    target = _target(tmp_path / "tgt")
    (target / "labels" / "t2.txt").write_text(_rows(BOTTOM_RIGHT.format(c=0), TOP_LEFT.format(c=3)))
    source, tgt = open_domain(_target(tmp_path / "src"), 0.125), open_domain(target, 0.125)
    assert tgt.known_class_ids() == {0, 3}
    choose_classes([source, tgt], ["0", "3"])
    assert tgt.classes == {0, 3}
    with pytest.raises(InputError, match=r"'4' is not a class of any domain \(src: ids 0, .*tgt: ids 0, 3, "):
        choose_classes([source, tgt], ["0", "4"])


def test_a_domain_the_choice_misses_says_what_was_chosen(tmp_path, capsys):
    """Names reach the source only; a truck in the target is refused naming the choice, not "unless chosen"."""
    source = _multi_class_source(tmp_path / "src", {0: "car", 1: "truck", 7: "plane"})
    target = _target(tmp_path / "tgt")
    (target / "labels" / "t2.txt").write_text(_rows(BOTTOM_RIGHT.format(c=1)))
    assert main(_cli(tmp_path, source, target, "--classes", "car,truck")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "t2.txt:1: class id 1 is not a vehicle class" in err[0]
    assert "--classes car,truck names no class of domain 'tgt'" in err[0] and "unless chosen" not in err[0]
