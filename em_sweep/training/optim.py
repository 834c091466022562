"""AdamW for EM, and how its memory fits the card (``train.optimizer``).

The paper's update is AdamW with fp32 master weights (lr 2e-5). Its memory, per parameter:

| ``train.optimizer``  | weights | grads | master / compensation | m, v    | bytes | 7B (7.6e9 params) |
| -------------------- | ------- | ----- | --------------------- | ------- | ----- | ----------------- |
| ``adamw`` (bf16 model) | bf16  | bf16  | fp32 master           | fp32    | 16    | 122 GB: no 80 GB card |
| ``adamw_bf16_kahan`` | bf16    | bf16  | bf16 compensation     | bf16    | 10    | 76 GB: too tight on 80 GB |
| ``adamw_bf16_sr``    | bf16    | bf16  | none                  | bf16    | 8     | 61 GB: fits an 80 GB card |
| ``adamw_8bit``       | bf16    | bf16  | none (SR weights)     | 8-bit   | ~6    | 46 GB (needs torchao) |

(grads exist only between the loss pass and the update, so sampling sees 2 bytes less.)

Plain bf16 weights cannot take the update at all: near |w| = 0.02 one bf16 step is 1.2e-4,
so an AdamW step of about lr = 2e-5 rounds back to the old weight (tests/test_optim.py shows
most of the update vanishing). The two bf16 variants keep it:

- stochastic rounding (``adamw_bf16_sr``, the choice for 7B on one 80 GB card): the new
  weight is computed in fp32 and rounded up or down at random with the probabilities that
  make its expectation the fp32 value, so small updates land on average; states are rounded
  the same way. Unbiased; per-weight noise of at most one bf16 step.
- Kahan compensation (``adamw_bf16_kahan``): a bf16 buffer keeps what rounding dropped and
  adds it back next step: deterministic, closest to fp32 master, 2 more bytes a parameter.

Measured on a small bf16 Qwen2 (tests/test_optim.py), ten EM steps at lr 2e-5: the loss
falls by the same amount as with fp32-master AdamW within 1% (Kahan) and 10% (stochastic
rounding), while plain bf16 AdamW loses about two thirds of the decrease. Per weight,
Kahan's bf16 weights equal fp32-master's rounded weights (>98%); stochastic rounding's
differ by up to one bf16 step at random (unbiased: the mean over rounding seeds converges),
noise of the kind a same-size random update brings, which does not move EM's effect
(docs/method.md, section 6).

``auto`` (the default) keeps CPU behaviour: fp32 models get ``torch.optim.AdamW`` as before;
low-precision models get the most faithful variant whose bytes per parameter fit in 60% of
the device's memory: exact fp32-master ``adamw`` (16 B: 1.5B on 80 GB, 25 GB), else
``adamw_bf16_kahan`` (10 B: 7B on a 141 GB H200), else ``adamw_bf16_sr`` (8 B: 7B on one
80 GB H100). The resolved name is on the optimizer as ``optimizer.em_name``, to be recorded
with the run.
CPU offload of fp32 states (DeepSpeed's choice in the reference) is not offered: it moves
~30 GB over PCIe and ~180 GB through host memory each step for 7B, several seconds a step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch

from em_sweep.config import KNOWN_OPTIMIZERS

OPTIMIZERS = KNOWN_OPTIMIZERS
LOW_PRECISION = (torch.bfloat16, torch.float16)
# Elements per piece of a tensor in the eager bf16 update (CPU, or where compilation fails):
# bounds its fp32 and int64 temporaries (about ten, ~1 GB) whatever the embedding size. The
# compiled update needs no pieces: it is one fused kernel per tensor.
CHUNK = 1 << 24
# Share of device memory the weights, gradients and optimizer state may take under `auto`
# (the rest: KV cache, activations, the entropy pass's fp32 chunk).
AUTO_SHARE = 0.6


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor (or the tensor itself): updates are elementwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def local_numel(params: Iterable[torch.Tensor]) -> int:
    return sum(_local(p).numel() for p in params)


def resolve_optimizer_name(name: str, params: list[torch.Tensor], device_memory_bytes: int | None = None) -> str:
    """The concrete optimizer ``auto`` stands for on these parameters (see the module docstring)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"train.optimizer: unknown {name!r}; choose from {OPTIMIZERS}")
    if name != "auto":
        return name
    if not any(p.dtype in LOW_PRECISION for p in params):
        return "adamw"
    if device_memory_bytes is None:
        device = next((p.device for p in params), torch.device("cpu"))
        if device.type == "cuda":
            device_memory_bytes = torch.cuda.get_device_properties(device).total_memory
    n = local_numel(params)
    if device_memory_bytes is None or 16 * n <= AUTO_SHARE * device_memory_bytes:
        return "adamw"
    if not all(p.dtype == torch.bfloat16 for p in params):
        return "adamw"  # fp16 or mixed: only the master-weight variant handles them
    return "adamw_bf16_kahan" if 10 * n <= AUTO_SHARE * device_memory_bytes else "adamw_bf16_sr"


def make_adamw(params: Iterable[torch.Tensor], name: str = "auto", *, lr: float, betas: tuple[float, float],
               eps: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW in the memory strategy ``name`` (one of OPTIMIZERS); sets ``optimizer.em_name``."""
    params = [p for p in params if p.requires_grad]
    resolved = resolve_optimizer_name(name, params)
    kw: dict[str, Any] = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    opt: torch.optim.Optimizer
    if resolved == "adamw":
        if any(p.dtype in LOW_PRECISION for p in params):
            opt = MasterWeightAdamW(params, **kw)
        else:
            opt = torch.optim.AdamW(params, **kw)
    elif resolved in ("adamw_bf16_sr", "adamw_bf16_kahan"):
        opt = BF16AdamW(params, rounding="stochastic" if resolved == "adamw_bf16_sr" else "kahan", **kw)
    else:  # adamw_8bit
        try:
            from torchao.optim import AdamW8bit  # optional dependency
        except ImportError as e:
            raise ImportError("train.optimizer=adamw_8bit needs torchao (pip install torchao)") from e
        opt = AdamW8bit(params, bf16_stochastic_round=True, **kw)
    opt.em_name = resolved  # type: ignore[attr-defined]
    return opt


class MasterWeightAdamW(torch.optim.Optimizer):
    """Exact AdamW with fp32 master weights for low-precision parameters.

    ``torch.optim.AdamW`` runs on fp32 copies of the parameters (and fp32 copies of their
    gradients, made at step time); after each step the parameters receive the masters rounded
    to their dtype. The masters follow exactly the trajectory fp32 AdamW takes with these
    gradients. ``param_groups`` hyperparameters (e.g. ``lr`` set per step) are honoured.
    """

    def __init__(self, params: Iterable[torch.Tensor], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        super().__init__(list(params), dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.masters = [[p.detach().float().clone() for p in g["params"]] for g in self.param_groups]
        inner_groups = [dict(g, params=m) for g, m in zip(self.param_groups, self.masters, strict=True)]
        # fused=True is CUDA-only and faster; foreach elsewhere (torch's default) and for FSDP's
        # DTensors, which the fused kernel is not known to take on every torch version.
        flat = [m for ms in self.masters for m in ms]
        fused = (all(m.is_cuda for m in flat) and not any(_local(m) is not m for m in flat)) or None
        self.inner = torch.optim.AdamW(inner_groups, fused=fused)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("MasterWeightAdamW does not take a closure")
        for group, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            for key in ("lr", "betas", "eps", "weight_decay"):
                inner[key] = group[key]
            for p, m in zip(group["params"], inner["params"], strict=True):
                m.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        for group, masters in zip(self.param_groups, self.masters, strict=True):
            for p, m in zip(group["params"], masters, strict=True):
                if m.grad is not None:
                    p.copy_(m)
                    m.grad = None


def _noise16(index: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Uniform 16-bit integers [0, 2^16) from element indices and a 32-bit key: a counter-based
    hash (the 'lowbias32' integer mixer), so a fused kernel computes the noise where it is used
    instead of reading a random tensor from memory. Inputs int64, output int32."""
    x = (index + key) & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x7FEB352D & 0xFFFFFFFF
    x = ((x >> 15) ^ x) * 0x846CA68B & 0xFFFFFFFF
    x = (x >> 16) ^ x
    return (x >> 16).to(torch.int32)


def _round_with(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` to bf16, rounded away from zero with probability (dropped bits) / 2^16 given
    uniform 16-bit ``noise``: bf16 is the top half of fp32's bits, so adding the noise to the
    bit pattern and truncating is stochastic rounding. Non-finite values pass through."""
    bits = (x.view(torch.int32) + noise) & -65536  # 0xFFFF0000 as a signed int32
    rounded = bits.view(torch.float32).to(torch.bfloat16)  # exact: low bits are zero
    return torch.where(torch.isfinite(x), rounded, x.to(torch.bfloat16))


def _nearest_bf16_as_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded to the nearest bf16 value (ties to even), kept in fp32. Written as bit
    arithmetic because a compiled kernel elides the round trip ``x.to(bf16).float()`` (Inductor
    keeps fused intermediates in fp32), which would zero the Kahan compensation."""
    bits = x.view(torch.int32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return torch.where(torch.isfinite(x), bits.view(torch.float32), x)


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round fp32 ``x`` to bfloat16 up or down at random, E[result] = x (finite values)."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return _round_with(x, noise)


def bf16_adamw_update(w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, c: torch.Tensor | None,
                      hp: torch.Tensor, keys: torch.Tensor) -> None:
    """One AdamW update of flat bf16 tensors in place, the math in fp32.

    ``hp`` fp32 [7] = (1 - b1, b2, 1 - b2, 1 - lr * wd, lr / bias_correction1,
    sqrt(bias_correction2), eps); ``keys`` int64 [3] seed the rounding noise of m, v and w (element i of this piece
    gets the noise of hash(i + key)). ``c`` is the Kahan compensation (None: weights are
    stochastically rounded). Tensors, not Python floats, carry the hyperparameters, so the
    compiled form is built once and serves every step and learning rate.
    """
    index = torch.arange(w.numel(), device=w.device, dtype=torch.int64)
    g32 = g.float()
    m32 = m.float().lerp(g32, hp[0])
    v32 = v.float() * hp[1] + g32 * g32 * hp[2]
    w32 = w.float()
    if c is not None:
        w32 = w32 + c.float()
    w32 = w32 * hp[3] - hp[4] * m32 / (v32.sqrt() / hp[5] + hp[6])
    m.copy_(_round_with(m32, _noise16(index, keys[0])))
    v.copy_(_round_with(v32, _noise16(index, keys[1])))
    if c is None:
        w.copy_(_round_with(w32, _noise16(index, keys[2])))
    else:
        new = _nearest_bf16_as_fp32(w32)
        c.copy_((w32 - new).to(torch.bfloat16))
        w.copy_(new.to(torch.bfloat16))  # exact


_COMPILED_UPDATE: list = []


def _compiled_update():
    """bf16_adamw_update through torch.compile (one fused kernel per tensor; built once)."""
    if not _COMPILED_UPDATE:
        _COMPILED_UPDATE.append(torch.compile(bf16_adamw_update, dynamic=True))
    return _COMPILED_UPDATE[0]


def _mix64(*values: int) -> int:
    """A 32-bit key from integers (splitmix64 steps): distinct (seed, step, tensor, state)
    tuples give unrelated noise streams."""
    x = 0x9E3779B97F4A7C15
    for val in values:
        x = (x ^ (val & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
        x = x * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & 0xFFFFFFFF


class BF16AdamW(torch.optim.Optimizer):
    """AdamW on bf16 parameters with bf16 moment estimates; the math runs in fp32.

    ``rounding="stochastic"``: weights and moments are stochastically rounded to bf16
    (unbiased; 8 bytes a parameter counting the gradient). ``rounding="kahan"``: moments
    stochastically rounded, weights keep a bf16 compensation buffer holding what the last
    rounding dropped (deterministic weights; 10 bytes a parameter). Same hyperparameters and
    update rule as ``torch.optim.AdamW`` (decoupled weight decay, bias correction).
    ``seed`` fixes the rounding noise (a hash of seed, step, tensor and element, so the result
    does not depend on how the update is split or fused).

    ``compile``: run the update as one torch.compile-fused kernel per tensor (reads w, g, m, v
    once, writes w, m, v once: ~14 bytes a parameter). Measured on an H100 for 7B: 0.09-0.11 s per
    update, against 0.93 s for the eager chain of ~25 kernels over fp32 temporaries; the first
    call compiles (~11 s). None = on CUDA only; if compilation fails, the eager form runs, with
    a warning.
    """

    def __init__(self, params: Iterable[torch.Tensor], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, rounding: str = "stochastic",
                 seed: int = 0, compile: bool | None = None) -> None:
        if rounding not in ("stochastic", "kahan"):
            raise ValueError(f"rounding must be 'stochastic' or 'kahan', got {rounding!r}")
        params = list(params)
        bad = [p.dtype for p in params if p.dtype != torch.bfloat16]
        if bad:
            raise ValueError(f"BF16AdamW needs bfloat16 parameters, got {sorted(set(map(str, bad)))}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.rounding = rounding
        self.seed = seed
        self.compile = compile

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("BF16AdamW does not take a closure")
        for gi, group in enumerate(self.param_groups):
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            hps: dict[tuple[int, torch.device], torch.Tensor] = {}  # one per step count and device, not per tensor
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                w = _local(p)
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(w)
                    state["exp_avg_sq"] = torch.zeros_like(w)
                    if self.rounding == "kahan":
                        state["compensation"] = torch.zeros_like(w)
                state["step"] += 1
                t = state["step"]
                hp = hps.get((t, w.device))
                if hp is None:
                    bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
                    hp = hps[(t, w.device)] = torch.tensor(
                        [1 - b1, b2, 1 - b2, 1 - lr * wd, lr / bc1, math.sqrt(bc2), eps], dtype=torch.float32
                    ).to(w.device, non_blocking=True)
                keys = [_mix64(self.seed, t, gi, pi, k) for k in range(3)]
                self._update(w.view(-1), _local(p.grad).view(-1), state, hp, keys)

    def _update(self, w: torch.Tensor, g: torch.Tensor, state: dict[str, Any], hp: torch.Tensor,
                keys: list[int]) -> None:
        m, v = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
        c = state["compensation"].view(-1) if self.rounding == "kahan" else None
        use_compiled = self.compile if self.compile is not None else w.is_cuda
        if use_compiled:
            try:
                _compiled_update()(w, g, m, v, c, hp, torch.tensor(keys, dtype=torch.int64).to(w.device))
                return
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # compilation problems (no compiler, unsupported backend)
                if self.compile:
                    raise
                warnings.warn(f"BF16AdamW: compiled update failed ({type(e).__name__}: {e}); "
                              "running the eager update", stacklevel=2)
                self.compile = False
        # Eager: in pieces, bounding the fp32 temporaries (about six per piece).
        for s in range(0, w.numel(), CHUNK):
            sl = slice(s, s + CHUNK)
            piece_keys = torch.tensor([k + s for k in keys], dtype=torch.int64, device=w.device)
            bf16_adamw_update(w[sl], g[sl], m[sl], v[sl], None if c is None else c[sl], hp, piece_keys)
