"""``kiban dev``'s dashboard: every local service's health, requests, traces, logs, map.

The services export to it over OTLP/HTTP, as to any collector; it keeps a bounded
window in memory and serves pages that read its JSON API. See docs/dashboard.md.
"""

from kiban._dashboard._runner import DevConfig, ServiceSpec, check, load, run
from kiban._dashboard._store import Store
from kiban._dashboard._web import create_app

__all__ = ["DevConfig", "ServiceSpec", "Store", "check", "create_app", "load", "run"]
