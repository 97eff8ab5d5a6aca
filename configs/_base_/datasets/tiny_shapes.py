# The embedded default's data: generated coloured shapes, written once as an image folder with
# metadata.jsonl and read by the same loader as any user folder. No network needed.
# PGV25_CACHE moves the cache (default ~/.cache/pgv25).
tiny_assets = dict(
    root='{{$PGV25_CACHE:~/.cache/pgv25}}/tiny_shapes',
    image_size=64,
    per_caption=8,  # images per caption: 84 captions (90 combinations, 6 held out)
    vae_steps=800,  # steps to train the tiny VAE on the shapes
    text_steps=300,  # steps teaching the random tiny CLIP encoders to tell captions apart (CLIP's pre-training, in small)
    hold_out=True,  # leave the 6 combinations of pgv25.tiny.shapes.HELD_OUT out (asked for by `pgv25 eval shapes`)
    # Shapes use 30% of the size (40-70% of the side) and position ranges, about the middle: at 1.0 (anywhere)
    # the tiny UNet draws the right colours but round blobs for every shape within 10 CPU minutes
    # (shape type 49% after 3000 steps), at 0.3 it reaches 82% in 1500 (docs/experiments/README.md).
    spread=0.3,
    seed=0,
)
train_dataloader = dict(
    batch_size=16,
    num_workers=0,  # the images are tiny: worker start-up would cost more than it saves
    dataset=dict(
        type='folder',
        path='{{$PGV25_CACHE:~/.cache/pgv25}}/tiny_shapes/shapes',
        split='train',  # type='hub' only
        streaming=False,  # type='hub' only
        image_column='image',
        caption_column='text',
        resolution=64,
        buckets=dict(enabled=True, step=16, max_ratio=4.0, weighting=0.5),  # the tiny VAE+UNet need multiples of 16
        center_crop=False,
        random_flip=True,
        caption_dropout=0.1,
        keep_uncaptioned=False,
        max_image_pixels=8192 * 8192,
        filters=dict(),  # e.g. dict(aesthetic=dict(min=6.0)): keep rows in a numeric range (as in pokemon_blip.py)
        captions=dict(),  # e.g. dict(prefix='TOK, ', shuffle_tags=True, keep_tokens=1) (as in pokemon_blip.py)
        mask=dict(),  # masked loss, e.g. dict(source='file', unmasked_weight=0.1) (as in pokemon_blip.py)
        cache_dir='{{$PGV25_CACHE:~/.cache/pgv25}}/data',
        cache=dict(enabled=False, build='auto', dtype='fp16', batch_size=16),  # as in pokemon_blip.py
    ),
)
