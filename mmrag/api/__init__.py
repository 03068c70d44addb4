"""The HTTP API (``mmrag serve``): a FastAPI app over one ``mmrag.runtime.Runtime``.

``create_app(settings_or_runtime)`` builds it (see ``mmrag.api.app``). Importing this package loads no web framework;
``mmrag.api.shapes`` holds the JSON shapes the CLI and the API share.
"""
