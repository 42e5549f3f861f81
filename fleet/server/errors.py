"""API errors: every refusal is a 4xx/5xx JSON body {"error", "field", "reason"}."""

from __future__ import annotations

from starlette.responses import JSONResponse

from sim.episode import V1_1_METADATA, EpisodeValidationError


class ApiError(Exception):
    """A refusal: HTTP ``status``, machine-readable ``error`` code, the ``field`` at fault, human ``reason``."""

    def __init__(self, status: int, error: str, reason: str, field: str | None = None, headers: dict | None = None):
        super().__init__(f"{status} {error}: {reason}")
        self.status, self.error, self.reason, self.field, self.headers = status, error, reason, field, headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.error, "field": self.field, "reason": self.reason}, status_code=self.status, headers=self.headers)


# (substring of EpisodeValidationError.reason, HTTP status, error code); first match wins.
_RULES: tuple[tuple[str, int, str], ...] = (
    ("must be a JSON string", 422, "bad_metadata"),
    ("must be UTF-8 text", 422, "bad_metadata"),
    ("holds a control character", 422, "bad_metadata"),
    ("metadata keys and values must be strings", 422, "bad_metadata"),
    ("not valid JSON", 400, "bad_header"),
    ("nested deeper than", 400, "bad_header"),
    ("not a safetensors file", 400, "not_safetensors"),
    ("declared header length", 400, "not_safetensors"),
    ("header too large", 400, "bad_header"),
    ("header must be a JSON object", 400, "bad_header"),
    ("__metadata__ must map", 400, "bad_header"),
    ("tensor entry needs", 400, "bad_header"),
    ("bad shape", 400, "bad_header"),
    ("bad data_offsets", 400, "bad_header"),
    ("does not match the", 400, "size_mismatch"),
    ("overlaps another tensor", 400, "size_mismatch"),
    ("trailing bytes", 400, "size_mismatch"),
    ("unsupported dtype", 422, "bad_dtype"),
    ("expected dtype", 422, "bad_dtype"),
    ("unknown schema version", 422, "unknown_schema_version"),
    ("missing required metadata", 422, "missing_metadata"),
    ("unknown metadata key", 422, "unknown_metadata"),
    ("missing required array", 422, "missing_array"),
    ("unknown array", 422, "unknown_array"),
    ("dimensions, got shape", 422, "bad_shape"),
    ("leading axis", 422, "bad_shape"),
    ("needs at least one feature", 422, "bad_shape"),
    ("at least one step", 422, "bad_shape"),
    ("has no values in its rows", 422, "bad_shape"),
    ("NaN or Inf", 422, "non_finite"),
    ("strictly increasing", 422, "non_increasing_timestamp"),
    ("before the last step", 422, "bad_episode_end"),
    ("outside the episode's time span", 422, "bad_camera_timestamp"),
    ("but the episode has no array", 422, "missing_array"),
)


def from_validation(exc: EpisodeValidationError) -> ApiError:
    """Map a schema error to its HTTP refusal; unknown wording falls back to 422 invalid_episode."""
    for needle, status, code in _RULES:
        if needle in exc.reason:
            return ApiError(status, code, exc.reason, exc.field)
    if exc.field in ("schema_version", "robot_id", "episode_id", "policy_version", "source", "robot_model") or exc.field.split(".")[0] in V1_1_METADATA:
        return ApiError(422, "bad_metadata", exc.reason, exc.field)
    return ApiError(422, "invalid_episode", exc.reason, exc.field)
