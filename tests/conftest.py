"""Suite-wide set-up: ``tests/`` is on ``sys.path`` (pytest's default import mode puts a
conftest's folder there), so every test can ``import _support``; Hypothesis profiles."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# CI runs fewer examples per property (each is a fake session, some a subprocess); locally, more.
settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
