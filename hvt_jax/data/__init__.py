"""The data area: datasets (TFDS, image folders, the offline digits), where records come from
(`sources`), the tf.data pipeline (`input_pipeline`, host image ops in `preprocess`), batches onto
the devices (`feeding`), the on-device augmentation (`augment`: `randaugment` over `image_ops`)
and batch mixing (`mixup`)."""
