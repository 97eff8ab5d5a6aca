# Curated fine-tuning ("quality tuning", the route of Playground v2.5's and Emu's preference step): a short, gentle
# fine-tune of the whole UNet on only the best of the model's own samples for your prompts, as a reward model or
# people score them. `pgv25 data pairs` writes that set as top.jsonl (each prompt's top-scored samples):
#   pgv25 data pairs --model /models/playground-v2.5-1024px-aesthetic --prompts prompts.jsonl --samples 8 \
#       --scorer my_reward:score --top 2 --out work_dirs/pairs
#   pgv25 train playgroundv2_5_curated --cfg-options train_dataloader.dataset.path=work_dirs/pairs/top.jsonl
# Any curated image/caption manifest (columns image, text) works the same way. DPO (playgroundv2_5_dpo_pickapic,
# pairs.jsonl of the same command) learns from the rejected samples too; see the README for when to use which.
_base_ = ['./playgroundv2_5_pokemon_blip.py']
train_dataloader = dict(dataset=dict(
    type='manifest',
    path='work_dirs/pairs/top.jsonl',
    image_column='image',
    caption_column='text',
))
optim_wrapper = dict(optimizer=dict(lr=5e-6))  # half the Pokémon fine-tune's: move toward the best, not away from the base
train_cfg = dict(max_iters=2000)
default_hooks = dict(checkpoint=dict(interval=500))
