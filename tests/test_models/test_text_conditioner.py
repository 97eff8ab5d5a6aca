import torch

from pgv25.models.text_conditioner import TextConditioner

PROMPTS = ["a red circle on a white background", "a blue square on a black background"]


def conditioner(pipe, force_zeros=True):
    return TextConditioner([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], force_zeros)


def test_matches_pipeline_encode_prompt(tiny_pipeline):
    prompt_embeds, pooled = conditioner(tiny_pipeline)(PROMPTS)
    expected, negative, expected_pooled, negative_pooled = tiny_pipeline.encode_prompt(PROMPTS, device="cpu")
    assert prompt_embeds.shape == (2, 77, tiny_pipeline.unet.config.cross_attention_dim)
    assert torch.allclose(prompt_embeds, expected, atol=1e-6)
    assert torch.allclose(pooled, expected_pooled, atol=1e-6)


def test_dropped_captions_equal_the_pipelines_unconditional_input(tiny_pipeline):
    prompt_embeds, pooled = conditioner(tiny_pipeline)(PROMPTS, torch.tensor([True, False]))
    _, negative, _, negative_pooled = tiny_pipeline.encode_prompt(PROMPTS[:1], device="cpu")
    assert tiny_pipeline.config.force_zeros_for_empty_prompt
    assert torch.equal(prompt_embeds[0], negative[0]) and torch.equal(pooled[0], negative_pooled[0])
    kept, kept_pooled = conditioner(tiny_pipeline)(PROMPTS[1:])
    assert torch.allclose(prompt_embeds[1], kept[0]) and torch.allclose(pooled[1], kept_pooled[0])


def test_without_force_zeros_a_dropped_caption_is_the_empty_prompt(tiny_pipeline):
    prompt_embeds, pooled = conditioner(tiny_pipeline, force_zeros=False)(PROMPTS, torch.tensor([True, True]))
    empty, _, empty_pooled, _ = tiny_pipeline.encode_prompt([""], device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(prompt_embeds[0], empty[0], atol=1e-6) and torch.allclose(pooled[1], empty_pooled[0], atol=1e-6)
    assert prompt_embeds.abs().sum() > 0


def test_encoders_are_frozen(tiny_pipeline):
    c = conditioner(tiny_pipeline).train()
    assert not any(p.requires_grad for p in c.parameters())
    assert not c.text_encoders.training
