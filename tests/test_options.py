"""One options schema (`methods.options.OPTIONS`): every method option, set on every surface
that takes it (`powersmc sample` and `eval` flags, `powersmc serve` flags and request fields),
reaches the method it configures. Table-driven: a new option must be added to `VALUES`."""

import json

import httpx
import pytest
from server_toys import EchoLM, live_server

from powersmc.cli import main
from powersmc.cli_parser import build_parser
from powersmc.methods import registry
from powersmc.methods.options import OPTIONS
from powersmc.server.config import SERVED, ServerConfig
from powersmc.server.run import config_from_args

# a value other than the default for every option, and the text the CLI reads it from
VALUES = {"particles": 3, "ess_threshold": 0.25, "resampler": "residual", "ramp_tokens": 2,
          "order": "adapted", "resample_align": 2, "rounds": 2, "num_blocks": 3,
          "mh_moves": 2, "candidates": 3, "rollouts": 2, "horizon": 3, "bon_samples": 5,
          "select": "vote", "rejuvenate_moves": 2, "cut_power": 2.0, "alphas": [1.5, 2.0],
          "stage_tokens": 2, "maj_samples": 3, "temperature": 0.5}
TEXT = {"alphas": "1.5,2"}  # how the CLI reads a value whose str() is not its flag's text


def _text(option):
    return TEXT.get(option.name, str(VALUES[option.name]))


CASES = [(o, m) for o in OPTIONS for m in o.methods if m != "smc-adapted" or o.name != "order"]


def test_every_option_has_a_test_value():
    assert set(VALUES) == {o.name for o in OPTIONS}
    assert all(VALUES[o.name] != o.default for o in OPTIONS)


@pytest.fixture
def seen(monkeypatch):
    """Record the keyword arguments every method's program receives."""
    calls: list[tuple[str, dict]] = []
    for name, fn in list(registry.METHODS.items()):
        def recording(model, prompt, _name=name, _fn=fn, **kw):
            calls.append((_name, kw))
            return _fn(model, prompt, **kw)
        monkeypatch.setitem(registry.METHODS, name, recording)
    def load(args):
        lm = EchoLM()
        lm.chat = False  # what `eval` reads of a loaded text model
        return lm

    monkeypatch.setattr("powersmc.cli_commands._load", load)
    return calls


def _reached(calls, method, option):
    got = [kw for name, kw in calls if name == method]
    assert got, f"{method} never ran"
    return all(kw.get(option.name) == VALUES[option.name] for kw in got)


@pytest.mark.parametrize("option,method", CASES, ids=lambda x: getattr(x, "name", x))
def test_sample_flags_reach_the_method(option, method, seen, capsys):
    code = main(["sample", "--prompt", "hi", "--method", method, "--max-new-tokens", "3",
                 "--seed", "0", option.cli, _text(option)])
    assert code == 0, capsys.readouterr().err
    assert _reached(seen, method, option)


@pytest.mark.parametrize("option,method", CASES, ids=lambda x: getattr(x, "name", x))
def test_eval_flags_reach_the_method(option, method, seen, tmp_path, capsys):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"question": "hi", "answer": "#### 1"}) + "\n")
    code = main(["eval", "--dataset", str(data), "--methods", method, "--out",
                 str(tmp_path / "run"), "--max-new-tokens", "3", "--template", "chat",
                 "--no-progress", option.cli, _text(option)])
    assert code == 0, capsys.readouterr().err
    assert _reached(seen, method, option)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["options"][option.name] == VALUES[option.name]


SERVED_CASES = [(o, m) for o, m in CASES if o.served]


@pytest.mark.parametrize("option,method", SERVED_CASES, ids=lambda x: getattr(x, "name", x))
def test_serve_flags_and_request_fields_reach_the_method(option, method, seen):
    args = build_parser().parse_args(["serve", "--max-new-tokens", "3", option.cli,
                                      _text(option)])
    flagged = config_from_args(args)
    assert flagged.defaults[option.name] == VALUES[option.name]
    lm = EchoLM()
    for config, body in ((flagged, {}), (ServerConfig(), {option.name: VALUES[option.name]})):
        with live_server(lm, **{**vars(config), "max_particles": 64}) as url:
            r = httpx.post(f"{url}/v1/completions", json={
                "prompt": "hi", "method": method, "max_tokens": 3, "seed": 0, **body},
                timeout=60)
        assert r.status_code == 200, r.text
        assert _reached(seen, method, option)
        seen.clear()


def test_served_fields_are_the_declared_options():
    from powersmc.server.schemas import CompletionRequest

    fields = set(CompletionRequest.model_fields)
    assert {o.name for o in SERVED} <= fields
    # temperature is OpenAI's own field, which the server maps onto plain's and maj's
    assert not {o.name for o in OPTIONS if not o.served} - {"temperature"} & fields


def test_a_request_temperature_reaches_maj(seen):
    with live_server(EchoLM()) as url:
        r = httpx.post(f"{url}/v1/completions", json={
            "prompt": "hi", "method": "maj", "max_tokens": 3, "seed": 0, "temperature": 0.5},
            timeout=60)
    assert r.status_code == 200, r.text
    assert [kw["temperature"] for name, kw in seen if name == "maj"] == [0.5]
