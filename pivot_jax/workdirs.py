"""A run's workdir: what it holds besides checkpoints, and the checks before a run writes to it.

    DIR/config.json       the run's config (an earlier one is kept as config.before_step_<N>.json)
    DIR/classes.json      the class names, in label order (label i is classes[i])
    DIR/checkpoints/      Orbax checkpoints (pivot_jax.checkpoint)
    DIR/eval/             results.json, results.md, sweeps.png (pivot_jax.results)
    DIR/events.out.*      TensorBoard metrics
"""

from __future__ import annotations

import json

import jax
import ml_collections
from etils import epath
from flax import traverse_util

from pivot_jax import config_lib, results
from pivot_jax.errors import TrainingError


def _flat(config_json: str) -> dict:
    return traverse_util.flatten_dict(json.loads(config_json), sep=".")


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
    saved, current = _flat(saved_path.read_text()), _flat(config.to_json_best_effort())
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


def save_class_names(workdir, class_names) -> None:
    results.write_atomically(epath.Path(workdir) / "classes.json", json.dumps(list(class_names), indent=1) + "\n")


def saved_class_names(workdir) -> tuple[str, ...] | None:
    """The run's class names in label order, or None for a run that did not save them."""
    path = epath.Path(workdir) / "classes.json"
    return tuple(json.loads(path.read_text())) if path.exists() else None
