"""timm's published CaiT weights on the Hugging Face Hub: fetched into its cache, checked, or a fast failure.

Each paper variant's ImageNet-1k weights (distilled, as released by deit) live in the repository
`timm/<name>.fb_dist_in1k` as `model.safetensors`. Without a network (or with `HF_HUB_OFFLINE=1`) only the
local cache is consulted, and a missing file is an immediate `PretrainedWeightsUnavailable` that says
how to pass a local file instead: no retries, no hanging.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ._variants import variant_config
from ._weights import WeightsError

__all__ = ["PretrainedWeightsUnavailable", "hub_repo_id", "pretrained_weights_file"]

HUB_TAG = "fb_dist_in1k"
HUB_FILENAME = "model.safetensors"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class PretrainedWeightsUnavailable(OSError):
    """The Hub cannot be reached (or offline mode is on) and no cached copy of the weights exists."""


def hub_repo_id(name: str) -> str:
    """The Hub repository of timm's weights for variant `name`, e.g. `timm/cait_s24_224.fb_dist_in1k`."""
    variant_config(name)  # an unknown name is a ValueError that suggests close names
    return f"timm/{name}.{HUB_TAG}"


def _offline_requested() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return flag in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def _unreachable(url: str, timeout: float) -> str | None:
    """Why the Hub cannot be reached (one request, no retries), or None when it answers."""
    from huggingface_hub import get_session

    try:
        # The Hub's own HTTP session (proxies, certificates and headers as the user set them up), and a
        # call that both its clients accept (requests before huggingface_hub 1.0, httpx after).
        get_session().head(url, timeout=timeout)
    except (TypeError, AttributeError, NameError):
        raise  # a bug, not a network problem
    except Exception as error:  # noqa: BLE001 - no answer, whatever the client's error type: use the cache
        return f"{type(error).__name__}: {error}"
    return None


def _verify(path: Path) -> None:
    """Check a cached Hub file against its SHA-256, which the Hub cache names its (LFS) blobs after."""
    blob = Path(os.path.realpath(path))
    expected = blob.name
    if blob.parent.name != "blobs" or not _SHA256.match(expected):
        return  # a copy outside the blob store (e.g. no symlinks): the Hub gave no hash to check against
    digest = hashlib.sha256()
    with open(blob, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise WeightsError(
            f"The cached weights {path} are corrupt: their SHA-256 is {digest.hexdigest()}, the Hub's is "
            f"{expected}. Delete {blob} (and the link {path}) and load again to download a fresh copy."
        )


def pretrained_weights_file(
    name: str, *, cache_dir: str | os.PathLike | None = None, timeout: float = 10.0
) -> Path:
    """The local path of timm's pretrained `model.safetensors` for variant `name`, downloading it if needed.

    The file goes into the Hugging Face cache (`HF_HOME`, or `cache_dir`) and is checked against the
    SHA-256 the Hub publishes for it. With no network, or `HF_HUB_OFFLINE=1`, only the cache is used.

    **Arguments:**

    - `name`: one of `list_models()`.
    - `cache_dir`: the Hugging Face cache directory to use instead of the default. (Keyword only argument.)
    - `timeout`: seconds to wait for the Hub to answer before treating it as unreachable. (Keyword only
        argument.)

    **Returns:** the path of the verified file.

    **Raises:** `PretrainedWeightsUnavailable` (an `OSError`) when the Hub is unreachable and the cache has
    no copy; `WeightsError` when the file's hash is wrong.
    """
    from huggingface_hub import constants, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id = hub_repo_id(name)
    endpoint = constants.ENDPOINT
    url = hf_hub_url(repo_id, HUB_FILENAME, endpoint=endpoint)
    reason = "offline mode is on (HF_HUB_OFFLINE)" if _offline_requested() else _unreachable(url, timeout)
    try:
        local = hf_hub_download(
            repo_id,
            HUB_FILENAME,
            cache_dir=cache_dir,
            endpoint=endpoint,
            local_files_only=reason is not None,
            etag_timeout=timeout,
        )
    except LocalEntryNotFoundError as error:
        if reason is None:
            raise
        cache = cache_dir if cache_dir is not None else constants.HF_HUB_CACHE
        raise PretrainedWeightsUnavailable(
            f"Cannot fetch the pretrained weights of {name!r}: the Hugging Face Hub is not reachable "
            f"({reason}) and the cache ({cache}) has no copy of {repo_id}/{HUB_FILENAME}.\n"
            f"Download the file where there is a network ({url}, or deit's release .pth) and pass it:\n"
            f"    cait_eqx.create_model({name!r}, weights='path/to/model.safetensors')\n"
            f"or  cait_eqx.load_timm('path/to/model.safetensors', name={name!r})"
        ) from error
    path = Path(local)
    _verify(path)
    return path
