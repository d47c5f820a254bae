"""
Multicast sockets for IPv4 and IPv6, configured by hand and adopted by the
reactor.

Twisted 22.4 (Debian 12) has no IPv6 multicast, and the IPv6 support of later
releases joins on the wrong interface and leaves the hop limit unset; its
IPv4 `joinGroup` also lets the kernel pick the interface unless told.  One
code path for both families, through ``reactor.adoptDatagramPort``, keeps the
behaviour the same everywhere: the group is always joined on the configured
interface, ``IP_MULTICAST_ALL`` is off so that a socket sees only its own
group, and the receive buffer is read back so that a capped one is reported.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from dataclasses import dataclass

from twisted.internet.interfaces import IListeningPort, IReactorSocket
from twisted.internet.protocol import DatagramProtocol

from mrsyncd import logs

log = logs.logger(__name__)

# Linux constants that the socket module does not export on every version.
IP_MULTICAST_ALL = 49
IPV6_MULTICAST_ALL = 29
SIOCGIFADDR = 0x8915
SIOCGIFMTU = 0x8921
#: The socket's memory figures (SK_MEMINFO_*): receive queue and drops among them.
SO_MEMINFO = 55
_MEMINFO = struct.Struct("@9I")
_RMEM_ALLOC, _RCVBUF, _DROPS = 0, 1, 8

DEFAULT_RCVBUF = 4 << 20
#: The MTU every Ethernet carries, and the header a frame adds to a packet.
ETHERNET_MTU = 1500
ETHERNET_HEADER = 14
DEFAULT_SNDBUF = 4 << 20


class InterfaceError(ValueError):
    """The configured interface does not exist or has no address of that family."""


@dataclass(frozen=True)
class Channel:
    """Where one transfer's datagrams go: a group and port on one interface."""

    group: str
    port: int
    #: An interface name (``eth0``) or one of its addresses; empty lets the
    #: kernel choose, which is only sensible on a host with one interface.
    interface: str = ""
    ttl: int = 1
    loopback: bool = True

    def __post_init__(self) -> None:
        address = ipaddress.ip_address(self.group)
        if not address.is_multicast:
            raise ValueError(f"{self.group} is not a multicast address")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is out of range")
        if not 0 <= self.ttl <= 255:
            raise ValueError(f"ttl {self.ttl} is out of range")

    @property
    def family(self) -> socket.AddressFamily:
        version = ipaddress.ip_address(self.group).version
        return socket.AF_INET6 if version == 6 else socket.AF_INET

    @property
    def address(self) -> tuple[str, int]:
        return (self.group, self.port)

    @property
    def frame_overhead(self) -> int:
        """
        Bytes a datagram takes on the link beyond its UDP payload: the UDP
        and IP headers and the Ethernet header, which queues (and a
        switch's buffers) count.  A rate is a rate on the wire: paced by
        the payload alone, a 1452-byte datagram took 2.9% more of the link
        than the rate said.
        """
        return 8 + (40 if self.family == socket.AF_INET6 else 20) + ETHERNET_HEADER

    def payload_room(self) -> int:
        """
        The largest UDP payload that one packet on this channel's interface
        carries whole: its MTU (read only where an interface is named, else
        taken as 1500), at most Ethernet's 1500 bytes and at least the IP
        version's minimum (576, 1280), less the IP and UDP headers.  On IPv4,
        whose header is 20 bytes shorter than IPv6's, a full packet carries
        1.4% more of the file: 1.4% fewer datagrams, and their CPU, a byte
        (the link's share of headers barely moves).  A smaller MTU (a
        tunnel, an overlay) would otherwise fragment every datagram.  Jumbo
        frames are left to the operator: an interface's MTU does not say that
        every switch on the path carries them.
        """
        mtu = ETHERNET_MTU
        # No link an IP version runs on is narrower than its minimum MTU.
        least = 1280 if self.family == socket.AF_INET6 else 576
        try:
            index = interface_index(self.interface, self.family)
            if index:
                # By ioctl, not /sys: a socket answers for its own network namespace.
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    request = struct.pack("16si12x", socket.if_indextoname(index).encode(), 0)
                    found = struct.unpack_from("16si", fcntl.ioctl(s.fileno(), SIOCGIFMTU, request))[1]
                    mtu = max(least, min(mtu, found))
        except (OSError, ValueError):
            pass  # No such interface: opening the socket says so, in its place.
        return mtu - (self.frame_overhead - ETHERNET_HEADER)


def interface_index(spec: str, family: socket.AddressFamily) -> int:
    """Resolve an interface name or address to its index (0: the kernel's choice)."""
    if not spec:
        return 0
    try:
        address = ipaddress.ip_address(spec.split("%")[0])
    except ValueError:
        try:
            return socket.if_nametoindex(spec)
        except OSError:
            raise InterfaceError(f"no interface named {spec!r}") from None
    for index, name in socket.if_nameindex():
        if address in _addresses(name, address.version):
            return index
    raise InterfaceError(f"no interface has the address {spec}")


def _addresses(name: str, version: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    if version == 4:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                raw = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                return set()
            return {ipaddress.IPv4Address(raw[20:24])}
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                fields = line.split()
                if fields[-1] == name:
                    found.add(ipaddress.IPv6Address(bytes.fromhex(fields[0])))
    except OSError:
        pass
    return found


def _ip_mreqn(group: str, index: int) -> bytes:
    return struct.pack("=4s4si", socket.inet_aton(group), b"\0" * 4, index)


def sender_socket(channel: Channel, sndbuf: int = DEFAULT_SNDBUF) -> socket.socket:
    """A non-blocking socket that sends to ``channel`` through its interface."""
    index = interface_index(channel.interface, channel.family)
    s = socket.socket(channel.family, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        if channel.family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, channel.ttl)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, int(channel.loopback))
            s.bind(("::", 0))
        else:
            if index:
                s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, _ip_mreqn(channel.group, index))
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, channel.ttl)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, int(channel.loopback))
            s.bind(("0.0.0.0", 0))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def receiver_socket(channel: Channel, rcvbuf: int = DEFAULT_RCVBUF) -> socket.socket:
    """A non-blocking socket joined to ``channel``'s group on its interface."""
    index = interface_index(channel.interface, channel.family)
    s = socket.socket(channel.family, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        granted = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
        if granted < rcvbuf:
            log.warn(
                "receive buffer is {granted} bytes, not the {wanted} asked for: raise "
                "net.core.rmem_max (the package sets it in /usr/lib/sysctl.d/60-mrsyncd.conf; "
                "override it in /etc/sysctl.d/60-mrsyncd.conf) or expect more repairs",
                granted=granted,
                wanted=rcvbuf,
            )
        if channel.family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_ALL, 0)
            s.bind((channel.group, channel.port, 0, index))
            mreq = socket.inet_pton(socket.AF_INET6, channel.group) + struct.pack("@I", index)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        else:
            s.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
            s.bind(channel.address)
            s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, _ip_mreqn(channel.group, index))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def adopt(
    reactor: IReactorSocket, sock: socket.socket, protocol: DatagramProtocol, max_packet: int
) -> IListeningPort:
    """Hand a configured socket to the reactor; the reactor keeps its own copy."""
    try:
        return reactor.adoptDatagramPort(sock.fileno(), sock.family, protocol, max_packet)
    finally:
        sock.close()


# Telling a network queue from a receiver that is short of CPU.  Time spent
# in the socket's receive queue is the reader's delay, not the network's:
# one-way delay is measured from when the kernel took the datagram, and the
# receive queue is watched on its own (how full it is, and what it dropped).
# The kernel stamps each datagram with its arrival (`intake.enable_timestamps`).


def receive_queue(s: socket.socket) -> tuple[float, int] | None:
    """
    ``(share of the receive buffer in use, datagrams dropped since the
    socket opened)``, or None where the kernel does not say (before 4.6).
    Linux gives back the memory of datagrams already read a quarter of the
    buffer at a time (``forward_threshold``), so that quarter is not
    counted: a reader that keeps up shows 0, a full buffer 1.
    """
    try:
        info = _MEMINFO.unpack(s.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO.size))
    except (OSError, struct.error):
        return None
    rcvbuf = max(1, info[_RCVBUF])
    return max(0.0, info[_RMEM_ALLOC] - rcvbuf / 4) / (rcvbuf * 3 / 4), info[_DROPS]
