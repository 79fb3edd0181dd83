"""Whether the Hugging Face hub can be reached, checked once before a hub id is used.

Without a network (and without ``HF_HUB_OFFLINE=1``), huggingface_hub retries every request five
times with back-off: a model or data set named by hub id prints eleven "thrown while requesting ...
Retrying in 8s" lines per file and waits ~23 s before the real error, even when the files are in the
local cache. So before the first hub access a stage calls :func:`go_offline_if_unreachable`: one
connection attempt to the hub (a few milliseconds where the network is up, immediate where there is
none), and where it fails the process switches to offline mode, saying so in one line: cached files
load at once, and a missing one fails at once with the library's own "not in the cache" error.
"""
from __future__ import annotations

import os
import socket
import sys
from typing import Callable, Optional
from urllib.parse import urlparse

CONNECT_TIMEOUT_S = 3.0
_TRUE = {"1", "true", "yes", "on"}
_checked = False


def offline_mode() -> bool:
    """True where the user (or this module) already chose offline mode."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_unreachable(timeout_s: float = CONNECT_TIMEOUT_S) -> Optional[str]:
    """Why the hub cannot be reached from here (e.g. "[Errno -2] Name or service not known"), or None.

    None as well where a proxy is configured: the proxy, not this machine, reaches the hub.
    """
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        return str(exc) or type(exc).__name__
    return None


def go_offline_if_unreachable(log: Callable[[str], None] = print) -> bool:
    """Switch this process (and the processes it starts) to offline mode when the hub cannot be
    reached; True if it did. Checked once per process; nothing to do when already offline."""
    global _checked
    if _checked or offline_mode():
        return False
    _checked = True
    reason = hub_unreachable()
    if reason is None:
        return False
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[name] = "1"
    # Libraries already imported read their offline flag at import time: set it there too.
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules:
        sys.modules["datasets.config"].HF_HUB_OFFLINE = True
        sys.modules["datasets.config"].HF_DATASETS_OFFLINE = True
    log(f"note: the Hugging Face hub cannot be reached ({reason}): working offline, from the local cache "
        f"(HF_HUB_OFFLINE=1 skips this check)")
    return True
