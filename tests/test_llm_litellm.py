"""
The LLM route against the real LiteLLM proxy (contract section 4a).

LiteLLM (C{litellm[proxy]} from PyPI, in the test extras) runs as a real
process on loopback with a master key and a model that answers with a
C{mock_response}, so no provider is ever called.  The tests show that a
request through C{/api/llm} succeeds only because the gate injected the key:
the same request straight to LiteLLM, or through a gate holding the wrong
key, is refused.

Skipped only when LiteLLM is not installed.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from harness import BIN, Gate, ManagedProcess, base_config, free_port, wait_for_port

# Only looked up, not imported: importing litellm takes seconds, and the
# proxy runs in its own process anyway.
if importlib.util.find_spec("litellm") is None or not os.path.exists(os.path.join(BIN, "litellm")):
    pytest.skip("litellm is not installed (pip install 'litellm[proxy]')", allow_module_level=True)

MASTER_KEY = "sk-litellm-master-5b2e8f10c7a94d3e"
MOCK_TEXT = "Hello from the LiteLLM mock"
MODEL = "gate-test-model"
ALLOWED = "https://chat.example.com"
#: LiteLLM imports a lot; on a busy 2-core machine it can take a while.
STARTUP_TIMEOUT = 120.0

CONFIG = f"""
model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_key: not-used-because-mocked
      mock_response: "{MOCK_TEXT}"
general_settings:
  master_key: {MASTER_KEY}
litellm_settings:
  telemetry: false
"""


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def litellm_url(tmp_path_factory: Any) -> Iterator[str]:
    """A real LiteLLM proxy for the module; stopped by pid at the end."""
    workdir = tmp_path_factory.mktemp("litellm")
    config_path = workdir / "config.yaml"
    config_path.write_text(CONFIG, encoding="utf-8")
    port = free_port()
    env = {
        # Never fetch the model price list (or anything else) from the internet.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    process = ManagedProcess(
        [
            os.path.join(BIN, "litellm"),
            "--config",
            str(config_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        str(workdir / "litellm.log"),
        cwd=str(workdir),
        env=env,
    )
    try:
        wait_for_port(port, timeout=STARTUP_TIMEOUT, proc=process.proc)
        deadline = time.monotonic() + 30
        while _get(port, "/health/liveliness")[0] != 200:
            assert time.monotonic() < deadline, "LiteLLM never became live"
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


def _gate(tmp_path_factory: Any, upstream_url: str, llm_url: str, key: str) -> Gate:
    workdir = tmp_path_factory.mktemp("litellm-gate")
    port = free_port()
    config = base_config(str(workdir / "state"), port, upstream_url)
    config["llm"] = {
        "enabled": True,
        "path": "/api/llm",
        "upstream": llm_url,
        "master_key": key,
        "allowed_origins": [ALLOWED],
    }
    return Gate(str(workdir), config, port)


@pytest.fixture(scope="module")
def gate(tmp_path_factory: Any, upstream_url: str, litellm_url: str) -> Iterator[tuple[Gate, str]]:
    gate = _gate(tmp_path_factory, upstream_url, litellm_url, MASTER_KEY)
    try:
        gate.start()
        yield gate, f"pingated={gate.login()}"
    finally:
        gate.stop()


def _completion(stream: bool = False) -> bytes:
    return json.dumps(
        {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()


def _post(port: int, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(
            "POST", path, body=body, headers={"Content-Type": "application/json", **headers}
        )
        response = conn.getresponse()
        return response.status, response, response.read()
    finally:
        conn.close()


def test_completion_through_gate_uses_injected_key(
    gate: tuple[Gate, str], litellm_url: str
) -> None:
    """With a session (and a bogus client key) it succeeds; straight to LiteLLM it fails."""
    the_gate, cookie = gate
    status, response, body = _post(
        the_gate.port,
        "/api/llm/v1/chat/completions",
        {"Cookie": cookie, "Authorization": "Bearer sk-bogus-client-key", "Origin": ALLOWED},
        _completion(),
    )
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"] == MOCK_TEXT
    # LiteLLM's own "Access-Control-Allow-Origin: *" was replaced by the gate's answer.
    assert response.getheader("access-control-allow-origin") == ALLOWED
    assert response.getheader("access-control-allow-credentials") == "true"
    assert MASTER_KEY.encode() not in body

    # The same request straight to LiteLLM, without the key or with the client's: refused.
    port = int(litellm_url.rsplit(":", 1)[1])
    for headers in ({}, {"Authorization": "Bearer sk-bogus-client-key"}):
        status, _, _ = _post(port, "/v1/chat/completions", headers, _completion())
        assert status != 200


def test_gate_with_wrong_key_is_refused(
    tmp_path_factory: Any, upstream_url: str, litellm_url: str
) -> None:
    """A gate holding a different key gets no completion: the injected key is what counts."""
    wrong = _gate(tmp_path_factory, upstream_url, litellm_url, "sk-not-the-master-key")
    try:
        wrong.start()
        cookie = f"pingated={wrong.login()}"
        status, _, body = _post(
            wrong.port, "/api/llm/v1/chat/completions", {"Cookie": cookie}, _completion()
        )
        assert status != 200
        assert b"sk-not-the-master-key" not in body
    finally:
        wrong.stop()


def test_models_and_streaming_through_gate(gate: tuple[Gate, str]) -> None:
    """/v1/models and a streamed completion (SSE) work through the route."""
    the_gate, cookie = gate
    status, body = _get(the_gate.port, "/api/llm/v1/models", {"Cookie": cookie})
    assert status == 200
    assert MODEL in [m["id"] for m in json.loads(body)["data"]]
    status, response, body = _post(
        the_gate.port, "/api/llm/v1/chat/completions", {"Cookie": cookie}, _completion(True)
    )
    assert status == 200
    assert response.getheader("content-type", "").startswith("text/event-stream")
    text = body.decode()
    pieces = [
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in text.splitlines()
        if line.startswith("data: {")
    ]
    assert "".join(pieces) == MOCK_TEXT
    assert "data: [DONE]" in text


def test_no_session_never_reaches_litellm(gate: tuple[Gate, str]) -> None:
    """Without a session the gate answers 401 itself."""
    the_gate, _ = gate
    status, _, body = _post(the_gate.port, "/api/llm/v1/chat/completions", {}, _completion())
    assert status == 401
    assert json.loads(body)["error"] == "login required"
