# LoRA fine-tune of Playground v2.5 on BLIP-captioned Pokémon, 1024 px, bf16, batch 1 on one GPU.
# Exports step<N>/pytorch_lora_weights.safetensors: pipe.load_lora_weights(step_dir) on the base pipeline.
_base_ = ['./playgroundv2_5_pokemon_blip.py']
model = dict(lora=dict(enabled=True, rank=32, alpha=32))
optim_wrapper = dict(optimizer=dict(lr=1e-4, weight_decay=1e-2))  # LoRA takes a higher rate than a full fine-tune
train_cfg = dict(max_iters=5000)
default_hooks = dict(checkpoint=dict(interval=1000))
