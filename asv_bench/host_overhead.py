import time, sys, torch, nha_core
sys.path.insert(0, "asv_bench")
from benchmarks import common
for name in ("gpu-a64", "gpu-a"):
    shape = common.SHAPES[name]
    x = common.make_inputs(shape, lib="torch")
    f = lambda: nha_core.attention(x["q"], x["k"], x["v"], x["g"], window_size=shape.W, backend="triton")
    for _ in range(5): f()
    torch.cuda.synchronize()
    for rep in range(3):
        t = time.perf_counter()
        for _ in range(50): f()
        host = (time.perf_counter() - t) / 50
        torch.cuda.synchronize()
        tot = (time.perf_counter() - t) / 50
        print(name, f"host per call {host*1e3:.3f} ms, with sync {tot*1e3:.3f} ms", flush=True)
    import cProfile, pstats
    pr = cProfile.Profile(); pr.enable()
    for _ in range(50): f()
    pr.disable(); torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(14)
