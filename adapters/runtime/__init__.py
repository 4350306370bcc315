"""What runs a loaded model, whatever its family: the engine thread, the sampler, KV caches and
their reuse, incremental detokenization and stop strings, dtypes.  Nothing here names a family."""
