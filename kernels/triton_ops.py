"""The op set of kernels/torch_ops.py with the fusable steps as Triton kernels (fp32 only).

Forward: normalize_align (1 launch), Gram (cuBLAS SGEMM), radix select (1 fill + 4
launches), kernel matrix (1), the SPD inverse by a blocked sweep and a Newton step (B / 32
+ 10 launches for B <= 512; cuSOLVER Cholesky and a B-wide triangular inverse up to
solve_min_b; a per-view Cholesky solve above), operator (1), Y = M Z (cuBLAS), finish (1)
and the unit gradient (1), then the host reads the failure flags (1 sync).
On CUDA at B <= 512 all of that before the sync is one CUDA graph replay (kernels/graphs.py):
2 input copies + 1 replay + 1 copy of the packed results, instead of about 25 + B / 32
launches from Python, several of them through Triton's launcher (the costliest on the
host). The backward is one multiply. fp64 inputs take the inherited PyTorch steps, so tests
can still compare at 1e-10.
"""

from __future__ import annotations

import warnings

import torch
import triton

from kernels import triton_kernels as tk
from kernels.graphs import GraphCache, GraphCaptureError
from kernels.torch_ops import SOLVE_MIN_B, TorchOps, ieee_fp32_matmul

# Small tiles keep the interpreter (TRITON_INTERPRET=1, CPU tests) fast; GPUs get real tiles.
_TILE_GPU = {"rows": 32, "cols": 128, "radix": 4096, "sweep": 32}
_TILE_CPU = {"rows": 16, "cols": 16, "radix": 256, "sweep": 16}
SWEEP_MAX_B = 512
# After one Newton step the error is about the square of this: fp32 Cholesky quality.
SWEEP_MAX_RESIDUAL = 1e-2


def _tiles(x: torch.Tensor) -> dict[str, int]:
    return _TILE_GPU if x.is_cuda else _TILE_CPU


class TritonOps(TorchOps):
    """sweep_max_b: largest B inverted by the Triton sweep (0: always cuSOLVER Cholesky).
    graphs: replay the forward as a CUDA graph where it is all sweep path (B <= sweep_max_b)."""

    name = "triton"

    def __init__(self, sweep_max_b: int = SWEEP_MAX_B, solve_min_b: int = SOLVE_MIN_B, graphs: bool = True) -> None:
        super().__init__(solve_min_b)
        self.sweep_max_b = sweep_max_b
        self.graphs = GraphCache() if graphs else None

    def forward_all(
        self, online: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype, eta: float, min_tau: float, lam: float
    ) -> tuple[torch.Tensor, ...]:
        """TorchOps.forward_all, replayed as a CUDA graph where it is all sweep path.

        The first five results come from one copy of a packed buffer, so they outlive the next
        replay; info and the intermediates after it are the graph's own buffers, valid until
        the next call (the caller reads them at once, for the rare fp64 retry)."""
        b = online.shape[1]
        if (self.graphs is None or not online.is_cuda or dtype != torch.float32 or b > self.sweep_max_b
                or b >= self.solve_min_b or torch.cuda.is_current_stream_capturing()):
            return super().forward_all(online, targets, dtype, eta, min_tau, lam)
        key = (tuple(online.shape), online.dtype, targets.dtype, online.device, eta, min_tau, lam)
        try:
            packed, info, *state = self.graphs.run(key, lambda o, t: _packed(TorchOps.forward_all(
                self, o, t, dtype, eta, min_tau, lam)), (online, targets))
        except GraphCaptureError as e:
            warnings.warn(f"mveb_loss: CUDA graph capture failed, launching kernels one by one from now on ({e})",
                          RuntimeWarning, stacklevel=2)
            self.graphs = None
            return super().forward_all(online, targets, dtype, eta, min_tau, lam)
        return (*_unpacked(packed.clone(), online.shape), info, *state)

    def normalize_align(
        self, online: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if dtype != torch.float32:
            return super().normalize_align(online, targets, dtype)
        views, b, d = online.shape
        online, targets = online.contiguous(), targets.contiguous()
        z = torch.empty(online.shape, dtype=dtype, device=online.device)
        t = torch.empty(targets.shape, dtype=dtype, device=online.device)
        norms = torch.empty((views, b), dtype=dtype, device=online.device)
        rowdot = torch.empty_like(norms)
        tk.normalize_align_kernel[(b,)](online, targets, z, t, norms, rowdot, views, b, d,
                                        BLOCK_D=triton.next_power_of_2(d))
        return z, norms, t, rowdot

    def kernel_matrix(
        self, s: torch.Tensor, eta: float, min_tau: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if s.dtype != torch.float32:
            return super().kernel_matrix(s, eta, min_tau)
        views, b, _ = s.shape
        n, k, tiles = b * b, b * b // 2, _tiles(s)
        s = s.contiguous()
        hist = torch.zeros((tk.RADIX_PASSES, views, 1 << tk.RADIX_BITS), dtype=torch.int32, device=s.device)
        for p in range(tk.RADIX_PASSES):
            tk.radix_pass_kernel[(views, triton.cdiv(n, tiles["radix"]))](s, hist, views, n, k, PASS=p,
                                                                          BLOCK=tiles["radix"])
        a = torch.empty_like(s)
        r = torch.empty((views, b), dtype=s.dtype, device=s.device)
        tau = torch.empty((views,), dtype=s.dtype, device=s.device)
        tk.kernel_matrix_kernel[(views, triton.cdiv(b, tiles["rows"]))](
            s, hist, a, r, tau, views, b, k, eta, min_tau,
            BLOCK_M=tiles["rows"], BLOCK_N=tiles["cols"], PASSES=tk.RADIX_PASSES)
        return a, r, tau

    def spd_inverse(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A^{-1} by the blocked symmetric sweep (B / T launches, no Cholesky), then one
        Newton step P + P (I - A P). Gauss-Jordan is less accurate than Cholesky on
        ill-conditioned A, so a view whose residual I - A P exceeds SWEEP_MAX_RESIDUAL is
        reported as failed, and score_operator redoes it in fp64.
        Above sweep_max_b the redundant per-tile pivot-block inversions (and B / T launches)
        cost more than cuSOLVER's Cholesky, so large B keeps the inherited path."""
        views, b, _ = a.shape
        if a.dtype != torch.float32 or b > self.sweep_max_b:
            return super().spd_inverse(a)
        t = _tiles(a)["sweep"]
        steps = triton.cdiv(b, t)
        bufs = (a.contiguous(), torch.empty_like(a), torch.empty_like(a))
        info = torch.zeros(views, dtype=torch.int32, device=a.device)
        for k in range(steps):
            src, dst = bufs[0] if k == 0 else bufs[1 + (k + 1) % 2], bufs[1 + k % 2]
            tk.sweep_step_kernel[(views, steps, steps)](src, dst, info, b, k, -1.0 if k == steps - 1 else 1.0, T=t)
        with ieee_fp32_matmul():
            residual = torch.eye(b, dtype=a.dtype, device=a.device) - torch.bmm(a, dst)
            p = torch.baddbmm(dst, dst, residual)
        inaccurate = ~(residual.abs().amax(dim=(1, 2)) <= SWEEP_MAX_RESIDUAL)
        return p, info.masked_fill_(inaccurate, 1)

    def operator(
        self, p: torch.Tensor, r: torch.Tensor, tau: torch.Tensor, s: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if s.dtype != torch.float32:
            return super().operator(p, r, tau, s)
        views, b, _ = s.shape
        tiles = _tiles(s)
        p, s = p.contiguous(), s.contiguous()
        m = torch.empty_like(p)
        ms = torch.empty((views, b), dtype=s.dtype, device=s.device)
        tk.operator_kernel[(views, triton.cdiv(b, tiles["rows"]))](p, s, r, tau, m, ms, b,
                                                                   BLOCK_M=tiles["rows"], BLOCK_N=tiles["cols"])
        return m, ms

    def finish(
        self, rowdot: torch.Tensor, ms: torch.Tensor, lam: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if ms.dtype != torch.float32:
            return super().finish(rowdot, ms, lam)
        views, b = ms.shape
        loss, align, entropy = (torch.empty((), dtype=ms.dtype, device=ms.device) for _ in range(3))
        dots = torch.empty_like(ms)
        tk.finish_kernel[(1,)](rowdot, ms.contiguous(), dots, loss, align, entropy, views, b, lam,
                               BLOCK=_tiles(ms)["radix"])
        return loss, align, entropy, dots

    def grad_online(
        self, y: torch.Tensor, z: torch.Tensor, t: torch.Tensor, dots: torch.Tensor, norms: torch.Tensor, lam: float
    ) -> torch.Tensor:
        if z.dtype != torch.float32:
            return super().grad_online(y, z, t, dots, norms, lam)
        views, b, d = z.shape
        out = torch.empty_like(z)
        tk.grad_online_kernel[(views * b,)](y.contiguous(), z, t, dots, norms, out, views, b, d, lam,
                                           BLOCK_D=triton.next_power_of_2(d))
        return out


def _packed(results: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """(one fp32 buffer holding loss, align, entropy, tau and grad, then the rest): a single
    copy then saves all that must outlive the graph's next replay."""
    loss, align, entropy, tau, grad, *rest = results
    return torch.cat([torch.stack([loss, align, entropy]), tau, grad.flatten()]), *rest


def _unpacked(packed: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, ...]:
    """(loss, align, entropy, tau, grad) over disjoint slices of a copy of _packed's buffer.

    Not views (Tensor.set_ on the copy's storage): views of one base share its version counter,
    so an in-place op on the loss or a part (loss /= k, parts["tau"].zero_()) would make the
    backward fail, which the eager path's separate tensors allow. No copy, no launch."""
    views = shape[0]
    storage, base = packed.untyped_storage(), packed.storage_offset()

    def part(start: int, size: tuple[int, ...]) -> torch.Tensor:
        return torch.empty(0, dtype=packed.dtype, device=packed.device).set_(storage, base + start, size)

    return part(0, ()), part(1, ()), part(2, ()), part(3, (views,)), part(3 + views, tuple(shape))
