"""The flagging page of ``aerosynth flag``: analysts mark target tiles "vehicle" or "empty" in a browser.

:class:`FlagSession` lists the tiles ``aerosynth data prepare`` will cut from a target folder (the same
resampling and grid: :func:`aerosynth.data.prepare.cut_image`), serves each tile and its neighbourhood in
the image as PNG (cut on request from a few cached images, so thousands of tiles cost no start-up
encoding), and writes every change to ``TARGET/flags.json`` atomically: tile id -> ``true``/``false``,
the file ``data prepare`` and ``adapt`` read (:mod:`aerosynth.data.flags`). Entries the file held
before (image entries, tiles of other grids) are kept.

One writer per folder: the session holds the run lock (:mod:`aerosynth.flows.run_lock`) on ``TARGET/.flags.lock``; a
second session on the same folder is refused. :func:`serve_flag_page` serves the page (plain HTML and
JavaScript, no network resource) with :mod:`http.server` on the local machine.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import cv2
import numpy as np

from aerosynth.data.domains import Domain, open_domain
from aerosynth.data.errors import InputError
from aerosynth.data.flags import FLAGS_FILE, read_flags_file, sample_tiles, write_flags_file
from aerosynth.data.prepare import CutImage, cut_image
from aerosynth.flows.run_lock import work_lock

LOCK_NAME = ".flags.lock"
#: tiles per page of the grid
PAGE_SIZE = 80
#: tiles around the shown one in the context view, on each side
CONTEXT_TILES = 2
#: longest side of the context view, pixels
CONTEXT_PX = 384


@dataclass(frozen=True)
class TileRef:
    """Where one tile of the page is: its id, the index of its image in the domain, its offsets."""

    tile_id: str
    image: int
    x0: int
    y0: int


def flags_folder(target: Path) -> Path:
    """The folder that holds the target's flag files: the folder itself, or a COCO json's folder."""
    return target.parent if target.is_file() else target


class FolderLock:
    """One ``aerosynth flag`` per folder: the run lock of :mod:`aerosynth.flows.run_lock` on
    ``FOLDER/.flags.lock``, released when the session or its process ends.

    Raises:
        InputError: another process holds it (another ``aerosynth flag`` on the same folder).
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self._held: contextlib.ExitStack | None = None

    def acquire(self) -> FolderLock:
        held = contextlib.ExitStack()
        held.enter_context(
            work_lock(
                self.path.parent,
                command="aerosynth flag",
                create=False,
                name=LOCK_NAME,
                busy="already being flagged ({holder}); one aerosynth flag per folder",
                reentrant=False,
            )
        )
        self._held = held
        return self

    def release(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class FlagSession:
    """The tiles of a target folder and their flags, with ``flags.json`` written after every change.

    Args:
        target: the target folder (``images/``, GeoTIFFs) or COCO json, as given to ``data prepare``.
        gsd: metres per pixel of the tiles (``data prepare --gsd``).
        tile_size: tile side in pixels (``data prepare --tile-size``).
        target_gsd: metres per pixel of plain target images (``data prepare --target-gsd``).
        bands: band selection of rasters with other than three bands.
        sample: the share of the tiles the page shows (a seeded draw, :func:`aerosynth.data.flags.sample_tiles`,
            the same at every start): flagging a random share of a region instead of all of it. The other tiles
            stay unflagged; ``data.unflagged: derived`` lets the source-only detector flag them,
            ``data prepare --unflagged skip`` (``data.unflagged: skip``) leaves them out.
        seed: the draw's seed.
        progress: called with ``(images read, images)`` while the tiles are listed.

    Raises:
        InputError: the folder cannot be opened as a domain, its flags file is malformed, or no tile can be cut.
    """

    def __init__(
        self,
        target: str | Path,
        gsd: float = 0.125,
        tile_size: int = 128,
        target_gsd: float | None = None,
        bands: list[int] | None = None,
        sample: float = 1.0,
        seed: int = 0,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.target = Path(target)
        self.gsd = gsd
        self.tile_size = tile_size
        self.domain: Domain = open_domain(self.target, target_gsd, bands)
        self.flags_path = flags_folder(self.target) / FLAGS_FILE
        self.flags: dict[str, bool] = read_flags_file(self.flags_path)
        self.tiles: list[TileRef] = []
        self._cuts: OrderedDict[int, CutImage] = OrderedDict()
        self._png: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.RLock()
        images = self.domain.images
        for i in range(len(images)):
            cut = self._cut(i)
            self.tiles += [TileRef(tid, i, t.x0, t.y0) for tid, t in cut.tiles(tile_size, "grid")]
            if progress:
                progress(i + 1, len(images))
        if not self.tiles:
            raise InputError(self.target, f"no tile of {tile_size} px at {gsd} m/px can be cut from these images")
        self.all_tiles = len(self.tiles)
        if sample < 1:
            shown = set(sample_tiles([t.tile_id for t in self.tiles], sample, seed, "--sample"))
            self.tiles = [t for t in self.tiles if t.tile_id in shown]
        self.by_id = {t.tile_id: t for t in self.tiles}

    def _cut(self, image: int) -> CutImage:
        with self._lock:
            if image in self._cuts:
                self._cuts.move_to_end(image)
                return self._cuts[image]
            cut = cut_image(self.domain, self.domain.images[image], self.gsd, boxes=False)
            self._cuts[image] = cut
            while len(self._cuts) > 2:
                self._cuts.popitem(last=False)
            return cut

    def state(self) -> dict:
        """What the page shows: the tiles (id, image name, offsets), their flags, the counts."""
        names = [im.path.name for im in self.domain.images]
        with self._lock:
            flags = {t.tile_id: self.flags[t.tile_id] for t in self.tiles if t.tile_id in self.flags}
        return {
            "target": str(self.target),
            "flags_file": str(self.flags_path),
            "gsd": self.gsd,
            "tile_size": self.tile_size,
            "page_size": PAGE_SIZE,
            "tiles": [[t.tile_id, names[t.image], t.x0, t.y0] for t in self.tiles],
            "all_tiles": self.all_tiles,
            "flags": flags,
            **self.counts(),
        }

    def counts(self) -> dict:
        """Tiles flagged (``done``), of them with a vehicle, and all tiles."""
        with self._lock:
            given = [self.flags[t.tile_id] for t in self.tiles if t.tile_id in self.flags]
        return {"done": len(given), "vehicles": sum(given), "total": len(self.tiles)}

    def set_flags(self, updates: dict) -> dict:
        """Apply ``tile id -> true | false | null`` (null: unflag) and write ``flags.json`` atomically.

        Raises:
            InputError: an id that is not a tile of the page, or a value other than true/false/null.
        """
        for key, value in updates.items():
            if key not in self.by_id:
                raise InputError(key, "not a tile of this page")
            if value is not None and not isinstance(value, bool):
                raise InputError(key, f"flag must be true, false or null, got {value!r}")
        with self._lock:
            for key, value in updates.items():
                if value is None:
                    self.flags.pop(key, None)
                else:
                    self.flags[key] = value
            write_flags_file(self.flags_path, self.flags)
            return self.counts()

    def _encode(self, key: str, make: Callable[[], np.ndarray]) -> bytes:
        with self._lock:
            if key in self._png:
                self._png.move_to_end(key)
                return self._png[key]
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(make()[:, :, ::-1]))
        if not ok:
            raise RuntimeError(f"could not encode {key}")
        data = buf.tobytes()
        with self._lock:
            self._png[key] = data
            while len(self._png) > 4096:
                self._png.popitem(last=False)
        return data

    def tile_png(self, tile_id: str) -> bytes:
        """The tile's pixels, as ``data prepare`` writes them, encoded as PNG."""
        t = self.by_id[tile_id]
        s = self.tile_size
        return self._encode(f"tile/{tile_id}", lambda: self._cut(t.image).rgb[t.y0 : t.y0 + s, t.x0 : t.x0 + s])

    def context_png(self, tile_id: str) -> bytes:
        """The tile's neighbourhood in its image (:data:`CONTEXT_TILES` tiles each side), the tile outlined."""
        t = self.by_id[tile_id]

        def make() -> np.ndarray:
            rgb = self._cut(t.image).rgb
            h, w = rgb.shape[:2]
            s, m = self.tile_size, self.tile_size * CONTEXT_TILES
            x1, y1, x2, y2 = max(0, t.x0 - m), max(0, t.y0 - m), min(w, t.x0 + s + m), min(h, t.y0 + s + m)
            crop = np.ascontiguousarray(rgb[y1:y2, x1:x2])
            k = CONTEXT_PX / max(crop.shape[:2])  # small tiles enlarged, large neighbourhoods shrunk
            size = (max(1, round(crop.shape[1] * k)), max(1, round(crop.shape[0] * k)))
            crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_NEAREST)
            a = (round((t.x0 - x1) * k), round((t.y0 - y1) * k))
            b = (round((t.x0 - x1 + s) * k) - 1, round((t.y0 - y1 + s) * k) - 1)
            cv2.rectangle(crop, a, b, (255, 220, 0), 2)
            return crop

        return self._encode(f"context/{tile_id}", make)


def _handler(session: FlagSession) -> type[BaseHTTPRequestHandler]:
    page = PAGE_HTML.encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
            return

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header(
                "Cache-Control", "no-store" if content_type.startswith("application/json") else "max-age=3600"
            )
            self.end_headers()
            self.wfile.write(body)

        def _json(self, doc: dict, status: int = HTTPStatus.OK) -> None:
            self._send(status, json.dumps(doc).encode(), "application/json; charset=utf-8")

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = unquote(urlparse(self.path).path)
            try:
                if path == "/":
                    self._send(HTTPStatus.OK, page, "text/html; charset=utf-8")
                elif path == "/api/state":
                    self._json(session.state())
                elif path.startswith("/tile/") and path.endswith(".png") and path[6:-4] in session.by_id:
                    self._send(HTTPStatus.OK, session.tile_png(path[6:-4]), "image/png")
                elif path.startswith("/context/") and path.endswith(".png") and path[9:-4] in session.by_id:
                    self._send(HTTPStatus.OK, session.context_png(path[9:-4]), "image/png")
                else:
                    self._json({"error": f"{path}: not found"}, HTTPStatus.NOT_FOUND)
            except InputError as exc:
                self._json({"error": str(exc)}, HTTPStatus.INTERNAL_SERVER_ERROR)

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            if urlparse(self.path).path != "/api/flags":
                self._json({"error": "not found"}, HTTPStatus.NOT_FOUND)
                return
            try:
                doc = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not isinstance(doc, dict) or not isinstance(doc.get("flags"), dict):
                    raise InputError("request", 'expected {"flags": {tile id: true | false | null}}')
                self._json(session.set_flags(doc["flags"]))
            except (ValueError, InputError) as exc:
                self._json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)
            except OSError as exc:  # the flags file could not be written: the page says so
                self._json({"error": f"{session.flags_path}: {exc.strerror or exc}"}, HTTPStatus.INTERNAL_SERVER_ERROR)

    return Handler


def make_server(session: FlagSession, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """The HTTP server of the page (``port`` 0: a free port; its address is ``server.server_address``)."""
    server = ThreadingHTTPServer((host, port), _handler(session))
    server.daemon_threads = True
    return server


def serve_flag_page(server: ThreadingHTTPServer) -> None:
    """Serve until interrupted (Ctrl-C), then close the server."""
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


PAGE_HTML = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>aerosynth flag</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;background:#1d1f21;color:#e6e6e6}
header{position:sticky;top:0;background:#26292c;padding:8px 12px;display:flex;gap:16px;align-items:center;z-index:2;
 flex-wrap:wrap}
header button{background:#3a3f44;color:#eee;border:1px solid #555;border-radius:4px;padding:4px 10px;cursor:pointer}
#save.err{color:#ff7b7b}#save.ok{color:#8fd18f}
main{display:flex;gap:12px;padding:12px}
#grid{display:grid;grid-template-columns:repeat(10,100px);gap:6px;align-content:start}
.tile{position:relative;width:100px;height:100px;border:3px solid #444;box-sizing:border-box;cursor:pointer}
.tile img{width:100%;height:100%;display:block;image-rendering:pixelated}
.tile.vehicle{border-color:#e0443c}.tile.empty{border-color:#3c8f5a}.tile.empty img{opacity:.55}
.tile.cursor{outline:3px solid #4aa3ff;outline-offset:2px}
.tile .mark{position:absolute;left:2px;bottom:2px;font-size:11px;background:#000a;padding:0 3px}
aside{flex:1 1 300px;min-width:240px;max-width:400px;position:sticky;top:56px;align-self:flex-start}
aside img{max-width:100%;border:1px solid #555}
kbd{background:#333;border:1px solid #555;border-radius:3px;padding:0 4px}
</style></head><body>
<header><b>aerosynth flag</b><span id="progress">loading...</span><span id="save"></span>
<span><button id="prev">&larr; page</button> <span id="page"></span> <button id="next">page &rarr;</button></span>
<button id="rest">rest of page empty (<kbd>E</kbd>)</button></header>
<main><div id="grid"></div><aside>
<div id="info"></div><p><img id="context" alt="the tile in its image"></p>
<p>click or <kbd>v</kbd>/<kbd>space</kbd>: vehicle on/off &middot; <kbd>e</kbd>: empty, next tile &middot;
<kbd>&larr;</kbd><kbd>&rarr;</kbd><kbd>&uarr;</kbd><kbd>&darr;</kbd>: move &middot; <kbd>n</kbd>/<kbd>p</kbd>: page
&middot; <kbd>u</kbd>: next unflagged &middot; <kbd>x</kbd>: clear &middot; <kbd>E</kbd>: the page's unflagged tiles
empty</p><p id="file"></p></aside></main>
<script>
"use strict";
let S=null,cursor=0,page=0,queue=Promise.resolve(),pending=0;
const $=id=>document.getElementById(id),COLS=10;
function flagOf(i){const v=S.flags[S.tiles[i][0]];return v===undefined?null:v}
function pages(){return Math.ceil(S.tiles.length/S.page_size)}
function render(){
  const g=$("grid");g.innerHTML="";const a=page*S.page_size,b=Math.min(S.tiles.length,a+S.page_size);
  for(let i=a;i<b;i++){const t=S.tiles[i],d=document.createElement("div");d.className="tile";d.id="t-"+t[0];
    d.dataset.index=i;d.dataset.tile=t[0];const im=document.createElement("img");im.loading="lazy";
    im.src="/tile/"+encodeURIComponent(t[0])+".png";im.alt=t[0];d.appendChild(im);
    const m=document.createElement("span");m.className="mark";d.appendChild(m);
    d.addEventListener("click",()=>{cursor=i;toggle(i);paint()});
    d.addEventListener("mouseenter",()=>showContext(i));g.appendChild(d)}
  $("page").textContent="page "+(page+1)+" / "+pages();paint()}
function paint(){
  for(const d of document.querySelectorAll(".tile")){const i=+d.dataset.index,f=flagOf(i);
    d.classList.toggle("vehicle",f===true);d.classList.toggle("empty",f===false);d.classList.toggle("cursor",i===cursor);
    d.dataset.flag=f===null?"":String(f);d.querySelector(".mark").textContent=f===true?"vehicle":f===false?"empty":""}
  const done=Object.keys(S.flags).length,veh=Object.values(S.flags).filter(v=>v).length;
  const of=S.all_tiles>S.tiles.length?" (a random sample of "+S.all_tiles+")":"";
  $("progress").textContent=done+" / "+S.tiles.length+" tiles flagged ("+veh+" vehicle)"+of;
  $("progress").dataset.done=done;
  showContext(cursor)}
function showContext(i){const t=S.tiles[i];$("context").src="/context/"+encodeURIComponent(t[0])+".png";
  $("info").textContent=t[0]+" - "+t[1]+" at x "+t[2]+", y "+t[3]+" ("+S.tile_size+" px, "+S.gsd+" m/px)"}
function save(changes){pending++;$("save").className="";$("save").textContent="saving...";
  queue=queue.then(()=>fetch("/api/flags",{method:"POST",headers:{"Content-Type":"application/json"},
    body:JSON.stringify({flags:changes})})).then(async r=>{const d=await r.json();if(!r.ok)throw new Error(d.error);
    pending--;if(!pending){$("save").className="ok";$("save").textContent="saved"}$("save").dataset.pending=pending})
  .catch(e=>{pending--;$("save").className="err";$("save").textContent="NOT SAVED: "+e.message;
    $("save").dataset.pending=pending})}
function setFlag(i,v){const id=S.tiles[i][0];if(v===null)delete S.flags[id];else S.flags[id]=v;save({[id]:v})}
function toggle(i){setFlag(i,flagOf(i)===true?false:true)}
function move(i){cursor=Math.max(0,Math.min(S.tiles.length-1,i));const p=Math.floor(cursor/S.page_size);
  if(p!==page){page=p;render()}else paint();
  const d=$("t-"+S.tiles[cursor][0]);if(d)d.scrollIntoView({block:"nearest"})}
function restEmpty(){const a=page*S.page_size,b=Math.min(S.tiles.length,a+S.page_size),ch={};
  for(let i=a;i<b;i++)if(flagOf(i)===null){ch[S.tiles[i][0]]=false;S.flags[S.tiles[i][0]]=false}
  if(Object.keys(ch).length)save(ch);paint()}
function nextUnflagged(){for(let k=1;k<=S.tiles.length;k++){const i=(cursor+k)%S.tiles.length;
  if(flagOf(i)===null){move(i);return}}}
document.addEventListener("keydown",e=>{if(!S||e.ctrlKey||e.metaKey||e.altKey)return;const k=e.key;let used=true;
  if(k==="ArrowRight")move(cursor+1);else if(k==="ArrowLeft")move(cursor-1);
  else if(k==="ArrowDown")move(cursor+COLS);else if(k==="ArrowUp")move(cursor-COLS);
  else if(k===" "||k==="v"){toggle(cursor);paint()}else if(k==="e"){setFlag(cursor,false);move(cursor+1)}
  else if(k==="E")restEmpty();else if(k==="x"||k==="Delete"||k==="Backspace"){setFlag(cursor,null);paint()}
  else if(k==="n"||k==="PageDown")move((page+1)*S.page_size);else if(k==="p"||k==="PageUp")move((page-1)*S.page_size);
  else if(k==="u")nextUnflagged();else used=false;if(used)e.preventDefault()});
$("prev").onclick=()=>move((page-1)*S.page_size);$("next").onclick=()=>move((page+1)*S.page_size);
$("rest").onclick=restEmpty;
fetch("/api/state").then(r=>r.json()).then(d=>{S=d;$("file").textContent="saved to "+d.flags_file;
  let first=S.tiles.findIndex((t,i)=>flagOf(i)===null);cursor=first<0?0:first;page=Math.floor(cursor/S.page_size);
  render();document.body.dataset.ready="1"});
</script></body></html>
"""
