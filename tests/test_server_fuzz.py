"""An OpenAPI fuzzer (schemathesis) against the running server: every route it publishes, with
generated path, query, header and body values and three kinds of token, answers without a 5xx; and
the document it fuzzes from describes what the server does. Real server on loopback, real store,
real policy registry."""

import httpx
import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from fleet.registry.store import open_registry
from fleet.server import ServerConfig, add_token, serve
from fleet.store import StoreConfig
from sim.episode import Episode
from tests.conftest import make_episode_arrays


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    tokens = root / "tokens.json"
    tok = {role: add_token(tokens, role, "r0" if role == "robot" else None) for role in ("robot", "operator", "publisher")}
    registry = open_registry(root / "registry", root / "online.pem", root_keys=[root / "root.pem"], root_threshold=1)
    config = ServerConfig(port=0, token_file=str(tokens), max_concurrent_uploads=64, upload_rate_per_s=1e6, upload_burst=10**6)
    handle = serve(config, StoreConfig(path=str(root / "store")), policy_registry=registry)
    yield handle.url, [*tok.values(), "not-a-token"]
    handle.stop()


def test_no_route_answers_5xx_to_generated_requests(server):
    url, tokens = server
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"post /v1/episodes", "get /v1/episodes", "post /v1/policies"} <= {f"{op.method} {op.path}" for op in operations}
    seen: dict[str, set[int]] = {}
    for op in operations:

        @settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def call(case):
            for token in tokens:
                response = case.call(headers={"Authorization": f"Bearer {token}"}, timeout=30)
                seen.setdefault(f"{op.method} {op.path}", set()).add(response.status_code)
                assert response.status_code < 500, (case.path, case.query, response.status_code, response.text[:300])

        call()
    assert all(codes for codes in seen.values()) and any(400 <= c < 500 for codes in seen.values() for c in codes)


ROLES = {  # operation -> the token role it needs (None: no token)
    "post /v1/episodes": "robot", "get /v1/episodes": "operator", "get /v1/episodes/{episode_id}": "operator", "get /metrics": "operator",
    "get /healthz": None, "head /healthz": None, "post /v1/policies": "publisher", "get /v1/rollout": "publisher",
    "post /v1/rollout/widen": "publisher", "post /v1/rollout/rollback": "publisher",
}  # fmt: skip


def test_the_openapi_document_describes_the_protocol(server):
    """docs/security.md says /openapi.json describes the protocol, yet it had no request body for an upload and an empty
    200 as its only answer, a 422 HTTPValidationError on every parametrised route that the server never sends (it sends
    400 bad_query, bad_upload_id), no refusal shape and no authentication."""
    url, tokens = server
    robot, operator = (f"Bearer {t}" for t in tokens[:2])
    doc = httpx.get(f"{url}/openapi.json").json()
    components = doc["components"]

    def validator(name: str):
        return jsonschema_rs.Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": components})

    assert "HTTPValidationError" not in components["schemas"] and "ValidationError" not in components["schemas"]
    assert components["securitySchemes"]["bearer"]["type"] == "http" and components["securitySchemes"]["bearer"]["scheme"] == "bearer"
    operations = {f"{method} {path}": op for path, methods in doc["paths"].items() for method, op in methods.items()}
    for name, op in operations.items():
        role = ROLES.get(name, "robot")  # uploads and the TUF files: robots
        assert op["security"] == ([{"bearer": [role]}] if role else []), name  # every route described, with its token's role
        assert "default" in op["responses"] and (name.startswith("head ") or op["responses"]["default"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}), name
        assert not name.startswith("head ") or not any("content" in response for response in op["responses"].values()), name  # HEAD: no body
        for status, response in op["responses"].items():
            if status[0] in "45" and "content" in response and name != "get /healthz":  # (healthz: 503 is its own shape, degraded)
                assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}, (name, status)
        if "422" in op["responses"]:  # only where an episode is parsed: never the framework's parameter check
            assert name in ("post /v1/episodes", "post /v1/uploads/{upload_id}/complete"), name
    upload = operations["post /v1/episodes"]
    assert upload["requestBody"]["required"] and set(upload["requestBody"]["content"]) == {"application/octet-stream"}
    assert {"200", "201", "400", "401", "403", "409", "413", "415", "422", "429", "503", "507"} <= set(upload["responses"])
    assert {(p["name"], p["in"]) for p in upload["parameters"]} == {("Content-Encoding", "header")}
    assert "requestBody" in operations["put /v1/uploads/{upload_id}"] and "requestBody" in operations["post /v1/policies"]
    assert {(p["name"], p["required"]) for p in operations["put /v1/uploads/{upload_id}"]["parameters"] if p["in"] == "header"} == {("Upload-Offset", True)}

    # what the server answers fits what the document says
    episode = Episode.create(**make_episode_arrays(seed=1), robot_id="r0", robot_model="toy", source="sim")
    created = httpx.post(f"{url}/v1/episodes", content=episode.to_bytes(), headers={"Authorization": robot})
    assert created.status_code == 201 and validator("EpisodeAck").is_valid(created.json())
    listed = httpx.get(f"{url}/v1/episodes", headers={"Authorization": operator})
    assert listed.json()["total"] >= 1 and validator("EpisodeList").is_valid(listed.json()), listed.json()
    for refused, status in (
        (httpx.get(f"{url}/v1/episodes", params={"limit": "abc"}, headers={"Authorization": operator}), "400"),
        (httpx.get(f"{url}/v1/uploads/{'x' * 31}", headers={"Authorization": robot}), "400"),
        (httpx.post(f"{url}/v1/episodes", content=b"not an episode", headers={"Authorization": robot}), "400"),
        (httpx.post(f"{url}/v1/episodes", content=episode.to_bytes(), headers={"Authorization": operator}), "403"),
    ):
        assert str(refused.status_code) == status and validator("Error").is_valid(refused.json()), refused.text
    assert "422" not in operations["get /v1/uploads/{upload_id}"]["responses"]
