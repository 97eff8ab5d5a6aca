# DreamBooth LoRA of Playground v2.5 with prior preservation, 1024 px, bf16: the recipe of diffusers'
# train_dreambooth_lora_sdxl.py --do_edm_style_training --with_prior_preservation, on Playground's EDM schedule.
# The instance images: the five dogs of diffusers' example (a hub dataset; or a local folder:
#   --cfg-options train_dataloader.dataset.type=folder train_dataloader.dataset.path=my_dog).
# Before training, the base pipeline draws the class images into objective.class_data_dir (kept and reused).
_base_ = ['./playgroundv2_5_pokemon_blip.py']
model = dict(lora=dict(enabled=True, rank=16, alpha=16, kohya_export=True))  # the kohya file for ComfyUI / A1111 too
objective = dict(
    type='prior_preservation',
    class_prompt='a photo of a dog',
    class_data_dir='{{$PGV25_CACHE:~/.cache/pgv25}}/class_images/dog',
    num_class_images=100,  # diffusers' default
    prior_loss_weight=1.0,  # diffusers' default
    class_generation=dict(batch_size=4, steps=25, guidance_scale=3.0, negative_prompt=None, seed=0),
)
optim_wrapper = dict(optimizer=dict(lr=1e-4, weight_decay=1e-4))
param_scheduler = dict(type='constant_with_warmup', warmup_iters=0)
train_cfg = dict(max_iters=500)  # diffusers' example: 500 steps
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=250))
train_dataloader = dict(
    batch_size=1,  # instance images per step; as many class images join them
    num_workers=2,
    dataset=dict(
        type='hub',
        path='diffusers/dog-example',
        image_column='image',
        caption='a photo of sks dog',  # the instance prompt: every instance image's caption
        caption_dropout=0.0,
    ),
)
model_card = dict(instance_prompt='a photo of sks dog', trigger_words=['sks'])
validation = dict(interval=100, prompts=['a photo of sks dog in a bucket', 'a photo of a dog'])
sample_grid = dict(prompts=['a photo of sks dog in a bucket', 'a photo of sks dog on the beach', 'a photo of a dog'])
