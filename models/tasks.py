"""Synthetic retrieval tasks, generated from a seed: passkey, multi-key needle and MQAR.

Every sequence is a haystack followed by questions. A key-value pair is two adjacent tokens,
`key value`; a question is `QUERY key`, and the model must predict the value at the key's
position. The vocabulary is split into ranges so that the kinds never collide:

    0: QUERY | filler tokens | key tokens | value tokens

Decoys (`decoy_every`) make retrieval harder as the context grows: the needle's key again, but
followed by filler, so it matches the question on the key and only what follows tells it
apart; their number grows with the length.

`make_batch` returns the tokens, the targets (-100 where nothing is asked, as
`F.cross_entropy` ignores) and, per question, where the answer is predicted and where its
needle (the pair holding the asked key) sits in the haystack.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TASKS = ("passkey", "multikey", "mqar")
IGNORE = -100


@dataclass(frozen=True)
class TaskConfig:
    n_filler: int = 64          # filler tokens: the haystack's noise
    n_keys: int = 32            # key tokens; the asked ones are unique in their sequence, the rest repeat
    n_values: int = 32          # value tokens: the answers
    distractor_every: int = 8   # multikey: one distractor pair per this many tokens, so they grow with length
    mqar_every: int = 8         # mqar: one pair per this many tokens
    mqar_queries: int = 8       # mqar: questions at the end of each sequence
    decoy_every: int = 0        # multikey, mqar: one decoy per this many tokens (0: none), the
                                # needle's key followed by filler instead of a value

    def __post_init__(self):
        for name in ("n_filler", "n_keys", "n_values", "distractor_every", "mqar_every", "mqar_queries"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if not isinstance(self.decoy_every, int) or self.decoy_every < 0 or 0 < self.decoy_every < 4:
            raise ValueError(f"decoy_every must be 0 or an int >= 4; got {self.decoy_every!r}")
        if self.distractor_every < 4 or self.mqar_every < 4:
            raise ValueError("distractor_every and mqar_every must be >= 4 (pairs need room between them)")

    @property
    def vocab_size(self) -> int:
        return 1 + self.n_filler + self.n_keys + self.n_values

    @property
    def query(self) -> int:
        return 0

    def key_token(self, i):
        return 1 + self.n_filler + i

    def value_token(self, i):
        return 1 + self.n_filler + self.n_keys + i

    def pairs(self, task: str, length: int) -> int:
        """Key-value pairs in one sequence of `task` at `length`, needle included."""
        if task == "passkey":
            return 1
        if task == "multikey":
            return 1 + length // self.distractor_every
        return max(self.mqar_queries, length // self.mqar_every)

    def questions(self, task: str) -> int:
        return self.mqar_queries if task == "mqar" else 1


@dataclass
class Batch:
    tokens: torch.Tensor          # (B, L) int64
    targets: torch.Tensor         # (B, L) int64, IGNORE except at answer positions
    answer_pos: torch.Tensor      # (B, Q) position whose next-token prediction is the answer
    needle_pos: torch.Tensor      # (B, Q) position of the needle's key (its value follows)


def decoy_count(cfg: TaskConfig, task: str, length: int) -> int:
    """Decoys in one sequence: the plain passkey has none."""
    return length // cfg.decoy_every if cfg.decoy_every and task != "passkey" else 0


def check_task(task: str, length: int, depth: float, cfg: TaskConfig) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(map(repr, TASKS))}; got {task!r}")
    if not isinstance(length, int) or isinstance(length, bool):
        raise ValueError(f"length must be an int; got {length!r}")
    min_length = 6 + 3 * cfg.questions(task)
    if length < min_length:
        raise ValueError(f"length must be >= {min_length} for task {task!r}; got {length}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1]; got {depth!r}")
    n_q = cfg.questions(task)
    slots = (length - 3 * n_q + 1) // 2
    if cfg.pairs(task, length) + decoy_count(cfg, task, length) > slots:
        raise ValueError(
            f"length {length} is too short for task {task!r}: {cfg.pairs(task, length)} pairs and "
            f"{decoy_count(cfg, task, length)} decoys need more than its {slots} slots"
        )
    if cfg.questions(task) >= cfg.n_keys:
        raise ValueError(f"n_keys ({cfg.n_keys}) must exceed the questions per sequence ({n_q})")


def make_batch(task: str, batch: int, length: int, depth: float | None, generator: torch.Generator,
               cfg: TaskConfig = TaskConfig()) -> Batch:
    """`batch` sequences of exactly `length` tokens.

    - passkey: one pair in random filler, then `QUERY key`.
    - multikey (RULER-style): the needle pair plus `length // distractor_every` distractor pairs
      with other keys, then `QUERY key` for the needle.
    - mqar (Zoology): `length // mqar_every` pairs in filler, then `mqar_queries` questions
      `QUERY key value`, the last value left to predict; the first asks the needle.
    multikey and mqar add `length // decoy_every` decoys of the needle's key (none when 0).
    The needle's key sits at relative `depth` of the haystack (0: first token, 1: last pair),
    or at a uniformly random place when `depth` is None (training). Everything random comes
    from `generator`, so a seed fixes the batch.
    """
    check_task(task, length, 0.0 if depth is None else depth, cfg)
    n_q = cfg.questions(task)
    haystack = length - 3 * n_q + 1  # each question is QUERY key value, the last value omitted
    n_pairs = cfg.pairs(task, length)
    n_decoys = decoy_count(cfg, task, length)
    slots = haystack // 2  # pairs start at even offsets, so they never overlap

    tokens = 1 + torch.randint(cfg.n_filler, (batch, length), generator=generator)
    targets = torch.full((batch, length), IGNORE)
    answer_pos = torch.empty(batch, n_q, dtype=torch.long)
    needle_pos = torch.empty(batch, n_q, dtype=torch.long)
    for b in range(batch):
        if depth is None:
            needle_slot = int(torch.randint(slots, (1,), generator=generator))
        else:
            needle_slot = round(depth * (slots - 1))
        others = torch.randperm(slots - 1, generator=generator)[: n_pairs - 1 + n_decoys]
        others = others + (others >= needle_slot).long()  # every slot but the needle's
        decoys = others[n_pairs - 1 :] * 2
        starts = torch.cat((torch.tensor([needle_slot]), others[: n_pairs - 1])) * 2  # the needle is pair 0
        # The asked pairs (the needle first) get keys that no other pair holds; the other pairs
        # draw theirs, with repeats, from the rest, so a small key vocabulary serves any length.
        others_asked = 1 + torch.randperm(n_pairs - 1, generator=generator)
        asked = torch.cat((torch.zeros(1, dtype=torch.long), others_asked))[:n_q]
        perm = torch.randperm(cfg.n_keys, generator=generator)
        keys = perm[n_q:][torch.randint(cfg.n_keys - n_q, (n_pairs,), generator=generator)]
        keys[asked] = perm[:n_q]
        values = torch.randint(cfg.n_values, (n_pairs,), generator=generator)
        tokens[b, starts] = cfg.key_token(keys)
        tokens[b, starts + 1] = cfg.value_token(values)
        tokens[b, decoys] = cfg.key_token(keys[0])  # the needle's key, but no value after it

        for j, pair in enumerate(asked.tolist()):
            at = haystack + 3 * j  # QUERY at `at`, key at `at + 1`, value at `at + 2`
            tokens[b, at] = cfg.query
            tokens[b, at + 1] = cfg.key_token(keys[pair])
            if at + 2 < length:
                tokens[b, at + 2] = cfg.value_token(values[pair])
            targets[b, at + 1] = cfg.value_token(values[pair])
            answer_pos[b, j] = at + 1
            needle_pos[b, j] = starts[pair]
    return Batch(tokens, targets, answer_pos, needle_pos)
