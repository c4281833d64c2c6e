"""The tiny open_clip model: its architecture, and saving/loading it small.

A genuine open_clip ``CLIP`` (ViT image tower, text transformer, open_clip's BPE tokenizer)
registered under :data:`TINY_NAME` from the JSON beside its weights. Only the rows of the
49,408-token embedding table that the shape captions use are stored (the rest load as zeros),
and weights are stored in float16, so the shipped checkpoint is about 1 MB.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tokensieve.checkpoint import atomic_write, atomic_write_text
from tokensieve.clip.shapes import CLASSNAMES, TEMPLATES
from tokensieve.errors import TokensieveError
from tokensieve.optional import import_open_clip

TINY_NAME = "tokensieve-tiny-clip"
WEIGHTS_FILE = "tiny_clip.safetensors"
CONFIG_FILE = f"{TINY_NAME}.json"
TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
_EMBEDDING = "token_embedding.weight"


def shipped_weights() -> Path:
    """The checkpoint shipped with the package (``tokensieve clip-benchmark train-tiny`` made it)."""
    return Path(__file__).resolve().parent.parent / "assets" / "tiny_clip" / WEIGHTS_FILE


def register_config(folder: Path | None = None):
    """Make :data:`TINY_NAME` known to open_clip (from ``folder``'s JSON, else the built-in one)."""
    oc = import_open_clip()
    path = (folder or shipped_weights().parent) / CONFIG_FILE
    if path.is_file():
        oc.add_model_config(path)
    else:
        oc.factory._MODEL_CONFIGS[TINY_NAME] = json.loads(json.dumps(TINY_CONFIG))
    return oc


def build_tiny(seed: int = 0):
    """A randomly initialised tiny CLIP and its eval transform: ``(model, preprocess)``."""
    oc = register_config()
    torch.manual_seed(seed)
    model, _, preprocess = oc.create_model_and_transforms(TINY_NAME, pretrained=None)
    return model, preprocess


def caption_token_ids() -> list[int]:
    """Every token id the shape captions and templates use (with start, end and padding)."""
    oc = register_config()
    tokenizer = oc.get_tokenizer(TINY_NAME)
    texts = [t.format(c=c) for t in TEMPLATES for c in CLASSNAMES] + [f"a {c} and a {c}." for c in CLASSNAMES]
    return sorted(set(tokenizer(texts).flatten().tolist()))


def save_tiny(model: torch.nn.Module, folder: Path) -> Path:
    """Write ``folder/tiny_clip.safetensors`` (float16, sparse embedding) and the config JSON, atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = torch.tensor(caption_token_ids())
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items() if k != _EMBEDDING}
    state["token_embedding.rows"] = model.state_dict()[_EMBEDDING][ids].to(torch.float16).contiguous()
    state["token_embedding.ids"] = ids
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"open_clip_model": TINY_NAME}))
    atomic_write_text(folder / CONFIG_FILE, json.dumps(TINY_CONFIG, indent=2) + "\n")
    return folder / WEIGHTS_FILE


@contextlib.contextmanager
def _no_random_init_warning():
    """open_clip warns "No pretrained weights loaded ... initialized randomly" when it builds the
    model; :func:`load_tiny` loads the weights right after, so that line would mislead."""
    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def load_tiny(weights: Path | None = None, device: str | torch.device = "cpu"):
    """``(model, preprocess, tokenizer)`` of a saved tiny CLIP (default: the shipped one), in eval mode."""
    weights = Path(weights) if weights else shipped_weights()
    if not weights.is_file():
        raise TokensieveError(f"no tiny CLIP checkpoint at {weights}; make one with "
                              "`tokensieve clip-benchmark train-tiny --out DIR`")
    oc = register_config(weights.parent)
    with _no_random_init_warning():
        model, _, preprocess = oc.create_model_and_transforms(TINY_NAME, pretrained=None)
    try:
        state = load_file(str(weights))
        ids, rows = state.pop("token_embedding.ids"), state.pop("token_embedding.rows")
        table = torch.zeros_like(model.token_embedding.weight)
        table[ids] = rows.float()
        state[_EMBEDDING] = table
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except (SafetensorError, OSError, KeyError, IndexError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TokensieveError(f"{weights} is not a tiny CLIP checkpoint ({first[:200]}); make one with "
                              "`tokensieve clip-benchmark train-tiny --out DIR`") from None
    return model.to(device).eval(), preprocess, oc.get_tokenizer(TINY_NAME)
