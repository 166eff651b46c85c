"""fastml.drift: streaming, mergeable drift statistics (see issue #4)."""
