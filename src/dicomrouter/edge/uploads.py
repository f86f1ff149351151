"""Uploaded DICOM files (the rule tester), shared by the API and the dashboard.

The size is checked from ``Content-Length`` before anything is read: Starlette
spools a multipart body to temporary files while parsing it, so a check after
parsing would already have paid for a huge upload. Files are closed (and their
temporary copies deleted) when the ``async with`` block ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import HTTPException, Request
from starlette.datastructures import FormData, UploadFile


@asynccontextmanager
async def uploaded_files(
    request: Request, max_files: int, field: str = "files", max_bytes: int | None = None
) -> AsyncIterator[tuple[list[UploadFile], FormData]]:
    """The files of multipart field ``field`` and the whole form; 411 without a
    ``Content-Length``, 413 above ``max_bytes`` (default ``http.max_upload_size``:
    a dry run needs only headers, so this bounds what one request may make us
    spool), 422 without files."""
    if max_bytes is None:
        max_bytes = request.app.state.ctx.config.http.max_upload_size
    length = request.headers.get("content-length", "")
    if not length.isdigit():
        raise HTTPException(411, "send the upload with a Content-Length")
    if int(length) > max_bytes:
        raise HTTPException(
            413, f"upload of {int(length)} bytes is over the limit of {max_bytes} bytes"
        )
    async with request.form(max_files=max_files) as form:
        uploads = [item for item in form.getlist(field) if isinstance(item, UploadFile)]
        if not uploads:
            raise HTTPException(422, f"no files: send them in the multipart field {field!r}")
        yield uploads, form
