"""fastml.bench: benchmarks that compare fastml with its peers on this machine (see issue #8)."""
