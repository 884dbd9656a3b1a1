"""Caption scoring with pycocoevalcap (pure: references and predictions in, metrics x100 out).

pycocoevalcap's `COCOEvalCap.evaluate()` builds SPICE unconditionally; SPICE downloads Stanford CoreNLP on
first use, so offline the stock call returns nothing. We run the scorers ourselves (same tokenizer, same
scorers, same x100 reporting as the papers) and add SPICE only when its jars are already installed.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def require_pycocoevalcap() -> None:
    """pycocoevalcap is imported only where captions are scored (the package, training and retrieval / VQA run
    without it): its absence is one line naming the package, not a traceback."""
    import importlib.util

    if importlib.util.find_spec("pycocoevalcap") is None:
        from blip2_train.utils.errors import ConfigError

        raise ConfigError("the captioning metrics (BLEU, METEOR, ROUGE-L, CIDEr) need pycocoevalcap, which is not "
                          "installed: pip install pycocoevalcap (METEOR and the PTB tokenizer also need Java)")


def spice_available() -> bool:
    require_pycocoevalcap()
    import pycocoevalcap.spice as spice_pkg

    lib = Path(spice_pkg.__file__).parent / "lib"
    return (lib / "stanford-corenlp-3.6.0.jar").exists() and (lib / "stanford-corenlp-3.6.0-models.jar").exists()


_METEOR = None


def _meteor():
    """One METEOR JVM per process (starting it costs ~5 s; pycocoevalcap would start one per call)."""
    global _METEOR
    if _METEOR is None:
        require_pycocoevalcap()
        from pycocoevalcap.meteor.meteor import Meteor

        _METEOR = Meteor()
    return _METEOR


def tokenize(gts: dict, res: dict) -> tuple[dict, dict]:
    """PTB-tokenize references and predictions (one Java call for both)."""
    require_pycocoevalcap()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    missing = set(gts) ^ set(res)
    if missing:
        raise ValueError(f"{len(missing)} image(s) have references but no prediction or the reverse, e.g. "
                         f"{sorted(map(str, missing))[:3]}")
    both = {("g", k): [{"caption": c} for c in v] for k, v in gts.items()}
    both.update({("r", k): [{"caption": v}] for k, v in res.items()})
    tok = PTBTokenizer().tokenize(both)
    return {k: tok[("g", k)] for k in gts}, {k: tok[("r", k)] for k in res}


def score_tokenized(g: dict, r: dict, spice: bool = False) -> dict[str, float]:
    require_pycocoevalcap()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scorers = [(Bleu(4), ["bleu1", "bleu2", "bleu3", "bleu4"]), (_meteor(), ["meteor"]), (Rouge(), ["rouge_l"]),
               (Cider(), ["cider"])]
    if spice:
        from pycocoevalcap.spice.spice import Spice

        scorers.append((Spice(), ["spice"]))
    out = {}
    for scorer, names in scorers:
        score, _ = scorer.compute_score(g, r)
        for n, v in zip(names, score if isinstance(score, list) else [score]):
            out[n] = float(v) * 100.0
    return out


def score_captions(gts: dict, res: dict, spice: str | bool = "auto") -> tuple[dict[str, float], list[str]]:
    """gts {image_id: [reference captions]}, res {image_id: caption} -> (metrics x100, notes).

    Every image with a prediction must have references and vice versa: a silently partial score is worse
    than an error.
    """
    want_spice, notes = spice_plan(spice)
    g, r = tokenize(gts, res)
    return score_tokenized(g, r, want_spice), notes


def spice_plan(spice: str | bool) -> tuple[bool, list[str]]:
    """-> (run SPICE?, notes). `auto` runs it only when its jars are installed, and says so when not."""
    want = spice is True or (spice == "auto" and spice_available())
    notes = []
    if spice == "auto" and not want:
        notes.append("SPICE skipped: Stanford CoreNLP jars not installed in pycocoevalcap/spice/lib "
                     "(run pycocoevalcap's get_stanford_models once with network access)")
        log.warning(notes[-1])
    return want, notes


def prediction_image_id(image_id: str):
    return int(image_id) if str(image_id).isdigit() else image_id



def coco_format(gts: dict) -> dict:
    """References as a COCO caption annotation file (what pycocotools' COCO() reads)."""
    images, anns = [], []
    for k, caps in gts.items():
        iid = prediction_image_id(k)
        images.append({"id": iid})
        anns.extend({"image_id": iid, "id": len(anns), "caption": c} for c in caps)
    return {"images": images, "annotations": anns, "type": "captions", "info": {}, "licenses": []}
