"""LoRA files as the ecosystem passes them around: diffusers/peft layout (pgv25's exports) and kohya layout.

- `kohya_state`: a pgv25/diffusers LoRA file → the kohya layout (`lora_unet_…`, `lora_te1_…`, `lora_te2_…`,
  a `.alpha` per layer) that ComfyUI's LoraLoader and A1111 read, through diffusers' own
  `convert_state_dict_to_kohya`. That converter writes alpha = rank for every layer; the trained alpha
  (from the adapter metadata) is put back, or kohya loaders would apply the LoRA at the wrong strength.
- `read_lora`: any of these files as layers (down A, up B, alpha) with one scale per layer, for
  `pgv25 lora info` and `pgv25 lora merge`.
- `merge`: several LoRAs as one, exactly by concatenating ranks (ΔW = Σ wᵢ·sᵢ·BᵢAᵢ = [w₁s₁B₁ … ]·[A₁; …]),
  or to a target rank by a truncated SVD of that sum.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..files import atomic_file

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights writes and load_lora_weights reads
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights keeps each adapter's LoraConfig
# key suffix → part of a layer, for every layout pgv25 reads (peft, diffusers, older diffusers, kohya)
PARTS = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up",
         ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
         ".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",
         ".lora_magnitude_vector.weight": "magnitude", ".lora_magnitude_vector": "magnitude", ".dora_scale": "magnitude"}
# cross-attention width (what the UNet's attn2.to_k reads) → the base model family
FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL (SDXL, Playground v2.5)"}


def resolve(path: str | Path) -> Path:
    """A LoRA file, or an export folder holding pytorch_lora_weights.safetensors."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist (give a LoRA .safetensors file or a LoRA export folder)")
    return path


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as error:  # safetensors raises its own error types for damaged headers
        raise UserError(f"cannot read {path} as safetensors: {str(error).splitlines()[0]}") from None


def adapter_configs(metadata: dict) -> dict[str, dict]:
    """Each component's LoraConfig fields from diffusers' metadata: {'unet': {'r': 4, 'lora_alpha': 8, ...}}."""
    packed = json.loads(metadata.get(METADATA_KEY) or "{}")
    configs: dict[str, dict] = {}
    for key, value in packed.items():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def _pattern_value(module: str, patterns: dict, default):
    """peft's rank_pattern/alpha_pattern lookup: a pattern matches the module name's end."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def layer_alpha(component_config: dict, module: str) -> float:
    return float(_pattern_value(module, component_config.get("alpha_pattern"), component_config.get("lora_alpha")))


def kohya_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The LoRA in `path` (diffusers layout, with pgv25's metadata) in the kohya layout, alphas as trained."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    lora = read_lora(path)
    configs, alphas = adapter_configs(lora.metadata), {}
    if any(c.get("use_dora") for c in configs.values()):
        raise UserError("lora.kohya_export: a DoRA adapter has no kohya file diffusers can read back; export it without DoRA")
    if any(c.get("use_rslora") for c in configs.values()):
        raise UserError("lora.kohya_export: rsLoRA's scale alpha/√r has no kohya equivalent here")
    # peft names for every layer (diffusers' own detection converts only one naming per file, and a file with
    # text-encoder layers mixes two), CLIP-L under `text_model.` as kohya names it (transformers ≥ 5.6 drops it).
    peft = {}
    for name, layer in lora.layers.items():
        part, _, module = name.partition(".")
        if part != "unet" and not module.startswith("text_model."):
            module = "text_model." + module
        peft[f"{part}.{module}.lora_A.weight"], peft[f"{part}.{module}.lora_B.weight"] = layer.down, layer.up
        alphas[f"{KOHYA_PREFIX[part]}_{module.replace('.', '_')}.alpha"] = layer.alpha if layer.alpha is not None else layer.rank
    kohya = convert_state_dict_to_kohya(peft)
    for key, alpha in alphas.items():  # the converter writes alpha = rank
        if key not in kohya:
            raise UserError(f"{path}: a layer did not come out of the kohya conversion as {key}")
        kohya[key] = torch.tensor(float(alpha))
    unet = configs.get("unet", {})
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0",
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "ss_network_dim": str(unet.get("r", "")), "ss_network_alpha": str(unet.get("lora_alpha", ""))}
    return {k: v.contiguous() for k, v in kohya.items()}, meta


def write_kohya(lora_file: Path, out: Path) -> Path:
    from safetensors.torch import save_file

    state, metadata = kohya_state(lora_file)
    with atomic_file(out) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return out


@dataclass
class Layer:
    down: torch.Tensor | None = None  # A: [r, in] (or [r, in, kh, kw])
    up: torch.Tensor | None = None  # B: [out, r] (or [out, r, 1, 1])
    alpha: float | None = None
    magnitude: torch.Tensor | None = None  # DoRA

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoraFile:
    path: Path
    layout: str  # 'diffusers' | 'kohya'
    layers: dict[str, Layer]  # "unet.down_blocks.1....to_q" (diffusers) or "lora_unet_down_blocks_1_..." (kohya)
    metadata: dict = field(default_factory=dict)

    def scale(self, name: str) -> float:
        layer = self.layers[name]
        return (layer.alpha if layer.alpha is not None else layer.rank) / layer.rank

    @property
    def dora(self) -> bool:
        return any(layer.magnitude is not None for layer in self.layers.values())


def read_lora(path: str | Path) -> LoraFile:
    path = resolve(path)
    state, metadata = _load(path)
    layers: dict[str, Layer] = {}
    for key, tensor in state.items():
        suffix = next((s for s in sorted(PARTS, key=len, reverse=True) if key.endswith(s)), None)
        if suffix is None:
            continue
        module = key[: -len(suffix)]
        if ".processor." in module:  # older diffusers attention-processor names: ...attn1.processor.to_q_lora
            module = module.replace(".processor.", ".").removesuffix("_lora")
        setattr(layers.setdefault(module, Layer()), PARTS[suffix], tensor if PARTS[suffix] != "alpha" else float(tensor))
    layers = {name: layer for name, layer in layers.items() if layer.down is not None and layer.up is not None}
    if not layers:
        raise UserError(f"{path} holds no LoRA layers (no lora_A/lora_B, lora.down/lora.up or lora_down/lora_up weights)")
    layout = "kohya" if all(name.startswith(("lora_unet", "lora_te")) for name in layers) else "diffusers"
    if layout == "diffusers":
        configs = adapter_configs(metadata)
        for name, layer in layers.items():
            component, _, module = name.partition(".")
            config = configs.get(component)
            if layer.alpha is None and config:
                layer.alpha = layer_alpha(config, module)
                if config.get("use_rslora"):  # scale alpha/√r, written as an alpha for the alpha/r convention
                    layer.alpha *= math.sqrt(layer.rank)
    return LoraFile(path, layout, layers, metadata)


def component(name: str) -> str:
    if name.startswith(("lora_te1", "text_encoder.")):
        return "text_encoder"
    if name.startswith(("lora_te2", "text_encoder_2.")):
        return "text_encoder_2"
    return "unet"


def cross_attention_width(lora: LoraFile) -> int | None:
    for name, layer in lora.layers.items():
        if component(name) == "unet" and re.search(r"attn2[._]to_[kv]$", name):
            return int(layer.down.shape[1])
    return None


def target(name: str) -> str:
    """The projection a layer adapts (to_q, ff.net.0.proj, self_attn.q_proj, ...), in the file's own separators."""
    match = re.search(r"(attn\d[._]to_(q|k|v|out[._]0)|ff[._]net[._]\d([._]proj)?|self_attn[._]\w+|mlp[._]\w+"
                      r"|proj_in|proj_out|conv\w*)$", name)
    return match.group(1) if match else re.split(r"[._]\d+[._]", name)[-1]


def describe(lora: LoraFile) -> list[str]:
    """The lines of `pgv25 lora info`."""
    size = lora.path.stat().st_size
    lines = [f"file: {lora.path} ({lora.layout} layout, {size / 2**20:.2f} MiB)"]
    for part in ("unet", "text_encoder", "text_encoder_2"):
        names = [n for n in lora.layers if component(n) == part]
        if not names:
            continue
        ranks = sorted({lora.layers[n].rank for n in names})
        alphas = sorted({lora.layers[n].alpha if lora.layers[n].alpha is not None else lora.layers[n].rank for n in names})
        scales = sorted({round(lora.scale(n), 6) for n in names})
        targets = sorted({target(n) for n in names})
        params = sum(lora.layers[n].down.numel() + lora.layers[n].up.numel() for n in names)
        dora = any(lora.layers[n].magnitude is not None for n in names)
        lines.append(f"{part}: {len(names)} layers, rank {'/'.join(map(str, ranks))}, alpha {'/'.join(f'{a:g}' for a in alphas)} "
                     f"(scale {'/'.join(f'{s:g}' for s in scales)}), {params:,} parameters{', DoRA' if dora else ''}")
        lines.append(f"  targets: {', '.join(targets)}")
    width = cross_attention_width(lora)
    if width is not None:
        lines.append(f"base: cross-attention width {width}: {FAMILIES.get(width, 'a custom UNet')}")
    title = lora.metadata.get("modelspec.title")
    if title:
        lines.append(f"title: {title}")
    return lines


def _check_compatible(loras: list[LoraFile]) -> None:
    first = loras[0]
    for other in loras[1:]:
        if other.layout != first.layout:
            raise UserError(f"cannot merge a {first.layout}-layout LoRA ({first.path.name}) with a {other.layout}-layout one "
                            f"({other.path.name}); convert them to one layout first")
        a, b = cross_attention_width(first), cross_attention_width(other)
        if a is not None and b is not None and a != b:
            raise UserError(f"{first.path.name} and {other.path.name} are LoRAs of different base architectures "
                            f"(cross-attention width {a} vs {b})")
        for name in set(first.layers) & set(other.layers):
            x, y = first.layers[name], other.layers[name]
            if x.down.shape[1:] != y.down.shape[1:] or x.up.shape[0] != y.up.shape[0] or x.up.shape[2:] != y.up.shape[2:]:
                raise UserError(f"{first.path.name} and {other.path.name} are LoRAs of different base architectures "
                                f"(layer {name}: {tuple(x.up.shape[:1] + x.down.shape[1:])} vs {tuple(y.up.shape[:1] + y.down.shape[1:])})")
    for lora in loras:
        if lora.dora:
            raise UserError(f"{lora.path.name} is a DoRA LoRA: its magnitudes do not add, so it cannot be merged")


def merge(loras: list[LoraFile], weights: list[float], rank: int | None = None) -> dict[str, Layer]:
    """One layer per module with alpha = rank (scale 1): ΔW = Σ wᵢ·sᵢ·BᵢAᵢ exactly (rank None), or its best rank-`rank` fit."""
    _check_compatible(loras)
    names = sorted(set().union(*(lora.layers for lora in loras)))
    merged = {}
    for name in names:
        parts = [(lora.layers[name], w * lora.scale(name)) for lora, w in zip(loras, weights) if name in lora.layers]
        down = torch.cat([layer.down.float() for layer, _ in parts])
        up = torch.cat([layer.up.float() * s for layer, s in parts], dim=1)
        if rank is not None and rank < down.shape[0]:
            delta = up.flatten(1) @ down.flatten(1)  # [out, in·kh·kw]: 1×1 up kernels, as LoRA convolutions have
            u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
            root = sv[:rank].sqrt()
            up = (u[:, :rank] * root).reshape(up.shape[0], rank, *up.shape[2:])
            down = (root[:, None] * vh[:rank]).reshape(rank, *down.shape[1:])
        merged[name] = Layer(down=down, up=up, alpha=float(down.shape[0]))
    width = max(layer.rank for layer in merged.values())
    for layer in merged.values():  # one rank for every layer (zero rows/columns change nothing): one LoraConfig
        pad = width - layer.rank
        if pad:
            layer.down = torch.cat([layer.down, layer.down.new_zeros(pad, *layer.down.shape[1:])])
            layer.up = torch.cat([layer.up, layer.up.new_zeros(layer.up.shape[0], pad, *layer.up.shape[2:])], dim=1)
            layer.alpha = float(width)
    return merged


def layers_state(layers: dict[str, Layer], layout: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = {}
    for name, layer in layers.items():
        if layout == "kohya":
            state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = layer.down, layer.up
            state[f"{name}.alpha"] = torch.tensor(layer.alpha)
        else:  # peft names, which diffusers' load_lora_weights reads; alpha = rank needs no metadata
            state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = layer.down, layer.up
    return {k: (v.to(dtype) if k.endswith(".weight") else v.float()).contiguous() for k, v in state.items()}


def write_merged(layers: dict[str, Layer], layout: str, out: Path, dtype: torch.dtype, sources: list[dict]) -> Path:
    from safetensors.torch import save_file

    metadata = {"format": "pt", "pgv25.merged_from": json.dumps(sources)}
    if layout == "kohya":
        rank = max(layer.rank for layer in layers.values())
        metadata.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank)})
    with atomic_file(out) as tmp:
        save_file(layers_state(layers, layout, dtype), str(tmp), metadata=metadata)
    return out
