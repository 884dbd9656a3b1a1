"""What the tests share: tiny models and overrides, subprocess launches, tar shards, fault injection and the
worker scripts that subprocesses run."""
