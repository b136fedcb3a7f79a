# -*- test-case-name: tests.test_cli -*-
"""
The C{pingated} command: C{check-config}, C{hash-pin}, C{gen-secret}.

Operator tools that run without a reactor.  Errors are one line on stderr
and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import getpass
import secrets
import sys
from collections.abc import Sequence
from typing import TextIO

from pingated import __version__
from pingated.config import ConfigError, load_config
from pingated.pins import hash_pin, weak_pin_reason


def _check_config(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as e:
        print(str(e), file=err)
        return 1
    print(config.summary(), file=out)
    return 0


def _read_pin(stdin: TextIO, err: TextIO) -> str | None:
    if stdin.isatty():
        first = getpass.getpass("PIN: ")
        second = getpass.getpass("PIN again: ")
        if first != second:
            print("pingated hash-pin: the two PINs differ", file=err)
            return None
        return first
    try:
        line = stdin.readline()
    except UnicodeDecodeError:  # a stdin decoding strictly
        line = "\udcff"
    return line.rstrip("\r\n")


def _hash_pin(args: argparse.Namespace, out: TextIO, err: TextIO, stdin: TextIO) -> int:
    pin = _read_pin(stdin, err)
    if pin is None:
        return 1
    if not pin:
        print("pingated hash-pin: no PIN given", file=err)
        return 1
    try:
        pin.encode("utf-8")
    except UnicodeEncodeError:
        # Undecodable bytes (surrogate escapes): a browser always sends UTF-8,
        # so such a hash could never match; one line, not a traceback.
        print("pingated hash-pin: the PIN is not valid UTF-8 text", file=err)
        return 1
    reason = weak_pin_reason(pin)
    if reason is not None and not args.allow_weak:
        print(f"pingated hash-pin: the PIN {reason} (use --allow-weak to accept it)", file=err)
        return 1
    print(hash_pin(pin), file=out)
    return 0


def _gen_secret(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    # 32 random bytes = 256 bits, URL-safe so it pastes into TOML as is.
    print(secrets.token_urlsafe(32), file=out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for the docs and tests)."""
    parser = argparse.ArgumentParser(prog="pingated", description="pingated operator tools")
    parser.add_argument("--version", action="version", version=f"pingated {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file")
    pin = commands.add_parser("hash-pin", help="read a PIN and print its argon2id hash")
    pin.add_argument("--allow-weak", action="store_true", help="accept short or trivial PINs")
    commands.add_parser("gen-secret", help="print a fresh 256-bit secret")
    return parser


def main(
    argv: Sequence[str] | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    stdin: TextIO = sys.stdin,
) -> int:
    """Run one command; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args, out, err)
    if args.command == "hash-pin":
        return _hash_pin(args, out, err, stdin)
    return _gen_secret(args, out, err)
