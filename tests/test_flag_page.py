"""``aerosynth flag`` end to end in a real browser: flag 100 tiles, resume, one writer, data prepare reads them.

Headless Chromium from the distribution's packages, driven by Selenium (``.ci/run`` installs both in CI).
"""

from __future__ import annotations

import json
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from aerosynth.flows.cli import main
from tests.data.make_fixtures import write_flag_target

FIXTURES = Path(__file__).parent / "data"
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
CHROMEDRIVER = shutil.which("chromedriver")
TILE_ARGS = ["--gsd", "0.25", "--tile-size", "32"]  # two 320 px rasters at 0.25 m/px: 2 x 100 tiles of 32 px


class FlagServer:
    """``aerosynth flag TARGET`` in a subprocess; its address read from the line it prints."""

    def __init__(self, target: Path) -> None:
        cmd = [sys.executable, "-m", "aerosynth.flows.cli", "flag", str(target), *TILE_ARGS, "--port", "0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + 120
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise AssertionError(f"aerosynth flag did not start: {self.proc.stderr.read()}") from None
            if line.startswith("flagging page: "):
                self.url = line.split()[2]
                return

    def stop(self) -> str:
        """Ctrl-C, as an analyst stops it; returns what it printed on stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stderr.read()


@pytest.fixture
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromedriver not installed (apt-get install chromium chromium-driver; .ci/run does)")
    pytest.importorskip("selenium", reason="selenium not installed (pip install -e '.[dev]')")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(what, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what.__doc__ or what}")


def _open(driver, url: str) -> None:
    driver.get(url)
    _wait(lambda: driver.execute_script("return document.body.dataset.ready === '1'"))


def _key(driver, key: str, times: int = 1) -> None:
    body = driver.find_element("tag name", "body")
    for _ in range(times):
        body.send_keys(key)


def _saved(driver) -> bool:
    """every change answered by the server"""
    return driver.execute_script(
        "const s=document.getElementById('save');return s.dataset.pending==='0'&&s.textContent==='saved'"
    )


def _shown_flags(driver) -> dict[str, str]:
    return driver.execute_script(
        "const o={};for(const d of document.querySelectorAll('.tile'))o[d.dataset.tile]=d.dataset.flag;return o"
    )


def test_flag_page_end_to_end(tmp_path, browser, capsys):
    from selenium.webdriver.common.keys import Keys

    target = tmp_path / "target"
    write_flag_target(target)
    server = FlagServer(target)
    try:
        _open(browser, server.url)
        ids = [t[0] for t in browser.execute_script("return S.tiles")]
        page_size = browser.execute_script("return S.page_size")
        assert len(ids) == 200 and page_size < 100  # the 100 flags take more than one page
        assert ids[:3] == ["scene_0_0_0", "scene_0_32_0", "scene_0_64_0"] and ids[100] == "scene_1_0_0"
        expected: dict[str, bool] = {}
        tiles = browser.find_elements("css selector", ".tile")
        assert len(tiles) == page_size
        for i in range(10):  # a click makes a tile a vehicle tile ...
            tiles[i].click()
            expected[ids[i]] = True
        tiles[3].click()  # ... and a second click an empty one
        expected[ids[3]] = False
        tiles[9].click()
        tiles[9].click()  # back to vehicle; the cursor is on tile 9
        _key(browser, Keys.ARROW_RIGHT)
        _key(browser, "e", 30)  # tiles 10..39 empty, the cursor moving on
        expected.update({ids[i]: False for i in range(10, 40)})
        _key(browser, "v")  # tile 40 a vehicle
        _key(browser, Keys.ARROW_RIGHT)
        _key(browser, " ")  # tile 41 too
        _key(browser, Keys.ARROW_DOWN)  # tile 51, one row down
        _key(browser, "v")
        _key(browser, "x")  # cleared again
        expected.update({ids[40]: True, ids[41]: True})
        _key(browser, "E")  # the page's unflagged tiles empty: 42..79
        expected.update({ids[i]: False for i in range(42, page_size)})
        _key(browser, "n")
        _key(browser, "n")  # the third page, the second raster
        start = 2 * page_size
        assert browser.execute_script("return cursor") == start
        for k in range(20):
            if k % 4 == 0:
                _key(browser, "v")
                _key(browser, Keys.ARROW_RIGHT)
            else:
                _key(browser, "e")
            expected[ids[start + k]] = k % 4 == 0
        assert len(expected) == 100
        _wait(lambda: _saved(browser))
        assert json.loads((target / "flags.json").read_text()) == expected
        progress = browser.find_element("id", "progress").text
        assert progress.startswith(f"100 / 200 tiles flagged ({sum(expected.values())} vehicle)")
        # the tile and its neighbourhood in the raster are shown
        assert browser.execute_script("return document.querySelector('.tile img').naturalWidth") == 32
        _wait(lambda: browser.execute_script("return document.getElementById('context').naturalWidth") > 32)
        assert "scene_1.tif" in browser.find_element("id", "info").text
    finally:
        err = server.stop()
    assert "stopped: 100 of 200 tiles flagged" in err

    # a restart resumes: the flags shown, the cursor on the first tile not flagged
    server = FlagServer(target)
    try:
        _open(browser, server.url)
        assert browser.execute_script("return cursor") == page_size  # tile 80, on the second page
        assert browser.find_element("id", "progress").text.startswith("100 / 200 tiles flagged")
        _key(browser, "p")
        shown = _shown_flags(browser)
        assert shown == {ids[i]: str(expected[ids[i]]).lower() for i in range(page_size)}
        # one writer per folder: a second page on the same folder is refused in one line
        rc = main(["flag", str(target), *TILE_ARGS])
        lines = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(lines) == 1
        assert (
            lines[0].startswith(f"error: {target}: already being flagged")
            and "one aerosynth flag per folder" in lines[0]
        )
    finally:
        server.stop()
    assert json.loads((target / "flags.json").read_text()) == expected  # reading the page changed nothing

    # what the page wrote is what data prepare reads: the 100 flagged tiles, the others left out
    out = tmp_path / "tiles"
    args = ["data", "prepare", "--source", FIXTURES / "yolo_domain", "--source-gsd", "0.25", "--target", target]
    args += [*TILE_ARGS, "--test-groups", "scene_1", "--unflagged", "skip", "--out", out]
    rc = main([str(a) for a in args])
    assert rc == 0, capsys.readouterr().err
    used = {}
    for split in ("target-train", "target-test"):
        used.update(
            {t["tile_id"]: t["has_vehicle"] for t in json.loads((out / split / "tiles.json").read_text())["tiles"]}
        )
    assert used == expected
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target_boxes"] is False
    assert manifest["splits"]["target-train"]["flag_sources"] == {"flags.json": page_size, "unflagged (skip)": 20}


def test_the_page_shows_the_tiles_data_prepare_cuts(tmp_path, capsys):
    """Same ids, same pixels; a second session on the folder is refused while the first holds it."""
    import cv2

    from aerosynth.data.errors import InputError
    from aerosynth.flows.flag_page import FlagSession, FolderLock

    target = tmp_path / "target"
    write_flag_target(target)
    with FolderLock(target):
        session = FlagSession(target, 0.25, 32)
        with pytest.raises(InputError, match="already being flagged"):
            FolderLock(target).acquire()
        with pytest.raises(InputError, match="nope: not a tile of this page"):
            session.set_flags({"nope": True})
        with pytest.raises(InputError, match="flag must be true, false or null"):
            session.set_flags({"scene_0_0_0": "yes"})
        assert not (target / "flags.json").exists()
        assert session.set_flags({"scene_0_0_0": True, "scene_1_32_0": False}) == {
            "done": 2,
            "vehicles": 1,
            "total": 200,
        }
        assert session.set_flags({"scene_1_32_0": None})["done"] == 1
    FolderLock(target).acquire().release()  # free again
    out = tmp_path / "tiles"
    args = ["data", "prepare", "--source", FIXTURES / "yolo_domain", "--source-gsd", "0.25", "--target", target]
    rc = main([str(a) for a in [*args, *TILE_ARGS, "--test-groups", "scene_1", "--unflagged", "empty", "--out", out]])
    assert rc == 0, capsys.readouterr().err
    prepared = [
        t for s in ("target-train", "target-test") for t in json.loads((out / s / "tiles.json").read_text())["tiles"]
    ]
    assert [t["tile_id"] for t in prepared] == [t.tile_id for t in session.tiles]
    assert [t["has_vehicle"] for t in prepared[:2]] == [True, False]
    for t in prepared[::37]:
        split = "target-train" if t["group"] == "scene_0" else "target-test"
        png = cv2.imread(str(out / split / "images" / f"{t['tile_id']}.png"))
        shown = cv2.imdecode(np.frombuffer(session.tile_png(t["tile_id"]), np.uint8), cv2.IMREAD_COLOR)
        assert np.array_equal(png, shown)


def test_a_random_sample_of_the_tiles_is_shown_and_the_rest_left_out(tmp_path, capsys):
    """``--sample 0.25``: a seeded quarter of the tiles, the same at every start; data prepare keeps only those."""
    from aerosynth.data.errors import InputError
    from aerosynth.flows.flag_page import FlagSession, FolderLock

    target = tmp_path / "target"
    write_flag_target(target)
    every = [t.tile_id for t in FlagSession(target, 0.25, 32).tiles]
    with FolderLock(target):
        session = FlagSession(target, 0.25, 32, sample=0.25)
        shown = [t.tile_id for t in session.tiles]
        assert len(shown) == 50 and shown == [t for t in every if t in set(shown)]  # the page's order kept
        assert {g.split("_")[0] + "_" + g.split("_")[1] for g in shown} == {"scene_0", "scene_1"}
        assert [t.tile_id for t in FlagSession(target, 0.25, 32, sample=0.25).tiles] == shown  # resumes the same
        state = session.state()
        assert (state["all_tiles"], state["total"], len(state["tiles"])) == (200, 50, 50)
        outside = next(t for t in every if t not in set(shown))
        with pytest.raises(InputError, match="not a tile of this page"):
            session.set_flags({outside: True})
        flags = {t: i % 3 == 0 for i, t in enumerate(shown)}
        assert session.set_flags(flags) == {"done": 50, "vehicles": sum(flags.values()), "total": 50}
    assert main(["flag", str(target), *TILE_ARGS, "--sample", "0"]) != 0
    assert "--sample: a share of the tiles in (0, 1], got 0.0" in capsys.readouterr().err
    args = ["data", "prepare", "--source", FIXTURES / "yolo_domain", "--source-gsd", "0.25", "--target", target]
    args = [str(a) for a in [*args, *TILE_ARGS, "--test-groups", "scene_1"]]
    assert main([*args, "--out", str(tmp_path / "refused")]) != 0  # the unflagged tiles are not silently empty
    assert "--unflagged empty|skip" in capsys.readouterr().err.splitlines()[-1]
    out = tmp_path / "tiles"
    assert main([*args, "--unflagged", "skip", "--out", str(out)]) == 0, capsys.readouterr().err
    prepared = {
        t["tile_id"]: t["has_vehicle"]
        for s in ("target-train", "target-test")
        for t in json.loads((out / s / "tiles.json").read_text())["tiles"]
    }
    assert prepared == flags
    # derived needs the source-only detector: adapt's rule, refused here with one line saying where it goes
    assert main([*args, "--unflagged", "derived", "--out", str(tmp_path / "derived")]) != 0
    assert "data: {unflagged: derived}" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "derived").exists()
