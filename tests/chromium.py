"""Debian's Chromium through Playwright, as every browser test opens it (headless, no sandbox, no background traffic)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextmanager
def chromium_page(executable: str, # Chromium's path (the `chromium_path` fixture)
                  width: int, height: int, # viewport
                  timeout_ms: int = 60_000) -> Iterator:
    "A fresh Chromium page; the browser is closed afterwards, whatever happens."
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={"width": width, "height": height})
            pg.set_default_timeout(timeout_ms)
            yield pg
        finally:
            browser.close()
