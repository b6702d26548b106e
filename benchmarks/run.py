"""gradscope's benchmark: profile cost against naive per-timestep autograd and against the
fused torch.nn kernel's forward+backward, measured side by side in one run, as ratios.

    .venv/bin/python benchmarks/run.py            # the CPU target cases (a few minutes)
    .venv/bin/python benchmarks/run.py --full     # every case: LSTM, tanh RNN; H 128, 512;
                                                  # T 1000, 10000; and T = 1e6 memory
    .venv/bin/python benchmarks/run.py --device cuda --full
    .venv/bin/python benchmarks/run.py --device cuda --gpu-adjoint loop   # another GPU plan
    .venv/bin/python benchmarks/run.py --seeds     # seed stacks against one seed at a time
    .venv/bin/python benchmarks/run.py --train-paths   # training: step loop against kernel
    .venv/bin/python benchmarks/run.py --user-models   # `gradscope check` on torch.nn modules
    .venv/bin/python benchmarks/run.py --keep-freed-memory  # no run pays for fresh pages
    .venv/bin/python benchmarks/run.py --cases lstm:64:500,rnn:8:40 --no-memory  # other sizes

Prints a markdown table (paste it into docs/benchmarks.md). Not part of the test suite, which
only dry-runs it at toy sizes (tests/test_benchmarks.py) and judges no timing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch

import gradscope.engine as engine
from gradscope.config import RunConfig
from gradscope.engine import measure
from gradscope.model import build
from gradscope.probes import PROBES, layer_probes, probes_for

B = 32


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"


def wall_time(fn, device: str) -> float:
    """One call's wall time, the device's queued work included."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timed(fn, repeats: int, device: str) -> float:
    """The best of ``repeats`` wall times, after one warm-up."""
    fn()
    return min(wall_time(fn, device) for _ in range(repeats))


def keep_freed_memory() -> None:
    """Make glibc keep freed memory for reuse: no mmap for large blocks, no trimming, 1 GB of
    top pad (mallopt). Otherwise every allocation above its mmap threshold (at most 32 MB) is
    fresh pages from the system, zeroed on first touch: about half of the fused LSTM's time
    at H = 128, T = 1000 on the CPU (its workspace is 65 MB), and less of gradscope's."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)
            and libc.mallopt(m_top_pad, 2**30)):
        raise SystemExit("mallopt refused: --keep-freed-memory needs glibc")


def side_by_side(base, fn, repeats: int, device: str) -> tuple[float, float]:
    """(best time of ``base``, best of ``fn``), timed alternately after a warm-up of each: on a
    shared machine whose speed drifts during a run, both see the same stretch of it."""
    base(), fn()
    times = [(wall_time(base, device), wall_time(fn, device)) for _ in range(repeats)]
    return min(t for t, _ in times), min(t for _, t in times)


def fused_step(cell: str, H: int, T: int, device: str, dtype: torch.dtype):
    """One forward+backward of torch.nn's fused kernel of this size: the floor."""
    module = (torch.nn.LSTM(2, H) if cell == "lstm" else torch.nn.RNN(2, H)).to(device, dtype)
    x = torch.randn(T, B, 2, device=device, dtype=dtype)

    def step():
        module.zero_grad()
        out, _ = module(x)
        out[-1].sum().backward()

    return step


def setup(cell: str, H: int, T: int, device: str, dtype: str, batch: int = B, seed: int = 0):
    options = dict(cell=cell, hidden=H, batch=batch, seq_len=T, dtype=dtype, device=device,
                   seed=seed)
    built = build(RunConfig(**options), torch.device(device))
    built.model.requires_grad_(False)
    return built


def ours(cell: str, H: int, T: int, device: str, dtype: str, samples: int,
         projections: int) -> dict[str, tuple[float, float]]:
    """Each of gradscope's measurements, timed alternately with the fused forward+backward
    (``side_by_side``): name -> (seconds, ratio to the fused time beside it). "adjoint": as
    gradscope chooses its back end; "loop", "kernel": by the closed-form loop, by the fused
    kernel's backward; "exact": every probe, exact forward probes on ``samples`` sequences
    (NaN where that would take hours); "estimate": every probe, forward probes estimated from
    ``projections`` random directions on ``samples``; "fused": the best fused time of all."""
    base = fused_step(cell, H, T, device, getattr(torch, dtype))
    built = setup(cell, H, T, device, dtype)
    full = built.model.unroll(built.batch)
    adjoint = [PROBES.get("adjoint")]
    forward = [PROBES.get(n) for n in probes_for(built.model.cell.parts) if n != "adjoint"]
    sub = built.model.unroll(built.batch.take(samples))
    repeats = 5 if T <= 1000 else 2
    S = H * len(built.model.cell.parts)
    work = S * S * samples * T  # the exact forward probes' multiply-adds, about
    # best of as many runs as the fused baseline gets, where a run takes seconds, not minutes
    repeats_all = repeats if work <= 1e9 else 1
    runs = {
        "loop": (lambda: measure(full, adjoint, fused=False), repeats),
        "kernel": (lambda: measure(full, adjoint, fused=True), repeats),
        "adjoint": (lambda: measure(full, adjoint), repeats),
        "exact": (lambda: (measure(full, adjoint), measure(sub, forward)), repeats_all),
        "estimate": (lambda: (measure(full, adjoint),
                              measure(sub, forward, projections=projections)), repeats_all),
    }
    if device == "cpu" and work > 2e10:  # hours on a CPU: say so, skip it
        del runs["exact"]
    times = {"exact": (float("nan"), float("nan"))}
    floor = float("inf")
    for name, (fn, n) in runs.items():
        t_base, t = side_by_side(base, fn, n, device)
        times[name] = (t, t / t_base)
        floor = min(floor, t_base)
    times["fused"] = (floor, 1.0)
    return times


def naive(cell: str, H: int, T: int, device: str, dtype: str) -> float:
    """grad_h0 the way users write it by hand: one backward pass per t (O(T^2))."""
    built = setup(cell, H, T, device, dtype)
    model, batch = built.model, built.batch
    c = model.cell
    model.requires_grad_(False)

    def run():
        state = tuple(torch.zeros(B, H, device=device, dtype=getattr(torch, dtype),
                                  requires_grad=True) for _ in c.parts)
        xs = c.project(model.encode(batch.inputs))
        s, hs = state, []
        for t in range(T):
            s = c.step(xs[t], s)
            hs.append(s[0])
        losses = model.step_losses(torch.stack(hs), batch).mean(dim=1)
        for t in range(T):
            torch.autograd.grad(losses[t], state[0], retain_graph=True)

    return timed(run, 1, device)


def memory_case(T: int, device: str, probe: str = "jacobian", checkpoint: bool = False,
                cell: str = "rnn", fused: bool | None = None) -> dict:
    """Peak RSS of a one-probe run of length T, in a fresh process (VmHWM: getrusage's
    maximum would carry the parent's over the exec)."""
    code = (
        "import torch, json; from gradscope.config import RunConfig;"
        "from gradscope.model import build; from gradscope.engine import measure;"
        "from gradscope.probes import PROBES;"
        f"b = build(RunConfig(cell='{cell}', hidden=32, batch=4, seq_len={T}, dtype='float32',"
        f" device='{device}'), torch.device('{device}')); b.model.requires_grad_(False);"
        "import time; t = time.perf_counter();"
        f"measure(b.model.unroll(b.batch), [PROBES.get('{probe}')], checkpoint={checkpoint},"
        f" fused={fused});"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0];"
        "peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else"
        " int(hwm.split()[1]) / 1024;"
        "print(json.dumps({'seconds': time.perf_counter() - t, 'peak_rss_mb': peak}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


SEED_WORKLOADS = {  # what a sweep's run does, in parts
    "profile (all probes, theory)": {},
    "train 100 steps": {"steps": 100, "probes": ("adjoint",), "theory_k": 0},
    "train 100 steps + profiles": {"steps": 100, "profile_every": 50},
}


def seeds_case(cell: str, workload: dict, seeds: int, batch: int,
               dtype: str) -> tuple[float, float]:
    """(one seed at a time, one seed stack): seconds for ``seeds`` runs of H=32, T=200."""
    from dataclasses import replace

    from gradscope.batched import execute_seeds
    from gradscope.runner import execute

    base = RunConfig(cell=cell, hidden=32, seq_len=200, batch=batch, dtype=dtype, **workload)
    configs = [replace(base, seed=s) for s in range(seeds)]
    execute(configs[0]), execute_seeds(configs[:2])  # warm-up
    start = time.perf_counter()
    for config in configs:
        execute(config)
    alone = time.perf_counter() - start
    start = time.perf_counter()
    execute_seeds(configs)
    return alone, time.perf_counter() - start


def seeds_table(seeds: int, batch: int, threads: int, dtype: str) -> None:
    """With 1 thread, as a sweep's worker runs; with the machine's threads, as one command."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    print(f"\n| {seeds} seeds, H=32, T={200}, B={batch}, {dtype}, {threads} thread(s) | cell "
          "| one at a time (s) | one stack (s) | throughput ratio |")
    print("|---|---|---|---|---|")
    for name, workload in SEED_WORKLOADS.items():
        for cell in ("rnn", "lstm", "gru"):
            alone, stacked = seeds_case(cell, workload, seeds, batch, dtype)
            print(f"| {name} | {cell} | {alone:.2f} | {stacked:.2f} | {alone / stacked:.1f}x |",
                  flush=True)
    torch.set_num_threads(before)


def train_paths_table(threads: int) -> None:
    """One training step's forward+backward (H=32, T=200) by the step loop and by torch.nn's
    fused kernel, for one model and for a stack of 8 seeds (one kernel call per seed): what
    linear.kernel_trains_faster decides by."""
    from gradscope.batched import stack_models
    from gradscope.tasks import Batch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    print(f"\n| training step, H=32, T=200, {threads} thread(s) | cell | dtype | B per seed "
          "| seeds | loop (ms) | kernel (ms) | loop / kernel |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in ("float32", "float64"):
        for cell in ("rnn", "lstm", "gru"):
            for batch in (8, 32):
                builts = [setup(cell, 32, 200, "cpu", dtype, batch=batch, seed=s)
                          for s in range(8)]
                for seeds in (1, 8):
                    model = builts[0].model if seeds == 1 else \
                        stack_models([b.model for b in builts])
                    data = builts[0].batch if seeds == 1 else Batch.stack([b.batch for b in builts])
                    model.requires_grad_(True)
                    ms = {}
                    for kernel in (False, True):
                        model.kernel = kernel
                        ms[kernel] = 1e3 * timed(
                            lambda m=model, d=data: m.group_losses(d).sum().backward(), 5, "cpu")
                    print(f"| | {cell} | {dtype} | {batch} | {seeds} | {ms[False]:.1f} "
                          f"| {ms[True]:.1f} | {ms[False] / ms[True]:.2f}x |", flush=True)
    torch.set_num_threads(before)


def user_models_table() -> None:
    """What `gradscope check` measures on users' own torch.nn modules (T = 200, B = 8, the
    check's defaults, float64, its probe grad_h0 and every deeper layer's): by the built-in
    cells with the module's weights, a layer each (the fast back end), timed alternately with
    the same measurement by forward-mode AD through the module's step (the generic back end,
    which modules of the step protocol take)."""
    from dataclasses import replace

    from gradscope.usermodel import adapt, unroll

    print("\n| torch.nn module, T=200, B=8, float64 | layers | generic back end (s) "
          "| built-in cells (s) | speed-up |")
    print("|---|---|---|---|---|")
    torch.manual_seed(0)
    for kind in (torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN):
        for layers in (1, 2):
            a = adapt(kind(16, 128, num_layers=layers), "benchmark", torch.float64)
            probes = [PROBES.get("grad_h0"), *layer_probes(a.parts)]
            generic = unroll(replace(a, cells=()), seq_len=200, batch=8, seed=0,
                             input_size=None, device=torch.device("cpu"))
            fast = unroll(a, seq_len=200, batch=8, seed=0, input_size=None,
                          device=torch.device("cpu"))
            t_generic, t_fast = side_by_side(lambda u=generic, p=probes: measure(u, p),
                                             lambda u=fast, p=probes: measure(u, p), 3, "cpu")
            print(f"| {kind.__name__}(16, 128) | {layers} | {t_generic:.2f} | {t_fast:.2f} "
                  f"| {t_generic / t_fast:.1f}x |", flush=True)


def cases_arg(text: str) -> list[tuple[str, int, int]]:
    """'lstm:128:1000,rnn:8:40' -> [("lstm", 128, 1000), ("rnn", 8, 40)]."""
    try:
        cases = [(cell, int(H), int(T)) for cell, H, T in
                 (case.split(":") for case in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give CELL:H:T, comma-separated") from None
    if any(cell not in ("lstm", "rnn") or H < 1 or T < 2 for cell, H, T in cases):
        raise argparse.ArgumentTypeError(f"{text!r}: cells lstm or rnn, H >= 1, T >= 2")
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every case, not just the targets")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--samples", type=int, default=2,
                        help="sequences the Jacobian (forward) probes use")
    parser.add_argument("--projections", type=int, default=16,
                        help="random directions per part for the estimated forward probes")
    parser.add_argument("--memory", action="store_true", help="only the memory cases")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory cases")
    parser.add_argument("--seeds", action="store_true",
                        help="only seed stacks against one seed at a time (8 seeds)")
    parser.add_argument("--seed-batch", type=int, default=32,
                        help="sequences per seed in the --seeds cases")
    parser.add_argument("--seed-dtype", default="float32", choices=["float32", "float64"],
                        help="arithmetic of the --seeds cases (gradscope's runs default to "
                        "float64)")
    parser.add_argument("--seed-threads", type=int, default=1,
                        help="torch threads in the --seeds cases (a sweep's worker has 1)")
    parser.add_argument("--user-models", action="store_true",
                        help="only `gradscope check` on torch.nn modules: built-in cell or not")
    parser.add_argument("--train-paths", action="store_true",
                        help="only training's recurrence: step loop against fused kernel")
    parser.add_argument("--naive-t", type=int, default=200,
                        help="the naive baseline runs at this T and is scaled by (T/this)^2")
    parser.add_argument("--gpu-adjoint", default=engine.GPU_ADJOINT, choices=list(engine.GPU_PLANS),
                        help="the GPU's adjoint plan (engine.GPU_PLANS; benchmarks/gpu_parts.py "
                        "--pick names the fastest)")
    parser.add_argument("--cases", type=cases_arg, metavar="CELL:H:T,...",
                        help="these cases instead of the targets' (the tests' dry run: "
                             "rnn:8:40)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory (mallopt), so that no run pays for fresh "
                        "pages: the fused kernel's floor without that cost (CPU, Linux)")
    args = parser.parse_args()
    if args.keep_freed_memory:
        keep_freed_memory()
    engine.GPU_ADJOINT = args.gpu_adjoint
    dtype = "float32"
    if args.seeds or args.train_paths or args.user_models:
        print(f"machine: {machine(args.device)}; torch {torch.__version__}")
        if args.user_models:
            user_models_table()
        if args.train_paths:
            train_paths_table(args.seed_threads)
        if args.seeds:
            seeds_table(8, args.seed_batch, args.seed_threads, args.seed_dtype)
        return
    cases = [("lstm", 128, 1000), ("rnn", 128, 1000)]
    if args.full:
        cases = [(c, H, T) for c in ("lstm", "rnn") for H in (128, 512) for T in (1000, 10000)]
    if args.device == "cuda":
        cases = [("lstm", 256, 10000), *cases]
    cases = args.cases or cases
    memory = "glibc keeps freed memory" if args.keep_freed_memory else "glibc's default malloc"
    print(f"machine: {machine(args.device)}; torch {torch.__version__}; B = {B}; {dtype}; "
          f"forward probes on {args.samples} sequences, exact or from {args.projections} "
          f"random directions per part; {memory}; each ratio against the fused "
          "forward+backward timed alternately with it"
          + (f"; GPU adjoint '{args.gpu_adjoint}'" if args.device == "cuda" else "") + "\n")
    print("| cell | H | T | fused fwd+bwd (s) | adjoint (s) | adjoint / fused "
          "| adjoint by loop / kernel, each / fused | all, exact (s) | exact / fused "
          "| all, estimated (s) | estimated / fused | naive O(T^2) (s) | naive / exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cell, H, T in [] if args.memory else cases:
        t = ours(cell, H, T, args.device, dtype, args.samples, args.projections)
        t_naive = min(T, args.naive_t)
        slow = naive(cell, H, t_naive, args.device, dtype) * (T / t_naive) ** 2
        mark = "" if t_naive == T else f" (from T={t_naive}, x(T/{t_naive})^2)"
        everything = t["exact"][0]
        exact = "skipped (hours on a CPU) | -" if math.isnan(everything) else \
            f"{everything:.3f} | {t['exact'][1]:.2f}x"
        versus = "-" if math.isnan(everything) else f"{slow / everything:.0f}x"
        print(f"| {cell} | {H} | {T} | {t['fused'][0]:.3f} | {t['adjoint'][0]:.3f} | "
              f"{t['adjoint'][1]:.2f}x | {t['loop'][1]:.2f}x / {t['kernel'][1]:.2f}x | "
              f"{exact} | {t['estimate'][0]:.3f} | {t['estimate'][1]:.2f}x | "
              f"{slow:.1f}{mark} | {versus} |", flush=True)
    if args.no_memory:
        return
    lengths = (10_000, 100_000, 1_000_000) if args.full else (10_000, 100_000)
    memory = "peak GPU memory" if args.device == "cuda" else "peak RSS"
    print(f"\n| probe, rnn H=32 B=4 | T | seconds | {memory} (MB) |")
    print("|---|---|---|---|")
    for probe, checkpoint, fused_kernel, name in [
            ("jacobian", False, None, "jacobian (streamed)"),
            ("adjoint", False, False, "adjoint, stored trajectory, loop"),
            ("adjoint", False, True, "adjoint, fused kernel's graph"),
            ("adjoint", True, None, "adjoint, --checkpoint")]:
        for T in lengths:
            m = memory_case(T, args.device, probe, checkpoint, fused=fused_kernel)
            print(f"| {name} | {T} | {m['seconds']:.1f} | {m['peak_rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
