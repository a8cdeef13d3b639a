"""The data area: datasets (TFDS, the offline digits), the tf.data pipeline, its image ops
(`preprocess`, `randaugment`) and the on-device batch mixing (`mixup`)."""
