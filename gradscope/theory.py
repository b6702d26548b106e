"""What theory predicts, next to what was measured.

For one model and its probe batch:

1. Lyapunov exponents of the forward dynamics by the QR (Benettin) method: k orthonormal
   directions pushed through every step Jacobian and re-orthonormalised by QR, the logs of
   R's diagonal summed (so nothing underflows), per sequence, then averaged over the batch.
   The largest, divided by ln 10, predicts the slope of ``jacobian`` (log10 per step).
2. Spectral facts of the recurrent matrix: spectral radius, largest singular value, and the
   Pascanu et al. (2013) bound ||dh_t/dh_0||_2 <= (gamma sigma_max)^t, gamma = max |phi'|.
   gamma sigma_max < 1 is sufficient for vanishing; > 1 is necessary for exploding.
3. Mean field, vanilla RNNs: q* solves q = sigma_w^2 E[phi(sqrt(q) z)^2] + s^2, with s^2 the
   variance of the input drive U x_t + b actually fed and sigma_w^2 = ||W||_F^2 / H; the
   per-step factor chi = sigma_w^2 E[phi'(sqrt(q*) z)^2] predicts the slope 1/2 log10 chi.
4. Gate product, LSTM and GRU: with a weak recurrence, dc_t/dc_0 (LSTM) or dh_t/dh_0 (GRU) is
   the product of the keep gates, so the slope is the mean log10 of the forget (update) gate.
5. Disagreement: a prediction agrees when |predicted - measured| <= MARGIN_ABS +
   MARGIN_REL * |measured| (log10 per step). A disagreement is itself a diagnostic: chaos,
   saturation, or an initialisation that is not what it claims to be.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .activations import ACTIVATIONS
from .engine import Unrolled, step_forward, trajectory
from .model import Model
from .summary import json_safe

MARGIN_ABS = 0.02  # log10 per step
MARGIN_REL = 0.25  # of the measured slope's magnitude
LN10 = math.log(10.0)


@dataclass(frozen=True)
class Prediction:
    name: str  # lyapunov | mean-field | gate-product
    probe: str  # the measured profile it predicts
    predicted: float  # slope, log10 per step
    measured: float | None
    agrees: bool | None  # None when there is nothing measured to compare with
    caveats: list[str] = field(default_factory=list)  # assumptions that do not hold


@dataclass(frozen=True)
class Theory:
    lyapunov: list[float]  # top-k exponents, ln per step, averaged over the batch
    spectral_radius: float | None  # of W_hh (vanilla RNN; None for gated cells)
    sigma_max: float  # largest singular value of W_hh (all gate blocks)
    gamma: float | None  # max |phi'| of the RNN's activation
    pascanu_slope: float | None  # log10(gamma sigma_max): the bound's slope per step
    pascanu_case: str  # which of the bound's conditions applies, in words
    bound_holds: bool | None  # measured jacobian <= sqrt(H) (gamma sigma_max)^t at every step
    mean_field: dict | None  # sigma_w2, s2, q_star, chi
    gate_mean: float | None  # mean keep-gate value along the run (LSTM f, GRU z)
    predictions: list[Prediction]

    def to_dict(self) -> dict:
        return json_safe(asdict(self))


def agrees(predicted: float, measured: float | None) -> bool | None:
    if measured is None or not math.isfinite(predicted):
        return None
    return abs(predicted - measured) <= MARGIN_ABS + MARGIN_REL * abs(measured)


# --- 1. Lyapunov exponents --------------------------------------------------------------------

def lyapunov(u: Unrolled, k: int, seed: int = 0) -> np.ndarray:
    """The top-k Lyapunov exponents (ln per step), each averaged over the batch; (S, k), each
    seed's, for a seed stack of S (``u.groups``), else (k,)."""
    states, bad = trajectory(u)
    T = states.shape[0] - 1
    B, S = u.s0.shape
    k = min(k, S)
    if T == 0:
        return np.full(k, np.nan) if u.groups == 1 else np.full((u.groups, k), np.nan)
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(S, k, generator=gen, dtype=torch.float64))[0]
    tangent = q.T.to(u.s0).expand(B, k, S).contiguous()  # (B, k, S)
    sums = torch.zeros(B, k, dtype=torch.float64, device=states.device)  # read once, at the end
    cache: list = []
    for t in range(1, T + 1):
        v = step_forward(u, states, t, tangent, cache)  # (B, k, S)
        q, r = torch.linalg.qr(v.mT)  # (B, S, k), (B, k, k)
        sums += torch.log(torch.diagonal(r, dim1=-2, dim2=-1).abs().double())
        tangent = q.mT.contiguous()
    exponents = (sums.cpu() / T).unflatten(0, (u.groups, -1)).mean(dim=1).numpy()  # (groups, k)
    exponents = np.sort(exponents, axis=-1)[:, ::-1]
    return exponents[0] if u.groups == 1 else exponents


# --- 3. mean field ----------------------------------------------------------------------------

_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(101)
_WEIGHTS = _WEIGHTS / math.sqrt(2 * math.pi)  # E[f(z)], z ~ N(0, 1)


def _gauss(phi, q: float) -> tuple[float, float]:
    """(E[phi(sqrt(q) z)^2], E[phi'(sqrt(q) z)^2]) by Gauss-Hermite quadrature."""
    a = torch.tensor(_NODES * math.sqrt(q), dtype=torch.float64, requires_grad=True)
    y = phi(a)
    (dy,) = torch.autograd.grad(y.sum(), a)
    w = torch.tensor(_WEIGHTS)
    return float((w * y.detach() ** 2).sum()), float((w * dy**2).sum())


def mean_field(phi, sigma_w2: float, s2: float) -> dict:
    """q*, chi and the predicted slope 1/2 log10 chi."""
    q, converged = 1.0, False
    for _ in range(1000):
        new = sigma_w2 * _gauss(phi, q)[0] + s2
        if not math.isfinite(new) or new > 1e12:
            break
        if abs(new - q) <= 1e-12 * max(1.0, q):
            q, converged = new, True
            break
        q = new
    chi = sigma_w2 * _gauss(phi, q)[1]
    return {"sigma_w2": sigma_w2, "s2": s2, "q_star": q if converged else None,
            "chi": chi, "slope": 0.5 * math.log10(chi) if chi > 0 else -math.inf}


# --- everything, for one built-in model -------------------------------------------------------

def predict(model: Model, u: Unrolled, measured: dict[str, float | None], *, k: int = 8,
            init: str = "", jacobian: np.ndarray | None = None,
            exponents: np.ndarray | None = None) -> Theory:
    """Theory for ``model`` on the recurrence ``u``; ``measured`` maps probe -> slope.
    ``exponents``: the top-k Lyapunov exponents, where already computed (for a seed stack)."""
    cell = model.cell
    H = cell.hidden
    w = cell.weight_hh.detach().double().cpu()
    sigma_max = float(torch.linalg.matrix_norm(w, ord=2))
    exps = lyapunov(u, k) if exponents is None else exponents
    predictions = [_lyapunov_prediction(exps, measured)]
    radius = gamma = pascanu = mf = gate_mean = None
    bound_holds = None
    if cell.keep_gate is None:  # vanilla RNN
        radius = float(torch.linalg.eigvals(w).abs().max())
        gamma = ACTIVATIONS.get(cell.activation).gamma
        pascanu = math.log10(gamma * sigma_max) if gamma * sigma_max > 0 else -math.inf
        case = ("gamma sigma_max < 1: vanishing is guaranteed" if gamma * sigma_max < 1 else
                "gamma sigma_max >= 1: exploding is possible (necessary condition met), "
                "vanishing is not ruled out")
        if jacobian is not None:
            t = np.arange(1, len(jacobian) + 1)
            bound = 0.5 * math.log10(H) + t * pascanu
            ok = np.isnan(jacobian) | (jacobian <= bound + 1e-9)
            bound_holds = bool(ok.all())
        xs = u.xs[:].detach().double()
        s2 = float(((xs + cell.bias_hh.detach().double()) ** 2).mean())
        mf = mean_field(ACTIVATIONS.get(cell.activation).fn, float((w**2).sum() / H), s2)
        caveats = []
        if init in ("identity", "orthogonal"):
            caveats.append(f"{init} W is not i.i.d. Gaussian, as mean field assumes")
        if H < 64:
            caveats.append(f"H = {H} is small: mean field holds as H -> infinity")
        if mf["q_star"] is None:
            caveats.append("no finite fixed point q*: chi taken where the iteration stopped")
        predictions.append(Prediction("mean-field", "jacobian", mf["slope"],
                                      measured.get("jacobian"),
                                      agrees(mf["slope"], measured.get("jacobian")), caveats))
    else:
        case = "gated cell: the bound on W_hh alone does not apply"
        gate_mean, slope = _gate_product(model, u)
        probe = "jacobian_c" if "c" in cell.parts else "jacobian"
        ratio = sigma_max * 0.25  # |d gate / d h| <= 1/4 sigma_max
        caveats = [] if ratio < 0.1 else [
            f"recurrence not weak: sigma_max(W_hh)/4 = {ratio:.2f} (gates pass gradient too)"]
        predictions.append(Prediction("gate-product", probe, slope, measured.get(probe),
                                      agrees(slope, measured.get(probe)), caveats))
    return Theory([float(x) for x in exps], radius, sigma_max, gamma, pascanu, case,
                  bound_holds, mf, gate_mean, predictions)


def predict_module(u: Unrolled, measured: dict[str, float | None], *, k: int = 8) -> dict:
    """Theory for a user's own module, whose weights gradscope does not interpret: the top-k
    Lyapunov exponents of its recurrence ``u``, the largest predicting the slope of
    ``jacobian`` (``measured`` maps probe -> slope). As ``Theory.to_dict``'s keys, where they
    apply."""
    exps = lyapunov(u, k)
    caveats = []
    if any("@" in part for part in u.parts):
        caveats.append("stacked layers: the largest exponent may be a deeper layer's, while "
                       "jacobian measures the first layer's h")
    prediction = _lyapunov_prediction(exps, measured, caveats)
    return json_safe({"lyapunov": [float(x) for x in exps], "predictions": [asdict(prediction)]})


def _lyapunov_prediction(exps: np.ndarray, measured: dict[str, float | None],
                         caveats: list[str] | None = None) -> Prediction:
    """The largest exponent (ln per step) over ln 10 against the measured slope of jacobian."""
    predicted = float(exps[0] / LN10)
    return Prediction("lyapunov", "jacobian", predicted, measured.get("jacobian"),
                      agrees(predicted, measured.get("jacobian")), caveats or [])


def _gate_product(model: Model, u: Unrolled) -> tuple[float, float]:
    """(mean keep gate, mean log10 keep gate) along the probe batch's trajectory."""
    cell = model.cell
    states, _ = trajectory(u)
    T = states.shape[0] - 1
    H = cell.hidden
    g = cell.gate_slice(cell.keep_gate)
    h_prev = states[:T, :, :H]  # (T, B, H): h_{t-1}
    a = u.xs[:T][..., g] + h_prev @ cell.weight_hh[g].T + cell.bias_hh[g]
    mask = torch.ones(a.shape[:2], dtype=torch.bool) if u.mask is None else u.mask[:T]
    gates = torch.sigmoid(a.double())[mask]  # ended sequences hold: leave them out
    return float(gates.mean()), float(torch.log10(gates).mean())
