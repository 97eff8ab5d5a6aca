# DreamBooth with prior preservation on the embedded default, offline on a CPU: a LoRA learns "TOK circle" from
# six images while the class prompt's images, drawn once by the base pipeline, keep the class as it was.
# The mechanics of playgroundv2_5_dreambooth_lora at tiny size (class-image generation, paired batches, both losses).
_base_ = ['./playgroundv2_5_tiny_shapes.py']
tiny_dreambooth = dict(  # the instance images: six shapes images of one caption, copied into their own folder
    source='{{$PGV25_CACHE:~/.cache/pgv25}}/tiny_shapes/shapes',
    caption='a red circle on a white background',
    count=6,
    folder='{{$PGV25_CACHE:~/.cache/pgv25}}/tiny_shapes/dreambooth_instance',
)
model = dict(lora=dict(enabled=True, rank=8, alpha=8))
# Prior preservation (Ruiz et al. 2023): loss = mean over instance images + prior_loss_weight × mean over class images,
# each batch half of each, from one bucket.
objective = dict(
    type='prior_preservation',
    class_prompt='a circle on a white background',
    class_data_dir='{{$PGV25_CACHE:~/.cache/pgv25}}/tiny_shapes/dreambooth_class',  # kept: a second run reuses them
    num_class_images=12,  # diffusers' default is 100
    prior_loss_weight=1.0,  # diffusers' default
    # how missing class images are drawn by the base pipeline (bf16 on a GPU; split over the processes)
    class_generation=dict(batch_size=4, steps=25, guidance_scale=3.0, negative_prompt=None, seed=0),
)
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = dict(type='constant_with_warmup', warmup_iters=0)
train_cfg = dict(max_iters=200)
train_dataloader = dict(
    batch_size=2,  # instance images per step; as many class images join them
    dataset=dict(path='{{$PGV25_CACHE:~/.cache/pgv25}}/tiny_shapes/dreambooth_instance', caption='a photo of TOK circle'),
)
default_hooks = dict(logger=dict(interval=20), checkpoint=dict(interval=100))
model_card = dict(instance_prompt='a photo of TOK circle')
sample_grid = dict(prompts=['a photo of TOK circle', 'a circle on a white background', 'a blue square on a black background'])
