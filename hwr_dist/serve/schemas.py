"""Response shapes of the JSON API, for its OpenAPI schema (`GET /openapi.json`)."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field


class Scored(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    class_: str = Field(alias="class", description="class name, e.g. '7'")
    probability: float = Field(description="softmax probability, rounded to 4 decimals")


class Prediction(BaseModel):
    prediction: str = Field(description="the top class; in number mode (segment=true) one per character, "
                                        "left to right; a sequence model (crnn) reads the whole image as one line "
                                        "and answers the text")
    probability: float = Field(description="the top class's probability (number mode: the product over characters; "
                                         "a sequence model: the text's CTC probability)")
    top: Optional[list[Scored]] = Field(description="the top-k classes, most likely first (null in number mode)")
    characters: Optional[list[list[Scored]]] = Field(
        None, description="number mode only: the top-k classes of each character, left to right")
    input: Optional[list[str]] = Field(
        None, description="include_input=true only: each 28x28 image the model received, as a PNG data URL")


class PredictResponse(Prediction):
    model_id: str = Field(description="architecture and the first 12 hex digits of the model file's SHA-256")
    time_ms: float = Field(description="server time from the request's arrival to the answer")


class BatchResponse(BaseModel):
    model_id: str
    time_ms: float
    results: list[Prediction] = Field(description="one per image, in the order they were sent")


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong with the request, in one line")


class Health(BaseModel):
    status: str
    model_id: str


class ModelInfo(BaseModel):
    id: str
    architecture: str
    format: str = Field(description="checkpoint, torchscript, onnx or state-dict")
    file: str
    classes: list[str]
    input: dict[str, Any] = Field(description="the input contract: 28x28 grayscale, ink white on black, "
                                              "normalisation, and the request limits")
    training: dict[str, Any] = Field(description="data set, test accuracy, run id, steps (null when unknown)")
    quantization: Optional[dict[str, Any]] = None
    batching: dict[str, Any] = Field(description="max_batch and max_wait_ms of this server")


ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in (
    (400, "empty, not an image, truncated or damaged, malformed multipart"),
    (413, "over the size limit, too many pixels, or too many images"),
    (415, "content type not accepted"),
    (422, "an image with nothing to read (no ink), or a bad query parameter"),
)}
