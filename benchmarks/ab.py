"""gradscope against an earlier commit of itself: one measurement timed alternately, in one
process, with the code of both, so that both see the same stretch of a shared machine.

    .venv/bin/python benchmarks/ab.py REV forward --cell lstm --hidden 128 --samples 2
    .venv/bin/python benchmarks/ab.py REV adjoint --cell gru --task copy --hidden 128
    .venv/bin/python benchmarks/ab.py REV train --cell lstm --hidden 32 --seq-len 200 \\
        --task language --threads 1
    .venv/bin/python benchmarks/ab.py REV forward --cell rnn --hidden 32 --seq-len 200 \\
        --batch 8 --samples 8 --seeds 8 --threads 1     # a sweep's seed stack

REV is any git revision; its files are exported (git archive) into a temporary folder and
imported beside the working tree's; the two run alternately (``run.side_by_side``, best of
--repeats after a warm-up each). Prints one markdown row: the best time of each, their
ratio (this tree / REV), and the largest difference between the two profiles (log10). Not
part of the test suite.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from run import side_by_side

ROOT = Path(__file__).resolve().parent.parent


def load(root: Path) -> dict:
    """gradscope imported from ``root``: its modules, apart from any other copy's."""
    for name in [n for n in sys.modules if n == "gradscope" or n.startswith("gradscope.")]:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        return {name: importlib.import_module(f"gradscope.{name}")
                for name in ("batched", "config", "engine", "model", "probes", "tasks")}
    finally:
        sys.path.pop(0)


def export(rev: str, into: Path) -> Path:
    """The files of ``rev`` (git archive), unpacked under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "gradscope"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def workload(g: dict, args: argparse.Namespace):
    """(a call to time, what it measures: {name: log10 profile} or {})."""
    options = dict(cell=args.cell, hidden=args.hidden, batch=args.batch, seq_len=args.seq_len,
                   task=args.task, dtype=args.dtype, init=args.init, gain=args.gain,
                   device="cpu")
    builts = [g["model"].build(g["config"].RunConfig(**options, seed=s), torch.device("cpu"))
              for s in range(args.seeds)]
    model, batch = builts[0].model, builts[0].batch
    if args.seeds > 1:  # a seed stack, as sweeps run them (gradscope.batched)
        model = g["batched"].stack_models([b.model for b in builts])
        batch = g["tasks"].Batch.stack([b.batch for b in builts])
    if args.case == "train":
        model.requires_grad_(True)
        return lambda: model.group_losses(batch).sum().backward(), {}
    model.requires_grad_(False)
    probes = g["probes"]
    if args.case == "adjoint":
        u, chosen = model.unroll(batch), [probes.PROBES.get("adjoint")]
    else:
        u = model.unroll(batch.take(args.samples, args.seeds))
        chosen = [probes.PROBES.get(n) for n in probes.probes_for(u.parts) if n != "adjoint"]

    def run():
        if args.seeds == 1:
            return g["engine"].measure(u, chosen, projections=args.projections).log10
        every = g["engine"].measure_groups(u, chosen, projections=args.projections,
                                           seeds=list(range(args.seeds)))
        return {f"{name}, seed {s}": p.log10[name] for s, p in enumerate(every)
                for name in p.log10}

    return run, run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the earlier commit (any git revision)")
    parser.add_argument("case", choices=["forward", "adjoint", "train"],
                        help="forward probes, the adjoint, or one training step")
    parser.add_argument("--cell", default="lstm")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--task", default="adding")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--init", default="pytorch")
    parser.add_argument("--gain", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, default=1, help="a seed stack of this many")
    parser.add_argument("--samples", type=int, default=2,
                        help="sequences for forward probes (per seed)")
    parser.add_argument("--projections", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        runs, profiles = {}, {}
        for name, root in ((args.rev, export(args.rev, Path(tmp))), ("this tree", ROOT)):
            runs[name], profiles[name] = workload(load(root), args)
        old, new = side_by_side(*runs.values(), args.repeats, "cpu")
    first, second = profiles.values()
    diff = max((float(np.nanmax(np.abs(first[k] - second[k]))) for k in first), default=0.0)
    stack = f" x{args.seeds} seeds" if args.seeds > 1 else ""
    print(f"| {args.case} | {args.cell} | {args.task} | H={args.hidden} T={args.seq_len} "
          f"B={args.batch}{stack} {args.dtype} | {args.rev}: {old:.4f} s | this tree: {new:.4f} s "
          f"| {new / old:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
