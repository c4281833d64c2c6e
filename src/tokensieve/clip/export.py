"""The tiny CLIP as an open_clip ``local-dir:`` folder, for tools that load models their own way.

``tokensieve clip-benchmark`` knows ``--model tokensieve-tiny-clip``; the ``clip_benchmark``
console script and ``open_clip.create_model_and_transforms`` do not. Exported, the model loads
anywhere open_clip runs: ``--model local-dir:FOLDER`` (open_clip then ignores ``--pretrained``).
The shipped file stores only the embedding rows the captions use, in float16; the export
holds the full table in float32 (16 MB), as open_clip expects.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from tokensieve.checkpoint import atomic_write, atomic_write_text
from tokensieve.clip.tiny import TINY_CONFIG, load_tiny

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def export_local_dir(out: Path, weights: Path | None = None) -> Path:
    """Write ``out/open_clip_config.json`` and ``out/open_clip_model.safetensors`` from the tiny
    CLIP at ``weights`` (default: the shipped one); returns ``out``."""
    model, preprocess, _ = load_tiny(weights)
    normalize = next(t for t in preprocess.transforms if type(t).__name__ == "Normalize")
    config = {"model_cfg": TINY_CONFIG,
              "preprocess_cfg": {"mean": list(normalize.mean), "std": list(normalize.std)}}
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(state, tmp))
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return out
