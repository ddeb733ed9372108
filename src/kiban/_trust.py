"""The trust boundary: which peers may tell kiban about the request they pass on.

Propagation headers (the end user's IP and user agent, X-Forwarded-For, a uid or API
client the gateway established, the request and trace ids, the debug switch) are
assertions, and anyone who can open a connection can type them. kiban believes them
only from the peers ``TRUSTED_PROXIES`` names (CIDRs; none by default), as Envoy's
trusted hops and Go's ``TrustedProxies`` do. From any other peer they are dropped
before anything reads them: the user IP is the socket peer, the chain of forwarders
starts at this hop, and identity comes only from the credentials the request proves.

From a trusted peer, X-Forwarded-For is walked from the right, skipping the trusted
hops (RFC 7239 practice): the first hop not in the list is the client, since everything
left of it was written by someone kiban does not trust.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

__all__ = ["AllowedHosts", "TrustedPeers", "local_location"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedPeers:
    """The networks whose peers may assert propagation headers."""

    def __init__(self, networks: Iterable[str | Network] = ()) -> None:
        self.networks: tuple[Network, ...] = tuple(
            ipaddress.ip_network(network, strict=False) for network in networks
        )
        # Peers are few (a gateway, a mesh sidecar, the clients): one parse each.
        self._trusts = lru_cache(maxsize=4096)(self._lookup)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: object) -> bool:
        if not self.networks or not isinstance(address, str):
            return False
        return self._trusts(address)

    def _lookup(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip("[]"))
        except ValueError:  # a unix socket path, a test client's name: not a peer we know
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)

    def client(self, peer: str | None, forwarded_for: str | None) -> str | None:
        """The client's address: the right-most X-Forwarded-For hop that is not trusted.

        ``peer`` must itself be trusted for ``forwarded_for`` to mean anything. When
        every hop is trusted, the left-most is the best there is.
        """
        if not forwarded_for:
            return peer
        hops = [hop.strip() for hop in forwarded_for.split(",")]
        for hop in reversed(hops):
            if hop not in self:
                return hop
        return hops[0] or peer


class AllowedHosts:
    """The Host header values a service answers to (Starlette's TrustedHost rules).

    ``*`` allows any; ``*.example.com`` allows the subdomains of example.com. A request
    for another host is refused before routing, so no URL the app builds (a redirect, a
    link in a body) can point at a host a client chose.
    """

    def __init__(self, patterns: Iterable[str] = ("*",)) -> None:
        self.patterns = tuple(pattern.lower() for pattern in patterns)
        self.any = "*" in self.patterns

    def __contains__(self, host: object) -> bool:
        if self.any:
            return True
        if not isinstance(host, str):
            return False
        name = _hostname(host)
        return any(
            name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:]))
            for pattern in self.patterns
        )


def _hostname(host: str) -> str:
    """The name in a Host header, without its port: ``[::1]:80`` gives ``[::1]``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.split(":", 1)[0]


def local_location(location: bytes, host: str | None) -> bytes:
    """A redirect to the request's own Host, made relative: it stays on this service
    whatever Host the client typed. Redirects elsewhere are left as they are."""
    if host is None:
        return location
    for scheme in (b"http://", b"https://"):
        prefix = scheme + host.encode("latin-1").lower()
        if location.lower().startswith(prefix):
            rest = location[len(prefix) :]
            if not rest or rest[:1] in (b"/", b"?", b"#"):
                return rest if rest[:1] == b"/" else b"/" + rest
    return location
