"""Errors of the control plane, mapped to HTTP status codes by the API.

The control functions are shared by the API, the dashboard and the CLI, so they say
*what* went wrong with an exception type, and each edge decides how to show it
(404, 409, 422 for the API; a flash message on the dashboard; an exit code in the CLI).
"""

from __future__ import annotations


class ControlError(Exception):
    """Base class: the message is meant for the operator, as is."""


class NotFound(ControlError):
    """No such job, destination, ... (HTTP 404)."""


class Conflict(ControlError):
    """The action does not apply in the current state, e.g. retrying a completed job
    (HTTP 409)."""


class Invalid(ControlError):
    """A request that can never succeed: an unknown state name, an empty bulk filter
    (HTTP 422)."""


class Forbidden(ControlError):
    """The caller's role does not allow this (HTTP 403): an admin-only read (the
    re-identification mapping), a dry run through a pipeline keyed by a secret (it
    shows real pseudonyms)."""


class Unavailable(ControlError):
    """The action cannot be done now, for a reason on the server's side: a key
    missing from its environment, a key that does not match what was recorded
    (HTTP 503)."""
