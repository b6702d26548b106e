"""GPU smoke test: --device cuda gives the CPU's numbers. Skipped without a CUDA device."""

import numpy as np
import pytest
import torch

import gradscope

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device here: this runs on the lent H100/H200 (see docs/benchmarks.md)")


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_cuda_matches_cpu(cell):
    options = dict(cell=cell, hidden=16, batch=4, seq_len=300, dtype="float64", theory_k=0)
    cpu = gradscope.run(device="cpu", **options)
    gpu = gradscope.run(device="cuda", **options)
    assert gpu.meta["device"].startswith("cuda")
    for name in cpu.profiles:
        np.testing.assert_allclose(gpu.profiles[name], cpu.profiles[name], atol=1e-8,
                                   err_msg=name)


def test_cuda_seed_stacks_and_checkpoints_match_cpu():
    from gradscope.batched import execute_seeds
    from gradscope.config import RunConfig

    options = dict(cell="lstm", hidden=16, batch=4, seq_len=300, dtype="float64", steps=3)
    cpu = gradscope.run(device="cpu", **options)
    stacked = execute_seeds([RunConfig(device="cuda", seed=s, **options) for s in (0, 1)])
    kept = gradscope.run(device="cuda", checkpoint=True, **options)
    for gpu in (stacked[0], kept):
        for name in cpu.profiles:
            np.testing.assert_allclose(gpu.profiles[name], cpu.profiles[name], atol=1e-8,
                                       err_msg=name)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
# gain 0.05: blocks leave float32's range, redone (the lifted plan's longer blocks there only)
@pytest.mark.parametrize(("gain", "plan"), [(1.0, "kernel"), (0.05, "kernel"),
                                            (0.05, "kernel-lifted")])
@pytest.mark.parametrize("task", ["adding", "language", "copy"])
def test_cuda_fused_adjoint_matches_the_cpu_loop(cell, gain, plan, task, monkeypatch):
    """The adjoint from cuDNN's own backward, by each kernel plan of engine.GPU_PLANS, against
    the CPU's closed-form loop, in float32, over many blocks; where sequences end early
    (language), each one's loss gradient enters cuDNN's backward at its own last step, and
    where the loss is read at every step (copy), each step's term at that step."""
    import gradscope.engine as engine
    from gradscope.config import RunConfig
    from gradscope.engine import measure
    from gradscope.probes import PROBES
    from gradscope.runner import build

    options = dict(cell=cell, hidden=32, batch=8, seq_len=1000, dtype="float32",
                   init="normal", gain=gain, task=task)

    def adjoint(device: str) -> np.ndarray:
        built = build(RunConfig(device=device, **options), torch.device(device))
        built.model.requires_grad_(False)  # the engine differentiates states only
        u = built.model.unroll(built.batch)
        return measure(u, [PROBES.get("adjoint")], fused=device == "cuda").log10["adjoint"]

    monkeypatch.setattr(engine, "GPU_ADJOINT", plan)
    np.testing.assert_allclose(adjoint("cuda"), adjoint("cpu"), rtol=0, atol=1e-3)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("projections", [None, 8])
def test_cuda_graphs_replay_the_eager_forward_pass(cell, projections, monkeypatch):
    """The forward probes' slices replayed from CUDA graphs (the default on a GPU) give the
    numbers of the same slices run eager, chunk after chunk, the shorter last one too."""
    import gradscope.cudagraphs as cudagraphs
    from gradscope.config import RunConfig
    from gradscope.engine import measure
    from gradscope.probes import PROBES, probes_for
    from gradscope.runner import build

    built = build(RunConfig(device="cuda", cell=cell, hidden=32, batch=4, seq_len=700,
                            dtype="float64"), torch.device("cuda"))
    built.model.requires_grad_(False)  # the engine differentiates states only
    u = built.model.unroll(built.batch)
    probes = [PROBES.get(n) for n in probes_for(built.model.cell.parts) if n != "adjoint"]
    captured, capture = [], cudagraphs.GraphedSteps._capture
    monkeypatch.setattr(cudagraphs.GraphedSteps, "_capture",
                        lambda self, *a: captured.append(a[1:]) or capture(self, *a))
    graphed = measure(u, probes, projections=projections).log10
    monkeypatch.setattr(cudagraphs, "ENABLED", False)
    eager = measure(u, probes, projections=projections).log10
    assert captured
    for name in eager:
        np.testing.assert_allclose(graphed[name], eager[name], rtol=0, atol=1e-12,
                                   err_msg=name)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_cuda_graphs_replay_the_eager_reverse_loop(cell, monkeypatch):
    """The closed-form adjoint loop's blocks replayed from CUDA graphs (on a GPU wherever the
    loop runs) give the eager loop's numbers, its shorter last chunk too (T = 700)."""
    import gradscope.cudagraphs as cudagraphs
    from gradscope.config import RunConfig
    from gradscope.engine import measure
    from gradscope.probes import PROBES
    from gradscope.runner import build

    built = build(RunConfig(device="cuda", cell=cell, hidden=32, batch=4, seq_len=700,
                            dtype="float64"), torch.device("cuda"))
    built.model.requires_grad_(False)
    u = built.model.unroll(built.batch)
    probes = [PROBES.get("adjoint")]
    captured, capture = [], cudagraphs.GraphedSteps._capture
    monkeypatch.setattr(cudagraphs.GraphedSteps, "_capture",
                        lambda self, *a: captured.append(self.method) or capture(self, *a))
    graphed = measure(u, probes, fused=False).log10["adjoint"]
    monkeypatch.setattr(cudagraphs, "ENABLED", False)
    eager = measure(u, probes, fused=False).log10["adjoint"]
    assert "pull" in captured
    np.testing.assert_allclose(graphed, eager, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("gain", [1.0, 0.05])  # 0.05: through hundreds of decades
def test_cuda_float32_forward_probes_match_the_cpu(cell, gain):
    """A float32 recurrence's forward probes on a GPU (float64 tangents through chunks of 256
    steps, CUDA graphs: engine._forward_plan) against the CPU's float32 pass."""
    from gradscope.config import RunConfig
    from gradscope.engine import measure
    from gradscope.probes import PROBES, probes_for
    from gradscope.runner import build

    options = dict(cell=cell, hidden=32, batch=4, seq_len=1000, dtype="float32",
                   init="normal", gain=gain)

    def forward(device: str) -> dict:
        built = build(RunConfig(device=device, **options), torch.device(device))
        built.model.requires_grad_(False)  # the engine differentiates states only
        probes = [PROBES.get(n) for n in probes_for(built.model.cell.parts) if n != "adjoint"]
        return measure(built.model.unroll(built.batch), probes).log10

    gpu, cpu = forward("cuda"), forward("cpu")
    for name in cpu:
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=0, atol=1e-3, err_msg=name)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("tapped", [True, False])
def test_cuda_training_loop_matches_the_cpu(cell, tapped, monkeypatch):
    """Training's loop (``Cell.recur``) on the GPU, a seed stack split by seed, with and
    without W_hh's gradient in one matmul: the CPU's states and gradients, in float64."""
    from gradscope import cells

    monkeypatch.setattr(cells, "TAPPED_ROWS", 64 if tapped else 0)
    torch.manual_seed(0)
    S, n, T = 2, 3, 50
    ref = cells.CELLS.get(cell)(2, 6).double()
    for attr in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        w = getattr(ref, attr)
        setattr(ref, attr, torch.nn.Parameter(torch.randn(S, *w.shape, dtype=w.dtype)))
    x = torch.randn(T, S * n, 2, dtype=torch.float64)
    target = torch.randn(T, S * n, 6, dtype=torch.float64)
    got = {}
    for device in ("cpu", "cuda"):
        model = ref.to(device)
        model.zero_grad()
        drive = model.drive(x.to(device)).unflatten(1, (S, n))
        state = tuple(p.unflatten(0, (S, n)) for p in model.initial_state(S * n))
        hs = model.recur(drive, state, grouped=True).flatten(1, 2)
        (hs * target.to(device)).sum().backward()
        got[device] = [hs.detach().cpu()] + [p.grad.cpu() for p in model.parameters()]
    for a, b in zip(got["cuda"], got["cpu"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layers", [1, 2])
def test_cuda_measures_users_torch_nn_modules_as_the_cpu(layers):
    """`gradscope check`'s measurement of a torch.nn LSTM on the GPU (its built-in cells: the
    fused kernel, cuDNN; stacked layers eager, float64 tangents) against the CPU."""
    from torch import nn

    from gradscope.engine import measure
    from gradscope.probes import PROBES, layer_probes, probes_for
    from gradscope.usermodel import adapt, unroll

    torch.manual_seed(0)
    a = adapt(nn.LSTM(3, 16, num_layers=layers), "gpu test", torch.float64)
    probes = [PROBES.get(n) for n in probes_for(a.parts)] + layer_probes(a.parts)
    got = {}
    for device in ("cpu", "cuda"):
        u = unroll(a, seq_len=300, batch=4, seed=0, input_size=None,
                   device=torch.device(device))
        got[device] = measure(u, probes).log10
    for name in got["cpu"]:
        np.testing.assert_allclose(got["cuda"][name], got["cpu"][name], atol=1e-8,
                                   err_msg=name)


def test_cuda_profiles_a_users_module_and_its_lyapunov_exponents_as_the_cpu():
    """`gradscope profile` whole on the GPU: every probe and the module's theory."""
    from torch import nn

    torch.manual_seed(0)
    module = nn.GRU(3, 16, num_layers=2)
    got = {d: gradscope.profile(module, seq_len=200, batch=4, device=d) for d in ("cpu", "cuda")}
    assert got["cuda"].meta["device"].startswith("cuda")
    for name in got["cpu"].profiles:
        np.testing.assert_allclose(got["cuda"].profiles[name], got["cpu"].profiles[name],
                                   atol=1e-8, err_msg=name)
    np.testing.assert_allclose(got["cuda"].theory["lyapunov"], got["cpu"].theory["lyapunov"],
                               atol=1e-8)
