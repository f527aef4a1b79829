"""Which backend URLs may be used: the upstream pin, as pure functions.

The backend URL comes only from configuration and must point at loopback, a private
address, or a host the operator listed explicitly. Well-known external provider hosts are
refused even when listed, so a typo'd or pasted cloud URL can never become the route.
Resolved addresses are checked again at connect time (see ``check_resolved_address``) so
DNS cannot move an admitted name to somewhere else.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import SplitResult, urlsplit

# Hosts of model providers outside the operators' machines. Suffix match on labels.
KNOWN_PROVIDER_HOST_SUFFIXES: tuple[str, ...] = (
    "anthropic.com",
    "claude.ai",
    "openai.com",
    "openai.azure.com",
    "chatgpt.com",
    "openrouter.ai",
    "googleapis.com",
    "generativelanguage.googleapis.com",
    "aiplatform.googleapis.com",
    "mistral.ai",
    "groq.com",
    "together.xyz",
    "together.ai",
    "deepseek.com",
    "x.ai",
    "cohere.com",
    "cohere.ai",
    "fireworks.ai",
    "perplexity.ai",
    "deepinfra.com",
    "huggingface.co",
    "hf.space",
    "replicate.com",
    "aliyuncs.com",
    "dashscope.aliyuncs.com",
    "moonshot.cn",
    "moonshot.ai",
    "bigmodel.cn",
    "cerebras.ai",
    "sambanova.ai",
    "novita.ai",
    "amazonaws.com",
    "azure.com",
    "portkey.ai",
    "litellm.ai",
    "githubcopilot.com",
)


_DEFAULT_PORTS = {"http": 80, "https": 443}


class UpstreamClass(StrEnum):
    LOOPBACK = "loopback"
    PRIVATE = "private"
    ALLOWLISTED = "allowlisted"


@dataclass(frozen=True, slots=True)
class UpstreamRefusal:
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """A checked backend: the URL parts we need, its class and a fingerprint that can be
    recorded in place of the URL (the URL itself is runtime-only)."""

    scheme: str
    host: str
    port: int
    base_path: str
    upstream_class: UpstreamClass
    fingerprint: str

    @property
    def authority(self) -> str:
        """``host[:port]`` as a Host header writes it: IPv6 in brackets, the scheme's
        default port left out."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def normalize_host(host: str) -> str:
    return host.strip().rstrip(".").lower()


def is_known_provider_host(host: str) -> bool:
    h = normalize_host(host)
    return any(h == s or h.endswith("." + s) for s in KNOWN_PROVIDER_HOST_SUFFIXES)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


# Explicit lists, not ``ipaddress.is_private``: that also counts Teredo (2001::/32, which
# carries a public IPv4 address), local-use NAT64 (64:ff9b:1::/48), documentation and
# benchmark ranges, none of which is a backend on the operators' own network.
LOOPBACK_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"),
)
PRIVATE_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
    ipaddress.ip_network("10.0.0.0/8"),       # RFC 1918
    ipaddress.ip_network("172.16.0.0/12"),    # RFC 1918
    ipaddress.ip_network("192.168.0.0/16"),   # RFC 1918
    ipaddress.ip_network("100.64.0.0/10"),    # RFC 6598 shared address space (CGNAT, tailnets)
    ipaddress.ip_network("fc00::/7"),         # RFC 4193 unique local addresses
)


def address_class(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> UpstreamClass | None:
    """Loopback or private (RFC 1918, CGNAT, ULA: PRIVATE_NETWORKS), else None; an
    IPv4-mapped IPv6 address counts as its IPv4 address. Link-local is never private
    here: 169.254.169.254 is the cloud metadata service, not a model backend."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if any(addr in net for net in LOOPBACK_NETWORKS if net.version == addr.version):
        return UpstreamClass.LOOPBACK
    if any(addr in net for net in PRIVATE_NETWORKS if net.version == addr.version):
        return UpstreamClass.PRIVATE
    return None


def fingerprint_url(url: str) -> str:
    """A short stable digest of the endpoint value, so reports can show that two runs
    used the same backend without recording where it is."""
    return "sha256:" + hashlib.sha256(url.strip().encode()).hexdigest()[:16]


def classify_upstream(url: str, allow_hosts: frozenset[str] | set[str] = frozenset()) -> UpstreamTarget | UpstreamRefusal:
    """Check a configured backend base URL. Never echoes the URL in messages."""
    raw = (url or "").strip()
    if not raw:
        return UpstreamRefusal("base_url_missing", "backend base URL is empty")
    try:
        parts: SplitResult = urlsplit(raw)
        port = parts.port
    except ValueError:
        return UpstreamRefusal("base_url_invalid", "backend base URL is not a valid URL")
    if parts.scheme not in ("http", "https"):
        return UpstreamRefusal("base_url_invalid", "backend base URL must start with http:// or https://")
    if not parts.hostname:
        return UpstreamRefusal("base_url_invalid", "backend base URL has no host")
    if parts.username is not None or parts.password is not None:
        return UpstreamRefusal(
            "base_url_has_credentials",
            "backend base URL carries credentials; put the key in CTO_HARNESS_CASE_LOCAL_API_KEY(_FILE) instead",
        )
    if parts.query or parts.fragment:
        return UpstreamRefusal("base_url_invalid", "backend base URL must not have a query or fragment")
    host = normalize_host(parts.hostname)
    allowed = {normalize_host(h) for h in allow_hosts}
    if is_known_provider_host(host):
        return UpstreamRefusal("external_provider_host", "backend base URL names a well-known external model provider host")
    ip = _ip(host)
    if ip is not None:
        cls = address_class(ip)
        if cls is None and host not in allowed:
            return UpstreamRefusal("external_upstream", "backend address is not loopback or private and is not allowlisted")
        upstream_class = cls or UpstreamClass.ALLOWLISTED
    elif host == "localhost" or host.endswith(".localhost"):
        upstream_class = UpstreamClass.LOOPBACK
    elif host in allowed:
        upstream_class = UpstreamClass.ALLOWLISTED
    else:
        return UpstreamRefusal(
            "external_upstream", "backend host is not loopback, a private address or an allowlisted host"
        )
    base_path = parts.path.rstrip("/")
    if base_path.endswith("/v1"):
        base_path = base_path[: -len("/v1")]
    return UpstreamTarget(
        scheme=parts.scheme,
        host=host,
        port=port or _DEFAULT_PORTS[parts.scheme],
        base_path=base_path,
        upstream_class=upstream_class,
        fingerprint=fingerprint_url(raw),
    )


def check_resolved_address(target: UpstreamTarget, address: str) -> bool:
    """At connect time: may this resolved address be used for the target?

    Loopback names must resolve to loopback, private ones to private or loopback; an
    allowlisted name may resolve anywhere but link-local/multicast/unspecified.
    """
    ip = _ip(address)
    if ip is None:
        return False
    cls = address_class(ip)
    if target.upstream_class is UpstreamClass.LOOPBACK:
        return cls is UpstreamClass.LOOPBACK
    if target.upstream_class is UpstreamClass.PRIVATE:
        return cls is not None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (ip.is_link_local or ip.is_multicast or ip.is_unspecified)
