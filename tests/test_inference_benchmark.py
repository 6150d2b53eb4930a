"""benchmarks/inference.py on the CPU (its smoke test): every variant's result carries the breakdown and the
comparison with the eager model, the eager variant matches itself exactly and the one with cached reference frames
matches it to float32 rounding with less work per step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_inference_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "inference.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "inference.py"), "--device", "cpu",
                             "--size", "tiny", "--resolution", "32", "--lowres", "2", "--frames", "4", "--steps", "1",
                             "--given", "2", "--compile", "0", "--vae-channels-last", "0,1", "--vae-chunk", "3,0",
                             "--reuse-references", "0,1", "--kernel", "math", "--decode", "generated,all",
                             "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["reuse_references"], r["vae_channels_last"], r["vae_chunk"], r["decoded"]) for r in results] == \
        [(reuse, cl, chunk, d) for reuse in (False, True) for cl in (False, True) for chunk in (3, 0)
         for d in ("generated", "all")]
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
        # the parts timed on their own (the generator's steps are the rest of the call's time: on the CPU, with one
        # timed call each, that difference is noise and can be negative, so it is not checked)
        assert r["generator_floor_s_at_peak"] > 0 and r["vae_decode_s"] > 0 and r["planner_once_s"] > 0
        # the pipeline's call: the 2 given frames encoded, the 2 generated ones decoded; "all": no encode, 4 decoded
        generated = r["decoded"] == "generated"
        assert r["frames_decoded"] == (2 if generated else 4) and (r["vae_encode_s"] > 0) == generated
    assert "rel L2" in result.stdout  # the summary table


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


def test_pipeline_call_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/pipeline_call.py on the CPU (its smoke test): both tasks timed host to host, whole videos back."""
    out = tmp_path / "pipeline_call.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pipeline_call.py"), "--device", "cpu",
                             "--size", "tiny", "--resolution", "32", "--steps", "1", "--compile", "0",
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [r["task"] for r in results] == ["image_to_video", "interpolation"]
    for r in results:
        assert r["seconds"] > 0 and r["output_shape"] == [12, 3, 32, 32] and r["output_device"] == "cpu"
