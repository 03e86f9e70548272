"""roofline.py: kernels sorted by kind, bytes counted per aten operation, and the table's arithmetic (CPU)."""
import json

import pytest
import torch

import roofline


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "conv and matmul"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>", "layout"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT", "conv and matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("triton_red_fused_native_group_norm_silu_3", "Inductor reductions"),
    ("triton_per_fused_native_group_norm_0", "Inductor reductions"),
    ("triton_poi_fused_add_mul_silu_7", "Inductor pointwise"),
    ("triton_poi_fused_clone_transpose_2", "layout"),
    ("triton_poi_fused__to_copy_3", "layout"),  # a weight cast to bf16
    ("triton_poi_fused_0", "layout"),  # no operation named: an input copied into another layout
    ("triton_poi_fused__to_copy_clone_native_group_norm_permute_view_14", "Inductor pointwise"),
    ("triton_red_fused__to_copy_native_group_norm_1", "Inductor reductions"),
    ("triton_poi_fused__scaled_dot_product_cudnn_attention_clone_transpose_18", "attention"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimiser and EMA"),
    ("Memcpy DtoD (Device -> Device)", "other"),
])
def test_kernels_are_sorted_by_kind(name, kind):
    assert roofline.kernel_kind(name) == kind


def test_bytes_count_reads_and_writes_and_no_views():
    a = torch.randn(1000)
    with roofline.WorkCounter() as counter:
        b = a + a          # reads 2 x 4,000 bytes, writes 4,000
        b.view(10, 100)    # a view: nothing moves
    assert counter.bytes == 12_000 and counter.norm_values == 0


def test_bytes_of_a_forward_and_backward_include_the_weights_and_their_gradients():
    layer = torch.nn.Linear(256, 256)
    x = torch.randn(8, 256, requires_grad=True)  # as a hidden layer's input: its gradient reads the weight again
    step = lambda: layer(x).square().sum().backward()
    work = roofline.step_work(step, list(layer.parameters()))
    weights = layer.weight.nbytes
    assert work["unfused_bytes"] > 3 * weights  # the weight read in the forward and the backward, its gradient written
    assert work["unfused_bytes"] < 20 * weights
    assert work["trained_values"] == work["values"] == 256 * 257


def test_the_step_floor_counts_every_groupnorm_and_only_the_trained_parameters():
    norm, used, unused = torch.nn.GroupNorm(2, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    params = [*norm.parameters(), *used.parameters(), *unused.parameters()]
    x = torch.randn(3, 4, 5, 5)
    step = lambda: used(norm(x).mean((2, 3))).sum().backward()
    work = roofline.step_work(step, params)
    assert work["norm_values"] == x.numel()
    assert work["trained_values"] == 8 + 20 and work["values"] == 8 + 40
    assert roofline.memory_floor_bytes(work) == 10 * x.numel() + 32 * 28 + 12 * 48


def test_kernel_names_are_shortened_to_what_tells_them_apart():
    assert roofline.short_name("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl<...>>(int, "
                               "float)") == "at::native::elementwise_kernel"
    # An ATen kernel keeps the operation in its template arguments: which eager pass launched it.
    copy = ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
            "direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda(c10::BFloat16)"
            "#1}>(at::TensorIteratorBase&, ...)::{lambda(int)#1}>(int, at::native::gpu_kernel_impl_nocast<>)")
    assert roofline.short_name(copy) == "at::native::elementwise_kernel [direct_copy_kernel_cuda]"
    mul = ("void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<float, float, float, "
           "at::native::binary_internal::MulFunctor<float> >, std::array<char*, 3ul> >(int, ...)")
    assert roofline.short_name(mul) == "at::native::vectorized_elementwise_kernel [MulFunctor]"
    adam = ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
            "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4>, float*>(...)")
    assert roofline.short_name(adam) == "at::native::multi_tensor_apply_kernel [FusedAdamMathFunctor]"
    assert roofline.kernel_kind(adam) == "optimiser and EMA"
    assert roofline.short_name("triton_poi_fused_add_mul_silu_7") == "triton_poi_fused_add_mul_silu_7"
    assert roofline.short_name("Memcpy DtoD (Device -> Device)") == "Memcpy DtoD "


def test_a_row_puts_work_against_the_ceilings():
    kernels = {"conv and matmul": 2.0, "attention": 0.5, "Inductor pointwise": 1.0}
    heaviest = [("triton_poi_fused_add_mul_silu_7", "Inductor pointwise", 0.6)]
    work = dict(unfused_bytes=4e9, norm_values=1e8, trained_values=1e7, values=2e7)  # floor: 1.56e9 bytes
    measured = dict(kinds=kernels, wall_ms=4.0, host_ms=1.5, launches=120, heaviest=heaviest)
    r = roofline.row("64->64", flops=1e12, work=work, measured=measured, ceiling=(1000.0, 4000.0))
    assert r["flops_floor_ms"] == pytest.approx(1.0) and r["unfused_ms"] == pytest.approx(1.0)
    assert r["step_floor_ms"] == pytest.approx(1.0 + 1.56e9 / 4e12 * 1e3)
    assert r["kernels_ms"] == pytest.approx(3.5) and r["idle_ms"] == pytest.approx(0.5)
    assert r["matrix_tflops"] == pytest.approx(400.0)  # 1e12 FLOP in 2.5 ms of matrix and attention kernels
    table = roofline.markdown("ssd", [r], (1000.0, 4000.0))
    assert "| 64->64 | 1,000 | 4.0 | 1.0 | 1.0 | 1.4 | 4.0 | 400 |" in table and table.count("| 0.5 | 120 | 1.5 |") == 1
    assert "- 64->64: triton_poi_fused_add_mul_silu_7 (Inductor pointwise) 0.60" in table


def test_a_whole_training_step_is_counted(tmp_path):
    """bench.py --roofline counts train.py's own step (forward, backward, clipping, AdamW, EMA) on an eager run."""
    import bench
    import train
    from data import get_batch
    cfg = bench.eager_config(train.parse_config(["--res", "16", "--batch_size", "4", "--out_dir", str(tmp_path)]))
    data = bench.synthetic_data(16)
    run = train.build_run(cfg, data)
    x0, _ = get_batch(data, 4, torch.Generator().manual_seed(0), run.device)
    t = run.method.path_steps(run.method.paths[0], 4)
    step = lambda: train.train_step(run, cfg, x0, t)
    step()
    params = sum(p.nbytes for p in run.params)
    work = roofline.step_work(step, run.params)
    assert work["unfused_bytes"] > 10 * params  # AdamW alone reads and writes each parameter several times
    assert 0 < work["trained_values"] <= work["values"] == params // 4 and work["norm_values"] > 0


def test_the_bench_tables_read_every_field_the_bench_writes():
    """bench.markdown on results shaped as bench.py writes them, with sampling, the roofline and the batch search."""
    import bench
    path = dict(path="64->64", share=1.0, ms=80.0, images_per_s=1600.0, mfu=0.28, peak_mem_gb=2.0, reserved_gb=9.0)
    work = dict(unfused_bytes=3e10, norm_values=1e9, trained_values=1e8, values=1e8)
    measured = dict(kinds={"conv and matmul": 50.0, "other": 5.0}, wall_ms=80.0, host_ms=20.0, launches=900,
                    heaviest=[("at::native::elementwise_kernel", "other", 5.0)])
    where = roofline.row("64->64", 2e13, work, measured, (800.0, 4000.0))
    train_row = dict(paths=[path], compile_s=3.0, ms_per_step=80.0, images_per_s=1600.0, tflops=270.0, mfu=0.28,
                     peak_mem_gb=2.0, reserved_gb=9.0, roofline=[where])
    sample_row = {"compile_s": 1.0, "100_steps_s": 10.0, "100_steps_flops": 3e15, "100_steps_mfu": 0.3,
                  "100_steps_floor_s": 2.5,
                  "fused_noise_s": 9.5,
                  "kernels_ms": {"attention": 900.0, "conv and matmul": 5100.0},
                  "wall_ms": 10_000.0, "host_ms": 3_000.0, "launches": 52_000,
                  "heaviest": [["triton_red_fused_native_group_norm_0", "Inductor reductions", 420.0]]}
    results = dict(device="GPU", date="2026-12-02", command="python bench.py", ceilings=dict(matmul_tflops=800.0,
                   copy_gbs=4000.0), variants={"ssd": dict(train=train_row, sample=sample_row, max_batch=256),
                                               "full": dict(train=dict(train_row, roofline=[]))})
    results["ratios"] = bench.ratios(results["variants"], [100])
    args = type("Args", (), dict(res=64, levels=4, sample_steps=[100], sample_batch=250))
    table = bench.markdown(results, args)
    assert "| ssd | 80.0 | 1600 | 270 | 28.0% | 2.0 | 9.0 | 10.0 (30%) |" in table
    assert ("10.00 s, of which GPU kernels by kind (s): conv and matmul 5.10, attention 0.90; the GPU idle 4.00 s, "
            "around 52,000 kernels; the host issued them in 3.00 s") in table
    assert "matrix products and attention ran at 500 TFLOP/s" in table  # 3e15 FLOPs (30% MFU for 10 s) in 6 s
    assert "| 64->64 | 20,000 | 30.0 |" in table and "Largest training batch per GPU" in table
    assert "- 64->64: at::native::elementwise_kernel (other) 5.00" in table
    assert "(s): triton_red_fused_native_group_norm_0 (Inductor reductions) 0.42" in table
    assert "the noise made by one kernel (ssd.fused_box_muller): 9.50 s, against 10.00 s" in table
    assert "ceiling (800 TFLOP/s): ssd 2.50 s for 100 steps" in table


def test_the_bench_writes_what_it_has_measured_so_far(tmp_path):
    """bench.save after each measurement: a variant still being measured shows as dashes, the finished ones in full."""
    import bench
    train_row = dict(paths=[], compile_s=3.0, ms_per_step=80.0, images_per_s=1600.0, tflops=270.0, mfu=0.28,
                     peak_mem_gb=2.0, reserved_gb=9.0)
    results = dict(device="GPU", date="2026-12-06", command="python bench.py", variants={"ssd": dict(train=train_row),
                                                                                       "full": {}})
    args = type("Args", (), dict(res=64, levels=4, sample_steps=[100], sample_batch=250, out=str(tmp_path)))
    table = bench.save(results, args)
    assert "| ssd | 80.0 | 1600 | 270 | 28.0% | 2.0 | 9.0 | - |" in table and "| full | - | - |" in table
    assert (tmp_path / "bench_64px.md").read_text() == table + "\n"
    assert json.loads((tmp_path / "bench_64px.json").read_text())["variants"]["ssd"]["train"]["mfu"] == 0.28


@pytest.mark.parametrize("fits_up_to, found", [(100, 96), (64, 64), (31, 24), (5000, 4096)])
def test_the_batch_search_finds_the_largest_multiple_of_8_that_fits(monkeypatch, tmp_path, fits_up_to, found):
    """bench.largest_batch doubles, then halves the interval; a step above fits_up_to images runs out of memory."""
    import bench
    import train
    cfg = bench.eager_config(train.parse_config(["--res", "16", "--batch_size", "4", "--out_dir", str(tmp_path)]))
    data = bench.synthetic_data(16)
    run = train.build_run(cfg, data)
    tried = []

    def step(run, cfg, x0, t, y=None):
        tried.append(x0.shape[0])
        if x0.shape[0] > fits_up_to:
            raise torch.cuda.OutOfMemoryError("out of memory")

    monkeypatch.setattr(train, "train_step", step)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench, "get_batch", lambda data, n, gen, device: (torch.zeros(n, 1, 16, 16), None))
    assert bench.largest_batch(run, cfg, data) == found
    assert len(tried) <= 12 and all(b % 8 == 0 for b in tried)


def test_inductor_kernels_are_summed_per_step_and_set_against_the_copy_ceiling():
    """roofline.kernel_bandwidth on launches as Inductor's bandwidth mode lists them: (ms, GB, GB/s, name)."""
    calls = [(1.0, 2.0, 2000.0, "triton_red_fused_native_group_norm_0"),
             (1.0, 2.0, 2000.0, "triton_red_fused_native_group_norm_0"),
             (0.5, 0.5, 1000.0, "triton_poi_fused_add_1")]
    r = roofline.kernel_bandwidth(calls, copy_gbs=3000.0, heaviest=1)
    assert r["launches"] == 3 and r["ms"] == 2.5 and r["gb"] == 4.5
    assert r["gbs"] == pytest.approx(1800.0) and r["copy_share"] == pytest.approx(0.6)
    assert r["ceiling_ms"] == pytest.approx(1.5)  # 4.5 GB at 3,000 GB/s
    assert r["heaviest"] == [["triton_red_fused_native_group_norm_0", 2, 2.0, 2000.0]]
    import bench
    results = dict(device="GPU", date="2026-12-07", command="python bench.py", ratios={},
                   variants={"ssd": dict(kernel_bandwidth=[dict(path="64->64", **r)])})
    args = type("Args", (), dict(res=64, levels=4, sample_steps=[100], sample_batch=250))
    table = bench.markdown(results, args)
    assert "| 64->64 | 3 | 4.5 | 2.5 | 1,800 | 60% | 1.5 |" in table
    assert "- 64->64: triton_red_fused_native_group_norm_0 2.00 (2, 2,000)" in table


def test_the_kernel_bandwidth_names_the_paths_it_can_measure(tmp_path):
    """bench.py --kernel_bandwidth with a path the run does not have: one line naming those it has."""
    import bench
    import train
    cfg = bench.eager_config(train.parse_config(["--res", "16", "--batch_size", "4", "--out_dir", str(tmp_path)]))
    data = bench.synthetic_data(16)
    run = train.build_run(cfg, data)
    with pytest.raises(SystemExit, match=r"no path 64->64 here; choose from 16->16, 8->8"):
        bench.bench_kernel_bandwidth(run, cfg, data, ["64->64"], (800.0, 3000.0))


def test_the_groupnorm_table_counts_the_passes_the_pair_needs():
    """bench.py --groupnorm: each form's rate is NORM_PASSES passes over the activation in its time."""
    import bench
    activation_bytes = 2 * 128 * 128 * 64 * 64
    row = dict(shape="128 x 128 x 64 x 64", form="per-channel", tuning="fixed", ms=1.0,
               gbs=bench.NORM_PASSES * activation_bytes / 1e6)
    table = bench.groupnorm_markdown([row], copy_gbs=3000.0)
    assert "| 128 x 128 x 64 x 64 | per-channel | fixed | 1.000 | 1,074 | 36% |" in table  # 8 x 134 MB in 1 ms
    assert set(bench.NORM_FORMS.values()) == {(False, 1, False), (True, 1, False), (True, 8, False), (True, 1, True),
                                              (True, 4, True), (True, 8, True), (True, 16, True), (True, 32, True)}


@pytest.mark.parametrize("tuning", ["fixed", "coordinate descent"])
def test_each_groupnorm_form_compiles_with_inductors_options(monkeypatch, tuning):
    """bench.py --groupnorm's timed step, on the CPU: Inductor takes the tuning's options, and the step runs the
    form's forward and backward (the timing itself needs CUDA: one call stands in for it)."""
    import bench
    from flexi_unet import GroupNorm
    calls = []
    monkeypatch.setattr(bench.roofline, "cuda_seconds", lambda step: calls.append(step()) or 1.0)
    norm = GroupNorm(2, 4)
    form = bench.NORM_FORMS["per-channel, 4 row blocks, backward written out"]
    norm.per_channel, norm.row_blocks, norm.fused_grads = form
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    assert bench.norm_seconds(norm, x, bench.TUNINGS[tuning]) == 1.0 and len(calls) == 1
