"""GPU suite (CUDA, bf16): NHA backends and peers at the SPEC section 6 shapes.

* ``Forward`` / ``ForwardBackward`` / ``Decode``: wall time per call through asv's ``time_*``,
  with a device synchronize inside the timed function (CUDA launches are asynchronous).
* ``Summary``: one process (``setup_cache``) measures everything with device timers
  (triton.testing.do_bench medians), peak device memory, ratios against the peers and errors
  against the composition; its ``track_*`` benchmarks read those numbers back.

Without CUDA every setup raises NotImplementedError, so a CPU machine skips the whole file.
A ``Summary`` number that was not measured (a peer missing, a backend failing, the time budget)
is skipped with its reason (asv_runner's SkipNotImplemented, recorded as n/a), not failed.
"""
import os

from . import calls, common

try:
    from asv_runner.benchmarks.mark import SkipNotImplemented
except Exception:  # older asv_runner, or imported without asv (compare.py does not import this file)
    class SkipNotImplemented(NotImplementedError):
        pass

IMPLS = [f"nha_{b}" for b in common.GPU_BACKENDS] + list(calls.GPU_PEERS)


class _Case:
    mode = "forward"
    rounds = 1          # every round is a new process: a new compile/autotune
    repeat = (3, 10, 5.0)
    warmup_time = 0.2
    timeout = 600

    def setup(self, shape, impl, dtype):
        self.call = calls.make_call(common.SHAPES[shape], impl, self.mode, dtype=dtype)


class Forward(_Case):
    params = (list(common.GPU_SHAPES), IMPLS, list(common.GPU_DTYPES))
    param_names = ["shape", "impl", "dtype"]
    mode = "forward"

    def time_forward(self, shape, impl, dtype):
        self.call.run()
        self.call.sync()


class ForwardBackward(_Case):
    params = (list(common.GPU_SHAPES), IMPLS, list(common.GPU_DTYPES))
    param_names = ["shape", "impl", "dtype"]
    mode = "forward_backward"

    def time_forward_backward(self, shape, impl, dtype):
        self.call.run()
        self.call.sync()


class Decode(_Case):
    params = (list(common.GPU_DECODE_SHAPES), [f"nha_{b}" for b in common.GPU_BACKENDS] + list(calls.DECODE_PEERS),
              list(common.GPU_DTYPES))
    param_names = ["shape", "impl", "dtype"]
    mode = "decode"

    def time_decode_step(self, shape, impl, dtype):
        self.call.run()
        self.call.sync()


def _skip(reason):
    """Skip one parameter combination inside a track_* body (setup has already run), saying why."""
    print(f"asv: skipped: {reason}", flush=True)
    raise SkipNotImplemented(reason)


def _pick(records, **match):
    for r in records:
        if all(r.get(k) == v for k, v in match.items()):
            if r.get("status") != "ok":
                _skip(f"{match}: {r.get('status')}: {r.get('reason')}")
            return r
    _skip(f"{match}: not measured")


class Summary:
    """Device-timed numbers of one process; NotImplementedError marks what could not be measured."""

    timeout = 900
    number = 1
    repeat = 1
    rounds = 1

    def setup_cache(self):
        import time

        from . import measure

        try:
            common.cuda_or_skip()
        except NotImplementedError as error:
            return {"error": str(error), "records": [], "ratios": []}
        deadline = time.perf_counter() + float(os.environ.get("NHA_GPU_BUDGET_S", "480"))
        # NHA_GPU_SHAPES (comma list) narrows a run to what fits one command on a lent GPU
        shapes = os.environ.get("NHA_GPU_SHAPES", ",".join(list(common.GPU_SHAPES) + list(common.GPU_DECODE_SHAPES)))
        shapes = shapes.split(",")
        try:
            copy_gbs = common.gpu_copy_bandwidth_gbs()
        except Exception:
            copy_gbs = None
        records = measure.run_all(shapes, deadline=deadline, log=lambda *a: None)
        for r in records:
            if r.get("gbs") and copy_gbs:
                r["fraction_of_copy_bandwidth"] = r["gbs"] / copy_gbs
        return {"records": records, "ratios": measure.ratio_table(records), "copy_bandwidth_gbs": copy_gbs}

    def setup(self, cache, *params):
        # no CUDA (a CPU machine): every Summary benchmark is skipped here, before its body runs
        if cache.get("error"):
            raise NotImplementedError(cache["error"])

    def _records(self, cache):
        if cache.get("error"):
            raise NotImplementedError(cache["error"])
        return cache["records"]

    def track_forward_ms(self, cache, shape, impl):
        return _pick(self._records(cache), shape=shape, impl=impl, mode="forward")["ms"]

    track_forward_ms.params = (list(common.GPU_SHAPES), IMPLS)
    track_forward_ms.param_names = ["shape", "impl"]
    track_forward_ms.unit = "ms"

    def track_forward_backward_ms(self, cache, shape, impl):
        return _pick(self._records(cache), shape=shape, impl=impl, mode="forward_backward")["ms"]

    track_forward_backward_ms.params = track_forward_ms.params
    track_forward_backward_ms.param_names = ["shape", "impl"]
    track_forward_backward_ms.unit = "ms"

    def track_forward_peak_mib(self, cache, shape, impl):
        return _pick(self._records(cache), shape=shape, impl=impl, mode="forward")["peak_mib"]

    track_forward_peak_mib.params = track_forward_ms.params
    track_forward_peak_mib.param_names = ["shape", "impl"]
    track_forward_peak_mib.unit = "MiB"

    def track_forward_backward_peak_mib(self, cache, shape, impl):
        return _pick(self._records(cache), shape=shape, impl=impl, mode="forward_backward")["peak_mib"]

    track_forward_backward_peak_mib.params = track_forward_ms.params
    track_forward_backward_peak_mib.param_names = ["shape", "impl"]
    track_forward_backward_peak_mib.unit = "MiB"

    def track_decode_us(self, cache, impl):
        return 1e3 * _pick(self._records(cache), shape="decode", impl=impl, mode="decode")["ms"]

    track_decode_us.params = ([f"nha_{b}" for b in common.GPU_BACKENDS] + list(calls.DECODE_PEERS),)
    track_decode_us.param_names = ["impl"]
    track_decode_us.unit = "us"

    def track_decode_gbs(self, cache, backend):
        """Bytes a decode step must touch / its time (SPEC: >= 60% of the card's bandwidth)."""
        return _pick(self._records(cache), shape="decode", impl=f"nha_{backend}", mode="decode")["gbs"]

    track_decode_gbs.params = (list(common.GPU_BACKENDS),)
    track_decode_gbs.param_names = ["backend"]
    track_decode_gbs.unit = "GB/s"

    def track_decode_fraction_of_copy_bandwidth(self, cache, backend):
        """Decode GB/s / the device copy bandwidth measured in the same process (target >= 0.6)."""
        r = _pick(self._records(cache), shape="decode", impl=f"nha_{backend}", mode="decode")
        if r.get("fraction_of_copy_bandwidth") is None:
            _skip("copy bandwidth not measured")
        return r["fraction_of_copy_bandwidth"]

    track_decode_fraction_of_copy_bandwidth.params = (list(common.GPU_BACKENDS),)
    track_decode_fraction_of_copy_bandwidth.param_names = ["backend"]
    track_decode_fraction_of_copy_bandwidth.unit = "ratio"

    def track_forward_backward_peak_over_io(self, cache, shape, backend):
        """(inputs + do resident + peak extra) / bytes of inputs + outputs + gradients (gpu-b target <= 1.3)."""
        return _pick(self._records(cache), shape=shape, impl=f"nha_{backend}", mode="forward_backward")[
            "peak_over_io"]

    track_forward_backward_peak_over_io.params = (list(common.GPU_SHAPES), list(common.GPU_BACKENDS))
    track_forward_backward_peak_over_io.param_names = ["shape", "backend"]
    track_forward_backward_peak_over_io.unit = "ratio"

    def track_ratio(self, cache, shape, mode, backend, peer):
        """NHA time / peer time, same process (targets: <= 1.5 vs flex_window forward, <= 1/8 vs
        composition, gpu-b <= 1/5 vs sdpa_causal, cupy <= 1.25 vs nha_triton)."""
        self._records(cache)
        for r in cache["ratios"]:
            if (r["shape"], r["mode"], r["impl"], r["peer"]) == (shape, mode, f"nha_{backend}", peer):
                return r["ratio"]
        _skip(f"no ratio for {shape} {mode} nha_{backend} / {peer}")

    track_ratio.params = (list(common.GPU_SHAPES), ["forward", "forward_backward"], list(common.GPU_BACKENDS),
                          list(calls.GPU_PEERS) + ["nha_triton"])
    track_ratio.param_names = ["shape", "mode", "backend", "peer"]
    track_ratio.unit = "ratio"

    def track_decode_ratio_vs_kvcache(self, cache, backend):
        """NHA decode step time / full-KV-cache SDPA decode at 32768 context (target <= 0.2)."""
        recs = self._records(cache)
        nha = _pick(recs, shape="decode", impl=f"nha_{backend}", mode="decode")["ms"]
        return nha / _pick(recs, shape="decode", impl="sdpa_kvcache", mode="decode")["ms"]

    track_decode_ratio_vs_kvcache.params = (list(common.GPU_BACKENDS),)
    track_decode_ratio_vs_kvcache.param_names = ["backend"]
    track_decode_ratio_vs_kvcache.unit = "ratio"

    def track_rel_err_vs_composition(self, cache, shape, backend):
        return _pick(self._records(cache), shape=shape, impl=f"nha_{backend}", mode="accuracy")[
            "rel_err_vs_composition"]

    track_rel_err_vs_composition.params = (list(common.GPU_SHAPES), list(common.GPU_BACKENDS))
    track_rel_err_vs_composition.param_names = ["shape", "backend"]
    track_rel_err_vs_composition.unit = "relative error"
