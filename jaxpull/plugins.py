"""Extension points: what installed packages add to jaxpull, found through package entry points.

jaxpull never imports its optional converter: the converter registers itself under these
entry-point groups (``[project.entry-points."jaxpull.offline_models"]`` and ``"jaxpull.commands"``
in pyproject.toml), and jaxpull looks up what is installed.

- ``jaxpull.offline_models``: objects with ``names()`` (the architecture names that convert on
  first use without a download) and ``convert(name, out, log)`` (write the checked ``.safetensors``
  file ``out``); :mod:`jaxpull.files.cache` calls them for a cached name not yet converted.
- ``jaxpull.commands``: functions ``add(subparsers)`` that add the subcommand of the entry
  point's name to the ``jaxpull`` command line (:mod:`jaxpull.shell.cli`).
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

OFFLINE_MODELS = "jaxpull.offline_models"
COMMANDS = "jaxpull.commands"


def load(group: str) -> list[tuple[str, Any]]:
    """``(name, object)`` of every entry point of ``group``, in name order, each loaded once (an
    entry point seen twice, e.g. from an editable install and a wheel, is loaded once).

    Raises:
      RuntimeError: an entry point names something that cannot be imported (a broken install).
    """
    found = {}
    for ep in sorted(metadata.entry_points(group=group), key=lambda ep: (ep.name, ep.value)):
        if (ep.name, ep.value) in found:
            continue
        try:
            found[ep.name, ep.value] = ep.load()
        except (ImportError, AttributeError) as e:
            raise RuntimeError(
                f"the {group} entry point {ep.name} = {ep.value} cannot be loaded ({e}): reinstall the package "
                "that provides it (pip install -e . in a checkout)"
            ) from None
    return [(name, obj) for (name, _), obj in found.items()]
