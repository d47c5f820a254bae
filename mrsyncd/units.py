"""
Values as operators write them, in a configuration file or on a command
line: ``host:port`` addresses and rates with k, M or G suffixes.  Their own
module, so that ``mrsync`` parses them without loading the daemon or the
engine.
"""

from __future__ import annotations

from typing import Any

_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_rate(text: str) -> float:
    """``"100M"``, ``"1.5g"``, ``"800k"`` or ``"2e6"``: bits per second."""
    value = text.strip().lower().removesuffix("bit").removesuffix("bps").removesuffix("b")
    unit = value[-1:] if value[-1:] in _UNITS and value[-1:] else ""
    try:
        rate = float(value[: len(value) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"not a rate: {text!r} (try 100M or 1G)") from None
    if not rate > 0:
        raise ValueError(f"rate must be positive: {text!r}")
    return rate


def port_number(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise ValueError("must be a port number from 1 to 65535")
    return value


def split_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError("must be host:port")
    return host.strip("[]"), port_number(int(port)) if port.isdigit() else port_number(port)
