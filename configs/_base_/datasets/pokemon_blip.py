# BLIP-captioned Pokémon from the Hub at 1024 px. sdxlengine's recipe read
# 'lambdalabs/pokemon-blip-captions'; diffusers' docs now use 'lambdalabs/naruto-blip-captions'.
# Either is one key: --cfg-options train_dataloader.dataset.dataset=lambdalabs/naruto-blip-captions
train_dataloader = dict(
    batch_size=1,  # per process
    num_workers=4,  # loader processes per training process
    dataset=dict(
        dataset='lambdalabs/pokemon-blip-captions',  # hub id or a local dataset folder
        data_dir=None,  # or an image folder with metadata.jsonl/metadata.csv (takes precedence)
        split='train',
        image_column='image',
        caption_column='text',
        resolution=1024,
        center_crop=False,  # random crop, recorded in the SDXL micro-conditioning
        random_flip=True,
        caption_dropout=0.05,  # share of captions replaced by the pipeline's unconditional input (for CFG)
    ),
)
