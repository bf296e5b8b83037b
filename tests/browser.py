"""Headless Chromium for the tests that look at a page in a real browser.

Debian's `chromium` and `chromium-driver` packages (/usr/bin/chromium, /usr/bin/chromedriver)
through Selenium 4, with the driver named outright so that Selenium Manager never looks
for (or downloads) one. Where either binary is missing the test is skipped, saying which.

    with chromium() as driver:
        driver.get(url)
        wait_for(driver, "#live table", text="t_00003")
        screenshot(driver, tmp_path / "page.png")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW = (1280, 1024)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _missing() -> str | None:
    """Why the browser cannot run here, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} is missing: apt-get install {package}"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install 'selenium>=4.20'"
    return None


@contextlib.contextmanager
def chromium(window: tuple[int, int] = WINDOW) -> Iterator[object]:
    """A headless Chromium WebDriver, quit on the way out; pytest.skip where there is none."""
    why = _missing()
    if why:
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: containers (and root) have no user namespaces for Chromium's sandbox;
    # --disable-dev-shm-usage: a container's /dev/shm is often 64 MB, too small for tabs.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={window[0]},{window[1]}"):  # fmt: skip
        options.add_argument(arg)
    # A private profile folder: two tests (or two workers) never share one, or its lock.
    profile = Path(tempfile.mkdtemp(prefix="raygpt-chromium-"))
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, css: str, text: str | None = None, timeout: float = 10.0):
    """The first element matching `css` (whose text holds `text`, where given), once there
    is one; an AssertionError naming what never appeared, with the page's text, otherwise."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while True:
        try:
            for element in driver.find_elements(By.CSS_SELECTOR, css):
                if text is None or text in element.text:
                    return element
        except StaleElementReferenceException:
            pass  # the page swapped the element while we read it: look again
        if time.monotonic() > deadline:
            body = driver.find_element(By.TAG_NAME, "body").text
            wanted = f"{css!r}" + (f" holding {text!r}" if text is not None else "")
            raise AssertionError(
                f"no {wanted} on {driver.current_url} within {timeout:g} s; the page:\n"
                + body[-2000:]
            )
        time.sleep(0.1)


def screenshot(driver, path: Path) -> Path:
    """The page as a PNG at `path` (its folder created); AssertionError if none came."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(path)):
        raise AssertionError(f"Chromium saved no screenshot at {path}")
    return path


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG that decodes whole; AssertionError if it is none."""
    from PIL import Image

    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    with Image.open(path) as image:
        assert image.format == "PNG", f"{path} is {image.format}, not a PNG"
        image.load()  # decodes every row: a truncated or corrupt file raises here
        return image.size
