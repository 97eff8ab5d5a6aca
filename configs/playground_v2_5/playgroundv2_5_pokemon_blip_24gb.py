# Full fine-tune of Playground v2.5 on BLIP-captioned Pokémon, 1024 px, on one 24 GB card (RTX 3090/4090, L4, A10):
# the levers `pgv25 plan playgroundv2_5_pokemon_blip --gpu-memory 24 --batch 2` ranks first.
# - bf16 trained weights, each update computed in fp32 and written back with stochastic rounding, so updates smaller
#   than bf16's spacing are kept on average (docs/experiments §8: the loss of fp32 weights);
# - 8-bit AdamW moments (bitsandbytes: pip install bitsandbytes), the lr of the fp32 recipe;
# - each weight updated inside backward, its gradient freed at once: no full set of gradients (no accumulation, no
#   global clipping: the gradient norm is still logged).
# Predicted peak: 20.7 GiB allocated at batch 2 (bf16 weights 4.8, 8-bit moments 4.9, activations 10.8 with the
# transformer blocks compiled); batch_size=1 if the card also drives a display (15.3 GiB). `pgv25 plan` on this
# config prints the parts.
_base_ = ['./playgroundv2_5_pokemon_blip.py']
model = dict(trained_dtype='bf16')
optim_wrapper = dict(optimizer=dict(type='AdamW8bit'), rounding='stochastic', fused_backward=True, clip_grad=None)
train_dataloader = dict(batch_size=2)
train_cfg = dict(max_iters=5000)  # the images of the batch-1 recipe's 10,000 iterations
default_hooks = dict(checkpoint=dict(interval=1000))
