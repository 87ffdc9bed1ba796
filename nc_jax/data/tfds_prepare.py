"""Preparing a dataset through tfds when `data_dir` is unset.

tfds downloads into its default data directory (`$TFDS_DATA_DIR`, default
`~/tensorflow_datasets`). On a machine without internet its downloader
retries for minutes before it gives up, so the dataset's URL is probed
first with one short request, and every failure becomes one `ValueError`
that names `--config.data_dir` and the forms it accepts.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from absl import logging

from nc_jax.data import datasets
from nc_jax.data import sources


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
  """Hides absl warnings for the block.

  Looking a dataset up in a data directory where it is absent makes tfds log
  a warning per missing variant folder; nc_jax's own error says what to do.
  """
  before = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(before)


def unreachable(builder) -> str | None:
  """Why the dataset's download URL cannot be reached from here, or None.

  One HEAD request with a short timeout: tfds's own downloader retries for
  minutes before it gives up on a machine without internet.
  """
  try:
    urls = sorted(builder.url_infos or {})
  except Exception:  # pylint: disable=broad-except
    return None  # no registered URLs (e.g. manual downloads): let tfds say
  if not urls:
    return None
  import requests  # pylint: disable=g-import-not-at-top
  try:
    requests.head(urls[0], timeout=15, allow_redirects=True)
  except requests.RequestException as e:
    return f"{urls[0]} cannot be reached ({type(e).__name__})"
  return None


def prepare_tfds(name: str, *,
                 notify: Callable[[str], None] = logging.warning
                 ) -> sources.Source:
  """The source for an unset `data_dir`: `name` through tfds.

  Downloads and prepares the dataset in tfds's default data directory
  (`$TFDS_DATA_DIR`, default `~/tensorflow_datasets`) unless it is there
  already.

  Args:
    name: registry key.
    notify: told (one line) before a download starts.

  Returns:
    `Source("tfds", None, info)`.

  Raises:
    ValueError: tfds cannot provide the dataset here (no internet, a manual
      download needed), saying why and naming `--config.data_dir`.
  """
  info = datasets.dataset_info(name)
  where = "its default data directory"

  def refuse(why: str) -> ValueError:
    return ValueError(
        f"data_dir is not set, so {name!r} was to come from tfds "
        f"({info.tfds_name} in {where}), but tfds cannot provide it here: "
        f"{why}. " + sources.accepted_forms(info, unset=False))

  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    with _quiet_absl():
      builder = tfds.builder(info.tfds_name)
      prepared = builder.is_prepared()
    where = str(builder.data_dir).split(f"/{info.tfds_name}/")[0]
    if prepared:
      return sources.Source("tfds", None, info)
  except Exception as e:  # pylint: disable=broad-except
    raise refuse(f"{type(e).__name__}: {str(e)[:300]}") from e
  why = unreachable(builder)
  if why:
    raise refuse(f"it is not prepared in {where} and {why} (no internet?)")
  notify(f"data: {info.tfds_name} is not in {where}; tfds downloads and "
         "prepares it there (once)")
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [""])[0][:300]
    raise refuse(f"download_and_prepare failed ({type(e).__name__}: "
                 f"{first})") from e
  return sources.Source("tfds", None, info)
