"""A tiny Playground-v2.5-architecture base pipeline, built locally with no download.

Same component classes and scheduler config as `playgroundai/playground-v2.5-1024px-aesthetic`,
tiny widths: CLIP-style BPE tokenizers trained here on the shapes captions, two random frozen CLIP
text encoders (the second with a projection), a random SDXL-style UNet with `text_time` added
conditioning, and a VAE trained on the shapes until it reconstructs them, with `latents_mean/std`
measured on the data exactly as Playground's VAE config carries them.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

# Playground v2.5's scheduler_config.json, field for field.
PLAYGROUND_SCHEDULER_CONFIG = dict(
    algorithm_type="dpmsolver++",
    dynamic_thresholding_ratio=0.995,
    euler_at_final=False,
    final_sigmas_type="zero",
    lower_order_final=True,
    num_train_timesteps=1000,
    prediction_type="epsilon",
    rho=7.0,
    sample_max_value=1.0,
    sigma_data=0.5,
    sigma_max=80.0,
    sigma_min=0.002,
    solver_order=2,
    solver_type="midpoint",
    thresholding=False,
)
PLAYGROUND_VAE_SCALING_FACTOR = 0.5
TEXT_WIDTH = 32  # each encoder's hidden size; the UNet's cross-attention sees both concatenated


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable-character table, the base alphabet of its BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def train_clip_bpe(corpus: list[str], num_merges: int = 400) -> tuple[dict[str, int], list[str]]:
    """A CLIP-format vocabulary and merge list: 256 byte symbols, the same with `</w>`, learned
    merges, then `<|startoftext|>` and `<|endoftext|>` last, as in OpenAI's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    alphabet = list(bytes_to_unicode().values())
    base = alphabet + [a + "</w>" for a in alphabet]
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=len(base) + num_merges, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False
    )
    tokenizer.train_from_iterator([c.lower() for c in corpus], trainer=trainer)
    merges = [" ".join(pair) if isinstance(pair, (tuple, list)) else pair for pair in json.loads(tokenizer.to_str())["model"]["merges"]]
    vocab = {token: i for i, token in enumerate(base)}
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def write_bpe_files(folder: Path, vocab: dict[str, int], merges: list[str]) -> tuple[Path, Path]:
    """`vocab.json` + `merges.txt`: the files every transformers version's CLIPTokenizer reads."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def build_tokenizers(vocab: dict[str, int], merges: list[str]):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = write_bpe_files(Path(tmp), vocab, merges)
        return [CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77) for _ in range(2)]


def build_text_encoders(vocab_size: int, bos_id: int, eos_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(projection_dim):
        return CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=projection_dim,
            bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id, hidden_act="gelu",
        )

    return CLIPTextModel(config(TEXT_WIDTH)).eval(), CLIPTextModelWithProjection(config(TEXT_WIDTH)).eval()


def pretrain_text_encoders(tokenizer, encoders, captions: list[str], steps: int = 300, seed: int = 0, lr: float = 2e-3) -> float:
    """Teach the random tiny CLIP encoders to tell the captions apart: the stand-in for CLIP's pre-training.

    Random 3-layer encoders give every caption nearly the same embedding (cosine 0.94–0.99 between
    "a red circle on a white background" and "a white circle on a red background"), which no UNet
    learns from in minutes; a real Playground fine-tune starts from CLIP encoders that separate such
    captions. Linear heads read the shape colour, shape and background from each encoder's pooled
    output and from the mean of its penultimate hidden states (what SDXL's cross-attention reads);
    the heads are thrown away. Only the training captions are used, so held-out combinations stay
    unseen. Returns the final mean cosine similarity between different captions' pooled embeddings.
    """
    from .shapes import COLOURS, SHAPES, parse_caption

    labelled = [(c, parse_caption(c)) for c in dict.fromkeys(captions)]
    labelled = [(c, p) for c, p in labelled if p is not None]
    names = [list(COLOURS), list(SHAPES), list(COLOURS)]
    targets = torch.tensor([[names[k].index(p[k]) for k in range(3)] for _, p in labelled])
    ids = tokenizer([c for c, _ in labelled], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(seed)
    heads = torch.nn.ModuleList(torch.nn.Linear(TEXT_WIDTH, len(n)) for _ in range(2 * len(encoders)) for n in names)
    params = list(heads.parameters()) + [p for e in encoders for p in e.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def features(batch_ids):
        out = []
        for encoder in encoders:
            result = encoder(batch_ids, output_hidden_states=True)
            pooled = result.text_embeds if hasattr(result, "text_embeds") else result.pooler_output
            out += [pooled, result.hidden_states[-2].mean(1)]
        return out

    for encoder in encoders:
        encoder.train()
    for step in range(steps):
        pick = torch.randint(0, len(ids), (min(32, len(ids)),), generator=g)
        loss = 0.0
        for f, feature in enumerate(features(ids[pick])):
            for k in range(3):
                loss = loss + torch.nn.functional.cross_entropy(heads[f * 3 + k](feature), targets[pick, k])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for encoder in encoders:
        encoder.eval()
    with torch.no_grad():
        pooled = torch.nn.functional.normalize(features(ids)[2], dim=1)
        similarity = pooled @ pooled.T
        off_diagonal = similarity[~torch.eye(len(ids), dtype=torch.bool)].mean().item()
    logger.info("tiny text encoders: %d steps on %d captions, loss %.3f, mean cosine between captions %.2f",
                steps, len(ids), loss.item(), off_diagonal)
    return off_diagonal


def build_unet(sample_size: int):
    """SDXL's UNet layout (3 levels, cross-attention on the lower two, `text_time` added
    conditioning from the pooled text embedding and six micro-conditioning numbers), tiny widths."""
    from diffusers import UNet2DConditionModel

    time_embed_dim = 8
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 1),
        attention_head_dim=(2, 4, 8),
        norm_num_groups=32,
        cross_attention_dim=2 * TEXT_WIDTH,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + TEXT_WIDTH,
    )


def build_vae(sample_size: int):
    """AutoencoderKL as in SDXL, three levels (4× downsampling), narrow, without the mid-block
    attention (flat shapes do not need it and it doubles the CPU cost)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=sample_size,
        scaling_factor=PLAYGROUND_VAE_SCALING_FACTOR,
        force_upcast=False,
        mid_block_add_attention=False,
    )
    with torch.no_grad():
        # Start with a small posterior variance: with log σ² ≈ 0 the sampled latents are mostly
        # noise and the decoder sits for hundreds of steps predicting the mean colour.
        vae.quant_conv.bias[vae.config.latent_channels :] = -8.0
    return vae


def load_images(folder: Path) -> torch.Tensor:
    """All dataset images as one (N, 3, H, W) tensor in [-1, 1]."""
    rows = [json.loads(line) for line in open(folder / "metadata.jsonl")]
    arrays = [np.asarray(Image.open(folder / r["file_name"]).convert("RGB"), dtype=np.float32) for r in rows]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a.clamp(-1, 1) - b) ** 2).mean())
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def train_vae(vae, images: torch.Tensor, steps: int, seed: int, batch_size: int = 8, lr: float = 3e-3, kl_weight: float = 1e-6):
    """Fit the VAE to the shapes: MSE + a small KL term (SD's VAE objective minus the GAN),
    warm-up, constant, then cosine decay over the last 40%; clipped gradients keep it stable."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    decay_from = 0.6 * steps

    def factor(step: int) -> float:
        warmup = min(1.0, (step + 1) / 50)
        return warmup if step < decay_from else 0.5 * (1 + math.cos(math.pi * (step - decay_from) / (steps - decay_from)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    vae.train()
    for step in range(steps):
        batch = images[torch.randint(0, len(images), (batch_size,), generator=g)]
        posterior = vae.encode(batch).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        loss = torch.nn.functional.mse_loss(vae.decode(z).sample, batch) + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0 or step == steps - 1:
            logger.info("tiny VAE step %d/%d  loss %.5f", step + 1, steps, loss.item())
    return vae.eval()


@torch.no_grad()
def measure_vae(vae, images: torch.Tensor, seed: int) -> tuple[list[float], list[float], float]:
    """Per-channel mean/std of sampled latents over the data, and reconstruction PSNR."""
    g = torch.Generator().manual_seed(seed)
    latents, scores = [], []
    for batch in images.split(64):
        posterior = vae.encode(batch).latent_dist
        latents.append(posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g))
        scores.append(psnr(vae.decode(posterior.mean).sample, batch))
    z = torch.cat(latents).transpose(0, 1).flatten(1)
    return z.mean(1).tolist(), z.std(1).tolist(), float(np.mean(scores))


def build_base_pipeline(out_dir: str | Path, shapes_dir: str | Path, image_size: int, vae_steps: int, seed: int,
                        text_steps: int = 300) -> dict:
    """Build and `save_pretrained` the tiny pipeline into `out_dir`; returns facts for the stamp."""
    from diffusers import EDMDPMSolverMultistepScheduler, StableDiffusionXLPipeline

    start = time.time()
    shapes_dir = Path(shapes_dir)
    captions = [json.loads(line)["text"] for line in open(shapes_dir / "metadata.jsonl")]
    torch.manual_seed(seed)
    vocab, merges = train_clip_bpe(captions + ["a photo of an object in the middle of the picture"])
    tokenizer, tokenizer_2 = build_tokenizers(vocab, merges)
    text_encoder, text_encoder_2 = build_text_encoders(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    text_similarity = pretrain_text_encoders(tokenizer, [text_encoder, text_encoder_2], captions, text_steps, seed)
    vae_scale = 4
    unet = build_unet(image_size // vae_scale)
    images = load_images(shapes_dir)
    vae = train_vae(build_vae(image_size), images, vae_steps, seed)
    mean, std, score = measure_vae(vae, images, seed)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    scheduler = EDMDPMSolverMultistepScheduler(**PLAYGROUND_SCHEDULER_CONFIG)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):  # beside tokenizer.json, for transformers 4's slow tokenizer
        write_bpe_files(Path(out_dir) / name, vocab, merges)
    return {"vae_psnr_db": round(score, 2), "text_cosine_between_captions": round(text_similarity, 3), "latents_mean": mean, "latents_std": std, "build_seconds": round(time.time() - start, 1)}
