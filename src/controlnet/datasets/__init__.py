"""Training data: the folder layouts people have (``folders``: fill50k, diffusers) and the synthetic
tasks the project trains its own models on (``synthetic``)."""
