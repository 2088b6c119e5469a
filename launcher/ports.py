"""Addresses and ports: parsing ``HOST:PORT``, picking a free port, and which interface to listen on.

Torch's stores have no authentication, so they listen only where the job's
ranks are: on the loopback interface for a run on one machine, on the
interface of the rendezvous endpoint for several. Torch-free.
"""

from __future__ import annotations

import ipaddress
import socket

from launcher.errors import LaunchError


def parse_endpoint(endpoint: str, what: str = "--rdzv-endpoint") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> (host, port), or LaunchError saying what is wrong."""
    host, sep, port = endpoint.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise LaunchError(f"{what} must be HOST:PORT with a port in 1..65535, got {endpoint!r}")
    return host, int(port)


def free_port(host: str = "127.0.0.1") -> int:
    """A port no one listens on now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None, socket.AF_INET))
    except (OSError, ValueError):
        return False


def local_address_towards(host: str, port: int) -> str:
    """This machine's address on the interface that reaches ``host`` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, port))
            return probe.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def interface_of(address: str) -> str | None:
    """The name of the network interface holding ``address`` (``lo`` for 127.0.0.1), if it can be told."""
    if ipaddress.ip_address(address).is_loopback:
        return "lo"
    try:
        import fcntl
        import struct

        for _, name in socket.if_nameindex():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                try:
                    packed = fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                except OSError:
                    continue
                if socket.inet_ntoa(packed[20:24]) == address:
                    return name
    except (ImportError, OSError):
        pass
    return None
