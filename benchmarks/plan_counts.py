"""What depth and budget plans leave of Qwen3-Embedding 0.6B, 4B and 8B (and all-MiniLM-L6-v2), counted from the
published shapes on the meta device: no download, no weights, seconds.

For each model: the dense parameter count; a quarter of the layers removed; and, for a budget of 2x by
SparseModel.py's cost model (FLOPs per token at --budget_sequence_length), the frontier of plans the planner
chooses among: k layers removed and the fewest MLP channels per remaining layer that reach 2x (its ends and
quarters; the query heads a Qwen3 plan may also remove are left out here). Which point a real run takes depends on the scores (the least importance removed).
Parameters include the embedding table, which no plan touches (155M of Qwen3-Embedding-0.6B's 596M).

    python benchmarks/plan_counts.py [--sequence_length 256] [--target_speedup 2]
"""

from __future__ import annotations

import argparse

from transformers import BertConfig

from gaprune.budget import Shape
from gaprune.toy_models import QWEN3_EMBEDDING_SHAPES, qwen3_parameter_count

MINILM = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 12,
          "vocab_size": 30522}


def total_params(name: str, blocks: int, intermediate: int) -> int:
    if name == "all-MiniLM-L6-v2":
        import torch
        from transformers import BertModel

        config = BertConfig(**{**MINILM, "num_hidden_layers": blocks, "intermediate_size": intermediate})
        with torch.device("meta"):
            return sum(p.numel() for p in BertModel(config, add_pooling_layer=False).parameters())
    return qwen3_parameter_count({**QWEN3_EMBEDDING_SHAPES[name], "num_hidden_layers": blocks}, intermediate)


def shape_of(name: str) -> Shape:
    if name == "all-MiniLM-L6-v2":
        return Shape(6, 384, 1536, 12, 12, 32, gated=False)
    s = QWEN3_EMBEDDING_SHAPES[name]
    return Shape(s["num_hidden_layers"], s["hidden_size"], s["intermediate_size"], s["num_attention_heads"],
                 s["num_key_value_heads"], s["head_dim"], gated=True)


def speedup(shape: Shape, blocks: int, intermediate: int, sequence_length: int) -> float:
    return (shape.blocks * shape.block_flops(shape.intermediate, sequence_length)
            / (blocks * shape.block_flops(intermediate, sequence_length)))


def rows(name: str, sequence_length: int, target: float) -> list[tuple]:
    shape = shape_of(name)
    dense = total_params(name, shape.blocks, shape.intermediate)
    plans = [("dense", shape.blocks, shape.intermediate)]
    quarter = round(shape.blocks / 4)
    plans.append((f"{quarter} of {shape.blocks} layers", shape.blocks - quarter, shape.intermediate))
    frontier = []
    for removed in range(shape.blocks):
        kept = shape.blocks - removed
        width = next((w for w in range(shape.intermediate, shape.intermediate // 4 - 1, -1)
                      if speedup(shape, kept, w, sequence_length) >= target), None)
        if width is not None:
            frontier.append((f"{target:g}x: {removed} layers + {shape.intermediate - width} channels", kept, width))
        if width == shape.intermediate:
            break
    shown = {0, len(frontier) - 1, *(round(len(frontier) * f) for f in (0.25, 0.5, 0.75))}  # ends and quarters
    plans += [plan for i, plan in enumerate(frontier) if i in shown]
    out = []
    for label, kept, width in plans:
        params = total_params(name, kept, width)
        out.append((name, label, kept, width, speedup(shape, kept, width, sequence_length), params, params / dense))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequence_length", type=int, default=256)
    parser.add_argument("--target_speedup", type=float, default=2.0)
    parser.add_argument("--models", nargs="+", default=["all-MiniLM-L6-v2", *QWEN3_EMBEDDING_SHAPES])
    args = parser.parse_args()
    print(f"| model | plan | layers | MLP channels | predicted speedup ({args.sequence_length} tokens) "
          "| parameters | of dense | bfloat16 file |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for model, label, kept, width, fast, params, share in rows(name, args.sequence_length, args.target_speedup):
            print(f"| {model} | {label} | {kept} | {width} | {fast:.2f}x | {params / 1e6:,.0f}M | {share:.1%} "
                  f"| {2 * params / 1e9:.2f} GB |")


if __name__ == "__main__":
    main()
