"""jobs: TODO(issue 3) being built."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/api/v1", tags=["jobs"])
