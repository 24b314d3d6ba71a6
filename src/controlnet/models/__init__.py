"""The networks, with module names equal to the original checkpoints' keys.

``layers`` (the blocks the UNet, the ControlNet and the VAE share, and ``zero_module``), ``kernels``
(faster CPU products behind nn.Linear / nn.Conv2d), ``unet``, ``controlnet`` (the trainable copy of
the encoder, its hint encoder and zero convolutions), ``controlnet_union`` (xinsir's union
ControlNet for SDXL: control types, several conditions in one pass), ``vae``, ``text`` and ``tokenizer`` (CLIP and
OpenCLIP), ``stable_diffusion`` (the three together, as one LDM checkpoint holds them),
``placement`` (low-memory placement of modules), ``tiny`` (seeded random small models for tests),
``t2i_adapter`` (the T2I-Adapter's full and light networks, whose features the UNet adds to its encoder),
``estimator`` (the small encoder-decoder that reads depth or segmentation off world images for eval),
``conditioning`` (SDXL's size conditioning and the vector y its UNet reads).
"""
