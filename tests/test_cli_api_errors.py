"""A newcomer's first hour: every bad flag, argument or API input is refused clearly, before any work.

CLI: exit code 2, stderr exactly one non-empty line naming the flag or argument, no traceback.
API: the right exception type (ValueError / TypeError / ConfigError, a ValueError) naming the argument.
Also: --version, --help of every subcommand, streamed text == the one-shot decode, the stats line.

The CLI runs as a subprocess (`python -m graphrt.cli`); each costs a second or two of imports, so the
subprocesses of a group start together (module-scoped fixtures) and each case is checked by its own test.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import graphrt
from graphrt import ConfigError, Runtime

REPO = Path(__file__).resolve().parents[1]
PLAN_CONFIG = str(REPO / "tools" / "configs" / "llama-3.1-70b.json")
MISSING_PLAN_MODEL = "/nonexistent/graphrt-model"
SHORT_POSITIONS = 48
SHORT_PROMPT = "The quick brown fox jumps over the lazy dog near the quiet river bank."
CLI_TIMEOUT = 300
WORKERS = max(2, min(8, (os.cpu_count() or 2) + 1))
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8"}
SUBCOMMANDS = ("generate", "chat", "plan", "fetch-default", "bench")


# ---- running the CLI ---------------------------------------------------------------------------------------------

def _cli(argv: list[str], timeout: float = CLI_TIMEOUT, env: dict | None = None):
    """The finished process, or the exception that stopped it (re-raised by the test that looks at it)."""
    try:
        return subprocess.run([sys.executable, "-m", "graphrt.cli", *argv], capture_output=True, text=True,
                              encoding="utf-8", timeout=timeout, cwd=REPO, env=env or ENV)
    except Exception as e:  # a timeout fails only the case that hung
        return e


def _cli_many(commands: dict[str, list[str]]) -> dict:
    """Run concurrently, one torch thread each (concurrent thread pools would thrash the cores)."""
    env = {**ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = {name: pool.submit(_cli, argv, CLI_TIMEOUT, env) for name, argv in commands.items()}
        return {name: f.result() for name, f in futures.items()}


def _finished(result) -> subprocess.CompletedProcess:
    if isinstance(result, Exception):
        raise result
    return result


def _describe(r: subprocess.CompletedProcess) -> str:
    return f"argv={r.args[3:]!r}\nexit code {r.returncode}\n--- stdout ---\n{r.stdout}\n--- stderr ---\n{r.stderr}"


def _assert_one_line_error(r: subprocess.CompletedProcess) -> str:
    """Exit code 2, stderr exactly one non-empty line, nothing on stdout, no traceback; the line."""
    info = _describe(r)
    assert "Traceback" not in r.stdout + r.stderr, info
    assert r.returncode == 2, info
    assert r.stdout == "", info
    assert r.stderr.endswith("\n") and r.stderr.count("\n") == 1, f"stderr is not exactly one line\n{info}"
    line = r.stderr[:-1]
    assert line.strip(), info
    return line


# ---- models --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rt(default_model):
    return Runtime.from_pretrained(default_model, device="cpu")


@pytest.fixture(scope="module")
def short_ckpt(make_ckpt, default_model):
    """A random checkpoint with only 48 positions, the default model's vocabulary and its tokenizer.json."""
    path = make_ckpt("short", max_pos=SHORT_POSITIONS, vocab=49152, hidden=64, intermediate=128, layers=1)
    shutil.copy(Path(default_model) / "tokenizer.json", Path(path) / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def short_prompt_tokens(default_model) -> int:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(Path(default_model) / "tokenizer.json"))
    return len(tok.encode(SHORT_PROMPT, add_special_tokens=False).ids)


# ---- 1-3: CLI refusals ---------------------------------------------------------------------------------------------

def _gen(*flags: str, prompt: str = "Hello") -> list[str]:
    return ["generate", "--device", "cpu", "--model", "{model}", *flags, prompt]


def _plan(*flags: str, model: str = PLAN_CONFIG) -> list[str]:
    return ["plan", model, "--gpu-budget", "12GiB", *flags]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of --device cuda without CUDA")

# id: (argv, texts the one line must contain; "{n}"/"{total}" = the short prompt's tokens / + 60)
CLI_ERRORS = {
    "generate-empty-prompt": (_gen(prompt=""), ["PROMPT"]),
    "generate-max-new-tokens-negative": (_gen("--max-new-tokens", "-5"), ["--max-new-tokens", "-5"]),
    "generate-max-new-tokens-zero": (_gen("--max-new-tokens", "0"), ["--max-new-tokens", "0"]),
    "generate-temperature-negative": (_gen("--temperature", "-1"), ["--temperature", "-1"]),
    "generate-top-p-zero": (_gen("--top-p", "0"), ["--top-p", "0"]),
    "generate-top-p-above-one": (_gen("--top-p", "1.5"), ["--top-p", "1.5"]),
    "generate-top-k-negative": (_gen("--top-k", "-1"), ["--top-k", "-1"]),
    "generate-seed-negative": (_gen("--seed", "-3"), ["--seed", "-3"]),
    "generate-ring-depth-1": (_gen("--ring-depth", "1"), ["--ring-depth", "1"]),
    "generate-cpu-threads-0": (_gen("--cpu-threads", "0"), ["--cpu-threads", "0"]),
    "generate-prefill-chunk-0": (_gen("--prefill-chunk", "0"), ["--prefill-chunk", "0"]),
    "generate-draft-k-0": (_gen("--draft-k", "0"), ["--draft-k", "0"]),
    "generate-max-seq-len-0": (_gen("--max-seq-len", "0"), ["--max-seq-len", "0"]),
    "generate-gpu-budget-lots": (_gen("--gpu-budget", "lots"), ["--gpu-budget", "lots"]),
    "generate-device-mps": (["generate", "--device", "mps", "--model", "{model}", "Hello"], ["--device", "mps"]),
    "generate-device-cuda-unavailable": (["generate", "--device", "cuda", "--model", "{model}", "Hello"],
                                         ["--device", "cuda"]),
    "generate-dtype-float8": (_gen("--dtype", "float8"), ["--dtype", "float8"]),
    "generate-quantization-int3": (_gen("--quantization", "int3"), ["--quantization", "int3"]),
    "generate-model-nonexistent": (["generate", "--device", "cpu", "--model", "/nonexistent", "Hello"],
                                   ["--model", "/nonexistent"]),
    "generate-max-seq-len-beyond-model": (_gen("--max-seq-len", "100000"), ["--max-seq-len", "100000", "8192"]),
    "generate-prompt-plus-new-tokens-beyond-positions": (
        ["generate", "--model", "{short}", "--device", "cpu", "--max-new-tokens", "60", SHORT_PROMPT],
        ["--max-new-tokens", "60", "{n}", "{total}", str(SHORT_POSITIONS)]),
    "plan-bandwidth-0": (_plan("--bandwidth", "0"), ["--bandwidth", "0"]),
    "plan-batch-negative": (_plan("--batch", "-1"), ["--batch", "-1"]),
    "plan-hbm-bandwidth-negative": (_plan("--hbm-bandwidth", "-5"), ["--hbm-bandwidth", "-5"]),
    "plan-cpu-rate-0": (_plan("--cpu-rate", "0"), ["--cpu-rate", "0"]),
    "plan-missing-model": (_plan(model=MISSING_PLAN_MODEL), [MISSING_PLAN_MODEL]),
    "plan-gpu-budget-too-small": (["plan", PLAN_CONFIG, "--gpu-budget", "1MB"], []),  # see the test
}
CLI_ERROR_PARAMS = [pytest.param(case, id=case, marks=NO_CUDA if "cuda" in case else ()) for case in CLI_ERRORS]
CLI_OK = {"version": ["--version"], **{f"help-{sub}": [sub, "--help"] for sub in SUBCOMMANDS}}


@pytest.fixture(scope="module")
def cli_runs(default_model, short_ckpt):
    """Every refusal, --version and --help case, run concurrently once: {case id: CompletedProcess}."""
    commands = {k: v for k, v in CLI_OK.items()}
    for case, (argv, _) in CLI_ERRORS.items():
        if "cuda" in case and torch.cuda.is_available():
            continue
        commands[case] = [a.format(model=default_model, short=short_ckpt) if a in ("{model}", "{short}") else a
                          for a in argv]
    return _cli_many(commands)


@pytest.mark.parametrize("case", CLI_ERROR_PARAMS)
def test_cli_refuses_with_one_line(cli_runs, short_prompt_tokens, case):
    line = _assert_one_line_error(_finished(cli_runs[case]))
    n = short_prompt_tokens
    for text in CLI_ERRORS[case][1]:
        text = text.format(n=n, total=n + 60)
        assert text in line, f"{case}: {text!r} not named in: {line}"
    if case == "plan-gpu-budget-too-small":  # names the budget and the minimum it needs
        assert "--gpu-budget" in line or "gpu_budget" in line, line
        assert re.search(r"\bat least \d+(\.\d+)? ?[KMGT]i?B\b", line), line


def _flags_of(subcommand: str) -> set[str]:
    from graphrt.cli import build_parser
    ap = build_parser()
    sub = next(a for a in ap._actions if isinstance(a.choices, dict) and subcommand in a.choices).choices[subcommand]
    return {s for a in sub._actions for s in a.option_strings if s.startswith("--")}


@pytest.mark.parametrize("case", CLI_ERROR_PARAMS)
def test_cli_refusal_only_suggests_existing_flags(cli_runs, case):
    """A flag the message names (--max-seq-len, ...) must be one the subcommand has: a newcomer will type it."""
    r = _finished(cli_runs[case])
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", r.stderr))
    unknown = named - _flags_of(CLI_ERRORS[case][0][0])
    assert not unknown, f"{case}: the message names flags that `graphrt {r.args[3]}` does not have: " \
                        f"{sorted(unknown)}\n{r.stderr}"


# ---- 5: --version and --help ---------------------------------------------------------------------------------------

def test_cli_version(cli_runs):
    r = _finished(cli_runs["version"])
    assert r.returncode == 0, _describe(r)
    assert r.stdout == f"graphrt {graphrt.__version__}\n", _describe(r)
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_cli_help(cli_runs, subcommand):
    r = _finished(cli_runs[f"help-{subcommand}"])
    info = _describe(r)
    assert r.returncode == 0, info
    assert r.stdout.startswith(f"usage: graphrt {subcommand}"), info
    assert r.stderr == "" and "Traceback" not in r.stdout, info


def test_cli_fetch_default_help_says_where_the_model_goes(cli_runs):
    from graphrt.default_model import describe_default_location
    out = _finished(cli_runs["help-fetch-default"]).stdout
    assert "GRAPHRT_HOME" in out, out
    squeeze = lambda s: "".join(s.split())  # noqa: E731  (help text is re-wrapped, also at hyphens)
    assert squeeze(describe_default_location()) in squeeze(out), out


# ---- 3-4: API refusals ---------------------------------------------------------------------------------------------

def test_api_max_seq_len_beyond_model_positions(default_model):
    with pytest.raises(ConfigError) as e:
        Runtime.from_pretrained(default_model, device="cpu", max_seq_len=100000)
    assert "max_seq_len" in str(e.value) and "8192" in str(e.value), e.value


def test_api_prompt_plus_new_tokens_beyond_positions(short_ckpt):
    short = Runtime.from_pretrained(short_ckpt, device="cpu")
    with pytest.raises(ConfigError) as e:
        short.generate([[1, 2, 3]], max_new_tokens=60)
    assert str(SHORT_POSITIONS) in str(e.value), e.value


# id: (call on the runtime, exception type, texts the message must contain)
API_ERRORS = {
    "generate-str": (lambda rt: rt.generate("text", 5), TypeError, ["prompts"]),
    "generate-flat-list": (lambda rt: rt.generate([1, 2, 3], 5), TypeError, ["prompts", "[ids]"]),
    "generate-1d-tensor": (lambda rt: rt.generate(torch.tensor([1, 2, 3]), 5), TypeError, ["[B, T]"]),
    "generate-empty-prompt": (lambda rt: rt.generate([[]], 5), ValueError, ["prompt"]),
    "generate-id-beyond-vocab": (lambda rt: rt.generate([[1, 10**9]], 5), ValueError, ["vocab_size"]),
    "generate-max-new-tokens-0": (lambda rt: rt.generate([[1, 2, 3]], 0), ValueError, ["max_new_tokens"]),
    "generate-temperature-negative": (lambda rt: rt.generate([[1, 2, 3]], 5, temperature=-1), ValueError,
                                      ["temperature"]),
    "generate-top-p-0": (lambda rt: rt.generate([[1, 2, 3]], 5, top_p=0), ValueError, ["top_p"]),
    "generate-two-seeds-one-prompt": (lambda rt: rt.generate([[1, 2, 3]], 5, seed=[1, 2]), ValueError, ["seed"]),
}


@pytest.mark.parametrize("case", list(API_ERRORS))
def test_api_refuses_bad_input(rt, case):
    call, kind, texts = API_ERRORS[case]
    with pytest.raises(kind) as e:
        call(rt)
    for text in texts:
        assert text in str(e.value), f"{case}: {text!r} not in {e.value!r}"


def test_api_device_mps_is_config_error(default_model):
    with pytest.raises(ConfigError) as e:
        Runtime.from_pretrained(default_model, device="mps")
    assert "device" in str(e.value) and "mps" in str(e.value), e.value


def test_api_unknown_option_lists_known_options(default_model):
    with pytest.raises(ConfigError) as e:
        Runtime.from_pretrained(default_model, device="cpu", max_sequence_length=5)
    msg = str(e.value)
    assert "max_sequence_length" in msg, msg
    for known in ("max_seq_len", "max_batch_size", "gpu_budget", "ring_depth"):
        assert known in msg, f"known option {known!r} not listed: {msg}"


# ---- 6-7: streamed text and the stats line -------------------------------------------------------------------------

STREAM_PROMPTS = {
    "cjk": "日本の首都は東京です。日本の首都は東京です。日本の首都は",
    "emoji": "Emoji test: 🙂👍🏽🎉 and family 👨‍👩‍👧. Repeat: 🙂👍🏽🎉",
}


def _non_ascii(text: str) -> bool:
    return any(ord(c) > 127 for c in text.replace("\ufffd", ""))


@pytest.fixture(scope="module")
def one_thread():
    """Decode with one torch thread here and in the CLI runs: the same arithmetic on both sides whatever the
    machine, the two CLI runs can share the cores, and a busy machine does not stall thread pools."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def streamed(rt, default_model, one_thread):
    """{prompt id: dict(n, ids, new, text, probe_text, run)}: N new tokens chosen so the one-shot decode ends on a
    whole character (preferring 24..40), the API's greedy tokens and text, and the CLI run of the same."""
    out = {}
    for key, prompt in STREAM_PROMPTS.items():
        ids = rt.encode(prompt)
        probe = rt.generate([ids], 40)[0][len(ids):]
        decode = lambda t: rt.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
        clean = [n for n in range(40, 0, -1) if not decode(probe[:n]).endswith("\ufffd")]
        n = next((n for n in clean if n >= 24), clean[0] if clean else 40)
        new = probe if n == len(probe) else rt.generate([ids], n)[0][len(ids):]  # probe: generate(ids, 40)
        out[key] = dict(prompt=prompt, n=n, ids=ids, new=new, text=decode(new), probe_text=decode(probe))
    runs = _cli_many({key: ["generate", "--device", "cpu", "--model", str(default_model), "--max-new-tokens",
                            str(v["n"]), v["prompt"]] for key, v in out.items()})  # one torch thread each
    for key, run in runs.items():
        out[key]["run"] = run
    return out


@pytest.mark.parametrize("key", list(STREAM_PROMPTS))
def test_cli_streamed_text_equals_one_shot_decode(streamed, key):
    s = streamed[key]
    r = _finished(s["run"])
    info = _describe(r)
    assert r.returncode == 0 and "Traceback" not in r.stderr, info
    assert len(s["new"]) == s["n"]
    assert not s["text"].endswith("\ufffd"), f"N={s['n']} cuts a character: {s['text']!r}"
    assert r.stdout == s["text"] + "\n", f"N={s['n']}\nexpected {s['text'] + chr(10)!r}\ngot      {r.stdout!r}"
    assert "\ufffd" not in r.stdout, info
    if _non_ascii(s["probe_text"][:len(s["text"])]) or _non_ascii(s["text"]):
        assert _non_ascii(r.stdout), r.stdout


@pytest.mark.parametrize("key", list(STREAM_PROMPTS))
def test_api_stream_text_equals_one_shot_decode(rt, streamed, key):
    s = streamed[key]
    # stream_text stops at EOS by default; the CLI and generate() do not
    kw = {"stop_at_eos": False} if any(t in rt.eos_ids for t in s["new"]) else {}
    pieces = list(rt.stream_text(s["prompt"], s["n"], **kw))
    assert "".join(pieces) == s["text"], pieces
    assert not any("\ufffd" in p for p in pieces), pieces


@pytest.mark.parametrize("key", list(STREAM_PROMPTS))
def test_cli_generate_stats_line(streamed, key):
    s = streamed[key]
    r = _finished(s["run"])
    stats = [line for line in r.stderr.splitlines() if "prefill:" in line]
    assert len(stats) == 1, _describe(r)
    prefill, sep, decode = stats[0].partition("decode:")
    assert sep, stats[0]
    m = re.search(r"prefill: (\d+) tokens, time to first token (\d+(\.\d+)?) ?ms \((\d+(\.\d+)?) tokens/s\)", prefill)
    assert m, f"prefill figures missing: {stats[0]}"
    assert int(m.group(1)) == len(s["ids"]), stats[0]
    m = re.search(r"^ (\d+) tokens, (\d+(\.\d+)?) tokens/s", decode)
    assert m, f"decode figures missing: {stats[0]}"
    assert int(m.group(1)) == s["n"], stats[0]
