"""The API's request and response models and its error type: what ``/docs`` (OpenAPI) shows and what every
refusal looks like on the wire (``{"error": code, "message": text, "status": http_status}``).

Nothing here does work: the routes (server.routes) declare these, the service (server.service) fills them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from dagan.config import MAX_MOUTH_GAIN


class ApiError(Exception):
    """An HTTP error with a stable machine-readable ``code`` and a message a person can act on."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers  # e.g. Retry-After on a 429


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable code, e.g. no_face, server_busy, not_an_image")
    message: str = Field(description="one sentence for the user")
    status: int


class SessionOptions(BaseModel):
    relative: bool | None = Field(
        None, description="relative motion transfer (default: the server's setting, normally true)"
    )
    show_depth: bool = Field(False, description="send the driving depth map beside the avatar")
    picture: Literal["crop", "full"] | None = Field(
        None,
        description="crop: the model's face crop; full: the avatar pasted back into the whole photo, "
        "fitted to the server's picture size (default: the server's setting, normally crop)",
    )
    auto_neutral: bool | None = Field(
        None,
        description="choose the neutral pose automatically: the frame closest to the photo's pose in the "
        "first seconds (default: the server's setting, normally off)",
    )
    mouth_gain: float | None = Field(
        None,
        gt=0,
        le=MAX_MOUTH_GAIN,
        description="relative motion: open the avatar's lips this many times as far as the driver's opens "
        "(1: as the driver's; default: the model's own, GET /api/config's mouth_gain; refused for a model "
        "that names no lip keypoints)",
    )


class IceServerInfo(BaseModel):
    urls: list[str]
    username: str | None = None
    credential: str | None = None


class SessionInfo(BaseModel):
    id: str
    relative: bool
    show_depth: bool
    has_source: bool
    connected: bool
    frames_in: int
    frames_dropped: int
    frames_out: int
    picture: str = "crop"
    mouth_gain: float | None = Field(None, description="the session's own mouth gain; null: the model's")


class NewSession(SessionInfo):
    ice_servers: list[IceServerInfo] = Field(
        description="RTCIceServer list for this session's peer connection; TURN credentials in it are "
        "minted for this session and expire (TURN REST API)"
    )


class CheckedSource(BaseModel):
    width: int = Field(description="uploaded photo width in pixels")
    height: int
    face_box: dict[str, float] = Field(description="square crop around the face: cx, cy, size (pixels)")


class SourceInfo(CheckedSource):
    id: str
    blinks: bool = Field(
        description="whether the avatar will blink with the driver: the model reads the driver's lids "
        "and the photo's eyelids were found (weights/README.md, 'Blinks')"
    )


class SdpMessage(BaseModel):
    sdp: str = Field(min_length=1)
    type: Literal["offer", "answer"]


# OpenAPI request body of the two photo routes (they read the multipart stream themselves, so FastAPI
# cannot infer it): one field 'file'.
PHOTO_UPLOAD = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            }
        },
    }
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` entry of a route that can refuse with these statuses."""
    return {c: {"model": ErrorBody} for c in codes}
