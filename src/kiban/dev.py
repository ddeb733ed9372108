"""``kiban dev`` from Python: run the services of ``kiban.toml`` beside the dashboard.

``kiban.dev.run("kiban.toml", on_ready=print_hints)`` is what ``kiban dev`` does, with a
callback once every service is ready (the sample system prints its curl lines there).
``create_app(Store())`` is the dashboard alone, an OTLP/HTTP receiver with its pages,
for a test or another runner. See docs/dashboard.md.
"""

from kiban._dashboard import DevConfig, ServiceSpec, Store, check, create_app, load, run

__all__ = ["DevConfig", "ServiceSpec", "Store", "check", "create_app", "load", "run"]
