# Preference alignment (Diffusion-DPO under EDM) on the embedded default: offline, on a CPU. The pairs are
# generated shapes: per caption an image drawn right (chosen) and one wrong in a single attribute, the
# shape's colour or the shape itself (rejected). Start it from a trained tiny model, e.g.
#   pgv25 train playgroundv2_5_dpo_tiny_shapes --cfg-options model.pretrained_model_name_or_path=work_dirs/playgroundv2_5_tiny_shapes/step700
# (from the random tiny base it runs, but has nothing to align). docs/experiments/README.md measures it.
_base_ = ['./playgroundv2_5_tiny_shapes.py']
tiny_assets = dict(extra_datasets=dict(shape_pairs=dict(pairs=True, per_caption=4)))
objective = dict(
    type='dpo',
    # β: how far the policy may move from the reference per unit of preference. With loss_weighting='epsilon'
    # (λ = 1/σ², Diffusion-DPO's ε-MSE exactly) 5000 is the paper's SDXL value; on the shapes it also drifted
    # least of the values tried (docs/experiments/README.md, §5).
    beta=5000.0,
    loss_weighting='epsilon',
    # 'auto': the UNet with its LoRA off when model.lora is enabled, else a frozen copy of the base UNet.
    reference='auto',
    reference_dtype='bf16',  # of the frozen copy on a GPU (a CPU keeps fp32)
)
train_dataloader = dict(
    batch_size=8,  # pairs: 16 images per step through the UNet, twice (policy and reference)
    dataset=dict(
        path='{{$PGV25_CACHE:~/.cache/pgv25}}/tiny_shapes/shape_pairs',
        caption_column='text',
        pairs=dict(format='chosen_rejected', chosen_column='chosen', rejected_column='rejected'),
        caption_dropout=0.0,  # a preference is about a caption: keep it
        cache=dict(enabled=True),  # latents of both images of each pair, encoded once
    ),
)
optim_wrapper = dict(optimizer=dict(lr=1e-5, weight_decay=0.0))
param_scheduler = dict(type='constant', warmup_iters=0)
train_cfg = dict(max_iters=300)
default_hooks = dict(logger=dict(interval=25), checkpoint=dict(interval=100))
validation = dict(interval=100)
