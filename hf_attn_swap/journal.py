"""An undo journal for in-place model edits: a swap that raises leaves the model exactly as it was.

A swap edits a model in place through many hands (weight conversion, a variant's ``prepare``, module attributes,
hooks, config fields, ``set_attn_implementation``, the swap record), some of them user code (a custom variant's
hooks). Deep-copying the model to undo that is out of the question for a 7B model, and unnecessary: every one of
those edits is an assignment into some object's ``__dict__`` (``nn.Module.__setattr__`` writes into the
``_parameters``/``_modules``/``_buffers`` dicts, hooks go into ``_forward_hooks`` and friends, configs are plain
attributes). So the journal records, without copying any tensor:

* for every module of the model and every config it holds (``model.config``, its sub-configs, configs held by
  modules): the class, the ``__dict__`` entries, and the contents of each dict or list among them, keeping the
  container objects themselves (hook handles hold weak references to the hook dicts, so those must stay the same
  objects);
* the version counter of every parameter, to report (not undo) an in-place write into existing weights (buffers
  are left out: a forward during calibration may legitimately refresh one, e.g. a dynamic RoPE ``inv_freq``).

Rolling back puts every entry, container content and class back, so parameters keep their identity and modules
added during the swap (feature maps, new projections) drop out. The cost is one pass over the modules: a few
thousand dict copies for a 7B model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from torch import nn
from transformers import PretrainedConfig

from .hf_compat import module_state_lives_in_dict, tensor_version

logger = logging.getLogger(__name__)


def _configs_of(model: nn.Module) -> list[PretrainedConfig]:
    """Every config object the model can reach: its own, its modules', and their sub-configs (by identity)."""
    found: dict[int, PretrainedConfig] = {}
    todo = [getattr(m, "config", None) for m in model.modules()]
    while todo:
        cfg = todo.pop()
        if not isinstance(cfg, PretrainedConfig) or id(cfg) in found:
            continue
        found[id(cfg)] = cfg
        todo.extend(v for v in vars(cfg).values() if isinstance(v, PretrainedConfig))
    return list(found.values())


class _ObjectState:
    """Class, attributes and container contents of one object (shallow: no tensor is copied)."""

    __slots__ = ("obj", "cls", "attrs", "containers")

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.cls = type(obj)
        self.attrs = dict(vars(obj))
        self.containers: list[tuple[Any, Any]] = []
        for value in self.attrs.values():
            if isinstance(value, dict):
                self.containers.append((value, list(value.items())))
            elif isinstance(value, list):
                self.containers.append((value, list(value)))

    def restore(self) -> None:
        for container, content in self.containers:
            if isinstance(container, dict):
                container.clear()
                container.update(content)
            else:
                container[:] = content
        if type(self.obj) is not self.cls:
            self.obj.__class__ = self.cls
        state = vars(self.obj)
        state.clear()
        state.update(self.attrs)


class ModelJournal:
    """What a swap may change on ``model``, recorded so that :meth:`rollback` can put it back."""

    def __init__(self, model: nn.Module) -> None:
        if not module_state_lives_in_dict(model):  # a torch that stores module state elsewhere: no safe rollback
            raise RuntimeError("this torch no longer keeps nn.Module state in the instance __dict__ (checked by "
                               "hf_compat.module_state_lives_in_dict): swaps cannot be rolled back; please report it")
        objects: list[Any] = list(model.modules()) + _configs_of(model)
        self._states = [_ObjectState(o) for o in objects]
        self._versions = {id(p): (name, p, tensor_version(p)) for name, p in model.named_parameters()}

    def rollback(self) -> None:
        """Restore every recorded object; log an error for tensors written in place (those cannot be restored)."""
        for state in self._states:
            state.restore()
        touched = [name for name, t, version in self._versions.values() if tensor_version(t) != version]
        if touched:
            logger.error(
                "the failed swap wrote into %d existing parameter(s) in place (e.g. %s); those values cannot be rolled "
                "back: conversions must assign new tensors, not write into the model's", len(touched), touched[0]
            )


@contextlib.contextmanager
def transaction(model: nn.Module) -> Iterator[ModelJournal]:
    """Run the block as one transaction on ``model``: if it raises, roll the model back and re-raise the exception."""
    journal = ModelJournal(model)
    try:
        yield journal
    except BaseException:
        journal.rollback()
        raise
