"""Built-in reduction methods; importing this package registers them."""

from tokensieve.methods import random_keep  # noqa: F401
from tokensieve.methods import tome  # noqa: F401
from tokensieve.methods import divprune  # noqa: F401
from tokensieve.methods import dart  # noqa: F401
from tokensieve.methods import fastv  # noqa: F401
from tokensieve.methods import visionzip  # noqa: F401
from tokensieve.methods import prumerge  # noqa: F401
from tokensieve.methods import fastervlm  # noqa: F401
from tokensieve.methods import vispruner  # noqa: F401
from tokensieve.methods import anchor  # noqa: F401
from tokensieve.methods import token_merger  # noqa: F401
from tokensieve.methods import layer_pruner  # noqa: F401
from tokensieve.methods import cdpruner  # noqa: F401
from tokensieve.methods import pyramiddrop  # noqa: F401
from tokensieve.methods import sparsevlm  # noqa: F401
