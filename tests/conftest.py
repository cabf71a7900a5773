"""Test-wide setup.

* Eight simulated CPU devices so the sharding tests have a mesh to split over; the flag must be set
  before jax is imported anywhere.
* Hypothesis is derandomized (a fixed seed derived from each test), so the suite is reproducible in
  CI and in every fresh environment. Explore new examples locally with ``HYPOTHESIS_PROFILE=explore``.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("MPLBACKEND", "Agg")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
