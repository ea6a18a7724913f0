"""Health probes of cluster components over HTTP(S), without proxies and without raising."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from pathlib import Path

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, *, ca_file: Path | None = None, token: str | None = None,
             timeout: float = 5.0) -> tuple[int, str]:
    """(HTTP status, body) of a GET, or (0, why) when nothing answered.

    Proxies from the environment are ignored: every component probed is on this machine.
    """
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if url.startswith("https://"):
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers) if len(handlers) > 1 else _NO_PROXY
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as error:
        return 0, str(error)
