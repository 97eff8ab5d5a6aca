# The embedded default: a tiny Playground-v2.5-architecture pipeline (built locally) trained on
# generated shapes, on a CPU, with no network. Same model config and code path as the real recipe:
# `from_pretrained` on a local folder instead of a hub id.
_base_ = [
    '../_base_/models/playground_v2_5.py',
    '../_base_/datasets/tiny_shapes.py',
    '../_base_/schedules/playground_v2_5_finetune.py',
    '../_base_/default_runtime.py',
]
model = dict(pretrained_model_name_or_path='{{$PGV25_CACHE:~/.cache/pgv25}}/tiny_shapes/playground-v2.5-tiny')
# The tiny UNet starts from random weights, so it learns at a from-scratch rate.
optim_wrapper = dict(optimizer=dict(lr=1e-3, weight_decay=1e-2))
param_scheduler = dict(type='cosine', warmup_iters=100)
# 2800 steps of 16 fill the 10-minute CPU budget of the shapes goal (docs/experiments/README.md); the
# latent cache encodes the 672 images once (3 s) instead of every step.
train_cfg = dict(max_iters=2800)
train_dataloader = dict(dataset=dict(cache=dict(enabled=True)))
default_hooks = dict(logger=dict(interval=50), checkpoint=dict(interval=700))
sample_grid = dict(
    prompts=[
        'a red circle on a white background',
        'a blue square on a black background',
        'a yellow triangle on a blue background',
        'a white circle on a black background',
        'a green square on a yellow background',
        'a black triangle on a white background',
        'a blue circle on a red background',
        'a red square on a green background',
    ],
    steps=25,
    guidance_scale=3.0,
)
validation = dict(
    interval=700,
    prompts=[
        'a red circle on a white background',
        'a blue square on a black background',
        'a yellow triangle on a blue background',
        'a white circle on a black background',
    ],
)
