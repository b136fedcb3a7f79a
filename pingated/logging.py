# -*- test-case-name: tests.test_logging -*-
"""
Where log lines go and what they look like.

By default pingated logs through twisted.logger with twistd's own observer:
one text line per event on stdout (C{twistd -n}, so systemd's journal), or in
twistd's C{--logfile}.  That text form is what the fail2ban filter reads.

C{[log] format = "json"} replaces that observer with L{JsonLinesObserver}:
one JSON object per line (time, level, namespace, message and the event's
own simple fields such as C{ip}), for log shippers that parse JSON.

C{[log] access_log = true} adds one line per answered request
(L{AccessLog}), in the same stream and format as everything else.

Nothing here logs a header value other than Referer and User-Agent, so the
session cookie, the PIN and secrets never reach a log; anything a client
sent is escaped so it cannot start a new line (a forged
C{pingated[security]} line would let a client get someone else banned).
"""

from __future__ import annotations

import json
import string
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.python.components import Componentized
from twisted.web.iweb import IRequest
from zope.interface import implementer

from pingated.config import IPNetwork, LogConfig
from pingated.forwarding import client_ip

access_log = Logger(namespace="pingated.access")

#: Keys of the JSON object that event fields may not overwrite.
_RESERVED = frozenset({"time", "level", "namespace", "message", "traceback"})

_FORMATTER = string.Formatter()


def _format_fields(log_format: str) -> list[str]:
    """The top-level names a log format string refers to (C{"{ip}"} -> C{"ip"})."""
    names: list[str] = []
    try:
        for _, field, _, _ in _FORMATTER.parse(log_format):
            if field:
                name = field.split(".", 1)[0].split("[", 1)[0].rstrip("!")
                if name and name not in names:
                    names.append(name)
    except ValueError:
        return []
    return names


@implementer(ILogObserver)
class JsonLinesObserver:
    """
    Writes each log event as one JSON object on one line.

    Only the fields the event's own format string names are copied (and only
    plain scalars), so an object that happens to ride along on an event --
    a request, a config -- is never dumped.
    """

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        """Format and write one event; never raises into the logging system."""
        try:
            line = self.render(event)
        except Exception:
            line = json.dumps({"message": "unformattable log event"})
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def render(self, event: dict[str, Any]) -> str:
        """The JSON line for C{event} (without the newline)."""
        when = event.get("log_time")
        stamp = (
            datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
            if isinstance(when, int | float)
            else None
        )
        level = event.get("log_level")
        record: dict[str, Any] = {
            "time": stamp,
            "level": getattr(level, "name", "info"),
            "namespace": event.get("log_namespace", ""),
            "message": formatEvent(event),
        }
        log_format = event.get("log_format")
        if isinstance(log_format, str):
            for name in _format_fields(log_format):
                value = event.get(name)
                if name not in _RESERVED and isinstance(value, str | int | float | bool):
                    record[name] = value
        failure = event.get("log_failure")
        if failure is not None:
            try:
                record["traceback"] = failure.getTraceback()
            except Exception:
                record["traceback"] = repr(failure)
        return json.dumps(record, ensure_ascii=False, default=str)


def log_stream(twistd_options: Any) -> IO[str]:
    """
    Where twistd would have written its text log: stdout with C{-n} (or
    C{--logfile=-}), else the C{--logfile} (default C{twistd.log}).
    """
    options = twistd_options or {}
    try:
        logfile = options.get("logfile") or ""
        nodaemon = bool(options.get("nodaemon"))
    except AttributeError:
        return sys.stdout
    if logfile == "-" or (nodaemon and not logfile):
        return sys.stdout
    from twisted.python.logfile import LogFile

    return LogFile.fromFullPath(logfile or "twistd.log")  # type: ignore[no-any-return]


def install_observer(parent: object, config: LogConfig, twistd_options: Any) -> bool:
    """
    Make twistd log through our observer when C{[log] format = "json"}.

    twistd asks its Application for an C{ILogObserver} component after
    C{makeService}; setting one here replaces the text observer (unless
    twistd's own C{--logger} was given, which wins).  Returns whether one was
    installed.
    """
    if config.format != "json" or not isinstance(parent, Componentized):
        return False
    parent.setComponent(ILogObserver, JsonLinesObserver(log_stream(twistd_options)))
    return True


def clean(text: str, limit: int = 2000) -> str:
    """A client-supplied value made safe for one log line: no control characters, no quotes."""
    text = text[:limit]
    out = []
    for char in text:
        code = ord(char)
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0 or char in "\u2028\u2029":
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


class AccessLog:
    """
    One line per answered request, like a combined access log:

        pingated.access 203.0.113.7 "GET /x?y HTTP/1.1" 200 5120 "-" "curl/8.5" site=default

    The address is the real client's (trusted proxies believed), the size is
    the response body.  In JSON mode every part is also its own field.
    """

    def __init__(self, trusted: Sequence[IPNetwork], logger: Logger | None = None) -> None:
        self.trusted = tuple(trusted)
        self.log = logger if logger is not None else access_log

    def __call__(self, request: IRequest, site: str = "") -> None:
        """Log C{request}, which has just been answered."""

        def header(name: bytes) -> str:
            values = request.requestHeaders.getRawHeaders(name)
            return clean(values[0].decode("latin-1")) if values else "-"

        self.log.info(
            '{ip} "{method} {uri} {protocol}" {status} {size} "{referer}" "{agent}" site={site}',
            ip=client_ip(request, self.trusted),
            method=clean(request.method.decode("latin-1"), 32),
            uri=clean(request.uri.decode("latin-1")),
            protocol=clean((getattr(request, "clientproto", b"") or b"-").decode("latin-1"), 16),
            status=getattr(request, "code", 0),
            size=getattr(request, "sentLength", 0),
            referer=header(b"referer"),
            agent=header(b"user-agent"),
            site=site or "-",
        )
