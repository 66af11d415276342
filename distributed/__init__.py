"""Context parallelism on `torch.distributed`: one sequence sharded across ranks, attention
exact for every normalizer (`context_parallel_attention`), the layouts it is sharded in
(`shard_sequence`, `gather_sequence`), and the settings a model runs it by (`ContextParallel`)."""

from .context_parallel import MODES, ContextParallel, context_parallel_attention
from .layout import LAYOUTS, gather_sequence, shard_sequence

__all__ = ["context_parallel_attention", "ContextParallel", "shard_sequence", "gather_sequence", "MODES",
           "LAYOUTS"]
