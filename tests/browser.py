"""Headless Chromium for the status page's tests: render a page, keep its screenshot, read its
DOM back as tables. Debian's `chromium` (scripts/chromium.sh installs it); without it the tests
skip, and fail when ``$CI`` is set."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from tests import brokers

# Where CI may collect screenshots from, besides pytest's temporary directory.
ARTEFACTS_ENV = "ESM_TEST_ARTIFACTS"


@dataclass
class Row:
    attrs: dict[str, str]
    cells: list[str] = field(default_factory=list)
    polylines: int = 0


class Page(HTMLParser):
    """A DOM dump read back: the rows of each table by table id (attributes, cell texts and how
    many chart lines each holds), every element id, and the root element's attributes."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.dom = dom
        self.tables: dict[str, list[Row]] = {}
        self.ids: set[str] = set()
        self.root: dict[str, str] = {}
        self._table: str | None = None
        self._in_cell = False
        self._in_svg = 0
        self.feed(dom)

    def rows(self, table: str, key: str) -> dict[str, Row]:
        """The body rows of `table` by their `key` attribute."""
        return {r.attrs[key]: r for r in self.tables[table] if key in r.attrs}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if "id" in values:
            self.ids.add(values["id"])
        row = self._row()
        if tag == "html":
            self.root = values
        elif tag == "table":
            self._table = values.get("id", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append(Row(values))
        elif tag in ("td", "th") and row is not None:
            row.cells.append("")
            self._in_cell = True
        elif tag == "svg":
            self._in_svg += 1
        elif tag == "polyline" and row is not None:
            row.polylines += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif tag in ("td", "th"):
            self._in_cell = False
        elif tag == "svg":
            self._in_svg -= 1

    def handle_data(self, data: str) -> None:
        row = self._row()
        if row is not None and self._in_cell and not self._in_svg:
            row.cells[-1] += data

    def _row(self) -> Row | None:
        rows = self.tables.get(self._table or "", [])
        return rows[-1] if rows else None


def chromium() -> str:
    binary = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if binary is None:
        brokers.skip_or_fail("no chromium on PATH; install it with scripts/chromium.sh")
    return binary


def render(url: str, workdir: Path, *, budget_ms: int = 5000) -> Page:
    """`url` as headless Chromium draws it after `budget_ms` of page time (fetches are waited
    for, timers run ahead); its screenshot is kept as `workdir/status-page.png`, and printed."""
    binary = chromium()
    shot = workdir / "status-page.png"
    command = [
        binary,
        "--headless",
        "--no-sandbox",  # CI containers run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={workdir / 'chromium-profile'}",
        "--window-size=1400,700",
        f"--virtual-time-budget={budget_ms}",
        f"--screenshot={shot}",
        "--dump-dom",
        url,
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except OSError as exc:
        brokers.skip_or_fail(f"{binary} cannot be run: {exc}")
    if done.returncode != 0 or "<html" not in done.stdout:
        brokers.skip_or_fail(f"{binary} did not render {url}: {done.stderr[-2000:]}")
    print(f"status page screenshot: {shot}")
    artefacts = os.environ.get(ARTEFACTS_ENV)
    if artefacts:
        Path(artefacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artefacts) / f"{workdir.name}-{shot.name}")
    assert shot.stat().st_size > 10_000  # a page was drawn, not a blank
    return Page(done.stdout)
