"""An OpenAPI fuzzer (schemathesis) against the running server: every route it publishes, with
generated path, query and body values and three kinds of token, answers without a 5xx. Real
server on loopback, real store, real policy registry."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from fleet.registry.store import open_registry
from fleet.server import ServerConfig, add_token, serve
from fleet.store import StoreConfig


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
