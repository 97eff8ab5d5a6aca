# Full fine-tune of Playground v2.5 on BLIP-captioned Pokémon, 1024 px, bf16, batch 1 per GPU.
_base_ = [
    '../_base_/models/playground_v2_5.py',
    '../_base_/datasets/pokemon_blip.py',
    '../_base_/schedules/playground_v2_5_finetune.py',
    '../_base_/default_runtime.py',
]
train_cfg = dict(max_iters=10000)
default_hooks = dict(checkpoint=dict(interval=2000))
export = dict(dtype='fp16')  # halves the exported UNet (5 GB); users load in fp16 anyway
sample_grid = dict(prompts=[
    'yoda pokemon',
    'a blue and white dragon pokemon with wings',
    'a cute green cat pokemon',
    'a red fire bird pokemon',
])
validation = dict(interval=500, prompts=['yoda pokemon', 'a cute green cat pokemon'])
