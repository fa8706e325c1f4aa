"""The Triton implementation against the literal form: on CPU under TRITON_INTERPRET=1 (tiny
sizes, in a subprocess so the interpreter is on before triton is imported), and on CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import mveb_loss
from test_kernels_math import LAM, literal_loss_and_grad, make_views, rel

# (kind, V, B, D, input dtype): odd B, tiles that do not divide B or D, collapse (tau = 0.1)
INTERPRETER_CASES = [
    ("random", 2, 5, 7, "float32"),
    ("clustered", 3, 17, 9, "float32"),
    ("collapsed", 2, 12, 16, "float32"),
    ("random", 2, 6, 8, "bfloat16"),
]
SOLVE_CASE = ("clustered", 3, 17, 9, "float32")


def _case_inputs(case: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    kind, views, b, d, dtype = case
    online, targets = make_views(kind, views, b, d, seed=b * d, dtype=getattr(torch, dtype))
    return online.detach(), targets


def _run_cases(out: Path) -> None:
    """Runs in the TRITON_INTERPRET=1 subprocess: Triton results for every case, saved."""
    from kernels.loss import MvebLossFunction
    from kernels.torch_ops import TorchOps
    from kernels.triton_ops import TritonOps

    results: dict[str, object] = {}
    for case in INTERPRETER_CASES:
        online, targets = _case_inputs(case)
        online.requires_grad_()
        loss, parts = mveb_loss(online, targets, impl="triton", return_parts=True)
        loss.backward()
        results[str(case)] = {"loss": loss.detach(), "grad": online.grad, "tau": parts["tau"], **parts}
    # The radix select on ties, negative zero and a NaN-free spread of signs and exponents.
    g = torch.Generator().manual_seed(0)
    s = torch.tensor([-0.0, 0.0, 1.0, -1.0, 0.5, -0.5, 1e-30, -1e-30])[torch.randint(8, (3, 7, 7), generator=g)]
    s[2] = torch.randn(7, 7, generator=g).clamp(-1, 1)
    results["select"] = {"triton": TritonOps().kernel_matrix(s, 0.01, 0.1), "torch": TorchOps().kernel_matrix(s, 0.01, 0.1)}
    results["sweep"] = {"a": _sweep_inputs(), "p_info": TritonOps().spd_inverse(_sweep_inputs())}
    # The per-view Cholesky solve (the large-B path) around the Triton kernels, forced at B=17.
    online, targets = _case_inputs(SOLVE_CASE)
    online.requires_grad_()
    loss = MvebLossFunction.apply(online, targets, LAM, 0.01, 0.1, TritonOps(solve_min_b=2))[0]
    loss.backward()
    results["solve"] = {"loss": loss.detach(), "grad": online.grad}
    bad = _case_inputs(INTERPRETER_CASES[0])[0]
    bad[1, 2, 3] = float("nan")
    results["nan"] = mveb_loss(bad, _case_inputs(INTERPRETER_CASES[0])[1], impl="triton")
    torch.save(results, out)


def _sweep_inputs() -> torch.Tensor:
    """[3, 17, 17]: a kernel matrix, a near-collapse one, and an indefinite one (2 sweep steps of 16)."""
    from kernels.torch_ops import TorchOps

    online, _ = make_views("clustered", 1, 17, 8, seed=2, dtype=torch.float32)
    collapsed, _ = make_views("collapsed", 1, 17, 8, seed=2, dtype=torch.float32)
    x = torch.nn.functional.normalize(torch.cat([online, collapsed]).detach(), dim=-1)
    a, _, _ = TorchOps().kernel_matrix(x @ x.transpose(1, 2), 0.01, 0.1)
    return torch.cat([a, (torch.ones(17, 17) - 0.5 * torch.eye(17))[None]])


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("triton") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=lambda c: "-".join(map(str, c)))
def test_interpreted_triton_matches_literal(interpreted: dict, case: tuple) -> None:
    got = interpreted[str(case)]
    online, targets = _case_inputs(case)
    want_loss, want_grad = literal_loss_and_grad(online.double(), targets.double())
    assert got["grad"].dtype == online.dtype
    # fp32 bound as in test_kernels_math: 1e-4 relative near collapse (cond(K + eta I) ~ 1e6)
    loss_tol = 2e-3 if case[-1] == "bfloat16" else (1e-4 if case[0] == "collapsed" else 1e-5)
    assert abs(got["loss"].item() - want_loss.item()) <= loss_tol * max(1.0, abs(want_loss.item()))
    if case[0] != "collapsed":
        assert rel(got["grad"], want_grad) <= (1e-2 if case[-1] == "bfloat16" else 1e-4)
    if case[0] == "collapsed":
        assert torch.allclose(got["tau"], torch.full_like(got["tau"], 0.1))
    # the same fp32 math as the torch op set, step for step
    o = online.detach().requires_grad_()
    ref = mveb_loss(o, targets, impl="torch")
    ref.backward()
    assert abs(got["loss"].item() - ref.item()) <= min(loss_tol, 1e-4) * max(1.0, abs(ref.item()))
    assert got["align"].item() == pytest.approx(-(ref.item() * case[1] + LAM * case[1] * got["entropy"].item()), rel=1e-4)


@pytest.mark.slow
def test_interpreted_solve_path_matches_literal(interpreted: dict) -> None:
    online, targets = _case_inputs(SOLVE_CASE)
    want_loss, want_grad = literal_loss_and_grad(online.double(), targets.double())
    got = interpreted["solve"]
    assert abs(got["loss"].item() - want_loss.item()) <= 1e-5 * max(1.0, abs(want_loss.item()))
    assert rel(got["grad"], want_grad) <= 1e-4


@pytest.mark.slow
def test_interpreted_radix_select_is_exact(interpreted: dict) -> None:
    (a, r, tau), (a_ref, r_ref, tau_ref) = interpreted["select"]["triton"], interpreted["select"]["torch"]
    assert torch.equal(tau, tau_ref)
    assert torch.allclose(a, a_ref, rtol=1e-6, atol=0) and torch.allclose(r, r_ref, rtol=1e-6, atol=0)


@pytest.mark.slow
def test_interpreted_sweep_inverts_spd_and_flags_what_it_cannot(interpreted: dict) -> None:
    """Sweep + one Newton step is as accurate as the fp32 Cholesky path on a kernel matrix;
    the near-collapse view (its Gauss-Jordan residual is large) and the indefinite one are
    flagged, so score_operator redoes them in fp64."""
    from kernels.torch_ops import TorchOps

    a = interpreted["sweep"]["a"]
    p, info = interpreted["sweep"]["p_info"]
    assert info.tolist() == [0, 1, 1]
    want = torch.linalg.inv(a[0].double())
    cholesky, _ = TorchOps().spd_inverse(a[:1])
    assert rel(p[0], want) <= max(2 * rel(cholesky[0], want), 1e-6)


@pytest.mark.slow
def test_interpreted_nan_input_gives_nan_loss(interpreted: dict) -> None:
    assert torch.isnan(interpreted["nan"])


def test_graph_path_packs_exactly_what_outlives_the_replay() -> None:
    """The CUDA graph path copies forward_all's first five results out of one packed buffer:
    the copy must give them back bit for bit, in their shapes (checked here on CPU)."""
    from kernels.torch_ops import TorchOps
    from kernels.triton_ops import _packed, _unpacked

    online, targets = make_views("random", 3, 7, 5, seed=0, dtype=torch.float32)
    results = TorchOps().forward_all(online.detach(), targets, torch.float32, 0.01, 0.1, LAM)
    packed, *rest = _packed(results)
    got = _unpacked(packed.clone(), online.shape)
    assert [tuple(x.shape) for x in got] == [(), (), (), (3,), (3, 7, 5)]
    assert all(torch.equal(a, b) for a, b in zip(got, results[:5]))
    assert all(a is b for a, b in zip(rest, results[5:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_path_results_are_separate_tensors_to_autograd(dtype: torch.dtype) -> None:
    """The loss through the graph path's packing (simulated on CPU): the same loss and input
    gradient as the eager path for a scaled upstream gradient (GradScaler's) and a bf16 input,
    and in-place ops on the loss or a part before the backward work there as they do eagerly
    (views of one buffer share a version counter and made that backward fail)."""
    from kernels.loss import MvebLossFunction
    from kernels.torch_ops import TorchOps
    from kernels.triton_ops import _packed, _unpacked

    class PackedOps(TorchOps):  # TritonOps.forward_all's graph path, less the graph
        def forward_all(self, online, targets, dtype, eta, min_tau, lam):  # type: ignore[no-untyped-def]
            packed, info, *state = _packed(super().forward_all(online, targets, dtype, eta, min_tau, lam))
            return (*_unpacked(packed.clone(), online.shape), info, *state)

    online, targets = make_views("random", 3, 7, 5, seed=1, dtype=dtype)
    grads = {}
    for name, ops in (("eager", TorchOps()), ("packed", PackedOps()), ("packed+inplace", PackedOps())):
        o = online.detach().clone().requires_grad_()
        loss, align, entropy, tau = MvebLossFunction.apply(o, targets, LAM, 0.01, 0.1, ops)
        if name.endswith("inplace"):
            align.mul_(2), entropy.zero_(), tau.zero_()
            loss /= 4
            loss *= 4
        (loss * 1024.0).backward()
        assert o.grad.dtype == dtype
        grads[name] = (loss.detach(), o.grad)
    for name in ("packed", "packed+inplace"):
        assert torch.equal(grads[name][0], grads["eager"][0]) and torch.equal(grads[name][1], grads["eager"][1]), name
    o = online.detach().float().requires_grad_()
    (unit,) = torch.autograd.grad(MvebLossFunction.apply(o, targets, LAM, 0.01, 0.1, TorchOps())[0], o)
    assert torch.equal(grads["eager"][1], (unit * 1024.0).to(dtype))


F32 = "*fp32"
SM90_SIGNATURES = {  # kernel: (signature, constexprs) as kernels/triton_ops.py launches them on a GPU
    "normalize_align_kernel": ({"online_ptr": "*bf16", "targets_ptr": "*bf16", "z_ptr": F32, "t_ptr": F32,
                                "norms_ptr": F32, "rowdot_ptr": F32, "V": "i32", "B": "i32", "D": "i32",
                                "BLOCK_D": "constexpr"}, {"BLOCK_D": 2048}),
    "radix_pass_kernel": ({"s_ptr": F32, "hist_ptr": "*i32", "V": "i32", "N": "i32", "k": "i32", "PASS": "constexpr",
                           "BLOCK": "constexpr"}, {"PASS": 3, "BLOCK": 4096}),
    "kernel_matrix_kernel": ({"s_ptr": F32, "hist_ptr": "*i32", "a_ptr": F32, "r_ptr": F32, "tau_ptr": F32, "V": "i32",
                              "B": "i32", "k": "i32", "eta": "fp32", "min_tau": "fp32", "BLOCK_M": "constexpr",
                              "BLOCK_N": "constexpr", "PASSES": "constexpr"}, {"BLOCK_M": 32, "BLOCK_N": 128, "PASSES": 4}),
    "operator_kernel": ({"p_ptr": F32, "s_ptr": F32, "r_ptr": F32, "tau_ptr": F32, "m_ptr": F32, "ms_ptr": F32,
                         "B": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}, {"BLOCK_M": 32, "BLOCK_N": 128}),
    "finish_kernel": ({"rowdot_ptr": F32, "ms_ptr": F32, "dots_ptr": F32, "loss_ptr": F32, "align_ptr": F32,
                       "entropy_ptr": F32, "V": "i32", "B": "i32", "lam": "fp32", "BLOCK": "constexpr"}, {"BLOCK": 4096}),
    "grad_online_kernel": ({"y_ptr": F32, "z_ptr": F32, "t_ptr": F32, "dots_ptr": F32, "norms_ptr": F32,
                            "out_ptr": F32, "V": "i32", "B": "i32", "D": "i32", "lam": "fp32",
                            "BLOCK_D": "constexpr"}, {"BLOCK_D": 2048}),
    "sweep_step_kernel": ({"a_in": F32, "a_out": F32, "info_ptr": "*i32", "B": "i32", "K": "i32", "sign": "fp32",
                           "T": "constexpr"}, {"T": 32}),
}


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_without_a_gpu() -> None:
    """Lowering to a Hopper cubin (ptxas included) catches what the interpreter cannot."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import triton_kernels

    for name, (signature, constexprs) in SM90_SIGNATURES.items():
        src = ASTSource(fn=getattr(triton_kernels, name), signature=signature, constexprs=constexprs)
        assert triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["cubin"], name


GPU_CASES = [("random", 8, 256, 2048), ("clustered", 8, 128, 2048), ("collapsed", 8, 256, 2048),
             ("random", 3, 77, 300), ("random", 8, 1024, 2048), ("random", 4, 2048, 512)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_cuda_triton_and_torch_match_reference(case: tuple, dtype: torch.dtype) -> None:
    online, targets = make_views(*case, seed=case[2], dtype=dtype)
    online, targets = online.detach().cuda(), targets.cuda()
    want = mveb_loss(online.double(), targets.double(), impl="reference")
    o64 = online.double().requires_grad_()
    mveb_loss(o64, targets.double(), impl="reference").backward()
    for impl in ("triton", "torch", "auto"):
        o = online.clone().requires_grad_()
        loss, parts = mveb_loss(o, targets, impl=impl, return_parts=True)
        loss.backward()
        tol = 2e-3 if dtype == torch.bfloat16 else 1e-4
        assert abs(loss.item() - want.item()) <= tol * max(1.0, abs(want.item())), impl
        assert o.grad.dtype == dtype and torch.isfinite(o.grad).all()
        if case[0] == "random" and dtype == torch.float32:
            assert rel(o.grad, o64.grad) <= 1e-3, impl
        if case[0] == "collapsed":
            assert torch.allclose(parts["tau"], torch.full_like(parts["tau"], 0.1)), impl


@pytest.mark.gpu
def test_cuda_triton_survives_tf32_and_autocast() -> None:
    """Global TF32 on and bf16 autocast: S is still IEEE fp32, so tau matches the fp64 one."""
    online, targets = make_views("collapsed", 8, 256, 2048, seed=1, dtype=torch.float32)
    online, targets = online.detach().cuda(), targets.cuda()
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, parts = mveb_loss(online, targets, impl="triton", return_parts=True)
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
    assert torch.backends.cuda.matmul.fp32_precision == before
    ref = mveb_loss(online.double(), targets.double(), impl="reference")
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) <= 1e-4 * max(1.0, abs(ref.item()))


def _near_duplicates(views: int, b: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows 1e-4 apart: tau clamps at 0.1 and the fp32 inversion fails (the fp64 retry runs)."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(1, d, generator=g, dtype=torch.float64) + 1e-4 * torch.randn(views + 2, b, d, generator=g,
                                                                                  dtype=torch.float64)
    return x[:views].float().cuda(), x[views:].float().cuda()


@pytest.mark.gpu
def test_cuda_graph_forward_equals_eager_and_keeps_each_calls_tensors() -> None:
    """Two forwards through one captured graph before either backward (the second replay
    overwrites the graph's buffers): each gets the eager loss and gradient; a view whose
    fp32 inversion fails is still redone in fp64 after the replay."""
    from kernels.loss import MvebLossFunction
    from kernels.triton_ops import TritonOps

    graphed, eager = TritonOps(), TritonOps(graphs=False)
    cases = [tuple(x.detach().cuda() for x in make_views(kind, 8, 128, 2048, seed=i, dtype=torch.float32))
             for i, kind in enumerate(["random", "clustered"])] + [_near_duplicates(8, 128, 2048)]

    def loss_and_input(ops: TritonOps, online: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o = online.clone().requires_grad_()
        return MvebLossFunction.apply(o, targets, LAM, 0.01, 0.1, ops)[0], o

    got = [loss_and_input(graphed, *c) for c in cases]
    for loss, _ in got:
        loss.backward()
    assert len(graphed.graphs._graphs) == 1
    for (loss, o), case in zip(got, cases):
        want, o_eager = loss_and_input(eager, *case)
        want.backward()
        assert torch.isfinite(loss) and abs(loss.item() - want.item()) <= 1e-6 * max(1.0, abs(want.item()))
        assert rel(o.grad, o_eager.grad) <= 1e-5
    ref = mveb_loss(cases[2][0].double(), cases[2][1].double(), impl="reference")
    assert abs(got[2][0].item() - ref.item()) <= 1e-4 * max(1.0, abs(ref.item()))


@pytest.mark.gpu
def test_cuda_solve_path_matches_inverse_path_without_graph() -> None:
    """B=2048 takes the per-view Cholesky solve (no graph); its loss matches the inverse path."""
    from kernels.loss import MvebLossFunction
    from kernels.triton_ops import TritonOps

    online, targets = (x.detach().cuda() for x in make_views("clustered", 4, 2048, 256, seed=3, dtype=torch.float32))
    ops = TritonOps()
    solve = MvebLossFunction.apply(online, targets, LAM, 0.01, 0.1, ops)[0]
    inverse = MvebLossFunction.apply(online, targets, LAM, 0.01, 0.1, TritonOps(solve_min_b=10**9))[0]
    assert not ops.graphs._graphs
    # fp32 at B=2048 on clustered views: the two solvers round differently (3.3e-5 relative
    # measured on an H200); both stay within the fp32 bound the other tests use.
    assert abs(solve.item() - inverse.item()) <= 1e-4 * max(1.0, abs(inverse.item()))


if __name__ == "__main__":
    _run_cases(Path(sys.argv[1]))
