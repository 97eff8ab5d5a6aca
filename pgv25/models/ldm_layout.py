"""diffusers key names → the original SDXL (LDM, "single-file") key layout that ComfyUI and A1111 load.

diffusers ships only the other direction (its single-file loader). The block indices here come from
each model's config (`layers_per_block`, the block type lists), not from SDXL's numbers, so one mapping
serves the tiny test model and the 2.6B UNet; tests load the result back through diffusers' own
single-file converters, which is what keeps this table honest.

LDM UNet numbering: `input_blocks.0` is conv_in, then each down level has `layers_per_block` entries
(ResNet at `.0`, attention at `.1`) plus one for its downsampler (`.0.op`), except the last level;
`output_blocks` has `layers_per_block + 1` entries per level, the upsampler sitting after the last
entry's attention (`.2`) or ResNet (`.1`).
"""

from __future__ import annotations

import torch

from ..errors import UserError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
CLIP_G_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                "self_attn.out_proj": "attn.out_proj"}


def _uniform(config: dict, key: str) -> int:
    value = config[key]
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise UserError(f"the SDXL single-file layout needs one {key} for every level, this model has {list(value)}")
        value = value[0]
    return int(value)


def _rename(name: str, table: dict[str, str]) -> str:
    """Replace the first dotted component(s) of `name` found in `table` (e.g. 'norm1.weight')."""
    for old, new in table.items():
        if name.startswith(old + "."):
            return new + name[len(old):]
    return name


def unet_blocks(config: dict) -> list[tuple[str, str, dict]]:
    """(diffusers prefix, LDM prefix, renames inside it) for every part of an SDXL-style UNet."""
    per_level = _uniform(config, "layers_per_block")
    levels = len(config["down_block_types"])
    if len(config["up_block_types"]) != levels:
        raise UserError("the SDXL single-file layout needs as many up levels as down levels")
    blocks = [("time_embedding.linear_1", "time_embed.0", {}), ("time_embedding.linear_2", "time_embed.2", {}),
              ("add_embedding.linear_1", "label_emb.0.0", {}), ("add_embedding.linear_2", "label_emb.0.2", {}),
              ("conv_in", "input_blocks.0.0", {}), ("conv_norm_out", "out.0", {}), ("conv_out", "out.2", {}),
              ("mid_block.resnets.0", "middle_block.0", UNET_RESNET), ("mid_block.attentions.0", "middle_block.1", {}),
              ("mid_block.resnets.1", "middle_block.2", UNET_RESNET)]
    for level in range(levels):
        first = 1 + level * (per_level + 1)
        for j in range(per_level):
            blocks += [(f"down_blocks.{level}.resnets.{j}", f"input_blocks.{first + j}.0", UNET_RESNET),
                       (f"down_blocks.{level}.attentions.{j}", f"input_blocks.{first + j}.1", {})]
        if level < levels - 1:
            blocks.append((f"down_blocks.{level}.downsamplers.0.conv", f"input_blocks.{first + per_level}.0.op", {}))
    for level, kind in enumerate(config["up_block_types"]):
        first = level * (per_level + 1)
        for j in range(per_level + 1):
            blocks += [(f"up_blocks.{level}.resnets.{j}", f"output_blocks.{first + j}.0", UNET_RESNET),
                       (f"up_blocks.{level}.attentions.{j}", f"output_blocks.{first + j}.1", {})]
        if level < levels - 1:
            after = 2 if "CrossAttn" in kind else 1  # the upsampler follows the level's last attention, or its ResNet
            blocks.append((f"up_blocks.{level}.upsamplers.0.conv", f"output_blocks.{first + per_level}.{after}.conv", {}))
    return blocks


def vae_blocks(config: dict) -> list[tuple[str, str, dict]]:
    """The same for AutoencoderKL; the decoder's levels are numbered from the bottom in LDM."""
    per_level = int(config["layers_per_block"])
    levels = len(config["down_block_types"])
    same = ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out", "quant_conv", "post_quant_conv")
    blocks = [(name, name, {}) for name in same]
    blocks += [("encoder.conv_norm_out", "encoder.norm_out", {}), ("decoder.conv_norm_out", "decoder.norm_out", {})]
    for part in ("encoder", "decoder"):
        blocks += [(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", VAE_RESNET),
                   (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", VAE_RESNET),
                   (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION)]
    for level in range(levels):
        blocks += [(f"encoder.down_blocks.{level}.resnets.{j}", f"encoder.down.{level}.block.{j}", VAE_RESNET)
                   for j in range(per_level)]
        blocks.append((f"encoder.down_blocks.{level}.downsamplers.0.conv", f"encoder.down.{level}.downsample.conv", {}))
        ldm_level = levels - 1 - level
        blocks += [(f"decoder.up_blocks.{level}.resnets.{j}", f"decoder.up.{ldm_level}.block.{j}", VAE_RESNET)
                   for j in range(per_level + 1)]
        blocks.append((f"decoder.up_blocks.{level}.upsamplers.0.conv", f"decoder.up.{ldm_level}.upsample.conv", {}))
    return blocks


def _convert(state: dict[str, torch.Tensor], blocks: list[tuple[str, str, dict]], what: str) -> dict[str, torch.Tensor]:
    # Longest prefix first: "up_blocks.0.resnets.1" must not catch "up_blocks.0.resnets.10".
    ordered = sorted(blocks, key=lambda b: -len(b[0]))
    out = {}
    for name, tensor in state.items():
        for prefix, ldm, inner in ordered:
            if name.startswith(prefix + "."):
                out[ldm + "." + _rename(name[len(prefix) + 1:], inner)] = tensor
                break
        else:
            raise UserError(f"{what} weight '{name}' has no place in the SDXL single-file layout")
    return out


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    converted = _convert(state, unet_blocks(config), "UNet")
    return {UNET_PREFIX + k: v for k, v in converted.items()}


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    converted = _convert(state, vae_blocks(config), "VAE")
    # LDM's mid-block attention projections are 1×1 convolutions, diffusers' are linear layers.
    for key, value in converted.items():
        if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and value.dim() == 2:
            converted[key] = value[:, :, None, None]
    return {VAE_PREFIX + k: v for k, v in converted.items()}


def _text_model_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys under `text_model.` whichever transformers wrote them (CLIPTextModel is flat since 5.6)."""
    return {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v for k, v in state.items()
            if not k.endswith("position_ids")}


def clip_l_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP ViT-L stays in transformers' layout under SDXL's first embedder."""
    return {CLIP_L_PREFIX + k: v for k, v in _text_model_keys(state).items() if not k.startswith("text_projection.")}


def clip_g_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP bigG in OpenCLIP's layout: fused q/k/v, `resblocks`, a [width, projection] text_projection."""
    state = _text_model_keys(state)
    out = {"token_embedding.weight": state.pop("text_model.embeddings.token_embedding.weight"),
           "positional_embedding": state.pop("text_model.embeddings.position_embedding.weight"),
           "ln_final.weight": state.pop("text_model.final_layer_norm.weight"),
           "ln_final.bias": state.pop("text_model.final_layer_norm.bias"),
           "text_projection": state.pop("text_projection.weight").T.contiguous()}
    layers = sorted({int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        head = f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{head}self_attn.{p}_proj.{kind}") for p in "qkv"])
        for key in [k for k in state if k.startswith(head)]:
            out[f"transformer.resblocks.{i}.{_rename(key[len(head):], CLIP_G_LAYER)}"] = state.pop(key)
    if state:
        raise UserError(f"text_encoder_2 weight '{next(iter(state))}' has no place in the SDXL single-file layout")
    return {CLIP_G_PREFIX + k: v for k, v in out.items()}
