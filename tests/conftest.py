"""Settings shared by every test tier."""

from hypothesis import HealthCheck, settings

# Hypothesis' per-example deadline is a timing assertion: on a loaded 2-core CI machine a slow
# example says nothing about the code. Tests never assert timings, so no deadline anywhere;
# the too_slow health check goes for the same reason.
settings.register_profile("sharedsync", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("sharedsync")
