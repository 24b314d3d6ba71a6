"""Model files: how each layout stores the models, read safely and written atomically.

- ``tensors``: reading tensor files safely (safetensors; pickles only as tensors) and writing safetensors;
- ``ldm``: the original single-file layout (prefixes, splitting a file into its models, save_ldm);
- ``detect``: what a file holds, the configuration of one that does not say, ControlNet/base fit;
- ``diffusers``: diffusers folders and single files, read and written (save_diffusers);
- ``diffusers_unet``, ``diffusers_vae``, ``diffusers_text``, ``diffusers_tokenizer``: the key maps
  and config translations between our (original LDM) layout and diffusers', as explicit, tested
  tables: pure ``dict -> dict`` over tensors, no copies beyond the reshapes, splits and
  concatenations a layout needs, so a round trip is bit-identical;
- ``t2i_adapter``: T2I-Adapter files (TencentARC's and diffusers' layouts, the key map between
  them, configurations from shapes; SD's and SDXL's adapters);
- ``control_lora``: Stability's Control-LoRA files (an SDXL ControlNet as low-rank differences from
  its base UNet) and the ControlNet weights they make on a given base;
- ``lora``: LoRA files (kohya / AUTOMATIC1111 and diffusers / PEFT layouts) and the names of our modules
  their layers change (merging them into a model: ``controlnet.lora``);
- ``errors``: CheckpointError, the one-line error of all of them.

Building models from these files is ``controlnet.loading``'s.
"""
