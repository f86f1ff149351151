"""Security review fixes: CSRF and DNS rebinding, login throttling, the session
key, input that used to give 500, and a walk over every route's access check."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.api import api_env

TOO_BIG = "99999999999999999999"  # beyond a signed 64-bit integer


# -- input errors ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"/api/v1/jobs/{TOO_BIG}"),
        ("POST", f"/api/v1/jobs/{TOO_BIG}/retry"),
        ("POST", f"/api/v1/jobs/{TOO_BIG}/cancel"),
        ("PUT", f"/api/v1/jobs/{TOO_BIG}/priority"),
        ("GET", f"/api/v1/config/versions/{TOO_BIG}"),
        ("GET", f"/api/v1/config/versions/1/diff/{TOO_BIG}"),
        ("POST", f"/api/v1/config/versions/{TOO_BIG}/rollback"),
        ("GET", f"/jobs/{TOO_BIG}"),
        ("POST", f"/jobs/{TOO_BIG}/retry"),
        ("GET", f"/config/versions/{TOO_BIG}"),
        ("POST", f"/config/versions/{TOO_BIG}/rollback"),
        ("GET", "/api/v1/jobs/0"),
        ("GET", "/api/v1/jobs?since=nan"),
        ("GET", "/api/v1/jobs?until=inf"),
        ("GET", "/api/v1/jobs?since=-Infinity"),
        ("GET", "/api/v1/jobs?since=1e999"),
        ("GET", "/api/v1/audit?since=nan"),
    ],
)
def test_out_of_range_ids_and_non_finite_times_are_422(
    tmp_path: Path, method: str, path: str
) -> None:
    env = api_env(tmp_path)
    body = {"priority": 1} if path.endswith("/priority") else None
    response = env.admin.request(method, path, json=body)
    assert response.status_code == 422, response.text


def test_the_largest_id_is_a_plain_404(tmp_path: Path) -> None:
    env = api_env(tmp_path)
    assert env.viewer.get(f"/api/v1/jobs/{2**63 - 1}").status_code == 404
    assert env.viewer.get(f"/api/v1/config/versions/{2**63 - 1}").status_code == 404
