"""Load a Playground-v2.5 / SDXL pipeline's parts with `from_pretrained`, from a hub id or a folder.

Every failure a user can cause becomes one `UserError` line: a folder that lacks a component, a
hub id that cannot be reached (with how to point at a local copy instead).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name; a path that does not exist fails here
COMPONENTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "unet", "scheduler")


@dataclass
class Components:
    tokenizer: object
    tokenizer_2: object
    text_encoder: object
    text_encoder_2: object
    vae: object
    unet: object
    scheduler_config: dict
    force_zeros_for_empty_prompt: bool
    source: str  # the folder they were read from


def hub_unreachable_message(name: str, what: str, key: str) -> str:
    return (
        f"cannot reach the Hugging Face Hub to fetch {what} '{name}' and no local copy is cached; "
        f"download it where the hub is reachable (huggingface-cli download {name} --local-dir DIR) "
        f"and run with --cfg-options {key}=DIR"
    )


def resolve_pretrained(name: str, key: str = "model.pretrained_model_name_or_path") -> Path:
    """A local pipeline folder for `name`: the folder itself, or the hub snapshot (cached or downloaded)."""
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        check_pipeline_folder(path)
        return path
    if not HUB_ID.match(name):
        raise UserError(f"model '{name}' is neither a directory nor a Hugging Face hub id (owner/name)")
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*/config.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
    try:
        folder = Path(snapshot_download(name, allow_patterns=patterns, local_files_only=_offline()))
    except Exception as error:  # noqa: BLE001 — any network/hub failure means the same thing to the user
        if _is_missing_repo(error):
            raise UserError(f"model '{name}' does not exist on the Hugging Face Hub (or needs a login)") from None
        raise UserError(hub_unreachable_message(name, "model", key)) from None
    check_pipeline_folder(folder)
    return folder


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or not hub_reachable()


_reachable: bool | None = None  # found out once per process


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host takes a TCP connection. When it does not, the process goes offline before any
    download is tried: huggingface_hub would otherwise retry each request for half a minute and print a
    warning per try before our one-line message; offline, a cached copy still loads and a missing one fails
    at once. Behind an HTTPS proxy the libraries' own requests decide."""
    global _reachable
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    if _reachable is None:
        if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
            _reachable = True
        else:
            import socket
            from urllib.parse import urlparse

            endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
            try:
                socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout).close()
                _reachable = True
            except OSError:
                _reachable = False
                _go_offline()
    return _reachable


def _go_offline() -> None:
    """Offline mode for huggingface_hub and datasets, including the copies of the flag they read at import."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    import sys

    for module in ("huggingface_hub.constants", "datasets.config"):
        if module in sys.modules:
            for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
                if hasattr(sys.modules[module], flag):
                    setattr(sys.modules[module], flag, True)


def _is_missing_repo(error: Exception) -> bool:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    return isinstance(error, (RepositoryNotFoundError, GatedRepoError))


def check_pipeline_folder(folder: Path) -> None:
    """A complete SDXL pipeline folder, or one line saying what is missing (or that it is a LoRA export)."""
    from .lora_files import LORA_FILE

    if (folder / LORA_FILE).is_file() and not (folder / "unet").is_dir():
        raise UserError(f"{folder} is a LoRA export, not a full pipeline: apply it to its base (--lora), or fold it in "
                        f"with pgv25 lora fuse --base BASE_DIR --lora {folder / LORA_FILE} --out FUSED_DIR")
    if not (folder / "model_index.json").is_file():
        raise UserError(f"model directory {folder} has no model_index.json: it is not a diffusers pipeline folder")
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise UserError(f"model directory {folder} lacks {', '.join(m + '/' for m in missing)} (an SDXL pipeline needs {', '.join(COMPONENTS)})")


def load_components(name: str, weight_dtype=None, unet_path: str | None = None, encoders: bool = True, unet: bool = True,
                    unet_dtype=None) -> Components:
    """Tokenizers, both text encoders, VAE, UNet and the scheduler config, each via `from_pretrained`.

    `encoders=False` leaves out the tokenizers, text encoders and VAE (None): training from a
    latent cache never needs them; `unet=False` leaves out the UNet (building that cache). `unet_dtype`: the UNet is
    loaded straight into it (bf16 weights never pass through an fp32 copy: 10 GB less at the peak at full size).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = resolve_pretrained(name)
    index = json.loads((folder / "model_index.json").read_text())
    try:
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        frozen = dict(torch_dtype=weight_dtype) if weight_dtype is not None else {}

        def load(cls, subfolder, **kwargs):
            return cls.from_pretrained(folder, subfolder=subfolder, **kwargs) if encoders else None

        return Components(
            tokenizer=load(CLIPTokenizer, "tokenizer"),
            tokenizer_2=load(CLIPTokenizer, "tokenizer_2"),
            text_encoder=load(CLIPTextModel, "text_encoder", **frozen),
            text_encoder_2=load(CLIPTextModelWithProjection, "text_encoder_2", **frozen),
            vae=load(AutoencoderKL, "vae"),  # dtype chosen by the caller (fp16 overflow)
            unet=UNet2DConditionModel.from_pretrained(unet_path or folder, subfolder=None if unet_path else "unet",
                                                      **({"torch_dtype": unet_dtype} if unet_dtype is not None else {}))
            if unet else None,
            scheduler_config=scheduler_config,
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
            source=str(folder),
        )
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot load the pipeline in {folder}: {first_line}") from None


def component_identity(folder: str | Path, names=("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae")) -> str:
    """A digest of the named components' files (name, size, modification time) and configs.

    Cheap to compute for a 10 GB pipeline, and it changes whenever a weight file is replaced.
    """
    import hashlib

    digest = hashlib.sha1()
    folder = Path(folder)
    for name in names:
        for path in sorted((folder / name).rglob("*")):
            if path.is_file():
                stat = path.stat()
                digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
                if path.suffix == ".json":
                    digest.update(path.read_bytes())
    return digest.hexdigest()
