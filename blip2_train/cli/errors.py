"""Known errors -> one readable line (ours, Hydra's, OmegaConf's, a missing file); anything else stays a
traceback."""

from __future__ import annotations

import os
import re

from blip2_train.utils.errors import Blip2TrainError
from blip2_train.utils.io import describe_no_space, no_space_error

def describe_config_error(e: BaseException) -> str:
    """Hydra/OmegaConf errors -> one line naming the key."""
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

    chain, cur = [], e
    while cur is not None and len(chain) < 6:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for c in chain:
        key = getattr(c, "full_key", None)
        m = re.search(r"Missing mandatory value: ([\w.\[\]]+)", str(c))
        if m:
            key = m.group(1)
        if isinstance(c, MissingMandatoryValue) or m:
            return f"missing required config value '{key}' (set it on the command line: {key}=...)"
        if isinstance(c, ConfigKeyError):
            return _unknown_key_line(str(key))
        if isinstance(c, ValidationError):
            return describe_type_error(c, key)
    text = str(e)
    everything = " ".join(str(c) for c in chain)
    m = re.search(r"Could not override '([^']+)'", text)
    if m and not re.search(r"could not be converted|Validation|is not a valid", everything):
        return _unknown_key_line(m.group(1))
    m = re.search(r"Could not (?:find|load) '([^']+)'", text)
    if m:
        return f"unknown config option '{m.group(1)}' ({text.strip().splitlines()[0]})"
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def _unknown_key_line(key: str) -> str:
    from blip2_train.config.schemas import SCHEMAS

    group, _, rest = key.partition(".")
    if group in SCHEMAS and rest and "." not in rest:  # the group's keys are its target's arguments
        return f"unknown config key '{key}' (check the spelling: the keys of '{group}' are its target's arguments)"
    return f"unknown config key '{key}' (check the spelling; to add a new key use +{key}=...)"


_TYPE_WORDS = {"Integer": "int", "Float": "float", "String": "str", "Boolean": "bool"}


def describe_type_error(c: BaseException, key: str | None) -> str:
    """A schema's ValidationError -> `config value data.batch_size='abc' must be int (str given)`."""
    msg = str(c).splitlines()[0]
    m = re.search(r"could not be converted to (\w+)|is not a valid (\w+)", msg)
    value = getattr(c, "value", None)
    if m and key:
        want = _TYPE_WORDS.get(m.group(1) or m.group(2), m.group(1) or m.group(2))
        return f"config value {key}={value!r} must be {want} ({type(value).__name__} given)"
    return f"invalid value for config key '{key}': {msg}"


def known_error_line(e: BaseException) -> str | None:
    """One line for configuration / input errors (ours, Hydra's, OmegaConf's, a missing file); None otherwise."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from hydra.errors import InstantiationException

    if isinstance(e, InstantiationException) and not any(isinstance(c, Blip2TrainError) for c in causes(e)):
        # "Error in call to target 'X':\nTypeError(...)\nfull_key: ...": the first line, then the innermost cause
        # (a missing optional package says which and how to install it there), else the last line
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        inner = [c for c in causes(e) if not isinstance(c, InstantiationException) and str(c).strip()]
        detail = first_line(inner[-1]) if inner else (lines[-1] if len(lines) > 1 else "")
        text = " ".join(lines[:1] + ([detail] if detail else []))
        return text.replace("set env var HYDRA_FULL_ERROR=1 to see chained exception",
                            "BLIP2_FULL_ERROR=1 shows the traceback")
    if isinstance(e, (HydraException, OmegaConfBaseException, Blip2TrainError, FileNotFoundError)) or \
            any(isinstance(c, (OmegaConfBaseException, Blip2TrainError)) for c in causes(e)):
        ours = e if isinstance(e, Blip2TrainError) else next(
            (c for c in causes(e) if isinstance(c, Blip2TrainError)), None)  # e.g. wrapped by instantiate
        return first_line(ours) if ours is not None else describe_config_error(e)
    if isinstance(e, ValueError) and _raised_by_hydra(e):  # usage: "Only one of --run, --multirun, --cfg ..."
        return first_line(e)
    full = no_space_error(e)
    if full is not None:  # a log, a metrics file, the config record: what was written before stays as it was
        return (f"{describe_no_space(full)}; files written before are unchanged: free space and run again (a "
                "training run resumes with ckpt_path=auto)")
    return None


def _raised_by_hydra(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}hydra{os.sep}" in tb.tb_frame.f_code.co_filename


def first_line(e: BaseException) -> str:
    """The message's first line; for an error re-raised from a DataLoader worker ("Caught DataError in
    DataLoader worker process 0." + the worker's traceback), the worker's own message."""
    text = str(e)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = [l for l in text.splitlines() if l.strip()][-1]
        return re.sub(r"^[\w.]+(Error|Exception): ", "", last)
    return text.splitlines()[0] if text else type(e).__name__


def causes(e: BaseException):
    cur, n = e.__cause__ or e.__context__, 0
    while cur is not None and n < 6:
        yield cur
        cur, n = cur.__cause__ or cur.__context__, n + 1


def run_with_one_line_errors(work, a) -> int:
    """`work(a)` for the file-processing commands (blip2-generate, blip2-embed, blip2-classify): a user's mistake
    (a Blip2TrainError or an OSError) is one `error:` line and exit 2; BLIP2_FULL_ERROR=1 shows its traceback."""
    import os
    import sys

    from blip2_train.utils.errors import Blip2TrainError

    try:
        return work(a)
    except (Blip2TrainError, OSError) as e:
        if os.environ.get("BLIP2_FULL_ERROR"):
            raise
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
