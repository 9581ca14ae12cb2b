"""asv_bench/benchmarks/targets.py: how one run's records become SPEC section 6 verdicts
(BENCHMARKS.md and compare.py print these; a wrong verdict would misreport a target)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "asv_bench"))

from benchmarks import targets  # noqa: E402

SHAPE_B = dict(B=1, T=32768, HQ=16, H=16, K=64, V=64, M=64, W=2048, dtype="bfloat16")


def _verdicts(result, impl="nha_triton"):
    return {(t["target"], t["shape"]): t for t in targets.evaluate(result) if t["impl"] == impl}


def test_ratios_agreement_and_memory():
    result = {
        "shapes": ["gpu-b", "decode"], "shape_defs": {"gpu-b": SHAPE_B}, "copy_bandwidth_gbs": 4000.0,
        "ratios": [
            {"shape": "gpu-b", "mode": "forward", "impl": "nha_triton", "peer": "flex_window", "ratio": 1.4},
            {"shape": "gpu-b", "mode": "forward", "impl": "nha_triton", "peer": "sdpa_causal", "ratio": 0.32},
            {"shape": "decode", "mode": "decode", "impl": "nha_triton", "peer": "sdpa_kvcache", "ratio": 0.1},
        ],
        "records": [
            {"shape": "gpu-b", "impl": "nha_triton", "mode": "accuracy", "status": "ok", "rel_err_vs_composition": 3e-3},
            {"shape": "gpu-b", "impl": "nha_triton", "mode": "forward_backward", "status": "ok", "peak_mib": 100.0},
            {"shape": "decode", "impl": "nha_triton", "mode": "decode", "status": "ok", "gbs": 2000.0},
            {"shape": "gpu-b", "impl": "nha_cupy", "mode": "accuracy", "status": "skipped", "reason": "time budget"},
        ],
    }
    v = _verdicts(result)
    assert v[("forward <= 1.5x FlexAttention sliding window", "gpu-b")]["met"] is True
    assert v[("gpu-b forward >= 5x faster than SDPA full causal", "gpu-b")]["met"] is False
    assert v[("decode step >= 5x faster than full-KV-cache SDPA decode", "decode")]["met"] is True
    assert v[("decode step >= 60% of measured copy bandwidth", "decode")]["met"] is False   # 2000 / 4000
    assert v[("output agrees with the composition (bf16 relative error)", "gpu-b")]["met"] is True
    # resident q, k, v, g, do = 320 MiB; io 640 MiB; (320 + 100) / 640 = 0.656
    memory = v[("forward+backward peak memory <= 1.3x inputs+outputs+gradients", "gpu-b")]
    assert memory["met"] is True and abs(memory["value"] - 420 / 640) < 1e-9
    assert v[("forward+backward <= 2x FlexAttention sliding window", "gpu-b")]["met"] is None

    cupy = _verdicts(result, "nha_cupy")
    agreement = cupy[("output agrees with the composition (bf16 relative error)", "gpu-b")]
    assert agreement["met"] is None and "time budget" in agreement["reason"]
    # a peak that was not measured (CuPy's pool before torch_allocator) is no verdict, not a pass
    assert cupy[("forward+backward peak memory <= 1.3x inputs+outputs+gradients", "gpu-b")]["met"] is None


def test_unmeasured_peak_keeps_its_reason():
    result = {"shapes": ["gpu-b"], "shape_defs": {"gpu-b": SHAPE_B}, "ratios": [], "records": [
        {"shape": "gpu-b", "impl": "nha_cupy", "mode": "forward_backward", "status": "ok", "peak_mib": None,
         "peak_note": "CuPy's pool is not counted"}]}
    memory = _verdicts(result, "nha_cupy")[("forward+backward peak memory <= 1.3x inputs+outputs+gradients", "gpu-b")]
    assert memory["met"] is None and memory["reason"] == "CuPy's pool is not counted"


def test_results_rebuilt_from_streamed_records(tmp_path):
    """compare.py --from-records: a run cut by its timeout still yields results (metadata line
    first, then records); a record not "ok" enters no ratio."""
    import json

    import compare

    meta = {"device": "card", "date": "d", "commit": "c", "mode": "gpu", "quick": False, "versions": {},
            "copy_bandwidth_gbs": 4000.0}
    rows = [{"meta": meta},
            {"shape": "gpu-b", "impl": "nha_triton", "mode": "forward", "status": "ok", "ms": 2.0},
            {"shape": "gpu-b", "impl": "sdpa_causal", "mode": "forward", "status": "ok", "ms": 8.0},
            {"shape": "gpu-b", "impl": "flex_window", "mode": "forward", "status": "invalid", "ms": 900.0},
            {"shape": "decode", "impl": "nha_triton", "mode": "decode", "status": "ok", "ms": 0.2, "gbs": 3000.0}]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = compare.from_records(str(path))
    assert result["device"] == "card" and result["shapes"] == ["gpu-b", "decode"]
    assert [(r["peer"], r["ratio"]) for r in result["ratios"]] == [("sdpa_causal", 0.25)]
    assert result["records"][-1]["fraction_of_copy_bandwidth"] == 0.75
    v = {(t["target"], t["shape"]): t for t in result["targets"] if t["impl"] == "nha_triton"}
    assert v[("gpu-b forward >= 5x faster than SDPA full causal", "gpu-b")]["met"] is False   # 0.25 > 0.2
    assert v[("forward <= 1.5x FlexAttention sliding window", "gpu-b")]["met"] is None
    compare.write_results(result, str(tmp_path))
    assert "Written from the streamed records records.jsonl" in (tmp_path / "results.md").read_text()
