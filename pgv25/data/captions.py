"""What fine-tuners do to captions: a template or prefix (the trigger word first), comma-tag shuffling with
the first `keep_tokens` tags fixed, and tag dropout.

The template is applied once, when the rows are read (so the latent cache, `pgv25 data inspect` and the
resume fingerprint all see the final captions). Shuffling and dropout draw from the sample's own generator,
seeded by (seed, step, slot): a resumed run makes the same captions as an uninterrupted one.

    train_dataloader.dataset.captions = dict(prefix='TOK, ', shuffle_tags=True, keep_tokens=1, tag_dropout=0.1)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import UserError

KEY = "train_dataloader.dataset.captions"


@dataclass(frozen=True)
class CaptionOptions:
    template: str = "{caption}"  # e.g. "a photo of TOK, {caption}"
    shuffle_tags: bool = False
    keep_tokens: int = 0  # leading tags that stay in place (and are never dropped)
    tag_dropout: float = 0.0  # each other tag is left out with this probability
    separator: str = ","

    @property
    def per_step(self) -> bool:
        """Captions change from step to step (so they cannot be encoded once into the latent cache)."""
        return self.shuffle_tags or self.tag_dropout > 0

    @property
    def default(self) -> bool:
        return self == CaptionOptions()

    def fixed(self, caption: str) -> str:
        """The template, applied once per row; "" stays "" (it is the unconditional input)."""
        return self.template.replace("{caption}", caption) if caption else caption

    def __call__(self, caption: str, rng: random.Random) -> str:
        """Shuffle and drop tags with the sample's generator."""
        if not self.per_step or not caption:
            return caption
        tags = [t.strip() for t in caption.split(self.separator)]
        kept, rest = tags[: self.keep_tokens], tags[self.keep_tokens:]
        if self.shuffle_tags:
            rng.shuffle(rest)
        if self.tag_dropout > 0:
            rest = [t for t in rest if rng.random() >= self.tag_dropout]
        return f"{self.separator} ".join(t for t in kept + rest if t)


def caption_options(data_cfg: dict, key: str = KEY) -> CaptionOptions:
    """From `dataset.captions` (and `caption_prefix` as a shorthand); every mistake is one line."""
    cfg = dict(data_cfg.get("captions") or {})
    unknown = set(cfg) - {"template", "prefix", "shuffle_tags", "keep_tokens", "tag_dropout", "separator"}
    if unknown:
        raise UserError(f"{key}: unknown option(s) {', '.join(sorted(unknown))} (template, prefix, shuffle_tags, "
                        "keep_tokens, tag_dropout, separator)")
    template, prefix = cfg.get("template"), cfg.get("prefix") or ""
    for name, value in (("template", template), ("prefix", prefix)):
        if value is not None and not isinstance(value, str):  # --cfg-options splits an unquoted 'TOK, x' at the comma
            raise UserError(f"{key}.{name} must be a string, got {value!r}: --cfg-options splits a value at its "
                            "commas, so set one with a comma in the config file")
    if template and prefix:
        raise UserError(f"{key}: give a template or a prefix, not both (a prefix is the template '{prefix}{{caption}}')")
    template = template or prefix + "{caption}"
    if template.count("{caption}") != 1:
        raise UserError(f"{key}.template must contain {{caption}} exactly once, got '{template}'")
    keep, dropout = cfg.get("keep_tokens", 0), cfg.get("tag_dropout", 0.0)
    if not isinstance(keep, int) or keep < 0:
        raise UserError(f"{key}.keep_tokens must be an integer ≥ 0, got {keep!r}")
    if not 0 <= float(dropout) < 1:
        raise UserError(f"{key}.tag_dropout must be in [0, 1), got {dropout}")
    separator = cfg.get("separator", ",")
    if not isinstance(separator, str) or not separator.strip():
        raise UserError(f"{key}.separator must be a non-blank string, got {separator!r}")
    options = CaptionOptions(template, bool(cfg.get("shuffle_tags", False)), keep, float(dropout), separator.strip())
    if options.per_step and (data_cfg.get("cache") or {}).get("enabled"):
        raise UserError(f"{key}: shuffled or dropped tags change the caption every step, so captions cannot come from "
                        "the latent cache; set train_dataloader.dataset.cache.enabled=False or turn them off")
    return options
