"""Loading pretrained parts by id, with a message that says what is needed when the hub is out of reach."""
from __future__ import annotations

import os
from typing import Callable, TypeVar

T = TypeVar("T")

# Rough download sizes, so an offline user knows what to fetch.
SIZES = {
    "openai/clip-vit-base-patch32": "about 600 MB",
    "CompVis/stable-diffusion-v1-4": "about 5 GB for the whole pipeline, 335 MB for the vae subfolder",
}


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither on disk nor downloadable from here."""


def load_pretrained(load: Callable[..., T], model_id: str, what: str, **kwargs) -> T:
    """`load(model_id, **kwargs)`, turning 'not cached and no network' into one clear sentence."""
    try:
        return load(model_id, **kwargs)
    except (OSError, ValueError) as e:  # transformers/diffusers raise OSError (or ValueError) for missing files
        if os.path.isdir(model_id):
            raise
        raise WeightsUnavailableError(offline_message(model_id, what, e)) from None


def offline_message(model_id: str, what: str, error: Exception | str = "") -> str:
    cache = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
    size = SIZES.get(model_id, "size unknown")
    return (f"Cannot load the {what} {model_id!r} ({size}): it is not in the Hugging Face cache ({cache}) "
            f"and the hub could not be reached. On a machine with internet run "
            f"`huggingface-cli download {model_id}` (or copy a filled cache to {cache}), "
            f"or pass a local folder instead of the id. [{type(error).__name__ if error else ''}: "
            f"{str(error).splitlines()[0] if str(error) else ''}]")
