"""The OpenAPI file documents exactly the routes the web module registers."""

import re

import yaml

from tests.support.paths import REPO as ROOT


def test_openapi_paths_match_registered_pages():
    spec = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())
    assert spec["openapi"].startswith("3.")
    documented = set(spec["paths"])
    source = (ROOT / "streams" / "service" / "web.py").read_text()
    registered = set(re.findall(r'@(?:app\.)?page\("([^"]+)"', source))
    assert documented == registered
    for path, item in spec["paths"].items():
        method = "get" if "get" in item else "post"  # /login, /logout: POST only
        assert method in item and "200" in item[method]["responses"], path
