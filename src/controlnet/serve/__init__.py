"""``controlnet serve``: the generation service (``service``), the web page and JSON API (``web``),
what the server answers and serves (``security``), and its own bounded folder (``files``)."""
