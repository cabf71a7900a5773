"""Memory of a Hugging Face distillation (experiments/hf_distill.py), computed from the two configs, not guessed.

    python benchmarks/hf_memory.py                                       # Qwen2.5-1.5B-Instruct -> Qwen2.5-0.5B
    python benchmarks/hf_memory.py --teacher checkpoints/T --student checkpoints/S --seq-len 2048 --batch 16
    python benchmarks/hf_memory.py --devices 8 --data 2                 # a mesh: 8 devices, 2-way data parallel

Per device, in GiB, for one train step of the recipe (AdamW, a frozen teacher):

* parameters: the student's in ``--param-dtype`` (float32 master weights), the teacher's in ``--teacher-dtype``;
* gradients: the student's, in its parameter dtype; optimizer: AdamW's two moments, float32;
* activations: what the student's backward keeps per token (no rematerialization): per block the inputs of
  both norms, q, k, v, the attention output, the SwiGLU's gate, up and product, the block output
  (``4d + (H + 2K)·hd + 3·d_ff`` values), the attention probabilities ``H·T`` per token unless
  ``--flash`` (a fused attention keeps none), and the logits: the student's and the teacher's ``V``
  values per token in float32 plus the softmax gradient (3 of them), none with ``--fused`` (the fused
  linear + divergence loss never materializes them); one micro-batch of ``batch / microbatches`` rows;
* the teacher's forward keeps nothing for backward: its peak is one block's activations (counted) and its
  logits (above).

On a mesh of ``--devices`` with ``--data``-way data parallelism, parameters, gradients and optimizer state
are sharded over every device (FSDP and tensor parallelism: ``devices`` ways), activations over the data
axis and, inside blocks, the model axis (``devices / data`` ways; logits split over the vocabulary).
The numbers are lower bounds of the arrays a step must hold: XLA's temporaries and fragmentation come on top.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxkd.models.hf import config_from_hf  # noqa: E402

GIB = 2 ** 30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

_QWEN25 = dict(model_type="qwen2", vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
               rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu")
#: Configs of released checkpoints (their config.json's numbers), usable without the weights.
PRESETS = {
    "Qwen2.5-0.5B": dict(_QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2),
    "Qwen2.5-1.5B-Instruct": dict(_QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                  num_attention_heads=12, num_key_value_heads=2),
    "Qwen2.5-7B-Instruct": dict(_QWEN25, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                tie_word_embeddings=False),
}


def load_config(name_or_path: str):
    if name_or_path in PRESETS:
        cfg = PRESETS[name_or_path]
    else:
        path = os.path.join(name_or_path, "config.json") if os.path.isdir(name_or_path) else name_or_path
        with open(path) as f:
            cfg = json.load(f)
    return config_from_hf(cfg, path=name_or_path)[1]


def block_values_per_token(config, seq_len: int, flash: bool) -> int:
    hd = config.head_dim
    values = 4 * config.d_model + (config.num_heads + 2 * config.num_kv_heads) * hd + 3 * config.d_ff
    return values + (0 if flash else config.num_heads * seq_len)


@dataclasses.dataclass
class Estimate:
    rows: list[tuple[str, float]]

    @property
    def total(self) -> float:
        return sum(b for _, b in self.rows)


def estimate(teacher, student, *, vocab: int, seq_len: int, batch: int, microbatches: int, devices: int, data: int,
             param_dtype: str, teacher_dtype: str, act_dtype: str, flash: bool, fused: bool) -> Estimate:
    model_ways = devices // data
    tokens = batch // microbatches * seq_len / data  # one micro-batch's tokens on a device's data shard
    p, t, a = BYTES[param_dtype], BYTES[teacher_dtype], BYTES[act_dtype]
    rows = [
        ("student parameters", student.num_params * p / devices),
        ("student gradients", student.num_params * p / devices),
        ("AdamW moments (float32)", 2 * student.num_params * 4 / devices),
        ("teacher parameters", teacher.num_params * t / devices),
        ("student activations", tokens * student.num_layers * block_values_per_token(student, seq_len, flash)
         * a / model_ways),
        ("teacher activations (one block)", tokens * block_values_per_token(teacher, seq_len, flash) * a / model_ways),
        ("logits (student, teacher, softmax gradient)", 0.0 if fused else 3 * tokens * vocab * 4 / model_ways),
    ]
    return Estimate([(name, b / GIB) for name, b in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="Qwen2.5-1.5B-Instruct", help=f"a checkpoint directory, config.json or "
                                                                          f"one of {sorted(PRESETS)}")
    parser.add_argument("--student", default="Qwen2.5-0.5B")
    parser.add_argument("--vocab", type=int, default=151665, help="the tokenizer's vocabulary (logits are cut to it)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--devices", type=int, default=8, help="the mesh's devices (one device is always shown too)")
    parser.add_argument("--data", type=int, default=8, help="data-parallel ways of the mesh (divides --devices)")
    parser.add_argument("--param-dtype", default="float32", choices=sorted(BYTES))
    parser.add_argument("--teacher-dtype", default="float32", choices=sorted(BYTES))
    parser.add_argument("--act-dtype", default="float32", choices=sorted(BYTES))
    parser.add_argument("--flash", action="store_true", help="a fused attention (no attention probabilities kept)")
    parser.add_argument("--fused", action="store_true", help="token_kd(fused=True): no logits materialized")
    args = parser.parse_args(argv)
    if args.devices % args.data or args.batch % args.microbatches or (args.batch // args.microbatches) % args.data:
        parser.error("--data must divide --devices, and --data the micro-batch (--batch / --microbatches)")
    teacher, student = load_config(args.teacher), load_config(args.student)
    common = dict(vocab=args.vocab, seq_len=args.seq_len, batch=args.batch, microbatches=args.microbatches,
                  param_dtype=args.param_dtype, teacher_dtype=args.teacher_dtype, act_dtype=args.act_dtype,
                  flash=args.flash, fused=args.fused)
    one = estimate(teacher, student, devices=1, data=1, **common)
    mesh = estimate(teacher, student, devices=args.devices, data=args.data, **common)
    print(f"teacher {args.teacher}: {teacher.num_params / 1e9:.3f}B parameters, {teacher.num_layers} layers; "
          f"student {args.student}: {student.num_params / 1e9:.3f}B, {student.num_layers} layers")
    print(f"batch {args.batch} x {args.seq_len} tokens in {args.microbatches} micro-batches; logits over {args.vocab} "
          f"tokens{'; fused attention' if args.flash else ''}{'; fused vocabulary loss' if args.fused else ''}\n")
    mesh_name = f"{args.devices} devices ({args.data} data x {args.devices // args.data} model), GiB each"
    print(f"| | 1 device, GiB | {mesh_name} |")
    print("|---|---:|---:|")
    for (name, a), (_, b) in zip(one.rows, mesh.rows):
        print(f"| {name} | {a:.2f} | {b:.2f} |")
    print(f"| **total** | **{one.total:.2f}** | **{mesh.total:.2f}** |")


if __name__ == "__main__":
    main()
