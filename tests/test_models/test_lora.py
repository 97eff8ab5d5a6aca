"""LoRA: small checkpoints that resume exactly, and exports that plain diffusers loads into the base pipeline."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_near, tiny_cfg
from pgv25.engine.runner import Trainer, train
from pgv25.models.lora_files import LORA_FILE

OPTIONS = ["model.lora.enabled=True", "model.lora.rank=4", "model.lora.alpha=8",  # alpha ≠ rank: the scale must survive export
           "model.lora.feed_forward=True", "optim_wrapper.optimizer.lr=1e-2", "train_cfg.max_iters=4",
           "default_hooks.checkpoint.interval=2", "sample_grid.prompts=[]"]


# the ecosystem's files beside the diffusers one: kohya layout, and the fused pipeline as one SDXL-layout file
EXPORTS = ["model.lora.fuse_export=True", "model.lora.kohya_export=True", "export.single_file=True",
           "export.single_file_dtype=fp32"]


@pytest.fixture(scope="module")
def lora_run(tiny_assets, tmp_path_factory):
    work = tmp_path_factory.mktemp("lora")
    trainer = Trainer(tiny_cfg(work, *OPTIONS, *EXPORTS))
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


def test_generate_with_lora(lora_run, tmp_path, capsys):
    from pgv25.cli import main

    trainer, result, work = lora_run
    out = tmp_path / "x.png"
    assert main(["generate", "--model", str(trainer.base_folder), "--lora", str(result.step_dir),
                 "--prompt", "a red circle on a white background", "--steps", "3", "--out", str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert main(["generate", "--model", str(trainer.base_folder), "--lora", str(tmp_path), "--prompt", "x", "--out", str(out)]) == 2
    assert "holds no pytorch_lora_weights.safetensors" in capsys.readouterr().err


def test_lora_with_a_target_that_matches_nothing(tiny_assets, tmp_path):
    from pgv25.errors import UserError

    with pytest.raises(UserError, match="model.lora"):
        Trainer(tiny_cfg(tmp_path, "model.lora.enabled=True", "model.lora.target_modules=[no_such_layer]"))


@pytest.mark.slow
def test_text_encoder_lora_exports_loads_and_resumes(tiny_assets, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    options = [*OPTIONS, "model.lora.text_encoders=True", "model.lora.text_encoder_rank=2", "model.lora.kohya_export=True"]
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

    from pgv25.models.lora_files import KOHYA_FILE

    kohya = load_file(result.step_dir / KOHYA_FILE)
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}
    assert {float(v) for k, v in kohya.items() if k.startswith("lora_te") and k.endswith(".alpha")} == {2.0}
    pipe = StableDiffusionXLPipeline.from_pretrained(trainer.base_folder)
    pipe.load_lora_weights(str(result.step_dir), weight_name=KOHYA_FILE)
    assert_near(pipe.encode_prompt("a red circle", do_classifier_free_guidance=False)[0], loaded_embeds, 1e-4)

    resumed = train(tiny_cfg(tmp_path / "b", *options), resume=str(tmp_path / "a" / "checkpoints" / "iter_0000002"))
    again = load_file(resumed.step_dir / LORA_FILE)
    assert all(torch.equal(exported[k], again[k]) for k in exported)


def test_kohya_file_loads_like_the_diffusers_file(lora_run, tiny_pipeline):
    from diffusers import StableDiffusionXLPipeline

    from pgv25.models.lora_files import KOHYA_FILE

    trainer, result, work = lora_run
    kohya = load_file(result.step_dir / KOHYA_FILE)
    alphas = {k: float(v) for k, v in kohya.items() if k.endswith(".alpha")}
    assert alphas and all(k.startswith("lora_unet_") for k in kohya) and set(alphas.values()) == {8.0}  # trained alpha, not rank
    pipes = []
    for name in (LORA_FILE, KOHYA_FILE):
        pipe = StableDiffusionXLPipeline.from_pretrained(trainer.base_folder)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(result.step_dir), weight_name=name)
        pipes.append(images(pipe))
    assert abs(pipes[0] - pipes[1]).max() < 1e-5
    assert abs(pipes[0] - images(tiny_pipeline)).max() > 1e-2


def test_fused_pipeline_ships_a_single_file_inside_its_manifest(lora_run):
    import json

    from diffusers import UNet2DConditionModel

    trainer, result, work = lora_run
    fused = work / "step4_fused"
    name = f"{work.name}-step4_fused.safetensors"
    assert name in json.loads((fused / "pgv25_manifest.json").read_text())["files"]
    unet = UNet2DConditionModel.from_single_file(str(fused / name), config=str(fused), subfolder="unet", local_files_only=True)
    folder = load_file(fused / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(unet.state_dict()[k], folder[k]) for k in folder)


def lora_delta(lora, name):
    layer = lora.layers[name]
    return lora.scale(name) * layer.up.float() @ layer.down.float()


def test_lora_tools_info_merge_fuse(lora_run, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    from pgv25.cli import main
    from pgv25.models.lora_files import read_lora

    trainer, result, work = lora_run
    lora_file = result.step_dir / LORA_FILE
    assert main(["lora", "info", str(result.step_dir)]) == 0
    info = capsys.readouterr().out
    assert "rank 4, alpha 8 (scale 2)" in info and "ff.net.0.proj" in info and "diffusers layout" in info

    from pgv25.models.lora_files import KOHYA_FILE

    assert main(["lora", "kohya", str(result.step_dir), "--out", str(tmp_path / "k.safetensors")]) == 0
    converted, trained = load_file(tmp_path / "k.safetensors"), load_file(result.step_dir / KOHYA_FILE)
    assert set(converted) == set(trained) and all(torch.equal(converted[k], trained[k]) for k in trained)
    capsys.readouterr()
    assert main(["lora", "info", str(tmp_path / "k.safetensors")]) == 0
    assert "kohya layout" in (info := capsys.readouterr().out) and "rank 4, alpha 8 (scale 2)" in info

    original = read_lora(lora_file)
    for extra, rank in (([], 8), (["--rank", "4"], 4)):  # exact concatenation; SVD back to the rank the sum has
        out = tmp_path / f"merged{rank}.safetensors"
        assert main(["lora", "merge", str(lora_file), str(lora_file), "--weights", "0.25", "0.75", *extra, "--out", str(out)]) == 0
        merged = read_lora(out)
        assert {layer.rank for layer in merged.layers.values()} == {rank}
        for name in original.layers:
            expected = lora_delta(original, name)
            assert (lora_delta(merged, name) - expected).abs().max() <= 1e-5 * expected.abs().max()

    fused = tmp_path / "fused"
    assert main(["lora", "fuse", "--base", str(trainer.base_folder), "--lora", str(lora_file), "--out", str(fused)]) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(trainer.base_folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(result.step_dir))
    folded = StableDiffusionXLPipeline.from_pretrained(fused)
    folded.set_progress_bar_config(disable=True)
    assert abs(images(folded) - images(pipe)).max() < 1e-4


def test_lora_tools_refuse_bad_input_in_one_line(lora_run, tmp_path, capsys):
    from safetensors.torch import save_file

    from pgv25.cli import main

    trainer, result, work = lora_run
    lora_file = result.step_dir / LORA_FILE
    state = load_file(lora_file)
    widen = [k for k in state if ".attn2.to_k.lora" in k and k.endswith(("lora_A.weight", "lora.down.weight"))]
    assert widen
    other = {k: (torch.zeros(v.shape[0], v.shape[1] * 2) if k in widen else v) for k, v in state.items()}
    save_file(other, str(tmp_path / "other.safetensors"))  # cross-attention twice as wide: another base model

    def error(*args):
        capsys.readouterr()
        assert main(list(args)) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        return err

    assert "different base architectures" in error("lora", "merge", str(lora_file), str(tmp_path / "other.safetensors"),
                                                   "--out", str(tmp_path / "m.safetensors"))
    assert "does not fit the model" in error("lora", "fuse", "--base", str(trainer.base_folder), "--lora",
                                             str(tmp_path / "other.safetensors"), "--out", str(tmp_path / "f"))
    assert "cannot write" in error("lora", "merge", str(lora_file), str(lora_file), "--out", str(lora_file / "x.safetensors"))
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "f").exists()
    assert "--weights" in error("lora", "merge", str(lora_file), str(lora_file), "--weights", "1", "--out", str(tmp_path / "m"))


def test_export_options_are_checked_before_anything_loads(tmp_path):
    from pgv25.errors import UserError

    with pytest.raises(UserError, match="fuse_export=True"):
        Trainer(tiny_cfg(tmp_path, "model.lora.enabled=True", "export.single_file=True"))
    with pytest.raises(UserError, match="DoRA or rsLoRA"):
        Trainer(tiny_cfg(tmp_path, "model.lora.enabled=True", "model.lora.use_dora=True", "model.lora.kohya_export=True"))


def test_dora_trains_exports_and_reloads(tiny_assets, tmp_path):
    import copy

    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    from pgv25.models.lora import fused_unet_state

    options = ["model.lora.enabled=True", "model.lora.rank=4", "model.lora.alpha=8", "model.lora.use_dora=True",
               "optim_wrapper.optimizer.lr=1e-2", "train_cfg.max_iters=2", "default_hooks.checkpoint.interval=2"]
    trainer = Trainer(tiny_cfg(tmp_path, *options))
    result = trainer.run()
    exported = load_file(result.step_dir / LORA_FILE)
    assert any("lora_magnitude_vector" in k for k in exported)
    pipe = StableDiffusionXLPipeline.from_pretrained(trainer.base_folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(result.step_dir))
    trained = StableDiffusionXLPipeline.from_pretrained(trainer.base_folder, unet=trainer.unet.eval())
    trained.set_progress_bar_config(disable=True)
    assert abs(images(trained) - images(pipe)).max() < 1e-4

    weights = {n: p.detach() for n, p in trainer.unet.named_parameters() if p.requires_grad}
    ours = fused_unet_state(trainer.unet, weights)
    merged = copy.deepcopy(trainer.unet)
    for module in merged.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    theirs = {k.replace(".base_layer.", "."): v for k, v in merged.state_dict().items() if "lora_" not in k}
    assert set(ours) == set(theirs)
    for key in theirs:  # peft's DoRA merge, the same formula in another order
        assert (ours[key] - theirs[key]).abs().max() <= 1e-5 * theirs[key].abs().max() + 1e-7, key

    again = Trainer(tiny_cfg(tmp_path / "again", "model.lora.enabled=True", f"model.lora.init_from={result.step_dir}"))
    assert again.unet.peft_config["default"].use_dora
    restored = {n: p for n, p in again.unet.named_parameters() if p.requires_grad}
    assert set(restored) == set(weights) and all(torch.equal(restored[n], weights[n]) for n in weights)  # magnitudes too
    again.release()


def test_init_from_a_lora_export_starts_where_it_ended(lora_run, tmp_path):
    from pgv25.models.lora_files import read_lora

    trainer, result, work = lora_run
    # the config asks for rank 16 (the default): the file's rank 4, alpha 8 and targets win
    continued = Trainer(tiny_cfg(tmp_path / "c", "model.lora.enabled=True", f"model.lora.init_from={result.step_dir}",
                                 "train_cfg.max_iters=1"))
    config = continued.unet.peft_config["default"]
    assert (config.r, config.lora_alpha) == (4, 8.0) and "ff.net.2" in config.target_modules
    exported, loaded = read_lora(result.step_dir), continued.unet.state_dict()
    for name, layer in exported.layers.items():
        module = name.partition(".")[2]
        assert torch.equal(loaded[f"{module}.lora_A.default.weight"], layer.down)
        assert torch.equal(loaded[f"{module}.lora_B.default.weight"], layer.up)
    continued.release()


def test_init_from_refuses_a_lora_of_another_architecture(lora_run, tmp_path):
    from safetensors.torch import save_file

    from pgv25.errors import UserError
    from pgv25.models.lora_files import KOHYA_FILE

    trainer, result, work = lora_run
    state = load_file(result.step_dir / LORA_FILE)
    wide = {k: (torch.zeros(v.shape[0], v.shape[1] * 2) if ".attn2.to_k.lora" in k and "down" in k else v) for k, v in state.items()}
    save_file(wide, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="another architecture"):
        Trainer(tiny_cfg(tmp_path / "w", "model.lora.enabled=True", f"model.lora.init_from={tmp_path / 'other.safetensors'}"))
    with pytest.raises(UserError, match="kohya-layout"):
        Trainer(tiny_cfg(tmp_path / "w", "model.lora.enabled=True", f"model.lora.init_from={result.step_dir / KOHYA_FILE}"))
    with pytest.raises(UserError, match="does not exist"):
        Trainer(tiny_cfg(tmp_path / "w", "model.lora.enabled=True", f"model.lora.init_from={tmp_path / 'none'}"))
