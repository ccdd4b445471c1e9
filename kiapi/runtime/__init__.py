"""The shared runtime. It never imports Connexion or Starlette; only the MLX engine module
(``kiapi.runtime.engine``, when present) imports MLX, lazily."""
