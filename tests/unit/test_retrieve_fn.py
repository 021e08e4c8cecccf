"""actors.rollout_worker._retrieve_fn: how a rollout worker calls the retriever it was given."""

import pytest

from actors.rollout_worker import _retrieve_fn


class _Response:
    def __init__(self, value):
        self.value = value

    def result(self, timeout_s=None):
        return self.value


class _Method:
    def __init__(self, log):
        self.log = log

    def remote(self, queries, topk):
        self.log.append((queries, topk))
        return _Response([[f"{q}@{topk}"] for q in queries])


class _Handle:
    def __init__(self, log):
        self.retrieve = _Method(log)


def test_app_name_is_looked_up_at_the_first_search_and_once(monkeypatch):
    from ray import serve

    lookups, calls = [], []
    monkeypatch.setattr(serve, "get_app_handle", lambda name: lookups.append(name) or _Handle(calls))
    fn = _retrieve_fn("retriever")
    assert lookups == []                      # the pool may start before the app is up
    assert fn(("a", "b"), 3) == [["a@3"], ["b@3"]]
    assert fn(["c"], 2) == [["c@2"]]
    assert lookups == ["retriever"] and calls == [(["a", "b"], 3), (["c"], 2)]


def test_missing_app_names_the_setting(monkeypatch):
    from ray import serve

    def missing(name):
        raise KeyError(name)

    monkeypatch.setattr(serve, "get_app_handle", missing)
    with pytest.raises(RuntimeError, match=r"no Serve app named 'gone'.*retriever.app_name"):
        _retrieve_fn("gone")(["q"], 3)


def test_callable_none_and_bad_types():
    assert _retrieve_fn(lambda q, k: [[k]] * len(q))(["x"], 4) == [[4]]
    with pytest.raises(RuntimeError, match="no retriever"):
        _retrieve_fn(None)(["q"], 3)
    with pytest.raises(TypeError, match="cannot call retriever of type int"):
        _retrieve_fn(5)


class _HungResponse:
    def __init__(self):
        self.cancelled = False
        self.timeouts = []

    def result(self, timeout_s=None):
        self.timeouts.append(timeout_s)
        raise TimeoutError("Timed out waiting for result")

    def cancel(self):
        self.cancelled = True


@pytest.mark.faults("hung retriever (timeout)")
def test_a_hung_retriever_times_out_naming_the_setting():
    resp = _HungResponse()

    class Method:
        def remote(self, queries, topk):
            return resp

    class Handle:
        retrieve = Method()

    with pytest.raises(TimeoutError, match=r"retriever did not answer a search of 2 queries within "
                                           r"7\.5s \(retriever.call_timeout_s\)"):
        _retrieve_fn(Handle(), timeout_s=7.5)(["a", "b"], 3)
    assert resp.timeouts == [7.5] and resp.cancelled       # bounded, and the call is cancelled


class _DyingOnce:
    """A handle whose first ``dead`` calls land on a replica that dies with the call in flight."""

    def __init__(self, dead, exc):
        self.calls, self.dead, self.exc = 0, dead, exc
        outer = self

        class M:
            def remote(self, queries, topk):
                outer.calls += 1
                if outer.calls <= outer.dead:
                    class R:
                        def result(self, timeout_s=None):
                            raise outer.exc
                    return R()
                return _Response([[q] for q in queries])

        self.retrieve = M()


def test_a_search_whose_replica_died_is_sent_again(monkeypatch):
    import actors.rollout_worker as rw
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    monkeypatch.setattr(rw.time, "sleep", lambda s: None)
    for exc in (ActorDiedError(), ActorUnavailableError("restarting", None)):
        h = _DyingOnce(2, exc)
        assert _retrieve_fn(h, 5.0)(["a", "b"], 3) == [["a"], ["b"]] and h.calls == 3
    h = _DyingOnce(99, ActorDiedError())
    with pytest.raises(RuntimeError, match=r"replica died 4 times during one search"):
        _retrieve_fn(h, 5.0)(["a"], 3)
    assert h.calls == 4
