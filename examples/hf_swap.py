"""Swap longattn's attention into a Hugging Face model, fine-tune it, save it and load it back.

    python examples/hf_swap.py                          # a small random Llama, converted to SSMax
    python examples/hf_swap.py --normalizer entmax      # or to 1.5-entmax
    python examples/hf_swap.py --model PATH             # a causal LM of your own (its vocabulary must
                                                        # hold the task's tokens)

The task is multi-key retrieval (`longattn.models.tasks`): key-value pairs in filler, then a
question `QUERY key`; the model must answer with that key's value. The script prints the loss
and the needle accuracy before and after fine-tuning, then saves the model and checks that
`from_pretrained` restores the normalizer and every learned s. Under a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

import longattn.integrations.transformers as longattn_hf
from longattn.models.tasks import IGNORE, TaskConfig, make_batch

TASK = TaskConfig(n_filler=16, n_keys=16, n_values=16, distractor_every=8)


def small_llama() -> AutoModelForCausalLM:
    config = LlamaConfig(vocab_size=TASK.vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(config)


def batch(args, generator: torch.Generator):
    b = make_batch(args.task, args.batch, args.length, None, generator, TASK)
    return b.tokens, b.targets


def answers(model, tokens, targets):
    """The logits at the positions that predict an answer, and the answers (the task's targets
    sit at the predicting position, so no shift)."""
    asked = targets != IGNORE
    return model(tokens).logits[asked], targets[asked]


@torch.no_grad()
def evaluate(model, args) -> tuple[float, float]:
    """Loss and needle accuracy on held-out sequences (a fixed seed)."""
    model.eval()
    logits, answer = answers(model, *batch(args, torch.Generator().manual_seed(1234)))
    model.train()
    return F.cross_entropy(logits, answer).item(), (logits.argmax(-1) == answer).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a causal LM to load (a path or a hub name); default: a small Llama")
    parser.add_argument("--normalizer", default="ssmax", choices=["ssmax", "entmax", "sparsemax", "softmax"])
    parser.add_argument("--task", default="passkey", choices=["passkey", "multikey", "mqar"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.manual_seed(0)

    model = AutoModelForCausalLM.from_pretrained(args.model) if args.model else small_llama()
    # The one call: SSMax gets a learnable s per layer and head, started at 1 / ln(length) so that
    # s ln(n) is about 1 where it trains; the others need no parameter.
    learnable = args.normalizer == "ssmax"
    longattn_hf.convert(model, normalizer=args.normalizer, alpha=1.5,
                        length_scale="learnable" if learnable else None,
                        initial_length_scale=1 / math.log(args.length))
    print(f"converted to {args.normalizer}: attn_implementation={model.config._attn_implementation!r}, "
          f"config.longattn={model.config.longattn}")

    loss, accuracy = evaluate(model, args)
    print(f"before: loss {loss:.3f}, needle accuracy {accuracy:.1%}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.1)
    generator, start = torch.Generator().manual_seed(0), time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = F.cross_entropy(*answers(model, *batch(args, generator)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0:
            print(f"  step {step:4d}: train loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    loss, accuracy = evaluate(model, args)
    print(f"after:  loss {loss:.3f}, needle accuracy {accuracy:.1%}")

    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        loaded = longattn_hf.from_pretrained(path)
    same = evaluate(loaded, args) == (loss, accuracy)
    if learnable:
        s = torch.stack([layer.longattn_length_scale for layer in longattn_hf.attention_layers(loaded)])
        print("learned s per layer and head:\n", s.detach().numpy().round(3))
    print(f"saved and loaded: config.longattn={loaded.config.longattn}, same results: {same}")


if __name__ == "__main__":
    main()
