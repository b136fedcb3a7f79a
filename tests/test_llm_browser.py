"""
The chat page recipe of docs/integrations.md, run verbatim in a real browser.

The page is taken from the documentation (only the gate's address and the
model name are filled in), served from a different origin than the gate (a
second loopback port: cross-origin, same site), and calls the LLM route with
C{credentials: 'include'}.  The fake OpenAI server holds back the rest of its
streamed answer until the browser shows the first token, so this also proves
the stream reaches the page chunk by chunk.

Chromium and chromedriver come from Debian (see tests/test_browser.py, whose
C{Browser} helper kills every browser process by pid).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fake_openai import MODEL, Recorded, Reply, ScriptedUpstream, openai_routes
from harness import Gate, base_config, free_port
from selenium.webdriver.common.by import By
from test_browser import Browser

MASTER_KEY = "sk-browser-test-1c9d0b7e2a"
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def chat_page_from_docs() -> str:
    """The HTML block marked as the chat page in docs/integrations.md."""
    with open(os.path.join(DOCS, "integrations.md"), encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"<!-- chat-page:[^>]*-->\s*```html\n(.*?)```", text, re.DOTALL)
    assert match, "docs/integrations.md lost its chat page"
    return match.group(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: Any, upstream_url: str) -> Iterator[dict[str, Any]]:
    """Fake model server, a page server on another origin, a gate, a browser."""
    model = ScriptedUpstream(openai_routes(MASTER_KEY)).start()
    page_holder: dict[str, bytes] = {}

    def page(upstream: ScriptedUpstream, request: Recorded) -> Reply:
        return Reply(200, [("Content-Type", "text/html; charset=utf-8")], page_holder["html"])

    pages = ScriptedUpstream({"/chat.html": page}).start()
    workdir = tmp_path_factory.mktemp("llm-browser")
    port = free_port()
    config = base_config(str(workdir / "state"), port, upstream_url)
    config["llm"] = {
        "enabled": True,
        "path": "/api/llm",
        "upstream": model.url,
        "master_key": MASTER_KEY,
        "allowed_origins": [pages.url],
    }
    gate = Gate(str(workdir), config, port)
    html = chat_page_from_docs()
    html = html.replace('"https://ai.example.com/api/llm"', f'"{gate.url}/api/llm"')
    html = html.replace('"gpt-4o-mini"', f'"{MODEL}"')
    assert gate.url in html and MODEL in html
    page_holder["html"] = html.encode()
    browser: Browser | None = None
    try:
        gate.start()
        browser = Browser("llm-chat")
        yield {"gate": gate, "model": model, "pages": pages, "browser": browser}
    finally:
        if browser is not None:
            browser.close()
        gate.stop()
        pages.stop()
        model.stop()


def _answer(browser: Browser) -> str:
    return str(browser.by_id("answer").text)


def test_chat_page_streams_through_the_gate(setup: dict[str, Any]) -> None:
    """Logged in: the page's fetch gets a streamed answer, first token before the last is sent."""
    gate: Gate = setup["gate"]
    model: ScriptedUpstream = setup["model"]
    browser: Browser = setup["browser"]
    driver = browser.driver
    driver.get(f"{gate.url}/.pingated/health")
    cookie = {"name": "pingated", "value": gate.login(), "path": "/", "httpOnly": True}
    driver.add_cookie({**cookie, "sameSite": "Lax"})
    driver.get(f"{setup['pages'].url}/chat.html")
    driver.find_element(By.CSS_SELECTOR, "#ask button").click()
    browser.wait(lambda d: "Hello" in _answer(browser), "the first token never arrived")
    # The model server is still holding back the rest, waiting for us.
    assert model.released_in_time is None
    assert browser.js("return document.getElementById('answer').dataset.done") is None
    model.release.set()
    browser.wait(
        lambda d: browser.js("return document.getElementById('answer').dataset.done") == "yes",
        "the stream never finished",
    )
    assert _answer(browser) == "Hello from the fake model."
    (seen,) = model.seen("/v1/chat/completions")
    assert seen.all("authorization") == [f"Bearer {MASTER_KEY}"]
    assert seen.header("origin") == setup["pages"].url
    assert MASTER_KEY not in driver.page_source


def test_chat_page_without_session_is_told_to_log_in(setup: dict[str, Any]) -> None:
    """No session: the 401 is readable by the allowed page, which says so."""
    browser: Browser = setup["browser"]
    browser.clear_cookies()
    model: ScriptedUpstream = setup["model"]
    with model.lock:
        model.requests.clear()
    browser.driver.get(f"{setup['pages'].url}/chat.html")
    browser.driver.find_element(By.CSS_SELECTOR, "#ask button").click()
    browser.wait(
        lambda d: _answer(browser) == "Please log in at the gate first.", "no login message"
    )
    assert model.requests == []
