"""Images out of a request, as bytes: a raw image/* body, or file parts of a multipart/form-data body.

Limits are checked before anything is decoded: the declared length, then the bytes actually
received. A client's file name only ever appears in messages; it is never used as a path, and
nothing from a client is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

MULTIPART_SLACK = 64 * 1024  # part headers and boundaries around a single image
MAX_FIELDS = 16  # non-file form fields are ignored, but not in unbounded numbers


class ApiError(Exception):
    """A bad request: answered as {"error": message} with this status, and the server carries on."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int = 8 * 1024 * 1024
    max_images: int = 64  # per batch request
    max_body_bytes: int = 32 * 1024 * 1024  # a whole batch request

    def describe(self) -> dict[str, int]:
        return {"max_image_bytes": self.max_image_bytes, "max_images_per_batch": self.max_images,
                "max_batch_body_bytes": self.max_body_bytes}


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_images(request: Request, limits: Limits, batch: bool) -> list[tuple[str, bytes]]:
    """(name for messages, bytes) of each image in the request: exactly one unless `batch`."""
    mime = media_type(request)
    if mime.startswith("image/") and not batch:
        return [("the image", await read_body(request, limits.max_image_bytes, "the image"))]
    if mime == "multipart/form-data":
        limit = limits.max_body_bytes if batch else limits.max_image_bytes + MULTIPART_SLACK
        body = await read_body(request, limit, "the request body")
        return await _files(request, body, limits, batch)
    how = ("multipart/form-data with one file part per image (field 'files')" if batch else
           "multipart/form-data (field 'file') or as a raw body with an image/* content type, e.g. image/png")
    raise ApiError(415, f"content type {mime or '(none)'} is not accepted here; send the image{'s' if batch else ''} "
                        f"as {how}")


async def read_body(request: Request, limit: int, what: str) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"{what} is {int(declared):,} bytes, over the limit of {limit:,}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():  # a chunked body has no declared length: count as it comes
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"{what} is over the limit of {limit:,} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before the whole body arrived") from None
    return b"".join(chunks)


async def _files(request: Request, body: bytes, limits: Limits, batch: bool) -> list[tuple[str, bytes]]:
    sent = False

    async def replay() -> dict:  # the body, already read within the limit, for starlette's parser
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    most = limits.max_images if batch else 1
    try:
        form = await Request(request.scope, replay).form(max_files=most + 1, max_fields=MAX_FIELDS)
    except HTTPException as e:
        if "too many files" in str(e.detail).lower():
            raise ApiError(413 if batch else 400, _too_many(most, batch)) from None
        raise ApiError(400, f"malformed multipart body ({e.detail})") from None
    except (KeyError, ValueError) as e:  # e.g. no boundary in the content type
        raise ApiError(400, f"malformed multipart body ({type(e).__name__}: {e})") from None
    try:
        parts = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not parts:
            field = "files" if batch else "file"
            raise ApiError(400, f"no image in the multipart body; send each image as a file part named '{field}'")
        if len(parts) > most:
            raise ApiError(413 if batch else 400, _too_many(most, batch))
        out = []
        for n, part in enumerate(parts):
            data = await part.read()
            name = _name(part.filename, n if batch else None)
            if len(data) > limits.max_image_bytes:
                raise ApiError(413, f"{name} is {len(data):,} bytes, over the limit of {limits.max_image_bytes:,}")
            out.append((name, data))
        return out
    finally:
        await form.close()


def _too_many(most: int, batch: bool) -> str:
    if batch:
        return f"too many images in one request: the limit is {most}; split them over several requests"
    return "more than one image in the request; send several with POST /v1/predict/batch"


def _name(filename: str | None, index: int | None) -> str:
    """How messages name an image: its position in a batch, and the client's file name, made printable."""
    label = "the image" if index is None else f"image {index + 1}"
    if filename:
        clean = "".join(c if c.isprintable() else "?" for c in filename)[:80]
        label += f" ({clean})"
    return label
