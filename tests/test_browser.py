"""
The PIN page in a real browser: Debian's chromium (C{/usr/bin/chromium})
driven through Debian's chromedriver by selenium, against the real
C{twistd -n pingated} process in front of the demo upstream.

Nothing is downloaded: the driver path is given explicitly (so Selenium
Manager never runs) and C{SE_OFFLINE=true} is set.  Chromium talks only to
127.0.0.1.  Every browser process is killed by pid at teardown.

Screenshots land in C{test-artifacts/browser/}.  The README's screenshot
(C{docs/screenshots/login.png}) is refreshed from them when
C{PINGATED_UPDATE_SCREENSHOTS=1} is set (or when it is missing).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from harness import ARTIFACTS, TEST_PIN, Gate, base_config, free_port
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.expected_conditions import staleness_of
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SHOTS = os.path.join(ARTIFACTS, "browser")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_SHOT = os.path.join(REPO, "docs", "screenshots", "login.png")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1024,768",
)
WAIT = 15.0
KEY_LABELS = ["1", "2", "3", "4", "5", "6", "7", "8", "9", "Delete last digit", "0", "Unlock"]

# Selenium must never fetch a driver or a browser (the paths are explicit too).
os.environ["SE_OFFLINE"] = "true"

if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    raise RuntimeError(
        f"{CHROMIUM} and {CHROMEDRIVER} are required: `make system-deps` installs them"
    )


def _descendants(pid: int) -> list[int]:
    """Every process below C{pid} (chromium and its helpers below chromedriver)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
                found.extend(children)
                pending.extend(children)
    return found


class Browser:
    """One headless chromium with a fresh profile; C{close()} kills it by pid."""

    def __init__(self, name: str, javascript: bool = True) -> None:
        self.name = name
        self.profile = tempfile.mkdtemp(prefix="pingated-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        if not javascript:
            options.add_experimental_option(
                "prefs", {"profile.managed_default_content_settings.javascript": 2}
            )
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        os.makedirs(SHOTS, exist_ok=True)
        self.service = Service(
            executable_path=CHROMEDRIVER,
            log_output=os.path.join(SHOTS, f"chromedriver-{name}.log"),
            env={**os.environ, "SE_OFFLINE": "true"},
        )
        self.pids: set[int] = set()
        try:
            self.driver = webdriver.Chrome(service=self.service, options=options)
        except BaseException:
            self.close()
            raise
        self.driver.set_page_load_timeout(WAIT)
        self._remember_pids()

    def _remember_pids(self) -> None:
        process = getattr(self.service, "process", None)
        if process is not None:
            self.pids.add(process.pid)
            self.pids.update(_descendants(process.pid))

    def close(self) -> None:
        """Quit politely, then SIGKILL every pid we saw that is still there."""
        self._remember_pids()
        driver = getattr(self, "driver", None)
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.quit()
        with contextlib.suppress(Exception):
            self.service.stop()
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        process = getattr(self.service, "process", None)
        if process is not None:
            with contextlib.suppress(Exception):
                process.wait(5)
        shutil.rmtree(self.profile, ignore_errors=True)

    # --- helpers ---

    def clear_cookies(self) -> None:
        # Cookies ignore ports: every gate on 127.0.0.1 shares one jar.
        self.driver.execute_cdp_cmd("Network.clearBrowserCookies", {})

    def wait(self, condition: Callable[[Any], Any], message: str, timeout: float = WAIT) -> Any:
        return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(condition, message)

    def by_id(self, element_id: str) -> WebElement:
        return self.driver.find_element(By.ID, element_id)

    def keys(self) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, "#pad button")

    def key(self, key: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, f'#pad button[data-key="{key}"]')

    def dot_count(self) -> int:
        return len(self.driver.find_elements(By.CSS_SELECTOR, "#dots .dot"))

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def shot(self, name: str) -> str:
        path = os.path.join(SHOTS, name)
        self.driver.save_screenshot(path)
        return path

    def severe_console(self) -> list[str]:
        return [
            entry["message"]
            for entry in self.driver.get_log("browser")
            if entry.get("level") == "SEVERE"
        ]

    def open_login(self, url: str) -> None:
        """Open C{url}, which must redirect to the PIN page."""
        self.driver.get_log("browser")  # forget earlier pages' console messages
        self.driver.get(url)
        self.wait(lambda d: "/.pingated/login" in d.current_url, "no redirect to the PIN page")


@pytest.fixture(scope="module")
def default_gate(tmp_path_factory: pytest.TempPathFactory, upstream_url: str) -> Iterator[Gate]:
    """A gate with the default configuration, shared by this module's tests."""
    workdir = tmp_path_factory.mktemp("browser-gate")
    port = free_port()
    gate = Gate(str(workdir), base_config(str(workdir / "state"), port, upstream_url), port)
    try:
        gate.start()
        yield gate
    finally:
        gate.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """A JavaScript-enabled headless chromium shared by this module's tests."""
    instance = Browser("js")
    try:
        yield instance
    finally:
        instance.close()


@pytest.fixture
def fresh(browser: Browser) -> Iterator[Browser]:
    """The shared browser with no cookies and a desktop viewport."""
    browser.clear_cookies()
    yield browser
    with contextlib.suppress(WebDriverException):
        browser.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        browser.driver.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": False})
    with contextlib.suppress(WebDriverException):
        browser.driver.get("about:blank")
        browser.clear_cookies()


def _wait_for_keypad(browser: Browser) -> None:
    browser.wait(lambda d: d.find_element(By.ID, "pad").is_displayed(), "keypad never appeared")


def _login_with_keyboard(browser: Browser, gate: Gate, path: str) -> None:
    browser.open_login(gate.url + path)
    _wait_for_keypad(browser)
    ActionChains(browser.driver).send_keys(TEST_PIN).perform()
    browser.wait(lambda d: browser.dot_count() == len(TEST_PIN), "typed digits not shown")
    ActionChains(browser.driver).send_keys(Keys.ENTER).perform()
    browser.wait(lambda d: d.current_url == gate.url + path, "right PIN did not land on next")


def test_keypad_clicks_wrong_pin_shakes_keyboard_pin_lands(
    fresh: Browser, default_gate: Gate
) -> None:
    """
    Click the keypad (dots, never digits; Delete works), a wrong PIN comes
    back with a shake and an announced error and keeps C{next}; the right
    PIN typed on the keyboard lands on the demo page behind the gate.
    """
    browser, gate = fresh, default_gate
    browser.open_login(gate.url + "/?from=keypad")
    assert parse_qs(urlsplit(browser.driver.current_url).query)["next"] == ["/?from=keypad"]
    _wait_for_keypad(browser)

    # The plain field is replaced by dots and a 3x4 keypad of round buttons.
    assert not browser.by_id("pin").is_displayed()
    keys = browser.keys()
    labels = [k.get_attribute("aria-label") or k.text for k in keys]
    assert labels == KEY_LABELS
    rows = sorted({round(k.rect["y"]) for k in keys})
    columns = sorted({round(k.rect["x"]) for k in keys})
    assert (len(rows), len(columns)) == (4, 3)
    for k in keys:
        assert k.value_of_css_property("border-radius") == "50%"
        assert abs(k.rect["width"] - k.rect["height"]) < 1
    assert browser.driver.title == "Sign in"
    assert browser.severe_console() == []  # nothing blocked by the CSP, no failed loads
    browser.shot("login-desktop.png")

    # Focus order: Tab walks the keypad in reading order (the hidden field is skipped).
    order = []
    for _ in keys:
        ActionChains(browser.driver).send_keys(Keys.TAB).perform()
        order.append(browser.js("return document.activeElement.getAttribute('data-key')"))
    assert order == [*"123456789", "Backspace", "0", "Enter"]
    browser.js("document.activeElement.blur()")

    for digit in "123":
        browser.key(digit).click()
    assert browser.dot_count() == 3
    assert browser.by_id("count").get_attribute("textContent") == "3 digits entered"
    assert "123" not in browser.js("return document.body.innerText")
    assert browser.by_id("pin").get_attribute("value") == ""  # digits stay out of the DOM
    browser.key("Backspace").click()
    assert browser.dot_count() == 2

    browser.key("Enter").click()  # "12" is wrong
    browser.wait(lambda d: "error=pin" in d.current_url, "wrong PIN did not come back")
    _wait_for_keypad(browser)
    assert "/.pingated/login" in browser.driver.current_url
    assert browser.by_id("error").text == "Wrong PIN. Try again."
    assert browser.by_id("error").get_attribute("role") == "alert"
    assert "shake" in browser.driver.find_element(By.CSS_SELECTOR, "main").get_attribute("class")
    entry = browser.by_id("entry")
    assert entry.value_of_css_property("animation-name") == "pg-shake"
    assert float(entry.value_of_css_property("animation-duration").rstrip("s")) < 1
    assert browser.dot_count() == 0
    next_field = browser.driver.find_element(By.NAME, "next")
    assert next_field.get_attribute("value") == "/?from=keypad"
    browser.shot("login-wrong-pin.png")

    # Mouse and keyboard mixed: a clicked stray digit, Backspace, then the PIN
    # and Enter typed (Enter must unlock, not press the last clicked button).
    browser.key("7").click()
    assert browser.dot_count() == 1
    ActionChains(browser.driver).send_keys(Keys.BACKSPACE).perform()
    browser.wait(lambda d: browser.dot_count() == 0, "Backspace did not delete")
    ActionChains(browser.driver).send_keys(TEST_PIN).perform()
    browser.wait(lambda d: browser.dot_count() == len(TEST_PIN), "typed digits not shown")
    assert TEST_PIN not in browser.js("return document.body.innerText")
    ActionChains(browser.driver).send_keys(Keys.ENTER).perform()
    browser.wait(lambda d: d.current_url == gate.url + "/?from=keypad", "did not land on next")
    assert browser.driver.title == "pingated demo"
    assert "you are behind pingated" in browser.driver.find_element(By.TAG_NAME, "h1").text


def test_demo_websocket_echo_works_through_the_gate(fresh: Browser, default_gate: Gate) -> None:
    """After logging in, the demo page's WebSocket echo round-trips in the browser."""
    browser = fresh
    _login_with_keyboard(browser, default_gate, "/")
    browser.wait(
        lambda d: d.find_element(By.ID, "ws-send").is_enabled(),
        "WebSocket never opened: " + browser.by_id("ws-state").text,
        timeout=8,
    )
    field = browser.by_id("ws-input")
    field.clear()
    field.send_keys("hello through the gate")
    browser.by_id("ws-send").click()
    browser.wait(
        lambda d: "\u2190 hello through the gate" in d.find_element(By.ID, "ws-log").text,
        "no echo came back",
        timeout=8,
    )
    browser.shot("demo-websocket.png")


def test_phone_viewport_shows_the_whole_keypad(fresh: Browser, default_gate: Gate) -> None:
    """On phone screens (portrait and landscape) all 12 buttons fit, big enough to tap."""
    browser, gate = fresh, default_gate
    driver = browser.driver
    driver.execute_cdp_cmd(
        "Emulation.setTouchEmulationEnabled", {"enabled": True, "maxTouchPoints": 5}
    )
    for width, height in ((375, 667), (320, 568), (667, 375)):
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 2, "mobile": True},
        )
        browser.open_login(gate.url + "/")
        _wait_for_keypad(browser)
        view = browser.js("return [window.innerWidth, window.innerHeight]")
        assert view == [width, height]
        assert browser.js("return document.documentElement.scrollWidth") <= width
        keys = browser.keys()
        assert len(keys) == 12
        for k in keys:
            box = browser.js("const r = arguments[0].getBoundingClientRect();"
                             "return [r.left, r.top, r.right, r.bottom];", k)
            label = k.get_attribute("aria-label") or k.text
            assert box[0] >= 0 and box[1] >= 0, (width, height, label, box)
            assert box[2] <= width and box[3] <= height, (width, height, label, box)
            assert box[2] - box[0] >= 44, (width, height, label, box)  # a fingertip
    # Portrait again, a few digits tapped: this is the README's screenshot.
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 375, "height": 667, "deviceScaleFactor": 2, "mobile": True},
    )
    browser.open_login(gate.url + "/")
    _wait_for_keypad(browser)
    for digit in "2468":
        browser.key(digit).click()
    assert browser.dot_count() == 4
    browser.js("document.activeElement && document.activeElement.blur()")
    time.sleep(0.3)  # let the key-press transition settle before the picture
    path = browser.shot("login.png")
    if os.environ.get("PINGATED_UPDATE_SCREENSHOTS") == "1" or not os.path.exists(README_SHOT):
        os.makedirs(os.path.dirname(README_SHOT), exist_ok=True)
        shutil.copyfile(path, README_SHOT)


def test_plain_form_login_without_javascript(default_gate: Gate) -> None:
    """With JavaScript disabled the page is a labelled form that logs in (and keeps next)."""
    gate = default_gate
    browser = Browser("nojs", javascript=False)
    try:
        browser.open_login(gate.url + "/?from=nojs")
        html_class = browser.driver.find_element(By.TAG_NAME, "html").get_attribute("class")
        assert "js" not in (html_class or "").split()
        assert not browser.by_id("pad").is_displayed()
        field = browser.by_id("pin")
        assert field.is_displayed()
        assert browser.driver.find_element(By.CSS_SELECTOR, "label[for=pin]").text == "PIN"
        assert browser.driver.switch_to.active_element == field  # autofocus
        browser.shot("login-nojs.png")

        field.send_keys("000000")
        browser.driver.find_element(By.CSS_SELECTOR, "button.plain-submit").click()
        browser.wait(lambda d: "error=pin" in d.current_url, "wrong PIN did not come back")
        assert browser.by_id("error").text == "Wrong PIN. Try again."
        assert browser.driver.find_element(By.NAME, "next").get_attribute("value") == "/?from=nojs"

        browser.by_id("pin").send_keys(TEST_PIN + Keys.ENTER)
        browser.wait(lambda d: d.current_url == gate.url + "/?from=nojs", "did not land on next")
        assert browser.driver.title == "pingated demo"
    finally:
        browser.close()


@pytest.fixture(scope="module")
def custom_gate(tmp_path_factory: pytest.TempPathFactory, upstream_url: str) -> Iterator[Gate]:
    """A gate with a title, a logo, theme CSS and a one-strike throttle."""
    workdir = tmp_path_factory.mktemp("browser-custom-gate")
    (workdir / "logo.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="80" height="40">'
        '<rect width="80" height="40" rx="8" fill="#e11d48"/></svg>'
    )
    (workdir / "theme.css").write_text(".pingated-login { --pg-accent: rgb(225, 29, 72); }\n")
    port = free_port()
    config = base_config(str(workdir / "state"), port, upstream_url)
    config["gate"].update(
        title="Family NAS",
        logo_file=str(workdir / "logo.svg"),
        throttle={"max_failures": 1, "lockout": "15m"},
    )
    config["theme"] = {"css_file": str(workdir / "theme.css")}
    gate = Gate(str(workdir), config, port)
    try:
        gate.start()
        yield gate
    finally:
        gate.stop()


def test_title_logo_and_theme_css(fresh: Browser, custom_gate: Gate) -> None:
    """gate.title, gate.logo_file and [theme] CSS show up on the page, within the CSP."""
    browser = fresh
    browser.open_login(custom_gate.url + "/")
    _wait_for_keypad(browser)
    assert browser.driver.title == "Family NAS"
    assert browser.driver.find_element(By.TAG_NAME, "h1").text == "Family NAS"
    logo = browser.driver.find_element(By.CSS_SELECTOR, "img.logo")
    browser.wait(lambda d: browser.js("return arguments[0].complete", logo), "logo not loaded")
    assert browser.js("return arguments[0].naturalWidth", logo) == 80
    unlock = browser.key("Enter")
    assert unlock.value_of_css_property("background-color") == "rgba(225, 29, 72, 1)"
    assert browser.severe_console() == []
    browser.shot("login-custom.png")


def test_throttled_visitor_sees_the_wait_and_keeps_next(fresh: Browser, custom_gate: Gate) -> None:
    """After too many wrong PINs the page says how long to wait, and next survives."""
    browser = fresh
    browser.open_login(custom_gate.url + "/deep/page?x=1")
    _wait_for_keypad(browser)
    ActionChains(browser.driver).send_keys("99999" + Keys.ENTER).perform()
    browser.wait(lambda d: "error=pin" in d.current_url, "wrong PIN did not come back")
    _wait_for_keypad(browser)
    error = browser.by_id("error").text
    assert error == "Too many attempts. Try again in 15 minutes."
    assert browser.driver.find_element(By.NAME, "next").get_attribute("value") == "/deep/page?x=1"
    # Even the right PIN is refused now (429, the PIN is not checked), same message.
    old_page = browser.driver.find_element(By.TAG_NAME, "html")
    ActionChains(browser.driver).send_keys(TEST_PIN + Keys.ENTER).perform()
    browser.wait(staleness_of(old_page), "the form was not posted")
    _wait_for_keypad(browser)
    assert browser.by_id("error").text == "Too many attempts. Try again in 15 minutes."
    assert "/.pingated/login" in browser.driver.current_url
    assert browser.driver.find_element(By.NAME, "next").get_attribute("value") == "/deep/page?x=1"
    browser.shot("login-throttled.png")
