"""Analytic FLOPs for the tokens each block sees: one model of a transformer block
(:func:`block_flops`), used for a ViT image tower (:func:`vit_flops`) and for a LLaVA prefill,
stage by stage (:func:`prefill_flops`).

FLOPs are 2 x multiply-accumulates of the matmuls of one prefill of one sequence (a padded
batch of B rows costs B times the FLOPs of its padded length). Counted: the patch-embedding
convolution, every linear layer, and attention's ``Q K^T`` and ``A V`` over the full
``n x n`` square of each layer — no causal halving, because that is what SDPA kernels compute
on a dense mask and what ``torch.utils.flop_counter`` reports. Not counted: norms,
activations, softmax, RoPE, residual adds, biases and the embedding lookup. Without the
attention-score term the count is the linear FLOPs (dense matmuls, which grow linearly with
tokens) that the speed benchmarks take as their ideal. See docs/evaluation.md ("Prefill FLOPs").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from transformers import LlavaConfig

from tokensieve.backbones.base import Site
from tokensieve.backbones.stage_plan import merges_in_blocks, tokens_entering_merges
from tokensieve.errors import TokensieveError


class TokenCounts(NamedTuple):
    """Tokens each block of one prefill sees: the arguments of :func:`prefill_flops`."""

    vision_tokens: list[int]
    projector_tokens: int
    llm_tokens: list[int]


def _config(backbone_or_config) -> LlavaConfig:
    return backbone_or_config if isinstance(backbone_or_config, LlavaConfig) else backbone_or_config.config


def check_count(name: str, n: int, least: int = 1) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < least:
        raise TokensieveError(f"{name} = {n!r}: a token count must be an integer >= {least}")


def check_counts(name: str, counts: Sequence[int], expected_length: int, layers: str) -> None:
    if len(counts) != expected_length:
        raise TokensieveError(f"{name} has {len(counts)} entries but the model has {expected_length} {layers}")
    for i, n in enumerate(counts):
        check_count(f"{name}[{i}]", n)


def block_flops(tokens: int, width: int, mlp_hidden: int, attention_scores: bool = True, q_width: int | None = None,
                kv_width: int | None = None, mlp_matrices: int = 2, attention_runs: Sequence[int] | None = None) -> int:
    """FLOPs of one transformer block on ``tokens`` tokens of ``width``: the q/k/v/out projections
    (queries and outputs ``q_width`` wide, keys and values ``kv_width``: grouped-query attention;
    both default to ``width``), an MLP of ``mlp_matrices`` ``width x mlp_hidden`` matrices (2: a
    CLIP block's fc1/fc2; 3: Llama's gate/up/down) and, with ``attention_scores``, the quadratic
    ``Q K^T`` and ``A V`` (per query head: K/V heads are shared, scores are not), over the whole
    square, or within each of ``attention_runs`` (token counts summing to ``tokens``: Qwen-VL's
    towers attend within each image, Qwen2.5-VL's within each window)."""
    n, d = tokens, width
    q_width = d if q_width is None else q_width
    kv_width = q_width if kv_width is None else kv_width
    projections = 2 * n * (2 * d * q_width + 2 * d * kv_width)  # q and o, then k and v
    mlp = 2 * n * mlp_matrices * d * mlp_hidden
    scores = sum(2 * 2 * r * r * q_width for r in (attention_runs or [n]))
    return projections + mlp + attention_scores * scores


def decoder_layer_flops(text_config, tokens: int, attention_scores: bool = True) -> int:
    """FLOPs of one Llama-style decoder layer of ``text_config`` (grouped-query attention, a gated
    MLP of three matrices; LLaVA's LLaMA, Qwen-VL's Qwen2) on ``tokens`` tokens."""
    tc = text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return block_flops(tokens, tc.hidden_size, tc.intermediate_size, attention_scores,
                       q_width=tc.num_attention_heads * head_dim, kv_width=tc.num_key_value_heads * head_dim,
                       mlp_matrices=3)


def patch_embedding_flops(patches: int, patch_size: int, width: int, channels: int = 3) -> int:
    """FLOPs of the patch-embedding convolution over ``patches`` patches of one image."""
    return 2 * patches * channels * patch_size**2 * width


def vit_flops(width: int, patch_size: int, mlp_ratio: float, n_patches: int, tokens_per_block: Sequence[int],
              attention_scores: bool = True) -> int:
    """FLOPs of one image through a ViT image tower of ``width`` (MLP ``int(width * mlp_ratio)``
    wide): the patch embedding of its ``n_patches`` patches and every block on the tokens it runs
    on, ``tokens_per_block`` (CLS included)."""
    mlp_hidden = int(width * mlp_ratio)
    return patch_embedding_flops(n_patches, patch_size, width) + sum(
        block_flops(n, width, mlp_hidden, attention_scores) for n in tokens_per_block)


def prefill_flops(config: LlavaConfig, vision_tokens: Sequence[int], projector_tokens: int,
                  llm_tokens: Sequence[int], attention_scores: bool = True) -> dict:
    """FLOPs of one prefill, per stage and per layer.

    vision_tokens: one count per vision encoder block, tokens entering it (CLS included).
        Every block runs, also those after ``vision_feature_layer``.
    projector_tokens: visual tokens entering the projector.
    llm_tokens: one count per LLM decoder layer, positions entering it (text + visual).
    attention_scores: False leaves out the quadratic ``Q K^T`` / ``A V`` terms, which gives the
        linear FLOPs (dense matmuls only) that ``tokensieve bench speed`` takes as its ideal.

    Returns ``vision`` (patch embedding + blocks), ``projector``, ``llm`` (decoder layers only),
    ``lm_head`` (the last position only, as ``generate`` computes in prefill), ``total`` (all four),
    and the per-layer lists ``vision_layers`` and ``llm_layers``; all in FLOPs (ints).
    """
    vc, tc = config.vision_config, config.text_config
    check_counts("vision_tokens", vision_tokens, vc.num_hidden_layers, "vision blocks")
    check_counts("llm_tokens", llm_tokens, tc.num_hidden_layers, "LLM decoder layers")
    check_count("projector_tokens", projector_tokens)
    patches = (vc.image_size // vc.patch_size) ** 2
    patch_embedding = patch_embedding_flops(patches, vc.patch_size, vc.hidden_size, vc.num_channels)
    vision_layers = [block_flops(n, vc.hidden_size, vc.intermediate_size, attention_scores) for n in vision_tokens]
    feature_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
    projector = 2 * projector_tokens * (vc.hidden_size * feature_layers + tc.hidden_size) * tc.hidden_size
    llm_layers = [decoder_layer_flops(tc, n, attention_scores) for n in llm_tokens]
    lm_head = 2 * tc.hidden_size * tc.vocab_size
    vision = patch_embedding + sum(vision_layers)
    llm = sum(llm_layers)
    return {"vision": vision, "projector": projector, "llm": llm, "lm_head": lm_head,
            "total": vision + projector + llm + lm_head,
            "vision_layers": vision_layers, "llm_layers": llm_layers}


def token_counts(backbone_or_config, text_tokens: int, handle=None, kept: dict[Site, int] | None = None,
                 merging: dict | None = None) -> TokenCounts:
    """Tokens each block sees in one prefill of a prompt with ``text_tokens`` non-image tokens.

    Without ``handle`` (or for a handle not in ``hard`` mode, which removes nothing): the
    unpruned model. With a hard-mode handle: its stages as they acted since it was attached,
    read from ``handle.mean_kept`` (visual tokens kept after each stage, CLS excluded in the
    tower; a stage that keeps a count per row counts its mean, rounded). Or ``kept``:
    ``{site: visual tokens kept}`` as planned (:mod:`tokensieve.evaluate.matching`), with
    ``merging``: ``{site: method}`` of the stages that merge inside the tower's blocks (ToMe),
    whose blocks each see the tokens the earlier blocks left (read from the handle's stages).
    """
    check_count("text_tokens", text_tokens, least=0)
    config = _config(backbone_or_config)
    vc = config.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    keeps_cls = int(config.vision_feature_select_strategy == "full")
    hard = handle is not None and handle.mode == "hard"
    if kept is None:
        kept = _kept_per_site(handle) if hard else {}
    if merging is None:
        merging = {Site.parse(st.site): st.method for st in handle.stages if merges_in_blocks(st.method)} if hard else {}
    feature = config.vision_feature_layer % (vc.num_hidden_layers + 1)
    entering = {}  # block -> tokens entering it, from an in-block stage's merges
    vision = []
    for i in range(vc.num_hidden_layers):
        site = Site("vision", i)
        if site in merging:
            later = [s.layer for s in kept if s.stage == "vision" and s.layer > i]
            end = min(later, default=feature)
            entering.update(tokens_entering_merges(merging[site], entering.get(i, patches), kept[site], i, end))
        patches = entering.get(i, patches)
        if site in kept and site not in merging:
            patches = kept[site]
        vision.append(1 + patches)  # CLS always stays in the tower
    patches = entering.get(vc.num_hidden_layers, patches)
    # The projector stage removes from the patches after CLS; CLS (if kept) is then an image token.
    visual = kept.get(Site("projector"), patches) + keeps_cls
    projector = visual
    # llm.0 reduces the projector's output, CLS (a prefix there, as at the projector) aside.
    visual = kept.get(Site("llm", 0), visual - keeps_cls) + keeps_cls
    llm = []
    for k in range(config.text_config.num_hidden_layers):
        if k > 0:
            visual = kept.get(Site("llm", k), visual)
        llm.append(text_tokens + visual)
    return TokenCounts(vision, projector, llm)


def _kept_per_site(handle) -> dict[Site, int]:
    """Visual tokens kept at each stage's site per row since the handle was attached (the
    rounded mean, when a stage keeps a count per row)."""
    return {Site.parse(stage.site): round(handle.mean_kept(str(stage))) for stage in handle.stages}


def full_prefill_flops(backbone_or_config, text_tokens: int) -> dict:
    """:func:`prefill_flops` of the unpruned model on a prompt with ``text_tokens`` non-image tokens."""
    config = _config(backbone_or_config)
    return prefill_flops(config, *token_counts(config, text_tokens))
