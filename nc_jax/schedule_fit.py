"""A recipe's schedule scaled to a run shorter than the recipe.

`epochs=N` or `steps=N` in a config argument asks for it
(`nc_jax.configs.cifar_lt` records `recipe_entries` in `optim.fit_to_run`
and the recipe's length in `optim.fit_from_epochs`); `fit_schedule` does
it once the run's length in epochs is known (`nc_jax.validation`), and
the builder gives a config that asks for it the same schedule. No jax
here: the configs use this module before jax may start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # the configs are ml_collections' (the `train` extra)
  from ml_collections import ConfigDict


# The fields a run shorter than its recipe scales: epochs of the step
# schedule, and loss options that are epochs of it (a method's
# `epoch_options`, e.g. "loss.drw_epoch").
FIT_FIELDS = ("optim.warmup_epochs", "optim.decay_epochs", "loss.drw_epoch")


_FIT_LABELS = {"optim.warmup_epochs": "warm-up epochs",
               "optim.decay_epochs": "decays after epochs",
               "loss.drw_epoch": "re-weighting from epoch"}


def _text(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return ", ".join(map(str, value)) or "none"
  return str(value or 0)


def _scaled(name: str, value: Any, f: float, total_epochs: float) -> Any:
  """`value` of field `name` scaled by `f` (whole epochs, rounded down; a
  decay that lands on epoch 0 or at the end is dropped)."""
  if name == "optim.decay_epochs":
    return tuple(e for e in sorted({int(e * f) for e in value or ()})
                 if 1 <= e < total_epochs)
  return int((value or 0) * f)


def fit_schedule(config: ConfigDict, total_epochs: float, *,
                 epoch_options: Sequence[str] = ()
                 ) -> tuple[ConfigDict, str | None]:
  """The config with its recipe's schedule scaled to a shorter run.

  A config asks for it with `optim.fit_to_run` (`recipe_entries`: each
  field to scale with the recipe's value, "optim.warmup_epochs=5") and
  `optim.fit_from_epochs` (the length the recipe's epochs were written
  for); the configs set both when the config argument gives `epochs=N` or
  `steps=N`. A field whose value is no longer the recipe's was set by the
  user and is kept as given (and checked as given); so is one the command
  line dropped from `fit_to_run` because it was given with `--config.`.
  Each other field is multiplied by `total_epochs / fit_from_epochs` and
  rounded down to whole epochs, as `nc-jax-paper-table --epochs` always
  did: the warm-up, the decays (those that land at epoch 0 or at the end
  are dropped) and the loss's epoch options that the method uses. A run as
  long as its recipe, or longer, is left as it is.

  Args:
    config: the run's config (not changed).
    total_epochs: the run's length in epochs (fractional for `steps=N`).
    epoch_options: the method's loss options that are epochs
      (`Method.epoch_options`); other `loss.` fields are left alone.

  Returns:
    (config, note): for a config that asks, a locked copy with the scaled
    fields and `fit_to_run`/`fit_from_epochs` cleared (what the run trains,
    and what `config.json` records), and one line saying what changed, or
    None when nothing did; `(config, None)` for one that does not ask.
  """
  o = config.optim
  names = [n for n, recipe in map(_parse_entry, o.get("fit_to_run") or ())
           if n in FIT_FIELDS
           and (not n.startswith("loss.") or n.split(".", 1)[1] in epoch_options)
           and (recipe is None or _text(_field(config, n)) == recipe)]
  recipe = o.get("fit_from_epochs")
  if not o.get("fit_to_run") and not recipe:
    return config, None  # nothing asked
  out = config.copy_and_resolve_references()
  out.unlock()
  # The request is answered either way: the config the run trains (and
  # records) says what it trains, not what to do with it.
  out.optim.fit_to_run = ()
  out.optim.fit_from_epochs = None
  if not names or not recipe or total_epochs >= recipe:
    out.lock()
    return out, None
  f = total_epochs / recipe
  changes = []
  for name in names:
    if name == "optim.decay_epochs" and o.schedule != "step":
      continue  # only the step schedule has decay epochs
    section, field = name.split(".")
    old = out[section][field]
    new = _scaled(name, old, f, total_epochs)
    out[section][field] = new
    if _text(new) != _text(old):
      changes.append(f"{_FIT_LABELS.get(name, name)} {_text(new)} (recipe "
                     f"{_text(old)})")
  out.lock()
  if not changes:
    return out, None
  steps = config.get("num_steps")
  length = (f"{steps} steps ({total_epochs:.3g} epochs)" if steps
            else f"{total_epochs:g} epochs")
  return out, (f"schedule scaled to {length}, {f:.3g} of the recipe's "
               f"{recipe:g} epochs: " + "; ".join(changes))


def _field(config: Any, name: str) -> Any:
  section, field = name.split(".")
  return config[section][field]


def recipe_entries(config: Any) -> tuple[str, ...]:
  """`optim.fit_to_run` for `config` as the recipe has it: "name=value"
  for each of `FIT_FIELDS`, the value as `fit_schedule` compares it."""
  return tuple(f"{n}={_text(_field(config, n))}" for n in FIT_FIELDS)


def _parse_entry(entry: str) -> tuple[str, str | None]:
  """("optim.warmup_epochs", "5") of "optim.warmup_epochs=5"; a bare name
  (always scaled) gives None for the recipe's value."""
  name, sep, recipe = entry.partition("=")
  return name, (recipe if sep else None)


def entry_names(entries: Sequence[str]) -> tuple[str, ...]:
  """The field names of `fit_to_run`'s entries."""
  return tuple(_parse_entry(e)[0] for e in entries)
