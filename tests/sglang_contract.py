"""SGLang's own JSON contract, as the tests' judge of what we send to and serve as SGLang.

`sglang/api/v1/api_types.py` is generated from SGLang's proto schema and is the check its server
runs on `/generate` requests (a violation is its HTTP 400). It needs only `msgspec`, so it is
loaded by file path from the installed wheel (`pip install --no-deps sglang`, done by `make
install`) without importing the rest of sglang, which needs a GPU stack.

    api = load()                       # None when the wheel is not installed (tests then skip)
    check_generate_request(api, body)  # raises api.JsonContractError like the server would
    decode_generate_response(api, body)
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

import pytest

_NAME = "sglang_api_types"


def api_types_path() -> str | None:
  """The installed wheel's api_types.py, found without importing sglang."""
  spec = importlib.util.find_spec("sglang")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "api", "v1", "api_types.py")
  return path if os.path.isfile(path) else None


def load():
  """The api_types module, or None when the sglang wheel is not installed."""
  if _NAME in sys.modules:
    return sys.modules[_NAME]
  path = api_types_path()
  if path is None:
    return None
  spec = importlib.util.spec_from_file_location(_NAME, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[_NAME] = module
  spec.loader.exec_module(module)
  return module


def require():
  """api_types, or skip the test with the command that installs it."""
  api = load()
  if api is None:
    pytest.skip("the sglang wheel is not installed: pip install --no-deps sglang msgspec")
  return api


def check_generate_request(api, body: dict[str, Any]):
  """Decodes a /generate request body as the server does; raises JsonContractError if bad."""
  return api.GenerateRequest.from_json_value(body)


def decode_generate_response(api, body: Any) -> list:
  """A /generate response (one object, or a list for a batch) as GenerateResponse structs."""
  items = body if isinstance(body, list) else [body]
  return [api.GenerateResponse.from_json_value(item) for item in items]
