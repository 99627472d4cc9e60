"""A report page opened in headless Chromium (Playwright, the system browser), offline.

Every request other than the page itself is blocked and counted, console errors and
page errors are collected; both lists must stay empty for a page that works offline.
Screenshots named by the test are copied to ``$MMSAFE_TEST_ARTIFACTS/<folder>`` when set.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


@dataclass
class OfflinePage:
    page: Any
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def shown(self) -> int:
        """Records visible now; the page's own count must agree."""
        visible = self.page.locator(".record:not([hidden])").count()
        assert self.page.inner_text("#shown-count") == str(visible)
        return visible


@contextmanager
def offline_page(path: Path, *, viewport: tuple[int, int] = (1280, 900)) -> Iterator[OfflinePage]:
    """``path`` opened in Chromium with the network off; skips when Chromium or Playwright is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (the test set-up installs it: apt-get install -y chromium)")
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])"
    )
    url = path.as_uri()
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]}, offline=True)
            opened = OfflinePage(page=None)

            def block(route: Any) -> None:
                if route.request.url != url:
                    opened.requests.append(route.request.url)
                    route.abort()
                else:
                    route.continue_()

            context.route("**/*", block)
            page = context.new_page()
            page.on("console", lambda message: opened.errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: opened.errors.append(str(error)))
            page.goto(url)
            opened.page = page
            yield opened
        finally:
            browser.close()
    assert opened.errors == []
    assert opened.requests == []


def keep_screenshots(folder: Path, names: list[str], artifacts_name: str) -> None:
    """Copy the screenshots to ``$MMSAFE_TEST_ARTIFACTS/<artifacts_name>`` when that is set."""
    if os.environ.get("MMSAFE_TEST_ARTIFACTS"):
        target = Path(os.environ["MMSAFE_TEST_ARTIFACTS"]) / artifacts_name
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(folder / name, target)
