# Pick-a-Pic v2 preference pairs from the Hub at 1024 px: per row a caption, two generated images (jpg_0, jpg_1)
# and which one people preferred (label_0: 1 the first, 0 the second, 0.5 a tie). The full set is ~335 GB;
# 'kashif/pickascore' is a small sample in the same format, for trying a recipe first:
#   --cfg-options train_dataloader.dataset.path=kashif/pickascore train_dataloader.dataset.split=validation
_base_ = ['./pokemon_blip.py']
train_dataloader = dict(
    batch_size=1,  # pairs per process: two images each through the UNet, for the policy and the reference
    dataset=dict(
        type='hub',
        path='yuvalkirstain/pickapic_v2',
        split='train',
        caption_column='caption',
        pairs=dict(
            format='pickapic',  # 'pickapic' (two image columns + a label), 'chosen_rejected', or 'auto'
            image_columns=['jpg_0', 'jpg_1'],
            label_column='label_0',
            keep_ties=False,  # True: a tie is trained both ways round (the symmetric loss) instead of dropped
            chosen_column='chosen',  # format='chosen_rejected': a column per image, paths relative to a manifest
            rejected_column='rejected',
        ),
        caption_dropout=0.0,  # a preference is about its caption: keep it
    ),
)
