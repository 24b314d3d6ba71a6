"""From noise to latents: the samplers (pure functions over a denoiser), the guided denoiser that
applies classifier-free guidance and the control units, and prompt encoding."""
