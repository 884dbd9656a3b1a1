"""`python -m blip2_train.evaluate ...` = `blip2-eval ...` (a Hydra app: key=value overrides, --cfg, -m)."""

from blip2_train.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
