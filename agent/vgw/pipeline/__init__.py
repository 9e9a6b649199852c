"""The data path between a source and the outbox: id filter, compiled decoders, consent policy, batching."""
