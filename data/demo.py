"""The embedded demo: two procedurally drawn aerial domains with exact vehicle labels.

Both are one town generator (:func:`render_town`) in two styles, so that the gap is the kind real
regions have and a source detector partly crosses it. ``leafy_suburb`` (source, 0.10 m/px): lawn,
trees, pitched roofs, grey streets with dashed centre lines and kerb parking, now and then a small
car park; cars of every colour, shadows falling south-east. ``arid_carpark`` (target, 0.125 m/px):
sand, shrubs, flat light roofs with rooftop units, warm asphalt without markings, car parks with
stall lines holding half of the cars, sheds and shipping containers (car-sized, not vehicles),
mostly white, silver and beige cars, shadows falling south. Vehicles have real sizes (cars
4.5 x 1.8 m, vans 6 x 2.2 m) and a cast shadow. Rendering is seeded: same seed, same bytes.

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


def _draw_vehicle(img, rng, cx, cy, angle, gsd, boxes, occupied, shadow=(0.6, 0.8), palette=None) -> bool:
    """Draw one car or van (body, windscreen, roof panel, a shadow cast ``shadow`` metres away) if it fits.

    ``palette``: ``(colours, probabilities)``; None draws uniformly from :data:`CAR_COLOURS`.
    """
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
    sh = poly + np.array(shadow) / gsd
    cv2.fillPoly(img, [np.round(sh * 8).astype(np.int32)], (0, 0, 0), lineType=cv2.LINE_AA, shift=3)
    if palette is None:
        base = CAR_COLOURS[rng.integers(len(CAR_COLOURS))]
    else:
        base = palette[0][rng.choice(len(palette[0]), p=palette[1])]
    colour = np.array(base, np.float32) * rng.uniform(0.85, 1.1)
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


def _tree(img, rng, x, y, r, shadow):
    cv2.circle(img, (int(x + shadow[0] * r), int(y + shadow[1] * r)), int(r), (30, 40, 25), -1, cv2.LINE_AA)
    cv2.circle(
        img,
        (int(x), int(y)),
        int(r),
        (40.0 + float(rng.integers(20)), 85.0 + float(rng.integers(30)), 35.0),
        -1,
        cv2.LINE_AA,
    )
    cv2.circle(img, (int(x - r * 0.3), int(y - r * 0.3)), int(r * 0.5), (70, 120, 55), -1, cv2.LINE_AA)


def _shrub(img, rng, x, y, r, shadow):
    cv2.circle(img, (int(x + shadow[0] * r), int(y + shadow[1] * r)), int(r), (140, 120, 90), -1, cv2.LINE_AA)
    cv2.circle(img, (int(x), int(y)), int(r), (105, 115, 70), -1, cv2.LINE_AA)


def _container(img, rng, x, y, angle, gsd, occupied, shadow, avoid=()) -> None:
    """A shipping container or shed: a plain car-sized box with a ribbed roof, not a vehicle."""
    length, width = rng.uniform(4.0, 6.5) / gsd, rng.uniform(2.0, 2.6) / gsd
    poly = _rot_rect(x, y, length, width, angle)
    x1, y1 = poly.min(axis=0)
    x2, y2 = poly.max(axis=0)
    if _overlaps((x1, y1, x2, y2), [*occupied, *avoid]):
        return
    occupied.append(np.array([x1, y1, x2, y2]))
    colour = np.array([(150, 60, 40), (60, 90, 130), (180, 160, 120), (120, 125, 120)][rng.integers(4)], np.float32)
    sh = np.round((poly + np.array(shadow) / gsd) * 8).astype(np.int32)
    cv2.fillPoly(img, [sh], (40, 35, 30), cv2.LINE_AA, 3)
    cv2.fillPoly(img, [np.round(poly * 8).astype(np.int32)], colour.tolist(), cv2.LINE_AA, 3)
    for k in range(1, 6):
        f = k / 6 - 0.5
        rib = _rot_rect(x + math.cos(angle) * length * f, y + math.sin(angle) * length * f, 0.08 / gsd, width, angle)
        cv2.fillPoly(img, [np.round(rib * 8).astype(np.int32)], (colour * 0.8).tolist(), cv2.LINE_AA, 3)


#: A domain's look. Both demo domains are one town generator in two styles, differing as real regions do:
#: ground, streets, roofs, vegetation, parking layout, sheds, car colours and the sun (shadow, metres).
SUBURB = {
    "ground": (78, 120, 60),
    "street": (105, 105, 108),
    "dashes": True,
    "cross_street": 0.6,
    "lot": 0.25,
    "lot_colour": (96, 96, 100),
    "lot_fraction": 0.3,
    "roofs": "pitched",
    "houses": (3, 7),
    "vegetation": "trees",
    "plants": (4, 10),
    "containers": (0, 1),  # none (the draw keeps the scenes' random stream)
    "shadow": (0.6, 0.8),
    "palette": None,
}

#: Car colours of the target region: mostly white, silver and beige (a hot, dusty place)
ARID_PALETTE = (
    [(240, 238, 232), (200, 200, 204), (214, 198, 160), (25, 25, 28), (150, 150, 155), (160, 40, 35), (40, 70, 140)],
    [0.30, 0.22, 0.14, 0.10, 0.12, 0.06, 0.06],
)

ARID = {
    "ground": (196, 170, 128),
    "street": (118, 110, 100),
    "dashes": False,
    "cross_street": 0.3,
    "lot": 0.8,
    "lot_colour": (92, 88, 84),
    "lot_fraction": 0.5,
    "roofs": "flat",
    "houses": (1, 3),
    "vegetation": "shrubs",
    "plants": (6, 14),
    "containers": (1, 3),
    "shadow": (0.0, 1.0),  # another latitude and hour: shadows fall south, not south-east
    "palette": ARID_PALETTE,
}


def _overlaps(box, occupied) -> bool:
    return any(not (box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1]) for b in occupied)


def render_town(
    rng: np.random.Generator, size: int, gsd: float, n_cars: int, style: dict
) -> tuple[np.ndarray, Detections]:
    """One scene of a domain ``style`` (:data:`SUBURB`, :data:`ARID`) and its vehicle boxes.

    A street with kerb parking (maybe a cross street), maybe a car park with stalls, buildings, sheds and
    plants; drawn with the street along x and transposed half of the time.
    """
    st = style
    m = 1 / gsd
    img = _texture(rng, size, size, np.array(st["ground"]) * rng.uniform(0.92, 1.06), 16)
    road_w = 7.5 * m
    occupied: list[np.ndarray] = []  # buildings, lots, sheds and cars: nothing is drawn over them
    roads: list[np.ndarray] = []
    boxes: list[list[float]] = []
    y_road = size * rng.uniform(0.2, 0.45)
    roads.append(np.array([0, y_road - road_w / 2, size, y_road + road_w / 2]))
    x_road = size * rng.uniform(0.3, 0.7) if rng.random() < st["cross_street"] else None
    if x_road is not None:
        roads.append(np.array([x_road - road_w / 2, 0, x_road + road_w / 2, size]))
    for r in roads:
        cv2.rectangle(img, (int(r[0]), int(r[1])), (int(r[2]), int(r[3])), st["street"], -1)
    if st["dashes"]:
        for x in np.arange(0, size, 6 * m):
            cv2.line(img, (int(x), int(y_road)), (int(x + 3 * m), int(y_road)), (230, 230, 200), max(1, int(0.15 * m)))
    stalls = []
    if rng.random() < st["lot"]:  # a car park below the street, one or two rows of stalls
        lot = [size * rng.uniform(0.0, 0.25), y_road + road_w / 2 + 1.0 * m, size * rng.uniform(0.75, 1.0), size]
        if x_road is not None and x_road < size / 2:  # beside the cross street, on its wider side
            lot[0] = x_road + road_w / 2 + m
        elif x_road is not None:
            lot[2] = x_road - road_w / 2 - m
        cv2.rectangle(img, (int(lot[0]), int(lot[1])), (int(lot[2]), int(lot[3])), st["lot_colour"], -1)
        stall_w, stall_l = 2.6 * m, 5.2 * m
        for ry in np.arange(lot[1] + 0.5 * m, lot[3] - stall_l, stall_l + 6.0 * m):
            for sx in np.arange(lot[0] + 0.5 * m, lot[2] - stall_w, stall_w):
                cv2.line(img, (int(sx), int(ry)), (int(sx), int(ry + stall_l)), (225, 225, 215), max(1, int(0.12 * m)))
                stalls.append((sx + stall_w / 2, ry + stall_l / 2))
        roads.append(np.array(lot))
    img += _noise(rng, size, size, 2, 5)[..., None]
    shadow = np.array(st["shadow"])
    for _ in range(int(rng.integers(*st["houses"]))):
        hw, hh = rng.uniform(7, 13) * m, rng.uniform(5, 9) * m
        x, y = rng.uniform(-hw / 3, size - hw * 2 / 3), rng.uniform(-hh / 3, size - hh * 2 / 3)
        box = np.array([x, y, x + hw, y + hh])
        if _overlaps(box + np.array([-m, -m, m, m]), roads + occupied):
            continue
        sx, sy = shadow * 2 * m
        cv2.rectangle(img, (int(x + sx), int(y + sy)), (int(x + hw + sx), int(y + hh + sy)), (35, 45, 30), -1)
        if st["roofs"] == "pitched":
            roof = np.array([[150, 70, 55], [120, 120, 125], [90, 60, 50]][rng.integers(3)], np.float32)
            cv2.rectangle(img, (int(x), int(y)), (int(x + hw), int(y + hh / 2)), (roof * 1.1).tolist(), -1)
            cv2.rectangle(img, (int(x), int(y + hh / 2)), (int(x + hw), int(y + hh)), (roof * 0.8).tolist(), -1)
        else:
            cv2.rectangle(img, (int(x), int(y)), (int(x + hw), int(y + hh)), (215, 210, 200), -1)
            for _ in range(int(rng.integers(1, 4))):  # rooftop units
                u = rng.uniform(1.0, 1.8) * m
                ux, uy = rng.uniform(x, x + hw - u), rng.uniform(y, y + hh - u)
                cv2.rectangle(img, (int(ux), int(uy)), (int(ux + u), int(uy + u)), (165, 165, 160), -1)
        occupied.append(box)
    for _ in range(int(rng.integers(*st["containers"]))):
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        _container(img, rng, x, y, rng.choice([0.0, math.pi / 2]), gsd, occupied, shadow, roads[:1])
    placed = tries = 0
    order = list(rng.permutation(len(stalls)))
    while placed < n_cars and tries < n_cars * 30:
        tries += 1
        if order and rng.random() < st["lot_fraction"]:
            sx, sy = stalls[order.pop()]
            x, y = sx + rng.normal(0, 0.1 * m), sy
            angle = rng.choice([math.pi / 2, -math.pi / 2]) + rng.normal(0, 0.04)
        elif x_road is None or rng.random() < 0.5:
            x, y = rng.uniform(0, size), y_road + rng.choice([-1, 1]) * road_w * 0.3
            angle = rng.choice([0.0, math.pi]) + rng.normal(0, 0.03)
        else:
            x, y = x_road + rng.choice([-1, 1]) * road_w * 0.3, rng.uniform(0, size)
            angle = rng.choice([math.pi / 2, -math.pi / 2]) + rng.normal(0, 0.03)
        placed += _draw_vehicle(img, rng, x, y, angle, gsd, boxes, occupied, tuple(shadow), st["palette"])
    plant = _tree if st["vegetation"] == "trees" else _shrub
    for _ in range(int(rng.integers(*st["plants"]))):
        r = (rng.uniform(2.0, 4.5) if st["vegetation"] == "trees" else rng.uniform(0.8, 1.8)) * m
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        if _overlaps(np.array([x - r, y - r, x + r, y + r]), occupied + roads):
            continue
        plant(img, rng, x, y, r, shadow * 0.5)
    dets = np.array(boxes).reshape(-1, 4)
    if rng.random() < 0.5:  # the street runs north-south
        img = np.ascontiguousarray(img.transpose(1, 0, 2))
        dets = dets[:, [1, 0, 3, 2]]
    return np.clip(img, 0, 255).astype(np.uint8), Detections(dets)


def render_suburb(rng: np.random.Generator, size: int, gsd: float, n_cars: int) -> tuple[np.ndarray, Detections]:
    """Leafy suburb (the source): lawn, grey streets with kerb parking, pitched roofs, trees."""
    return render_town(rng, size, gsd, n_cars, SUBURB)


def render_carpark(rng: np.random.Generator, size: int, gsd: float, n_cars: int) -> tuple[np.ndarray, Detections]:
    """Arid town (the target): sand, warm asphalt, car parks, flat roofs, sheds, light cars, southward shadows."""
    return render_town(rng, size, gsd, n_cars, ARID)


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
