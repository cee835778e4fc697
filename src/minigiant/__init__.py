"""minigiant: turn a large language model into a small one you can run anywhere.

    import copy, minigiant
    model, tokenizer = minigiant.load("default")          # SmolLM2-135M-Instruct, embedded
    ctx = minigiant.Context(tokenizer=tokenizer, teacher=copy.deepcopy(model))
    minigiant.prune(model, minigiant.PruneConfig(target=0.6), ctx)
    minigiant.distill(model, minigiant.DistillConfig(minutes=10), ctx)
    minigiant.quantize(model, minigiant.QuantizeConfig(bits=4))
    minigiant.save(model, tokenizer, "my-mini-giant")

The verbs are imported here, eagerly: each shares its name with its subpackage (``minigiant.prune`` the
function, ``minigiant/prune/`` the folder), and only an import in this file guarantees the attribute is the
function. None of them imports transformers at module level, so this stays cheap.
"""

__version__ = "0.1.0"

from .artifact import save
from .context import Context
from .distill import DistillConfig, distill
from .errors import MinigiantError
from .evaluate import EvaluateConfig, evaluate
from .generate import generate
from .models.loading import load, load_tokenizer
from .pipeline import run
from .prune import PruneConfig, prune
from .quantize import QuantizeConfig, quantize
from .recipe import load_recipe
from .serve import serve

__all__ = [
    "Context", "DistillConfig", "EvaluateConfig", "MinigiantError", "PruneConfig", "QuantizeConfig",
    "distill", "evaluate", "generate", "load", "load_recipe", "load_tokenizer", "prune", "quantize", "run", "save", "serve",
]
