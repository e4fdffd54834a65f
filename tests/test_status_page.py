"""The status page (``GET /status``) in a real headless browser: Debian's ``chromium`` driven
by selenium through Debian's ``chromium-driver`` (``make test`` installs both with
``scripts/services.py browser``; selenium is given both paths, so it never looks for or
downloads a browser or a driver of its own). Without them the test fails, never skips.

Against a real ``feedsvc serve`` process: enter the key, post events through the API, wait
for the page's numbers to change, show and replay a dead letter from the page, and keep a
screenshot (checked to exist and not to be blank). ``FEEDSVC_SCREENSHOT_TO=path`` also
copies it there (how docs/status-page.png is made).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from feedsvc.clock import now_ms
from feedsvc.model import Envelope, FanoutTask
from feedsvc.queue.embedded import EmbeddedQueue
from feedsvc.store.sqlite import SqliteStore
from tests.conftest import SERVICE_KEY, base_settings
from tests.procs import feedsvc, free_port, process_env

WAIT_S = 60


def browser_paths() -> tuple[str, str]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        # Never a skip, as for the servers: the suite needs the real browser.
        pytest.fail("chromium and chromedriver are not installed (`make test` installs them: "
                    "scripts/services.py browser)", pytrace=False)
    return chromium, driver


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    chromium, driver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1400,1250", "--lang=en-US",
                     "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    service = Service(executable_path=driver, log_output=str(tmp_path / "chromedriver.log"))
    chrome = webdriver.Chrome(service=service, options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


def call(url: str, body: object) -> dict[str, object]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {SERVICE_KEY}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, object] = json.loads(response.read())
        return answer


def number(browser: WebDriver, element_id: str) -> int:
    text = browser.find_element(By.ID, element_id).text.replace(",", "")
    return int(text) if text.isdigit() else -1


def dead_letter_rows(browser: WebDriver) -> list[str]:
    return [row.get_attribute("data-dlq-id") or "" for row in
            browser.find_elements(By.CSS_SELECTOR, "#dlq tr[data-dlq-id]:not(.dlq-detail)")]


async def bury_a_fanout(data: Path, event_id: str) -> None:
    """A dead letter as a worker that failed for good leaves it (the embedded queue file)."""
    store = await SqliteStore.open(data / "feedsvc.sqlite3")
    queue = await EmbeddedQueue.open(data / "queue.sqlite3")
    try:
        event = await store.get_event(event_id)
        assert event is not None
        await queue.bury("fanout", "medium", Envelope(FanoutTask(event), now_ms()), "poison",
                         "put here by the browser test")
    finally:
        await queue.close()
        await store.close()


def not_blank(png: Path) -> bool:
    with Image.open(png) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    return image.width >= 800 and (colours is None or len(colours) > 10)


@pytest.mark.slow
def test_status_page_in_a_real_browser(browser: WebDriver, tmp_path: Path) -> None:
    data = tmp_path / "data"
    settings = base_settings(data_dir=data, celebrity_threshold=1_000)
    port = free_port()
    env = process_env(settings, FEEDSVC_PORT=str(port))
    with feedsvc(["serve", "--workers", "2"], env, tmp_path / "serve.log", port) as server:
        author, fans = "author", [f"fan{i}" for i in range(3)]
        call(f"{server.url}/v1/follows/bulk",
             {"follows": [{"user_id": f, "author_id": author} for f in fans]})
        # The page redraws its figures every 2 s: an element found a moment ago may be gone.
        wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.2,
                             ignored_exceptions=(StaleElementReferenceException,))

        browser.get(f"{server.url}/status")
        key = wait.until(lambda b: b.find_element(By.ID, "key"))
        assert key.is_displayed()  # no key in this tab yet: the page asks for it
        key.send_keys(SERVICE_KEY)
        browser.find_element(By.ID, "connect").click()
        wait.until(lambda b: b.find_element(By.ID, "app").is_displayed()
                   and "updated" in b.find_element(By.ID, "updated").text)
        assert browser.execute_script(
            "return sessionStorage.getItem('feedsvc.serviceKey')") == SERVICE_KEY
        fanned_out = number(browser, "fanout-total")
        assert fanned_out >= 0 and browser.find_element(By.ID, "p50").text == "—"

        events = [f"ev{i}" for i in range(6)]
        for event_id in events:
            call(f"{server.url}/v1/events", {"event_id": event_id, "author_id": author,
                                             "kind": "post", "payload": {"text": event_id}})
        wait.until(lambda b: number(b, "fanout-total") >= fanned_out + len(events)
                   and number(b, "posts-total") >= len(events)
                   and b.find_element(By.ID, "p50").text != "—")
        assert number(browser, "rows-total") >= len(events) * (len(fans) + 1)
        assert "serve" in browser.find_element(By.ID, "processes").text
        assert "sqlite" in browser.find_element(By.ID, "deps").text

        asyncio.run(bury_a_fanout(data, events[0]))
        wait.until(lambda b: len(dead_letter_rows(b)) == 1 and number(b, "dead-letters") == 1)
        row = browser.find_element(By.CSS_SELECTOR, "#dlq tr[data-dlq-id]")
        assert "poison" in row.text and events[0] in row.text
        row.find_element(By.CSS_SELECTOR, "button.show").click()
        detail = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#dlq tr.dlq-detail"))
        assert "put here by the browser test" in detail.text
        browser.save_screenshot(str(tmp_path / "status-page-dead-letter.png"))

        before_replay = number(browser, "fanout-total")
        browser.find_element(By.CSS_SELECTOR, "#dlq tr[data-dlq-id] button.replay").click()
        wait.until(lambda b: not dead_letter_rows(b) and number(b, "dead-letters") == 0
                   and "replayed" in b.find_element(By.ID, "dlq-message").text)
        # The replayed task was fanned out again by the server's workers.
        wait.until(lambda b: number(b, "fanout-total") >= before_replay + 1)

        screenshot = tmp_path / "status-page.png"
        assert browser.save_screenshot(str(screenshot))
        assert screenshot.is_file() and screenshot.stat().st_size > 10_000
        assert not_blank(screenshot)
        assert not_blank(tmp_path / "status-page-dead-letter.png")
        keep = os.environ.get("FEEDSVC_SCREENSHOT_TO")
        if keep:
            shutil.copyfile(tmp_path / "status-page-dead-letter.png", keep)

        # A wrong key is refused and forgotten: the page asks again.
        browser.execute_script("sessionStorage.setItem('feedsvc.serviceKey', 'wrong-key')")
        browser.refresh()
        wait.until(lambda b: b.find_element(By.ID, "login").is_displayed()
                   and "refused" in b.find_element(By.ID, "login-error").text)
