# The embedded default trained also on captions that leave the background open: "a red circle" drawn equally often on
# black, white and blue (pgv25.tiny.shapes.OPEN_BACKGROUNDS), beside the explicit captions. A model trained on it picks
# each background about a third of the time for an open caption: the start of the preference-alignment toy
# (docs/experiments §5), where alignment has a choice to move. `pgv25 data pairs` samples it; the DPO and curated
# configs train from its export.
_base_ = ['./playgroundv2_5_tiny_shapes.py']
tiny_assets = dict(extra_datasets=dict(
    open_background_k3=dict(open_backgrounds=['black', 'white', 'blue'], per_caption=24),  # 9 open captions, 216 images
))
train_dataloader = dict(datasets=[
    dict(type='folder', path='{{$PGV25_CACHE:~/.cache/pgv25}}/tiny_shapes/shapes'),
    dict(type='folder', path='{{$PGV25_CACHE:~/.cache/pgv25}}/tiny_shapes/open_background_k3'),
])
