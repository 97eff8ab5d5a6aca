# Playground v2.5: the SDXL UNet trained with Playground's EDM schedule; text encoders and VAE frozen.
# What a step minimises: 'denoising' (plain fine-tuning: λ(σ)·‖D(x0 + σn; σ) − x0‖² on each image).
objective = dict(type='denoising')
model = dict(
    # A hub id or a local diffusers pipeline folder (what `huggingface-cli download ... --local-dir` makes).
    pretrained_model_name_or_path='playgroundai/playground-v2.5-1024px-aesthetic',
    # 'edm' (Playground v2.5: σ_max 80, EDM preconditioning). 'ddpm' trains on SDXL's scaled-linear ε schedule
    # instead (its exports ship a DDPM sampler): only for comparing the two (docs/experiments/noise_schedule.md).
    noise_schedule='edm',
    # σ sampling. dict(type='lognormal', P_mean=-1.2, P_std=1.2): ln σ ~ N(P_mean, P_std²), the EDM paper's
    # choice (median σ ≈ 0.3). 'karras_index': uniform over the scheduler's 1000-step Karras grid (median σ ≈ 2.5),
    # as diffusers' --do_edm_style_training and sdxlengine do. Lognormal with EDM weighting is the default on
    # the evidence of docs/experiments/sigma_sampling.md.
    sigma_sampler=dict(type='lognormal', P_mean=-1.2, P_std=1.2),
    # 'edm': λ(σ) = (σ² + σ_d²) / (σ·σ_d)², the loss of a unit-variance target at every σ; or 'none' (the public path).
    loss_weighting='edm',
    # dtype of the frozen text encoders on a GPU ('fp32' is always used on a CPU).
    weight_dtype='bf16',
    # The SDXL VAE overflows in fp16; it stays fp32 unless set otherwise.
    vae_dtype='fp32',
    # Trade compute for memory in the UNet's backward pass.
    gradient_checkpointing=False,
    # The trained UNet's weights in a full fine-tune: 'fp32', or 'bf16' (half the memory of weights and gradients;
    # each update is computed in fp32 and written back with stochastic rounding, optim_wrapper.rounding, so updates
    # smaller than bf16's spacing are not lost; the forward runs under bf16 autocast, on a CPU too).
    trained_dtype='fp32',
    # The frozen UNet under a LoRA (the adapters train in fp32): 'auto' is the mixed-precision dtype on a GPU
    # (bf16: half the memory) and fp32 on a CPU; or 'fp32', 'bf16', 'fp16'.
    frozen_dtype='auto',
    # Speed switches (docs/performance.md): none changes what is trained, so a run resumes across them. True, False,
    # or 'cuda': on GPUs only (a CPU, e.g. the tiny default, keeps the plain eager path).
    # NHWC memory layout for the UNet's convolutions: +3% on an H200 at 1024².
    channels_last='cuda',
    # The attention kernel tried first: 'cudnn' (fastest measured on Hopper), 'flash', 'efficient', 'math'; the others
    # follow where it cannot take the inputs. None: PyTorch's own order.
    attention_backend='cudnn',
    # torch.compile in place (checkpoints and exports unchanged). regions=['transformer'] compiles each
    # BasicTransformerBlock (regional compilation: seconds per bucket shape; with channels-last and cuDNN attention
    # 12.4 images/s against 10.7 eager on an H200); add 'resnet' for the ResnetBlock2Ds; regions=None compiles the
    # whole UNet (minutes). One graph per bucket shape and block width (dynamic=False); mode='max-autotune' tunes
    # longer; backend='eager' only traces (for debugging). 'cuda' leaves strategy='fsdp' eager (True forces it).
    compile=dict(enabled='cuda', regions=['transformer'], backend='inductor', mode=None, dynamic=False),
    # FP8 (torchao, pip install "pgv25[float8]"): the transformer blocks' attention and feed-forward projections in
    # float8. True on GPUs with float8 tensor cores (H100/H200, compute capability ≥ 8.9); 'emulate' anywhere, slowly,
    # to check the path. Off until measured on a GPU (docs/performance.md); not with LoRA or FSDP.
    float8=False,
    # LoRA (peft) on the UNet instead of a full fine-tune: base weights frozen, checkpoints hold only the
    # adapter, exports are work_dirs/<cfg>/step<N>/pytorch_lora_weights.safetensors (pipe.load_lora_weights).
    lora=dict(
        enabled=False,
        rank=16,
        alpha=16,  # scale = alpha / rank
        dropout=0.0,
        target_modules=['to_q', 'to_k', 'to_v', 'to_out.0'],  # self- and cross-attention projections
        feed_forward=False,  # also the feed-forward projections (ff.net.0.proj, ff.net.2)
        fuse_export=False,  # also export step<N>_fused/: a full pipeline with the LoRA folded into the UNet
        kohya_export=False,  # also step<N>/pytorch_lora_weights_kohya.safetensors (ComfyUI LoraLoader, A1111)
        use_dora=False,
        # Start from a LoRA: a diffusers-layout file or a pgv25 export folder (rank, alpha, targets, DoRA come from
        # it): continue training it, or use it as the start of a new run.
        init_from=None,  # DoRA (peft): a learned magnitude per output feature beside the low-rank direction
        text_encoders=False,  # also LoRA on both CLIP encoders' attention (q/k/v/out projections)
        text_encoder_rank=None,  # None: the UNet's rank and alpha
        text_encoder_alpha=None,
    ),
)
