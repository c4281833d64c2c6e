"""CDPruner: keep the visual tokens of maximal conditional diversity (a DPP conditioned on the question).

Reference: Theia-4869/CDPruner at 9541616c, ``llava/model/llava_arch.py``
(``LlavaMetaForCausalLM.encode_images``) and ``llava/model/multimodal_encoder/clip_encoder.py``
(``CLIPVisionTower.load_text_tower`` / ``forward``). What the released LLaVA-1.5 path does, and
what this module does by default:

* Similarity ``S``: cosine similarity of the projector's outputs (the LLM's input embeddings of
  the image, site ``llm.0``), in float32.
* Relevance ``r``: CLIP patch embeddings — the feature-layer patch states the projector receives
  (``hidden_states[-2][:, 1:]``) through the CLIP vision tower's ``post_layernorm`` and
  ``visual_projection`` — against CLIP text embeddings (``text_embeds`` of
  ``CLIPTextModelWithProjection``) of the question. The question is tokenised without
  truncation, cut into ``max_position_embeddings``-long segments (the last padded with id 0 and
  mask 0) and each segment embedded; ``r`` is the mean over segments of the NEGATED cosine,
  min-max scaled as ``(r - min + 1e-6) / (max - min)``. Their eval scripts strip the answer-format
  instruction from the question first (:data:`ANSWER_FORMAT_PHRASES`).
* Kernel ``L = diag(r) S diag(r)``; the reference's ``theta`` variant (``r -> exp(theta / (2 (1 -
  theta)) r)``) is commented out there and off here (``theta=None``).
* Greedy MAP inference of the DPP with the incremental Cholesky update (Chen et al. 2018):
  ``keep`` times pick the token of largest remaining gain ``d_j`` (ties to the lowest index),
  ``e = (L[j] - sum_t c_t[j] c_t) / sqrt(d_j)``, ``d -= e**2``. No early stop; indices come
  back sorted.

Differences, all outside the reference's working range: the reference runs one sample per
forward (its min-max runs over the whole batch, its relevance averages over every text in it);
here each row uses its own question and its own min-max, which is the reference on that row
alone. Where the kernel's rank is spent (features narrower than ``keep``) the reference's
``sqrt`` of a non-positive gain yields NaN and repeated indices; here the remaining picks go by
relevance. A row whose relevance is constant gets ``r = 1`` where the reference divides by zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tokensieve.errors import TokensieveError
from tokensieve.held_warnings import warnings_held_until_success
from tokensieve.method import Method, Selection, SiteInputs, register

# The answer-format instructions the reference's eval scripts remove before the question reaches
# CLIP (model_vqa_loader.py, model_vqa_science.py; model_vqa_mmbench.py never adds them there).
# Without their leading newline: CLIP's tokeniser ignores whitespace, and a decoded prompt may
# not keep it.
ANSWER_FORMAT_PHRASES = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "请直接回答选项字母。",
)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class ClipTextEncoder:
    """The parts of a CLIP checkpoint CDPruner's relevance needs, loaded the way the reference loads them.

    tokenizer: ``CLIPTokenizerFast``; text_model: ``CLIPTextModelWithProjection``;
    post_layernorm, visual_projection: the vision tower's final norm and projection. Any object
    with the same two methods (:meth:`embed_texts`, :meth:`embed_patches`) and ``to(device)``
    can stand in for it (``CDPruner(encoder=...)``).
    """

    def __init__(self, tokenizer, text_model: nn.Module, post_layernorm: nn.Module, visual_projection: nn.Module):
        self.tokenizer = tokenizer
        self.text_model = text_model.eval()
        self.post_layernorm = post_layernorm.eval()
        self.visual_projection = visual_projection.eval()

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> ClipTextEncoder:
        """Load a CLIP checkpoint (folder or hub id) with both towers, e.g.
        ``openai/clip-vit-large-patch14-336``, the tower of LLaVA-1.5. Weights in float32."""
        from transformers import (
            AutoConfig,
            CLIPTextModelWithProjection,
            CLIPTokenizerFast,
            CLIPVisionModelWithProjection,
        )
        from transformers.utils import logging as hf_logging

        where = f"cdpruner: cannot load the CLIP text encoder {name_or_path!r}"
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the load reports: missing weights are checked below
        try:
            with warnings_held_until_success():
                kind = AutoConfig.from_pretrained(name_or_path).model_type
                if kind != "clip":
                    raise TokensieveError(f"{where}: it is a {kind!r} checkpoint; CDPruner needs a CLIP model with "
                                          "both towers (model_type 'clip'), e.g. openai/clip-vit-large-patch14-336")
                tokenizer = CLIPTokenizerFast.from_pretrained(name_or_path)
                text, text_info = CLIPTextModelWithProjection.from_pretrained(
                    name_or_path, dtype=torch.float32, output_loading_info=True)
                vision, vision_info = CLIPVisionModelWithProjection.from_pretrained(
                    name_or_path, dtype=torch.float32, output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise TokensieveError(f"{where}: {_first_line(err)}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        missing = sorted(text_info["missing_keys"]) + sorted(vision_info["missing_keys"])
        if missing:
            raise TokensieveError(f"{where}: {len(missing)} of its weights are not in the checkpoint, e.g. {missing[0]}")
        return cls(tokenizer, text, vision.vision_model.post_layernorm, vision.visual_projection)

    def to(self, device: torch.device | str) -> ClipTextEncoder:
        for module in (self.text_model, self.post_layernorm, self.visual_projection):
            module.to(device)
        return self

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> list[torch.Tensor]:
        """One ``(M_i, d_clip)`` tensor per text: the ``text_embeds`` of each of its segments.

        A text is tokenised whole (no truncation) and cut into ``max_position_embeddings``-long
        segments, the last one padded with id 0 and attention mask 0, as the reference does; every
        segment of every text goes through the text tower in one batch.
        """
        length = self.text_model.config.max_position_embeddings
        ids, masks, counts = [], [], []
        for text in texts:
            encoded = self.tokenizer(text=text, return_tensors="pt", verbose=False)  # verbose: no over-length warning
            pad = -encoded["input_ids"].shape[1] % length
            ids.append(nn.functional.pad(encoded["input_ids"], (0, pad)).view(-1, length))
            masks.append(nn.functional.pad(encoded["attention_mask"], (0, pad)).view(-1, length))
            counts.append(ids[-1].shape[0])
        device = self.text_model.text_projection.weight.device
        embeds = self.text_model(input_ids=torch.cat(ids).to(device), attention_mask=torch.cat(masks).to(device)).text_embeds
        return list(embeds.split(counts))

    @torch.no_grad()
    def embed_patches(self, states: torch.Tensor) -> torch.Tensor:
        """CLIP patch embeddings ``(B, N, d_clip)`` of the feature-layer patch states ``(B, N, d_vision)``
        (the projector's input): ``visual_projection(post_layernorm(states))`` in float32."""
        width = self.visual_projection.weight.shape[1]
        if states.shape[-1] != width:
            raise TokensieveError(f"cdpruner: the CLIP text encoder's vision tower is {width} wide, but the "
                                  f"projector's input is {states.shape[-1]} wide: use the CLIP checkpoint of this "
                                  "model's vision tower")
        return self.visual_projection(self.post_layernorm(states.float()))


def cdpruner_relevance(image_embeds: torch.Tensor, text_embeds: list[torch.Tensor],
                       valid: torch.Tensor | None = None, theta: float | None = None) -> torch.Tensor:
    """Each token's relevance to its row's question, ``(B, N)``, as the reference scales it.

    image_embeds: ``(B, N, C)`` CLIP patch embeddings; text_embeds: per row ``(M_b, C)``, the
    embeddings of its question's segments; valid: optional ``(B, N)``, False for padding (left
    out of the min-max). Per row: the mean over segments of the negated cosine similarity, then
    ``(r - min + 1e-6) / (max - min)``; a row with a constant ``r`` gets 1 everywhere. With
    ``theta``, ``r -> exp(theta / (2 (1 - theta)) * r)`` (the reference's commented-out variant).
    """
    image = image_embeds.float()
    image = image / image.norm(dim=-1, keepdim=True)
    scores = []
    for row, text in zip(image, text_embeds):
        text = text.float()
        text = text / text.norm(dim=-1, keepdim=True)
        scores.append((-(row @ text.t())).mean(-1))  # (N,)
    relevance = torch.stack(scores)
    known = torch.ones_like(relevance, dtype=torch.bool) if valid is None else valid
    low = relevance.masked_fill(~known, math.inf).amin(1, keepdim=True)
    span = relevance.masked_fill(~known, -math.inf).amax(1, keepdim=True) - low
    relevance = torch.where(span > 0, (relevance - low + 1e-6) / span, torch.ones_like(relevance))
    if theta is not None:
        relevance = torch.exp(theta / (2 * (1 - theta)) * relevance)
    return relevance


def conditional_dpp_keep(tokens: torch.Tensor, relevance: torch.Tensor, keep: int,
                         valid: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy MAP subset of the DPP with kernel ``diag(r) S diag(r)``, ``(B, keep)`` sorted indices.

    tokens: ``(B, N, d)``, ``S`` their cosine similarity; relevance: ``(B, N)``; valid: optional
    ``(B, N)``, False for padding, never picked while a real token is left. Each step picks the
    token of largest remaining gain (lowest index on ties) and updates the gains with the
    incremental Cholesky row ``e`` of that pick. A row whose gains are spent (no positive gain
    left: the kernel's rank is used up) takes its remaining picks by relevance.
    """
    b, n, _ = tokens.shape
    if keep == n:
        return torch.arange(n, device=tokens.device).expand(b, n).clone()
    x = tokens.detach().float()
    x = x / x.norm(dim=-1, keepdim=True)
    relevance = relevance.float()
    # L = r_i S_ij r_j scaled in place: the same products as the reference's r_i * S * r_j, and no
    # fresh N x N buffers (whose first touch cost more than the multiplications on a CPU).
    kernel = (x @ x.transpose(1, 2)).mul_(relevance.unsqueeze(2)).mul_(relevance.unsqueeze(1))  # (B, N, N)
    gain = kernel.diagonal(dim1=1, dim2=2).clone()  # (B, N) det(L_picked+j) / det(L_picked) of each token j
    fallback = relevance.clone()  # order of the picks once a row's gains are spent
    if valid is not None:
        gain.masked_fill_(~valid, -math.inf)
        fallback.masked_fill_(~valid, -1.0)  # below any relevance (all >= 0): padding goes last
    picks, best = _greedy_steps(kernel, gain, keep)
    return _spent_by_relevance(picks, best, fallback).sort(1).values


def _greedy_steps(kernel: torch.Tensor, gain: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(picks (B, keep), best (B, keep))``: the token each greedy step picks from the kernel ``(B, N, N)``
    and the gains ``(B, N)`` (updated in place), and its gain when picked. A step whose best gain is not
    positive (the row's rank is spent) leaves garbage in that row from then on: every later step of the
    row is spent too (gains only decrease), and :func:`_spent_by_relevance` replaces them all.

    A step is a dozen tensor operations (the launches, not the arithmetic, are its cost on these sizes):
    the pick and its gain come from one ``max``, written into views made once, and the pick's factor
    column is read as one row of a second copy of the factor, so that its update is one batched product.
    """
    b, n = gain.shape
    # The incremental Cholesky factor twice: rows (B, keep, N) for the product, columns (B * N, 1, keep) to
    # read a pick's column as one row, by index_select with its flat index (row b's token j at b * N + j).
    factor, columns = gain.new_zeros(b, keep, n), gain.new_zeros(b * n, 1, keep)
    factor_at = factor.split(1, dim=1)  # per step (B, 1, N)
    columns_at = columns.view(b, n, keep).transpose(1, 2).split(1, dim=1)  # per step (B, 1, N), strided
    kernel_rows, gain_rows, flat_gain = kernel.view(b * n, 1, n), gain.view(b, 1, n), gain.view(-1)
    best, picks = gain.new_empty(keep, b, 1, 1), torch.empty(keep, b, 1, 1, dtype=torch.long, device=gain.device)
    best_at, picks_at, flat_picks = best.unbind(0), picks.unbind(0), picks.view(keep, b).unbind(0)
    offsets = torch.arange(0, b * n, n, device=gain.device) if b > 1 else None  # none to add for one row
    for step in range(keep):
        torch.max(gain_rows, 2, keepdim=True, out=(best_at[step], picks_at[step]))  # first index on ties
        at = flat_picks[step] if offsets is None else flat_picks[step] + offsets  # (B,) flat index of the pick
        # sum_t c_t[pick] c_t as the reference's einsum("tb,tbn->bn"): the same batched product
        taken = torch.bmm(columns.index_select(0, at).narrow(2, 0, step), factor.narrow(1, 0, step))  # (B, 1, N)
        e = torch.div(torch.sub(kernel_rows.index_select(0, at), taken), best_at[step].sqrt(), out=factor_at[step])
        columns_at[step].copy_(e)
        gain_rows.sub_(torch.mul(e, e))  # the reference's square, as one product (pow dispatches slower)
        flat_gain.index_fill_(0, at, -math.inf)
    return picks.view(keep, b).t(), best.view(keep, b).t()


def _spent_by_relevance(picks: torch.Tensor, best: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``(B, keep)``: ``picks`` with the picks of every spent step (``best`` ``(B, keep)`` not positive, NaN
    included) replaced, in order, by the tokens of highest ``fallback`` ``(B, N)`` (lowest index on ties)
    that no step before them picked. No value is read on the host: the same operations on every row."""
    spent = (~(best > 0)).cumsum(1) > 0  # (B, keep) a row's steps from its first spent one on
    chosen = torch.zeros_like(fallback).scatter_add_(1, picks, (~spent).to(fallback.dtype)) > 0
    order = fallback.masked_fill(chosen, -math.inf).sort(dim=1, descending=True, stable=True).indices  # (B, N)
    rank = (spent.long().cumsum(1) - 1).clamp_(min=0)  # (B, keep) a spent step's place in that order
    return torch.where(spent, order.gather(1, rank), picks)


@register
@dataclass
class CDPruner(Method):
    """CDPruner: a DPP over the post-projector tokens, conditioned on CLIP relevance to the question.

    text_encoder: a CLIP checkpoint (folder or hub id) with both towers, loaded when the method is
        attached: its text tower embeds the question and its vision tower's ``post_layernorm`` and
        ``visual_projection`` embed the patches. For LLaVA-1.5 that is
        ``openai/clip-vit-large-patch14-336``, the checkpoint of its vision tower. Required.
    theta: ``None`` (the reference) or in ``[0, 1)``: relevance ``exp(theta / (2 (1 - theta)) r)``,
        the reference's commented-out knob (0 ignores the question; towards 1 it dominates).
    answer_format_phrases: text removed from the question before CLIP reads it (the reference's
        eval scripts remove these answer-format instructions).
    encoder: the loaded encoder (state, not a parameter); pass an object with
        ``embed_texts(list[str]) -> list[(M_i, d_clip)]``, ``embed_patches((B, N, d_vision)) ->
        (B, N, d_clip)`` and ``to(device)`` to use one held in memory.
    """

    name = "cdpruner"
    paper = ("Zhang, Liu, Li, Lu, Zhang, Pan, She, Zhang. Beyond Attention or Similarity: Maximizing Conditional "
             "Diversity for Token Pruning in MLLMs. NeurIPS 2025. arXiv:2506.10967")
    stages = ("llm",)
    default_site = "llm.0"
    handles_video = True  # a DPP over the set of tokens and their text relevance, no grid assumed
    signals = ("projector_input",)

    text_encoder: str | None = None
    theta: float | None = None
    answer_format_phrases: tuple[str, ...] = ANSWER_FORMAT_PHRASES
    encoder: Any = field(default=None, repr=False, compare=False, metadata={"state": True})

    def __post_init__(self):
        self.answer_format_phrases = tuple(self.answer_format_phrases)  # a config read back from JSON has a list
        if self.theta is not None and not 0 <= self.theta < 1:
            raise TokensieveError(f"cdpruner: theta {self.theta} is not in [0, 1)")

    def check(self, n_tokens: int, keep: int, site: str) -> None:
        if site != "llm.0":
            raise TokensieveError(f"cdpruner acts on the LLM's input embeddings of the image (site llm.0), not {site}")
        self._loaded()  # a missing or unloadable encoder stops the attach, before any model work

    def _loaded(self):
        if self.encoder is None:
            if self.text_encoder is None:
                raise TokensieveError("cdpruner needs a CLIP text encoder: pass text_encoder=<CLIP checkpoint folder or "
                                      "hub id>, e.g. openai/clip-vit-large-patch14-336 for LLaVA-1.5")
            self.encoder = ClipTextEncoder.from_pretrained(self.text_encoder)
        return self.encoder

    def question_for_clip(self, text: str) -> str:
        """``text`` without the answer-format phrases."""
        for phrase in self.answer_format_phrases:
            text = text.replace(phrase, "")
        return text.strip()

    def select(self, inputs: SiteInputs) -> Selection:
        encoder = self._loaded()
        texts = inputs.question_texts()
        if len(texts) != inputs.tokens.shape[0]:
            raise TokensieveError(f"cdpruner: {len(texts)} question texts for {inputs.tokens.shape[0]} rows at {inputs.site}")
        encoder.to(inputs.tokens.device)
        image_embeds = encoder.embed_patches(inputs.signal("projector_input"))
        text_embeds = encoder.embed_texts([self.question_for_clip(t) for t in texts])
        relevance = cdpruner_relevance(image_embeds, text_embeds, inputs.valid, self.theta)
        return Selection(conditional_dpp_keep(inputs.tokens, relevance, inputs.keep, inputs.valid))
