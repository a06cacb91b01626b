"""Loading pretrained parts by id: the local cache first, the hub only when it answers, and otherwise one
clear sentence saying what to download (never a hang or a bare stack trace)."""
from __future__ import annotations

import os
import socket
from typing import Callable, TypeVar
from urllib.parse import urlparse

T = TypeVar("T")

# Rough download sizes, so an offline user knows what to fetch.
SIZES = {
    "openai/clip-vit-base-patch32": "about 600 MB",
    "CompVis/stable-diffusion-v1-4": "about 5 GB for the whole pipeline, 335 MB for the vae subfolder",
}


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither on disk nor downloadable from here."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine fails in a second instead of after ~30 s of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_pretrained(load: Callable[..., T], model_id: str, what: str, **kwargs) -> T:
    """`load(model_id, **kwargs)` from a local folder or the cache; the hub only if it answers."""
    from .progress import quiet_library_bars

    quiet_library_bars()
    try:
        return load(model_id, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:  # transformers/diffusers raise OSError (or ValueError) for missing files
        if os.path.isdir(model_id):
            raise
        if not hub_reachable():
            raise WeightsUnavailableError(offline_message(model_id, what, e)) from None
    try:
        return load(model_id, **kwargs)
    except (OSError, ValueError) as e:
        raise WeightsUnavailableError(offline_message(model_id, what, e)) from None


def offline_message(model_id: str, what: str, error: Exception | str = "") -> str:
    cache = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
    size = SIZES.get(model_id, "size unknown")
    detail = str(error).splitlines()[0] if str(error) else ""
    return (f"Cannot load the {what} {model_id!r} ({size}): it is not in the Hugging Face cache ({cache}) "
            f"and the hub could not be reached. On a machine with internet run "
            f"`huggingface-cli download {model_id}` (or copy a filled cache to {cache}), "
            f"or pass a local folder instead of the id." + (f" [{type(error).__name__}: {detail}]" if detail else ""))
