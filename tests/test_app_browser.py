"""app.py in a real headless browser: Debian's chromium driven by Selenium (chromium-driver).

What a person does: open the page, upload a picture, type a query, click Run, see the overlay and
"round 1" in the history; ask a second round that refers to the first; a screenshot is saved in
the test's folder. ``.ci/run`` installs ``chromium`` and ``chromium-driver`` when they are missing.
"""

from __future__ import annotations

import io
import shutil
import urllib.request

import numpy as np
import pytest
from PIL import Image

from tests.test_app import serve, write_export, write_scene

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
WAIT = 60  # seconds: a round takes well under one; page loads on a busy machine take longer


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # The flags that keep chromium off this machine's closed network and out of a sandbox it
    # cannot have as root; a fresh profile every time.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--disable-sync", "--disable-quic", "--window-size=1400,1800",
                 f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    yield driver
    driver.quit()


def history_captions(driver) -> list[str]:
    gallery = driver.find_element(By.ID, "history")
    return [e.text for e in gallery.find_elements(By.CSS_SELECTOR, ".caption-label") if e.text]


def run_round(driver, query: str, rounds_before: int) -> None:
    box = driver.find_element(By.CSS_SELECTOR, "#query textarea")
    box.clear()
    box.send_keys(query)
    driver.find_element(By.ID, "run").click()
    WebDriverWait(driver, WAIT).until(lambda d: len(history_captions(d)) == rounds_before + 1)


def fetch(url: str) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=30) as response:
        return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB")).astype(int)


def test_two_rounds_in_a_browser(browser, tiny_checkpoints, tmp_path):
    model = write_export(tiny_checkpoints, tmp_path / "export", mask_encoder="pooled")
    scene = write_scene(tmp_path / "scene.png")
    page, url = serve(model, tmp_path / "out")
    try:
        browser.get(url)
        upload = WebDriverWait(browser, WAIT).until(
            expected_conditions.presence_of_element_located(
                (By.CSS_SELECTOR, "#picture input[type=file]")
            )
        )
        upload.send_keys(str(scene))
        WebDriverWait(browser, WAIT).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#picture img")
        )
        run_round(browser, "the red box", 0)
        overlay = WebDriverWait(browser, WAIT).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#overlay img")
        )[0]
        shown = fetch(overlay.get_attribute("src"))
        picture = np.asarray(Image.open(scene).convert("RGB")).astype(int)
        assert shown.shape == picture.shape
        changed = np.abs(shown - picture).sum(axis=2) > 0
        assert changed.any()  # the mask is blended in...
        assert changed.mean() < 0.9  # ...over part of the picture, not all of it
        run_round(browser, "the box right of instance 1 [REF:1]", 1)
        browser.save_screenshot(str(tmp_path / "two_rounds.png"))
        captions = history_captions(browser)
        assert captions[0].startswith("round 1")
        assert captions[1].startswith("round 2")
        assert (tmp_path / "two_rounds.png").stat().st_size > 10_000
        status = browser.find_element(By.ID, "status").text
        assert "Round 2 answered" in status
    finally:
        page.close()
