"""benchmarks/inference.py on the CPU (its smoke test): every variant's result carries the breakdown and the
comparison with the eager model, the eager variant matches itself exactly and the one with cached reference frames
matches it to float32 rounding with less work per step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def test_inference_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "inference.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "inference.py"), "--device", "cpu",
                             "--size", "tiny", "--resolution", "32", "--lowres", "2", "--frames", "4", "--steps", "1",
                             "--given", "2", "--compile", "0", "--vae-channels-last", "1", "--vae-chunk", "3,0",
                             "--vae-subpixel", "0,1",
                             "--reuse-references", "0,1", "--kernel", "math", "--decode", "generated,all",
                             "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["reuse_references"], r["vae_subpixel"], r["vae_channels_last"], r["vae_chunk"], r["decoded"])
            for r in results] == [(reuse, sub, cl, chunk, d) for reuse in (False, True) for sub in (False, True)
                                  for cl in (True,) for chunk in (3, 0) for d in ("generated", "all")]
    for r in results:
        assert r["compile"] is False and r["compile_mode"] is None and r["peak_mem_gib"] == 0.0
        assert r["sdpa_kernel"] == "math"
        if r["reuse_references"]:
            assert r["max_abs_diff_vs_eager"] < 1e-4 and r["rel_l2_vs_eager"] < 1e-5
            # only the 2 generated frames' tokens run each step, not all 4: about half the eager model's work
            assert r["generator_tflop_per_step"] < 0.6 * results[0]["generator_tflop_per_step"]
            assert r["reference_pass_s"] > 0  # the cached frames' one pass, timed apart
        else:
            assert r["max_abs_diff_vs_eager"] == 0.0 and r["rel_l2_vs_eager"] == 0.0
            assert r["reference_pass_s"] == 0.0
        assert (r["frames"], r["given"], r["steps"]) == (4, 2, 1)
        # the decoded pixels against the eager decoder's: the same decoder exactly, the sub-pixel one to rounding
        assert r["vae_max_abs_diff_vs_eager"] < (1e-4 if r["vae_subpixel"] else 1e-6)
        # the parts timed on their own (the generator's steps are the rest of the call's time: on the CPU, with one
        # timed call each, that difference is noise and can be negative, so it is not checked)
        assert r["generator_floor_s_at_peak"] > 0 and r["vae_decode_s"] > 0 and r["planner_once_s"] > 0
        # the pipeline's call: the 2 given frames encoded, the 2 generated ones decoded; "all": no encode, 4 decoded
        generated = r["decoded"] == "generated"
        assert r["frames_decoded"] == (2 if generated else 4) and (r["vae_encode_s"] > 0) == generated
    assert "rel L2" in result.stdout  # the summary table


def test_inference_benchmark_times_fp8_gemms_against_the_bf16_model(tmp_path):
    """--fp8: each entry's generator has those GEMMs from e4m3 inputs (mardini/models/fp8.py), compared with
    the eager model without them: FP8 moves the samples a little, "none" not at all."""
    out = tmp_path / "inference.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "inference.py"), "--device", "cpu",
                             "--size", "tiny", "--resolution", "32", "--lowres", "2", "--frames", "4", "--steps", "2",
                             "--given", "1", "--compile", "0", "--vae-chunk", "0",
                             "--fp8", "none,mlp,mlp+qkv+proj+fast",
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r["fp8"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == ["none", "mlp", "mlp+qkv+proj+fast"]
    assert rows["none"]["rel_l2_vs_eager"] < 1e-5
    assert all(1e-5 < rows[v]["rel_l2_vs_eager"] < 0.1 for v in ("mlp", "mlp+qkv+proj+fast"))
    assert rows["mlp"]["rel_l2_vs_eager"] != rows["mlp+qkv+proj+fast"]["rel_l2_vs_eager"]
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "inference.py"), "--device", "cpu",
                          "--fp8", "mlp+attn"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--fp8" in bad.stderr


def test_vae_decode_prototype_rows_and_chunking_changes_no_pixel(tmp_path):
    """benchmarks/prototypes/vae_decode.py on the CPU: one row per variant, and the decode of all frames in one call
    equals the 4-frames-per-call reference (fp32) that every row is compared with."""
    out = tmp_path / "vae.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "prototypes" / "vae_decode.py"), "--device",
                             "cpu", "--frames", "5", "--latent", "4", "--chunks", "4,0", "--benchmark", "0",
                             "--compile", "0", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [(r["chunk"], r["compiled"]) for r in rows] == [(4, False), (0, False)]
    assert rows[0]["max_abs_diff_vs_eager4"] == 0.0 and rows[1]["max_abs_diff_vs_eager4"] < 1e-4
    assert all(r["seconds"] > 0 for r in rows)


def test_motion_speed_benchmark_compares_compiled_with_eager_on_cpu(tmp_path):
    """benchmarks/motion_speed.py (train.compile_motion's figure): each estimate's row holds both timings and the
    compiled estimate's distance from the eager one; aot_eager traces as inductor would, without code generation."""
    out = tmp_path / "motion_speed.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "motion_speed.py"), "--device", "cpu",
                             "--batch", "1", "--frames", "5", "--size", "16", "--warmup", "0", "--iters", "1",
                             "--backend", "aot_eager", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r["estimate"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"learned", "bilateral"}
    for r in rows.values():
        assert r["eager"]["ms"] > 0 and r["compiled"]["ms"] > 0 and r["speedup"] > 0
        assert r["max_abs_diff_estimate"] < 1e-5
    assert 0 <= rows["learned"]["grad_rel_diff"] < 1e-4  # fp32 on the CPU: the features' gradient agrees too


def test_split_key_attention_prototype_equals_attention_over_all_keys():
    """benchmarks/prototypes/attention_waves.py folds key chunks into the batch and merges the partial outputs by
    their log-sum-exps: the result must be softmax attention over every key (any number of parts)."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("attention_waves",
                                                  REPO / "benchmarks" / "prototypes" / "attention_waves.py")
    waves = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(waves)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) for n in (6, 12, 12))
    k = k * 3  # peaked attention: a wrong merge weight shows
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for parts in (1, 2, 3, 4):
        assert torch.allclose(waves.split_key_attention(q, k, v, parts), full, atol=1e-12), parts
    halves = [waves.attention_with_lse(q, kc, vc) for kc, vc in zip(k.chunk(2, 2), v.chunk(2, 2))]
    assert not torch.allclose(sum(o for o, _ in halves) / 2, full, atol=1e-3)  # a plain average is not the answer
    try:
        waves.split_key_attention(q, k, v, 5)
    except ValueError as err:
        assert "divisible" in str(err)
    else:
        raise AssertionError("12 keys in 5 parts must be refused")


@pytest.mark.parametrize("fp8", [False, True])
def test_pipeline_call_benchmark_runs_on_cpu(tmp_path, fp8):
    """benchmarks/pipeline_call.py on the CPU (its smoke test): both tasks timed host to host, whole videos back;
    with --fp8 through the pipeline's own switch (the tiny generator: 2 blocks x 4 layers in FP8)."""
    out = tmp_path / "pipeline_call.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pipeline_call.py"), "--device", "cpu",
                             "--size", "tiny", "--resolution", "32", "--steps", "1", "--compile", "0",
                             *(["--fp8"] if fp8 else []), "--out", str(out)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [r["task"] for r in results] == ["image_to_video", "interpolation"]
    for r in results:
        assert r["seconds"] > 0 and r["output_shape"] == [12, 3, 32, 32] and r["output_device"] == "cpu"
        assert r["attn_backend"] == "sdpa" and r["fp8_layers"] == (8 if fp8 else 0)


def load_prototype(name: str):
    """benchmarks/prototypes/<name>.py, loaded by path (the prototypes are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "prototypes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("height,width,bias", [(5, 7, True), (8, 8, False), (1, 1, True)])
def test_subpixel_upsample_is_nearest_repeat_then_conv_with_fewer_multiply_adds(height, width, bias):
    """Each output phase's 2x2 taps are sums of the 3x3 taps that fall on one input pixel: the same function, exact
    in float64, its convolution at 16 (H+1)(W+1) / (36 HW) of the multiply-adds."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    upsample2x_conv3x3 = load_prototype("subpixel_upsample").upsample2x_conv3x3

    g = torch.Generator().manual_seed(height)
    x = torch.randn(2, 6, height, width, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 6, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64) if bias else None
    with FlopCounterMode(display=False) as plain:
        expected = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, b, padding=1)
    with FlopCounterMode(display=False) as subpixel:
        out = upsample2x_conv3x3(x, weight, b)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    conv = lambda counter: counter.get_flop_counts()["Global"][torch.ops.aten.convolution]  # noqa: E731
    ratio = conv(subpixel) / conv(plain)
    assert ratio == pytest.approx(16 * (height + 1) * (width + 1) / (36 * height * width), rel=0.02)


def test_subpixel_upsampling_replaces_the_vae_decoders_upsamplers_and_nothing_else():
    """On a tiny AutoencoderKL: the decoded frames are unchanged (float64), weights and state_dict keys too; only
    the nearest-2x + 3x3 Upsample2D modules are replaced, a second call finds none, and an explicit output size that
    is not 2x takes diffusers' path."""
    from diffusers.models.upsampling import Upsample2D

    from mardini.autoencoders import KLAutoencoder

    prototype = load_prototype("subpixel_upsample")
    SubpixelUpsample2D, use_subpixel_upsampling = prototype.SubpixelUpsample2D, prototype.use_subpixel_upsampling

    torch.manual_seed(0)
    ae = KLAutoencoder(config=dict(block_out_channels=(16, 32, 32), latent_channels=4, norm_num_groups=8,
                                   layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 3,
                                   up_block_types=("UpDecoderBlock2D",) * 3)).double()
    z = torch.randn(1, 2, 4, 5, 6, dtype=torch.float64)
    state = {k: v.clone() for k, v in ae.state_dict().items()}
    with torch.no_grad():
        before = ae.decode(z)
        assert use_subpixel_upsampling(ae.vae.decoder) == 2  # the two upsampling levels of three blocks
        after = ae.decode(z)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-10)
    assert ae.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in ae.state_dict().items())
    assert not any(isinstance(m, Upsample2D) for m in ae.vae.decoder.modules())
    assert use_subpixel_upsampling(ae.vae.decoder) == 0
    others = torch.nn.Sequential(Upsample2D(4, use_conv_transpose=True), Upsample2D(4, use_conv=False),
                                 Upsample2D(4, use_conv=True, kernel_size=1, padding=0))
    assert use_subpixel_upsampling(others) == 0
    upsample = Upsample2D(4, use_conv=True).double()
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(SubpixelUpsample2D(upsample)(x, output_size=(5, 7)), upsample(x, output_size=(5, 7)))
        torch.testing.assert_close(SubpixelUpsample2D(upsample)(x), upsample(x), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="nearest-2x"):
        SubpixelUpsample2D(others[0])


def test_fp8_error_prototype_rounds_to_e4m3_per_row_and_only_the_named_layers():
    """benchmarks/prototypes/fp8_error.py: each row is scaled so its largest entry is e4m3's 448 and rounded to
    3 mantissa bits (relative error <= 2^-4 above the subnormals), and only the linear layers its regex names are
    computed in FP8 (the tiny model's MLP inputs here): the others give the bf16 layer's output exactly; the planner
    is wrapped the same way (--planner-layers)."""
    from mardini.models import MarDini, model_config
    from mardini.models.generator import Generator

    fp8 = load_prototype("fp8_error")
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * torch.tensor([[1e-3], [1.0], [30.0], [1e4]])
    q = fp8.fp8_rows(x)
    torch.testing.assert_close(q.abs().amax(-1), x.abs().amax(-1), rtol=1e-6, atol=0)  # the largest entry kept
    big = x.abs() > x.abs().amax(-1, keepdim=True) / 64  # away from the subnormals
    assert ((q - x).abs() <= x.abs() * 2**-4 + 1e-12)[big].all() and not torch.equal(q, x)
    torch.testing.assert_close(fp8.fp8_rows(q), q, rtol=1e-6, atol=0)  # already representable: unchanged
    generator = Generator(model_config("tiny")).eval()
    wrapped = fp8.ForwardInFP8(generator, r"mlp\.fc_in")
    assert len(wrapped.mode.weights) == len(generator.blocks)
    h = torch.randn(2, 10, generator.blocks[0].mlp.fc_in.in_features)
    with torch.no_grad(), wrapped.mode:
        fc_in, fc_out = generator.blocks[0].mlp.fc_in(h), generator.blocks[0].mlp.fc_out
        hidden = torch.randn(2, 10, fc_out.in_features)
        assert torch.equal(fc_out(hidden), torch.nn.functional.linear(hidden, fc_out.weight, fc_out.bias).detach())
    with torch.no_grad():
        exact = generator.blocks[0].mlp.fc_in(h)
    assert wrapped.mode.calls == 1 and 1e-3 < ((fc_in - exact).norm() / exact.norm()).item() < 0.1
    with pytest.raises(ValueError, match="names no linear layer of the generator"):
        fp8.ForwardInFP8(generator, "no_such_layer")
    # --planner-layers: the planner's one pass wrapped the same way (its MLPs' fc_in in FP8, nothing else)
    model = MarDini(model_config("tiny", latent_channels=4)).eval()
    planner = fp8.ForwardInFP8(model.planner, r"mlp\.fc_in")
    z_lo, mask = torch.randn(1, 3, 4, 4, 4), torch.tensor([[False, True, False]])
    with torch.no_grad():
        exact, rounded = model.planner(z_lo, mask), planner(z_lo, mask)
    assert planner.mode.calls == len(model.planner.blocks)
    assert 1e-4 < ((rounded - exact).norm() / exact.norm()).item() < 0.1


def test_fp8_generator_prototype_command_line_runs_bf16_and_fp8(tmp_path):
    out = tmp_path / "fp8_generator.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "prototypes" / "fp8_generator.py"), "--device",
                             "cpu", "--size", "tiny", "--latent", "8", "--frames", "5", "--steps", "2", "--compile",
                             "0", "--variants", "bf16,mlp+qkv+proj+fast", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["bf16"]["fp8_linears"] == 0 and rows["bf16"]["rel_l2_vs_eager_bf16"] == 0.0
    assert rows["mlp+qkv+proj+fast"]["fp8_linears"] > 0 and 0 < rows["mlp+qkv+proj+fast"]["rel_l2_vs_eager_bf16"] < 0.1


def test_fp8_generator_prototype_computes_the_named_gemms_from_e4m3():
    """benchmarks/prototypes/fp8_generator.py's variants (inference.fp8_choice, then the library's use_fp8_gemms): the
    MLPs' two GEMMs and the self-attention's qkv projection (and its output projection, when named) are swapped,
    each computing what the bf16 layer does up to FP8 rounding (torch._scaled_mm's rowwise mode, which the CPU build
    also runs), and nothing else changes."""
    from mardini.models import model_config
    from mardini.models.fp8 import use_fp8_gemms
    from mardini.models.generator import Generator
    from mardini.models.layers import MLP, SelfAttention

    fp8 = load_prototype("fp8_generator")
    torch.manual_seed(0)
    generator = Generator(model_config("tiny")).to(torch.bfloat16).eval()
    block = generator.blocks[0]
    x = torch.randn(2, 16, block.mlp.fc_in.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        exact = block.mlp(x).float(), block.attn.qkv(x).float(), block.cross.proj(x).float()
        mlps = sum(isinstance(m, MLP) for m in generator.modules())
        attentions = sum(isinstance(m, SelfAttention) for m in generator.modules())
        assert use_fp8_gemms(generator, *fp8.fp8_choice("mlp+qkv")) == 2 * mlps + attentions
        out = block.mlp(x).float(), block.attn.qkv(x).float(), block.cross.proj(x).float()
    for a, b in zip(out[:2], exact[:2]):
        assert 1e-3 < ((a - b).norm() / b.norm()).item() < 0.1
    assert torch.equal(out[2], exact[2])  # the cross-attention's projection stays bf16
    assert not block.attn.qkv.fast_accum and type(block.attn.proj) is torch.nn.Linear
    # "proj": the self-attention's output projection too; "fast": fast accumulation, no layer of its own
    assert use_fp8_gemms(generator, *fp8.fp8_choice("proj+fast")) == attentions
    assert block.attn.proj.fast_accum and not block.attn.qkv.fast_accum
