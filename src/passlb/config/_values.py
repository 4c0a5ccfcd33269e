"""Parsers for the domain values of the config: names, addresses, ports."""

from __future__ import annotations

import ipaddress
import itertools
import re

from passlb.config._reader import Invalid, describe, integer, text
from passlb.model import IPAddress, IPNetwork, PortRange, PortSet

# Service and pool names end up inside nftables object names (sets, maps,
# chains), which is why they are short and plain.
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
# Linux IFNAMSIZ is 16 including the terminating NUL.
_INTERFACE = re.compile(r"[A-Za-z0-9_.:@-]{1,15}")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_HTTP_METHOD = re.compile(r"[A-Z]{1,16}")

port = integer(1, 65535)


def name(value: object) -> str:
    raw = text(value)
    if not _NAME.fullmatch(raw):
        raise Invalid(
            f"must be 1-32 characters of a-z, 0-9, '_' and '-', starting with a letter or"
            f" digit, got {raw!r}"
        )
    return raw


def interface(value: object) -> str:
    raw = text(value)
    if not _INTERFACE.fullmatch(raw) or raw in (".", ".."):
        raise Invalid(f"not a Linux interface name (1-15 characters, no '/' or spaces): {raw!r}")
    return raw


def ip_address(value: object) -> IPAddress:
    raw = text(value)
    try:
        address = ipaddress.ip_address(raw)
    except ValueError:
        raise Invalid(f"expected an IPv4 or IPv6 address, got {raw!r}") from None
    if address.is_unspecified or address.is_multicast:
        raise Invalid(f"must be a unicast address, got {raw!r}")
    return address


def ip_network(value: object) -> IPNetwork:
    """A CIDR such as "198.18.0.0/15"; a bare address is a single host."""
    raw = text(value)
    try:
        return ipaddress.ip_network(raw)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(raw, strict=False)
    except ValueError:
        raise Invalid(f"expected a network like '198.18.0.0/15', got {raw!r}") from None
    raise Invalid(f"{raw!r} has host bits set; did you mean {str(loose)!r}?")


def dns_name(value: object) -> str:
    """A host name for SNI or Host headers, lowercased (DNS is case-blind)."""
    raw = text(value)
    lowered = raw.lower().removesuffix(".")
    labels = lowered.split(".")
    if len(lowered) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise Invalid(f"not a valid DNS name: {raw!r}")
    return lowered


def server_name_pattern(value: object) -> str:
    """An SNI route name: exact "a.example.com" or wildcard "*.example.com"."""
    raw = text(value)
    if raw.startswith("*."):
        try:
            return "*." + dns_name(raw[2:])
        except Invalid:
            raise Invalid(f"not a valid DNS name or '*.suffix' wildcard: {raw!r}") from None
    if "*" in raw:
        raise Invalid(f"a wildcard must be a whole first label, like '*.example.com', got {raw!r}")
    return dns_name(raw)


def http_method(value: object) -> str:
    raw = text(value)
    if not _HTTP_METHOD.fullmatch(raw):
        raise Invalid(f"expected an upper-case HTTP method like 'GET', got {raw!r}")
    return raw


def http_path(value: object) -> str:
    raw = text(value)
    if not raw.startswith("/") or any(c.isspace() or not c.isprintable() for c in raw):
        raise Invalid(f"must start with '/' and contain no spaces, got {raw!r}")
    return raw


def status_codes(value: object) -> tuple[int, ...]:
    """One HTTP status or an array of them, 100..599, sorted and unique."""
    code = integer(100, 599)
    if isinstance(value, list):
        if not value:
            raise Invalid("must not be empty")
        try:
            return tuple(sorted({code(item) for item in value}))
        except Invalid as err:
            raise Invalid(f"each status {err}") from None
    return (code(value),)


def utf8_bytes(value: object) -> bytes:
    return text(value).encode()


def hex_bytes(value: object) -> bytes:
    raw = text(value)
    try:
        return bytes.fromhex(raw)
    except ValueError:
        raise Invalid(f"expected hex digits like '0a1b 2c', got {raw!r}") from None


def command(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise Invalid(
            f"expected an array of strings like ['/bin/check', 'arg'], got {describe(value)}"
        )
    if not value:
        raise Invalid("must name a program: ['/bin/check', 'arg']")
    if not all(isinstance(arg, str) for arg in value):
        bad = next(arg for arg in value if not isinstance(arg, str))
        raise Invalid(f"every argument must be a string, got {describe(bad)}")
    if not value[0]:
        raise Invalid("the program name must not be empty")
    return tuple(value)


def listen_address(value: object) -> str:
    """ "host:port" (an IPv6 host in brackets), "localhost:port" or "unix:/path"."""
    raw = text(value)
    if raw.startswith("unix:"):
        if not raw[5:].startswith("/"):
            raise Invalid(
                f"a unix socket needs an absolute path, like 'unix:/run/passlb.sock', got {raw!r}"
            )
        return raw
    host, sep, port_text = raw.rpartition(":")
    wanted = f"expected 'host:port', '[ipv6]:port' or 'unix:/path', got {raw!r}"
    if not sep or not port_text.isdigit():
        raise Invalid(wanted)
    if not 0 < int(port_text) < 65536:
        raise Invalid(f"port must be between 1 and 65535, got {port_text}")
    if host == "localhost":
        return raw
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise Invalid(f"put an IPv6 address in brackets, like '[::1]:9180', got {raw!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise Invalid(wanted) from None
    return raw


MAX_PROXY_WORKERS = 256


def proxy_workers(value: object) -> int | None:
    """A count of relay processes, or "auto" (None: one per CPU, resolved at start)."""
    if value == "auto":
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise Invalid(f'expected an integer or "auto", got {describe(value)}')
    if not 1 <= value <= MAX_PROXY_WORKERS:
        raise Invalid(f"must be between 1 and {MAX_PROXY_WORKERS}, got {value}")
    return value


def is_local_listen(listen: str) -> bool:
    """Whether only this machine can reach the listen address."""
    if listen.startswith("unix:"):
        return True
    host = listen.rpartition(":")[0].strip("[]")
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def _port_or_range(value: object) -> PortRange:
    if isinstance(value, int) and not isinstance(value, bool):
        number = port(value)
        return PortRange(number, number)
    if isinstance(value, str):
        first, dash, last = value.partition("-")
        if dash and first.strip().isdigit() and last.strip().isdigit():
            low, high = int(first), int(last)
            for end in (low, high):
                if not 0 < end < 65536:
                    raise Invalid(f"ports must be between 1 and 65535, got {value!r}")
            if low > high:
                raise Invalid(f"a range goes from low to high, got {value!r}")
            return PortRange(low, high)
        if value == "all":
            raise Invalid("'all' stands alone: ports = \"all\"")
    raise Invalid(f"expected a port (1-65535) or a range like '8000-8100', got {describe(value)}")


def port_set(value: object) -> PortSet:
    """ports = 443 | "8000-8100" | [443, "8000-8100"] | "all"."""
    if value == "all":
        return PortSet(all_ports=True)
    items = value if isinstance(value, list) else [value]
    if not items:
        raise Invalid("must name at least one port")
    ranges = sorted(_port_or_range(item) for item in items)
    for before, after in itertools.pairwise(ranges):
        if after == before:
            raise Invalid(f"{after} is listed twice")
        if after.first <= before.last:
            raise Invalid(f"{before} overlaps {after}")
    return PortSet(ranges=tuple(ranges))


def is_prime(number: int) -> bool:
    if number < 2:
        return False
    if number % 2 == 0:
        return number == 2
    return all(number % divisor for divisor in range(3, int(number**0.5) + 1, 2))


def host_name(value: object) -> str:
    """A Host header value: a DNS name or an IP address literal."""
    raw = text(value)
    try:
        return str(ipaddress.ip_address(raw.strip("[]")))
    except ValueError:
        pass
    try:
        return dns_name(raw)
    except Invalid:
        raise Invalid(f"expected a host name or IP address, got {raw!r}") from None
