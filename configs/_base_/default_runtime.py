default_hooks = dict(
    logger=dict(interval=10),  # iterations between progress lines / TensorBoard points
    # Every `interval` iterations: a resumable checkpoint and an export to work_dir/step<N>/.
    checkpoint=dict(
        interval=1000,
        # Keep the newest K checkpoints (older ones are deleted once a newer one is complete);
        # None keeps all. Exports (step<N>/) are never deleted.
        max_keep_ckpts=3,
    ),
)
# How the UNet is spread over processes (NPROC_PER_NODE=N pgv25 train ...):
# 'ddp': a full copy per process; 'fsdp': parameters, gradients and optimizer state sharded
# (FSDP2), for full fine-tunes whose optimizer state does not fit on one card.
strategy = 'ddp'
fsdp = dict(
    # True: parameters are re-sharded after each block's forward and gathered again for backward
    # (ZeRO-3, least memory). False: kept gathered until backward (ZeRO-2, less communication).
    reshard_after_forward=True,
)
# Exponential moving average of the UNet weights (on rank 0; not yet with strategy='fsdp').
ema = dict(
    enabled=False,
    decay=0.9999,  # the cap of the EMA decay
    warmup=True,  # decay ramps up as 1 - (1 + n/inv_gamma)^-power over the n EMA updates (diffusers' EMAModel)
    inv_gamma=1.0,
    power=2 / 3,
    update_after=0,  # first iteration whose update enters the EMA is update_after + 1
    every=1,  # update the EMA every k iterations
    device=None,  # None: next to the weights; 'cpu' spares device memory
    export='ema',  # exports hold the EMA weights ('ema') or the trained weights ('model')
)
randomness = dict(seed=0)
work_dir = None  # default: work_dirs/<config name>
export = dict(
    dtype='fp32',  # dtype of the exported UNet weights: 'fp32' | 'fp16' | 'bf16'
    # Also step<N>/<config>-step<N>.safetensors: the whole pipeline in one file in the original SDXL layout,
    # with edm_mean/edm_std so ComfyUI and A1111/Forge sample it as Playground v2.5 (EDM), not as SDXL.
    single_file=False,
    single_file_dtype='fp16',
)
# README.md in every export (the model card the Hugging Face Hub renders): YAML front matter (base_model, license,
# tags, trigger_words, instance_prompt, widget with the validation images of that iteration, saved beside it when
# validation.interval divides the checkpoint interval), how to load it, the training settings.
model_card = dict(
    title=None,  # default: '<config> step <N>'
    trigger_words=[],  # default: the fixed words of train_dataloader.dataset.captions (prefix/template)
    instance_prompt=None,
    tags=[],
    license=None,  # default: Playground's license (license: other, license_name: playground-v2dot5-community) on its base
)
# After training: a labelled grid of images from the exported pipeline, at work_dir/samples_step<N>.png.
sample_grid = dict(
    prompts=[],  # strings, or dicts with their own seed/width/height/negative_prompt/guidance_scale/steps
    negative_prompt=None,
    seed=0,
    scheduler='dpmpp',  # 'dpmpp' (EDM DPM++ 2M Karras) or 'euler' (EDM Euler)
    steps=50,
    guidance_scale=3.0,
    width=None,  # None: the training resolution
    height=None,
)
# Validation grids during training: the model being trained (and its EMA) on fixed prompts and seeds,
# saved as work_dir/validation/iter_<N>.png and logged to TensorBoard. Does not touch the training RNG.
validation = dict(
    interval=0,  # iterations between grids (0: off); one is also made before the first iteration
    # Strings, or dicts as fine-tuners write them, each with its own seed, size, negative prompt and guidance:
    # [dict(prompt='a photo of TOK dog', seed=1, width=1152, height=896, negative_prompt='blurry', guidance_scale=4.0)]
    prompts=[],
    negative_prompt=None,
    seed=0,
    scheduler='dpmpp',  # the pipeline's own EDM DPM++ sampler ('euler': EDM Euler)
    steps=25,
    guidance_scale=3.0,
    width=None,  # None: the training resolution
    height=None,
    raw_and_ema=True,  # with EMA enabled, a row from the raw weights under the EMA row
    # The loss on held-out images, to see a run start to overfit: at a fixed grid of σ with fixed noise per image,
    # so it moves only when the model does. Logged per σ and overall (val_loss/*: TensorBoard, W&B, scalars.jsonl),
    # drawn in work_dir/validation_loss.png at the end; identical after a resume. With prior preservation the class
    # images get a curve of their own (val_loss_class/*).
    loss=dict(
        interval=0,  # iterations between measurements (0: off); also before the first iteration and at the end
        split=0.0,  # the fraction of the training images held out (never trained on), chosen by a hash of the name
        dataset=dict(),  # or a held-out dataset of its own: dict(type='folder', path='/data/val'), over the shared keys
        sigmas=None,  # None: 8 σ from 0.02 to 80, about ×3 apart
        batch_size=8,  # per process
        max_images=256,  # at most this many held-out images
        seed=0,  # of the fixed noise
    ),
)
# Trackers beside TensorBoard (always on): ['wandb'] needs `pip install 'pgv25[wandb]'`. W&B runs offline
# (files under work_dir/wandb, `wandb sync` later) unless WANDB_API_KEY is set or WANDB_MODE says otherwise.
log_with = []
wandb = dict()  # extra wandb.init arguments, e.g. dict(entity='me', tags=['pokemon'])
