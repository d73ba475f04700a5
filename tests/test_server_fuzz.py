"""Bad input never gets a 5xx: property-based tests (hypothesis) over the request schemas of
`/v1/completions` and `/v1/chat/completions`, in process (Starlette's TestClient) on the toy
text model.

Every body is a valid one with a few fields replaced by drawn values: wrong types,
out-of-range and extreme numbers (2^63, 10^4000, 1e308, -0.0), 'nan' / 'inf' as strings, lone
surrogates, NUL, nested lists and objects, unknown field names. Each answer must be a 200 or a
4xx whose OpenAI error object names, in `param` and in its message, a field that was replaced
(body-level errors, bad JSON, name none). Raw bodies (deep nesting, huge numbers, invalid
UTF-8, random bytes) get a 400 too. After each test a normal request still succeeds.

Bounded for CI (2 cores): `max_examples` per test, tiny answers (max_tokens <= 8).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from server_toys import SEP, VOCAB, EchoLM  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from powersmc import FunctionLM  # noqa: E402
from powersmc.server import ServerConfig, create_app  # noqa: E402
from powersmc.server.body import MAX_DEPTH  # noqa: E402
from powersmc.server.schemas import ChatRequest, CompletionRequest  # noqa: E402

KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
CONFIG = dict(model_name="toy", api_key=KEY, max_particles=4, max_batch=8,
              max_queue=64, max_body_bytes=65_536, max_tokens_limit=8, max_choices=4,
              request_timeout=20.0,
              defaults={"method": "smc", "alpha": 4.0, "particles": 2, "ess_threshold": 0.5,
                        "resampler": "systematic", "ramp_tokens": 0, "order": "standard",
                        "max_tokens": 4, "num_blocks": 2, "mh_moves": 1, "candidates": 2,
                        "rollouts": 2, "horizon": 2})
ROUTES = {"completions": ({"prompt": "ab"}, sorted(CompletionRequest.model_fields)),
          "chat/completions": ({"messages": [{"role": "user", "content": "hi"}]},
                               sorted(ChatRequest.model_fields))}
EXAMPLES = 60


class CalmLM(EchoLM):
    """The toy echo model without its test hooks (no gate, no 'boom' failure), and defined on
    token-id prompts without its separator too (answers EOS)."""

    def __init__(self) -> None:
        super().__init__()
        echo = self.fn
        self.fn = lambda prefix: echo(prefix) if SEP in prefix else [0.0] + [-1e9] * (VOCAB - 1)

    def prefill_many(self, prompts, rows, **kw):
        return FunctionLM.prefill_many(self, prompts, rows, **kw)


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(CalmLM(), ServerConfig(**CONFIG))) as c:
        yield c


def _healthy(client: TestClient) -> None:
    """The server still answers a normal request, and /health says ready."""
    r = client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 4}, headers=AUTH)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "OK", r.text
    assert client.get("/health").status_code == 200


def _check(r, replaced: set[str]) -> None:
    """200, or a 4xx OpenAI error naming one of the `replaced` fields (none for bad JSON)."""
    assert r.status_code < 500, r.text
    if r.status_code == 200:
        if r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]")
        else:
            assert r.json()["choices"]
        return
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if err["code"] == "invalid_json" and err["param"] is None:
        return  # a body-level error (a key that is not valid Unicode)
    assert err["param"] in replaced, (replaced, err)
    assert err["param"] in err["message"], err


# ---- drawn values: every JSON type, with the extremes that used to break things
EXTREME_INTS = [2**63, 2**63 - 1, 2**64, -(2**63) - 1, -1, 0, 1, 10**30, -(10**30), 10**4000]
ODD_STRINGS = ["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "", " ", "\x00", "a\x00b",
               "\ud800", "x\udfffy", "\U0010ffff", "\u202e", "smc", "mh", "plain", "spower",
               "greedy", "lowtemp", "systematic", "adapted", "user", "toy"]
ints = st.one_of(st.sampled_from(EXTREME_INTS), st.integers(-(2**70), 2**70),
                 st.integers(-3, 80))
floats = st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                   st.sampled_from([1e308, -1e308, 5e-324, -0.0, 0.5, 1.0, 4.0]))
strings = st.one_of(st.sampled_from(ODD_STRINGS),
                    st.text(st.characters(codec=None, categories=None), max_size=12))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, strings)
values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                      | st.dictionaries(strings, kids, max_size=3), max_leaves=8)


messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "developer", "assistant"]) | strings},
    optional={"content": strings | st.lists(st.fixed_dictionaries(
        {"type": st.just("text") | strings, "text": strings}), max_size=2),
        "name": strings}), max_size=3)


def _typed(annotation) -> st.SearchStrategy:
    """Values of a field's own type (to get past type checks to the range checks)."""
    a = str(annotation)
    if "ChatMessage" in a:
        return messages
    options = []
    if "bool" in a:
        options.append(st.booleans())
    if "int" in a:
        options.append(ints)
    if "float" in a:
        options += [floats, ints]
    if "str" in a:
        options.append(strings)
    if "list[str]" in a:
        options.append(st.lists(strings, max_size=5))
    if "list[int]" in a:
        options.append(st.lists(ints, max_size=4))
    if "list[list[int]]" in a:
        options.append(st.lists(st.lists(ints, max_size=3), max_size=3))
    if "dict" in a:
        options.append(st.dictionaries(strings, floats | ints, max_size=3))
    if "StreamOptions" in a:
        options.append(st.fixed_dictionaries({}, optional={"include_usage": scalars}))
    return st.one_of(options) if options else values


def _bodies(route: str):
    base, fields = ROUTES[route]
    model = CompletionRequest if route == "completions" else ChatRequest
    names = [*fields, "bogus", "Prompt", "seed\x00", "\ud83d"]
    field_value = st.sampled_from(names).flatmap(lambda name: st.tuples(st.just(name), st.one_of(
        _typed(model.model_fields[name].annotation) if name in fields else values, values)))
    return st.lists(field_value, min_size=1, max_size=3).map(
        lambda pairs: (base | dict(pairs), {name for name, _ in pairs}))


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_drawn_fields_get_200_or_a_4xx_naming_the_field(client, route):
    @FUZZ
    @given(case=_bodies(route))
    def one(case):
        body, replaced = case
        data = json.dumps(body, ensure_ascii=True).encode()  # lone surrogates as \\udXXX
        _check(client.post(f"/v1/{route}", content=data, headers=AUTH), replaced)

    one()
    _healthy(client)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_raw_bytes_get_200_or_a_4xx(client, raw):
    r = client.post("/v1/completions", content=raw, headers=AUTH)
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def _deep(depth: int, open_: str = "[", close: str = "]") -> bytes:
    return (open_ * depth + close * depth).encode()


@pytest.mark.parametrize("raw,param", [
    (_deep(30_000), None),  # RecursionError inside json.loads
    (b'{"prompt": ' + _deep(2_000) + b"}", None),
    (b'{"prompt": ' + _deep(MAX_DEPTH + 1) + b"}", "prompt"),
    (b'{"logit_bias": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}", "logit_bias"),
    (b'{"prompt": "x", "messages": ' + b"[" * 900 + b"]" * 900 + b"}", "messages"),
    (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", None),  # int beyond 4300 digits
    (b'{"prompt": "\\ud800"}', "prompt"),
    (b'{"\\udc00": 1, "prompt": "x"}', None),
    (b'{"prompt": "x"}\xff', None),
    (b'{"prompt": "x"', None),
])
def test_deep_huge_and_malformed_bodies_are_400(client, raw, param):
    r = client.post("/v1/completions", content=raw, headers=AUTH)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_json" and err["param"] == param
    if param:
        assert param in err["message"]
    _healthy(client)


@pytest.mark.parametrize("field,value", [
    ("seed", 2**63), ("seed", 2**64 + 5), ("seed", -1), ("seed", 10**4000),
])
def test_out_of_range_seed_is_a_400_with_the_range(client, field, value):
    r = client.post("/v1/completions", content=json.dumps({"prompt": "x", field: value}),
                    headers=AUTH)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "seed" and "[0, 2^63 - 1]" in err["message"]


def test_top_seed_works_with_n_and_every_method(client):
    for method in ("smc", "mh", "plain"):
        r = client.post("/v1/completions", json={"prompt": "ab", "seed": 2**63 - 1, "n": 2,
                                                 "method": method}, headers=AUTH)
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("raw,param", [
    (b'{"prompt": "x", "alpha": 1e400}', "alpha"),  # parses as inf
    (b'{"prompt": "x", "ess_threshold": -1e400}', "ess_threshold"),
    (b'{"prompt": "x", "alpha": 3.4028235677973366e+38}', "alpha"),  # float32 overflow
    (b'{"prompt": "x", "method": "plain", "temperature": 1e400}', "temperature"),
    (b'{"prompt": "x", "method": "plain", "top_p": 1e-400}', "top_p"),  # 0.0
    (b'{"prompt": "x", "method": "plain", "top_k": -99999999999999999999999}', "top_k"),
    (b'{"prompt": "x", "timeout": 1e400}', "timeout"),
    (b'{"prompt": "x", "timeout": 0}', "timeout"),
    (b'{"prompt": "x", "ramp_tokens": -99999999999999999999999}', "ramp_tokens"),
    (b'{"prompt": "x", "ramp_tokens": 1' + b"0" * 400 + b"}", "ramp_tokens"),  # float overflow
    (b'{"prompt": "x", "presence_penalty": 1e400}', "presence_penalty"),
    (b'{"prompt": [99999999999999999999999]}', "prompt"),
    (b'{"prompt": "x", "max_tokens": 99999999999999999999999}', "max_tokens"),
    (b'{"prompt": "x", "n": 99999999999999999999999}', "n"),
    (b'{"prompt": "x", "particles": 99999999999999999999999}', "particles"),
    (b'{"prompt": "x", "method": "mh", "num_blocks": 99999999999999999999999}', "num_blocks"),
])
def test_extreme_numbers_name_their_field(client, raw, param):
    r = client.post("/v1/completions", content=raw, headers=AUTH)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"], err


@pytest.mark.parametrize("raw", [  # no-ops: a top-k beyond the vocabulary, a ramp longer
    b'{"prompt": "x", "method": "plain", "top_k": 99999999999999999999999}',  # than any answer
    b'{"prompt": "x", "ramp_tokens": 1000000}',
    b'{"prompt": "x", "timeout": 1e300}',  # capped by --request-timeout
])
def test_huge_but_harmless_values_are_accepted(client, raw):
    assert client.post("/v1/completions", content=raw, headers=AUTH).status_code == 200
