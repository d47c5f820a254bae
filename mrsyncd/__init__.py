"""mrsyncd: reliable, verified, congestion-controlled multicast file distribution."""

__version__ = "0.1.0"
