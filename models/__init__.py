"""The reference Transformer and the needle-in-a-haystack study built on longattn."""

from .tasks import TASKS, Batch, TaskConfig, make_batch
from .transformer import POSITIONAL, Transformer, TransformerConfig

__all__ = ["Transformer", "TransformerConfig", "POSITIONAL", "TaskConfig", "TASKS", "Batch", "make_batch"]
