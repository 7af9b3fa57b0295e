"""Named models with pretrained weights: `create_model`, and timm's published weights on the Hugging Face Hub.

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
from typing import Any

from jaxtyping import PRNGKeyArray

from ._config import check_compute_dtype
from ._io import load_timm
from ._model import CaiT
from ._surgery import reset_classifier, with_compute_dtype
from ._timm import WeightsError
from ._variants import variant_config

__all__ = ["PretrainedWeightsUnavailable", "create_model", "hub_repo_id", "pretrained_weights_file"]

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


def create_model(
    name: str,
    pretrained: bool = False,
    *,
    key: PRNGKeyArray | None = None,
    weights: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    compute_dtype: Any = None,
    **overrides: Any,
) -> CaiT:
    """Build a named paper variant, with fresh weights or with timm's pretrained ImageNet weights.

    **Arguments:**

    - `name`: one of `list_models()`.
    - `pretrained`: load timm's published ImageNet-1k weights (`timm/<name>.fb_dist_in1k` on the Hugging
        Face Hub), downloading them into the Hugging Face cache if needed. Offline (or with
        `HF_HUB_OFFLINE=1`) only the cache is used; without a cached copy this fails at once with
        `PretrainedWeightsUnavailable`: download the file elsewhere and pass it as `weights`.
    - `key`: a `jax.random.key` for the initialisation; needed for fresh weights, and for a pretrained
        model only when `num_classes` asks for a new head. (Keyword only argument.)
    - `weights`: a local checkpoint file to load instead (timm `model.safetensors` or `.pth`, deit release
        `.pth`, or a `cait_eqx.save` file), checked against the variant. (Keyword only argument.)
    - `cache_dir`: the Hugging Face cache directory for `pretrained=True`. (Keyword only argument.)
    - `compute_dtype`: the dtype to compute in, e.g. `jnp.bfloat16` for mixed precision with float32
        weights (see `with_compute_dtype`); `None` computes in the parameter dtype. (Keyword only argument.)
    - `**overrides`: any `CaiT` keyword to change, e.g. `num_classes=10`, `layer_dropout=0.1`,
        `image_size=384`. With pretrained weights, a new `image_size` resamples the positional embedding
        (bicubic) and a new `num_classes` gives a fresh head (`reset_classifier`).

    **Returns:** a `CaiT`: in training mode with fresh weights; in inference mode with loaded weights
    (`eqx.nn.inference_mode(model, False)` to fine-tune it).
    """
    config = variant_config(name)
    check_compute_dtype(compute_dtype, "float32")  # a bad dtype fails before any download
    if not pretrained and weights is None:
        if key is None:
            raise ValueError(
                f"`create_model({name!r})` builds fresh weights and needs a key: pass "
                f"`key=jax.random.key(...)`, or `pretrained=True` (or `weights=path`) for trained weights."
            )
        config.update(overrides)
        return CaiT(**config, compute_dtype=compute_dtype, key=key)
    if pretrained and weights is not None:
        raise ValueError(
            "Pass either `pretrained=True` (the Hub's weights) or `weights=path` (a local file), not both."
        )
    if weights is None:
        weights = pretrained_weights_file(name, cache_dir=cache_dir)
    num_classes = overrides.pop("num_classes", None)
    model = load_timm(weights, name=name, **overrides)
    if num_classes is not None and num_classes != model.config.num_classes:
        if num_classes != 0 and key is None:
            raise ValueError(
                f"`num_classes={num_classes}` differs from the checkpoint's {model.config.num_classes}, so a "
                f"fresh head is initialised, which needs a key: pass `key=jax.random.key(...)`."
            )
        model = reset_classifier(model, num_classes, key=key)
    return with_compute_dtype(model, compute_dtype)
