"""The pruning that ``tokensieve clip-benchmark`` and the CLIP speed benchmark put in a ViT image
tower: its settings, attaching them to a ViT adapter, and the image tokens each block then runs on."""

from __future__ import annotations

from dataclasses import dataclass

from tokensieve.attach import Handle, attach
from tokensieve.backbones.stage_plan import merges_in_blocks, tokens_entering_merges
from tokensieve.errors import TokensieveError
from tokensieve.methods import create_method

DEFAULT_METHOD = "anchor"
VIT_METHODS = ("anchor", "random", "tome", "visionzip", "fastervlm", "vispruner")


@dataclass
class PruningSettings:
    """The pruning flags of ``tokensieve clip-benchmark eval``.

    Every method keeps ``k_anchors + top_m`` patch tokens (plus CLS) before each block in
    ``prune_layers`` (default: every block from 1 on); ``k_anchors``, ``top_m`` and ``alpha``
    are the anchor rule's own parameters, the other methods only take the budget.
    """

    enable_pruning: bool = False
    prune_method: str = DEFAULT_METHOD
    k_anchors: int = 10
    top_m: int = 50
    alpha: float = 0.5
    prune_layers: list[int] | None = None
    extract_attention: bool = False
    attention_output: str | None = None
    seed: int = 0

    def validate(self) -> None:
        """Refuse values that cannot work on any model (before anything is loaded)."""
        if self.prune_method not in VIT_METHODS:
            raise TokensieveError(f"--prune_method {self.prune_method!r} cannot act in a CLIP image tower; "
                                  f"choose one of {', '.join(VIT_METHODS)}")
        if self.k_anchors < 1:
            raise TokensieveError(f"--k_anchors {self.k_anchors}: need at least one anchor")
        if self.top_m < 0:
            raise TokensieveError(f"--top_m {self.top_m}: must be >= 0")
        if not 0 <= self.alpha <= 1:
            raise TokensieveError(f"--alpha {self.alpha} is not in [0, 1]")
        if self.prune_layers is not None and any(i < 1 for i in self.prune_layers):
            raise TokensieveError(f"--prune_layers {','.join(map(str, self.prune_layers))}: block 0 has no earlier "
                                  "attention to choose by; use blocks >= 1")

    @property
    def budget(self) -> int:
        return self.k_anchors + self.top_m

    def method_spec(self) -> dict:
        if self.prune_method == "anchor":
            return {"name": "anchor", "k_anchors": self.k_anchors, "top_m": self.top_m, "alpha": self.alpha}
        return {"name": self.prune_method}

    def record(self, backbone) -> dict:
        """What the result JSON says about the pruning."""
        layers = self.layers(backbone) if self.enable_pruning else []
        out = {"enabled": self.enable_pruning}
        if self.enable_pruning:
            out.update(method=self.method_spec(), keep_patch_tokens=self.budget, prune_layers=layers,
                       mode="hard", seed=self.seed)
        return out

    def layers(self, backbone) -> list[int]:
        return sorted(set(self.prune_layers)) if self.prune_layers else list(range(1, backbone.depth))


def attach_pruning(backbone, settings: PruningSettings) -> Handle:
    """Attach ``settings``' method before every block of its ``prune_layers`` of a ViT adapter
    (:func:`tokensieve.backbones.vit_adapters.vit_backbone`), or, for a method that merges inside
    blocks (ToMe), once at the first of them (it merges in every block from there on, as
    released); refuses budgets and blocks this tower does not have."""
    n = backbone.n_patches
    if settings.budget + 1 > n + 1:
        raise TokensieveError(f"k_anchors + top_m + 1 = {settings.k_anchors} + {settings.top_m} + 1 = "
                              f"{settings.budget + 1} is more than the {n + 1} tokens ({n} patches + CLS) of this "
                              f"model's image tower")
    layers = settings.layers(backbone)
    if layers[-1] >= backbone.depth:
        raise TokensieveError(f"--prune_layers {layers[-1]}: this image tower has blocks 0..{backbone.depth - 1}")
    method = create_method(settings.method_spec())
    if merges_in_blocks(method):
        layers = layers[:1]
    stages = [(method, f"vision.{i}", settings.budget) for i in layers]
    return attach(backbone, stages, mode="hard", seed=settings.seed)


def tokens_per_block(backbone, handle: Handle | None) -> list[int]:
    """Image tokens (CLS included) each block of the tower runs on with ``handle``'s stages."""
    n, counts, entering = backbone.n_patches, [], {}
    stages = {} if handle is None else {int(st.site.split(".")[1]): st for st in handle.stages}
    for i in range(backbone.depth):
        n = entering.get(i, n)
        if i in stages:
            st, keep = stages[i], stages[i].budget.resolve(n)
            if merges_in_blocks(st.method):  # each block runs on what the blocks before it left
                end = min((j for j in stages if j > i), default=backbone.depth)
                entering.update(tokens_entering_merges(st.method, n, keep, i, end))
            else:
                n = keep
        counts.append(n + 1)
    return counts
