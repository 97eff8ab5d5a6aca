# The embedded default as a LoRA run: offline, on a CPU. The tiny base UNet is untrained, so this shows
# the LoRA mechanics (speed, checkpoint size, export, loading with diffusers), not what LoRA can learn.
_base_ = ['./playgroundv2_5_tiny_shapes.py']
model = dict(lora=dict(enabled=True, rank=8, alpha=8))
