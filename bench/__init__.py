"""The LAN benchmark (see bench/README.md)."""
