"""
Fixtures shared by the suite: a real demo upstream and a factory for real
gate processes.  Every process is stopped by pid at the end of its test.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import Gate, base_config, deep_update, demo_upstream, free_port


@pytest.fixture(scope="session")
def upstream_url() -> Iterator[str]:
    """The bundled demo upstream, one process for the whole session."""
    with demo_upstream() as url:
        yield url


GateFactory = Callable[..., Gate]


@pytest.fixture
def gate_factory(tmp_path: Any, upstream_url: str) -> Iterator[GateFactory]:
    """
    C{gate_factory(**changes)} starts a gate with the base config updated by
    C{changes} (nested dicts merge); all started gates stop at teardown.
    """
    started: list[Gate] = []

    def make(upstream: str | None = upstream_url, start: bool = True, **changes: Any) -> Gate:
        port = free_port()
        workdir = tmp_path / f"gate{len(started)}"
        workdir.mkdir()
        config = base_config(str(workdir / "state"), port, upstream)
        deep_update(config, changes)
        gate = Gate(str(workdir), config, port)
        started.append(gate)
        if start:
            gate.start()
        return gate

    yield make
    for gate in started:
        gate.stop()


@pytest.fixture
def gate(gate_factory: GateFactory) -> Gate:
    """A gate with the default test configuration in front of the demo upstream."""
    return gate_factory()
