# Preference alignment of Playground v2.5 with a LoRA on Pick-a-Pic v2: the reference is the same UNet with its
# adapters switched off, so no second copy of the model is held. Exports step<N>/pytorch_lora_weights.safetensors.
_base_ = ['./playgroundv2_5_dpo_pickapic.py']
objective = dict(reference='adapters_off')
model = dict(lora=dict(enabled=True, rank=8, alpha=8), gradient_checkpointing=True)
optim_wrapper = dict(optimizer=dict(_delete_=True, type='AdamW', lr=1e-5, weight_decay=1e-2), accumulative_counts=4)
