import pytest

from pgv25.config import find_config, list_configs, load_config, parse_cfg_options
from pgv25.errors import UserError


def test_both_playground_configs_share_the_base_model_config():
    real, tiny = load_config("playgroundv2_5_pokemon_blip"), load_config("playgroundv2_5_tiny_shapes")
    assert real.model.pretrained_model_name_or_path == "playgroundai/playground-v2.5-1024px-aesthetic"
    assert tiny.model.pretrained_model_name_or_path.endswith("tiny_shapes/playground-v2.5-tiny")
    for key in ("sigma_sampler", "loss_weighting", "vae_dtype"):
        assert real.model[key] == tiny.model[key]
    assert real.model.sigma_sampler.type == "lognormal" and real.model.loss_weighting == "edm"


def test_real_recipe_hyper_parameters():
    cfg = load_config("playgroundv2_5_pokemon_blip")
    opt = cfg.optim_wrapper
    assert opt.optimizer.type == "AdamW" and opt.optimizer.lr == 1e-5 and opt.optimizer.weight_decay == 1e-2
    assert opt.clip_grad.max_norm == 1.0 and opt.mixed_precision == "bf16"
    data = cfg.train_dataloader
    assert data.batch_size == 1 and data.dataset.resolution == 1024
    assert data.dataset.random_flip and not data.dataset.center_crop and data.dataset.caption_dropout > 0
    assert data.dataset.path == "lambdalabs/pokemon-blip-captions"


def test_mmengine_style_keys_can_be_overridden():
    options = parse_cfg_options([
        "train_cfg.max_iters=7", "train_dataloader.batch_size=3", "optim_wrapper.optimizer.lr=2e-4",
        "default_hooks.checkpoint.interval=5", "work_dir=/tmp/x", "randomness.seed=9",
        "train_dataloader.dataset.path=lambdalabs/naruto-blip-captions",
    ])
    cfg = load_config("playgroundv2_5_pokemon_blip", options)
    assert cfg.train_cfg.max_iters == 7 and cfg.train_dataloader.batch_size == 3
    assert cfg.optim_wrapper.optimizer.lr == 2e-4 and cfg.default_hooks.checkpoint.interval == 5
    assert cfg.work_dir == "/tmp/x" and cfg.randomness.seed == 9
    assert cfg.train_dataloader.dataset.path == "lambdalabs/naruto-blip-captions"


def test_unknown_option_key_is_refused_with_a_suggestion():
    with pytest.raises(UserError, match="no key 'train_cfg.max_iter'.*train_cfg.max_iters"):
        load_config("playgroundv2_5_tiny_shapes", {"train_cfg.max_iter": 3})


def test_keys_under_an_empty_mapping_are_the_users_to_fill():
    cfg = load_config("playgroundv2_5_pokemon_blip", {"train_dataloader.dataset.filters.aesthetic.min": 6.0})
    assert cfg.train_dataloader.dataset.filters == {"aesthetic": {"min": 6.0}}
    with pytest.raises(UserError, match="no key 'train_dataloader.dataset.filterz.aesthetic'"):
        load_config("playgroundv2_5_pokemon_blip", {"train_dataloader.dataset.filterz.aesthetic": 6.0})


def test_unknown_config_name_suggests_close_ones():
    with pytest.raises(UserError, match="did you mean playgroundv2_5_tiny_shapes"):
        find_config("playgroundv2_5_tiny_shape")


def test_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("model = dict(\n    a=1,\n    b=(2\n)\nx = = 3\n")
    with pytest.raises(UserError, match=r"bad\.py:\d+: syntax error"):
        load_config(str(bad))


def test_list_configs_excludes_bases():
    names = list_configs()
    assert {"playgroundv2_5_pokemon_blip", "playgroundv2_5_tiny_shapes"} <= set(names)
    assert not any("_base_" in str(p) for p in names.values())
    assert list(list_configs("tiny")) == ["playgroundv2_5_curated_tiny_shapes_open", "playgroundv2_5_dpo_tiny_shapes",
                                          "playgroundv2_5_dreambooth_lora_tiny_shapes", "playgroundv2_5_lora_tiny_shapes",
                                          "playgroundv2_5_tiny_shapes", "playgroundv2_5_tiny_shapes_open"]


def test_option_without_equals_is_refused():
    with pytest.raises(UserError, match="key=value"):
        parse_cfg_options(["train_cfg.max_iters"])


def test_syntax_error_in_a_base_file_names_that_file(tmp_path):
    (tmp_path / "_base_").mkdir()
    (tmp_path / "_base_" / "broken_base.py").write_text("optim = dict(lr=\n")
    (tmp_path / "leaf.py").write_text("_base_ = ['./_base_/broken_base.py']\ntrain_cfg = dict(max_iters=1)\n")
    with pytest.raises(UserError, match=r"broken_base\.py:1: syntax error"):
        load_config(str(tmp_path / "leaf.py"))


@pytest.mark.parametrize("name", ["playgroundv2_5_pokemon_blip", "playgroundv2_5_tiny_shapes",
                                  "playgroundv2_5_lora_pokemon_blip", "playgroundv2_5_lora_tiny_shapes",
                                  "playgroundv2_5_dreambooth_lora_tiny_shapes", "playgroundv2_5_dreambooth_lora"])
def test_every_shipped_config_loads_and_lora_configs_enable_lora(name):
    cfg = load_config(name)
    assert cfg.model.lora.enabled == ("lora" in name)
    assert cfg.train_dataloader.dataset.buckets.enabled and cfg.validation.interval > 0


@pytest.mark.parametrize("name", list(list_configs(None)))
def test_every_shipped_config_reads_into_options_before_anything_loads(name):
    """engine/options.py parses every section a run uses; no shipped config may trip one of its checks."""
    from pgv25.engine.options import read_options

    options = read_options(load_config(name))
    assert options.lora.enabled == ("lora" in name) and options.train.max_iters > 0
    assert options.objective["type"] in ("denoising", "dpo", "prior_preservation")
    assert not options.validation.loss.enabled  # the held-out loss is the user's to switch on
