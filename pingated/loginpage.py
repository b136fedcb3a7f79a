# -*- test-case-name: tests.test_gate -*-
"""
The HTML of the PIN page.

Self-contained (no external fonts, scripts or images) and fully usable as a
plain form without JavaScript, so it works behind strict CSPs and on any
browser.  Reveals nothing about what sits behind the gate.
"""

from __future__ import annotations

import html

import attrs

BASE_CSS = """
:root { color-scheme: dark; }
* { box-sizing: border-box; }
body { margin: 0; min-height: 100vh; display: flex; align-items: center;
  justify-content: center; background: #111418; color: #e8eaed;
  font: 16px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { width: min(22rem, 92vw); text-align: center; }
h1 { font-size: 1.25rem; font-weight: 500; margin: 0 0 1.5rem; }
form { display: flex; flex-direction: column; gap: 1rem; }
label { font-size: .9rem; color: #9aa0a6; }
input[type=password] { font-size: 1.5rem; letter-spacing: .4em; text-align: center;
  padding: .6rem; border-radius: .6rem; border: 1px solid #3c4043;
  background: #1b1f24; color: inherit; }
button { font-size: 1rem; padding: .7rem; border-radius: .6rem; border: 0;
  background: #3b82f6; color: white; cursor: pointer; }
.error { color: #f28b82; min-height: 1.4em; margin: 0; }
"""


@attrs.frozen
class LoginPageState:
    """What the page must show for one request."""

    action: str
    next: str
    title: str = "Sign in"
    error: str = ""
    extra_css: str = ""


def render_login_page(state: LoginPageState) -> bytes:
    """The complete login page for C{state}, as UTF-8 bytes."""
    error = (
        f'<p class="error" role="alert" id="error">{html.escape(state.error)}</p>'
        if state.error
        else '<p class="error" id="error"></p>'
    )
    extra = f"<style>{_css_text(state.extra_css)}</style>" if state.extra_css else ""
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<title>{html.escape(state.title)}</title>
<style>{BASE_CSS}</style>{extra}
</head>
<body>
<main>
<h1>{html.escape(state.title)}</h1>
<form method="post" action="{html.escape(state.action)}" autocomplete="off">
<input type="hidden" name="next" value="{html.escape(state.next)}">
<label for="pin">PIN</label>
<input type="password" id="pin" name="pin" inputmode="numeric" autocomplete="current-password"
 required autofocus>
{error}
<button type="submit">Unlock</button>
</form>
</main>
</body>
</html>
"""
    return page.encode("utf-8")


def _css_text(css: str) -> str:
    # A stylesheet cannot close the <style> element it is placed in.
    return css.replace("</", "<\\/")
