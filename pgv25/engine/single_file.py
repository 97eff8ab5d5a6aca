"""One `.safetensors` file with the whole pipeline in the original SDXL key layout (ComfyUI, A1111/Forge).

UNet, VAE and both text encoders go under their LDM prefixes (models/ldm_layout.py). When the pipeline
samples with an EDM scheduler and its VAE normalises latents, the file also holds `edm_mean` and
`edm_std` (the VAE's latents_mean/latents_std, shape (1, 4, 1, 1)): that pair is how ComfyUI (and
diffusers' single-file loader) recognise Playground v2.5 and sample it with EDM (σ_data 0.5, σ_min
0.002, σ_max 80) and Playground's latent format; without it they sample the file as SDXL and the
images come out wrong. The header carries ModelSpec metadata (`modelspec.*`) and the training run.

The file is written under a temporary name and renamed, so a file at the destination is complete.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UserError
from ..files import DTYPES, atomic_file
from ..models import ldm_layout, loading

SDXL_ARCHITECTURE = "stable-diffusion-xl-v1-base"  # the network; the EDM schedule travels in edm_mean/edm_std
SDXL_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors file(s) of one component folder: sharded (via the index) or one file, no variant."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index = min(indexes, key=lambda p: len(p.name))  # model.safetensors.index.json before model.fp16....
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(folder.glob("*.safetensors"), key=lambda p: len(p.name))  # x.safetensors before x.fp16.safetensors
    if not files:
        raise UserError(f"{folder} has no .safetensors weights (a .bin-only pipeline: save it again with safe_serialization)")
    return files[:1]


def read_component(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = {}
    for path in _weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        except (OSError, ValueError, RuntimeError) as error:  # a truncated or damaged file
            raise UserError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    return state


def check_pipeline_folder(folder: Path) -> None:
    """A full pipeline folder (models/loading.py says what else it is), or one line."""
    if not Path(folder).is_dir():
        raise UserError(f"{folder} is not a folder (give a pipeline export such as work_dirs/<config>/step<N>)")
    loading.check_pipeline_folder(Path(folder))


def _config(folder: Path) -> dict:
    return json.loads(folder.joinpath("config.json").read_text())


def edm_latent_stats(folder: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(edm_mean, edm_std) when the pipeline is sampled with EDM and its VAE has latent statistics, else None."""
    scheduler = folder / "scheduler" / "scheduler_config.json"
    name = json.loads(scheduler.read_text()).get("_class_name", "") if scheduler.is_file() else ""
    vae = _config(folder / "vae")
    if not name.startswith("EDM") or vae.get("latents_mean") is None or vae.get("latents_std") is None:
        return None
    return (torch.tensor(vae["latents_mean"], dtype=torch.float32).view(1, -1, 1, 1),
            torch.tensor(vae["latents_std"], dtype=torch.float32).view(1, -1, 1, 1))


def single_file_state(folder: Path, dtype: str = "fp16") -> dict[str, torch.Tensor]:
    """The pipeline in `folder` as one LDM-layout state dict (weights in `dtype`, edm_* in fp32)."""
    check_pipeline_folder(folder)
    torch_dtype = DTYPES[dtype]
    state = ldm_layout.unet_to_ldm(read_component(folder / "unet", torch_dtype), _config(folder / "unet"))
    state.update(ldm_layout.vae_to_ldm(read_component(folder / "vae", torch_dtype), _config(folder / "vae")))
    state.update(ldm_layout.clip_l_to_ldm(read_component(folder / "text_encoder", torch_dtype)))
    state.update(ldm_layout.clip_g_to_ldm(read_component(folder / "text_encoder_2", torch_dtype)))
    stats = edm_latent_stats(folder)
    if stats is not None:
        state["edm_mean"], state["edm_std"] = stats
    return state


def modelspec(folder: Path, title: str, dtype: str, run: dict | None = None) -> dict[str, str]:
    """safetensors header metadata: ModelSpec keys where they fit, then the training run's own."""
    unet, vae = _config(folder / "unet"), _config(folder / "vae")
    size = int(unet.get("sample_size") or 128) * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    edm = edm_latent_stats(folder) is not None
    meta = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": SDXL_ARCHITECTURE,
        "modelspec.implementation": SDXL_IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.resolution": f"{size}x{size}",
        "modelspec.description": (
            "Playground v2.5 architecture (SDXL UNet) sampled with EDM: sigma_data 0.5, sigma_min 0.002, sigma_max 80; "
            "latent statistics in edm_mean/edm_std" if edm else "SDXL architecture; no EDM latent statistics (sampled as SDXL)"),
        "modelspec.unet_dtype": dtype,
        "modelspec.vae_dtype": dtype,
    }
    if edm:
        meta["modelspec.license"] = "playground-v2dot5-community"
    meta.update({f"pgv25.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in (run or {}).items()})
    return meta


def write_single_file(folder: Path, out: Path, dtype: str = "fp16", title: str | None = None, run: dict | None = None) -> Path:
    """Write the pipeline in `folder` to `out` (.safetensors) atomically; one line for any failure."""
    if dtype not in DTYPES:
        raise UserError(f"single-file dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    folder, out = Path(folder), Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out must end in .safetensors, got {out.name}")
    state = single_file_state(folder, dtype)
    metadata = modelspec(folder, title or out.stem, dtype, run)
    with atomic_file(out) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    return out
