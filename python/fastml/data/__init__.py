"""fastml.data: columnar data into shuffled, batched, prefetched batches (see issue #3)."""
