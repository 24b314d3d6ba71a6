"""``controlnet serve``: the generation service (``service``), the web page (``ui``) and the JSON API
(``api``) in one app (``app``), what the server answers and serves (``security``), and its own
bounded folder (``files``)."""
