import torch

from conftest import assert_near
from pgv25.models.text_conditioner import TextConditioner

PROMPTS = ["a red circle on a white background", "a blue square on a black background"]
# Two CLIP stacks of float32 matmuls and layer norms: encoded in another batch shape, or on another CPU or thread
# count, the sums run in another order (measured: up to 4e-7 of the largest value between batch shapes and between
# AVX2 and scalar kernels, ATEN_CPU_CAPABILITY=default). 1e-4 leaves a wide margin and is still
# far below what a different prompt changes (test_a_different_prompt_is_far_outside_the_tolerance).
REL = 1e-4


def conditioner(pipe, force_zeros=True):
    return TextConditioner([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], force_zeros)


def test_matches_pipeline_encode_prompt(tiny_pipeline):
    prompt_embeds, pooled = conditioner(tiny_pipeline)(PROMPTS)
    expected, negative, expected_pooled, negative_pooled = tiny_pipeline.encode_prompt(PROMPTS, device="cpu")
    assert prompt_embeds.shape == (2, 77, tiny_pipeline.unet.config.cross_attention_dim)
    assert_near(prompt_embeds, expected, REL)
    assert_near(pooled, expected_pooled, REL)


def test_dropped_captions_equal_the_pipelines_unconditional_input(tiny_pipeline):
    prompt_embeds, pooled = conditioner(tiny_pipeline)(PROMPTS, torch.tensor([True, False]))
    _, negative, _, negative_pooled = tiny_pipeline.encode_prompt(PROMPTS[:1], device="cpu")
    assert tiny_pipeline.config.force_zeros_for_empty_prompt
    assert torch.equal(prompt_embeds[0], negative[0]) and torch.equal(pooled[0], negative_pooled[0])
    kept, kept_pooled = conditioner(tiny_pipeline)(PROMPTS[1:])
    # the kept caption, encoded in a batch of two, is the caption encoded alone (to float32 rounding)
    assert_near(prompt_embeds[1], kept[0], REL)
    assert_near(pooled[1], kept_pooled[0], REL)


def test_without_force_zeros_a_dropped_caption_is_the_empty_prompt(tiny_pipeline):
    prompt_embeds, pooled = conditioner(tiny_pipeline, force_zeros=False)(PROMPTS, torch.tensor([True, True]))
    empty, _, empty_pooled, _ = tiny_pipeline.encode_prompt([""], device="cpu", do_classifier_free_guidance=False)
    assert_near(prompt_embeds[0], empty[0], REL)
    assert_near(pooled[1], empty_pooled[0], REL)
    assert prompt_embeds.abs().sum() > 0


def test_a_different_prompt_is_far_outside_the_tolerance(tiny_pipeline):
    """What makes REL meaningful: captions that differ in one word move the embeddings by far more."""
    prompt_embeds, pooled = conditioner(tiny_pipeline)(PROMPTS)
    for a, b in ((prompt_embeds[0], prompt_embeds[1]), (pooled[0], pooled[1])):
        assert (a - b).abs().max() > 100 * REL * b.abs().max()


def test_encoders_are_frozen(tiny_pipeline):
    c = conditioner(tiny_pipeline).train()
    assert not any(p.requires_grad for p in c.parameters())
    assert not c.text_encoders.training
