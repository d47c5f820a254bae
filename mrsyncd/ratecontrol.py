"""
Pacing: how many bytes the sender may put on the wire, and when.

A token bucket refilled from the injected clock.  The sender asks it for an
allowance on every reactor tick, so the rate holds however late the timer
fires, and a burst after a stall is capped by the bucket's depth instead of
flooding switch buffers.  Pure logic: tested with ``task.Clock``.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime


class Pacer:
    def __init__(self, clock: IReactorTime, rate_bps: float, burst_seconds: float = 0.01) -> None:
        if rate_bps <= 0:
            raise ValueError("rate must be positive")
        self.clock = clock
        self.burst_seconds = burst_seconds
        self._rate = rate_bps / 8.0
        self._tokens = 0.0
        self._last = clock.seconds()

    @property
    def rate_bps(self) -> float:
        return self._rate * 8.0

    @rate_bps.setter
    def rate_bps(self, value: float) -> None:
        if value <= 0:
            raise ValueError("rate must be positive")
        self._refill()
        self._rate = value / 8.0

    @property
    def burst(self) -> float:
        """Bucket depth in bytes; never less than one jumbo datagram."""
        return max(self._rate * self.burst_seconds, 9000.0)

    def _refill(self) -> None:
        now = self.clock.seconds()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self._rate)
        self._last = now

    def allowance(self) -> float:
        """Bytes that may be sent now."""
        self._refill()
        return self._tokens

    def spend(self, nbytes: int) -> None:
        # Refill first: what was earned since the last reading is counted
        # before the spend, so the cap cannot forgive it.
        self._refill()
        self._tokens -= nbytes

    def delay(self, nbytes: int) -> float:
        """Seconds until ``nbytes`` may be sent."""
        self._refill()
        return max(0.0, (nbytes - self._tokens) / self._rate)


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
