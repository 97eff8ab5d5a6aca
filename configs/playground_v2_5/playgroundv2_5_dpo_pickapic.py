# Preference alignment of the full Playground v2.5 UNet on Pick-a-Pic v2 (Diffusion-DPO under EDM), 1024 px.
# Memory: the policy UNet (fp32 master weights), a frozen bf16 copy as the reference (+5 GB) and a factored
# optimizer state; gradient checkpointing on. DPO moves a pretrained model a little: a learning rate far below a
# fine-tune's, large effective batches.
_base_ = [
    '../_base_/models/playground_v2_5.py',
    '../_base_/datasets/pickapic.py',
    '../_base_/schedules/playground_v2_5_finetune.py',
    '../_base_/default_runtime.py',
]
objective = dict(
    type='dpo',
    beta=5000.0,  # Diffusion-DPO's SDXL value, on its ε-MSE scale (loss_weighting='epsilon')
    loss_weighting='epsilon',  # λ = 1/σ²: Δ is the ε-MSE exactly; 'edm' weights high σ more (rescale β)
    reference='frozen_copy',  # a frozen copy of the base UNet
    reference_dtype='bf16',
)
model = dict(gradient_checkpointing=True)
optim_wrapper = dict(
    # factored state instead of AdamW's two copies (_delete_: none of the base AdamW's betas/eps)
    optimizer=dict(_delete_=True, type='Adafactor', lr=1e-7, weight_decay=0.0),
    accumulative_counts=32,  # × processes × batch: pairs per update
)
param_scheduler = dict(type='constant_with_warmup', warmup_iters=200)
train_cfg = dict(max_iters=2000)
default_hooks = dict(checkpoint=dict(interval=250))
export = dict(dtype='fp16')
validation = dict(interval=250, prompts=[
    'a photo of an astronaut riding a horse on mars',
    'a cozy cabin in a snowy forest at dusk, warm light in the windows',
])
sample_grid = dict(prompts=[
    'a photo of an astronaut riding a horse on mars',
    'a cozy cabin in a snowy forest at dusk, warm light in the windows',
    'a portrait of an old fisherman, dramatic lighting',
    'a bowl of ramen, studio photograph',
])
