"""Where a backbone takes the two-stage pruner's parts, and the backbone facts their shapes depend on.

LLaVA: the token merger at ``projector``, on the vision tower's ``N`` patch tokens (every image ``N``).
Qwen-VL: at ``llm.0``, after the patch merger. Its 2x2 grouping is fixed and the tokens the LLM
receives exist only after it, each with the grid position its M-RoPE ids come from, so the centres
are chosen among those tokens (width ``d_text``); before it, a centre would have to stand for a
2x2 group the patch merger then regroups. Each image has its own token count there, so the merger's
centres and the heads' shares are ratios of each image's (row's) tokens, not one count. The layer
pruner heads act inside the LLM (``llm.k``) on both. LLaVA-NeXT and LLaVA-OneVision have no placement
yet (one line): no ``projector`` site there, and a merger at ``llm.0`` would take each image's base and
crops as one set.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokensieve.errors import TokensieveError


@dataclass(frozen=True)
class Placement:
    """merger_site: where the token merger acts; merger_width: the width of the tokens there;
    n_tokens: the visual tokens every image has there, None where each image has its own (Qwen-VL);
    extra: tokens entering the LLM besides them (a kept CLS); signature: what a saved pruner must
    match to load onto the backbone."""

    merger_site: str
    merger_width: int
    n_tokens: int | None
    extra: int
    signature: dict[str, int]


def placement(backbone) -> Placement:
    """The :class:`Placement` of the pruner's parts on ``backbone`` (a LLaVA or a Qwen-VL adapter)."""
    from tokensieve.backbones.hf_qwen import QwenVLBackbone
    from tokensieve.backbones.load import is_anyres

    if is_anyres(backbone):
        raise TokensieveError(f"the two-stage pruner has no placement on {backbone.family_name} yet: evaluate "
                              "training-free methods there (--method)")
    text = backbone.config.text_config
    if isinstance(backbone, QwenVLBackbone):
        signature = {"merger_hidden": text.hidden_size, "text_hidden": text.hidden_size,
                     "llm_layers": len(backbone.llm_layers)}
        return Placement("llm.0", text.hidden_size, None, 0, signature)
    signature = {"vision_hidden": backbone.config.vision_config.hidden_size, "text_hidden": text.hidden_size,
                 "llm_layers": len(backbone.llm_layers), "n_patches": backbone.n_patches,
                 "visual_tokens": backbone.n_visual_tokens}
    return Placement("projector", signature["vision_hidden"], backbone.n_patches,
                     backbone.n_visual_tokens - backbone.n_patches, signature)


def check_per_image_merger(merger) -> None:
    """Refuse, in one line, merger settings that need every image's tokens on one square grid or the
    question's states before the LLM, where each image has its own grid (Qwen-VL's ``llm.0``)."""
    if merger.diversity_radius is not None:
        raise TokensieveError("merger.diversity_radius needs every image on one square patch grid; on Qwen-VL "
                              "each image has its own grid: leave it unset")
    if merger.variant == "question_aware":
        raise TokensieveError("merger.variant question_aware reads the question's states at the merger, which "
                              "Qwen-VL's llm.0 does not give yet: use variant simple")
