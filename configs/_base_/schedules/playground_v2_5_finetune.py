# Full fine-tune of the Playground v2.5 UNet, in line with sdxlengine's recipe.
# One iteration = one optimizer update (of `accumulative_counts` micro-batches).
optim_wrapper = dict(
    # type: 'AdamW' (fused on CUDA) | 'Adafactor' (factored state, torch) | 'AdamW8bit' (bitsandbytes; not with fsdp)
    # | 'Prodigy' (lr=1.0) | 'Lion' | 'CAME' | 'AdamWScheduleFree' (each its own package: pip install "pgv25[prodigy]" ...).
    # Keys the chosen optimizer does not take (e.g. betas for Adafactor) are ignored with a warning.
    optimizer=dict(type='AdamW', lr=1e-5, weight_decay=1e-2, betas=(0.9, 0.999), eps=1e-8),
    clip_grad=dict(max_norm=1.0),  # gradient-norm clipping; None to disable
    accumulative_counts=1,  # gradient accumulation
    mixed_precision='bf16',  # 'no' | 'fp16' | 'bf16' autocast on GPU; a CPU always trains in fp32
    # How updates reach bf16 trained weights (model.trained_dtype='bf16'): 'stochastic' (unbiased) or 'nearest'.
    rounding='stochastic',
    # Update each weight inside backward as soon as its gradient is complete, and free the gradient: no full set of
    # gradients ever exists. One process, no accumulation, no clip_grad (set clip_grad=None), not with Prodigy or
    # schedule-free; the gradient norm is still logged.
    fused_backward=False,
)
# Any schedule name of diffusers.optimization: 'constant', 'constant_with_warmup', 'cosine', 'linear', ...
param_scheduler = dict(type='constant_with_warmup', warmup_iters=0)
train_cfg = dict(
    max_iters=10000,
    # An iteration whose loss or gradient is not finite (on any process) is skipped and counted;
    # this many in a row stop the run, so a diverged run never overwrites good checkpoints.
    max_nonfinite_iters=5,
)
