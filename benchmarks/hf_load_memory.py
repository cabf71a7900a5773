"""Host memory of loading a Hugging Face checkpoint onto 8 simulated devices: sharded (``from_hf(path, mesh=)``,
each shard read from its slice of the memory-mapped file) against gathered (``from_hf(path)`` whole on one
device, then ``jax.device_put`` onto the mesh's shardings), and the sharded reads assembled by
``jax.make_array_from_callback`` (which reads all of a tensor's blocks on the host before putting any on a
device) instead of one block at a time.

    python benchmarks/hf_load_memory.py                      # a random ~280 MB float32 llama-style checkpoint
    python benchmarks/hf_load_memory.py --layers 24          # larger
    python benchmarks/hf_load_memory.py --tiny               # a smoke run (a few MB)
    python benchmarks/hf_load_memory.py --mesh fsdp=8 --rules default

The checkpoint (``config.json`` + ``model.safetensors``, tensors written one at a time) goes to a temporary
folder, or ``--dir``. Each load runs in a fresh process with ``--xla_force_host_platform_device_count=8``:
after importing jax and jaxkd and making the mesh, the process's resident memory is the baseline and its
peak is reset (``/proc/self/clear_refs``, Linux); the reported peak is ``VmHWM`` after the load minus that
baseline. On CPU the simulated devices' buffers are host memory, so the N bytes of the loaded arrays
themselves are part of the peak: the mesh (default fsdp 4 x tensor 2 with ``lm_logical_rules``) replicates
only the norm scales, so the loaded arrays hold about N. The criterion of the sharded load: a peak under
1.25 N plus the largest tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MB = 2 ** 20
MODES = ("sharded", "callback", "gathered")


def llama_config(args) -> dict:
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": args.vocab,
        "hidden_size": args.d_model, "intermediate_size": args.d_ff, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu", "rope_theta": 10000.0,
        "attention_bias": False, "mlp_bias": False, "dtype": "float32",
    }


def write_checkpoint(path: str, cfg: dict, seed: int = 0) -> tuple[int, int]:
    """config.json and a float32 model.safetensors of random tensors (one in memory at a time); returns
    (total bytes, largest tensor's bytes)."""
    import numpy as np

    from jaxkd.models.hf import _weight_map, config_from_hf

    _, config = config_from_hf(cfg)
    shapes = {}
    for name, _, shape, _, _ in _weight_map(config):
        shapes.setdefault(name, shape)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(seed)
    with open(os.path.join(path, "model.safetensors"), "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for shape in shapes.values():
            fh.write(rng.standard_normal(shape, dtype=np.float32).tobytes())
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    return offset, max(int(np.prod(s)) * 4 for s in shapes.values())


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(path: str, mode: str, mesh_axes: dict, rules_name: str) -> dict:
    """One load in this (fresh) process; its peak resident memory above the post-import baseline."""
    import jax

    from jaxkd import sharding
    from jaxkd.models import from_hf
    from jaxkd.models.lm import lm_logical_rules

    mesh = sharding.make_mesh(mesh_axes)
    rules = lm_logical_rules() if rules_name == "logical" else sharding.default_rules(mesh)
    jax.block_until_ready(jax.device_put(jax.numpy.zeros(8), sharding.replicated(mesh)))  # runtime up
    baseline = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:  # VmHWM := VmRSS now
        fh.write("5")
    start = time.perf_counter()
    if mode == "callback":  # the same reads, but every block of a tensor read before any is put on a device
        from jaxkd.models import hf

        def callback_entry(tensors, hf_name, to_jax, shape, dtype, named_sharding):
            def block(index):
                return hf._read_entry(tensors, hf_name, to_jax, shape, index).astype(dtype, copy=False)
            return jax.make_array_from_callback(shape, named_sharding, block, dtype=dtype)

        hf._sharded_entry = callback_entry
    if mode in ("sharded", "callback"):
        _, variables = from_hf(path, mesh=mesh, rules=rules)
        params = sharding.unbox(variables)
    else:
        _, variables = from_hf(path)
        shardings = sharding.boxed_shardings(variables, mesh, rules)
        params = jax.device_put(sharding.unbox(variables), shardings)
        jax.block_until_ready(params)
        del variables  # the single-device copy goes; only the sharded arrays stay
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    held = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
    return {"peak": _status("VmHWM") - baseline, "after": _status("VmRSS") - baseline, "held": held,
            "seconds": seconds}


def run_child(path: str, mode: str, args) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, "--dir", path,
                          "--mesh", args.mesh, "--rules", args.rules],
                         env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_mesh(text: str) -> dict:
    try:
        return {name: int(size) for name, size in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise SystemExit(f"--mesh takes axis=size pairs separated by commas, e.g. fsdp=4,tensor=2; got {text!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="a few-MB checkpoint (a smoke run)")
    parser.add_argument("--mesh", default="fsdp=4,tensor=2", help="the 8-device mesh's axes")
    parser.add_argument("--rules", default="logical", choices=("logical", "default"),
                        help="lm_logical_rules, or the mesh's default rules (big_vision's fsdp rule)")
    parser.add_argument("--dir", default=None, help="where the checkpoint is written (default: a temporary folder)")
    parser.add_argument("--child", default=None, choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.dir, args.child, parse_mesh(args.mesh), args.rules)))
        return
    if args.tiny:
        args.layers, args.vocab, args.d_model, args.d_ff, args.heads, args.kv_heads = 2, 512, 64, 128, 4, 2
    cfg = llama_config(args)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.dir or tmp
        os.makedirs(path, exist_ok=True)
        total, largest = write_checkpoint(path, cfg)
        rows = [(mode, run_child(path, mode, args)) for mode in MODES]
    bound = 1.25 * total + largest
    print(f"llama-style float32 checkpoint: {args.layers} layers, d_model {args.d_model}, d_ff {args.d_ff}, vocab "
          f"{args.vocab}; N = {total / MB:.1f} MB, largest tensor T = {largest / MB:.1f} MB; 8 simulated devices, "
          f"mesh {args.mesh}, {args.rules} rules\n")
    print("| load | arrays held (MB) | peak above baseline (MB) | peak / N | within 1.25 N + T "
          f"({bound / MB:.1f} MB) | resident after (MB) | seconds |")
    print("|---|---:|---:|---:|---|---:|---:|")
    names = {"sharded": "`from_hf(path, mesh=mesh)` (sharded, one block at a time)",
             "callback": "the same reads through `jax.make_array_from_callback` (a tensor's blocks all at once)",
             "gathered": "`from_hf(path)` then `jax.device_put` (gathered)"}
    for mode, r in rows:
        print(f"| {names[mode]} | {r['held'] / MB:.1f} | {r['peak'] / MB:.1f} | {r['peak'] / total:.2f} | "
              f"{'yes' if r['peak'] <= bound else 'no'} | {r['after'] / MB:.1f} | {r['seconds']:.2f} |")


if __name__ == "__main__":
    main()
