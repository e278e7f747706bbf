"""Where the m2f_jax train step spends its time: one profiled step, XLA ops summed by name.

    python benchmarks/profile_train.py                 # Swin-T geometry, 384x384, batch 2
    python benchmarks/profile_train.py --top 40 --hlo /tmp/step.hlo

Runs the step of ``bench_train.py`` (same model, batch, optimizer and compiler options), warms
it up, traces ``--steps`` steps with ``jax.profiler`` and prints the ops by total thread time:
the HLO instruction, its share, the op's kind (the fusion's root or library call) and, from the
compiled HLO, its output shape and the model code it came from (``op_name`` metadata). Thread
time is summed over XLA's worker threads, so on 2 cores it is up to ~2x the wall time. ``--hlo``
writes the compiled HLO text, to read a fusion in full.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import _hf_model, jax_model  # noqa: E402
from bench_train import compiled_jax_step, make_batch  # noqa: E402


def _hlo_index(text: str):
    """instruction name -> (shape, op kind, op_name metadata) from compiled HLO text."""
    index = {}
    pattern = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+(?: \S+\))?) (\w[\w\-]*)\(")
    for line in text.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        name, shape, kind = m.groups()
        op = re.search(r'op_name="([^"]*)"', line)
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        index[name] = (shape[:60], kind + (f":{calls.group(1)}" if calls and kind == "fusion" else ""),
                       op.group(1) if op else "")
    return index


def _kind(name: str) -> str:
    return re.sub(r"[.\d]+$", "", name)  # "copy_bitcast_fusion.465" -> "copy_bitcast_fusion"


def _group(name: str, index) -> str:
    """instruction kind + model code with the layer indices folded: one group per layer type."""
    _, _, op = index[name]
    op = re.sub(r"(layers?|blocks|stages?)_\d+", r"\1_*", re.sub(r"^jit\(train_step\)/", "", op))
    return f"{_kind(name):24s} {op[-120:]}"


def _events(trace_dir: str):
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        sys.exit(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(max(files, key=os.path.getmtime)) as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--targets", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1, help="profiled steps (after one warm-up)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--hlo", help="write the compiled step's HLO text here")
    parser.add_argument("--xla-defaults", action="store_true", help="compile without train_compiler_options()")
    args = parser.parse_args()

    import jax

    from m2f_jax.training.train_step import TrainState, train_compiler_options

    module, params = jax_model(_hf_model())
    options = {} if args.xla_defaults else train_compiler_options()
    batch = make_batch(args.batch, args.size, args.targets, max_masks=max(args.targets, 1))
    compiled, optimizer, data, compile_s = compiled_jax_step(module, params, batch, options)
    print(f"compile {compile_s:.0f} s", file=sys.stderr)
    text = compiled.as_text()
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(text)
    index = _hlo_index(text)

    state = TrainState.create(params, optimizer.tx, 0)
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as trace_dir:
        t0 = time.perf_counter()
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                state, metrics = compiled(state, data)
                jax.block_until_ready(metrics)
        wall = (time.perf_counter() - t0) / args.steps
        events = _events(trace_dir)

    totals, counts = collections.Counter(), collections.Counter()
    for e in events:
        name = e["name"]
        if name in index:  # XLA ops only (not the runtime's own spans)
            totals[name] += e["dur"] / 1e6 / args.steps
            counts[name] += 1
    # one sweep over op start/end times: how many XLA ops run at once, and which op ran alone
    # (the other core idle) for how long
    marks = sorted([(e["ts"], 1, i) for i, e in enumerate(events) if e["name"] in index]
                   + [(e["ts"] + e["dur"], -1, i) for i, e in enumerate(events) if e["name"] in index])
    busy, alone, active, last = collections.Counter(), collections.Counter(), {}, marks[0][0]
    for ts, delta, i in marks:
        busy[len(active)] += ts - last
        if len(active) == 1:
            alone[next(iter(active.values()))] += (ts - last) / 1e6 / args.steps
        if delta > 0:
            active[i] = events[i]["name"]
        else:
            active.pop(i, None)
        last = ts
    span = sum(busy.values())
    kinds = collections.Counter()
    for name, t in totals.items():
        kinds[_kind(name)] += t
    total = sum(totals.values())
    print(f"\nwall {wall:.2f} s/step (profiled), XLA op thread time {total:.2f} s/step")
    print("ops running at once, share of the traced span: "
          + ", ".join(f"{k}: {100 * busy[k] / span:.1f}%" for k in sorted(busy)) + "\n")
    print("by instruction name prefix:")
    for kind, t in kinds.most_common(12):
        print(f"  {t:7.3f} s {100 * t / total:5.1f}%  {kind}")
    groups, group_counts = collections.Counter(), collections.Counter()
    for name, t in totals.items():  # the same code in every layer / block is one group
        key = _group(name, index)
        groups[key] += t
        group_counts[key] += 1
    alone_groups = collections.Counter()
    for name, t in alone.items():
        alone_groups[_group(name, index)] += t
    print(f"\ntop {args.top} groups while running alone ({sum(alone.values()):.2f} s/step in all):")
    for key, t in alone_groups.most_common(args.top):
        print(f"  {t:7.3f} s  {key}")
    print(f"\ntop {args.top} groups (instruction kind, model code with layer indices folded):")
    for key, t in groups.most_common(args.top):
        print(f"  {t:7.3f} s {100 * t / total:5.1f}% x{group_counts[key]:<4d} {key}")
    print(f"\ntop {args.top} ops:")
    for name, t in totals.most_common(args.top):
        shape, kind, op = index[name]
        print(f"  {t:7.3f} s {100 * t / total:5.1f}% x{counts[name] // args.steps:<3d} {name:32s} {shape:40s} "
              f"{kind[:40]:40s} {op[-110:]}")


if __name__ == "__main__":
    main()
