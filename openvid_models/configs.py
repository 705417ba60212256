"""Named model sizes: constructor arguments by name (a plain dict; pass them with ``**`` to STDiT or MVDiT).

The XL/2 sizes are the released OpenVid-1M models at 16 x 512 x 512 (latents 16 x 64 x 64 from the SD VAE);
the tiny ones keep every structural feature (patching, several frames, text) at a size the CPU tests run.
"""

MODEL_SIZES: dict[str, dict] = {
    "STDiT-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=(1, 2, 2), input_size=(16, 64, 64)),
    "STDiT-tiny": dict(depth=2, hidden_size=64, num_heads=2, patch_size=(1, 2, 2), input_size=(3, 6, 10),
                       caption_channels=24, model_max_length=7),
    "MVDiT-XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=(1, 2, 2), input_size=(16, 64, 64)),
    "MVDiT-tiny": dict(depth=2, hidden_size=64, num_heads=2, patch_size=(1, 2, 2), input_size=(3, 6, 10),
                       caption_channels=24, model_max_length=7),
}
