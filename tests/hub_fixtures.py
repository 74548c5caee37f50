"""Pytest fixture that points the real ``huggingface_hub`` / ``transformers`` clients at the local test Hub.

Use from a conftest (``from tests.hub_fixtures import hub_server  # noqa: F401``) or import it in a test module.

``hub_server`` starts :class:`tests.hub_server.HubServer` on 127.0.0.1 (free port, blobs under ``tmp_path``), and
for the duration of the test:

* sets in ``os.environ``: ``HF_ENDPOINT`` (server url), ``HF_TOKEN`` (``TEST_TOKEN``: a logged-in user; pass
  ``token=False`` or ``monkeypatch.delenv("HF_TOKEN")`` for anonymous calls), ``HF_HUB_OFFLINE=0``, ``TRANSFORMERS_OFFLINE=0``,
  ``HF_HOME`` (``tmp_path/hf_home``) and under it ``HF_HUB_CACHE``, ``HF_ASSETS_CACHE``, ``HF_XET_CACHE``,
  ``HF_MODULES_CACHE``, ``HF_TOKEN_PATH``; ``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_HUB_DISABLE_UPDATE_CHECK=1``,
  ``HF_HUB_DISABLE_PROGRESS_BARS=1``; adds 127.0.0.1/localhost to ``NO_PROXY``/``no_proxy``; removes
  ``HUGGING_FACE_HUB_TOKEN``, ``HUGGINGFACE_HUB_CACHE``, ``HUGGINGFACE_ASSETS_CACHE``, ``TRANSFORMERS_CACHE``,
  ``HUGGINGFACE_CO_STAGING``, ``HF_HUB_DISABLE_XET``, ``HF_OIDC_RESOURCE``;
* patches the values ``huggingface_hub.constants`` computed from the environment at import time (``ENDPOINT``,
  ``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_URL_HOSTS``, ``HF_HUB_OFFLINE``, the cache / token paths, ...), the
  endpoint of the module-level ``huggingface_hub.hf_api.api`` instance (behind ``huggingface_hub.create_repo``,
  ``upload_folder``, ...), transformers' shared ``HfApi`` (reset so it is rebuilt against the server) and its
  remote-code modules cache (``HF_MODULES_CACHE``, with ``transformers_modules`` unloaded for the test);
* closes ``huggingface_hub``'s shared HTTP client before and after, so no connection or proxy setting leaks.

Everything is undone at teardown (monkeypatch), then the server stops.  The fixture value is a :class:`HubHandle`:
``url``, ``hub`` (the server: ``requests`` log, ``files()``, ``head()``, ``commit_titles()``), ``token`` (any
string works), ``hf_home``, ``env`` (a full environment for fresh processes), ``env_for(other_hf_home)`` and
``run_python(code, *args, hf_home=None)`` to run ``python -c code`` in such a process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .hub_server import HubServer

__all__ = ["HubHandle", "hub_server", "configure_client_for_hub"]

TEST_TOKEN = "hf_test_token_for_local_hub"  # any Bearer token is accepted by the test Hub

_UNSET_ENV = (
    "HUGGING_FACE_HUB_TOKEN",
    "HF_OIDC_RESOURCE",
    "HUGGINGFACE_HUB_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
    "TRANSFORMERS_CACHE",
    "HUGGINGFACE_CO_STAGING",
    "HF_HUB_DISABLE_XET",
)


@dataclass
class HubHandle:
    url: str
    hub: HubServer
    hf_home: Path
    env: dict[str, str] = field(repr=False)
    token: str = TEST_TOKEN

    @property
    def cache_dir(self) -> Path:
        return self.hf_home / "hub"

    def env_for(self, hf_home: str | os.PathLike) -> dict[str, str]:
        """``env`` with every Hugging Face cache moved under another ``hf_home`` (a process with an empty cache)."""
        env = dict(self.env)
        env.update({k: v for k, v in _hub_env(self.url, Path(hf_home)).items() if k not in ("NO_PROXY", "no_proxy")})
        return env

    def run_python(
        self,
        code: str,
        *args: str,
        hf_home: str | os.PathLike | None = None,
        timeout: float = 120,
        cwd: str | os.PathLike | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ``python -c code *args`` in a fresh interpreter pointed at the server (text mode, output captured).

        With ``hf_home``, that process gets its own (empty) cache there instead of sharing ``self.hf_home``.
        """
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            env=self.env if hf_home is None else self.env_for(hf_home),
            cwd=cwd or self.hf_home.parent,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _hub_env(url: str, hf_home: Path) -> dict[str, str]:
    no_proxy = ",".join(v for v in (os.environ.get("NO_PROXY") or os.environ.get("no_proxy"), "127.0.0.1,localhost") if v)
    return {
        "HF_ENDPOINT": url,
        "HF_TOKEN": TEST_TOKEN,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_MODULES_CACHE": str(hf_home / "modules"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


def configure_client_for_hub(monkeypatch: pytest.MonkeyPatch, url: str, hf_home: Path) -> dict[str, str]:
    """Point this process's ``huggingface_hub`` / ``transformers`` at ``url`` with a clean cache in ``hf_home``.

    All changes go through ``monkeypatch`` and are undone with it. Returns the environment for fresh processes.
    """
    from huggingface_hub import constants
    from huggingface_hub import hf_api as hf_api_module
    from huggingface_hub.utils import _http

    hf_home.mkdir(parents=True, exist_ok=True)
    settings = _hub_env(url, hf_home)
    for name in _UNSET_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)

    patched = {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {"127.0.0.1"}),
        "HF_HUB_OFFLINE": False,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": settings["HF_HUB_CACHE"],
        "HUGGINGFACE_HUB_CACHE": settings["HF_HUB_CACHE"],
        "HF_ASSETS_CACHE": settings["HF_ASSETS_CACHE"],
        "HUGGINGFACE_ASSETS_CACHE": settings["HF_ASSETS_CACHE"],
        "HF_XET_CACHE": settings["HF_XET_CACHE"],
        "HF_TOKEN_PATH": settings["HF_TOKEN_PATH"],
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "CHECK_FOR_UPDATE_DONE_PATH": str(hf_home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(hf_home / ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
    }
    for name, value in patched.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    # Module-level `HfApi()` behind `huggingface_hub.create_repo`, `upload_folder`, ...: its endpoint was read at import.
    monkeypatch.setattr(hf_api_module.api, "endpoint", url)
    if hasattr(_http, "_HUB_ORIGINS"):
        monkeypatch.setattr(_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS | {_http._url_origin(url)}))

    # transformers keeps a shared HfApi (built on first use with the endpoint of that moment) and a modules cache for
    # remote code, both fixed at import time: reset / redirect them (importing transformers now, so that an import
    # during the test cannot leave them pointing at this test's server and cache afterwards).
    try:
        import transformers.dynamic_module_utils  # noqa: F401
        import transformers.utils.hub  # noqa: F401
    except ImportError:
        pass
    if "transformers.utils.hub" in sys.modules:
        tf_hub = sys.modules["transformers.utils.hub"]
        if hasattr(tf_hub, "_hf_api"):
            monkeypatch.setattr(tf_hub, "_hf_api", None)
        modules_cache = settings["HF_MODULES_CACHE"]
        monkeypatch.setattr(tf_hub, "HF_MODULES_CACHE", modules_cache)
        dyn = sys.modules.get("transformers.dynamic_module_utils")
        if dyn is not None:
            monkeypatch.setattr(dyn, "HF_MODULES_CACHE", modules_cache)
        # Remote code is imported as `transformers_modules.<repo>...` from the modules cache; unload any copy loaded
        # from another cache for the test (restored afterwards) and restore sys.path, which the loader appends to.
        for name in [m for m in sys.modules if m == "transformers_modules" or m.startswith("transformers_modules.")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setattr(sys, "path", list(sys.path))

    _http.close_session()  # the shared client is rebuilt on next use, with the environment set above
    return {**{k: v for k, v in os.environ.items() if k not in _UNSET_ENV}, **settings}


@pytest.fixture
def hub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A running local Hub, with this process and ``HubHandle.env`` pointed at it (see module docstring)."""
    from huggingface_hub.utils import _http

    hub = HubServer(tmp_path / "hub_server").start()
    try:
        hf_home = tmp_path / "hf_home"
        env = configure_client_for_hub(monkeypatch, hub.url, hf_home)
        yield HubHandle(url=hub.url, hub=hub, hf_home=hf_home, env=env)
    finally:
        _http.close_session()
        for name in [m for m in sys.modules if m == "transformers_modules" or m.startswith("transformers_modules.")]:
            sys.modules.pop(name, None)  # remote code imported from this test's cache (earlier copies come back below)
        monkeypatch.undo()
        hub.stop()
