"""SPEC section 6 targets, checked against one run's numbers (compare.py results, bench_gpu.Summary).

Standard library only: make_benchmarks_md.py re-checks committed results.json files with it,
also files written before the targets were recorded.

Each target is a ratio within one run (so it holds across machines):

* forward, NHA / flex_window <= 1.5; NHA / composition <= 1/8 (>= 8x faster)
* forward+backward, NHA / flex_window <= 2
* gpu-b forward, NHA / sdpa_causal <= 0.2 (>= 5x faster than SDPA full causal)
* decode: GB/s on the bytes a step must touch >= 60% of the measured copy bandwidth;
  NHA / sdpa_kvcache <= 0.2 (>= 5x faster than a full-KV-cache decode)
* nha_cupy / nha_triton <= 1.25 (forward, forward+backward, decode)
* agreement with the composition (output relative error, bf16) <= 2e-2 (SPEC section 5) at
  every GPU shape but decode
* gpu-b forward+backward peak memory <= 1.3x the bytes of inputs + outputs + gradients:
  (bytes resident before the call + peak extra during it) / io_bytes, where resident = q, k, v, g
  and the output gradient do, and io_bytes = q, k, v, g + o + do + dq, dk, dv, dg.
"""
from __future__ import annotations

MIB = 1 << 20
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}

# (name, shape or None for every GPU shape, mode, peer, op, limit)
RATIO_TARGETS = (
    ("forward <= 1.5x FlexAttention sliding window", None, "forward", "flex_window", "<=", 1.5),
    ("forward >= 8x faster than the fla+Flex composition", None, "forward", "composition", "<=", 0.125),
    ("forward+backward <= 2x FlexAttention sliding window", None, "forward_backward", "flex_window", "<=", 2.0),
    ("gpu-b forward >= 5x faster than SDPA full causal", "gpu-b", "forward", "sdpa_causal", "<=", 0.2),
    ("decode step >= 5x faster than full-KV-cache SDPA decode", "decode", "decode", "sdpa_kvcache", "<=", 0.2),
)
CUPY_LIMIT = 1.25
AGREEMENT_LIMIT = 2e-2
DECODE_BANDWIDTH_FRACTION = 0.6
MEMORY_SHAPE, MEMORY_LIMIT = "gpu-b", 1.3
GPU_TARGET_SHAPES = ("gpu-a", "gpu-a64", "gpu-b", "gpu-c", "decode")


def fwd_bwd_io_bytes(shape_def: dict) -> tuple[int, int]:
    """(resident, io) bytes of an NHA forward+backward at a shape (a Shape.__dict__).

    resident: q [B,T,HQ,K], k [B,T,H,K], v [B,T,H,V], g [B,T,H,M] and do [B,T,HQ,V], allocated
    before the timed call; io: those plus the output o and the gradients dq, dk, dv, dg.
    """
    d = shape_def
    item = ITEMSIZE[d["dtype"]]
    bt = d["B"] * d["T"]
    inputs = bt * (d["HQ"] * d["K"] + d["H"] * d["K"] + d["H"] * d["V"] + d["H"] * d["M"]) * item
    out = bt * d["HQ"] * d["V"] * item
    return inputs + out, 2 * inputs + 2 * out


def peak_over_io(shape_def: dict, peak_mib: float) -> float:
    resident, io = fwd_bwd_io_bytes(shape_def)
    return (resident + peak_mib * MIB) / io


def _row(target, shape, impl, op, limit, value=None, reason=None, detail=None):
    met = None
    if value is not None:
        met = value <= limit if op == "<=" else value >= limit
    row = {"target": target, "shape": shape, "impl": impl, "op": op, "limit": limit, "value": value, "met": met}
    if reason:
        row["reason"] = reason
    if detail:
        row["detail"] = detail
    return row


def evaluate(result: dict, backends=("triton", "cupy")) -> list[dict]:
    """Every SPEC target for every NHA backend at the GPU shapes of a compare.py result dict
    (keys records, ratios, shapes, shape_defs, copy_bandwidth_gbs). ``met`` is True / False, or
    None with a ``reason`` when a number it needs was not measured."""
    shapes = [s for s in result.get("shapes", []) if s in GPU_TARGET_SHAPES]
    records = result.get("records", [])
    ratios = {(r["shape"], r["mode"], r["impl"], r["peer"]): r["ratio"] for r in result.get("ratios", [])}

    def rec(shape, impl, mode):
        for r in records:
            if (r["shape"], r["impl"], r["mode"]) == (shape, impl, mode):
                return r
        return None

    def why(shape, mode, *impls):
        out = []
        for impl in impls:
            r = rec(shape, impl, mode)
            if r is None:
                out.append(f"{impl} {mode}: not in this run")
            elif r.get("status") != "ok":
                out.append(f"{impl} {mode}: {r.get('status')}: {r.get('reason', '')}"[:200])
        return "; ".join(out) or "no ratio recorded"

    rows = []
    for shape in shapes:
        for backend in backends:
            impl = f"nha_{backend}"
            for target, only, mode, peer, op, limit in RATIO_TARGETS:
                if (only is None and shape == "decode") or (only is not None and only != shape):
                    continue
                value = ratios.get((shape, mode, impl, peer))
                rows.append(_row(target, shape, impl, op, limit, value,
                                 None if value is not None else why(shape, mode, impl, peer)))
            if backend == "cupy":
                for mode in (("decode",) if shape == "decode" else ("forward", "forward_backward")):
                    value = ratios.get((shape, mode, impl, "nha_triton"))
                    rows.append(_row(f"CuPy {mode} <= 1.25x Triton", shape, impl, "<=", CUPY_LIMIT, value,
                                     None if value is not None else why(shape, mode, impl, "nha_triton")))
            if shape == "decode":
                r = rec(shape, impl, "decode")
                value = r.get("fraction_of_copy_bandwidth") if r and r.get("status") == "ok" else None
                if value is None and r and r.get("gbs") and result.get("copy_bandwidth_gbs"):
                    value = r["gbs"] / result["copy_bandwidth_gbs"]
                reason = None
                if value is None:
                    reason = why(shape, "decode", impl) if not r or r.get("status") != "ok" else \
                        "copy bandwidth not measured"
                rows.append(_row("decode step >= 60% of measured copy bandwidth", shape, impl, ">=",
                                 DECODE_BANDWIDTH_FRACTION, value, reason,
                                 f"{r['gbs']:.0f} GB/s" if r and r.get("gbs") else None))
            if shape != "decode":
                r = rec(shape, impl, "accuracy")
                ok = r is not None and r.get("status") == "ok" and r.get("rel_err_vs_composition") is not None
                rows.append(_row("output agrees with the composition (bf16 relative error)", shape, impl, "<=",
                                 AGREEMENT_LIMIT, r["rel_err_vs_composition"] if ok else None,
                                 None if ok else why(shape, "accuracy", impl)))
            if shape == MEMORY_SHAPE:
                r = rec(shape, impl, "forward_backward")
                d = result.get("shape_defs", {}).get(shape)
                value = detail = reason = None
                if r and r.get("status") == "ok" and r.get("peak_mib") is not None and d:
                    value = peak_over_io(d, r["peak_mib"])
                    resident, io = fwd_bwd_io_bytes(d)
                    detail = (f"peak extra {r['peak_mib']:.0f} MiB + resident {resident / MIB:.0f} MiB "
                              f"vs inputs+outputs+gradients {io / MIB:.0f} MiB")
                elif r and r.get("status") == "ok":
                    reason = r.get("peak_note", "peak memory not measured")
                else:
                    reason = why(shape, "forward_backward", impl) if d else "shape definition missing"
                rows.append(_row("forward+backward peak memory <= 1.3x inputs+outputs+gradients", shape, impl,
                                 "<=", MEMORY_LIMIT, value, reason, detail))
    return rows
