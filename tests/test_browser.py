"""The app in a real browser (Debian's headless chromium via selenium), clicked through as a new user would.

Saves a screenshot of each tab and prints where. Fails where chromium or chromedriver is missing (a
developer without them can set CARTRIDGE_SKIP_BROWSER=1 to skip it instead; CI never does).
"""

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ASSETS, served_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SHOTS = Path(tempfile.gettempdir()) / "cartridge-desktop-screenshots"
TIMEOUT = 60


def _missing() -> str | None:
    for path, what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromedriver")):
        if not Path(path).exists():
            return f"{what} not found at {path} (apt-get install -y chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    return None


@pytest.fixture
def browser(tmp_path):
    reason = _missing()
    if reason and os.environ.get("CARTRIDGE_SKIP_BROWSER") == "1":
        pytest.skip(reason)
    if reason:
        pytest.fail(f"the browser test cannot run: {reason}", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 "--disable-dev-shm-usage", "--window-size=1400,1050", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


# -- page helpers ----------------------------------------------------------------------------------

def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def wait_text(driver, text, timeout=TIMEOUT, selector="body", fail_on=None):
    """Wait until `text` is visible inside `selector`; returns that element's text. Stops early on `fail_on`."""
    from selenium.webdriver.common.by import By

    deadline = time.time() + timeout
    last = ""
    while time.time() < deadline:
        try:
            last = " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, selector))
            if text.lower() in last.lower():  # some labels are shown in capitals
                return last
            if fail_on and fail_on.lower() in last.lower():
                break
        except Exception:  # the element was re-rendered while being read
            pass
        time.sleep(0.3)
    raise AssertionError(f"{text!r} did not appear in {selector}; it shows:\n{last[-3000:]}")


def wait_value(driver, selector, text, timeout=TIMEOUT):
    """Wait until the text field in `selector` holds `text`."""
    deadline = time.time() + timeout
    value = ""
    while time.time() < deadline:
        value = css(driver, f"{selector} textarea, {selector} input").get_attribute("value") or ""
        if text in value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"{selector} holds {value!r}, not {text!r}")


def wait_for(condition, timeout=TIMEOUT):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.3)


def click_tab(driver, label):
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[role='tab']"):
        if button.text.strip() == label and button.is_displayed():
            button.click()
            time.sleep(0.8)
            return
    raise AssertionError(f"no tab called {label!r}")


def click_text(driver, selector, text):
    from selenium.webdriver.common.by import By

    for element in driver.find_elements(By.CSS_SELECTOR, selector):
        if element.is_displayed() and element.text.strip() == text:
            element.click()
            return
    raise AssertionError(f"nothing {selector!r} reads {text!r}")


def type_into(driver, selector, text, enter=False):
    from selenium.webdriver.common.keys import Keys

    box = css(driver, f"{selector} textarea, {selector} input")
    box.clear()
    box.send_keys(text)
    if enter:
        box.send_keys(Keys.ENTER)


def shot(driver, name) -> Path:
    """A full-page screenshot (the page is taller than the window)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    height = int(driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]["height"])
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1400, "height": min(height, 3000), "deviceScaleFactor": 1, "mobile": False})
    time.sleep(0.5)
    driver.save_screenshot(str(path))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    print(f"screenshot: {path}")
    return path


# -- the test --------------------------------------------------------------------------------------

def streamed(driver, done_text: str, timeout: float = 180) -> list[str]:
    """The distinct texts the last answer showed while it was written, until `done_text` appears."""
    script = ("const m = document.querySelectorAll('#chatbot [data-testid=\"bot\"], #chatbot .message.bot');"
              "return m.length ? m[m.length - 1].innerText : '';")
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        text = driver.execute_script(script) or ""
        if done_text.lower() in text.lower():
            return seen
        if text.strip() and (not seen or text != seen[-1]):
            seen.append(text)
        time.sleep(0.05)
    raise AssertionError(f"{done_text!r} never appeared; the answer showed {seen[-1:]}")


def error_toasts(driver) -> list[str]:
    return [e.text for e in driver.find_elements("css selector", ".toast-body.error") if e.is_displayed()]


def no_error_toast(driver) -> None:
    assert not error_toasts(driver), error_toasts(driver)


def test_a_new_user_clicks_through_every_tab(browser, tmp_path, monkeypatch):
    """The whole first path in one go: pick the sample folder with the in-page folder browser, train it with
    the demo preset, chat with the cartridge as the answer streams in, evaluate and see the chart."""
    driver = browser
    for name in ("DISPLAY", "WAYLAND_DISPLAY"):  # no desktop: Browse… opens the in-page folder browser
        monkeypatch.delenv(name, raising=False)
    with served_app(7980) as (demo, url):
        driver.get(url)
        wait_text(driver, "Cartridge Desktop")
        wait_text(driver, "Your corpora")

        # Library: a bad path is a readable message, closed again
        type_into(driver, "#folder-path", str(tmp_path / "does-not-exist"))
        css(driver, "#scan-btn").click()
        wait_text(driver, "no such folder")
        for close in driver.find_elements("css selector", ".toast-close, button[aria-label='Close']"):
            if close.is_displayed():
                close.click()
        wait_for(lambda: not error_toasts(driver), timeout=15)

        # Browse…: the folder browser opens where the path field points; open sample/ and use it
        type_into(driver, "#folder-path", str(ASSETS))
        css(driver, "#browse-btn").click()
        wait_text(driver, str(ASSETS), selector="#browser-where")
        css(driver, "#browser-subfolders input").click()
        wait_for(lambda: [e for e in driver.find_elements("css selector", "ul[role='listbox'] li")
                          if e.is_displayed() and e.text.strip() == "sample/"])
        click_text(driver, "ul[role='listbox'] li", "sample/")
        wait_text(driver, str(ASSETS / "sample"), selector="#browser-where")
        css(driver, "#browser-use").click()
        wait_value(driver, "#folder-path", str(ASSETS / "sample"))
        wait_text(driver, "history.md", selector="#folder-preview")
        no_error_toast(driver)
        # pick a file in the preview and exclude it
        driver.find_element("xpath", "//*[@id='folder-preview']//li[.//span[normalize-space()='history.md']]"
                                     "//input[@type='checkbox']").click()
        click_text(driver, "button", "Exclude the selected files")
        wait_value(driver, "#exclude-patterns", "history.md")
        css(driver, "#scan-btn").click()
        summary = wait_text(driver, "files included", selector="#manifest-summary")
        assert "5 files included" in summary and "1 skipped" in summary and "tokens in the corpus" in summary
        table = wait_text(driver, "not trained yet", selector="#library-table")
        assert "sample" in table and "handbook.md" in wait_text(driver, "handbook.md")
        shot(driver, "1-library")

        # Train: the demo preset, whose progress the page follows
        click_tab(driver, "Train")
        text = wait_text(driver, "Start training")
        assert "Preset" in text and "Advanced settings" in text and "Distillation loss" in text
        driver.find_element("xpath", "//label[.//span[starts-with(normalize-space(), 'demo —')]]").click()
        wait_text(driver, "trades answer quality for speed")
        css(driver, "#train-btn").click()
        wait_text(driver, "sample", selector="#train-progress")
        wait_text(driver, "running", selector="#train-progress", timeout=30)
        shot(driver, "2-train-running")

        # reopening the page shows the running job
        driver.refresh()
        wait_text(driver, "Your corpora")
        click_tab(driver, "Train")
        wait_text(driver, "running", selector="#train-progress", timeout=30)

        # Chat while the job runs: no corpus, streamed, with the line saying what answered
        click_tab(driver, "Chat")
        wait_text(driver, "Saved chats")
        click_text(driver, "label, span", "No corpus (none)")
        type_into(driver, "#chat-input", "Say hello in five words.")
        css(driver, "#send-btn").click()
        wait_text(driver, "no corpus (none)", timeout=180, selector="#chatbot")
        wait_text(driver, "tokens/s", selector="#chatbot")
        shot(driver, "3-chat-none")

        # Train: the job finishes with a loss curve
        click_tab(driver, "Train")
        card = wait_text(driver, "v1 is ready", timeout=900, selector="#train-progress", fail_on="failed")
        assert "done" in card.lower()
        no_error_toast(driver)
        time.sleep(1.5)
        shot(driver, "4-train-done")

        # Library: the corpus is ready, with its cartridge
        click_tab(driver, "Library")
        table = wait_text(driver, "ready", selector="#library-table")
        assert "MB" in table
        shot(driver, "5-library-ready")

        # Chat with the cartridge
        click_tab(driver, "Chat")
        click_text(driver, "button", "+ New chat")
        click_text(driver, "label, span", "Cartridge")
        type_into(driver, "#chat-input", "When does the makerspace open on Saturdays?")
        css(driver, "#send-btn").click()
        partial = streamed(driver, "sample v1 (cartridge)")
        assert len(partial) >= 2, f"the answer did not stream: {partial}"
        no_error_toast(driver)
        shot(driver, "6-chat-cartridge")

        # Evaluate: the sample questions can be loaded; two uploaded questions are scored in three modes
        click_tab(driver, "Evaluate")
        text = wait_text(driver, "Run evaluation")
        assert "QA file" in text and "Answer NLL by mode" in text
        click_text(driver, "button", "Use the sample questions")
        wait_text(driver, "sample_qa", selector="#eval-qa")
        qa = tmp_path / "two.jsonl"
        qa.write_text("\n".join((ASSETS / "sample_qa.jsonl").read_text().splitlines()[:2]) + "\n")
        css(driver, "#eval-qa button[aria-label='Clear']").click()
        wait_for(lambda: driver.find_elements("css selector", "#eval-qa input[type=file]"))
        css(driver, "#eval-qa input[type=file]").send_keys(str(qa))
        wait_text(driver, "two", selector="#eval-qa")
        css(driver, "#eval-btn").click()
        summary = wait_text(driver, "less KV memory", timeout=600, selector="#eval-summary")
        assert "sample v1 · 2 questions" in summary
        figures = wait_text(driver, "cartridge", selector="#eval-table")
        assert "none (no corpus)" in figures and "icl (folder in context)" in figures and " MB" in figures
        assert driver.find_elements("css selector", "#eval-chart svg, #eval-chart canvas")
        no_error_toast(driver)
        time.sleep(1)
        shot(driver, "7-evaluate")
        # A stream the page itself closed is no app error: Gradio's client logs it as an AbortError ("signal is
        # aborted", "BodyStreamBuffer was aborted") or "Connection errored out", more often on a loaded CPU. App
        # errors show as toasts, checked above.
        logged = driver.get_log("browser")
        assert not [e for e in logged if e.get("level") == "SEVERE"
                    and "favicon" not in e.get("message", "")
                    and "AbortError" not in e.get("message", "")
                    and "Connection errored out" not in e.get("message", "")], logged
