"""``lowrank adapter merge`` of a GPT-2-small-sized base: time and peak memory.

The base is GPT-2 small's state dict (124 M parameters in transformers'
layout: ``Conv1D`` weights stored ``(in, out)``, the tied ``lm_head``
left out as transformers saves it), random float32, written once to
``--dir`` and reused. The adapter is PEFT-shaped, ``r=16`` on the 12
``c_attn`` layers with ``fan_in_fan_out``, random float32 (B non-zero).

Each repetition runs the merge in a fresh Python process (``python -c``
calling :func:`lowrank.io.adapter.merge_adapter`), timed from this process
around the call inside it, with its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``). A fresh process that only
imports the module gives the interpreter's own footprint, printed beside it:
the merge's memory is the difference. The goal (issue 9) is memory bounded by
one tensor at a time, not by the file: far below the base's size.

    python benchmarks/bench_adapter.py                # 3 repetitions
    python benchmarks/bench_adapter.py --reps 5 --dir /var/tmp --dtype bfloat16
    python benchmarks/bench_adapter.py --dora         # and the same adapter with use_dora, side by side

With ``--dora`` each repetition also merges the same adapter with
``use_dora`` and a magnitude per output feature (each adapted weight is then
rescaled row by row, ``(m / ‖V‖_row)·V``), the two merges taking turns, and
the script prints the DoRA merge's time and memory over the LoRA merge's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmark the checkout this script lives in

from lowrank.io import save_safetensors  # noqa: E402

D, LAYERS, VOCAB, POSITIONS, RANK = 768, 12, 50257, 1024, 16


def gpt2_small_shapes() -> dict[str, tuple[int, ...]]:
    """GPT2LMHeadModel's state-dict shapes (GPT-2 small), without the tied lm_head."""
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (VOCAB, D),
        "transformer.wpe.weight": (POSITIONS, D),
    }
    for i in range(LAYERS):
        h = f"transformer.h.{i}"
        shapes |= {
            f"{h}.ln_1.weight": (D,), f"{h}.ln_1.bias": (D,),
            f"{h}.attn.c_attn.weight": (D, 3 * D), f"{h}.attn.c_attn.bias": (3 * D,),
            f"{h}.attn.c_proj.weight": (D, D), f"{h}.attn.c_proj.bias": (D,),
            f"{h}.ln_2.weight": (D,), f"{h}.ln_2.bias": (D,),
            f"{h}.mlp.c_fc.weight": (D, 4 * D), f"{h}.mlp.c_fc.bias": (4 * D,),
            f"{h}.mlp.c_proj.weight": (4 * D, D), f"{h}.mlp.c_proj.bias": (D,),
        }  # fmt: skip
    shapes |= {"transformer.ln_f.weight": (D,), "transformer.ln_f.bias": (D,)}
    return shapes


def write_base(path: Path) -> None:
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s, dtype=np.float32) * 0.02 for k, s in gpt2_small_shapes().items()}
    save_safetensors(path, tensors, {"format": "pt"})


def write_adapter(folder: Path, dora: bool = False) -> None:
    rng = np.random.default_rng(1)
    folder.mkdir(exist_ok=True)
    tensors = {}
    for i in range(LAYERS):
        key = f"base_model.model.transformer.h.{i}.attn.c_attn"
        tensors[f"{key}.lora_A.weight"] = rng.standard_normal((RANK, D), dtype=np.float32) * 0.02  # (r, in)
        tensors[f"{key}.lora_B.weight"] = rng.standard_normal((3 * D, RANK), dtype=np.float32) * 0.02  # (out, r)
        if dora:
            tensors[f"{key}.lora_magnitude_vector"] = rng.uniform(0.3, 0.8, 3 * D).astype(np.float32)  # (out,)
    save_safetensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"})
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 32, "target_modules": ["c_attn"], "fan_in_fan_out": True,
              "use_dora": dora}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))


CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from lowrank.io.adapter import merge_adapter
t = time.perf_counter()
if {merge!r}:
    merge_adapter({base!r}, {adapter!r}, {out!r}, dtype={dtype!r})
elapsed = time.perf_counter() - t
print(json.dumps({{"seconds": elapsed, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def run_child(merge: bool, base: Path, adapter: Path, out: Path, dtype: str) -> dict:
    code = CHILD.format(root=str(ROOT), merge=merge, base=str(base), adapter=str(adapter), out=str(out), dtype=dtype)
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the base is written once (default /tmp)")
    parser.add_argument("--dtype", default="keep", choices=("keep", "float32", "float16", "bfloat16"))
    parser.add_argument("--dora", action="store_true", help="also merge the adapter with use_dora, side by side")
    parser.add_argument("--write-base", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_base:
        write_base(Path(args.write_base))
        return

    folder = Path(args.dir)
    base = folder / "lowrank_bench_gpt2_small_base.safetensors"
    n_params = sum(int(np.prod(s)) for s in gpt2_small_shapes().values())
    if not base.is_file():
        print(f"writing the base once: {base} ({n_params / 1e6:.1f} M float32 parameters)")
        # in a child: memory a parent touched before fork carries over into its children's ru_maxrss
        subprocess.run([sys.executable, __file__, "--write-base", str(base)], check=True)
    adapter = folder / "lowrank_bench_gpt2_small_adapter"
    write_adapter(adapter)
    out = folder / "lowrank_bench_gpt2_small_merged.safetensors"

    dora_adapter = folder / "lowrank_bench_gpt2_small_dora_adapter"
    if args.dora:
        write_adapter(dora_adapter, dora=True)

    idle = run_child(False, base, adapter, out, args.dtype)
    runs, dora_runs = [], []
    for _ in range(args.reps):
        os.sync()
        runs.append(run_child(True, base, adapter, out, args.dtype))
        if args.dora:
            os.sync()
            dora_runs.append(run_child(True, base, dora_adapter, out, args.dtype))
    seconds = statistics.median(r["seconds"] for r in runs)
    peak = statistics.median(r["maxrss_kib"] for r in runs) / 1024
    base_mib, out_mib = base.stat().st_size / 2**20, out.stat().st_size / 2**20
    print(f"base: {n_params / 1e6:.1f} M parameters, {base_mib:.0f} MiB; adapter r={RANK} on {LAYERS} c_attn layers")
    print(f"adapter merge --dtype {args.dtype}: median {seconds:.2f} s over {args.reps} runs "
          f"({base_mib / seconds:.0f} MiB/s of base), output {out_mib:.0f} MiB")  # fmt: skip
    print(f"peak memory (ru_maxrss): {peak:.0f} MiB; a process that only imports lowrank.io.adapter: "
          f"{idle['maxrss_kib'] / 1024:.0f} MiB; the merge's own: {peak - idle['maxrss_kib'] / 1024:.0f} MiB, "
          f"{(peak - idle['maxrss_kib'] / 1024) / base_mib:.2f}x the base file")  # fmt: skip
    if args.dora:
        dora_seconds = statistics.median(r["seconds"] for r in dora_runs)
        dora_peak = statistics.median(r["maxrss_kib"] for r in dora_runs) / 1024
        print(f"DoRA merge (use_dora, same factors): median {dora_seconds:.2f} s, time DoRA / LoRA "
              f"{dora_seconds / seconds:.2f}; peak memory {dora_peak:.0f} MiB, DoRA - LoRA {dora_peak - peak:+.0f} MiB "
              f"(one c_attn weight in float64 is {D * 3 * D * 8 / 2**20:.0f} MiB)")  # fmt: skip
    out.unlink()


if __name__ == "__main__":
    main()
