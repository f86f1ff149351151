"""What the REST API (``api``) and the dashboard (``web``) share at the HTTP edge:
the application context, authentication and roles, dashboard sessions, checks of
query parameters and the bounded reading of uploads.

Both packages build on this one and neither imports the other, except that
``api.app.create_app`` mounts the dashboard (docs/architecture.md, *Layers*).
"""
