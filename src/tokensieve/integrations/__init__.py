"""tokensieve inside the engines made for the job: Optuna (``tokensieve search``), lmms-eval (a
model plugin) and clip_benchmark. Importing this package imports none of them."""
