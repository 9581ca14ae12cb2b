"""asv benchmarks for nha_core; see asv_bench/README.md."""
