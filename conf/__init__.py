"""blip2-train's Hydra configs. This directory ships inside the package as `blip2_train.conf` (the symlink
blip2_train/conf), so Hydra finds it at `pkg://blip2_train.conf` from a wheel as well as from a source checkout."""
