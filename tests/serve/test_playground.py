"""The playground page at / in a real headless Chromium (selenium): type a prompt, press
Generate, and the text streams into the output with a tokens/s figure.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them where apt-get is
available) and selenium (the `test` extra); skipped with the reason otherwise. Set
GPT2_PLAYGROUND_SCREENSHOT=path.png to save a screenshot of the page after generating.
"""

import os
import shutil
import tempfile

import pytest

from serve_support import GREEDY, Running

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,900")


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="gpt2-playground-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_typing_a_prompt_and_pressing_generate_streams_text(browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = Running()
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "tiny-model" in d.find_element(By.ID, "model").text)
        ref = GREEDY[0]
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys(ref["prompt_text"])
        for field, value in (("max_tokens", "20"), ("temperature", "0")):
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "generate").is_enabled() and "tokens/s" in
                   d.find_element(By.ID, "stats").text)
        assert browser.find_element(By.ID, "output").text == ref["full_text"]
        assert browser.find_element(By.ID, "stats").text.startswith("20 tokens")
        assert browser.find_element(By.ID, "error").text == ""
        if os.environ.get("GPT2_PLAYGROUND_SCREENSHOT"):
            browser.save_screenshot(os.environ["GPT2_PLAYGROUND_SCREENSHOT"])
    finally:
        server.stop()


def test_item18_a_refused_request_shows_the_error_instead_of_waiting(browser):
    """A request the server answers with 400 (here max_tokens past the context): the page shows
    the server's message with the status, and no longer says "waiting…"."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = Running()
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "tiny-model" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "prompt").send_keys("Hello")
        element = browser.find_element(By.ID, "max_tokens")
        element.clear()
        element.send_keys("100000")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "generate").is_enabled() and d.find_element(By.ID, "error").text)
        error = browser.find_element(By.ID, "error").text
        assert error.startswith("HTTP 400: ") and "max_tokens" in error, error
        assert browser.find_element(By.ID, "stats").text == "failed"
    finally:
        server.stop()
