"""LoRA on the UNet through peft, exported in the diffusers LoRA format.

The base weights stay frozen; peft wraps the chosen projections with low-rank A·B pairs scaled
by alpha/rank. Exports are `pytorch_lora_weights.safetensors` written by diffusers' own
`save_lora_weights` with the adapter's config as metadata, so `pipe.load_lora_weights(dir)` on the
base pipeline rebuilds exactly the trained layers (alpha included), and optionally a full
pipeline with the LoRA fused into the UNet's weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from .lora_files import LORA_FILE, adapter_configs, component, read_lora, target

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]  # self- and cross-attention projections
FEED_FORWARD = ["ff.net.0.proj", "ff.net.2"]  # the GEGLU input and the output projection
TEXT_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP self-attention projections


def lora_config(cfg: dict):
    """peft LoraConfig from `model.lora` (rank, alpha, dropout, feed_forward, target_modules)."""
    from peft import LoraConfig

    rank = int(cfg.get("rank", 16))
    if rank < 1:
        raise UserError(f"model.lora.rank must be ≥ 1, got {rank}")
    targets = list(cfg.get("target_modules") or ATTENTION) + (FEED_FORWARD if cfg.get("feed_forward") else [])
    return LoraConfig(
        r=rank,
        lora_alpha=float(cfg.get("alpha", rank)),  # alpha = rank: scale 1
        lora_dropout=float(cfg.get("dropout", 0.0)),
        init_lora_weights="gaussian",  # A ~ N(0, 1/r), B = 0: training starts at the base model
        target_modules=targets,
        use_dora=bool(cfg.get("use_dora", False)),  # magnitude starts at ‖W‖ per row: still the base model
    )


def text_lora_config(cfg: dict):
    """LoraConfig for the CLIP encoders: `text_encoder_rank`/`text_encoder_alpha` (default: the UNet's)."""
    if cfg.get("text_encoder_rank"):  # its own rank: alpha = rank unless given
        rank = int(cfg["text_encoder_rank"])
        alpha = float(cfg.get("text_encoder_alpha") or rank)
    else:  # the UNet's rank and alpha
        rank = int(cfg.get("rank", 16))
        alpha = float(cfg.get("text_encoder_alpha") or cfg.get("alpha", rank))
    return lora_config({"rank": rank, "alpha": alpha, "dropout": cfg.get("dropout", 0.0), "target_modules": TEXT_ATTENTION,
                        "use_dora": cfg.get("use_dora", False)})


def add_text_lora(text_encoders, cfg: dict) -> int:
    """Adapters on both CLIP encoders' attention (frozen otherwise); returns their trainable parameter count."""
    from peft import inject_adapter_in_model

    count = 0
    for encoder in text_encoders:
        encoder.requires_grad_(False)
        # peft itself, not transformers' `add_adapter`: that wrapper gates on its own minimum peft version
        # (transformers 5.24 asks for a peft newer than any released), and diffusers loads these layers
        # through peft too. The adapter is named "default" and its config lands on `encoder.peft_config`.
        inject_adapter_in_model(text_lora_config(cfg), encoder, adapter_name="default")
        count += sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    return count


def add_lora(unet, cfg: dict) -> int:
    """Freeze the UNet and add the adapter; returns the number of trainable parameters."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UserError("LoRA needs peft: pip install 'peft>=0.10'") from None
    unet.requires_grad_(False)
    try:
        unet.add_adapter(lora_config(cfg))
    except ValueError as error:  # e.g. a target module name that matches nothing
        raise UserError(f"model.lora: {str(error).strip().splitlines()[0]}") from None
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def lora_state(unet, trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's weights in the diffusers format, from `trainable` (name → tensor; raw or EMA)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    # save_embedding_layers=False: no embedding is trained, and peft's "auto" check looks for a hub config
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, state_dict=dict(trainable), save_embedding_layers=False))


def _metadata(model) -> dict:
    config = model.peft_config["default"].to_dict()
    config["target_modules"] = sorted(config["target_modules"])  # a set: not JSON
    return config


def save_lora(unet, trainable: dict[str, torch.Tensor], folder: Path, text_encoders=(), text_trainable=()) -> Path:
    """Write `pytorch_lora_weights.safetensors` (diffusers format, each adapter's config in its metadata).

    `trainable`: the UNet's trained weights by name; `text_trainable`: the same for each text encoder.
    """
    from diffusers import StableDiffusionXLPipeline

    layers = {"unet_lora_layers": lora_state(unet, trainable), "unet_lora_adapter_metadata": _metadata(unet)}
    for key, encoder, weights in zip(("text_encoder", "text_encoder_2"), text_encoders, text_trainable):
        layers[f"{key}_lora_layers"] = lora_state(encoder, weights)
        layers[f"{key}_lora_adapter_metadata"] = _metadata(encoder)
    layers = {k: ({n: t.contiguous() for n, t in v.items()} if k.endswith("_layers") else v) for k, v in layers.items()}
    StableDiffusionXLPipeline.save_lora_weights(folder, **layers)
    return folder / LORA_FILE


def fused_unet_state(unet, trainable: dict[str, torch.Tensor], base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Plain UNet weights with W ← W + (alpha/r)·B·A folded in: a UNet with no adapter at all. `base`: the frozen
    weights as the base pipeline stores them, when the UNet in memory holds them in a lower precision.

    DoRA (Liu et al. 2024): W ← m ⊙ (W + s·B·A) / ‖W + s·B·A‖, the norm per output row, as peft merges it.
    """
    from peft.tuners.lora import LoraLayer

    state = {k: v for k, v in unet.state_dict().items() if "lora_" not in k}
    if base is not None:
        state = {k: base.get(k.replace(".base_layer.", "."), v) for k, v in state.items()}
    state.update({k: v for k, v in trainable.items() if k in state})
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            a = trainable.get(f"{name}.lora_A.default.weight", module.lora_A["default"].weight).float()
            b = trainable.get(f"{name}.lora_B.default.weight", module.lora_B["default"].weight).float()
            key = f"{name}.base_layer.weight"
            weight = state[key].float() + ((b @ a) * module.scaling["default"]).view(state[key].shape)
            if module.use_dora.get("default"):
                magnitude = trainable.get(f"{name}.lora_magnitude_vector.default.weight",
                                          module.lora_magnitude_vector["default"].weight).float()
                weight = weight * (magnitude / torch.linalg.norm(weight, dim=1)).view(-1, 1)
            state[key] = weight.to(state[key].dtype)
    return {k.replace(".base_layer.", "."): v for k, v in state.items()}


def lora_init(cfg: dict) -> tuple[dict, object | None]:
    """`model.lora` with rank, alpha, targets and DoRA taken from the `init_from` LoRA file (a diffusers-layout file
    or a pgv25 export folder), and that file; (cfg, None) without init_from. Every mistake is one line."""
    path = cfg.get("init_from")
    if not cfg.get("enabled") or not path:
        return cfg, None
    lora = read_lora(path)
    if lora.layout != "diffusers":
        raise UserError(f"model.lora.init_from: {lora.path} is a kohya-layout file; start from the diffusers-layout "
                        f"{LORA_FILE} of the export (or load it in diffusers and save it with save_lora_weights)")
    parts = {component(name) for name in lora.layers}
    if parts - {"unet"} and not cfg.get("text_encoders"):
        raise UserError(f"model.lora.init_from: {lora.path} also adapts the text encoders; set model.lora.text_encoders=True "
                        "to train them too")
    configs = adapter_configs(lora.metadata)
    cfg = dict(cfg)
    for part, prefix in (("unet", ""), ("text_encoder", "text_encoder_")):
        names = [n for n in lora.layers if component(n) == part]
        if not names:
            continue
        config = configs.get(part, {})
        ranks = {lora.layers[n].rank for n in names}
        if len(ranks) > 1 and not config.get("rank_pattern"):
            raise UserError(f"model.lora.init_from: {lora.path} has layers of ranks {sorted(ranks)}; pgv25 trains one rank")
        rank = config.get("r") or ranks.pop()
        alpha = lora.layers[names[0]].alpha or rank
        cfg[f"{prefix}rank"], cfg[f"{prefix}alpha"] = int(rank), float(alpha)
        if part == "unet":
            cfg["target_modules"] = sorted(config.get("target_modules") or {target(n) for n in names})
            cfg["feed_forward"] = False  # the file's target list already says which projections
            cfg["use_dora"] = bool(config.get("use_dora") or lora.dora)
    return cfg, lora


def check_lora_fits(lora, unet_config: dict) -> None:
    """Every UNet layer of `lora` exists in a UNet of `unet_config` with the shapes the file's A and B need (built on the
    meta device: no weights); else one line naming the first misfit."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        modules = dict(UNet2DConditionModel.from_config(unet_config).named_modules())
    for name, layer in lora.layers.items():
        if component(name) != "unet":
            continue
        module = modules.get(name.partition(".")[2])
        weight = getattr(module, "weight", None)
        if weight is None or weight.shape[0] != layer.up.shape[0] or weight.shape[1] != layer.down.shape[1]:
            found = "no such layer" if weight is None else f"a layer of shape {tuple(weight.shape[:2])}"
            raise UserError(f"model.lora.init_from: {lora.path} was trained for another architecture: {name} needs "
                            f"{(layer.up.shape[0], layer.down.shape[1])}, this UNet has {found}")


def load_lora_weights(model, lora, part: str) -> None:
    """Copy the file's layers of `part` ('unet', 'text_encoder', 'text_encoder_2') into the model's 'default' adapter."""
    from peft.utils import set_peft_model_state_dict

    state = {}
    for name, layer in lora.layers.items():
        if component(name) != part:
            continue
        module = name.partition(".")[2]
        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = layer.down, layer.up
        if layer.magnitude is not None:
            state[f"{module}.lora_magnitude_vector"] = layer.magnitude
    result = set_peft_model_state_dict(model, state, adapter_name="default")
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    if unexpected:
        raise UserError(f"model.lora.init_from: {lora.path} has layers this model has no adapter for ({unexpected[0]}, ...)")
