"""Model forwards run through ``torch.compile`` (``tokensieve bench speed --compile``).

The pruning hooks sit on the modules' submodules, so compiling a module's ``forward`` traces them
with it: with the vision tower's, the projector's and the model's forwards compiled, the pruned
prefill and the unpruned one (the same forwards, hooks disabled) run compiled, as the native
bound does, and compare like with like.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from tokensieve.errors import TokensieveError


@contextlib.contextmanager
def compiled_forwards(modules: Sequence[torch.nn.Module], backend: str = "inductor") -> Iterator[None]:
    """Each module's ``forward`` replaced in place by its ``torch.compile``'d self (default mode)
    inside the block. After it the eager forwards are back and dynamo's caches are cleared: the
    next case (other hooks, other shapes) compiles afresh instead of piling recompilations up to
    dynamo's limit, past which it would silently run eager."""
    if not torch._dynamo.is_dynamo_supported():
        raise TokensieveError("--compile: torch.compile is not supported by this Python or torch build")
    eager = [(m, m.forward, "forward" in vars(m)) for m in modules]  # own: an instance attribute already
    for module, forward, _ in eager:
        module.forward = torch.compile(forward, backend=backend)
    try:
        yield
    finally:
        for module, forward, own in eager:
            if own:
                module.forward = forward
            else:
                del module.forward
        torch.compiler.reset()


def first_call_seconds(fn: Callable[[], object], backend: str) -> float:
    """Seconds of ``fn()``'s first call, where a compiled function compiles; a backend that cannot
    compile here (inductor on a CPU with no C compiler) ends in one line."""
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InductorError

    started = time.perf_counter()
    try:
        with torch.no_grad():
            fn()
    except (BackendCompilerFailed, InductorError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TokensieveError(f"--compile: torch.compile's {backend} backend cannot compile here: {reason[:200]}") from err
    return time.perf_counter() - started
