# BLIP-captioned Pokémon from the Hub at 1024 px. sdxlengine's recipe read
# 'lambdalabs/pokemon-blip-captions'; diffusers' docs now use 'lambdalabs/naruto-blip-captions'.
# Either is one key: --cfg-options train_dataloader.dataset.path=lambdalabs/naruto-blip-captions
train_dataloader = dict(
    batch_size=1,  # per process
    num_workers=4,  # loader processes per training process
    dataset=dict(
        type='hub',  # 'hub': a hub id or local dataset folder; 'folder': images + metadata.jsonl|csv or .txt captions;
        # 'manifest': a CSV/JSONL/parquet file of image paths (relative to it) and captions
        path='lambdalabs/pokemon-blip-captions',
        split='train',
        streaming=False,  # hub only: read rows as they download instead of downloading first
        image_column='image',  # for a folder with metadata, the path column is 'file_name'
        caption_column='text',  # a string, or a list of strings (one chosen at random per step)
        resolution=1024,  # buckets hold about resolution² pixels
        buckets=dict(
            enabled=True,  # False: every image a centre/random crop of resolution²
            step=64,  # bucket sides are multiples of this
            max_ratio=4.0,  # from 1:4 to 4:1
            weighting=0.5,  # P(bucket) ∝ images^weighting: 1 proportional, 0 uniform over buckets
            # min_images: buckets with fewer images merge into their neighbour (default: one global batch)
        ),
        center_crop=False,  # random crop, recorded in the SDXL micro-conditioning
        random_flip=True,
        caption_dropout=0.05,  # share of captions replaced by the pipeline's unconditional input (for CFG)
        keep_uncaptioned=False,  # True: images without a caption train as unconditional instead of being skipped
        max_image_pixels=8192 * 8192,  # larger images are skipped unread (decompression-bomb guard)
        # Keep only rows whose numeric columns lie in a range (inclusive), e.g. a curated subset:
        # filters=dict(aesthetic=dict(min=6.0)) or --cfg-options train_dataloader.dataset.filters.aesthetic.min=6
        filters=dict(),
        # Caption handling, e.g. dict(prefix='TOK, ', shuffle_tags=True, keep_tokens=1, tag_dropout=0.1):
        # prefix or template='a photo of TOK, {caption}' (applied once); shuffle_tags / tag_dropout on the comma-
        # separated tags after the first keep_tokens, drawn per (seed, step) so resumes stay exact (not with the cache).
        captions=dict(),
        # Masked loss, e.g. dict(source='file', unmasked_weight=0.1): a weight per pixel from <name>_mask.png beside
        # each image (white 1, black unmasked_weight), a mask column (source='column', column='mask') or the image's
        # alpha channel (source='alpha'); normalize=True makes each image's weights average 1; missing='full' trains an
        # image without a mask unmasked instead of skipping it. Cached with the latents.
        mask=dict(),
        cache_dir='{{$PGV25_CACHE:~/.cache/pgv25}}/data',
        cache=dict(
            # Train from VAE latents + caption embeddings on disk (see `pgv25 data cache`): at 1024² the frozen VAE
            # encoder and text encoders cost 0.22 s of a 0.31 s step of four on an H200 (docs/performance.md).
            # Off for per-step caption changes (shuffle_tags, tag_dropout) or text-encoder LoRA.
            enabled=True,
            build='auto',  # 'auto': build it before training when missing; 'never': refuse to start
            dtype='fp16',  # storage precision of latents and embeddings
            batch_size=16,  # images read per batch while building (each VAE call takes at most 4 Mpx)
        ),  # scan results and latent/text caches
    ),
)
