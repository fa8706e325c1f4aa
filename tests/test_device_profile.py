"""`mveb bench step --profile`: device work by kind from a real profiled step (CPU here), and
the name rules that sort CUDA kernels into kinds."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mveb.bench_step import bench_step, format_table
from mveb.device_profile import _union_us, kind_of

ROOT = Path(__file__).resolve().parents[1]


def test_every_triton_loss_kernel_is_counted_as_loss() -> None:
    tree = ast.parse((ROOT / "kernels" / "triton_kernels.py").read_text())
    launched = [f.name for f in tree.body if isinstance(f, ast.FunctionDef) and f.name.endswith("_kernel")]
    assert len(launched) >= 6
    assert {name: kind_of(name) for name in launched} == {name: "loss" for name in launched}


@pytest.mark.parametrize("name,kind", [
    # cuDNN and cutlass convolutions name gemm in them; they are convolutions
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
    ("cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816dgrad_optimized_bf16_128x128_32x5_nhwc>", "convolution"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x128x64", "matmul"),
    ("void at::native::batch_norm_backward_reduce_channels_last_kernel<4, c10::BFloat16, float>", "batchnorm"),
    ("bn_fw_tr_1C11_kernel_NCHW", "batchnorm"),
    ("void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true>", "layout"),
    ("void at::native::multi_tensor_apply_kernel<at::native::FusedSgdMathFunctor<float, 3>>", "foreach (optimizer, EMA)"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "communication"),
    ("void dali::kernels::SliceFlipNormalizePermutePadKernel<__half, unsigned char, 3>", "loader"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "elementwise"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::NormTwoOps<float>>>", "reduction"),
    ("triton_poi_fused_add_relu_threshold_backward_12", "elementwise"),
    # torch.compile names a kernel after all it fuses: its prefix decides, not a fused cast or conv
    ("triton_poi_fused__to_copy_add_mul_relu_3", "elementwise"),
    ("triton_red_fused_convolution_backward_native_batch_norm_backward_7", "batchnorm"),
    ("triton_per_fused_sum_4", "reduction"),
    # template arguments do not decide (a foreach norm's cleanup names TensorListAddresses)
    ("void at::native::lpnorm_cleanup<float, (at::native::NormType)1, float, float>(TensorListAddresses)",
     "foreach (optimizer, EMA)"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::WelfordOps<float>>>", "reduction"),
    ("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopB_TNT", "matmul"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, float>(cublasLt::cublasSplitKParams<float>)", "matmul"),
    ("void cudnn::ops::scalePackedTensor_kernel<float, float>(cudnnTensor4dStruct, float*, float)", "convolution"),
    ("Memcpy HtoD (Pageable -> Device)", "copy"),
    ("aten::clamp_min", "elementwise"),
    ("aten::max_pool2d_with_indices", "pooling"),
])
def test_kernel_names_sort_into_kinds(name: str, kind: str) -> None:
    assert kind_of(name) == kind


def test_busy_time_counts_overlapping_streams_once() -> None:
    assert _union_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17


def test_profiled_cpu_step_attributes_its_time(photo_train: Path) -> None:
    """A real demo step on this CPU: the backbone's convolutions are the largest kind, the kinds
    add up to the busy time, and the loader-fed row is profiled with its loader."""
    report = bench_step("cpu", batch_size=4, loaders=("synthetic", "torch"), data=str(photo_train), steps=2,
                        official=False, profile=True)
    rows = {r["variant"]: r for r in report["results"]}
    assert list(rows) == ["mveb", "mveb torch"]
    for r in rows.values():
        work = r["device"]
        assert max(work["kinds"], key=work["kinds"].get) == "convolution"
        assert {"batchnorm", "foreach (optimizer, EMA)", "loss"} <= set(work["kinds"])
        assert sum(work["kinds"].values()) == pytest.approx(work["busy_ms"])
        assert 0 < work["busy_ms"] <= work["wall_ms"]
        assert work["calls"]["convolution"] > 0 and work["top"][0]["ms"] >= work["top"][-1]["ms"]
    table = format_table(report)
    assert "Device work by kind" in table and "| mveb torch |" in table.split("Device work by kind")[1]


@pytest.mark.gpu
def test_bf16_cuda_step_has_no_hidden_format_conversion() -> None:
    """The profiler's view of channels_last end to end: a bf16 step on CUDA, and an fp16 one
    (BatchNorm through cuDNN there), run no cuDNN NCHW <-> NHWC conversion kernel."""
    report = bench_step("cuda", batch_size=32, config="demo", steps=2, official=False, profile=True, fp16=True)
    assert [r["variant"] for r in report["results"]] == ["mveb", "mveb fp16"]
    assert "ratio_to_synthetic" not in report["results"][1]  # not a loader-fed row
    for row in report["results"]:
        work = row["device"]
        layout = [t for t in work["top"] if t["kind"] == "layout"]
        assert "layout" not in work["kinds"], (row["variant"], layout)
        assert {"convolution", "batchnorm", "foreach (optimizer, EMA)", "loss"} <= set(work["kinds"]), row["variant"]
        assert 0 < work["busy_ms"] <= work["wall_ms"]


def test_a_profiler_that_cannot_start_keeps_the_timed_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host whose profiler refuses to start (CUPTI can be off limits on a shared cluster; here
    the refusal is simulated) still gets its step timings, with the reason the table is missing."""
    import torch

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUPTI_ERROR_INSUFFICIENT_PRIVILEGES")

    monkeypatch.setattr(torch.profiler, "profile", refuse)
    report = bench_step("cpu", batch_size=4, steps=2, official=False, profile=True)
    row = report["results"][0]
    assert row["samples_per_s"] > 0 and "device" not in row and "INSUFFICIENT_PRIVILEGES" in row["device_error"]
    assert "not profiled" in format_table(report)


def test_cuda_work_is_counted_per_kind_and_busy_time_once_over_streams() -> None:
    """The CUDA branch on the profiler's own event type: a conv on one stream overlapping a DALI
    kernel on another counts in both kinds, but the busy time counts the overlap once; host
    events are not device work."""
    import torch
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    from mveb.device_profile import work_by_kind

    def kernel(name: str, start: float, end: float, device_type: DeviceType = DeviceType.CUDA) -> FunctionEvent:
        return FunctionEvent(id=0, name=name, thread=0, start_us=start, end_us=end, device_type=device_type)

    events = [kernel("sm90_xmma_fprop_implicit_gemm_bf16", 0, 600),
              kernel("void dali::kernels::ResampleKernel<float>(...)", 400, 1000),
              kernel("void at::native::batch_norm_collect_statistics_channels_last_kernel<c10::BFloat16>", 1000, 1200),
              kernel("sm90_xmma_dgrad_implicit_gemm_bf16", 1500, 2200),
              kernel("cudaLaunchKernel", 0, 2200, DeviceType.CPU)]
    work = work_by_kind(events, torch.device("cuda"), wall_ms=5.0, steps=2)
    assert work["kinds"] == pytest.approx({"convolution": 0.65, "loader": 0.3, "batchnorm": 0.1})
    assert work["busy_ms"] == pytest.approx(0.95)  # (1,200 + 700) us of union over 2 steps
    assert work["wall_ms"] == 2.5 and work["calls"] == {"convolution": 1, "loader": 0, "batchnorm": 0}
    assert work["top"][0] == {"name": "sm90_xmma_dgrad_implicit_gemm_bf16", "kind": "convolution", "ms": 0.35}


def test_trace_writes_each_profiled_variants_timeline(tmp_path: Path) -> None:
    """--trace DIR: one Chrome trace per variant of its profiled steps, named after it, holding
    the step's ops; it implies --profile."""
    import json

    report = bench_step("cpu", batch_size=4, steps=2, trace_dir=tmp_path / "traces")
    for row in report["results"]:
        trace = Path(row["trace"])
        assert trace.parent == tmp_path / "traces" and "device" in row
        names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
        assert {"aten::convolution_backward", "aten::native_batch_norm"} <= names
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == ["mveb-b4.json", "official-style-b4.json"]
