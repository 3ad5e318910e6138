"""Client addresses: the connection's peer, unless the peer is a reverse proxy we were told of.

The per-client generation cap (:class:`~streaming_llm.chat.admission.GenerationGate`), the logs and
the routes read the client address from the ASGI scope's ``client``. uvicorn rewrites that from
``X-Forwarded-For`` (and the scheme from ``X-Forwarded-Proto``) for peers it trusts, and by
default it trusts ``127.0.0.1``: any local process, or a proxy that passes a client's own
``X-Forwarded-For`` through, could then claim any address and take a fresh share of the slots
with every request. So the server trusts forwarded headers only from the peers listed in
``STREAMING_LLM_TRUSTED_PROXIES`` (IP addresses or CIDR networks, comma-separated; empty, the
default, trusts none), and uvicorn's own ``FORWARDED_ALLOW_IPS`` is not read.

Behind nginx on the same machine (``deploy/nginx/``) set ``STREAMING_LLM_TRUSTED_PROXIES=127.0.0.1``:
the client address is then the one nginx appends to ``X-Forwarded-For``, and the scheme the one it
sends in ``X-Forwarded-Proto`` (which the same-origin check compares).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from ..settings import Settings, SettingsError


def trusted_proxies(settings: Settings) -> list[str]:
    """The peers whose forwarded headers are believed, checked; ``[]`` for none."""
    items = [item.strip() for item in settings.trusted_proxies.split(",") if item.strip()]
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise SettingsError(
                f"STREAMING_LLM_TRUSTED_PROXIES: {item!r} is not an IP address or network "
                "(write e.g. 127.0.0.1, 10.0.0.0/8, ::1; comma-separated)") from None
    return items


def uvicorn_proxy_options(settings: Settings) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments: proxy headers from the trusted peers only."""
    trusted = trusted_proxies(settings)
    # An explicit list (never None): None would make uvicorn read FORWARDED_ALLOW_IPS, or
    # fall back to trusting 127.0.0.1.
    return {"proxy_headers": bool(trusted), "forwarded_allow_ips": trusted}
