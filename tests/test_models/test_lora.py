"""LoRA: small checkpoints that resume exactly, and exports that plain diffusers loads into the base pipeline."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_near, tiny_cfg
from pgv25.engine.runner import Trainer, train
from pgv25.models.lora import LORA_FILE

OPTIONS = ["model.lora.enabled=True", "model.lora.rank=4", "model.lora.alpha=8",  # alpha ≠ rank: the scale must survive export
           "model.lora.feed_forward=True", "optim_wrapper.optimizer.lr=1e-2", "train_cfg.max_iters=4",
           "default_hooks.checkpoint.interval=2", "sample_grid.prompts=[]"]


@pytest.fixture(scope="module")
def lora_run(tiny_assets, tmp_path_factory):
    work = tmp_path_factory.mktemp("lora")
    trainer = Trainer(tiny_cfg(work, *OPTIONS, "model.lora.fuse_export=True"))
    result = trainer.run()
    return trainer, result, work


def images(pipe, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe(["a red circle on a white background", "a blue square on a black background"], num_inference_steps=4,
                guidance_scale=3.0, generator=generator, output_type="np").images


def test_only_the_adapter_is_trained_and_checkpointed(lora_run):
    trainer, result, work = lora_run
    trained = {n for n, p in trainer.unet.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert any(".ff.net." in n for n in trained)  # feed_forward=True
    saved = load_file(result.checkpoint / "model.safetensors")
    assert set(saved) == trained
    full = sum(p.numel() for p in trainer.unet.parameters() if not p.requires_grad)
    assert sum(v.numel() for v in saved.values()) < full / 10


def test_plain_diffusers_applies_the_exported_lora_like_training_did(lora_run, tiny_pipeline):
    from diffusers import StableDiffusionXLPipeline

    trainer, result, work = lora_run
    assert (result.step_dir / LORA_FILE).is_file() and result.step_dir == work / "step4"
    base = images(tiny_pipeline)
    pipe = StableDiffusionXLPipeline.from_pretrained(trainer.base_folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(result.step_dir))
    loaded = images(pipe)
    assert abs(loaded - base).max() > 1e-2, "the LoRA changes the images"
    # the training-time model: the trainer's UNet (base + trained adapter) in the base pipeline
    trained = StableDiffusionXLPipeline.from_pretrained(trainer.base_folder, unet=trainer.unet.eval())
    trained.set_progress_bar_config(disable=True)
    assert abs(images(trained) - loaded).max() < 1e-4
    fused = StableDiffusionXLPipeline.from_pretrained(work / "step4_fused")
    fused.set_progress_bar_config(disable=True)
    assert abs(images(fused) - loaded).max() < 1e-4


def test_lora_resume_is_exact(lora_run, tmp_path):
    trainer, result, work = lora_run
    resumed = train(tiny_cfg(tmp_path, *OPTIONS, "model.lora.fuse_export=True"), resume=str(work / "checkpoints" / "iter_0000002"))
    a, b = load_file(result.step_dir / LORA_FILE), load_file(resumed.step_dir / LORA_FILE)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_generate_with_lora(lora_run, tmp_path):
    import subprocess
    import sys

    trainer, result, work = lora_run
    out = tmp_path / "x.png"
    done = subprocess.run([sys.executable, "-m", "pgv25.cli", "generate", "--model", trainer.base_folder, "--lora", str(result.step_dir),
                           "--prompt", "a red circle on a white background", "--steps", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.is_file()
    bad = subprocess.run([sys.executable, "-m", "pgv25.cli", "generate", "--model", trainer.base_folder, "--lora", str(tmp_path),
                          "--prompt", "x", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "holds no pytorch_lora_weights.safetensors" in bad.stderr


def test_lora_with_a_target_that_matches_nothing(tiny_assets, tmp_path):
    from pgv25.errors import UserError

    with pytest.raises(UserError, match="model.lora"):
        Trainer(tiny_cfg(tmp_path, "model.lora.enabled=True", "model.lora.target_modules=[no_such_layer]"))


def test_text_encoder_lora_exports_loads_and_resumes(tiny_assets, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    options = [*OPTIONS, "model.lora.text_encoders=True", "model.lora.text_encoder_rank=2"]
    trainer = Trainer(tiny_cfg(tmp_path / "a", *options))
    trained_text = [n for e in trainer.conditioner.text_encoders for n, p in e.named_parameters() if p.requires_grad]
    assert trained_text and all("lora_" in n for n in trained_text)
    result = trainer.run()
    saved = load_file(result.checkpoint / "model.safetensors")
    assert {k.split(".")[0] for k in saved} == {"unet", "text_encoder", "text_encoder_2"}
    exported = load_file(result.step_dir / LORA_FILE)
    assert {k.split(".")[0] for k in exported} == {"unet", "text_encoder", "text_encoder_2"}

    pipe = StableDiffusionXLPipeline.from_pretrained(trainer.base_folder)
    pipe.set_progress_bar_config(disable=True)
    base_embeds = pipe.encode_prompt("a red circle", do_classifier_free_guidance=False)[0]
    pipe.load_lora_weights(str(result.step_dir))
    loaded_embeds = pipe.encode_prompt("a red circle", do_classifier_free_guidance=False)[0]
    assert (loaded_embeds - base_embeds).abs().max() > 1e-3, "the text encoders' LoRA changes the prompt embeddings"
    encoders = trainer.conditioner.text_encoders
    training_time = StableDiffusionXLPipeline.from_pretrained(trainer.base_folder, unet=trainer.unet.eval(),
                                                              text_encoder=encoders[0].eval(), text_encoder_2=encoders[1].eval())
    with torch.no_grad():
        training_embeds = training_time.encode_prompt("a red circle", do_classifier_free_guidance=False)[0]
    assert_near(training_embeds, loaded_embeds, 1e-4)  # diffusers rebuilt the trained encoders (see test_text_conditioner.REL)

    resumed = train(tiny_cfg(tmp_path / "b", *options), resume=str(tmp_path / "a" / "checkpoints" / "iter_0000002"))
    again = load_file(resumed.step_dir / LORA_FILE)
    assert all(torch.equal(exported[k], again[k]) for k in exported)
