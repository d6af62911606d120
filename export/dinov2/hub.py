"""Optional download of the Hugging Face DINOv2 weights (needs ``huggingface_hub`` and a network)."""

from __future__ import annotations

import os
from pathlib import Path

from knnclip.engine.errors import BackendUnavailableError, ModelDownloadError

HF_REPOS = {
    "vits14": "facebook/dinov2-small",
    "vitb14": "facebook/dinov2-base",
    "vitl14": "facebook/dinov2-large",
    "vitg14": "facebook/dinov2-giant",
    "vits14_reg4": "facebook/dinov2-with-registers-small",
    "vitb14_reg4": "facebook/dinov2-with-registers-base",
    "vitl14_reg4": "facebook/dinov2-with-registers-large",
    "vitg14_reg4": "facebook/dinov2-with-registers-giant",
}


def download_dinov2(
    name: str = "vitg14_reg4", *, revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Download ``config.json`` and ``model.safetensors`` of a preset (``"vitg14_reg4"``, ...) or a
    repository id (``"facebook/dinov2-with-registers-giant"``); return the local directory.

    Raises ``BackendUnavailableError`` without huggingface_hub and ``ModelDownloadError`` when the
    files cannot be fetched (offline, ``HF_HUB_OFFLINE=1`` with nothing cached, unknown repository).
    """
    repo = HF_REPOS.get(name, name)
    if "/" not in repo:
        raise ModelDownloadError(f"{name!r} is neither a preset ({', '.join(HF_REPOS)}) nor a repository id ORG/NAME")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise BackendUnavailableError(
            "downloading DINOv2 weights needs huggingface_hub: pip install huggingface_hub "
            "(or download the checkpoint yourself and pass its path)"
        ) from None
    cache_root = None if cache_dir is None else str(cache_dir)
    try:
        local = snapshot_download(
            repo, revision=revision, cache_dir=cache_root, allow_patterns=["config.json", "model.safetensors"]
        )
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many types: offline, HTTP, missing repo, OS errors
        raise ModelDownloadError(
            f"could not download {repo} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            "Check the network (or HF_HUB_OFFLINE), the repository name and your access; or download "
            "the checkpoint elsewhere and pass its path."
        ) from None
    path = Path(local)
    if not (path / "model.safetensors").is_file():
        raise ModelDownloadError(f"{repo} has no model.safetensors (revision {revision or 'main'})")
    return path
