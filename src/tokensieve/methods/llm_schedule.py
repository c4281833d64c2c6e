"""What the methods that act at several LLM layers in turn (PyramidDrop, SparseVLM) share: their
``layers`` parameter, where their stages go, and whether positions close the gaps after a drop."""

from __future__ import annotations

from collections.abc import Callable

from tokensieve.errors import TokensieveError

POSITIONS = ("renumbered", "original")  # the papers' released code renumbers; "original" is ours


def checked_positions(name: str, positions: str) -> str:
    if positions not in POSITIONS:
        raise TokensieveError(f"{name}: positions {positions!r} is not one of {', '.join(POSITIONS)}")
    return positions


def checked_layers(name: str, layers) -> tuple[int, ...] | None:
    """``layers`` as a tuple of increasing layer numbers >= 1 (None: the paper's, by depth)."""
    if layers is None:
        return None
    layers = tuple(layers)
    if not layers or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in layers) \
            or list(layers) != sorted(set(layers)):
        raise TokensieveError(f"{name}: layers {layers!r} must be increasing layer numbers >= 1")
    return layers


def stage_layers(name: str, layers: tuple[int, ...] | None, paper_layers: Callable[[int], tuple[int, ...]],
                 site: str, depth: int | None) -> tuple[int, ...]:
    """The layers a schedule method's stages go before: ``layers``, or the paper's for an LLM of
    ``depth`` layers. ``site`` must be ``"llm"`` or the first of them; all must fit the depth."""
    if layers is None and depth is None:
        raise TokensieveError(f"{name} places its stages by the LLM's depth: give layers=(...) where there is "
                              "no model to read it from")
    layers = layers if layers is not None else paper_layers(depth)
    if site not in ("llm", f"llm.{layers[0]}"):
        raise TokensieveError(f"{name} acts at its layers {', '.join(map(str, layers))}, not at one site ({site}); "
                              "choose them with layers=(...)")
    if depth is not None and layers[-1] >= depth:
        raise TokensieveError(f"{name}: stage layers {', '.join(map(str, layers))} go past the LLM's {depth} "
                              f"layers (llm.1 .. llm.{depth - 1})")
    return layers
