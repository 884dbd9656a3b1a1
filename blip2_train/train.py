"""`python -m blip2_train.train ...` = `blip2-train ...` (a Hydra app: key=value overrides, --cfg, -m)."""

from blip2_train.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
