"""Headless Chromium for the tests that open pages (the eval report, the API's playground).

Debian's chromium (`apt-get install chromium`, done by `.ci/run`) driven by Playwright's Python client; Playwright's
own browser download is never used. `open_page` collects console errors and uncaught page errors so a test can assert
that a page loads cleanly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

# Without the background-networking flags Chromium keeps trying to reach Google's hosts on this closed network.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


def chromium_path() -> str:
    path = os.environ.get("MMRAG_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        # CI installs it; a developer machine without it gets a clear reason instead of a silent pass.
        pytest.fail("headless browser tests need Debian's chromium (apt-get install chromium) or MMRAG_CHROMIUM=/path")
    return path


@dataclass
class PageErrors:
    console: list[str] = field(default_factory=list)
    page: list[str] = field(default_factory=list)

    @property
    def all(self) -> list[str]:
        return self.console + self.page


@contextlib.contextmanager
def open_page(url: str, *, viewport: tuple[int, int] = (1280, 900)) -> Iterator[tuple[Any, PageErrors]]:
    """A loaded page and the errors it reported; the browser closes when the block ends."""
    from playwright.sync_api import sync_playwright

    errors = PageErrors()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.on("console", lambda msg: errors.console.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.page.append(str(exc)))
            page.goto(url, wait_until="load")
            yield page, errors
        finally:
            browser.close()
