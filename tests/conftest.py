"""Test-wide setup. Eight simulated CPU devices so the sharding tests have a mesh to split over;
the flag must be set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("MPLBACKEND", "Agg")
