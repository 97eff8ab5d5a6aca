"""`README.md` in every export: the model card the Hugging Face Hub renders.

YAML front matter (huggingface_hub's ModelCardData): `base_model` (when it is a hub id), the license
(Playground's own card declares `license: other`, `license_name: playground-v2dot5-community` and a link,
the form the hub accepts for a custom license), `tags`, trigger words, `instance_prompt`, and `widget`
entries pointing at sample images saved beside the card (`images/`). The body says how to load the export
with diffusers (and ComfyUI, when a single file is there) and lists the settings that shaped the weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

PLAYGROUND_LICENSE = {"license": "other", "license_name": "playground-v2dot5-community",
                      "license_link": "https://huggingface.co/playgroundai/playground-v2.5-1024px-aesthetic/blob/main/LICENSE.md"}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class Card:
    title: str
    base_model: str  # a hub id or a local folder
    playground: bool  # the base is Playground v2.5 (its license applies)
    kind: str  # 'pipeline' | 'lora'
    iteration: int
    settings: dict[str, str] = field(default_factory=dict)  # what shaped the weights, in order
    trigger_words: list[str] = field(default_factory=list)
    instance_prompt: str | None = None
    tags: list[str] = field(default_factory=list)
    license: str | None = None  # overrides the Playground default
    samples: list[tuple[str, str]] = field(default_factory=list)  # (prompt, path relative to the export)
    files: list[str] = field(default_factory=list)  # extra files worth naming (single file, kohya LoRA)


def _front_matter(card: Card) -> str:
    from huggingface_hub import ModelCardData

    fields = {"library_name": "diffusers", "pipeline_tag": "text-to-image",
              "tags": ["text-to-image", "diffusers", "stable-diffusion-xl", *(["playground-v2.5"] if card.playground else []),
                       *(["lora", "template:sd-lora"] if card.kind == "lora" else []), "pgv25", *card.tags]}
    if HUB_ID.match(card.base_model) and not Path(card.base_model).exists():
        fields["base_model"] = card.base_model
    if card.license:
        fields["license"] = card.license
    elif card.playground:
        fields.update(PLAYGROUND_LICENSE)
    if card.instance_prompt:
        fields["instance_prompt"] = card.instance_prompt
    if card.trigger_words:
        fields["trigger_words"] = card.trigger_words
    if card.samples:
        fields["widget"] = [{"text": prompt, "output": {"url": path}} for prompt, path in card.samples]
    return ModelCardData(**fields).to_yaml()


def _usage(card: Card) -> str:
    base = card.base_model
    if card.kind == "lora":
        code = (f'pipe = StableDiffusionXLPipeline.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")\n'
                'pipe.load_lora_weights("THIS_FOLDER")  # pytorch_lora_weights.safetensors')
    else:
        code = 'pipe = StableDiffusionXLPipeline.from_pretrained("THIS_FOLDER", torch_dtype=torch.float16).to("cuda")'
    prompt = card.instance_prompt or (card.samples[0][0] if card.samples else "a photo")
    lines = ["```python", "import torch", "from diffusers import StableDiffusionXLPipeline", "", code,
             f'image = pipe("{prompt}", num_inference_steps=50, guidance_scale=3.0).images[0]', "```"]
    if card.playground:
        lines += ["", "The pipeline samples with Playground v2.5's EDM scheduler (EDMDPMSolverMultistepScheduler); "
                      "guidance 3 is Playground's recommendation."]
    for name in card.files:
        if name.endswith("_kohya.safetensors"):
            lines += ["", f"ComfyUI / A1111: `{name}` is the same LoRA in the kohya layout (LoraLoader, `<lora:...>`), "
                          "applied on top of the Playground v2.5 checkpoint."]
        elif name.endswith(".safetensors"):
            lines += ["", f"ComfyUI / A1111: `{name}` is the whole model in one file (Load Checkpoint); its "
                          "`edm_mean`/`edm_std` keys make ComfyUI sample it as Playground v2.5 (EDM)."]
    return "\n".join(lines)


def render(card: Card) -> str:
    parts = ["---", _front_matter(card).rstrip(), "---", "", f"# {card.title}", ""]
    what = "A LoRA for" if card.kind == "lora" else "A fine-tune of"
    parts += [f"{what} `{card.base_model}`, trained with pgv25 for {card.iteration} iterations.", ""]
    if card.trigger_words:
        parts += [f"Trigger words: {', '.join(f'`{w}`' for w in card.trigger_words)}.", ""]
    if card.samples:
        parts += ["## Samples", ""] + [f"![{prompt}]({path})" for prompt, path in card.samples] + [""]
    parts += ["## Use it", "", _usage(card), "", "## Training settings", ""]
    parts += [f"- {key}: {value}" for key, value in card.settings.items()]
    return "\n".join(parts) + "\n"


def write_card(folder: Path, card: Card, images: list | None = None) -> None:
    """README.md, and `images/sample_<i>.png` for the card's widget (PIL images, one per sample prompt)."""
    if images:
        (folder / "images").mkdir(exist_ok=True)
        for i, image in enumerate(images):
            image.save(folder / "images" / f"sample_{i}.png")
    (folder / "README.md").write_text(render(card), encoding="utf-8")


def card_of_run(trainer, kind: str, files: list[str] = ()) -> dict:
    """The card of an export a Trainer makes at its current iteration, with that iteration's validation images when
    there are some: {'card': Card, 'images': [...]}, the keyword arguments of write_card."""
    from .single_file import edm_latent_stats

    options = trainer.options
    train, data = options.train, options.data
    card_cfg = options.card
    captions = data.captions
    triggers = list(card_cfg.get("trigger_words") or [])
    if not triggers and captions.template != "{caption}":  # the fixed words every caption was given
        fixed = captions.template.replace("{caption}", "").strip(" ,;")
        triggers = [fixed] if fixed else []
    per_update = data.batch_size * trainer.optim.accumulation * trainer.world_size
    settings = {"objective": trainer.objective.describe(), "optimizer": f"{options.optim.type}, lr {options.optim.lr}",
                "batch": f"{data.batch_size} per process × {trainer.optim.accumulation} accumulation × {trainer.world_size} "
                         f"process(es) = {per_update} images per update",
                "iterations": f"{trainer.iteration} of {train.max_iters}", "resolution": str(data.resolution),
                "mixed precision": options.runtime.mixed_precision, "seed": str(train.seed),
                "dataset": f"{data.dataset.get('type')} {data.dataset.get('path')}"}
    lora = trainer.lora
    if lora is not None:
        settings["LoRA"] = (f"rank {lora.get('rank', 16)}, alpha {lora.get('alpha', lora.get('rank', 16))}"
                            f"{', DoRA' if lora.get('use_dora') else ''}, targets "
                            f"{', '.join(sorted(trainer.unet.peft_config['default'].target_modules))}")
    if trainer.ema is not None:
        settings["EMA"] = f"decay {options.ema.settings.get('decay')}, exported: {options.ema.export}"
    if not captions.default:
        settings["captions"] = (f"template '{captions.template}', shuffle {captions.shuffle_tags}, keep_tokens "
                                f"{captions.keep_tokens}, tag dropout {captions.tag_dropout}")
    last = trainer.validation.last
    images = last[2] if last is not None and last[0] == trainer.iteration else []
    samples = [(spec.prompt, f"images/sample_{i}.png") for i, spec in enumerate(last[1])] if images else []
    card = Card(title=card_cfg.get("title") or f"{train.config_name} step {trainer.iteration}",
                base_model=str(options.model.pretrained),
                playground=edm_latent_stats(Path(trainer.base_folder)) is not None, kind=kind, iteration=trainer.iteration,
                settings=settings, trigger_words=triggers, instance_prompt=card_cfg.get("instance_prompt"),
                tags=list(card_cfg.get("tags") or []), license=card_cfg.get("license"), samples=samples, files=list(files))
    return {"card": card, "images": images}
