"""DART (duplication-aware reduction of tokens): keep a few pivot tokens and, for each pivot in
turn, the image tokens least like it.

As the authors' LLaVA code runs it (``DART.get_retained_image_token`` in
``llava/model/language_model/modeling_llama_self.py``, ZichenWen1/DART), before LLM layer K=2:

- pivots: the ``pivot_image_tokens`` image tokens and the ``pivot_text_tokens`` text tokens (the
  real tokens after the image run: question and answer cue) whose layer K-1 post-RoPE keys, heads
  concatenated, have the largest L1 norm;
- duplication: cosine similarity of the hidden states entering layer K after the model's final
  RMSNorm;
- claiming: the pivots take turns in the iteration order of a Python ``set`` of their positions
  in the sequence (image pivots inserted first, each group by decreasing norm); each claims the
  ``per_pivot`` image tokens least similar to it among those no pivot has claimed yet (image pivots
  are never candidates). Text pivots claim too, and are not kept themselves;
- kept: the image pivots and every claimed token, ``pivot_image_tokens + pivots * per_pivot``
  tokens (``pivots = pivot_image_tokens + pivot_text_tokens``).

The released code sets ``per_pivot = max_num_trunction // pivots`` from a setting of its own, so
its "128 tokens" configuration keeps 4 + 8 * 16 = 132. Here the budget is the most a row keeps:
``per_pivot = (keep - pivot_image_tokens) // pivots``, so a budget of 132 reproduces that
configuration exactly and any other budget keeps up to ``pivots - 1`` fewer tokens (the count kept
is what is reported). Ours, off by default: ``exact_budget`` gives those remaining slots to the
first pivots in claiming order, one more least-similar token each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokensieve.errors import TokensieveError
from tokensieve.method import Method, Selection, SiteInputs, register
from tokensieve.ops import trues_first


def unit_vectors(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., d)`` over its L2 norm clamped at 1e-8, as ``F.cosine_similarity`` normalises each side:
    products of two such summed over ``d`` are its cosines bit for bit, and the tokens' side is
    normalised once for every pivot instead of once per pivot."""
    return x / torch.linalg.vector_norm(x, 2, dim=-1, keepdim=True).clamp_min(1e-8)


def topk_among(values: torch.Tensor, among: torch.Tensor, counts: list[int], k: int) -> torch.Tensor:
    """``(B, k)`` indices of the ``k`` largest of each row's ``values`` ``(B, N)`` where ``among`` ``(B, N)``
    is True (``counts[b]`` of them, known on the host). ``topk`` runs on exactly those values in their
    order, as the reference's ``topk`` of a list it indexed first: which of equal values it returns
    depends on the list it is given. Rows of one count run together, with no read of the device."""
    first = trues_first(among)  # (B, N)
    if len(set(counts)) == 1:
        inside = first[:, :counts[0]]
        return inside.gather(1, values.gather(1, inside).topk(k, dim=1).indices)
    return torch.stack([row[:m][values[r, row[:m]].topk(k).indices] for r, (row, m) in enumerate(zip(first, counts))])


def dart_keep(keys: torch.Tensor, states: torch.Tensor, positions: torch.Tensor, keep: int, *,
              question_keys: torch.Tensor | None = None, question_states: torch.Tensor | None = None,
              question_positions: torch.Tensor | None = None, question_valid: torch.Tensor | None = None,
              pivot_image_tokens: int = 4, pivot_text_tokens: int = 4, exact_budget: bool = False,
              valid: torch.Tensor | None = None) -> torch.Tensor:
    """DART's kept image tokens for every row, each row as if alone.

    keys: ``(B, N, d_k)`` layer K-1's post-RoPE keys of the image tokens, heads concatenated.
    states: ``(B, N, d)`` the image tokens' hidden states entering layer K, after the final norm.
    positions: ``(B, N)`` each image token's index in its row's (unpadded) sequence.
    question_keys, question_states, question_positions: ``(B, T, d_k)``, ``(B, T, d)``, ``(B, T)``
        the same for the text tokens after the image run, with ``question_valid`` ``(B, T)`` bool
        False on padding (all may be ``None`` when ``pivot_text_tokens`` is 0).
    valid: optional ``(B, N)`` bool, False for tokens that only pad a row (never kept).
    Norms and cosines are computed in the inputs' dtype, as the reference does in the model's. Every row
    at once: each turn one cosine of a pivot against all its row's tokens, ranked among the unclaimed
    ones (:func:`topk_among`), and one read of the pivots' positions for the claiming order (a Python
    set's, as released).
    Returns ``(B, K)`` sorted indices into the ``N`` tokens, ``K = pivot_image_tokens + pivots *
    ((keep - pivot_image_tokens) // pivots)`` (``keep`` with ``exact_budget``, all ``N`` when
    ``keep == N``).
    """
    b, n, _ = states.shape
    if keep == n:
        return torch.arange(n, device=states.device).expand(b, n)
    if not pivot_image_tokens <= keep < n:
        raise TokensieveError(f"dart keeps its {pivot_image_tokens} image pivots: cannot keep {keep} of {n} tokens")
    pivots = pivot_image_tokens + pivot_text_tokens
    per_pivot = (keep - pivot_image_tokens) // pivots
    extra = keep - pivot_image_tokens - pivots * per_pivot if exact_budget else 0
    norms = keys.norm(p=1, dim=-1)  # (B, N)
    real = [n] * b if valid is None else valid.sum(1).tolist()  # each row's real tokens, read once
    for r, count in enumerate(real):
        if count < keep:
            raise TokensieveError(f"dart: row {r} has {count} real tokens, fewer than the {keep} to keep")
    if valid is not None:
        norms = norms.masked_fill(~valid, -torch.inf)
    image_pivots = norms.topk(pivot_image_tokens, dim=1).indices  # (B, P_i) by decreasing norm
    vectors = [states.gather(1, image_pivots[..., None].expand(-1, -1, states.shape[2]))]
    where = [positions.gather(1, image_pivots)]
    if pivot_text_tokens:
        asked = question_valid.sum(1).tolist()
        for r, count in enumerate(asked):
            if count < pivot_text_tokens:
                raise TokensieveError(f"dart picks {pivot_text_tokens} text pivots among the tokens after the "
                                      f"image, but row {r} has only {count}")
        text_pivots = topk_among(question_keys.norm(p=1, dim=-1), question_valid, asked, pivot_text_tokens)
        vectors.append(question_states.gather(1, text_pivots[..., None].expand(-1, -1, question_states.shape[2])))
        where.append(question_positions.gather(1, text_pivots))
    vectors = unit_vectors(torch.cat(vectors, 1))  # (B, P, d) image pivots first, each group by decreasing norm
    # The reference iterates a Python set of the pivots' positions, image pivots added first, each
    # group by decreasing norm: that order decides which pivot gets a token two want. One read of
    # every row's positions builds each row's turns on the host.
    turns = []
    for row in torch.cat(where, 1).tolist():
        if len(set(row)) != pivots:
            raise TokensieveError("dart: the pivots' positions in the sequence must be distinct")
        turns.append([row.index(position) for position in set(row)])
    turns = torch.tensor(turns, device=states.device)  # (B, P) the pivot claiming at each turn
    free = torch.ones(b, n, dtype=torch.bool, device=states.device) if valid is None else valid.clone()
    free.scatter_(1, image_pivots, False)
    left = [count - pivot_image_tokens for count in real]  # each row's unclaimed tokens, known on the host
    kept, units = [image_pivots], unit_vectors(states)
    for turn, count in [*((t, per_pivot) for t in range(pivots)), *((t, 1) for t in range(extra))]:
        pivot = vectors.gather(1, turns[:, turn, None, None].expand(-1, 1, vectors.shape[2]))  # (B, 1, d)
        distance = -(pivot * units).sum(-1)  # (B, N) the released cosines, bit for bit
        claimed = topk_among(distance, free, left, count)  # among the unclaimed tokens, as released
        free.scatter_(1, claimed, False)
        left = [m - count for m in left]
        kept.append(claimed)
    return torch.cat(kept, 1).sort(1).values


@register
@dataclass
class DART(Method):
    """DART as released for LLaVA: pivots by key L1 norm, then each pivot in turn claims the image
    tokens least similar to it (see the module docstring for the exact rule).

    pivot_image_tokens / pivot_text_tokens: pivots among the image tokens and among the text tokens
    after the image (the paper's 4 and 4). With ``keep`` tokens allowed, each pivot claims
    ``(keep - pivot_image_tokens) // (pivot_image_tokens + pivot_text_tokens)`` tokens, so a row may
    keep up to ``pivots - 1`` fewer than the budget (budget 132 = the paper's "128" setting, kept
    exactly). ``exact_budget`` (ours, off by default) fills those slots: the first pivots in
    claiming order take one more token each. A budget of all the tokens keeps them all.

    Needs, at ``llm.K`` (K >= 1): signals ``prev_layer_keys`` ``(B, N, d_k)`` (layer K-1's
    post-RoPE keys, heads concatenated), ``normed_states`` ``(B, N, d)`` (the states entering layer
    K through the model's final norm) and ``positions`` ``(B, N)`` (index in the row's unpadded
    sequence), and the same three as question signals over the text tokens.
    """

    pivot_image_tokens: int = 4
    pivot_text_tokens: int = 4
    exact_budget: bool = False

    name = "dart"
    paper = ("Wen, Gao, Wang, Zhang, Zhang, Li, He, Zhang. Stop Looking for Important Tokens in "
             "Multimodal Language Models: Duplication Matters More. EMNLP 2025. arXiv:2502.11494")
    stages = ("llm",)
    default_site = "llm.2"
    handles_video = True  # pivots and duplicates over the set of tokens, no grid assumed
    signals = ("prev_layer_keys", "normed_states", "positions")

    def __post_init__(self):
        for field in ("pivot_image_tokens", "pivot_text_tokens"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TokensieveError(f"dart: {field} must be a whole number of at least 0, got {value!r}")
        if self.pivot_image_tokens + self.pivot_text_tokens < 1:
            raise TokensieveError("dart needs at least one pivot (pivot_image_tokens + pivot_text_tokens >= 1)")
        if not isinstance(self.exact_budget, bool):
            raise TokensieveError(f"dart: exact_budget must be true or false, got {self.exact_budget!r}")

    def kept_count(self, available: int, keep: int) -> int:
        """The reference's count: the image pivots plus each pivot's whole quota."""
        if keep >= available or self.exact_budget:
            return keep
        pivots = self.pivot_image_tokens + self.pivot_text_tokens
        return self.pivot_image_tokens + pivots * ((keep - self.pivot_image_tokens) // pivots)

    def check(self, n_tokens: int, keep: int, site: str) -> None:
        if not site.startswith("llm.") or site == "llm.0":
            raise TokensieveError(f"dart reads the keys of the layer before its site: it acts at llm.k with "
                                  f"k >= 1, not {site}")
        if keep < min(self.pivot_image_tokens, n_tokens):
            raise TokensieveError(f"dart keeps its {self.pivot_image_tokens} image pivots: a budget of {keep} "
                                  f"tokens at {site} is below that")

    def select(self, inputs: SiteInputs) -> Selection:
        b, n, _ = inputs.tokens.shape
        if inputs.keep == n:
            return Selection(torch.arange(n, device=inputs.tokens.device).expand(b, n))
        text = {}
        if self.pivot_text_tokens:
            text = {"question_keys": inputs.question_signal("prev_layer_keys"),
                    "question_states": inputs.question_signal("normed_states"),
                    "question_positions": inputs.question_signal("positions"),
                    "question_valid": inputs.question()[1]}
        indices = dart_keep(inputs.signal("prev_layer_keys"), inputs.signal("normed_states"),
                            inputs.signal("positions"), inputs.keep, **text,
                            pivot_image_tokens=self.pivot_image_tokens, pivot_text_tokens=self.pivot_text_tokens,
                            exact_budget=self.exact_budget, valid=inputs.valid)
        return Selection(indices)  # kept_count(N, keep) of them: the reference's own count
