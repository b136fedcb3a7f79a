# -*- test-case-name: tests.test_config -*-
"""
Parsing of the human-friendly duration and size values used in the config.

Kept apart from L{pingated.config} because the CLI and tests use them too, and
because the rules ("90s", "10MB") are part of the outside contract.
"""

from __future__ import annotations

import re

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}
_DURATION_RE = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$", re.IGNORECASE)
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


class UnitError(ValueError):
    """A duration or size value that cannot be understood."""


def parse_duration(value: object) -> int:
    """
    Turn C{30}, C{"90s"}, C{"15m"}, C{"12h"} or C{"30d"} into seconds.

    Integers are seconds so that plain TOML numbers keep working.
    """
    if isinstance(value, bool):
        raise UnitError('must be a duration like 90, "90s", "15m", "12h" or "30d"')
    if isinstance(value, int):
        if value < 0:
            raise UnitError("must not be negative")
        return value
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            number, unit = match.groups()
            return int(number) * _DURATION_UNITS[(unit or "s").lower()]
    raise UnitError('must be a duration like 90, "90s", "15m", "12h" or "30d"')


def parse_size(value: object) -> int:
    """
    Turn C{1048576}, C{"512KB"}, C{"10MB"} or C{"1GB"} into bytes (1 KB = 1024 bytes).

    Binary multiples match what nginx means by C{client_max_body_size 10m}.
    """
    if isinstance(value, bool):
        raise UnitError('must be a size like 1048576, "512KB", "10MB" or "1GB"')
    if isinstance(value, int):
        if value < 0:
            raise UnitError("must not be negative")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            number, unit = match.groups()
            multiplier = _SIZE_UNITS.get(unit.lower())
            if multiplier is not None:
                return int(number) * multiplier
    raise UnitError('must be a size like 1048576, "512KB", "10MB" or "1GB"')
