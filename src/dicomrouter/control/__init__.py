"""The control plane: what operators read and do, independent of HTTP.

The REST API (``dicomrouter.api``), the dashboard (``dicomrouter.web``) and the CLI
are thin edges over these modules, so the three always agree. Nothing here imports
FastAPI or Jinja2.
"""
