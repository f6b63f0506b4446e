"""Offline behaviour for hub ids: fail fast instead of retrying a hub that cannot be reached.

Transformers and huggingface_hub retry an unreachable hub for about 30 s
before they report that a file is missing. One short connection attempt
tells us the hub is out of reach; then the process switches to the libraries'
own offline mode (HF_HUB_OFFLINE), so a cached model still loads and a
missing one fails at once with the usual clear error.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

CONNECT_TIMEOUT_S = 3.0


def offline_requested() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = CONNECT_TIMEOUT_S) -> bool:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
    except OSError:
        return False
    return True


def go_offline_if_unreachable(name_or_path: str) -> bool:
    """For a hub id (not a local folder), switch to offline mode when the hub cannot be reached.
    Returns True when this process is (now) offline."""
    if Path(name_or_path).exists():
        return offline_requested()
    if offline_requested():
        return True
    if hub_reachable():
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"  # read when the libraries are imported, later in this process
    for module, flag in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("transformers.utils.hub", "_is_offline_mode")):
        if module in sys.modules and hasattr(sys.modules[module], flag):  # already imported: their copy of the flag
            setattr(sys.modules[module], flag, True)
    return True
