"""Structured configs for the groups whose values are checked: one dataclass per `_target_`, generated from the
target's own signature, stored in Hydra's ConfigStore as `schema/<group>/<name>` and put under the group's yaml
files by their defaults lists (`- /schema/data/datamodule@_here_`).

The signature is the one place that names a parameter and its type, so a new argument of, say, `Blip2DataModule`
is a new config key without a second list to keep in step. Composition then refuses, before any work, a value of
the wrong type (`data.batch_size=abc`) and a key the target does not take (a typo in an experiment file).
Values stay in conf/: a schema field's default is the signature's default, which the yaml overrides.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, List, Optional

from omegaconf import MISSING

# group -> schema name -> target. Arguments given by the code at instantiation (the module's `model`) are not keys.
SCHEMAS = {
    "data": {"datamodule": "blip2_train.data.datamodule.Blip2DataModule"},
    "model": {"stage1": "blip2_train.models.build_stage1.build_stage1_model",
              "stage2": "blip2_train.models.build_stage2.build_stage2_model",
              "instruct": "blip2_train.models.build_instruct.build_instruct_model"},
    "module": {"stage1": "blip2_train.lit.stage1.Stage1Module",
               "stage2": "blip2_train.lit.stage2.Stage2Module",
               "instruct": "blip2_train.lit.instruct.InstructModule"},
    "trainer": {"lightning": "lightning.pytorch.Trainer"},
}
# Arguments the code gives at instantiation, per target (the module's `model`; the Trainer's callbacks, loggers,
# strategy and plugins, built from their own config groups): not keys of the target's group.
PASSED_AT_INSTANTIATION = {
    "blip2_train.lit.stage1.Stage1Module": {"model"},
    "blip2_train.lit.stage2.Stage2Module": {"model"},
    "blip2_train.lit.instruct.InstructModule": {"model"},
    "lightning.pytorch.Trainer": {"callbacks", "logger", "strategy", "plugins", "default_root_dir"},
}
_SIMPLE = (int, float, bool, str)
_registered = False


def _field_type(hint) -> Any:
    """The OmegaConf type for a Python annotation: simple types (and Optional of them) are enforced, a list of
    simple items is a typed list, a dict is a dict; anything else (unions, objects) is Any."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(rest) < len(args):
            inner = _field_type(rest[0])
            return Any if inner is Any else Optional[inner]
        return Any
    if hint in _SIMPLE:
        return hint
    if hint is dict or origin is dict:
        return Any  # typed as Dict, OmegaConf would resolve `${model.text}` while merging, before `model` exists
    if origin in (list, tuple) or hint in (list, tuple):
        items = {a for a in args if a is not Ellipsis}
        item = items.pop() if len(items) == 1 else Any
        return List[item if item in _SIMPLE else Any]
    return Any


def _default(value) -> Any:
    if value is inspect.Parameter.empty:
        return dataclasses.field(default=MISSING)
    if isinstance(value, (list, tuple)):
        return dataclasses.field(default_factory=lambda v=list(value): list(v))
    if value is None or isinstance(value, _SIMPLE):
        return dataclasses.field(default=value)
    return None  # a default no config can hold (an object): the key is left out, the target keeps its default


def schema_for(target: str) -> type:
    from hydra.utils import get_object

    obj = get_object(target)
    fn = obj.__init__ if inspect.isclass(obj) else obj
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):  # an annotation naming a type only imported for type checking: untyped keys
        hints = {}
    given = PASSED_AT_INSTANTIATION.get(target, set())
    fields: list = [("_target_", str, dataclasses.field(default=target))]  # noqa: RUF012
    for name, p in inspect.signature(fn).parameters.items():
        if name == "self" or name in given or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = _default(p.default)
        if default is None:
            continue
        kind = _field_type(hints.get(name, Any))
        if p.default is None and kind is not Any and typing.get_origin(kind) is not typing.Union:
            kind = Optional[kind]  # `x: int = None` in the signature
        fields.append((name, kind, default))
    return dataclasses.make_dataclass(f"{obj.__name__}Config", fields)


def unknown_keys(cfg) -> list[str]:
    """Keys of a schema group that its target does not take. Composition refuses `trainer.foo=1`; an added key
    (`+trainer.foo=1`) bypasses the schema, and would otherwise fail only when the target is called."""
    out = []
    for group, entries in SCHEMAS.items():
        node = cfg.get(group)
        target = node.get("_target_") if hasattr(node, "get") else None
        if target not in entries.values():
            continue
        fields = {f.name for f in dataclasses.fields(schema_for(target))}
        out += [f"{group}.{k}" for k in node if k not in fields and not (k.startswith("_") and k.endswith("_"))]
    return out


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore (once per process; composition needs them)."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, entries in SCHEMAS.items():
        for name, target in entries.items():
            cs.store(group=f"schema/{group}", name=name, node=schema_for(target))
    _registered = True
