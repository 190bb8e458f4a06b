"""What the phone's and SIP's haproxy configurations share (engine/phone/haproxy.py,
engine/sip/haproxy.py): worker addresses, the backend's server lines and the CLI that prints a
configuration. Pure text; no haproxy runs here."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from engine.errors import ConfigError

Address = tuple[str, int]


def parse_address(text: str, example: str = "127.0.0.1:8766") -> Address:
    """``HOST:PORT`` -> (host, port); ConfigError naming the text otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{text!r} is not HOST:PORT (e.g. {example})")
    return host, int(port)


def server_lines(workers: list[Address]) -> list[str]:
    """The backend's servers, each checked every second (out after 2 failures, back after 1)."""
    return [f"    server w{i + 1} {host}:{port} check inter 1s fall 2 rise 1" for i, (host, port) in enumerate(workers)]


def print_config(argv: list[str] | None, module: str, workers_of: str, default_path: str, path_help: str,
                 example: str, config: Callable[[Address, list[Address], str], str]) -> int:
    """``python -m <module> [--bind HOST:PORT] [--path P] WORKER...``: print ``config``'s text;
    a bad address is one line on stderr and exit 2."""
    ap = argparse.ArgumentParser(prog=f"python -m {module}",
                                 description=f"print an haproxy config for {workers_of} workers")
    ap.add_argument("--bind", default="127.0.0.1:8080", help="HOST:PORT haproxy listens on")
    ap.add_argument("--path", default=default_path, help=path_help)
    ap.add_argument("workers", nargs="+", metavar="HOST:PORT", help=f"each worker's {workers_of} address")
    args = ap.parse_args(argv)
    try:
        text = config(parse_address(args.bind, example), [parse_address(w, example) for w in args.workers], args.path)
    except ConfigError as exc:
        print(f"{module}: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0
