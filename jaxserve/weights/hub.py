"""`--model-path org/name`: a Hugging Face Hub repository id, resolved to a local snapshot
directory the way SGLang and vLLM users expect. With the hub reachable, the files a model
needs are downloaded (what the local HF cache already holds is reused); offline
(`HF_HUB_OFFLINE=1`, or no network) the local HF cache answers; when neither has the model,
the error says both what the hub said and where the cache was looked for."""

from __future__ import annotations

import logging
import re
from pathlib import Path

__all__ = ["looks_like_repo_id", "resolve_repo"]

logger = logging.getLogger(__name__)

# What a HF model directory needs here: config, safetensors weights, tokenizer and template.
PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_repo_id(model_path: str) -> bool:
    """`org/name` (one slash, no leading `.` or `/`): what is not a local path is a hub id."""
    return _REPO_ID.fullmatch(model_path) is not None and not model_path.endswith((".gguf", "/"))


def resolve_repo(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot directory of `repo_id`: from the hub when reachable, else from the
    local HF cache; `FileNotFoundError` naming both when neither has it."""
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a dependency of `tokenizers`
        raise FileNotFoundError(f"--model-path {repo_id} is not a local path, and huggingface_hub is not "
                                "installed to fetch it from the Hugging Face Hub") from None
    hub_error = "offline (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else None
    if hub_error is None:
        try:
            path = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=PATTERNS)
            logger.info("model %s from the Hugging Face Hub: %s", repo_id, path)
            return Path(path)
        except Exception as e:  # unreachable, unknown repo, gated: try the cache before giving up
            hub_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}"
    try:
        path = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=PATTERNS,
                                                 local_files_only=True)
    except Exception:
        raise FileNotFoundError(
            f"--model-path {repo_id}: not a local path; the Hugging Face Hub ({constants.ENDPOINT}) did not give "
            f"it ({hub_error}), and the local HF cache ({constants.HF_HUB_CACHE}) does not have it. Download it "
            f"where the hub is reachable (`hf download {repo_id}`) or pass a local directory or .gguf file"
        ) from None
    logger.info("model %s from the local HF cache (the hub: %s): %s", repo_id, hub_error, path)
    return Path(path)
