# Curated fine-tuning on the shapes toy where a caption leaves the background open (docs/experiments §5): the black-
# background samples of the open-caption model, offline, on a CPU.
#   pgv25 train playgroundv2_5_tiny_shapes_open
#   pgv25 data pairs --model work_dirs/playgroundv2_5_tiny_shapes_open/step2800 --prompts open_prompts.jsonl \
#       --samples 24 --scorer pgv25.eval.shapes:preference --scorer-option background=black --pairs all --margin 0.5 \
#       --top 24 --min-score 1.0 --out work_dirs/pairs_tiny_shapes_open
#   pgv25 train playgroundv2_5_curated_tiny_shapes_open
# (open_prompts.jsonl: {"prompt": "a red circle"} lines; tools/experiments.py alignment does all of it.)
_base_ = ['./playgroundv2_5_tiny_shapes.py']
model = dict(pretrained_model_name_or_path='work_dirs/playgroundv2_5_tiny_shapes_open/step2800')
train_dataloader = dict(dataset=dict(
    type='manifest',
    path='work_dirs/pairs_tiny_shapes_open/top.jsonl',
    image_column='image',
    caption_column='text',
))
optim_wrapper = dict(optimizer=dict(lr=1e-4, weight_decay=0.0))
param_scheduler = dict(type='constant', warmup_iters=0)
train_cfg = dict(max_iters=300)
default_hooks = dict(checkpoint=dict(interval=100))
validation = dict(interval=0)
