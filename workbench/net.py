"""Network addresses: which ones are this machine only (the CLI and the app decide alike)."""

import ipaddress


def is_loopback(address: str) -> bool:
    """Whether `address` (an IP address or host name) is this machine only: 127.0.0.0/8, ::1,
    an IPv4-mapped loopback address, or localhost."""
    host = address.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback
