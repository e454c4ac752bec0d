"""How torch's OpenMP threads wait for work: set before torch loads, by every entry point."""

from __future__ import annotations

import os


def limit_spinning() -> None:
    """Idle OpenMP threads spin for 10,000 iterations, then sleep. Measured on these 2-core machines
    (MobileNetV2-0.5 training step, batch 128): libgomp's default spin (300,000) is fast on quiet cores
    but 5-10x slower when other processes want them; OMP_WAIT_POLICY=PASSIVE (no spin) is safe there but
    1.6-2x slower on quiet cores; a short spin was the fastest in both. A user's own setting wins."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")
