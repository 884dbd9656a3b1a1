"""blip2-train: train BLIP-2 vision-language models (Q-Former stage 1, LLM stage 2).

Pipeline layout: data -> models (pure nn.Modules, losses as functions) -> lit (Lightning modules)
-> eval -> cli.
"""

__version__ = "0.1.0"
