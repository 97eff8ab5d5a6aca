"""Prompt → (prompt_embeds, pooled_prompt_embeds), built exactly as
`StableDiffusionXLPipeline.encode_prompt` builds them, so training sees what inference sees."""

from __future__ import annotations

import torch
from torch import nn


class TextConditioner(nn.Module):
    """Both frozen CLIP encoders; caption dropout yields the pipeline's own unconditional input.

    prompt_embeds = concat(penultimate hidden state of each encoder); pooled = the projection
    encoder's `text_embeds`. With `force_zeros_for_empty_prompt` (Playground's and SDXL's
    model_index sets it) the pipeline's classifier-free-guidance input is all zeros, so a dropped
    caption becomes zeros too; otherwise it is the encoding of "".
    """

    def __init__(self, tokenizers, text_encoders, force_zeros_for_empty_prompt: bool = True):
        super().__init__()
        self.tokenizers = list(tokenizers)
        self.text_encoders = nn.ModuleList(text_encoders).requires_grad_(False).eval()
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout inside the encoders stays off

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # Gradients only reach the encoders when something in them trains (text-encoder LoRA).
        with torch.set_grad_enabled(torch.is_grad_enabled() and any(p.requires_grad for p in self.text_encoders.parameters())):
            return self._encode(prompts)

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(
                prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids.to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds is the pooled vector
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def forward(self, prompts: list[str], drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode `prompts`; rows where `drop` is True get the unconditional input instead."""
        if drop is not None and bool(drop.any()):
            if not self.force_zeros_for_empty_prompt:
                prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        prompt_embeds, pooled = self.encode(prompts)
        if drop is not None and self.force_zeros_for_empty_prompt:
            keep = (~drop).to(prompt_embeds.device, prompt_embeds.dtype)
            prompt_embeds = prompt_embeds * keep[:, None, None]
            pooled = pooled * keep[:, None]
        return prompt_embeds, pooled
