"""Headless Debian Chromium driven by selenium through Debian's chromedriver (no browser
or driver downloads), and the playground interaction the tests and the docs screenshot share.

    python -m tests.deploy.browser http://127.0.0.1:8000 docs/playground.png "Who wrote Hamlet?" 32
    python -m tests.deploy.browser serve docs/playground.png "Who wrote Hamlet?" 32

``serve`` instead of a URL starts ``hguard serve`` (SmolLM2 and the shipped probe) on a
free loopback port for the screenshot and stops it afterwards (`make playground-png`).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.deploy.helpers import tool
from tests.fixtures.servers import hguard_serve, running

CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1000,1150",
)  # fmt: skip


@contextmanager
def chromium() -> Iterator[webdriver.Chrome]:
    """A fresh headless Chromium with its own profile directory; always quit."""
    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager look for downloads
    options = webdriver.ChromeOptions()
    options.binary_location = tool("chromium")
    with tempfile.TemporaryDirectory(prefix="hguard-chromium-") as profile:
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(tool("chromedriver")))
        try:
            yield driver
        finally:
            driver.quit()


def ask(
    driver: webdriver.Chrome, base: str, question: str, timeout_s: float = 120, reload: bool = True
) -> None:
    """Open the playground (unless ``reload`` is false), ask ``question``, wait for the end
    of the stream; an error the page shows fails with its text."""
    if reload:
        driver.get(f"{base}/ui")
    wait = WebDriverWait(driver, timeout_s)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
    box = driver.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question)
    finished = driver.execute_script("return Number(document.body.dataset.finished || 0)")
    driver.find_element(By.ID, "send").click()
    wait.until(  # the stream has ended, with a verdict or an error
        lambda d: d.execute_script("return Number(document.body.dataset.finished || 0)") > finished
    )
    status = driver.find_element(By.ID, "status")
    if "error" in (status.get_attribute("class") or ""):
        raise AssertionError(f"the playground shows an error: {status.text}")


def page_state(driver: webdriver.Chrome) -> dict[str, Any]:
    """What the page shows: tokens with their risk and colour, verdict, risk, layers."""
    state: dict[str, Any] = driver.execute_script(
        """
        const tokens = [...document.querySelectorAll('#answer .tok')].map(t => ({
          text: t.textContent, risk: Number(t.dataset.risk),
          color: getComputedStyle(t).backgroundColor,
          outlined: t.classList.contains('riskiest')}));
        return {
          tokens, answer: document.getElementById('answer').textContent,
          decision: document.getElementById('verdict').dataset.decision,
          badge: document.getElementById('decision').textContent,
          risk: document.getElementById('risk').textContent,
          scope: document.getElementById('scope').textContent,
          note: document.getElementById('note').textContent,
          layers: [...document.querySelectorAll('#layers .bar')].map(b => b.dataset.layer),
          status: document.getElementById('status').textContent,
        };
        """
    )
    return state


def main(argv: list[str]) -> int:
    if argv[0] == "serve":  # the shipped probe on the embedded model, as `make serve` runs
        with tempfile.TemporaryDirectory() as tmp:
            server = hguard_serve("smollm2", "default", Path(tmp) / "serve.log")
            with running(server):
                server.wait_ready()
                return main([server.base_url, *argv[1:]])
    base, out, question = argv[0], Path(argv[1]), argv[2]
    max_tokens = argv[3] if len(argv) > 3 else ""
    with chromium() as driver:
        driver.get(f"{base}/ui")
        driver.execute_script(
            f"document.getElementById('max-tokens').value = '{int(max_tokens or 0) or ''}';"
        )
        ask(driver, base, question, timeout_s=600, reload=False)
        driver.save_screenshot(str(out))
        print(page_state(driver))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
