"""Map the control plane's errors to HTTP status codes, in one place.

``control.errors`` says what went wrong without knowing about HTTP; every router
that calls the control plane wraps the call in :func:`http_errors` so the same error
always gives the same code: unknown thing 404, action that does not apply 409,
request that can never succeed 422, a role too small 403, a server-side reason
(a key missing from its environment) 503.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import HTTPException, status

from dicomrouter.control.errors import Conflict, Forbidden, Invalid, NotFound, Unavailable


@contextmanager
def http_errors() -> Iterator[None]:
    try:
        yield
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    except Conflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    except Invalid as exc:
        raise HTTPException(422, str(exc)) from exc
    except Forbidden as exc:
        raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from exc
    except Unavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc
