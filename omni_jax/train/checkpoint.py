"""Checkpoints: orbax CheckpointManager (async) for train state, data iterator state and config.

Layout: <directory>/<step>/{state, data, config}. Orbax writes each step into a temporary
directory and renames it only after every item is written, so a save that fails never
replaces or corrupts an existing step; the manager also refuses to save a step that exists.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import signal
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from omni_jax.utils import fs

log = logging.getLogger(__name__)


def _iterator_state(it: Any) -> dict[str, Any]:
    state = it.get_state()
    if isinstance(state, bytes):
        return {"bytes": base64.b64encode(state).decode()}
    return {"state": json.loads(json.dumps(state))}  # not JSON-able -> TypeError before saving


def _set_iterator_state(it: Any, saved: Mapping[str, Any]) -> None:
    it.set_state(base64.b64decode(saved["bytes"]) if "bytes" in saved else saved["state"])


class IteratorStateHandler(ocp.CheckpointHandler):
    """Writes each process's data-iterator state (already captured as JSON-able dict) to
    process_<i>-of-<n>.json, like grain's handler, so every host resumes its own stream."""

    def _file(self, directory: Any) -> Any:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: Any, args: IteratorStateSave) -> None:
        self._file(directory).write_text(json.dumps(args.state))

    def restore(self, directory: Any, args: IteratorStateRestore | None = None) -> Any:
        path = self._file(directory)
        if not path.exists():
            raise ValueError(f"no data iterator state {path} (saved with a different process "
                             f"count?)")
        return json.loads(path.read_text())

    def metadata(self, directory: Any) -> None:
        return None

    def finalize(self, directory: Any) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStateRestore(ocp.args.CheckpointArgs):
    pass


def _jsonable(config: Any) -> dict[str, Any]:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(d, default=str))


class Checkpointer:
    """Saves/restores {"state": pytree, "data": iterator state, "config": JSON} per step.

    every_steps: save interval (save(..., force=True) ignores it); keep: newest N kept.
    The data iterator is anything with get_state()/set_state() (grain iterators).
    """

    def __init__(self, directory: str, *, every_steps: int = 1, keep: int = 3,
                 async_save: bool = True) -> None:
        if every_steps <= 0 or keep <= 0:
            raise ValueError(f"Checkpointer: every_steps and keep must be positive, got "
                             f"{every_steps}, {keep}")
        self.directory = fs.abspath(directory)  # local or gs:// (orbax writes either)
        self.every_steps = every_steps
        options = ocp.CheckpointManagerOptions(max_to_keep=keep,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, *, data_iter: Any = None, config: Any = None,
             force: bool = False) -> bool:
        """Save if the interval says so (or force); True if a save started. Async: returns after
        the device->host copy, so the caller may donate/overwrite `state` right away."""
        if (not force and step % self.every_steps) or step in self.manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            # captured now, so the async write cannot see a later position
            items["data"] = IteratorStateSave(_iterator_state(data_iter))
        if config is not None:
            items["config"] = ocp.args.JsonSave(_jsonable(config))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int | None, abstract_state: Any, *, data_iter: Any = None) -> Any:
        """Restore `step` (None = latest) into the shapes/dtypes/shardings of abstract_state.

        abstract_state: a tree of jax.ShapeDtypeStruct with .sharding. The data iterator, if
        given, is set to the saved position.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"Checkpointer: no checkpoint in {self.directory}")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = IteratorStateRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        if data_iter is not None:
            _set_iterator_state(data_iter, out["data"])
        return out["state"]

    def restore_params(self, step: int | None, abstract_params: Any) -> Any:
        """Only the parameters of `step` (None = latest), no optimizer state read, straight
        into the shardings of abstract_params (ShapeDtypeStructs with .sharding)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"Checkpointer: no checkpoint in {self.directory}")
        item = {"params": abstract_params}
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(
            sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), item)
        # a manager of its own: this one's "state" item is registered for StandardRestore
        with ocp.CheckpointManager(self.directory) as reader:
            out = reader.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True)))
        params = out["state"]["params"]
        missing = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(
            params, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
            if isinstance(v, jax.ShapeDtypeStruct)]
        if missing:  # partial_restore leaves what the checkpoint lacks as its abstract value
            raise ValueError(f"Checkpointer: step {step} in {self.directory} has no "
                             f"{len(missing)} parameter(s) the model expects, e.g. "
                             f"{missing[:3]}; was it saved with another model config?")
        return params

    def restore_config(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return out["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


class PreemptionGuard:
    """Context manager: SIGTERM/SIGINT set `.requested` instead of killing the process, so the
    loop can finish its step, save and exit cleanly. Handlers are restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        log.warning("signal %d: finishing the current step, saving and exiting", signum)
        self.requested = True

    def __enter__(self) -> PreemptionGuard:
        import threading
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def should_stop(self) -> bool:
        """True once a signal arrived on any process (multi-host: agreed by all processes)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(jax.numpy.array(self.requested))
        return bool(flags.any())
