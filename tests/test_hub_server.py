"""The local test Hub (tests/hub_server.py) against the real, unmodified huggingface_hub and transformers clients."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .hub_fixtures import hub_server  # noqa: F401  (fixture)

BINARY = bytes(range(256)) * 7 + b"\x00\xff\xfe\r\n\x1a" + bytes(range(255, -1, -1))
TEXT = "héllo, hub\nline 2\r\nno trailing newline"

# Every route the client may use; anything else (LFS batch, Xet token / CAS calls, ...) would show up as unexpected.
KNOWN_ROUTES = re.compile(
    r"^(POST /api/repos/create"
    r"|POST /api/validate-yaml"
    r"|GET /api/whoami-v2"
    r"|(GET|POST|DELETE) /api/models/[^/]+/[^/]+(/(revision|tree|commits|paths-info|preupload|commit|branch)/.*|/refs)?"
    r"|(GET|HEAD) /[^/]+/[^/]+/resolve/.+)$"
)


def last_json_line(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_plain_protocol(hub):
    """Only the known endpoints were called, none failed with 5xx, and nothing went near LFS or Xet."""
    for method, path, status, _ in hub.requests:
        assert KNOWN_ROUTES.match(f"{method} {path}"), (method, path)
        assert status < 500, (method, path, status)
        assert "lfs" not in path.split("/resolve/")[0] and "xet" not in path.lower(), path


def test_upload_folder_then_snapshot_download_in_fresh_process(hub_server, tmp_path):
    api = HfApi(endpoint=hub_server.url, token=hub_server.token)
    repo_url = api.create_repo("org/name")
    assert repo_url.repo_id == "org/name" and repo_url.endpoint == hub_server.url
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo("org/name")
    assert exc.value.response.status_code == 409
    assert api.create_repo("org/name", exist_ok=True).repo_id == "org/name"

    folder = tmp_path / "upload"
    (folder / "nested" / "deeper").mkdir(parents=True)
    (folder / "notes.txt").write_bytes(TEXT.encode())
    (folder / "nested" / "deeper" / "blob.bin").write_bytes(BINARY)
    (folder / "empty.txt").write_bytes(b"")
    commit = api.upload_folder(folder_path=folder, repo_id="org/name", commit_message="add files")
    assert re.fullmatch(r"[0-9a-f]{40}", commit.oid) and commit.oid == hub_server.hub.head("org/name")
    assert api.list_repo_files("org/name") == [".gitattributes", "empty.txt", "nested/deeper/blob.bin", "notes.txt"]
    info = api.model_info("org/name", files_metadata=True)
    assert info.sha == commit.oid
    assert {s.rfilename: s.size for s in info.siblings}["nested/deeper/blob.bin"] == len(BINARY)

    proc = hub_server.run_python(
        "import json; from huggingface_hub import snapshot_download; "
        "print(json.dumps({'path': snapshot_download('org/name')}))",
        hf_home=tmp_path / "fresh_home",
    )
    snapshot = Path(last_json_line(proc)["path"])
    assert snapshot.resolve().is_relative_to((tmp_path / "fresh_home").resolve())
    assert (snapshot / "notes.txt").read_bytes() == TEXT.encode()
    assert (snapshot / "nested" / "deeper" / "blob.bin").read_bytes() == BINARY
    assert (snapshot / "empty.txt").read_bytes() == b""
    assert snapshot.name == commit.oid
    downloaded = {p for m, p, s, _ in hub_server.hub.requests if m == "GET" and "/resolve/" in p and s == 200}
    assert f"/org/name/resolve/{commit.oid}/nested/deeper/blob.bin" in downloaded
    assert_plain_protocol(hub_server.hub)


def test_push_to_hub_then_from_pretrained_in_fresh_process(hub_server, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    model = BertForSequenceClassification(config).eval()
    commit = model.push_to_hub("org/tiny", token="x")
    assert commit.oid == hub_server.hub.head("org/tiny")
    assert {"config.json", "model.safetensors", "README.md"} <= set(hub_server.hub.files("org/tiny"))
    input_ids = [[2, 7, 11, 3, 0], [5, 9, 1, 4, 8]]
    with torch.no_grad():
        expected = model(torch.tensor(input_ids)).logits

    code = textwrap.dedent(
        """
        import json, sys, torch
        from transformers import AutoModelForSequenceClassification
        model = AutoModelForSequenceClassification.from_pretrained("org/tiny").eval()
        with torch.no_grad():
            logits = model(torch.tensor(json.loads(sys.argv[1]))).logits
        print(json.dumps({"cls": type(model).__name__, "logits": logits.tolist()}))
        """
    )
    out = last_json_line(hub_server.run_python(code, json.dumps(input_ids), hf_home=tmp_path / "fresh_home"))
    assert out["cls"] == "BertForSequenceClassification"
    assert torch.allclose(torch.tensor(out["logits"]), expected, atol=1e-6)
    assert_plain_protocol(hub_server.hub)


def test_second_commit_revisions_and_not_found_errors(hub_server):
    api = HfApi(endpoint=hub_server.url, token=hub_server.token)
    api.create_repo("org/versions")
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="dir/value.txt", repo_id="org/versions")
    assert Path(hf_hub_download("org/versions", "dir/value.txt")).read_bytes() == b"v1"

    second = api.upload_file(path_or_fileobj=b"v2, longer", path_in_repo="dir/value.txt", repo_id="org/versions")
    assert second.oid != first.oid
    assert Path(hf_hub_download("org/versions", "dir/value.txt")).read_bytes() == b"v2, longer"
    assert Path(hf_hub_download("org/versions", "dir/value.txt", revision=first.oid)).read_bytes() == b"v1"
    assert Path(hf_hub_download("org/versions", "dir/value.txt", revision=second.oid)).read_bytes() == b"v2, longer"
    # an unchanged file makes no commit (the preupload answer carries the remote blob id)
    same = api.upload_file(path_or_fileobj=b"v2, longer", path_in_repo="dir/value.txt", repo_id="org/versions")
    assert same.oid == second.oid
    assert [c.title for c in api.list_repo_commits("org/versions")] == hub_server.hub.commit_titles("org/versions")
    assert len(hub_server.hub.commit_titles("org/versions")) == 3  # initial commit + two uploads

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/missing")
    with pytest.raises(EntryNotFoundError) as exc:
        hf_hub_download("org/versions", "dir/absent.json")
    assert isinstance(exc.value, RemoteEntryNotFoundError)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/versions", "dir/value.txt", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/versions", revision="no-such-branch")

    api.delete_file("dir/value.txt", repo_id="org/versions")
    assert api.list_repo_files("org/versions") == [".gitattributes"]
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/versions", "dir/value.txt", force_download=True)
    assert_plain_protocol(hub_server.hub)


def test_trust_remote_code_downloads_py_files(hub_server, tmp_path):
    """`auto_map` code is fetched with hf_hub_download of the .py files (and their relative imports), then imported
    from the fixture's own modules cache; nested paths resolve too."""
    from safetensors.torch import save_file
    from transformers import AutoModel

    folder = tmp_path / "remote_code"
    (folder / "sub" / "pkg").mkdir(parents=True)
    (folder / "configuration_tinyrc.py").write_text(
        textwrap.dedent(
            """
            from transformers import PretrainedConfig

            class TinyRCConfig(PretrainedConfig):
                model_type = "tinyrc"

                def __init__(self, width=4, **kwargs):
                    self.width = width
                    super().__init__(**kwargs)
            """
        )
    )
    (folder / "modeling_tinyrc.py").write_text(
        textwrap.dedent(
            """
            import torch
            from transformers import PreTrainedModel
            from .configuration_tinyrc import TinyRCConfig

            class TinyRCModel(PreTrainedModel):
                config_class = TinyRCConfig
                base_model_prefix = "tinyrc"

                def __init__(self, config):
                    super().__init__(config)
                    self.proj = torch.nn.Linear(config.width, 2)
                    self.post_init()

                def forward(self, x):
                    return self.proj(x)
            """
        )
    )
    config = {
        "model_type": "tinyrc",
        "width": 4,
        "architectures": ["TinyRCModel"],
        "auto_map": {"AutoConfig": "configuration_tinyrc.TinyRCConfig", "AutoModel": "modeling_tinyrc.TinyRCModel"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(2, 4, generator=generator), torch.randn(2, generator=generator)
    save_file({"proj.weight": weight, "proj.bias": bias}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "sub" / "pkg" / "helper module.py").write_text("VALUE = 42\n")

    api = HfApi(endpoint=hub_server.url)
    api.create_repo("org/remote-code")
    commit = api.upload_folder(folder_path=folder, repo_id="org/remote-code")
    nested = hf_hub_download("org/remote-code", "sub/pkg/helper module.py", revision=commit.oid)
    assert Path(nested).read_text() == "VALUE = 42\n"

    model = AutoModel.from_pretrained("org/remote-code", trust_remote_code=True).eval()
    assert type(model).__name__ == "TinyRCModel" and type(model).__module__.startswith("transformers_modules.")
    module_file = Path(sys.modules[type(model).__module__].__file__).resolve()
    assert module_file.is_relative_to((hub_server.hf_home / "modules").resolve())
    x = torch.tensor([[0.5, -1.0, 2.0, 0.25]])
    with torch.no_grad():
        assert torch.allclose(model(x), x @ weight.T + bias, atol=1e-6)
    fetched = {p.rsplit("/", 1)[-1] for m, p, s, _ in hub_server.hub.requests if m == "GET" and "/resolve/" in p}
    assert {"configuration_tinyrc.py", "modeling_tinyrc.py", "config.json", "model.safetensors"} <= fetched
    assert_plain_protocol(hub_server.hub)


def test_tree_pagination_branches_and_pull_requests(hub_server, tmp_path):
    api = HfApi(endpoint=hub_server.url)
    api.create_repo("org/many")
    hub_server.hub.tree_page_size = 2
    api.upload_folder(folder_path=_make_tree(tmp_path / "many"), repo_id="org/many")
    tree_calls = sum(1 for m, p, *_ in hub_server.hub.requests if m == "GET" and "/tree/" in p)
    files = api.list_repo_files("org/many")
    assert files == [".gitattributes", "a/1.txt", "a/2.txt", "a/b/3.txt", "c.txt"]
    # 7 entries (5 files, 2 folders) in pages of 2: the client followed the Link header through 4 pages
    assert sum(1 for m, p, *_ in hub_server.hub.requests if m == "GET" and "/tree/" in p) - tree_calls == 4
    assert sorted(e.path for e in api.list_repo_tree("org/many", path_in_repo="a")) == ["a/1.txt", "a/2.txt", "a/b"]

    api.create_branch("org/many", branch="dev")
    api.upload_file(path_or_fileobj=b"dev only", path_in_repo="c.txt", repo_id="org/many", revision="dev")
    pr = api.upload_file(path_or_fileobj=b"from a PR", path_in_repo="c.txt", repo_id="org/many", create_pr=True)
    assert pr.pr_revision == "refs/pr/1"
    assert Path(hf_hub_download("org/many", "c.txt", revision="dev")).read_bytes() == b"dev only"
    assert Path(hf_hub_download("org/many", "c.txt", revision="refs/pr/1")).read_bytes() == b"from a PR"
    assert Path(hf_hub_download("org/many", "c.txt")).read_bytes() == b"c"
    refs = api.list_repo_refs("org/many", include_pull_requests=True)
    assert sorted(b.name for b in refs.branches) == ["dev", "main"] and [p.ref for p in refs.pull_requests] == ["refs/pr/1"]
    assert_plain_protocol(hub_server.hub)


def test_writes_need_a_token_and_namespace_defaults_to_the_user(hub_server):
    with pytest.raises(HfHubHTTPError) as exc:
        HfApi(endpoint=hub_server.url, token=False).create_repo("org/anonymous")
    assert exc.value.response.status_code == 401
    api = HfApi(endpoint=hub_server.url)  # HF_TOKEN from the fixture's environment
    assert api.whoami()["name"] == hub_server.hub.username
    assert api.create_repo("no-namespace").repo_id == f"{hub_server.hub.username}/no-namespace"
    assert hub_server.token not in repr(hub_server.hub.requests)


def _make_tree(folder: Path) -> Path:
    for rel, content in {"a/1.txt": "1", "a/2.txt": "2", "a/b/3.txt": "3", "c.txt": "c"}.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(content)
    return folder
