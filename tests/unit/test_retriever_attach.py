"""actors.retriever.attach_retriever: when a start attaches to a running app of the configured
name, when it redeploys, and when it refuses (an app over another index: issue 20). Serve's API is
replaced by a fake that answers status / get_app_handle / stats like a running app; the real app
is exercised in tests/integration/test_retriever_serve.py."""

from types import SimpleNamespace

import pytest

import actors.retriever as retriever
from searche1_ray.config import RetrieverConfig


class _Stats:
    def __init__(self, stats):
        self.stats = stats

    def remote(self):
        return self

    def result(self, timeout_s=None):
        if isinstance(self.stats, Exception):
            raise self.stats
        return self.stats


def _fake_serve(monkeypatch, stats, status="RUNNING", name="retriever"):
    apps = {name: SimpleNamespace(status=status)} if status else {}
    fake = SimpleNamespace(status=lambda: SimpleNamespace(applications=apps),
                           get_app_handle=lambda n: SimpleNamespace(stats=_Stats(stats)))
    monkeypatch.setattr(retriever, "serve", fake)
    monkeypatch.setattr(retriever, "_app_url", lambda rcfg: (f"http://{rcfg.host}:{rcfg.port}{rcfg.route_prefix}", None))


def _stats(index_dir, built_at="t1"):
    return {"index_dir": str(index_dir.resolve()), "built_at": built_at, "passages": 100}


def test_same_index_and_build_attaches(monkeypatch, tmp_path):
    _fake_serve(monkeypatch, _stats(tmp_path / "idx"))
    handle, url = retriever.attach_retriever(RetrieverConfig(), tmp_path / "idx", "t1")
    assert url == "http://127.0.0.1:8000/retrieve" and handle.stats.result()["passages"] == 100


@pytest.mark.faults("retriever app over another index")
def test_another_index_is_refused_naming_both_and_the_ways_out(monkeypatch, tmp_path):
    _fake_serve(monkeypatch, _stats(tmp_path / "theirs"))
    with pytest.raises(retriever.RetrieverAppConflict) as e:
        retriever.attach_retriever(RetrieverConfig(), tmp_path / "ours", "t1")
    msg = str(e.value)
    for part in ("'retriever'", str((tmp_path / "theirs").resolve()), str((tmp_path / "ours").resolve()),
                 "retriever.app_name", "retriever.replace_app=true", "serve delete retriever"):
        assert part in msg, part


def test_another_index_is_replaced_when_configured(monkeypatch, tmp_path):
    _fake_serve(monkeypatch, _stats(tmp_path / "theirs"))
    assert retriever.attach_retriever(RetrieverConfig(replace_app=True), tmp_path / "ours", "t1") is None


def test_an_older_build_of_the_same_index_is_redeployed(monkeypatch, tmp_path):
    _fake_serve(monkeypatch, _stats(tmp_path / "idx", built_at="t0"))
    assert retriever.attach_retriever(RetrieverConfig(), tmp_path / "idx", "t1") is None


@pytest.mark.parametrize("status", [None, "DEPLOY_FAILED"])
def test_no_running_app_deploys(monkeypatch, tmp_path, status):
    _fake_serve(monkeypatch, _stats(tmp_path / "theirs"), status=status)
    assert retriever.attach_retriever(RetrieverConfig(), tmp_path / "ours", "t1") is None


def test_an_app_that_does_not_answer_is_redeployed(monkeypatch, tmp_path):
    _fake_serve(monkeypatch, TimeoutError("no answer"))
    assert retriever.attach_retriever(RetrieverConfig(), tmp_path / "ours", "t1") is None


def test_stop_deletes_only_an_app_this_process_deployed(monkeypatch):
    deleted = []
    monkeypatch.setattr(retriever, "serve", SimpleNamespace(delete=deleted.append))
    monkeypatch.setattr(retriever, "_DEPLOYED", {"mine"})
    assert retriever.stop_retriever(RetrieverConfig(app_name="theirs")) is False
    assert retriever.stop_retriever(RetrieverConfig(app_name="mine")) is True
    assert deleted == ["mine"] and retriever.stop_retriever(RetrieverConfig(app_name="mine")) is False
