"""A run's workdir: what it holds besides checkpoints, and the checks before a run writes to it.

    DIR/.lock             who is training in it (`WorkdirLock`)
    DIR/config.json       the run's config (an earlier one is kept as config.before_step_<N>.json)
    DIR/classes.json      the class names, in label order (label i is classes[i])
    DIR/data_location.json  where training found a TFDS data set given only by $TFDS_DATA_DIR
    DIR/parameters.txt    the model's parameters: names, shapes, statistics at initialisation
    DIR/checkpoints/      Orbax checkpoints (pivot_jax.checkpoint), with checkpoint_checksums/ beside
                          them, and damaged_checkpoints/ where a damaged one was moved aside
    DIR/eval/             results.json, results.md, sweeps.png (pivot_jax.results)
    DIR/events.out.*      TensorBoard metrics
"""

from __future__ import annotations

import difflib
import json
import os
import socket
import threading
import time
import uuid

import jax
import ml_collections
from absl import logging
from etils import epath
from flax import traverse_util

from pivot_jax import config_lib, results
from pivot_jax.errors import ConfigError, TrainingError


_CONFIG_REMEDY = "restore it from a copy, or pass the run's --config=FILE"


def _flat(config_json: str) -> dict:
    """A config's fields by dotted name, with the fields added since it was saved at their defaults
    (config_lib.FIELDS_ADDED_LATER)."""
    return {**config_lib.FIELDS_ADDED_LATER, **traverse_util.flatten_dict(json.loads(config_json), sep=".")}


def _saved_flat(path: epath.Path) -> dict:
    """The fields of the saved config `path` by dotted name; a ConfigError names a field that is
    missing or unknown (with the nearest known name)."""
    flat = {**config_lib.FIELDS_ADDED_LATER,
            **traverse_util.flatten_dict(results.read_json(path, dict, _CONFIG_REMEDY), sep=".")}
    known = config_lib.field_names()
    missing = sorted(known - set(flat))
    if missing:
        raise ConfigError(f"{path}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)} (a run "
                          f"saves every field); {_CONFIG_REMEDY}")
    unknown = sorted(set(flat) - known)
    if unknown:
        hints = []
        for name in unknown:
            near = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            hints.append(f"{name} (did you mean {near[0]}?)" if near else name)
        raise ConfigError(f"{path}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; {_CONFIG_REMEDY}")
    return flat


def check(workdir, config: ml_collections.ConfigDict) -> None:
    """Refuses a workdir that cannot be written or whose saved config is a different experiment."""
    workdir = epath.Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_probe_{jax.process_index()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise TrainingError(f"workdir: cannot write to {workdir}: {error}") from None
    saved_path = workdir / "config.json"
    if not saved_path.exists():
        return
    saved, current = _saved_flat(saved_path), _flat(config.to_json_best_effort())
    may_change = lambda key: any(key == f or key.startswith(f + ".") for f in config_lib.FIELDS_A_RESUME_MAY_CHANGE)
    changed = sorted(k for k in set(saved) | set(current) if not may_change(k) and saved.get(k) != current.get(k))
    if changed and not config.allow_config_change:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:10])
        raise TrainingError(
            f"workdir {workdir} holds a run with another config ({details}). Use another --workdir, "
            "or resume it anyway with --config.allow_config_change=True."
        )


def write_config(workdir, config: ml_collections.ConfigDict, step: int) -> None:
    """Saves the run's config; a different one saved before is kept as `config.before_step_<step>.json`."""
    path = epath.Path(workdir) / "config.json"
    text = config.to_json_best_effort(indent=2)
    if path.exists() and path.read_text() != text:
        path.rename(epath.Path(workdir) / f"config.before_step_{step}.json")  # keep what the run was
    results.write_atomically(path, text)


def _typed(value):
    """A config.json value as the config file had it: JSON turns tuples into lists, and an unset
    path field (None) must stay overridable from the command line as a string."""
    if isinstance(value, dict):
        return ml_collections.ConfigDict({key: _typed(item) for key, item in value.items()})
    if isinstance(value, list):
        return tuple(_typed(item) for item in value)
    if value is None:
        return ml_collections.FieldReference(None, field_type=str)  # every optional field is a path or name
    return value


def saved_config(workdir) -> ml_collections.ConfigDict:
    """The config a run saved in `DIR/config.json` when it started, for evaluating, predicting and
    exporting without repeating the training command."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise ConfigError(f"--workdir: {path} does not exist (a run saves it when it starts); "
                          "pass the run's --config=FILE instead")
    return _with_data_location(workdir, _typed(traverse_util.unflatten_dict(_saved_flat(path), sep=".")))


DATA_LOCATION = "data_location.json"


def save_data_location(workdir, data: ml_collections.ConfigDict) -> None:
    """Records where training found its TFDS data when the config did not say (`$TFDS_DATA_DIR`), so
    that evaluate, predict and export of the run find it again without being told."""
    where = os.environ.get("TFDS_DATA_DIR")
    if data.name == "folder" or data.data_dir or not where:
        return
    where = where if "://" in where else os.path.abspath(os.path.expanduser(where))
    results.write_atomically(epath.Path(workdir) / DATA_LOCATION, json.dumps({"data_dir": where}, indent=1) + "\n")


def _with_data_location(workdir, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the data dir training used, where neither the config nor $TFDS_DATA_DIR gives one."""
    path = epath.Path(workdir) / DATA_LOCATION
    if config.data.data_dir or os.environ.get("TFDS_DATA_DIR") or not path.exists():
        return config
    where = results.read_json(path, dict, "remove it and give the data's location (TFDS_DATA_DIR)").get("data_dir")
    if not isinstance(where, str):
        raise ConfigError(f"{path}: field data_dir: expected the data dir training used (a string), got {where!r}")
    config.data.data_dir = where
    return config


def save_class_names(workdir, class_names) -> None:
    results.write_atomically(epath.Path(workdir) / "classes.json", json.dumps(list(class_names), indent=1) + "\n")


def saved_class_names(workdir) -> tuple[str, ...] | None:
    """The run's class names in label order, or None for a run that did not save them."""
    path = epath.Path(workdir) / "classes.json"
    if not path.exists():
        return None
    names = results.read_json(path, list, "restore it from a copy (it lists the class names in label order)")
    if not all(isinstance(name, str) for name in names):
        raise ConfigError(f"{path}: expected a list of class names (strings), got {str(names)[:80]}")
    return tuple(names)


class WorkdirLock:
    """One training run at a time per workdir: `DIR/.lock` names the holder, and a second run that
    finds it held stops with an error naming it.

    On a local file system the lock is an flock, which the kernel releases when the holder dies, even
    by SIGKILL: a killed run never leaves the workdir stuck. Where flock does not exist (gs://, other
    object stores) it is a lease: the holder rewrites the file every `refresh_seconds`, and a lease
    that has not been refreshed for `expiry_seconds` belongs to a run that is gone.
    """

    def __init__(self, workdir, *, refresh_seconds: float = 60.0, expiry_seconds: float = 300.0,
                 lease: bool | None = None):
        self.path = epath.Path(workdir) / ".lock"
        self.lease = "://" in str(workdir) if lease is None else lease
        self.refresh_seconds, self.expiry_seconds = refresh_seconds, expiry_seconds
        self._file = None
        self._stop = threading.Event()
        self._refresher = None
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                       "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

    def _describe(self, holder: dict) -> str:
        return (f"{self.path.parent} is in use by another training run (process {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, since {holder.get('since', '?')}; {self.path}). Wait for it to end, "
                "stop it, or use another --workdir.")

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, OSError):
            return {}

    def acquire(self) -> "WorkdirLock":
        if self.lease:
            self._acquire_lease()
        else:
            self._acquire_flock()
        return self

    def _acquire_flock(self) -> None:
        import fcntl

        file = open(self.path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            file.seek(0)
            try:
                holder = json.loads(file.read() or "{}")
            except json.JSONDecodeError:
                holder = {}
            file.close()
            raise TrainingError(self._describe(holder)) from None
        file.seek(0)
        file.truncate()
        file.write(json.dumps(self.holder) + "\n")
        file.flush()
        self._file = file

    def _acquire_lease(self) -> None:
        current = self._read()
        age = time.time() - float(current.get("heartbeat", 0))
        if current and current.get("token") != self.holder["token"] and age < self.expiry_seconds:
            raise TrainingError(self._describe(current))
        self._write_lease()
        time.sleep(min(1.0, self.refresh_seconds))  # two runs that wrote at once: the last write wins
        if self._read().get("token") != self.holder["token"]:
            raise TrainingError(self._describe(self._read()))
        self._refresher = threading.Thread(target=self._refresh, daemon=True, name="workdir-lock")
        self._refresher.start()

    def _write_lease(self) -> None:
        results.write_atomically(self.path, json.dumps({**self.holder, "heartbeat": time.time()}) + "\n")

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            try:
                self._write_lease()
            except OSError as error:  # a transient storage error: the next refresh tries again
                logging.warning("could not refresh the workdir lock %s: %s", self.path, error)

    def release(self) -> None:
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        if self._refresher is not None:
            self._stop.set()
            self._refresher.join()
            self._refresher = None
            if self._read().get("token") == self.holder["token"]:
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
