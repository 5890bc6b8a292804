"""One-line use of mome inside other libraries' models: ``mome.integrations.transformers``, ``.open_clip``, ``.timm``.

Each submodule imports its library when it is used, never here: ``import mome.integrations`` works without any of
them. Each keeps a :class:`~mome.integrations._tally.Tally` (``TALLY``): how many calls ran fused, and how many fell
back and why (every reason is logged once, on the ``mome.integrations`` logger).
"""

from __future__ import annotations

import importlib.metadata

# integration module -> the distribution it needs
LIBRARIES = {"transformers": "transformers", "open_clip": "open-clip-torch", "timm": "timm"}


def installed() -> dict[str, str | None]:
    """Per integration, the installed version of its library, or None (read from package metadata: nothing imported)."""
    versions = {}
    for integration, distribution in LIBRARIES.items():
        try:
            versions[integration] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            versions[integration] = None
    return versions
