"""The configuration file: its documented example, its defaults and its errors."""

from __future__ import annotations

import os
import re

import pytest

from mrsyncd.daemon.config import ConfigError, MasterConfig, NodeConfig, defaults, load, parse

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "etc", "mrsyncd.toml")


def uncommented_example() -> str:
    """etc/mrsyncd.toml with every commented-out key and section switched on."""
    lines = []
    for line in open(EXAMPLE).read().splitlines():
        if re.match(r"#(\[\w+\]|\w+ = )", line):
            line = line[1:]
        lines.append(line)
    return "\n".join(lines)


def test_example_documents_every_key_with_its_default():
    text = uncommented_example()
    # The required keys have no default; give them values to parse at all.
    text = (
        text.replace('master = ""', 'master = "master.example:7718"')
        .replace("roots = []", 'roots = ["/srv"]')
        .replace("sources = []", 'sources = ["/srv"]')
    )
    config = parse(text, EXAMPLE)
    documented = {
        "master": {**vars(config.master), "sources": ()},
        "node": {**vars(config.node), "master": "", "roots": ()},
        "tls": vars(config.tls),
    }
    expected = defaults()
    for section in expected:
        assert set(documented[section]) == set(expected[section]), section
        for key, value in expected[section].items():
            assert documented[section][key] == value, (section, key)
    assert config.log_level == "info"
    # And each key is there, not only parsed to its default.
    for section in expected:
        for key in expected[section]:
            assert f"\n{key} = " in text, f"[{section}] {key} is not in {EXAMPLE}"


def test_example_as_shipped_runs_nothing_and_says_so():
    with pytest.raises(ConfigError, match="neither \\[master\\] nor \\[node\\]"):
        load(EXAMPLE)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[master]\nprot = 1\n", "unknown key 'prot' in \\[master\\]"),
        ("[master]\nport = 70000\n", "\\[master\\] port = 70000: must be a port number"),
        ('[master]\nrate = "fast"\n', "\\[master\\] rate = 'fast'"),
        ('[master]\ngroup = "10.0.0.1"\n', "must be a multicast address"),
        ('[master]\nloopback = "yes"\n', "must be true or false"),
        ("[master]\nblock_size = 100000\n", "block_size"),
        ('[master]\nblock_size = "big"\n', "block_size = 'big': must be \"auto\" or from 512 to 8912"),
        ('[node]\nmaster = "m:1"\n', "\\[node\\] roots is required"),
        ('[node]\nroots = ["/srv"]\n', "\\[node\\] master is required"),
        ('[node]\nmaster = "m"\nroots = ["/srv"]\n', "must be host:port"),
        ('[node]\nmaster = "m:1"\nroots = ["srv"]\n', "not an absolute path"),
        ('[node]\nmaster = "m:1"\nroots = ["/srv"]\nallow_setid = 1\n', "allow_setid = 1: must be true"),
        ("[nodes]\n", "unknown section \\[nodes\\]"),
        ('[log]\nlevel = "loud"\n', "level"),
        ("[master\n", "not valid TOML"),
        ('[master]\nsources = ["/srv"]\ngroup = "239.255.255.254"\n', "runs past the multicast range"),
        ('[master]\nsources = ["/srv"]\nport_base = 65534\n', "runs past port 65535"),
        ("[master]\nport = 1\n", "\\[master\\] sources is required"),
        ('[master]\nsources = ["srv"]\n', "not an absolute path"),
        (
            '[master]\nsources = ["/srv"]\nmax_message_bytes = 1000\n',
            "max_message_bytes = 1000: must be from",
        ),
        ('[node]\nmaster = "m:1"\nroots = ["/srv"]\nmax_message_bytes = 1e9\n', "must be from 1048576"),
        ('[master]\nsources = ["/srv"]\nmax_manifest_entries = 0\n', "must be a positive integer"),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        load(str(path))
    assert str(caught.value).startswith(str(path))


def test_unreadable_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "missing.toml"))


def test_values_are_converted():
    config = parse(
        '[master]\nrate = "250M"\ngrace = 5\nsources = ["/srv"]\n'
        '[node]\nmaster = "[::1]:7718"\nroots = ["/srv"]\n'
    )
    assert isinstance(config.master, MasterConfig) and config.master.rate == 250e6
    assert config.master.grace == 5.0
    assert isinstance(config.node, NodeConfig) and config.node.roots == ("/srv",)
