"""The embedded demo: two procedurally drawn aerial domains with exact vehicle labels.

``leafy_suburb`` (source): green lawns, trees with shadows, pitched roofs, grey streets with
dashed centre lines, cars parked along the kerbs. ``arid_carpark`` (target): sand, shrubs,
flat light roofs and dark asphalt car parks with white stall lines, cars in the stalls.
Vehicles have real sizes (cars 4.5 x 1.8 m, vans 6 x 2.2 m) at the chosen GSD, several
colours and headings, and a cast shadow.

Each scene is written as a GeoTIFF (UTM) with a GeoJSON of vehicle polygons: in the raster's
CRS for the source, in WGS84 (RFC 7946) for the target, so the loaders' reprojection runs.
This data makes the main job run on a fresh machine; it is never a benchmark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from affine import Affine

from aerosynth.data.atomic import atomic_directory, atomic_write_json
from aerosynth.data.detections import Detections
from aerosynth.data.domains import geotiff_domain
from aerosynth.data.geo import detections_to_geojson
from aerosynth.data.prepare import PrepareSpec, SplitSpec
from aerosynth.data.rasters import write_geotiff

CAR_COLOURS = [
    (235, 235, 235),
    (25, 25, 28),
    (160, 162, 168),
    (170, 30, 30),
    (30, 60, 150),
    (95, 95, 100),
    (200, 180, 60),
]


@dataclass
class DemoConfig:
    """Size of the demo data.

    Attributes:
        scenes_per_domain: rasters per domain (each is one group).
        size_px: raster side in pixels.
        source_gsd: metres per pixel of the source rasters.
        target_gsd: metres per pixel of the target rasters.
        seed: random seed (same seed, same bytes).
    """

    scenes_per_domain: int = 4
    size_px: int = 384
    source_gsd: float = 0.10
    target_gsd: float = 0.125
    seed: int = 0


def _noise(rng: np.random.Generator, h: int, w: int, scale: int, amp: float) -> np.ndarray:
    small = rng.normal(0, 1, (max(2, h // scale), max(2, w // scale))).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) * amp


def _texture(rng, h, w, base, amp=18.0) -> np.ndarray:
    img = np.empty((h, w, 3), np.float32)
    img[:] = base
    img += _noise(rng, h, w, 24, amp)[..., None] + _noise(rng, h, w, 3, amp / 3)[..., None]
    return img


def _rot_rect(cx, cy, length, width, angle) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    pts = np.array(
        [[-length / 2, -width / 2], [length / 2, -width / 2], [length / 2, width / 2], [-length / 2, width / 2]]
    )
    rot = pts @ np.array([[c, s], [-s, c]])
    return rot + np.array([cx, cy])


def _draw_vehicle(img, rng, cx, cy, angle, gsd, boxes, occupied) -> bool:
    van = rng.random() < 0.15
    length, width = (6.0, 2.2) if van else (4.5, 1.8)
    length, width = length / gsd, width / gsd
    poly = _rot_rect(cx, cy, length, width, angle)
    x1, y1 = poly.min(axis=0)
    x2, y2 = poly.max(axis=0)
    h, w = img.shape[:2]
    if x1 < -length / 3 or y1 < -length / 3 or x2 > w + length / 3 or y2 > h + length / 3:
        return False
    box = np.array([x1, y1, x2, y2])
    for ob in occupied:
        if not (x2 < ob[0] or ob[2] < x1 or y2 < ob[1] or ob[3] < y1):
            return False
    occupied.append(box)
    sh = poly + np.array([0.6, 0.8]) / gsd
    cv2.fillPoly(img, [np.round(sh * 8).astype(np.int32)], (0, 0, 0), lineType=cv2.LINE_AA, shift=3)
    colour = np.array(CAR_COLOURS[rng.integers(len(CAR_COLOURS))], np.float32) * rng.uniform(0.85, 1.1)
    cv2.fillPoly(img, [np.round(poly * 8).astype(np.int32)], colour.tolist(), lineType=cv2.LINE_AA, shift=3)
    # windscreen and roof: darker band towards the front, lighter roof panel
    front = _rot_rect(
        cx + math.cos(angle) * length * 0.18, cy + math.sin(angle) * length * 0.18, length * 0.12, width * 0.85, angle
    )
    cv2.fillPoly(img, [np.round(front * 8).astype(np.int32)], (30, 35, 45), lineType=cv2.LINE_AA, shift=3)
    roof = _rot_rect(
        cx - math.cos(angle) * length * 0.08, cy - math.sin(angle) * length * 0.08, length * 0.32, width * 0.7, angle
    )
    cv2.fillPoly(
        img, [np.round(roof * 8).astype(np.int32)], (colour * 1.08).clip(0, 255).tolist(), lineType=cv2.LINE_AA, shift=3
    )
    boxes.append([max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)])
    return True


def _tree(img, rng, x, y, r):
    cv2.circle(img, (int(x + r * 0.5), int(y + r * 0.6)), int(r), (30, 40, 25), -1, cv2.LINE_AA)
    cv2.circle(
        img,
        (int(x), int(y)),
        int(r),
        (40.0 + float(rng.integers(20)), 85.0 + float(rng.integers(30)), 35.0),
        -1,
        cv2.LINE_AA,
    )
    cv2.circle(img, (int(x - r * 0.3), int(y - r * 0.3)), int(r * 0.5), (70, 120, 55), -1, cv2.LINE_AA)


def render_suburb(rng: np.random.Generator, size: int, gsd: float, n_cars: int) -> tuple[np.ndarray, Detections]:
    """Leafy suburb: lawn, streets with kerb parking, pitched roofs, trees."""
    img = _texture(rng, size, size, (78, 120, 60), 14)
    m = 1 / gsd
    road_w = 7.5 * m
    occupied: list[np.ndarray] = []
    boxes: list[list[float]] = []
    ys = [size * rng.uniform(0.25, 0.4), size * rng.uniform(0.65, 0.8)]
    x_road = size * rng.uniform(0.35, 0.65)
    for y in ys:
        cv2.rectangle(img, (0, int(y - road_w / 2)), (size, int(y + road_w / 2)), (105, 105, 108), -1)
        for x in np.arange(0, size, 6 * m):
            cv2.line(img, (int(x), int(y)), (int(x + 3 * m), int(y)), (230, 230, 200), max(1, int(0.15 * m)))
    cv2.rectangle(img, (int(x_road - road_w / 2), 0), (int(x_road + road_w / 2), size), (105, 105, 108), -1)
    img += _noise(rng, size, size, 2, 5)[..., None]
    # houses
    for _ in range(int(rng.integers(10, 20))):
        hw, hh = rng.uniform(6, 10) * m, rng.uniform(5, 7) * m
        x, y = rng.uniform(0, size - hw), rng.uniform(0, size - hh)
        if (
            any(abs(y + hh / 2 - yy) < hh / 2 + road_w / 2 + m for yy in ys)
            or abs(x + hw / 2 - x_road) < hw / 2 + road_w / 2 + m
        ):
            continue
        roof = np.array([[150, 70, 55], [120, 120, 125], [90, 60, 50]][rng.integers(3)], np.float32)
        cv2.rectangle(
            img, (int(x + 1.5 * m), int(y + 1.5 * m)), (int(x + hw + 1.5 * m), int(y + hh + 1.5 * m)), (35, 45, 30), -1
        )
        cv2.rectangle(img, (int(x), int(y)), (int(x + hw), int(y + hh / 2)), (roof * 1.1).tolist(), -1)
        cv2.rectangle(img, (int(x), int(y + hh / 2)), (int(x + hw), int(y + hh)), (roof * 0.8).tolist(), -1)
        occupied.append(np.array([x, y, x + hw, y + hh]))
    # parked cars along the kerbs, heading along the road: half on the two cross streets, half on the
    # main street (so both headings are common)
    placed = tries = 0
    while placed < n_cars and tries < n_cars * 30:
        tries += 1
        if rng.random() < 0.5:
            y = ys[rng.integers(2)] + rng.choice([-1, 1]) * road_w * 0.3
            x = rng.uniform(0, size)
            angle = rng.choice([0.0, math.pi]) + rng.normal(0, 0.03)
        else:
            x = x_road + rng.choice([-1, 1]) * road_w * 0.3
            y = rng.uniform(0, size)
            angle = rng.choice([math.pi / 2, -math.pi / 2]) + rng.normal(0, 0.03)
        placed += _draw_vehicle(img, rng, x, y, angle, gsd, boxes, occupied)
    for _ in range(int(rng.integers(10, 22))):
        r = rng.uniform(2.0, 4.5) * m
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        if any(not (x + r < b[0] or b[2] < x - r or y + r < b[1] or b[3] < y - r) for b in occupied):
            continue
        _tree(img, rng, x, y, r)
    return np.clip(img, 0, 255).astype(np.uint8), Detections(np.array(boxes).reshape(-1, 4))


def render_carpark(rng: np.random.Generator, size: int, gsd: float, n_cars: int) -> tuple[np.ndarray, Detections]:
    """Arid car park: sand, shrubs, flat roofs, asphalt lot with stall lines."""
    img = _texture(rng, size, size, (196, 170, 128), 16)
    m = 1 / gsd
    occupied: list[np.ndarray] = []
    boxes: list[list[float]] = []
    lot = [
        size * rng.uniform(0.05, 0.2),
        size * rng.uniform(0.1, 0.25),
        size * rng.uniform(0.8, 0.95),
        size * rng.uniform(0.75, 0.9),
    ]
    cv2.rectangle(img, (int(lot[0]), int(lot[1])), (int(lot[2]), int(lot[3])), (62, 62, 66), -1)
    img += _noise(rng, size, size, 2, 6)[..., None]
    stall_w, stall_l = 2.6 * m, 5.2 * m
    rows = np.arange(lot[1] + 1 * m, lot[3] - stall_l, stall_l + 6.5 * m)
    stalls = []
    for ry in rows:
        for sx in np.arange(lot[0] + 1 * m, lot[2] - stall_w, stall_w):
            cv2.line(img, (int(sx), int(ry)), (int(sx), int(ry + stall_l)), (225, 225, 215), max(1, int(0.12 * m)))
            stalls.append((sx + stall_w / 2, ry + stall_l / 2))
    for _ in range(int(rng.integers(1, 3))):
        bw, bh = rng.uniform(12, 20) * m, rng.uniform(8, 14) * m
        x = rng.choice([rng.uniform(0, max(1, lot[0] - bw)), rng.uniform(min(lot[2], size - bw), size - bw)])
        y = rng.uniform(0, size - bh)
        cv2.rectangle(
            img, (int(x + 2 * m), int(y + 2 * m)), (int(x + bw + 2 * m), int(y + bh + 2 * m)), (120, 100, 75), -1
        )
        cv2.rectangle(img, (int(x), int(y)), (int(x + bw), int(y + bh)), (215, 215, 210), -1)
        occupied.append(np.array([x, y, x + bw, y + bh]))
    order = rng.permutation(len(stalls))
    placed = 0
    for idx in order:
        if placed >= n_cars:
            break
        sx, sy = stalls[idx]
        angle = rng.choice([math.pi / 2, -math.pi / 2]) + rng.normal(0, 0.04)
        placed += _draw_vehicle(img, rng, sx + rng.normal(0, 0.1 * m), sy, angle, gsd, boxes, occupied)
    for _ in range(int(rng.integers(6, 14))):
        r = rng.uniform(0.8, 1.8) * m
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        if lot[0] - r < x < lot[2] + r and lot[1] - r < y < lot[3] + r:
            continue
        cv2.circle(img, (int(x + r * 0.6), int(y + r * 0.6)), int(r), (140, 120, 90), -1, cv2.LINE_AA)
        cv2.circle(img, (int(x), int(y)), int(r), (105, 115, 70), -1, cv2.LINE_AA)
    return np.clip(img, 0, 255).astype(np.uint8), Detections(np.array(boxes).reshape(-1, 4))


#: (renderer, EPSG code, origin easting/northing) per demo domain
DEMO_DOMAINS = {
    "leafy_suburb": (render_suburb, 32616, (305_000.0, 4_770_000.0)),
    "arid_carpark": (render_carpark, 32612, (410_000.0, 3_700_000.0)),
}


def write_demo_data(out_dir: str | Path, config: DemoConfig | None = None, overwrite: bool = False) -> Path:
    """Write ``out_dir/<domain>/scene_XX.tif`` + ``scene_XX.geojson`` for both demo domains."""
    config = config or DemoConfig()
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for d_index, (name, (render, epsg, origin)) in enumerate(DEMO_DOMAINS.items()):
            gsd = config.source_gsd if d_index == 0 else config.target_gsd
            digits = max(2, len(str(config.scenes_per_domain - 1)))  # names sort in scene order
            for i in range(config.scenes_per_domain):
                rng = np.random.default_rng([config.seed, d_index, i])
                # 10-19 vehicles (fewer where a small scene has no room); every third target scene is empty
                empty = d_index == 1 and i % 3 == 2
                n_cars = 0 if empty else int(rng.integers(10, 20))
                rgb, dets = render(rng, config.size_px, gsd, n_cars)
                x0, y0 = origin[0] + 500.0 * i, origin[1]
                transform = Affine(gsd, 0, x0, 0, -gsd, y0)
                crs = f"EPSG:{epsg}"
                write_geotiff(tmp / name / f"scene_{i:0{digits}d}.tif", rgb, transform, crs)
                geo = detections_to_geojson(dets, transform, crs, to_wgs84=d_index == 1, class_names=["vehicle"])
                atomic_write_json(tmp / name / f"scene_{i:0{digits}d}.geojson", geo)
        atomic_write_json(tmp / "demo.json", {"config": vars(config), "domains": list(DEMO_DOMAINS)})
    return out_dir


def held_out_scenes(n_source: int, n_target: int) -> tuple[int, int]:
    """Scenes held out for source-val and target-test: a sixth and a third, at least one, never all.

    Args:
        n_source: source scenes (groups).
        n_target: target scenes (groups).

    Returns:
        ``(source-val scenes, target-test scenes)``.
    """
    n_val = min(max(1, n_source // 6), max(1, n_source - 1))
    n_test = min(max(1, n_target // 3), max(1, n_target - 1))
    return n_val, n_test


def demo_spec(demo_dir: str | Path, target_gsd: float = 0.125, tile_size: int = 128) -> PrepareSpec:
    """Splits of the demo: the last scenes of each domain are held out, each scene one group.

    Source-val is the last sixth of the source scenes, target-test the last third of the target
    scenes (at least one each), so with many small scenes the test figures rest on over a hundred
    tiles; with four scenes per domain one scene of each is held out.

    Args:
        demo_dir: folder written by :func:`write_demo_data`.
        target_gsd: ground sample distance of the tiles, m/px.
        tile_size: tile side in pixels.

    Returns:
        The four splits (source-train, source-val, target-train, target-test).
    """
    demo_dir = Path(demo_dir)
    source = geotiff_domain(demo_dir / "leafy_suburb", "leafy_suburb", classes={0})  # cars and vans: class 0
    target = geotiff_domain(demo_dir / "arid_carpark", "arid_carpark", classes={0})
    s_groups, t_groups = source.groups, target.groups
    n_val, n_test = held_out_scenes(len(s_groups), len(t_groups))
    return PrepareSpec(
        preset="demo",
        target_gsd=target_gsd,
        tile_size=tile_size,
        splits=[
            SplitSpec("source-train", source, groups=s_groups[:-n_val], mode="cover"),
            SplitSpec("source-val", source, groups=s_groups[-n_val:], mode="cover"),
            SplitSpec("target-train", target, groups=t_groups[:-n_test], mode="grid", weak=True),
            SplitSpec("target-test", target, groups=t_groups[-n_test:], mode="grid", weak=True),
        ],
    )
