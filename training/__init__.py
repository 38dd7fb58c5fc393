"""Training for DaGAN: data preparation, the self-supervised face-depth stage and the DaGAN stage.

``dagan prepare`` turns raw talking-head videos into a face-cropped dataset, ``dagan train depth`` learns the
face depth net F_d (with the pose/intrinsics net F_p) from consecutive frames, and ``dagan train dagan``
learns the keypoint detector, generator and discriminator with F_d frozen. See ``docs/training.md``.
"""
