"""Screenshots of the Snakemake HTML report, for reviewing it without opening a browser.

The report ``make run`` writes (``{outdir}/report.html``, by default ``output/report.html``) is a
single-file React app with no deep links, so a plain ``chromium --headless --screenshot`` only shows
its landing page. This script starts headless Chromium with the DevTools protocol (through
``websocket-client``, already pinned in constraints.txt), clicks through the report's menu like a
reader would (each category, each subcategory, each result's view and info buttons) and saves one PNG
per view, printing each file it wrote:

* ``00_landing.png``: the start page (workflow description and rule graph);
* ``NN_<category>[_<subcategory>].png``: the result list of a (sub)category;
* ``NN_<category>_<subcategory>_<file>.png``: a result opened, with its caption panel.

The report only offers non-image results such as CSV tables as a download; for those the script also
writes ``..._<file>_preview.png``, the file's content drawn as an HTML table in the report's content
pane (this view is the script's, not the report's). Needs Debian's ``chromium`` (``apt-get install -y
chromium``)::

    .venv/bin/python benchmarks/report_screenshots.py [REPORT] [--out DIR] [--limit N]

REPORT defaults to the report under config.yaml's ``outdir``, DIR to ``report_screens`` beside it;
``--limit N`` takes at most N results per subcategory.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import websocket
import yaml

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1400, 1000

# Clicks the n-th menu link (class "block") whose text is `text`; rows are the result rows of a list.
JS_HELPERS = """
window.__menu = () => [...document.querySelectorAll('#app a.block')];
window.__click = (text) => {
  const a = __menu().find((x) => x.textContent.trim() === text);
  if (!a) return false;
  a.click();
  return true;
};
window.__rows = () => [...document.querySelectorAll('#app table tbody tr')]
  .filter((tr) => tr.querySelectorAll('td:last-child a').length === 2);
"""


class Page:
    """A Chromium tab driven over the DevTools protocol."""

    def __init__(self, ws_url: str) -> None:
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expr: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS error in {expr!r}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait(self, expr: str, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while not self.js(expr):
            if time.monotonic() > end:
                raise TimeoutError(expr)
            time.sleep(0.1)

    def settle(self) -> None:
        """Waits for React to render and for every image in the page to load."""
        time.sleep(0.3)
        self.wait("[...document.images].every((i) => i.complete)")
        time.sleep(0.2)

    def shot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        print(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_chromium(profile: str) -> tuple[subprocess.Popen[bytes], str]:
    """Starts headless Chromium; returns the process and the websocket URL of its first tab."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    port = free_port()
    args = [
        exe,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--window-size={WIDTH},{HEIGHT}",
        f"--remote-debugging-port={port}",
        f"--user-data-dir={profile}",
        "about:blank",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                tabs = [t for t in json.load(r) if t["type"] == "page"]
            if tabs:
                return proc, tabs[0]["webSocketDebuggerUrl"]
        except OSError:
            pass
        if time.monotonic() > end or proc.poll() is not None:
            proc.kill()
            raise SystemExit("chromium did not start")
        time.sleep(0.3)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-")


def short(cell: str) -> str:
    """`cell` with a float rounded to 4 significant digits, so that wide tables fit the window."""
    try:
        return f"{float(cell):.4g}" if "." in cell else cell
    except ValueError:
        return cell


def csv_preview(data_uri: str, name: str) -> str:
    """A data: URI of an HTML page showing the CSV in `data_uri` as a table (floats rounded)."""
    head, _, payload = data_uri.partition(",")
    text = base64.b64decode(payload).decode() if head.endswith(";base64") else payload
    rows = list(csv.reader(io.StringIO(text)))
    cells = "".join(
        "<tr>"
        + "".join(
            f"<{'th' if i == 0 else 'td'}>{html.escape(short(c))}</{'th' if i == 0 else 'td'}>" for c in row
        )
        + "</tr>"
        for i, row in enumerate(rows)
    )
    doc = (
        f"<style>body{{font:11px sans-serif;padding-left:24px}}td,th{{border:1px solid #ccc;padding:2px 3px}}"
        f"table{{border-collapse:collapse}}</style><p><b>{html.escape(name)}</b> ({len(rows) - 1} rows; "
        f"preview drawn by report_screenshots.py, floats rounded to 4 digits)</p><table>{cells}</table>"
    )
    return "data:text/html;base64," + base64.b64encode(doc.encode()).decode()


def take(page: Page, report: Path, out: Path, limit: int | None) -> None:
    page.call("Page.enable")
    page.call(
        "Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False
    )
    page.call("Page.navigate", url=report.resolve().as_uri())
    page.wait(
        "typeof app !== 'undefined' && document.querySelector('#loading-screen')?.style.display === 'none'",
        timeout=120,
    )
    page.js(JS_HELPERS)
    page.settle()
    n = 0
    page.shot(out / f"{n:02d}_landing.png")
    categories: dict[str, dict[str, list[str]]] = page.js("categories")
    for category in sorted(categories, key=str.lower):
        subcategories = sorted(categories[category], key=str.lower)
        for subcategory in subcategories:
            # Back to the start page, so that the content pane shows no stale result.
            page.js("app.setView({navbarMode: 'menu'})")
            page.settle()
            page.js("__click('Workflow')")
            page.settle()
            # A lone category is shown in the menu as "Results".
            if not page.js(f"__click({json.dumps(category)}) || __click('Results')"):
                raise RuntimeError(f"no menu item for category {category!r}")
            page.settle()
            name = slug(category)
            if len(subcategories) > 1:
                if not page.js(f"__click({json.dumps(subcategory)})"):
                    raise RuntimeError(f"no menu item for subcategory {subcategory!r}")
                page.settle()
            name += f"_{slug(subcategory)}"
            n += 1
            page.shot(out / f"{n:02d}_{name}.png")
            count = page.js("__rows().length")
            for i in range(count if limit is None else min(count, limit)):
                # The row's "eye" button shows the result (a download for non-images, not clicked),
                # its "i" button opens the caption panel.
                page.js(f"__rows()[{i}].querySelector('td:last-child a:last-child').click()")
                page.settle()
                path = page.js("app.state.resultPath")
                entry = page.js(f"results[{json.dumps(path)}]")
                view = page.js("document.querySelector('#app ul a[type=button]').getAttribute('href')")
                if view == "#":
                    page.js("document.querySelector('#app ul a[type=button]').click()")
                else:  # a download link: say so in the content pane instead of a stale result
                    note = f"report_screenshots.py: the report offers {path} only as a download."
                    page.js(f"app.setView({{content: 'text', contentText: {json.dumps(note)}}})")
                page.settle()
                n += 1
                base = f"{n:02d}_{name}_{slug(Path(path).stem)}"
                page.shot(out / f"{base}.png")
                if view != "#" and entry["mime_type"] == "text/csv":
                    uri = csv_preview(entry["data_uri"], path)
                    page.js(
                        f"app.setView({{content: 'html', contentPath: {json.dumps(uri)}, hideNavbar: true}})"
                    )
                    page.settle()
                    time.sleep(0.5)
                    page.shot(out / f"{base}_preview.png")
                # Back to the list, for the next row.
                page.js(
                    f"app.setView({{navbarMode: 'subcategory', category: {json.dumps(category)},"
                    f" subcategory: {json.dumps(subcategory)}}})"
                )
                page.settle()


def output_folder() -> Path:
    """The run's output folder: config.yaml's ``outdir`` (the schema's default when it has none),
    relative to the repository, where ``make run`` runs Snakemake."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text()) or {}
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    return ROOT / config.get("outdir", schema["properties"]["outdir"]["default"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report", nargs="?", type=Path, default=output_folder() / "report.html")
    ap.add_argument("--out", type=Path, default=output_folder() / "report_screens")
    ap.add_argument("--limit", type=int, default=None, help="at most this many results per subcategory")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        proc, ws_url = start_chromium(profile)
        try:
            page = Page(ws_url)
            take(page, args.report, args.out, args.limit)
            page.ws.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
