"""Which address a request came from, when proxies in front of the service may name it."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

from pyramid.request import Request

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=64)
def networks(items: tuple[str, ...]) -> tuple[Network, ...]:
    """The networks a validated setting lists (`depproxy.trusted_proxies`, `…metrics.allow`)."""
    return tuple(ipaddress.ip_network(item, strict=False) for item in items)


def parse_address(value: str) -> Address | None:
    """An address as proxies write it (`1.2.3.4`, `1.2.3.4:5678`, `[::1]:80`, `::1`), or None."""
    value = value.strip()
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def in_networks(address: Address | None, items: Iterable[Network]) -> bool:
    return address is not None and any(address in network for network in items)


def client_address(request: Request, trusted_proxies: tuple[str, ...]) -> Address | None:
    """`REMOTE_ADDR`, unless it is a trusted proxy: then the right-most `X-Forwarded-For` entry
    that is not itself one.

    Entries left of the first untrusted one were written by the client and prove nothing, so
    they are never read. None when the server gave no address.
    """
    address = parse_address(request.environ.get("REMOTE_ADDR") or "")
    trusted = networks(trusted_proxies)
    if not trusted or not in_networks(address, trusted):
        return address
    # The server joins repeated header lines with commas.
    forwarded = request.environ.get("HTTP_X_FORWARDED_FOR", "")
    for entry in reversed(forwarded.split(",")):
        hop = parse_address(entry)
        if hop is None:
            # A trusted proxy passed on something that is not an address: the last hop we
            # can vouch for is the best answer left.
            return address
        address = hop
        if not in_networks(address, trusted):
            return address
    return address
