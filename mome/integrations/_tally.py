"""How often an integration ran mome's fused op and why it fell back; each reason is logged once."""

from __future__ import annotations

import logging
from collections import Counter

LOGGER = logging.getLogger("mome.integrations")


class Tally:
    """``fused``: calls that ran on mome; ``fallbacks``: reason -> calls left to the library's own code."""

    def __init__(self, integration: str):
        self.integration = integration
        self.fused = 0
        self.fallbacks: Counter[str] = Counter()
        self._logged: set[str] = set()

    def ran(self) -> None:
        self.fused += 1

    def fell_back(self, reason: str) -> None:
        self.fallbacks[reason] += 1
        if reason not in self._logged:  # once per reason for the life of the process, not once per layer
            self._logged.add(reason)
            LOGGER.warning(
                "mome.integrations.%s: falling back to the library's attention: %s", self.integration, reason
            )

    def reset(self) -> None:
        """Zero the counts (the reasons already logged stay logged)."""
        self.fused = 0
        self.fallbacks.clear()

    def __repr__(self) -> str:
        return f"Tally({self.integration!r}, fused={self.fused}, fallbacks={dict(self.fallbacks)})"
