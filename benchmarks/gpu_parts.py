"""Where a GPU profile's time goes: the GPU target case (LSTM, H=256, B=32, T=10000, float32)
split into its parts, each against the fused torch.nn forward+backward, in one run.

    python3 benchmarks/gpu_parts.py            # on a machine with a CUDA device
    python3 benchmarks/gpu_parts.py --trace    # and torch.profiler's busiest ops

Rows: the adjoint by each GPU plan (engine.GPU_PLANS: the fused kernel's backward in float64
blocks of 256, or of 512 lifted 77 decades; the closed-form loop, its blocks replayed from
CUDA graphs), then the fastest of them (--pick FILE writes its name, for benchmarks/run.py
--gpu-adjoint), the kernel as on a CPU, and the loop eager; the trajectory
alone; the forward probes (exact, on 2 sequences; and from 16 random directions) with their
slices replayed from CUDA graphs, as planned for a GPU and as on a CPU (float32 tangents,
shorter chunks), also with the LSTM's gate blocks not folded into per-sample matrices first,
and run eager. With --trace, torch.profiler's busiest ops of a shorter run
(also written to $OUT/trace.txt where $OUT is set). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from run import B, fused_step, machine, setup, side_by_side, timed

import gradscope.cudagraphs as cudagraphs
import gradscope.engine as engine
import gradscope.linear as linear
from gradscope.engine import measure
from gradscope.probes import PROBES, probes_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", default="lstm", choices=["lstm", "rnn"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--trace", action="store_true", help="torch.profiler's top ops too")
    parser.add_argument("--trace-steps", type=int, default=2000, help="T of the traced run")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script")
    parser.add_argument("--pick", metavar="FILE",
                        help="write the fastest GPU adjoint's name (engine.GPU_PLANS) here")
    args = parser.parse_args()
    cell, H, T, device = args.cell, args.hidden, args.steps, args.device
    step = fused_step(cell, H, T, device, torch.float32)
    base = timed(step, 2, device)
    built = setup(cell, H, T, device, "float32")
    full = built.model.unroll(built.batch)
    sub = built.model.unroll(built.batch.take(args.samples))
    adjoint = [PROBES.get("adjoint")]
    forward = [PROBES.get(n) for n in probes_for(built.model.cell.parts) if n != "adjoint"]

    def row(name, fn, repeats=2):  # each part timed alternately with the fused baseline
        t_base, seconds = side_by_side(step, fn, repeats, device)
        print(f"| {name} | {seconds:.3f} | {seconds / t_base:.2f}x |", flush=True)
        return seconds / t_base

    print(f"machine: {machine(device)}; torch {torch.__version__}; {cell} H={H} B={B} T={T} "
          f"float32; forward probes on {args.samples} sequences\n")
    print("| part | seconds | / fused fwd+bwd |\n|---|---|---|")
    print(f"| fused torch.nn forward+backward | {base:.3f} | 1.00x |", flush=True)
    planned = engine.GPU_ADJOINT
    times = {}
    for name, plan in engine.GPU_PLANS.items():  # the GPU adjoint's candidates
        engine.GPU_ADJOINT = name
        how = "closed-form loop, blocks replayed from CUDA graphs" if plan is None else \
            f"fused kernel's backward, blocks of {plan.length}, " \
            f"{str(plan.dtype).removeprefix('torch.')}" + (f", lifted {plan.lift:g} decades"
                                                            if plan.lift else "")
        default = " (the default)" if name == planned else ""
        times[name] = row(f"adjoint, GPU plan '{name}'{default}: {how}",
                          lambda: measure(full, adjoint))
    engine.GPU_ADJOINT = planned
    fastest = min(times, key=times.get)
    print(f"| fastest GPU adjoint: '{fastest}' | | {times[fastest]:.2f}x |", flush=True)
    if args.pick:
        Path(args.pick).write_text(fastest + "\n")
    plan = engine._fused_plan
    engine._fused_plan = lambda u: engine.FusedPlan(engine.CHUNK, torch.float32)
    row("adjoint, fused kernel's backward, as on a CPU (blocks of 64, float32)",
        lambda: measure(full, adjoint, fused=True))
    engine._fused_plan = plan
    cudagraphs.ENABLED = False
    row("adjoint, closed-form loop, eager", lambda: measure(full, adjoint, fused=False))
    cudagraphs.ENABLED = True
    row("trajectory (fused kernel; LSTM: cell-state scan)", lambda: engine.trajectory(sub))
    row("forward probes, CUDA graphs (GPU plan: float64 tangents, chunks of 256)",
        lambda: measure(sub, forward))
    forward_plan = engine._forward_plan
    engine._forward_plan = lambda u: (engine.CHUNK, u.s0.dtype)
    row("forward probes, CUDA graphs, as on a CPU (float32 tangents, chunks of 64)",
        lambda: measure(sub, forward))
    engine._forward_plan = forward_plan
    stacked = engine.STACKED_GPU
    engine.STACKED_GPU = 2**26
    row("forward probes, CUDA graphs, slices of at most 2**26 values (the plan before: 128 "
        "steps)", lambda: measure(sub, forward))
    engine.STACKED_GPU = stacked
    row("forward probes, CUDA graphs, 16 random directions",
        lambda: measure(sub, forward, projections=16))
    many = linear._many_directions
    linear._many_directions = lambda v, hidden: False
    row("forward probes, CUDA graphs, gate blocks not folded", lambda: measure(sub, forward))
    linear._many_directions = many
    cudagraphs.ENABLED = False
    row("forward probes, eager", lambda: measure(sub, forward), repeats=1)
    cudagraphs.ENABLED = True
    if args.trace:  # a shorter run: the same work per step, fewer events to sort
        from torch.profiler import ProfilerActivity, profile
        short = setup(cell, H, args.trace_steps, device, "float32")
        sub = short.model.unroll(short.batch.take(args.samples))
        full = short.model.unroll(short.batch)
        gpu = device == "cuda"
        with profile(activities=[ProfilerActivity.CPU]
                     + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
            measure(sub, forward)
            measure(full, adjoint)
            if gpu:
                torch.cuda.synchronize()
        events = prof.key_averages()
        tables = [events.table(sort_by="self_cpu_time_total", row_limit=25)]
        if gpu:
            tables.append(events.table(sort_by="self_device_time_total", row_limit=25))
        text = f"T = {args.trace_steps}\n" + "\n".join(tables)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "trace.txt").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
